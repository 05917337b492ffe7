"""``bionets bench``: each mechanism's cost against its plain baseline, measured in one run.

For every mechanism the suite builds a small plain network, converts a copy with
:func:`bionets.convert` (or attaches the mechanism's loss hook), and times forward and training
step of both over a grid of batch sizes and widths, so that the growth of the cost is visible.
It writes ``bench.md`` (a Markdown table: times, images/s, peak memory, step ratio) and
``bench.png`` (step ratio against width) into the output folder. The step times and their ratio
come from stepping both models in turn in one process (the step ratio is the median of the
round-by-round ratios), so a shared machine's slow spells hit both alike; forward time and peak
memory from :func:`bionets.bench.measure`. CUDA runs use bf16 autocast; models with convolutions
run channels_last, as the engine runs them.
"""
from __future__ import annotations

import copy
import statistics
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from bionets.bench import (Timing, alternating_step_times, device_name, loss_with_hooks, measure, paired_ratios,
                           train_step)
from bionets.conversion import convert
from bionets.engine.files import make_output_dir
from bionets.engine.model import use_channels_last
from bionets.errors import BionetsError, one_line
from bionets.mechanisms import MECHANISMS, get_mechanism
from bionets.progress import progress_bar


def conv_net(width: int, classes: int = 10) -> nn.Module:
    """stem conv -> two 3x3 conv-BN-ReLU blocks of ``width`` channels at 32x32 -> pool -> linear."""
    def block(c_in):
        return [nn.Conv2d(c_in, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
    return nn.Sequential(*block(3), *block(width), *block(width), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, classes))


def vit(width: int, classes: int = 10) -> nn.Module:
    """A 2-block ViT of embedding ``width`` on 32x32 images with 4x4 patches (64 tokens + class token)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=4, embed_dim=width, depth=2, num_heads=_heads(width),
                             num_classes=classes)


@dataclass(frozen=True)
class Case:
    mechanism: str
    baseline: str
    build: Callable[[int], nn.Module]
    convert_kwargs: dict


CASES = [
    Case("quadratic", "conv", conv_net, {"quadratic": ["3"]}),       # the second conv of width C
    Case("raa", "vit (GELU)", vit, {"activation": "raa"}),
    Case("stds", "conv", conv_net, {"sparsity": "stds"}),
    Case("arr", "conv", conv_net, {"regularization": {"weight": 1.0}}),
]


def run_case(case: Case, width: int, batch: int, device: torch.device,
             repeats: int) -> tuple[Timing, Timing, tuple[float, float, float]]:
    """(plain timing, converted timing, step ratio); the step times are the medians of the two
    models stepped in turn, the ratio the quartiles (lower, median, upper) of the round-by-round
    ratios."""
    amp = "bf16" if device.type == "cuda" else "off"
    x = torch.randn(batch, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    torch.manual_seed(0)
    plain = case.build(width).to(device)
    cl = use_channels_last("auto", plain, device)   # as the engine does: on for models with convolutions
    converted, report = convert(copy.deepcopy(plain), **case.convert_kwargs)
    converted.to(device)
    for hook in report.hooks:
        hook.attach(converted)
    loss = loss_with_hooks(converted, report.hooks)
    # forward time and peak memory here; the step times come from the two models stepped in turn below
    base = measure(f"{case.baseline} w{width} b{batch}", plain, x, y, amp=amp, channels_last=cl, repeats=repeats,
                   step_repeats=1)
    mech = measure(f"+{case.mechanism} w{width} b{batch}", converted, x, y, amp=amp, channels_last=cl,
                   repeats=repeats, step_repeats=1, loss_fn=loss)
    steps = {"base": train_step(plain, x, y, amp=amp, channels_last=cl)[0],
             "mech": train_step(converted, x, y, amp=amp, channels_last=cl, loss_fn=loss)[0]}
    times = alternating_step_times(steps, device, warmup=1, repeats=max(5, repeats))
    base, mech = (replace(t, step_ms=ms, images_per_s=batch / ms * 1e3)
                  for t, ms in ((base, statistics.median(times["base"])), (mech, statistics.median(times["mech"]))))
    return base, mech, paired_ratios(times["mech"], times["base"])


def _heads(width: int) -> int:
    """About one attention head per 64 features, a divisor of ``width``."""
    return next(h for h in range(max(1, width // 64), 0, -1) if width % h == 0)


def check_mechanisms(names: list[str]) -> list[str]:
    """``names`` (mechanisms to bench), or one error line naming one the suite has no case for."""
    cases = [c.mechanism for c in CASES]
    for n in names or [""]:
        if n.strip() not in cases:
            raise BionetsError(f"bench has no case for mechanism '{n.strip()}' (cases: {', '.join(cases)})")
    return [n.strip() for n in names]


def run_suite(out_dir: Path, *, device: torch.device | None = None, mechanisms: list[str] | None = None,
              widths: list[int] | None = None, batches: list[int] | None = None, repeats: int = 3) -> str:
    dev = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    widths = widths or [32, 64, 128]
    batches = batches or ([32, 128] if dev.type == "cpu" else [128, 512])
    get_mechanism("quadratic")  # loads the registry
    names = [c.mechanism for c in CASES] if mechanisms is None else check_mechanisms(mechanisms)
    rows, points = [], []
    cases = [c for c in CASES if c.mechanism in names]
    runs = sum(c.mechanism in MECHANISMS for c in cases) * len(batches) * len(widths)
    with progress_bar("bench cases", runs) as bar:
        for case in cases:
            if case.mechanism not in MECHANISMS:
                rows.append(f"| {case.mechanism} | not registered in this install | | | | | | |")
                continue
            for batch in batches:
                for width in widths:
                    bar.set_postfix_str(f"{case.mechanism} width {width} batch {batch}")
                    try:
                        base, mech, ratio = run_case(case, width, batch, dev, repeats)
                    except (torch.OutOfMemoryError, RuntimeError) as err:
                        if not isinstance(err, torch.OutOfMemoryError) and "allocate" not in str(err):
                            raise
                        raise BionetsError(f"bench ran out of memory at width {width}, batch {batch} on {dev} "
                                           f"({one_line(err, 120)}): use smaller --widths or --batches") from None
                    bar.update()
                    points.append((case.mechanism, batch, width, ratio[1]))
                    rows.append(f"| {case.mechanism} | {case.baseline} | {width} | {batch} | {base.step_ms:.2f} | "
                                f"{mech.step_ms:.2f} | {ratio[1]:.3f}x ({ratio[0]:.2f}-{ratio[2]:.2f}) | "
                                f"{base.forward_ms:.2f} / {mech.forward_ms:.2f} | "
                                f"{base.peak_mb:.1f} / {mech.peak_mb:.1f} | {mech.images_per_s:.0f} |")
    head = [f"Device: {device_name(dev)}; torch {torch.__version__}; "
            f"{'bf16 autocast' if dev.type == 'cuda' else 'float32'}, channels_last for conv models", "",
            "| mechanism | baseline | width | batch | base step ms | mech step ms | step ratio (quartiles) "
            "| forward ms (base / mech) | peak MB (base / mech) | mech images/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    foot = ["", "Step ms: each model's median training step (forward, backward, SGD step), the two models stepped "
            "in turn. Step ratio: the median of the round-by-round ratios mech / base, with their quartiles; it "
            "can differ from the ratio of the two medians where the machine's speed drifts between rounds, "
            "which the round-by-round ratio cancels. Peak MB: the most memory a training step holds above "
            "what it started with (CPU: the profiler's memory timeline of one step; CUDA: the allocator's "
            "high-water mark)."]
    text = "\n".join(head + rows + foot)
    make_output_dir(out_dir)
    (out_dir / "bench.md").write_text(text + "\n")
    _plot(points, out_dir / "bench.png", device_name(dev))
    return text


def _plot(points, path: Path, device: str) -> None:
    """Step ratio against width: a colour per mechanism, a line style per batch size."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    fig = Figure(figsize=(6.5, 4.2), layout="constrained")
    ax = fig.add_subplot()
    mechs = sorted({m for m, _, _, _ in points})
    batches = sorted({b for _, b, _, _ in points})
    styles = ["-", "--", ":", "-."]
    for mech, batch in sorted({(m, b) for m, b, _, _ in points}):
        xs = sorted((w, r) for m, b, w, r in points if m == mech and b == batch)
        ax.plot([w for w, _ in xs], [r for _, r in xs], marker="o", color=f"C{mechs.index(mech)}",
                ls=styles[batches.index(batch) % len(styles)], label=f"{mech}, batch {batch}")
    ax.axhline(1.0, color="gray", lw=0.8)
    widths = sorted({w for _, _, w, _ in points})
    ax.set_xscale("log", base=2)
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ratios = [r for _, _, _, r in points]
    if ratios and max(ratios) / max(min(ratios), 1e-9) > 3:     # a wide range (the quadratic term): log scale
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.set_xlabel("width (channels / embedding)")
    ax.set_ylabel("training step time / plain baseline")
    ax.set_title(f"bionets bench on {device}", fontsize=9)
    ax.legend(fontsize=7, ncols=2)
    fig.savefig(path, dpi=120)
