"""Timing and peak-memory measurement shared by every benchmark (``benchmarks/``, ``bionets bench``).

Times are medians over repeats after warm-up, synchronized on CUDA. Peak memory is what a
training step holds above what it started with: on GPU the CUDA allocator's high-water mark; on CPU
the peak of PyTorch's profiler memory timeline of one step (every allocation and free of its
tensors), so each case's figure is its own in any process (the resident set does not rise when a
step reuses memory that an earlier, larger case freed).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from bionets.engine.evaluate import autocast_for
from bionets.errors import BionetsError


def positive(text: str) -> int:
    """argparse type of a count that must be >= 1 (0 repeats or rounds measured nothing, and the
    scripts failed on it after their other cases)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is no whole number >= 1")
    return value


def writable(text: str) -> str:
    """argparse type of a report's path: its folder must exist (else the report was lost after the run)."""
    folder = Path(text).expanduser().parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: there is no folder {str(folder)!r} to write it in")
    return text


def run_script(main: Callable[[], object]) -> None:
    """A benchmark script's entry point: a BionetsError (a bad device, a malformed option) is one
    line and exit status 2, as on bionets' command line."""
    try:
        main()
    except BionetsError as err:
        print(f"{Path(sys.argv[0]).name}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


@dataclass
class Timing:
    name: str
    forward_ms: float
    step_ms: float
    images_per_s: float
    peak_mb: float

    def ratio(self, base: "Timing") -> float:
        return self.step_ms / base.step_ms


def fastest(best: Timing | None, new: Timing) -> Timing:
    """The faster of two rounds' timings of one case, with the peak memory of whichever measured it
    (rounds after the first skip the CPU's profiled step: ``measure(..., peak=False)``)."""
    if best is None:
        return new
    faster = new if new.step_ms < best.step_ms else best
    measured = next((t.peak_mb for t in (faster, best, new) if not math.isnan(t.peak_mb)), math.nan)
    return replace(faster, peak_mb=measured)


def _rss_peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _rss_now_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _rss_now_mb()


def _peak(device: torch.device, base: float) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20 - base
    return _rss_peak_mb() - base


def cpu_step_peak_mb(step: Callable[[], None]) -> float:
    """The most memory (MB) that one call of ``step`` holds on the CPU above what it started with,
    from the profiler's memory timeline; the rise of the resident set where the timeline is not
    available (a torch without ``export_memory_timeline``)."""
    from torch.profiler import ProfilerActivity, profile

    if not hasattr(profile, "export_memory_timeline"):
        base = _reset_peak(torch.device("cpu"))
        step()
        return _peak(torch.device("cpu"), base)
    with _c_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True,
                                        with_stack=True) as prof:
        step()      # (run before, in the timings: any warning of its own has been shown)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)     # (deprecated for CUDA, which has memory snapshots)
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        _, sizes = json.loads(path.read_text())
    # the timeline holds the tensors the step allocates, from its first (those made before it do not
    # appear): its peak is the step's
    return max((sum(s) for s in sizes), default=0.0) / 2**20


@contextmanager
def _c_stderr_silenced():
    """File descriptor 2 to /dev/null: the profiler's C++ side (Kineto) prints a line to it at every
    start and stop, and a GPU-count error on a machine without one."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def step_peak_mb(step: Callable[[], None], device: torch.device) -> float:
    """The most memory (MB) one call of ``step`` holds above what it started with: the CUDA
    allocator's peak on a GPU, :func:`cpu_step_peak_mb` on the CPU."""
    if device.type != "cuda":
        return cpu_step_peak_mb(step)
    base = _reset_peak(device)
    step()
    torch.cuda.synchronize(device)
    return _peak(device, base)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compiled(model: nn.Module, mode: str | None, channels_last: bool) -> nn.Module:
    """``model`` under ``torch.compile(mode=...)`` as ``train.compile`` runs it, in its memory format
    first (so the steps do not recompile); unchanged when ``mode`` is None. Compiling happens in the
    warm-up steps, which are not timed."""
    if mode is None:
        return model
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model, mode=None if mode == "default" else mode)


