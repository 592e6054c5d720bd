"""Latency-aware rounding: choose each pruned group's channel count from measured layer times.

Rounding is a latency decision, not more pruning. Fewer channels are nearly always faster, so
"the fastest count" would mostly mean "prune more"; instead every candidate count is compared
with what its MACs alone would predict. Kernels are often faster at some channel counts than at
their neighbours (vector widths, blocked layouts), and not always at the ones expected: on one
CPU ONNX Runtime runs a 64-channel conv faster than a 63-channel one while PyTorch does the
opposite. So nothing is assumed; for each pruned group root:

1. candidates: the searched count ``s`` and its roundings down and up to each multiple (8, 16,
   32, 64), within the group's size;
2. each candidate is applied alone (the other groups as searched); the layers the group touches
   are timed on the runtime with the inputs they get in the model (all candidates of a group in
   turns), and their MACs and the model's target resource (MACs or params) are counted;
3. with ``t`` the measured time of those layers and ``m`` their MACs, a candidate ``c`` is
   *expected* to take ``t(s) * m(c) / m(s)`` (time in proportion to MACs), and:

   - it is *free* when ``c > s`` and ``t(c) - t(s) <= up_share * (expected(c) - t(s))``: the extra
     channels cost at most ``up_share`` (default 1/4) of their proportional time;
   - it is *worth it* when ``c < s`` and ``t(s) - t(c) >= down_factor * (t(s) - expected(c))``:
     the time saved is at least ``down_factor`` (default 1.5) times what the removed channels'
     MACs explain;
   - the group takes its largest free count, else its largest count worth it, else keeps ``s``.

4. the target: round-ups add MACs and params, so with a MACs or params ``budget`` the combined
   configuration is counted, and while it misses the target one group at a time moves to its
   next lower candidate: the move with the most measured time saved per resource saved, among
   taking back a round-up and rounding a group below ``s`` to a count whose measured time falls
   at least in proportion to its MACs. If no move is left, every group keeps ``s`` (the searched
   configuration met the target). A latency target is not rechecked here: the guard times the
   whole model.

Groups rooted at a layer that roots several groups keep the searched ratio.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from torchslim.capture.modules import call_forward
from torchslim.search.budget import Budget
from torchslim.search.runtime import Runtime
from torchslim.search.space import Ratios, SearchSpace, keep_ratio
from torchslim.utils.ops_counter import count_ops_and_params
from torchslim.utils.progress import progress

MULTIPLES = (8, 16, 32, 64)
UP_SHARE = 0.25
DOWN_FACTOR = 1.5
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


@dataclass
class Measured:
    """One group's candidates: layer milliseconds, layer MACs and the model's target resource
    (fraction of dense, ``None`` without a MACs or params budget), per channel count."""

    unit: str
    searched: int
    ms: dict[int, float] = field(default_factory=dict)
    macs: dict[int, int] = field(default_factory=dict)
    resource: dict[int, Optional[float]] = field(default_factory=dict)

    def expected(self, count: int) -> float:
        """The time ``count`` would take if time followed the layers' MACs."""
        if not self.macs[self.searched]:
            return self.ms[self.searched]
        return self.ms[self.searched] * self.macs[count] / self.macs[self.searched]

    def free(self, count: int, up_share: float = UP_SHARE) -> bool:
        extra = self.ms[count] - self.ms[self.searched]
        return count > self.searched and extra <= up_share * (
            self.expected(count) - self.ms[self.searched]
        )

    def worth_it(self, count: int, factor: float = DOWN_FACTOR) -> bool:
        saved = self.ms[self.searched] - self.ms[count]
        return count < self.searched and saved >= factor * (
            self.ms[self.searched] - self.expected(count)
        )

    def choice(self, up_share: float = UP_SHARE, down_factor: float = DOWN_FACTOR) -> int:
        """The largest free count, else the largest worth it, else the searched one."""
        up = [c for c in self.ms if self.free(c, up_share)]
        down = [c for c in self.ms if self.worth_it(c, down_factor)]
        return max(up) if up else max(down) if down else self.searched

    def lower(self, count: int) -> list[int]:
        """Counts below ``count`` that the target repair may move to: smaller round-ups, the
        searched count, and below it counts whose time falls at least in proportion."""
        return [c for c in self.ms if c < count and (c >= self.searched or self.worth_it(c, 1.0))]


