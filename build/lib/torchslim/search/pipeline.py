"""``tp.search.search``: sensitivity, budget search, latency-aware rounding and the guard, chained.

Every number in the result is measured on the model it describes: the metric, MACs and params
of the shipped model are recomputed on the exported copy (the one :meth:`SearchResult.save`
writes), so loading the saved plan reproduces them.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence, Union

from torch import nn

from torchslim.search.budget import Budget, Target, search_ratios
from torchslim.search.guard import Verdict, guard
from torchslim.search.rounding import MULTIPLES, latency_aware_rounding
from torchslim.search.runtime import Runtime
from torchslim.search.sensitivity import DEFAULT_RATIOS, Sensitivity, analyse
from torchslim.search.space import EvalFn, Ratios, SearchSpace, evaluate
from torchslim.utils.ops_counter import count_ops_and_params

ROUNDINGS = ("latency", "none")
log = logging.getLogger("torchslim.search")
FALLBACK_ROUND_TO = 8


@dataclass
class SearchResult:
    """What the search chose and measured. ``model`` is ``None`` when the guard refused it
    (too slow) or its metric fell below ``min_metric``; ``refusal`` says which."""

    target: Target
    seed: int
    ratios: Ratios
    dense: dict[str, float]
    sensitivity: Sensitivity
    verdict: Optional[Verdict] = None
    log: list[dict[str, Any]] = field(default_factory=list)
    applied: dict[str, Any] = field(default_factory=dict)
    model: Optional[nn.Module] = None
    metric: Optional[float] = None
    macs: Optional[int] = None
    params: Optional[int] = None
    refusal: str = ""

    @property
    def accepted(self) -> bool:
        return self.model is not None

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": {"kind": self.target.kind, "fraction": self.target.fraction},
            "seed": self.seed,
            "ratios": self.ratios,
            "applied": self.applied,
            "accepted": self.accepted,
            "refusal": self.refusal,
            "metric": self.metric,
            "macs": self.macs,
            "params": self.params,
            "dense": self.dense,
            "guard": self.verdict.to_dict() if self.verdict else None,
            "log": self.log,
            "sensitivity": self.sensitivity.to_dict(),
        }


def search(
    model: nn.Module,
    example_inputs: Any,
    eval_fn: EvalFn,
    target: Target,
    sensitivity: Optional[Sensitivity] = None,
    ratios: Sequence[float] = DEFAULT_RATIOS,
    units: Optional[Sequence[str]] = None,
    seed: int = 0,
    refine_steps: int = 20,
    runtime: Union[None, str, Runtime] = None,
    rounding: str = "latency",
    use_guard: bool = True,
    min_speedup: float = 1.0,
    min_metric: Optional[float] = None,
    multiples: Sequence[int] = MULTIPLES,
    show_progress: bool = True,
    **space_options: Any,
) -> SearchResult:
    """Find per-unit ratios meeting ``target`` with the best ``eval_fn`` (higher is better).

    ``sensitivity`` reuses a table from :func:`sensitivity` and its units (else one is
    computed on ``ratios``). With a ``runtime`` (``"torch"``, ``"onnxruntime"``, ``"cuda"`` or a
    :class:`Runtime`), ``rounding="latency"`` picks channel counts from measured layer times and
    the guard (``use_guard``) refuses or rolls back a result not faster than dense. ``model`` is
    not modified; ``space_options`` go to :class:`SearchSpace`. A result whose ``eval_fn`` is
    below ``min_metric`` is refused too (a pruned model that no longer does the job).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    runtime = Runtime(runtime) if isinstance(runtime, str) else runtime
    needs_runtime = target.kind == "latency" or rounding == "latency" or use_guard
    if runtime is None and needs_runtime:
        raise ValueError(
            "a latency target, latency-aware rounding and the guard measure on a runtime: "
            "give runtime='torch' (or 'onnxruntime', 'cuda'), or rounding='none', use_guard=False"
        )
    if units is None and sensitivity is not None:
        units = sensitivity.units
    space = SearchSpace(model, example_inputs, units=units, **space_options)
    table = sensitivity or analyse(space, eval_fn, ratios, show_progress)
    dense = {
        "metric": evaluate(eval_fn, space.model),
        "macs": space.dense_macs,
        "params": space.dense_params,
    }
    if dense["metric"] != table.baseline:
        log.warning(
            "the sensitivity table's dense metric %.6g differs from this model's %.6g: was it "
            "computed on another model or eval_fn?",
            table.baseline,
            dense["metric"],
        )
    budget = Budget(space, target, _model_latency(space, runtime) if runtime else None)
    found = search_ratios(space, table, eval_fn, budget, seed, refine_steps, show_progress)
    result = SearchResult(target, seed, found.ratios, dense, table, log=list(found.log))
    configs = {"searched": (space.root_ratios(found.ratios), None)}
    if rounding == "latency":
        rounded, entries = latency_aware_rounding(
            space, found.ratios, runtime, budget, multiples, show_progress=show_progress
        )
        result.log += entries
        configs = {"latency-aware": (rounded, None), **configs}
    if use_guard:
        configs[f"round_to={FALLBACK_ROUND_TO}"] = (configs["searched"][0], FALLBACK_ROUND_TO)
    models = _meeting(space, budget, configs)
    chosen: Optional[str] = next(iter(models))
    if use_guard:
        result.verdict = guard(space.model, models, example_inputs, runtime, min_speedup)
        result.log.append({"phase": "guard", **result.verdict.to_dict()})
        result.dense["latency_ms"] = result.verdict.dense_ms
        chosen = result.verdict.chosen
        if chosen is None:
            result.refusal = result.verdict.message
            log.warning("%s", result.verdict.message)
    if chosen is not None:
        _ship(result, space, eval_fn, chosen, configs[chosen], models[chosen])
    if result.accepted and min_metric is not None and result.metric < min_metric:
        result.model = None
        result.refusal = (
            f"quality: refused: the pruned model's metric {result.metric:.4f} is below "
            f"min_metric {min_metric:g} (dense {dense['metric']:.4f})"
        )
        log.warning("%s", result.refusal)
    return result


def _ship(
    result: SearchResult,
    space: SearchSpace,
    eval_fn: EvalFn,
    name: str,
    config: tuple[Ratios, Optional[int]],
    model: nn.Module,
) -> None:
    """Record the shipped model and measure its numbers on the model itself."""
    ratios, round_to = config
    with space.trial(ratios, round_to):
        channels = {root: sum(widths) for root, widths in space.widths().items()}
    result.applied = {
        "candidate": name,
        "ratios": ratios,
        "round_to": round_to,
        "channels": channels,
        "dense_channels": {root.name: root.channels for root in space.roots},
    }
    result.model = model
    result.metric = evaluate(eval_fn, model)
    result.macs, result.params = count_ops_and_params(model, space.example_inputs, space.forward_fn)


def _model_latency(space: SearchSpace, runtime: Runtime):
    return lambda: runtime.time_models([space.model], space.example_inputs)[0]


def _meeting(
    space: SearchSpace, budget: Budget, configs: dict[str, tuple[Ratios, Optional[int]]]
) -> dict[str, nn.Module]:
    """Pruned copies of the configurations that meet the target (the first always does)."""
    models = {}
    for name, (config, round_to) in configs.items():
        with space.trial(config, round_to) as pruned:
            if budget.target.kind == "latency" or budget.met(budget.measure()) or not models:
                models[name] = copy.deepcopy(pruned)
    return models
