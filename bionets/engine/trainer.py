"""The training loop: short enough to read whole; its steps log nothing and never wait on the device
(the epoch's sums stay there until its end). Evaluation is in :mod:`evaluate`, the run directory's
files in :mod:`rundir`.

``train(cfg)`` runs alone or under ``torchrun`` (DistributedDataParallel, rank-0 logging and
checkpoints, metrics reduced over ranks). Mechanisms reach it only through :mod:`hooks`.
"""
from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from bionets.config import RunConfig, check_resume_config
from bionets.configbase import dump_yaml
from bionets.data import build_data
from bionets.data.config import unused_data_options_note
from bionets.engine.checkpoint import (load_checkpoint, load_model_state, require_entries, rng_state, save_checkpoint,
                                       seed_everything, set_rng_state)
from bionets.engine.distributed import (Dist, all_reduce_sum, broadcast_buffers, gather_objects, init_distributed,
                                        shutdown)
from bionets.engine.evaluate import autocast_for, evaluate, task_loss
from bionets.engine.files import make_output_dir
from bionets.engine.hooks import Progress
from bionets.engine.metrics import FORMATS, MetricsWriter, console_line, topk_correct
from bionets.engine.model import build_model, match_layout_free_grad_strides, training_only_keys, use_channels_last
from bionets.engine.optim import (create_optimizer, create_scheduler, lr_mult_summary, require_state_shapes,
                                  schedule_note, unused_options_note)
from bionets.engine.rundir import copy_file, remove_run_files, remove_temporary_files, unused_name, write_text
from bionets.engine.signals import ctrl_c_deferred
from bionets.errors import BionetsError, one_line
from bionets.toolchain import require_cpu_compiler


# what train_epoch and evaluate put in an epoch's record (the summary gives them its own names): the
# metrics whose console formats metrics.FORMATS lists, and the epoch
ENGINE_METRICS = frozenset({"epoch", *FORMATS})


@dataclass
class RunState:
    epoch: int = 0          # epochs completed
    step: int = 0           # optimizer steps completed (per process)
    best_top1: float = -1.0
    history: list[dict] = field(default_factory=list)


def train(cfg: RunConfig, *, quiet: bool = False, checkpoint: dict | None = None,
          on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train ``cfg`` to the end (or resume it from ``cfg.resume``, whose contents the caller may have
    loaded already: ``checkpoint``); return the summary also written to summary.json. ``on_epoch``
    gets each epoch's record (the main process's, after its checkpoint): a caller's own progress."""
    dist = init_distributed(cfg.train.device)
    try:
        return Trainer(cfg, dist, quiet=quiet, checkpoint=checkpoint, on_epoch=on_epoch).fit()
    finally:                    # leave a process group set up here before exit (its threads aborted a rank at exit once)
        if dist.created:
            shutdown()


