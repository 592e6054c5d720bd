"""The exactness check: a pruned model must compute what the original computes with the removed
channels zeroed.

For each selection of (group, indices) the original model is copied twice. In the *reference*
every coupled parameter slice of the removed channels is set to zero (out-channel rows, in-channel
columns, norm statistics, bare parameters); in the *pruned* copy the group is physically removed.
Both run in float64 on the same inputs and the worst relative error of the outputs is reported.
A weight computed by weight norm or spectral norm gets its computed slices zeroed. Groups whose channels pass through a channel-mixing op (LayerNorm, GroupNorm, RMSNorm, a mean
over channels, the default attention scale) are legitimately not equivalent; they are reported
as such, never hidden.

Experts of a routed-experts layer are removed exactly in another sense: the reference is the
model whose router never selects them (their router logits set to ``-inf`` where the router's
``F.linear`` computes them, so a softmax over the experts or a ``topk`` sees only the others).
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from torchslim.capture.experts import eager_experts
from torchslim.capture.modules import call_forward
from torchslim.graph.dependency import DependencyGraph, Group
from torchslim.ops.experts import is_routed_experts
from torchslim.pruning.reparametrised import detach_cached, zero_positions
from torchslim.spaces.trace import iter_tensors

Selection = Union[Group, tuple[Group, Sequence[int]]]


@dataclass
class GroupCheck:
    """The outcome for one selection."""

    group: str
    removed: int
    max_rel_error: float
    exact_expected: bool
    mixing: list[str] = field(default_factory=list)
    tolerance: float = 1e-6

    @property
    def ok(self) -> bool:
        return not self.exact_expected or self.max_rel_error <= self.tolerance

    @property
    def status(self) -> str:
        """``ok`` (exact), ``FAIL`` (should be exact and is not) or ``mixing`` (not by design)."""
        if not self.ok:
            return "FAIL"
        return "ok" if self.exact_expected else "mixing"


@dataclass
class VerifyReport:
    """Per-selection results; ``ok`` is True when every exactly-prunable group matched."""

    checks: list[GroupCheck]

    @property
    def ok(self) -> bool:
        return all(check.ok for check in self.checks)

    @property
    def worst(self) -> float:
        exact = [c.max_rel_error for c in self.checks if c.exact_expected]
        return max(exact, default=0.0)

    def __str__(self) -> str:
        lines = [f"{'group':<48} {'removed':>7} {'rel.err':>10}  status"]
        for c in self.checks:
            lines.append(f"{c.group[:48]:<48} {c.removed:>7} {c.max_rel_error:>10.2e}  {c.status}")
            if c.mixing and not c.exact_expected:
                lines.append(f"{'':<48}   not equivalent by design: {'; '.join(c.mixing)}")
        return "\n".join(lines)


def random_selections(
    graph: DependencyGraph, ratio: float = 0.3, seed: int = 0, root_module_types: Any = None
) -> list[tuple[Group, list[int]]]:
    """A random ``ratio`` of the prunable indices of every prunable group (at least one); a
    selection the graph refuses (one that would flip a size comparison) is left out."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"ratio must be in (0, 1), got {ratio}")
    rng = random.Random(seed)
    kwargs = {"root_module_types": root_module_types} if root_module_types else {}
    selections = []
    for group in graph.get_all_groups(**kwargs):
        candidates = group.prunable_idxs
        if len(candidates) == group.size:
            candidates = candidates[:-1]
        if not candidates:
            continue
        count = max(1, int(round(len(candidates) * ratio)))
        chosen = sorted(rng.sample(candidates, min(count, len(candidates))))
        if group.refusal(chosen) is None:
            selections.append((group, chosen))
    return selections


def verify(
    graph: DependencyGraph,
    example_inputs: Any,
    selections: Optional[Sequence[Selection]] = None,
    *,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    per_group: bool = True,
    tolerance: float = 1e-6,
    ratio: float = 0.3,
    seed: int = 0,
) -> VerifyReport:
    """Check that pruning the given selections is exact (see module docstring).

    ``selections`` are groups of ``graph`` (their own ``idxs``) or ``(group, idxs)`` pairs;
    by default a random ``ratio`` of every prunable group. With ``per_group=False`` all
    exactly-prunable selections are checked together in one pair of forward passes.
    """
    pairs = _normalise(graph, selections, ratio, seed)
    if per_group:
        checks = [_check(graph, example_inputs, [pair], forward_fn, tolerance) for pair in pairs]
    else:
        exact = [p for p in pairs if not p[0].mixing]
        checks = [_check(graph, example_inputs, exact, forward_fn, tolerance)] if exact else []
        checks += [_unchecked(p, tolerance) for p in pairs if p[0].mixing]
    return VerifyReport(checks)


