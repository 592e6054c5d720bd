"""Latency-aware rounding: choose each pruned group's channel count from measured layer times.

Kernels are often faster at some channel counts than at their neighbours (vector widths, blocked
layouts), and not always at the ones expected: on one CPU ONNX Runtime runs a 64-channel conv
faster than a 63-channel one while PyTorch does the opposite. So nothing is assumed; for each
pruned group root, in turn:

1. candidates: the count the search chose, and that count rounded down and up to each multiple
   (8, 16, 32, 64), within the group's size;
2. each candidate is applied to the model (the other groups as chosen so far), checked against
   the MACs/params target (a candidate missing it is dropped), and the layers the group touches
   are timed alone on the runtime, with the inputs they get in the model; all candidates of a
   group are timed in turns;
3. the group keeps the *largest* count whose summed layer time is within ``tolerance`` of the
   fastest candidate, so a count is only rounded down (pruned more) when that is measurably
   faster.

Groups rooted at a layer that roots several groups keep the searched ratio.
"""

from __future__ import annotations

import copy
import logging
from typing import Any, Optional, Sequence

import torch
from torch import nn

from torchslim.graph.capture import call_forward
from torchslim.search.budget import Budget
from torchslim.search.progress import progress
from torchslim.search.runtime import Runtime
from torchslim.search.space import Ratios, SearchSpace, keep_ratio

MULTIPLES = (8, 16, 32, 64)
log = logging.getLogger("torchslim.search")
Layer = tuple[str, nn.Module, tuple[torch.Tensor, ...]]


def candidate_counts(count: int, size: int, multiples: Sequence[int] = MULTIPLES) -> list[int]:
    """``count`` and its roundings down and up to each multiple, within ``[1, size]``."""
    found = {count}
    for m in multiples:
        if m < 1:
            raise ValueError(f"multiples must be positive, got {m}")
        found.update({count // m * m, -(-count // m) * m})
    return sorted(c for c in found if 1 <= c <= size)


def latency_aware_rounding(
    space: SearchSpace,
    ratios: Ratios,
    runtime: Runtime,
    budget: Optional[Budget] = None,
    multiples: Sequence[int] = MULTIPLES,
    tolerance: float = 0.03,
    show_progress: bool = True,
) -> tuple[Ratios, list[dict[str, Any]]]:
    """Per group root ratios with measured-fastest channel counts (module doc), and the log."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}")
    config = space.root_ratios(ratios)
    sizes = {root.name: root.channels for root in space.roots if len(root.groups) == 1}
    with space.trial(config):
        widths = space.widths()
    entries: list[dict[str, Any]] = []
    pruned = [name for name, ratio in config.items() if ratio > 0 and name in sizes]
    for name in progress(pruned, "rounding", show_progress):
        counts = candidate_counts(widths[name][0], sizes[name], multiples)
        timed: dict[int, float] = {}
        layers: dict[int, list[Layer]] = {}
        for count in counts:
            trial_config = {**config, name: keep_ratio(sizes[name], count)}
            with space.trial(trial_config):
                if (
                    budget is None
                    or budget.target.kind == "latency"
                    or budget.met(budget.measure())
                ):
                    layers[count] = _layers(space, name)
        times = runtime.time([(module, inputs) for c in layers for _, module, inputs in layers[c]])
        position = 0
        for count, found in layers.items():
            timed[count] = sum(times[position : position + len(found)])
            position += len(found)
        if not timed:
            entries.append({"phase": "round", "unit": name, "skipped": "no count meets the target"})
            continue
        fastest = min(timed.values())
        chosen = max(c for c, t in timed.items() if t <= fastest * (1 + tolerance))
        config[name] = keep_ratio(sizes[name], chosen)
        entry = {
            "phase": "round",
            "unit": name,
            "searched": widths[name][0],
            "chosen": chosen,
            "ms": {str(c): round(t, 4) for c, t in timed.items()},
            "dropped": [c for c in counts if c not in timed],
        }
        entries.append(entry)
        log.info("rounding %s", entry)
    return config, entries


def _layers(space: SearchSpace, root: str) -> list[Layer]:
    """Copies of the layers the group rooted at ``root`` touches, with their inputs."""
    group = next(g for g in space.pruner({}).groups() if g.root.ref.module_name == root)
    names = sorted({item.dep.target.name for item in group.items})
    found: dict[str, tuple[torch.Tensor, ...]] = {}

    def hook(name: str):
        def record(module: nn.Module, args: tuple) -> None:
            if name not in found and all(isinstance(a, torch.Tensor) for a in args):
                found[name] = tuple(a.detach().clone() for a in args)

        return record

    handles = [space.modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            call_forward(space.model, space.example_inputs, space.forward_fn)
    finally:
        for handle in handles:
            handle.remove()
    return [(n, copy.deepcopy(space.modules[n]).eval(), found[n]) for n in names if n in found]
