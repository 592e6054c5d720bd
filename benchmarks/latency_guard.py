"""CPU latency at 50% MACs: dense vs uniform vs latency-aware rounding, and the guard refusing.

For torchvision ResNet-50 and timm's ViT-Tiny (random weights, 224x224, batch 1): the smallest
uniform ratio per group that halves the MACs (bisection), the same with ``round_to=8``, and the
same ratios with latency-aware rounding measured on each runtime (``tp.search.
latency_aware_rounding``, MACs kept <= 50%). Every model is timed in turns with the dense one on
PyTorch CPU and ONNX Runtime CPU (one thread each: this 2-core machine is shared, and
multi-threaded timings of it are noise).

The guard's constructed case: a plain 6-conv net with 64 channels, pruned to 63 channels in
every layer. ONNX Runtime's blocked-layout convolutions need multiples of 8, so the pruned net is
slower there and the guard must refuse it.

    python benchmarks/latency_guard.py --markdown benchmarks/results/latency_guard.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchslim as ts  # noqa: E402
from benchmarks.report import publish  # noqa: E402

MODELS: dict[str, tuple[Callable[[], nn.Module], str]] = {
    "resnet50 (torchvision)": (lambda: _torchvision("resnet50"), "fc"),
    "vit_tiny_patch16_224 (timm)": (lambda: _timm("vit_tiny_patch16_224"), "head"),
}


def _torchvision(name: str) -> nn.Module:
    import torchvision

    return getattr(torchvision.models, name)().eval()


def _timm(name: str) -> nn.Module:
    import timm

    return timm.create_model(name, pretrained=False).eval()


def uniform_ratio(space: ts.search.SearchSpace, fraction: float = 0.5) -> float:
    """The smallest ratio (1/256 resolution) that, given to every unit, meets the MACs."""
    low, high = 0.0, 0.9
    for _ in range(8):
        middle = (low + high) / 2
        with space.trial({unit.name: middle for unit in space.units}):
            macs, _ = space.count()
        low, high = (low, middle) if macs <= fraction * space.dense_macs else (middle, high)
    return high


def compare(
    name: str, build: Callable[[], nn.Module], ignored: str, runtimes: list[Any]
) -> tuple[list[str], list[str]]:
    """Table rows for one model, and the guard's verdict per runtime on its latency-aware
    result (with the uniform one as the alternative)."""
    torch.manual_seed(0)
    dense = build()
    x = torch.randn(1, 3, 224, 224)
    space = ts.search.SearchSpace(dense, x, ignored_layers=[ignored])
    ratio = uniform_ratio(space)
    uniform = {unit.name: ratio for unit in space.units}
    budget = ts.search.Budget(space, ts.search.Target("macs", 0.5))
    candidates = {
        f"uniform {ratio:.3f}": space.export(uniform),
        "uniform, round_to=8": space.export(uniform, 8),
    }
    for runtime in runtimes:
        config, _ = ts.search.latency_aware_rounding(space, uniform, runtime, budget)
        candidates[f"latency-aware ({runtime.name})"] = space.export(config)
    times = {r.name: r.time_models([dense, *candidates.values()], x) for r in runtimes}
    rows = [_row(name, "dense", dense, x, space, times, 0)]
    for k, (label, model) in enumerate(candidates.items(), 1):
        rows.append(_row(name, label, model, x, space, times, k))
    verdicts = []
    for runtime in runtimes:
        own = f"latency-aware ({runtime.name})"
        choices = {own: candidates[own], f"uniform {ratio:.3f}": candidates[f"uniform {ratio:.3f}"]}
        verdicts.append(f"- {name}: {ts.search.guard(dense, choices, x, runtime).message}")
    return rows, verdicts


def _row(name, label, model, x, space, times, k) -> str:
    macs, params = ts.utils.count_ops_and_params(model, x)
    cells = [
        f"{times[r][k]:.1f} ms ({times[r][0] / times[r][k]:.2f}x)" for r in ("torch", "onnxruntime")
    ]
    return (
        f"| {name} | {label} | {macs / space.dense_macs:.3f} | {params / 1e6:.2f} M | "
        f"{cells[0]} | {cells[1]} |"
    )


class SixConvs(nn.Sequential):
    def __init__(self, width: int = 64) -> None:
        layers: list[nn.Module] = [nn.Conv2d(3, width, 3, 1, 1)]
        for _ in range(5):
            layers += [nn.ReLU(), nn.Conv2d(width, width, 3, 1, 1)]
        super().__init__(*layers, nn.ReLU(), nn.Conv2d(width, 8, 1))


def guard_case(runtimes: list[Any]) -> list[str]:
    torch.manual_seed(0)
    dense = SixConvs().eval()
    x = torch.randn(1, 3, 56, 56)
    space = ts.search.SearchSpace(dense, x)
    odd = space.export({u.name: ts.search.keep_ratio(u.channels, 63) for u in space.units})
    widths = sorted({m.out_channels for m in odd.modules() if isinstance(m, nn.Conv2d)})
    lines = [f"Constructed case: 6 convs of 64 channels, pruned to {widths} channels, 56x56:", ""]
    for runtime in runtimes:
        verdict = ts.search.guard(dense, {"pruned to 63": odd}, x, runtime)
        lines.append(f"- {verdict.message}")
    return lines


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=15, help="timed runs per model or layer")
    parser.add_argument("--models", nargs="*", default=list(MODELS), help="subset of the models")
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    runtimes = [
        ts.search.Runtime(r, threads=1, repeats=args.repeats) for r in ("torch", "onnxruntime")
    ]
    lines = [
        "| model | pruning | MACs / dense | params | PyTorch CPU | ONNX Runtime CPU |",
        "|---|---|---|---|---|---|",
    ]
    verdicts = ["", "The guard on each latency-aware result (uniform as the alternative):", ""]
    for name in args.models:
        build, ignored = MODELS[name]
        rows, found = compare(name, build, ignored, runtimes)
        lines += rows
        verdicts += found
    lines += [*verdicts, "", *guard_case(runtimes)]
    footer = (
        f"Batch 1, 224x224, random weights, 1 thread per runtime, median of {args.repeats} runs "
        f"timed in turns with the dense model; {time.perf_counter() - start:.0f} s on this "
        "shared 2-core machine."
    )
    publish(lines, footer, args.markdown)


if __name__ == "__main__":
    main()