def _normalise(graph, selections, ratio, seed) -> list[tuple[Group, list[int]]]:
    if selections is None:
        return random_selections(graph, ratio, seed)
    pairs = []
    for selection in selections:
        if isinstance(selection, Group):
            pairs.append((selection, list(selection.idxs)))
        else:
            group, idxs = selection
            pairs.append((group, sorted(set(int(i) for i in idxs))))
    return pairs


def _label(pairs: Sequence[tuple[Group, list[int]]]) -> str:
    if len(pairs) == 1:
        return pairs[0][0].root.label
    return f"{len(pairs)} groups together"


def _unchecked(pair: tuple[Group, list[int]], tolerance: float) -> GroupCheck:
    group, idxs = pair
    return GroupCheck(
        group.root.label, len(idxs), float("nan"), False, sorted(group.mixing), tolerance
    )


def _check(graph, example_inputs, pairs, forward_fn, tolerance) -> GroupCheck:
    detach_cached(graph.model)
    reference = copy.deepcopy(graph.model)
    memo: dict[int, Any] = {id(graph.model): reference}
    for name, module in graph.model.named_modules():
        memo[id(module)] = reference.get_submodule(name) if name else reference
    never_routed: dict[int, list[int]] = {}
    for group, idxs in pairs:
        experts = group.routes_experts
        for member, positions in group.removed_positions(idxs):
            _, module, name, dim = graph.pruned_through(member)
            if experts and _is_router(member):
                weight = getattr(memo[id(module)], name)
                never_routed.setdefault(id(weight), []).extend(positions.tolist())
            elif dim is not None:
                zero_positions(memo[id(module)], name, dim, positions)
    pruned_graph = copy.deepcopy(graph)
    with pruned_graph.deferred():
        for group, idxs in pairs:
            pruned_graph.group_like(group).prune(idxs)
    inputs = copy.deepcopy(example_inputs)
    with _NeverRouted(never_routed):
        expected = run_float64(reference, inputs, forward_fn)
    actual = run_float64(pruned_graph.model, inputs, forward_fn)
    error = relative_error(expected, actual)
    mixing = sorted(set().union(*(g.mixing for g, _ in pairs)))
    removed = sum(len(idxs) for _, idxs in pairs)
    return GroupCheck(_label(pairs), removed, error, not mixing, mixing, tolerance)


def _is_router(member: Any) -> bool:
    """A 2-D weight outside the experts layer whose rows are experts: the router's."""
    return (
        member.dim == 0
        and not is_routed_experts(member.ref.module)
        and member.ref.tensor.dim() == 2
    )


class _NeverRouted(TorchFunctionMode):
    """Sets the router logits of removed experts to ``-inf`` (``F.linear`` by a router
    weight, keyed by the weight's ``id``)."""

    def __init__(self, rows: dict[int, list[int]]) -> None:
        super().__init__()
        self.rows = rows

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and len(args) > 1 and id(args[1]) in self.rows:
            rows = torch.tensor(self.rows[id(args[1])], device=out.device)
            out = out.index_fill(-1, rows, float("-inf"))
        return out


def _to_double(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.double() if obj.is_floating_point() else obj
    if isinstance(obj, dict):
        return {k: _to_double(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_double(v) for v in obj)
    return obj


class _Float64Mode(TorchFunctionMode):
    """Keeps a forward in float64 where models hard-code ``x.float()`` (RAFT's coordinate grids)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.float:
            func = torch.Tensor.double
        return func(*args, **(kwargs or {}))


def run_float64(model: nn.Module, inputs: Any, forward_fn=None) -> list[torch.Tensor]:
    """Output tensors of the model and inputs cast to float64, factories inside the forward too."""
    model = model.double().eval()
    inputs = _to_double(inputs)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        with torch.no_grad(), _Float64Mode(), eager_experts(model):
            out = call_forward(model, inputs, forward_fn)
    finally:
        torch.set_default_dtype(default)
    return [t.detach() for t in iter_tensors(out)]


def relative_error(expected: list[torch.Tensor], actual: list[torch.Tensor]) -> float:
    """Worst ``max|a - b| / max|a|`` over output tensors; ``inf`` if shapes or counts differ."""
    if len(expected) != len(actual):
        return float("inf")
    worst = 0.0
    for a, b in zip(expected, actual):
        if a.shape != b.shape:
            return float("inf")
        if not a.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(a, b) else float("inf"))
            continue
        scale = float(a.abs().max()) if a.numel() else 0.0
        diff = float((a - b).abs().max()) if a.numel() else 0.0
        worst = max(worst, diff / max(scale, 1e-30))
    return worst if np.isfinite(worst) else float("inf")