class Trainer:
    def __init__(self, cfg: RunConfig, dist: Dist, quiet: bool = False, checkpoint: dict | None = None,
                 on_epoch: Callable[[dict], None] | None = None):
        self.cfg, self.dist, self.device, self.on_epoch = cfg, dist, dist.device, on_epoch
        self.quiet = quiet or not dist.is_main
        self.run_dir, self.replaced = cfg.run_dir, None
        t = cfg.train
        if t.amp == "fp16" and self.device.type == "cpu":
            raise BionetsError("train.amp=fp16 needs CUDA (its loss scaling and fast fp16 kernels): on the CPU use "
                               "train.amp=bf16 or train.amp=off")
        if t.compile and self.device.type == "cpu":
            require_cpu_compiler("train.compile", "set train.compile=false")
        resume = (checkpoint if checkpoint is not None else load_checkpoint(cfg.resume)) if cfg.resume else None
        if resume is not None:
            require_entries(resume, cfg.resume, ("optimizer", "scheduler", "scaler", "rng", "epoch", "step", "best_top1",
                                                 "history"))
            check_resume_config(resume["config"], cfg, cfg.resume)
            if not 0 <= resume["epoch"] <= t.epochs or resume["step"] < 0:
                raise BionetsError(f"checkpoint '{cfg.resume}' is at epoch {resume['epoch']}, step {resume['step']}, "
                                   f"outside its run's 0..{t.epochs} epochs (edited or written by another program): "
                                   "use another checkpoint (e.g. best.pt or last.pt of the run)")
            if resume["epoch"] == t.epochs and not self._continues_its_own_run():
                # (resumed elsewhere it would claim a run directory and leave it without a checkpoint)
                raise BionetsError(f"checkpoint '{cfg.resume}' finished its run ({t.epochs} of {t.epochs} epochs): "
                                   f"nothing to train; evaluate it with bionets eval {cfg.resume}, or train from its "
                                   f"weights in a new run with model.init={cfg.resume}")
        seed_everything(t.seed)
        self.data = build_data(cfg.data, rank=dist.rank, world_size=dist.world_size, seed=t.seed,
                               label_smoothing=t.label_smoothing)
        if self.device.type == "cuda":
            self.data.to(self.device)       # in-memory splits batch and augment on the GPU
        self.model, self.hooks, self.reports = build_model(cfg, self.data.num_classes, self.data.in_chans, self.device,
                                                           init=resume is None)
        if dist.rank > 0:       # the same weights everywhere, but each rank its own dropout / drop-path masks
            seed_everything(rank_seed(t.seed, dist.rank))
        self.channels_last = use_channels_last(t.channels_last, self.model, self.device)
        self.optimizer = create_optimizer(self.model, cfg.optim)
        micro = len(self.data.train)
        if micro < t.grad_accum:
            raise BionetsError(f"the training split gives {micro} batch(es) per process, fewer than "
                               f"train.grad_accum={t.grad_accum}: lower data.batch_size or grad_accum")
        self.steps_per_epoch = micro // t.grad_accum
        self.scheduler = create_scheduler(self.optimizer, cfg.sched, t.epochs, self.steps_per_epoch)
        self.lr_used = cfg.optim.lr
        self.scaler = torch.amp.GradScaler("cuda", enabled=t.amp == "fp16" and self.device.type == "cuda")
        self.ema = ModelEmaV3(self.model, decay=t.ema_decay) if t.ema_decay else None
        self.autocast = autocast_for(t.amp, self.device)
        self.state = RunState()
        if resume is not None:
            self._restore(resume)
        self.net = self.model
        if t.compile:   # true = torch's default mode; 'reduce-overhead' replays CUDA graphs (launch-bound GPU steps)
            self.net = torch.compile(self.net, mode=None if t.compile is True else t.compile)
        self.eval_net = self.net        # evaluated outside DDP, whose forward would hold a collective
        if dist.enabled:
            if self.channels_last:
                match_layout_free_grad_strides(self.model)
            self.net = DistributedDataParallel(self.net, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # -- checkpoints -------------------------------------------------------------------------
    def _checkpoint(self, rng: list[dict]) -> dict:
        """The run's state; ``rng``: every rank's random state, in rank order (rank 0's as 'rng')."""
        return {"config": self.cfg.to_dict(), "model": self.model.state_dict(),
                "training_only": training_only_keys(self.model),
                "data_info": {"num_classes": self.data.num_classes, "in_chans": self.data.in_chans,
                              "classes": [str(c) for c in self.data.classes]},
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(), "ema": self.ema.state_dict() if self.ema else None,
                "epoch": self.state.epoch, "step": self.state.step, "best_top1": self.state.best_top1,
                "history": self.state.history, "rng": rng[0], **({"rng_ranks": rng} if len(rng) > 1 else {})}

    def _restore(self, ckpt: dict) -> None:
        load_model_state(self.model, ckpt, self.cfg.resume)
        try:
            self._restore_training_state(ckpt)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as err:
            raise BionetsError(f"checkpoint '{self.cfg.resume}': its optimizer, schedule, EMA or random state cannot be "
                               f"restored ({type(err).__name__}: {(str(err).splitlines() or [''])[0][:120]}): resume another "
                               "checkpoint, or start a new run from its weights with model.init=CKPT") from None

    def _restore_training_state(self, ckpt: dict) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        require_state_shapes(self.optimizer)
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.scaler.load_state_dict(ckpt["scaler"])
        if self.ema is not None and ckpt.get("ema") is not None:
            self.ema.load_state_dict(ckpt["ema"])
        self.state = RunState(ckpt["epoch"], ckpt["step"], ckpt["best_top1"], list(ckpt["history"]))
        ranks, rank = ckpt.get("rng_ranks"), self.dist.rank
        if ranks is not None and len(ranks) == self.dist.world_size:
            set_rng_state(ranks[rank])
        else:                   # a checkpoint of another number of processes: rank 0 goes on with its stream
            set_rng_state(ckpt["rng"])
            if rank > 0:
                seed_everything(rank_seed(self.cfg.train.seed, rank, ckpt["step"]))

    # -- the loop -------------------------------------------------------------------------------
    def progress(self, lr: float = 0.0) -> Progress:
        t = self.cfg.train
        return Progress(self.state.step, self.steps_per_epoch * t.epochs, self.state.epoch, t.epochs, lr)

    def fit(self) -> dict:
        main, claimed = self.dist.is_main, not self._continues_its_own_run()
        failed = None
        if main:
            try:
                self._prepare_run_dir(claimed)
            except BionetsError as err:
                failed = err
        # every rank takes rank 0's run directory, or its error (the others went on into the first
        # step, and died there on the lost connection in a traceback)
        name, said = gather_objects((self.cfg.name, None if failed is None else str(failed)))[0]
        if failed is not None:
            raise failed
        if said is not None:
            raise BionetsError(said)
        self._use_name(name)
        cfg, writer, saved = self.cfg, None, 0
        try:
            if main:
                with ctrl_c_deferred():     # TensorBoard replays a resumed run's history: a write like any other
                    writer = MetricsWriter(self.run_dir, self.state.history)
                if not self.quiet:
                    self._announce()
            for hook in self.hooks:
                hook.on_step(self.progress())
            while self.state.epoch < cfg.train.epochs:
                record = self.train_epoch()
                self._stop_if_diverged(record["train_loss"])
                record.update(self.eval_epoch())
                for hook in self.hooks:
                    record.update(hook.epoch_metrics(self.model))
                self.state.epoch += 1
                self.state.history.append(record)
                rng = gather_objects(rng_state())           # every rank's, for an exact resume
                improved = record["test_top1"] > self.state.best_top1 and all(h.may_be_best() for h in self.hooks)
                if improved:
                    self.state.best_top1 = record["test_top1"]
                if main:
                    with ctrl_c_deferred():     # a Ctrl-C lands in the training, not in the writers' locks
                        writer.write(record)
                        ckpt = self._checkpoint(rng)
                        save_checkpoint(self.run_dir / "last.pt", ckpt)
                        saved = self.state.epoch          # (the epoch last.pt holds; 0: none saved yet)
                        if improved:
                            save_checkpoint(self.run_dir / "best.pt", ckpt)
                        if not self.quiet:
                            tqdm.write(console_line(record))
                    if self.on_epoch is not None:
                        self.on_epoch(record)
        except BaseException as err:
            if isinstance(err, BrokenPipeError):    # its output was piped into `head`, which ended: the run is cut
                err.bionets_run_cut = True
            if isinstance(err, KeyboardInterrupt | BrokenPipeError):     # the CLI's one line: what is kept
                last = self.run_dir / "last.pt"
                if not main:                                                # (rank 0 keeps the files)
                    err.bionets_kept = f"process {self.dist.rank} of {self.dist.world_size}: rank 0's line says " \
                                       "what the run kept"
                elif saved:
                    err.bionets_kept = (f"{last} holds epoch {saved} of {cfg.train.epochs}: continue with "
                                        f"bionets train --resume {last}")
                elif claimed:
                    err.bionets_kept = f"it finished no epoch, so it kept no checkpoint (its run directory " \
                                       f"{self.run_dir} is removed)"
            if main and claimed and not saved:
                # failed or interrupted before its first checkpoint: the directory it claimed holds its
                # config and logs but nothing to resume; removed, so that a rerun after the fix takes its name
                with ctrl_c_deferred():
                    if writer is not None:
                        writer.close()
                        writer = None
                    remove_run_files(self.run_dir)
            raise
        finally:
            if writer is not None:
                with ctrl_c_deferred():
                    writer.close()
        summary = self._summary()
        if main:
            for hook in self.hooks:
                hook.on_train_end(self.run_dir, self.state.history)
            write_text(self.run_dir / "summary.json", json.dumps(summary, indent=2))
            if not self.quiet:
                print(f"done: final test top-1 {summary['final_top1']:.2f}%, best {summary['best_top1']:.2f}%; "
                      f"{summary['train_time_s']:.1f} s of training; run directory {self.run_dir}")
        return summary

    def _stop_if_diverged(self, train_loss: float) -> None:
        """One error line, before any checkpoint of the epoch is written, when its training loss is
        not finite (the same on every rank: the loss is reduced over them)."""
        if math.isfinite(train_loss):
            return
        last = self.run_dir / "last.pt"
        kept = f"; {last} keeps epoch {self.state.epoch}" if self.state.epoch and last.is_file() else ""
        raise BionetsError(f"training diverged: the training loss of epoch {self.state.epoch + 1} is {train_loss} "
                           f"(optim.lr={self.cfg.optim.lr}): lower optim.lr or set train.clip_grad{kept}")

    def train_epoch(self) -> dict:
        t, model, device = self.cfg.train, self.net, self.device
        loader, accum = self.data.train, t.grad_accum
        loader.set_epoch(self.state.epoch)
        model.train()
        sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss*n, top1, n
        n_micro = self.steps_per_epoch * accum
        # an error closes (clears) the bar: its message gets a line of its own; only a terminal gets a
        # bar (disable=None): a redirected stderr (a log) would hold every frame of it
        with tqdm(total=n_micro, desc=f"epoch {self.state.epoch + 1}/{t.epochs}", leave=False, file=sys.stderr,
                  disable=True if self.quiet or not t.progress else None, dynamic_ncols=True) as bar:
            start = time.perf_counter()
            for i, (images, targets) in enumerate(loader):
                if i >= n_micro:
                    break
                images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
                if self.channels_last and images.ndim == 4:
                    images = images.contiguous(memory_format=torch.channels_last)
                soft, labels = None, targets
                if self.data.mixup is not None:
                    images, soft = self.data.mixup(images, targets)
                    labels = soft.argmax(1)      # the class with the larger share of each mixed image, for the hooks
                boundary = (i + 1) % accum == 0
                sync = nullcontext() if boundary or not self.dist.enabled else model.no_sync()
                with sync:
                    with self.autocast():
                        logits = model(images) if self.state.step or i else self._first_forward(model, images)
                        loss = task_loss(t.loss, logits.float(), soft if soft is not None else targets,
                                         t.label_smoothing)
                        for hook in self.hooks:
                            extra = hook.aux_loss(self.model, images, logits, labels)
                            if extra is not None:
                                loss = loss + extra
                    self.scaler.scale(loss / accum).backward()
                if boundary:
                    self._optimizer_step()
                correct = topk_correct(logits.detach(), targets, (1,))[0]
                sums[:2] += torch.stack([loss.detach() * len(targets), correct]).double()
                sums[2] += len(targets)
                bar.update()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        all_reduce_sum(sums)
        n = max(sums[2].item(), 1.0)
        return {"epoch": self.state.epoch + 1, "train_loss": sums[0].item() / n, "train_top1": 100 * sums[1].item() / n,
                "lr": self.lr_used,
                "images_per_s": n / elapsed, "epoch_time": elapsed}

    def _first_forward(self, model: nn.Module, images: torch.Tensor) -> torch.Tensor:
        """The run's first forward pass, where a model that does not fit the data (in_chans, img_size
        set in model.kwargs) fails inside PyTorch, or at timm's own size check (an AssertionError),
        or where an option of the wrong type meets arithmetic (``drop_rate: abc``, a TypeError): one
        line naming both, not a traceback."""
        try:
            return model(images)
        except torch.cuda.OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, AssertionError, TypeError) as err:
            raise BionetsError(f"model '{self.cfg.model.name}' failed on the first training batch, of shape "
                               f"{list(images.shape)} from data '{self.cfg.data.name}' ({one_line(err)}): check "
                               f"{self._kwargs_to_check()} against the data and the model's allowed values") from None

    def _kwargs_to_check(self) -> str:
        """The model options a failed first batch may come from, for its error line."""
        given = dict(self.cfg.model.kwargs)
        if not given:
            return "model.kwargs (in_chans, img_size, ...)"
        return "model.kwargs {" + ", ".join(f"{k}: {v!r}" for k, v in sorted(given.items())) + "}"

    def _optimizer_step(self) -> None:
        t = self.cfg.train
        self.lr_used = base_rate(self.optimizer.param_groups)      # this step's (logged per epoch)
        if t.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), t.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.scheduler.step_update(self.state.step)
        progress = self.progress(self.lr_used)
        for hook in self.hooks:
            hook.on_step(progress)
        if self.ema is not None:        # averages the weights; a mechanism's schedule state is copied
            self.ema.update(self.model, step=self.state.step)
            for hook in self.hooks:
                hook.copy_state(self.model, self.ema.module)

    def eval_epoch(self) -> dict:
        t = self.cfg.train
        # rank 0's BatchNorm statistics, the saved model's (DDP hands them out at each training forward);
        # then each rank evaluates its shard outside DDP, whose forward would wait on ranks with fewer batches
        broadcast_buffers(self.model)
        out = evaluate(self.eval_net, self.data.test, self.device, loss=t.loss, amp=t.amp,
                       channels_last=self.channels_last)
        if self.ema is not None:
            # each rank's EMA averaged its own BatchNorm statistics: evaluate rank 0's, the one saved
            broadcast_buffers(self.ema.module)
            ema = evaluate(self.ema.module, self.data.test, self.device, loss=t.loss, amp=t.amp,
                           channels_last=self.channels_last)
            out.update({f"ema_{k}": v for k, v in ema.items()})
        return out

    def _prepare_run_dir(self, claimed: bool) -> None:
        """Rank 0's part: the run's directory (a free name where the run claims one: a run never
        mixes its files with another run's), its config, and a resumed run's best checkpoint."""
        if claimed:
            self._use_name(unused_name(self.cfg.out_dir, self.cfg.name, self._config_text))
        make_output_dir(self.run_dir, "another out_dir (--out-dir) or name")
        if not claimed:
            remove_temporary_files(self.run_dir)        # a killed write's, in the run it continues
        if not claimed or not (self.run_dir / "config.yaml").is_file():    # (a claim writes it)
            write_text(self.run_dir / "config.yaml", self._config_text(self.cfg.name))
        if claimed and self.cfg.resume and (best := Path(self.cfg.resume).parent / "best.pt").is_file():
            # resumed into a new directory: the best epoch so far is the source run's (a later
            # epoch replaces it only where it scores higher)
            copy_file(best, self.run_dir / "best.pt")

    def _continues_its_own_run(self) -> bool:
        """Whether this run resumes from a checkpoint in its own run directory (and may write there)."""
        return bool(self.cfg.resume) and Path(self.cfg.resume).resolve().parent == self.run_dir.resolve()

    def _config_text(self, name: str) -> str:
        """The config saved with the run (config.yaml) were it to run as ``name``."""
        return dump_yaml(self.cfg.model_copy(update={"name": name}).to_dict())

    def _use_name(self, name: str) -> None:
        """Run as ``name`` (its run directory out_dir/name; recorded in the config saved with the run,
        so that a resume continues there). A changed name is said even under --quiet (on stderr):
        the results are not where the caller asked for them."""
        if name != self.cfg.name:
            self.replaced = self.run_dir
            self.cfg = self.cfg.model_copy(update={"name": name})
            self.run_dir = self.cfg.run_dir
            if self.quiet and self.dist.is_main:
                print(f"bionets: {self.replaced} holds an earlier run; this run writes {self.run_dir}", file=sys.stderr)

    def _announce(self) -> None:
        n_params = sum(p.numel() for p in self.model.parameters())
        d = self.dist
        print(f"bionets: model {self.cfg.model.name} ({n_params:,} parameters), data {self.cfg.data.name} "
              f"({self.data.num_classes} classes), {_count(self.cfg.train.epochs, 'epoch')} x {_count(self.steps_per_epoch, 'step')}, "
              f"device {self.device}" + (f" x {d.world_size} processes" if d.enabled else "")
              + f", run directory {self.run_dir}"
              + (f" ({self.replaced} holds an earlier run)" if self.replaced else ""))
        for report in self.reports:
            print(report.for_optimizer(self.cfg.optim.name, self.cfg.optim.lr_mult))
        if lr_line := lr_mult_summary(self.model, self.cfg.optim):
            print(lr_line)
        if self.cfg.resume:
            done = self.state.epoch >= self.cfg.train.epochs
            print(f"resumed from {self.cfg.resume} at epoch {self.state.epoch}"
                  + (f": the run is complete ({self.state.epoch} of {self.cfg.train.epochs} epochs), nothing to train"
                     if done else f" of {self.cfg.train.epochs}"))
        for note in (*self.cfg._notes, slow_bf16_note(self.cfg.train.amp, self.device),
                     unused_options_note(self.cfg.optim), unused_data_options_note(self.cfg.data),
                     schedule_note(self.cfg.sched, self.cfg.train.epochs)):
            if note:
                print(note)

    def _summary(self) -> dict:
        h = self.state.history
        last = h[-1] if h else {}
        summary = {"run_dir": str(self.run_dir), "epochs": self.state.epoch,
                   "final_top1": last.get("test_top1", float("nan")), "best_top1": self.state.best_top1,
                   # the best of every epoch, whatever the mechanisms allow best.pt (the STDS paper's "best")
                   "peak_top1": max((r["test_top1"] for r in h if "test_top1" in r), default=float("nan")),
                   "final_top5": last.get("test_top5", float("nan")),
                   "train_time_s": sum(r.get("epoch_time", 0.0) for r in h)}
        # the last epoch's EMA and mechanism metrics (hooks' epoch_metrics), per-layer ones ("a/b") aside
        summary.update({k: v for k, v in last.items() if k not in ENGINE_METRICS and "/" not in k})
        return summary


def slow_bf16_note(amp: str, device: torch.device) -> str | None:
    """A note where ``train.amp=bf16`` runs on a CPU without native bf16 arithmetic (AVX512-BF16 or
    AMX, as oneDNN reports it): autocast there emulates bf16 and is slower than float32 (on the
    2026-11-27 host, AVX2 only, a 4-block ViT-Tiny on the digits took 62 s an epoch against 4 s with
    amp off). The GPU recipes (configs/dnrt ViTs) set bf16."""
    if amp != "bf16" or device.type != "cpu":
        return None
    try:
        native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):       # a build without oneDNN: nothing to tell
        return None
    return None if native else ("note: train.amp=bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): "
                                "autocast emulates it and runs slower than float32 here; train.amp=off is faster")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The seed of process ``rank`` > 0 (rank 0 keeps the run's own stream)."""
    return (seed + 1_000_003 * rank + 7919 * step) % 2**63


def base_rate(groups: list[dict]) -> float:
    """The schedule's base learning rate, from a group not frozen by a multiplier of 0."""
    scaled = [(g["lr"], g.get("lr_scale", 1.0)) for g in groups]
    return next((lr / scale for lr, scale in scaled if scale > 0), 0.0)
