"""The never-slower guard: a pruned model ships only if it is measured faster than the dense one.

The dense model and every candidate (the search's result first, then alternatives such as other
roundings) are timed in turns on the target runtime. The first candidate is kept if it is faster
than dense by more than ``min_speedup``; otherwise the fastest alternative that is, and the
verdict says it rolled back; if none is, the result is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from torch import nn

from torchslim.search.runtime import Runtime


@dataclass
class Verdict:
    """Measured milliseconds per candidate, the one kept (``None``: refused) and why."""

    runtime: str
    dense_ms: float
    latencies: dict[str, float] = field(default_factory=dict)
    chosen: Optional[str] = None
    message: str = ""

    def speedup(self, name: str) -> float:
        return self.dense_ms / self.latencies[name]

    def to_dict(self) -> dict[str, Any]:
        return {
            "runtime": self.runtime,
            "dense_ms": self.dense_ms,
            "latencies": self.latencies,
            "chosen": self.chosen,
            "message": self.message,
        }


def guard(
    dense: nn.Module,
    candidates: dict[str, nn.Module],
    example_inputs: Any,
    runtime: Runtime,
    min_speedup: float = 1.0,
) -> Verdict:
    """Time ``dense`` and ``candidates`` (preferred first) and pick what may ship."""
    if not candidates:
        raise ValueError("the guard needs at least one candidate")
    if min_speedup < 1.0:
        raise ValueError(f"min_speedup must be >= 1 (never slower), got {min_speedup}")
    names = list(candidates)
    times = runtime.time_models([dense, *candidates.values()], example_inputs)
    verdict = Verdict(str(runtime), times[0], dict(zip(names, times[1:])))
    faster = [n for n in names if verdict.speedup(n) > min_speedup]
    first = names[0]
    summary = "; ".join(
        f"{n} {verdict.latencies[n]:.3f} ms ({verdict.speedup(n):.2f}x)" for n in names
    )
    where = f"on {verdict.runtime} (dense {verdict.dense_ms:.3f} ms; {summary})"
    if first in faster:
        verdict.chosen = first
        verdict.message = f"guard: {first} is {verdict.speedup(first):.2f}x faster {where}"
    elif faster:
        verdict.chosen = min(faster, key=lambda n: verdict.latencies[n])
        verdict.message = (
            f"guard: {first} is not faster than the dense model; rolled back to "
            f"{verdict.chosen}, {verdict.speedup(verdict.chosen):.2f}x faster {where}"
        )
    else:
        verdict.message = (
            f"guard: refused: no pruned candidate is more than {min_speedup:g}x faster than the "
            f"dense model {where}"
        )
    return verdict
