"""One sensitivity trial on ResNet-50: prune one unit by 50% and undo it, without evaluating.

torchslim: ``SearchSpace.trial`` on the graph traced once (the undo puts back references, no
weight is copied), timed for every unit (each root conv's group), ``--repeats`` times each; the
table gives the median and the slowest unit's median. torch-pruning has no undo: its trial is a
deep copy of the model, a graph build on it and the prune of that one group (timed on a few
units spread over the depth).

    python benchmarks/search_trial.py --markdown benchmarks/results/search_trial.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchslim as ts  # noqa: E402
from benchmarks.report import publish  # noqa: E402


def torchslim_trials(model: torch.nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds of one trial per unit."""
    space = ts.search.SearchSpace(model, x)
    medians = {}
    for unit in space.names:
        with space.trial({unit: 0.5}):
            pass  # the first trial of a unit sets up its caches
        seconds = []
        for _ in range(repeats):
            began = time.perf_counter()
            with space.trial({unit: 0.5}):
                pass
            seconds.append(time.perf_counter() - began)
        medians[unit] = statistics.median(seconds)
    return medians


def peer_trials(model: torch.nn.Module, x: torch.Tensor, units: list[str]) -> dict[str, float]:
    """Seconds of copy + graph build + prune of each unit's output channels by 50%."""
    import torch_pruning as peer

    found = {}
    for unit in units:
        began = time.perf_counter()
        trial = copy.deepcopy(model)
        graph = peer.DependencyGraph().build_dependency(trial, x)
        conv = trial.get_submodule(unit)
        half = list(range(conv.out_channels // 2))
        graph.get_pruning_group(conv, peer.prune_conv_out_channels, half).prune()
        found[unit] = time.perf_counter() - began
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    ours = torchslim_trials(model, x, args.repeats)
    names = list(ours)
    theirs = peer_trials(model, x, names[:: max(1, len(names) // 5)])
    slowest = max(ours, key=ours.__getitem__)
    lines = [
        "| library | trials | median trial | slowest unit |",
        "|---|---|---|---|",
        f"| torchslim (trial + undo) | {len(ours)} units x {args.repeats} | "
        f"{statistics.median(ours.values()) * 1e3:.1f} ms | {ours[slowest] * 1e3:.1f} ms "
        f"({slowest}) |",
        f"| torch-pruning (copy + build + prune) | {len(theirs)} units | "
        f"{statistics.median(theirs.values()) * 1e3:.1f} ms | "
        f"{max(theirs.values()) * 1e3:.1f} ms |",
    ]
    footer = (
        f"torchvision ResNet-50, 1x3x224x224 example, 50% of one unit's group by L2 magnitude, "
        f"no evaluation; {args.threads} threads."
    )
    publish(lines, footer, args.markdown)


if __name__ == "__main__":
    main()