def latency_aware_rounding(
    space: SearchSpace,
    ratios: Ratios,
    runtime: Runtime,
    budget: Optional[Budget] = None,
    multiples: Sequence[int] = MULTIPLES,
    up_share: float = UP_SHARE,
    down_factor: float = DOWN_FACTOR,
    show_progress: bool = True,
) -> tuple[Ratios, list[dict[str, Any]]]:
    """Per group root ratios with measured channel counts (module doc), and the log."""
    if not 0 <= up_share < 1 or down_factor < 1:
        raise ValueError(
            f"up_share must be in [0, 1) and down_factor >= 1, got {up_share}, {down_factor}"
        )
    config = space.root_ratios(ratios)
    sizes = {root.name: root.channels for root in space.roots if len(root.groups) == 1}
    counted = budget is not None and budget.target.kind != "latency"
    with space.trial(config):
        widths = space.widths()
    pruned = [name for name, ratio in config.items() if ratio > 0 and name in sizes]
    groups = [
        _measure(
            space,
            config,
            name,
            widths[name][0],
            sizes[name],
            runtime,
            budget if counted else None,
            multiples,
        )
        for name in progress(pruned, "rounding", show_progress)
    ]
    chosen = {g.unit: g.choice(up_share, down_factor) for g in groups}
    rule = {g.unit: _rule(g.searched, chosen[g.unit]) for g in groups}
    repairs = _repair(space, config, sizes, groups, chosen, budget) if counted else []
    entries = []
    for g in groups:
        entry = {
            "phase": "round",
            "unit": g.unit,
            "searched": g.searched,
            "rule": rule[g.unit],
            "chosen": chosen[g.unit],
            "ms": {str(c): round(t, 4) for c, t in g.ms.items()},
            "expected_ms": {str(c): round(g.expected(c), 4) for c in g.ms},
        }
        entries.append(entry)
        log.info("rounding %s", entry)
    return {**config, **{u: keep_ratio(sizes[u], c) for u, c in chosen.items()}}, entries + repairs


def _rule(searched: int, chosen: int) -> str:
    return "free" if chosen > searched else "worth it" if chosen < searched else "kept"


def _measure(
    space: SearchSpace,
    config: Ratios,
    name: str,
    searched: int,
    size: int,
    runtime: Runtime,
    budget: Optional[Budget],
    multiples: Sequence[int],
) -> Measured:
    """Time, MACs and resource of every candidate count of one group (step 2 of the doc)."""
    found = Measured(name, searched)
    layers: dict[int, list[Layer]] = {}
    for count in candidate_counts(searched, size, multiples):
        with space.trial({**config, name: keep_ratio(size, count)}):
            layers[count] = _layers(space, name)
            found.resource[count] = budget.measure() if budget else None
        found.macs[count] = sum(
            count_ops_and_params(module, inputs)[0] for _, module, inputs in layers[count]
        )
    times = iter(runtime.time([(m, x) for c in layers for _, m, x in layers[c]]))
    for count, touched in layers.items():
        found.ms[count] = sum(next(times) for _ in touched)
    return found


def _repair(
    space: SearchSpace,
    config: Ratios,
    sizes: dict[str, int],
    groups: list[Measured],
    chosen: dict[str, int],
    budget: Budget,
) -> list[dict[str, Any]]:
    """Move groups to lower counts until the target holds (step 4 of the doc), then give back
    what still fits: each group moved below its first choice gets the largest of that choice
    and the counts the repair allows under it that keeps the target. ``chosen`` is updated in
    place; the moves are returned as log entries."""

    def fraction() -> float:
        with space.trial({**config, **{u: keep_ratio(sizes[u], c) for u, c in chosen.items()}}):
            return budget.measure()

    first, entries = dict(chosen), []
    current = fraction()
    while not budget.met(current):
        moves = [
            ((g.ms[chosen[g.unit]] - g.ms[c]) / saved, -saved, g.unit, c)
            for g in groups
            for c in g.lower(chosen[g.unit])
            if (saved := g.resource[chosen[g.unit]] - g.resource[c]) > 0
        ]
        if not moves:
            chosen.update({g.unit: g.searched for g in groups})
            entries.append({"phase": "round-repair", "gave_up": True, "fraction": current})
            return entries
        _, _, unit, count = max(moves)
        entries.append({"phase": "round-repair", "unit": unit, "from": chosen[unit], "to": count})
        chosen[unit] = count
        current = fraction()
    for g in groups:
        before = chosen[g.unit]
        for count in sorted({first[g.unit], *g.lower(first[g.unit])}, reverse=True):
            if count <= before:
                break
            chosen[g.unit] = count
            if budget.met(fraction()):
                entries.append(
                    {"phase": "round-refill", "unit": g.unit, "from": before, "to": count}
                )
                break
            chosen[g.unit] = before
    return entries


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
