"""torchrun with 2 gloo processes learns the same weights as 1 process with the same global batch,
ARR included (its class memory depends on the order of the samples: the processes gather them in
the global batch's order)."""
import os
import socket
import subprocess
import sys

import torch

from bionets.engine.checkpoint import load_checkpoint

ARGS = ["train", "model.name=test_mlp", "model.kwargs={in_chans: 1, img_size: 8}", "data.batch_size=64",
        "data.augment=false", "train.epochs=2", "train.progress=false", "optim.lr=0.05", "sched.warmup_epochs=0",
        "train.device=cpu", "mechanisms={arr: {weight: 1.0}}"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, tmp_path, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert not check or out.returncode == 0, out.stderr[-3000:]
    return out


def torchrun(tmp_path, *args):
    """Two gloo processes; a second try on a fresh port if the first port was taken meanwhile."""
    for attempt in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={free_port()}", "-m", "bionets", *args]
        out = run(cmd, tmp_path, check=attempt == 1)
        if out.returncode == 0:
            return out


def test_two_gloo_processes_match_one(tmp_path):
    from bionets.cli import main
    assert main([*ARGS, f"out_dir={tmp_path}", "name=single"]) == 0         # (in this process: no second import)
    out = torchrun(tmp_path, *ARGS, f"out_dir={tmp_path}", "name=ddp")
    assert "x 2 processes" in out.stdout                      # rank 0 announced the run once
    assert out.stdout.count("bionets: model") == 1
    one, two = load_checkpoint(tmp_path / "single" / "last.pt"), load_checkpoint(tmp_path / "ddp" / "last.pt")
    assert one["step"] == two["step"]
    for key in one["model"]:
        torch.testing.assert_close(one["model"][key], two["model"][key], rtol=1e-4, atol=1e-5)
    # synchronized metrics: the test split is counted whole across ranks
    assert abs(one["history"][-1]["test_top1"] - two["history"][-1]["test_top1"]) < 0.6


SNAPSHOTS = """import shutil, sys
from pathlib import Path
import bionets.engine.trainer as trainer
save = trainer.save_checkpoint
def keep(path, state):       # every epoch's last.pt kept as epochN.pt
    save(path, state)
    if Path(path).name == "last.pt":
        shutil.copy(path, Path(path).parent / f"epoch{state['epoch']}.pt")
trainer.save_checkpoint = keep
from bionets.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ranks_draw_their_own_masks_resume_exactly_and_log_the_saved_ema(tmp_path):
    """Each rank its own random stream (dropout masks: they were the same on every rank), all of them
    saved, so a 2-process resume is exact; the logged EMA metrics are those of the saved EMA (each
    rank's EMA had averaged its own BatchNorm statistics)."""
    from bionets.engine.evaluate import evaluate_checkpoint
    (tmp_path / "snap.py").write_text(SNAPSHOTS)
    args = ["train", "model.name=resnet20_cifar", "model.kwargs={in_chans: 1, img_size: 8, widths: [4, 4, 8], drop_rate: 0.5}",
            "data.batch_size=64", "train.epochs=2", "train.progress=false", "train.device=cpu", "train.ema_decay=0.9",
            "sched.warmup_epochs=0", f"out_dir={tmp_path}"]
    for name, extra in (("straight", []), ("resumed", [f"resume={tmp_path / 'straight' / 'epoch1.pt'}"])):
        for attempt in range(2):
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                   f"--master_port={free_port()}", str(tmp_path / "snap.py"), *args, f"name={name}", *extra]
            if run(cmd, tmp_path, check=attempt == 1).returncode == 0:
                break
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "resumed" / "last.pt")
    assert len(a["rng_ranks"]) == 2 and not torch.equal(a["rng_ranks"][0]["torch"], a["rng_ranks"][1]["torch"])
    for part in ("model", "ema"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), (part, key)
    logged = a["history"][-1]
    saved = evaluate_checkpoint(tmp_path / "straight" / "last.pt", ema=True)
    assert abs(saved["test_loss"] - logged["ema_test_loss"]) < 1e-4 and saved["test_top1"] == logged["ema_test_top1"]


def test_a_process_group_set_up_by_the_caller_is_left_to_it(monkeypatch):
    """train() leaves the process group at its end only if init_distributed set it up: a caller's own
    group (a script that goes on with collectives after training) stays."""
    import torch.distributed as dist
    from bionets.engine.distributed import init_distributed
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        assert not init_distributed("cpu").created
    finally:
        dist.destroy_process_group()


def test_a_run_directory_rank_0_cannot_make_ends_every_rank_on_its_line(tmp_path):
    """Rank 0 made the directory while rank 1 went on into the first step, where rank 0's exit ended it
    in a traceback of the lost gloo connection; now every rank ends on rank 0's line (torchrun then
    reports the failed workers, as for any error)."""
    (tmp_path / "afile").touch()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "bionets", *ARGS, "out_dir=afile", "name=r"]
    out = run(cmd, tmp_path, check=False)
    said = "bionets: error: cannot make the output directory 'afile/r' ('afile' is a file)"
    assert out.returncode != 0 and out.stderr.count(said) == 2, out.stderr[-3000:]     # (the ranks' lines may interleave)
    assert "gloo" not in out.stderr and "Connection closed" not in out.stderr


STOP_IN_EPOCH_2 = """import sys
import bionets.engine.trainer as trainer
epoch = trainer.Trainer.train_epoch
def stopped(self):           # Ctrl-C on every rank in the second epoch, after the first one's checkpoint
    if self.state.epoch == 1:
        raise KeyboardInterrupt
    return epoch(self)
trainer.Trainer.train_epoch = stopped
from bionets.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_stopped_run_says_what_it_kept_on_rank_0_only(tmp_path):
    """Rank 1 said "a run keeps the checkpoint of its last complete epoch, if it finished one" beside
    rank 0's line naming it (and, before the first epoch, beside rank 0's "kept no checkpoint")."""
    (tmp_path / "stop.py").write_text(STOP_IN_EPOCH_2)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "stop.py", *ARGS, f"out_dir={tmp_path}", "name=r"]
    out = run(cmd, tmp_path, check=False)
    last = tmp_path / "r" / "last.pt"
    assert out.stderr.count(f"bionets: interrupted; {last} holds epoch 1 of 2: continue with") == 1, out.stderr[-3000:]
    assert out.stderr.count("bionets: interrupted; process 1 of 2: rank 0's line says what the run kept") == 1
    assert "if it finished one" not in out.stderr
