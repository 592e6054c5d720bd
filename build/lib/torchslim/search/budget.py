"""Budget search: per-unit ratios that meet a target (MACs, params or measured latency) while
keeping the metric as high as possible.

The algorithm, deterministic for a seed (with a deterministic ``eval_fn`` and a MACs or params
target; a latency target depends on measurements):

1. **Greedy path** from the sensitivity curves. Every unit starts at ratio 0; a step moves one
   unit to its next ratio of the grid. The step taken is the one with the smallest metric drop per
   resource saved, both read from that unit's own curve (drop = metric here - metric at the next
   ratio, at least 0; saving = MACs, or params for a params target, saved by that move alone).
   Ties go to the larger saving, then to the unit listed first. The path ends with every unit at
   the largest ratio.
2. **Bisection along the path**: pruning only grows along it, so the resource shrinks step by
   step and the first configuration meeting the target is found with O(log n) measurements
   (MACs and params are counted on the pruned model, latency is measured on the runtime).
3. **Local refinement**: ``refine_steps`` moves drawn from ``random.Random(seed)``. A move relaxes
   one unit by one grid step (prunes it less); if the target is then missed it also tightens
   another unit by one step. A move is kept when the target is met and the metric, measured with
   ``eval_fn`` on the combined configuration, beats the best so far.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from typing import Any, Callable, Optional

from torchslim.search.sensitivity import Sensitivity
from torchslim.search.space import EvalFn, Ratios, SearchSpace, evaluate
from torchslim.utils.progress import progress

KINDS = ("macs", "params", "latency")
State = tuple[int, ...]
log = logging.getLogger("torchslim.search")


class TargetUnreachable(ValueError):
    """Even the most pruned configuration of the search does not meet the target."""


@dataclass(frozen=True)
class Target:
    """Keep at most ``fraction`` of the dense model's MACs, parameters or latency."""

    kind: str
    fraction: float

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"target kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.fraction, (int, float)) or not 0.0 < self.fraction < 1.0:
            raise ValueError(
                f"target {self.kind} must be a fraction in (0, 1), got {self.fraction}"
            )

    def __str__(self) -> str:
        return f"{self.kind} <= {self.fraction:g} of dense"


class Budget:
    """Measures the working model of a space against a target, as a fraction of dense."""

    def __init__(
        self, space: SearchSpace, target: Target, latency: Optional[Callable[[], float]] = None
    ) -> None:
        if target.kind == "latency" and latency is None:
            raise ValueError("a latency target needs a runtime to measure on")
        self.space = space
        self.target = target
        self._latency = latency
        self.dense_ms = latency() if target.kind == "latency" else None

    def measure(self) -> float:
        if self.target.kind == "latency":
            return self._latency() / self.dense_ms
        macs, params = self.space.count()
        if self.target.kind == "macs":
            return macs / self.space.dense_macs
        return params / self.space.dense_params

    def met(self, fraction: float) -> bool:
        return fraction <= self.target.fraction


@dataclass
class BudgetResult:
    ratios: Ratios
    metric: float
    fraction: float
    log: list[dict[str, Any]]


def greedy_path(table: Sensitivity, units: list[str], kind: str) -> list[State]:
    """Step 1: every state from dense to all units at the largest ratio (see module doc)."""
    cost = "params" if kind == "params" else "macs"
    curves = {u: table.curve(u) for u in units}
    last = len(table.ratios)
    state = [0] * len(units)
    path: list[State] = [tuple(state)]
    while any(k < last for k in state):
        best: Optional[tuple[float, int, int]] = None
        for i, unit in enumerate(units):
            if state[i] == last:
                continue
            here, there = curves[unit][state[i]], curves[unit][state[i] + 1]
            drop = max(0.0, here.metric - there.metric)
            saving = getattr(here, cost) - getattr(there, cost)
            price = drop / saving if saving > 0 else float("inf")
            key = (price, -saving, i)
            if best is None or key < best:
                best = key
        state[best[2]] += 1
        path.append(tuple(state))
    return path


