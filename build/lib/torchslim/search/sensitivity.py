"""Sensitivity analysis: prune one unit alone at several ratios and measure the metric each time.

The model is traced once; every trial prunes the working copy and is undone afterwards
(:mod:`torchslim.graph.checkpoint`), so a trial costs the pruning, a MACs count and ``eval_fn``.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

from torchslim.search.space import EvalFn, SearchSpace, evaluate
from torchslim.utils.progress import progress

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
log = logging.getLogger("torchslim.search")


@dataclass(frozen=True)
class Trial:
    """One unit pruned alone: what is left and the metric."""

    unit: str
    ratio: float
    channels: int
    macs: int
    params: int
    metric: float


@dataclass
class Sensitivity:
    """Per unit, the metric (and MACs, params) with that unit alone pruned at each ratio."""

    ratios: list[float]
    baseline: float
    dense_macs: int
    dense_params: int
    channels: dict[str, int]
    trials: list[Trial] = field(default_factory=list)

    @property
    def units(self) -> list[str]:
        return list(self.channels)

    def curve(self, unit: str) -> list[Trial]:
        """The unit's trials by ratio, starting with the dense model at ratio 0."""
        if unit not in self.channels:
            raise ValueError(f"no sensitivity for unit {unit!r}")
        dense = Trial(
            unit, 0.0, self.channels[unit], self.dense_macs, self.dense_params, self.baseline
        )
        return [dense] + sorted((t for t in self.trials if t.unit == unit), key=lambda t: t.ratio)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ratios": self.ratios,
            "baseline": self.baseline,
            "dense_macs": self.dense_macs,
            "dense_params": self.dense_params,
            "channels": self.channels,
            "trials": [asdict(t) for t in self.trials],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Sensitivity:
        try:
            trials = [Trial(**t) for t in data["trials"]]
            return cls(
                [float(r) for r in data["ratios"]],
                float(data["baseline"]),
                int(data["dense_macs"]),
                int(data["dense_params"]),
                {str(k): int(v) for k, v in data["channels"].items()},
                trials,
            )
        except (KeyError, TypeError) as error:
            raise ValueError(f"not a sensitivity table: {error}") from error


def check_ratios(ratios: Sequence[float]) -> list[float]:
    """Sorted unique ratios, each in (0, 1)."""
    if not ratios:
        raise ValueError("give at least one ratio")
    for ratio in ratios:
        if not isinstance(ratio, (int, float)) or not 0.0 < ratio < 1.0:
            raise ValueError(f"sensitivity ratios must be in (0, 1), got {ratio!r}")
    return sorted(set(float(r) for r in ratios))


def analyse(
    space: SearchSpace,
    eval_fn: EvalFn,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    show_progress: bool = True,
) -> Sensitivity:
    """Sensitivity of every unit of ``space``: ``len(units) * len(ratios)`` trials."""
    ratios = check_ratios(ratios)
    table = Sensitivity(
        ratios,
        evaluate(eval_fn, space.model),
        space.dense_macs,
        space.dense_params,
        {u.name: u.channels for u in space.units},
    )
    cases = [(unit, ratio) for unit in space.units for ratio in ratios]
    for unit, ratio in progress(cases, "sensitivity", show_progress):
        with space.trial({unit.name: ratio}) as model:
            macs, params = space.count()
            channels = space.channels(unit.name)
            trial = Trial(unit.name, ratio, channels, macs, params, evaluate(eval_fn, model))
        table.trials.append(trial)
        log.info(
            "sensitivity %s ratio %.2f: %d channels, MACs %.3f, metric %.4f",
            unit.name,
            ratio,
            channels,
            macs / space.dense_macs,
            trial.metric,
        )
    return table


def sensitivity(
    model: Any,
    example_inputs: Any,
    eval_fn: EvalFn,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    units: Optional[Sequence[str]] = None,
    show_progress: bool = True,
    **space_options: Any,
) -> Sensitivity:
    """Prune each unit alone at each ratio and measure ``eval_fn(model) -> float`` (higher is
    better). ``space_options`` go to :class:`SearchSpace` (``importance``, ``ignored_layers``,
    ``round_to``, ``forward_fn``). ``model`` itself is not modified."""
    space = SearchSpace(model, example_inputs, units=units, **space_options)
    return analyse(space, eval_fn, ratios, show_progress)