def loss_with_hooks(model: nn.Module, hooks) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy plus every hook's auxiliary loss (ARR's), as the engine adds them in training."""
    def loss(logits, targets):
        out = nn.functional.cross_entropy(logits, targets)
        for hook in hooks:
            extra = hook.aux_loss(model, None, logits, targets)
            out = out + extra if extra is not None else out
        return out
    return loss


def _median_ms(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def train_step(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None, *,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
               amp: str = "off", channels_last: bool = False,
               optimizer: torch.optim.Optimizer | None = None) -> tuple[Callable[[], None], Callable[[], None]]:
    """(one training step: forward, backward, SGD step; one forward without gradients) of ``model``
    on a resident batch, in the memory format and autocast the benchmark asks for."""
    device = inputs.device
    if channels_last and inputs.ndim == 4:
        model = model.to(memory_format=torch.channels_last)
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    autocast = autocast_for(amp, device)
    if targets is None:
        targets = torch.zeros(inputs.shape[0], dtype=torch.long, device=device)
    loss_fn = loss_fn or nn.functional.cross_entropy
    opt = optimizer or torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

    model.train()

    def step():
        with autocast():
            loss = loss_fn(model(inputs), targets)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def forward():
        with torch.no_grad(), autocast():
            model(inputs)

    return step, forward


def measure(name: str, model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor | None = None, *,
            loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
            amp: str = "off", channels_last: bool = False, warmup: int = 2, repeats: int = 5,
            step_repeats: int | None = None, optimizer: torch.optim.Optimizer | None = None,
            peak: bool = True) -> Timing:
    """Median forward time and training-step time (forward, backward, SGD step) of ``model``
    (``step_repeats`` timed steps, default ``repeats``: 1 where the caller times the steps itself),
    and the step's peak memory unless ``peak`` is false (then NaN: on CPU it costs a profiled step,
    seconds, which a case's later rounds need not repeat)."""
    device = inputs.device
    step, forward = train_step(model, inputs, targets, loss_fn=loss_fn, amp=amp, channels_last=channels_last,
                               optimizer=optimizer)
    base = _reset_peak(device) if device.type == "cuda" else None
    step_ms = _median_ms(step, device, warmup, step_repeats or repeats)
    if not peak:
        peak_mb = math.nan
    else:
        peak_mb = _peak(device, base) if base is not None else cpu_step_peak_mb(step)
    forward_ms = _median_ms(forward, device, warmup, repeats)
    return Timing(name, forward_ms, step_ms, inputs.shape[0] / step_ms * 1e3, peak_mb)


def verdict(ratio: float, target: float) -> str:
    """'meets the target <= 1.15x' or 'MISSES the target <= 1.15x' (ratios of new over plain: lower is better)."""
    return f"{'meets' if ratio <= target else 'MISSES'} the target <= {target:.3g}x"


def alternating_step_times(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int = 2,
                           repeats: int = 25) -> dict[str, list[float]]:
    """Every step time (ms) of each step function, run in turn (one step of each per round, in one
    process), so that a slow spell of a shared host hits every case alike."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for k, fn in steps.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def alternating_step_ms(steps: dict[str, Callable[[], None]], device: torch.device, warmup: int = 2,
                        repeats: int = 25) -> dict[str, float]:
    """The median of :func:`alternating_step_times` for each step function."""
    return {k: statistics.median(v) for k, v in alternating_step_times(steps, device, warmup, repeats).items()}


def paired_ratios(new: list[float], base: list[float]) -> tuple[float, float, float]:
    """(lower quartile, median, upper quartile) of the round-by-round ratios ``new[i] / base[i]``
    of two cases stepped in turn: each pair ran seconds apart, so the host's drift between
    rounds cancels, and the quartiles show how much the ratio itself varies."""
    ratios = [a / b for a, b in zip(new, base)]
    if len(ratios) < 2:
        return ratios[0], ratios[0], ratios[0]
    low, mid, high = statistics.quantiles(ratios, n=4)
    return low, mid, high


def ways_report(steps: dict[str, Callable[[], None]], base: str, device: torch.device, rounds: int,
                repeats: int) -> list[str]:
    """The lines of a split benchmark (``raa_param_cost.py``, ``arr_cost.py``): ``rounds`` times, every
    way of ``steps`` stepped in turn ``repeats`` times, each way's median step time and its
    round-by-round ratio over ``base`` (median and quartiles); then each way's step peak memory.
    Printed as they come."""
    out = []
    for r in range(rounds):
        times = alternating_step_times(steps, device, warmup=5, repeats=repeats)
        for name, ts in times.items():
            lo, mid, hi = paired_ratios(ts, times[base])
            out.append(f"- round {r + 1}, {name}: {statistics.median(ts):.2f} ms, {mid:.3f}x ({lo:.3f}-{hi:.3f}x)")
            print(out[-1], flush=True)
    out.append("  peak memory of a step: " + ", ".join(f"{name} {step_peak_mb(fn, device):.0f} MB"
                                                        for name, fn in steps.items()))
    print(out[-1], flush=True)
    return out


def split_arguments(p: argparse.ArgumentParser) -> None:
    """The options of a split benchmark: --device, --batch, --steps, --rounds."""
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda or cuda:N")
    p.add_argument("--batch", type=positive, default=128)
    p.add_argument("--steps", type=positive, default=120, help="steps of each way, in turn")
    p.add_argument("--rounds", type=positive, default=2, help="repeat the whole measurement")


def table(rows: list[Timing], base: Timing | None = None) -> str:
    """A Markdown table of timings, with each row's step-time ratio over ``base``."""
    out = ["| case | forward ms | step ms | images/s | peak MB | step ratio |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r.ratio(base):.3f}x" if base else "-"
        out.append(f"| {r.name} | {r.forward_ms:.2f} | {r.step_ms:.2f} | {r.images_per_s:.0f} | {r.peak_mb:.0f} | {ratio} |")
    return "\n".join(out)


def device_name(device: torch.device) -> str:
    import platform
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import os
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
