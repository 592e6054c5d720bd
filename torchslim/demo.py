"""``make demo``: prune a torchvision ResNet-18 by half its channels and show what changed.

Random weights (nothing is downloaded). Every prunable group loses the 50% of its channels whose
root convolution has the smallest L1 norm; the exactness check runs on the same selection.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

import torchslim as tp

RATIO = 0.5


def main() -> None:
    """Build the graph, prune every group, print params / MACs / latency before and after."""
    from torchvision.models import resnet18

    torch.manual_seed(0)
    model = resnet18().eval()
    example = torch.randn(1, 3, 224, 224)
    macs_before, params_before = tp.utils.count_ops_and_params(model, example)
    latency_before = _latency(model, example)

    start = time.perf_counter()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example)
    built = time.perf_counter() - start
    strategy = tp.strategy.L1Strategy()
    selections = []
    for group in graph.get_all_groups(ignored_layers=[model.fc]):
        weight = group.root.ref.tensor
        chosen = strategy(weight.movedim(group.root.dim, 0), amount=RATIO)
        if chosen and group.refusal(chosen) is None:
            selections.append((group, chosen))
    report = tp.verify(graph, example, selections, per_group=False)
    start = time.perf_counter()
    for group, idxs in selections:
        group.prune(idxs)
    pruned = time.perf_counter() - start

    macs_after, params_after = tp.utils.count_ops_and_params(model, example)
    latency_after = _latency(model, example)
    rows = [
        ("params", f"{params_before / 1e6:.2f} M", f"{params_after / 1e6:.2f} M"),
        ("MACs", f"{macs_before / 1e9:.3f} G", f"{macs_after / 1e9:.3f} G"),
        ("CPU latency", f"{latency_before * 1e3:.1f} ms", f"{latency_after * 1e3:.1f} ms"),
        ("output", "(1, 1000)", str(tuple(model(example).shape))),
    ]
    print(f"ResNet-18, {len(selections)} coupled groups pruned by {RATIO:.0%} (L1)")
    print(f"graph built in {built:.2f} s, pruned in {pruned:.2f} s\n")
    print(f"{'':<12} {'before':>12} {'after':>12}")
    for name, before, after in rows:
        print(f"{name:<12} {before:>12} {after:>12}")
    print(
        f"\nMACs x{macs_before / macs_after:.2f} fewer, params x{params_before / params_after:.2f}"
    )
    print(
        f"exactness check (float64, removed channels zeroed): {report.checks[0].status}",
        f"(relative error {report.worst:.1e})",
    )


def _latency(model: nn.Module, example: torch.Tensor, repeats: int = 10) -> float:
    """Median seconds per forward after two warm-up runs."""
    times = []
    with torch.no_grad():
        for k in range(repeats + 2):
            start = time.perf_counter()
            model(example)
            if k >= 2:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


if __name__ == "__main__":
    main()
