"""Shared settings for engine tests: a tiny MLP on the bundled digits, a few fast epochs."""
from bionets.config import load_config

FAST = ["model.name=test_mlp", "model.kwargs={in_chans: 1, img_size: 8}", "data.batch_size=64",
        "optim.lr=0.2", "sched.warmup_epochs=0", "train.progress=false"]


def fast_config(tmp_path, *extra, name="run"):
    return load_config(None, FAST + [f"out_dir={tmp_path}", f"name={name}", *extra])