class _Prober:
    """Measures configurations (grid indices per unit) once each, logging every probe."""

    def __init__(
        self, space: SearchSpace, budget: Budget, eval_fn: EvalFn, grid: list[float]
    ) -> None:
        self.space, self.budget, self.eval_fn, self.grid = space, budget, eval_fn, grid
        self.log: list[dict[str, Any]] = []
        self._measured: dict[State, tuple[float, float]] = {}

    def ratios(self, state: State) -> Ratios:
        return {u: self.grid[k] for u, k in zip(self.space.names, state)}

    def __call__(
        self, phase: str, state: State, with_metric: bool, **extra: Any
    ) -> tuple[float, float]:
        """The state's resource fraction and metric (NaN unless wanted and the target is met)."""
        fraction, metric = self._measured.get(state, (None, math.nan))
        entry = {"phase": phase, "step": len(self.log), **extra, "repeat": fraction is not None}
        entry["ratios"] = {u: r for u, r in self.ratios(state).items() if r}
        wants_metric = with_metric and math.isnan(metric)
        if fraction is None or (wants_metric and self.budget.met(fraction)):
            with self.space.trial(self.ratios(state)) as model:
                fraction = self.budget.measure()
                if with_metric and self.budget.met(fraction):
                    metric = evaluate(self.eval_fn, model)
            self._measured[state] = fraction, metric
        entry.update(fraction=fraction, metric=None if math.isnan(metric) else metric)
        self.log.append(entry)
        log.info("search %s", entry)
        return fraction, metric


def search_ratios(
    space: SearchSpace,
    table: Sensitivity,
    eval_fn: EvalFn,
    budget: Budget,
    seed: int = 0,
    refine_steps: int = 20,
    show_progress: bool = True,
) -> BudgetResult:
    """Per-unit ratios meeting ``budget``'s target with the best metric found (module doc)."""
    units = space.names
    if sorted(table.units) != sorted(units):
        raise ValueError("the sensitivity table was computed for other units than this search's")
    if refine_steps < 0:
        raise ValueError(f"refine_steps must be >= 0, got {refine_steps}")
    probe = _Prober(space, budget, eval_fn, [0.0, *table.ratios])
    path = greedy_path(table, units, budget.target.kind)
    fraction, _ = probe("bisect", path[-1], False, index=len(path) - 1)
    if not budget.met(fraction):
        raise TargetUnreachable(
            f"cannot reach {budget.target}: every unit at ratio {table.ratios[-1]:g} leaves "
            f"{fraction:.3f}; add larger ratios or more units"
        )
    low, high = 0, len(path) - 1
    while high - low > 1:
        middle = (low + high) // 2
        fraction, _ = probe("bisect", path[middle], False, index=middle)
        low, high = (low, middle) if budget.met(fraction) else (middle, high)
    state = path[high]
    best_fraction, best_metric = probe("greedy", state, True, index=high)

    rng = random.Random(seed)
    last = len(table.ratios)
    for step in progress(range(refine_steps), "refining", show_progress):
        relaxable = [i for i, k in enumerate(state) if k > 0]
        if not relaxable:
            break
        candidate = list(state)
        u = rng.choice(relaxable)
        candidate[u] -= 1
        move = {"relax": units[u]}
        fraction, metric = probe("refine", tuple(candidate), True, move=dict(move), refine=step)
        if not budget.met(fraction):
            others = [i for i, k in enumerate(candidate) if k < last and i != u]
            if not others:
                continue
            v = rng.choice(others)
            candidate[v] += 1
            move["tighten"] = units[v]
            fraction, metric = probe("refine", tuple(candidate), True, move=move, refine=step)
        accepted = budget.met(fraction) and metric > best_metric
        probe.log[-1]["accepted"] = accepted
        if accepted:
            state, best_fraction, best_metric = tuple(candidate), fraction, metric
    return BudgetResult(probe.ratios(state), best_metric, best_fraction, probe.log)
