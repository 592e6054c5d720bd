"""The op-rule registry: for each torch callable, how channel positions flow through it.

A rule receives an :class:`OpContext` after the op has run, with the real arguments and output,
and states relations between the layouts of inputs and outputs (same positions, products,
factorisations, sums). A call with no rule, or whose rule fails, is *never* assumed element-wise:
everything it touches is frozen, and the op and module are reported.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from torchslim.spaces.layout import DimLayout, TensorLayout, opaque, split, unify
from torchslim.spaces.symbolic import TrackedInt, expr_of
from torchslim.spaces.trace import Comparison, TraceState, Unsupported, iter_tensors

Rule = Callable[["OpContext"], None]
_RULES: dict[Any, Rule] = {}
_MISSING = object()
_NAMESPACES = (torch, torch.Tensor, torch.nn.functional, torch.special, torch.linalg, torch.fft)


def callables(*names: str) -> list[Any]:
    """Every torch object with one of these names in the usual namespaces (torch, Tensor, F)."""
    found = []
    for name in names:
        for space in _NAMESPACES:
            obj = getattr(space, name, None)
            if obj is not None and obj not in found:
                found.append(obj)
    return found


def register_rule(funcs: Iterable[Any], rule: Rule) -> None:
    """Register ``rule`` for each callable (also the way users add rules for custom ops).

    A string names a custom operator by its qualified name, e.g. ``"torchvision::roi_align"``.
    """
    for func in funcs:
        _RULES[func] = rule


def rule_for(*names: str) -> Callable[[Rule], Rule]:
    """Decorator: register a rule for every torch callable with one of these names."""

    def decorate(rule: Rule) -> Rule:
        register_rule(callables(*names), rule)
        return rule

    return decorate


def lookup(func: Any) -> Optional[Rule]:
    rule = _RULES.get(func)
    if rule is None:
        owner = getattr(func, "__self__", None)
        if type(owner).__name__ == "getset_descriptor":
            rule = _RULES.get(owner)
        else:
            rule = _RULES.get(getattr(func, "_qualified_op_name", None))
    return rule


def op_name(func: Any) -> str:
    owner = getattr(func, "__self__", None)
    if type(owner).__name__ == "getset_descriptor":
        return f"Tensor.{owner.__name__}"
    name = getattr(func, "__name__", None) or repr(func)
    qual = getattr(func, "__qualname__", "") or ""
    module = getattr(func, "__module__", "") or ""
    if qual.startswith(("TensorBase.", "Tensor.")):
        return f"Tensor.{name}"
    if module.startswith("torch.nn.functional") or module == "torch._C._nn":
        return f"F.{name}"
    if module.startswith("torch") or qual.startswith("_VariableFunctionsClass"):
        return f"torch.{name}"
    return f"{module}.{name}" if module else name


class OpContext:
    """One recorded call, with helpers the rules use to state layout relations.

    ``retrace(call)`` runs ``call()`` under the recorder that saw this op (see
    :mod:`torchslim.ops.decompositions`)."""

    def __init__(
        self,
        state: TraceState,
        func: Any,
        args: tuple,
        kwargs: dict,
        out: Any,
        retrace: Callable[[Callable[[], Any]], Any],
    ):
        self.state = state
        self.retrace = retrace
        self.table = state.table
        self.func = func
        self.args = args
        self.kwargs = kwargs
        self.out = out
        self.name = op_name(func)
        self.module = state.module_path
        self.where = f"{self.name} in {self.module}"
        self.claimed: list[torch.Tensor] = []

    def arg(self, index: int, name: str, default: Any = _MISSING) -> Any:
        if index < len(self.args):
            return self.args[index]
        if name in self.kwargs:
            return self.kwargs[name]
        if default is _MISSING:
            raise TypeError(f"{self.name}: missing argument {name!r}")
        return default

    def running_module(self) -> torch.nn.Module:
        """The innermost module whose forward is running this op (the model at the top)."""
        model = self.state.model
        return model if self.module == "<model>" else model.get_submodule(self.module)

    def owner(self, tensor: Optional[torch.Tensor]) -> Optional[torch.nn.Module]:
        """The module a parameter or buffer belongs to, if it is one of the model's."""
        if tensor is None:
            return None
        ref = self.state.refs.get(id(tensor))
        return ref.module if ref is not None and ref.tensor is tensor else None

    def layout(self, tensor: torch.Tensor) -> TensorLayout:
        return self.state.layout(tensor)

    def set_out(self, tensor: torch.Tensor, layout: TensorLayout) -> None:
        self.state.set_layout(tensor, layout)

    def unify(self, a: DimLayout, b: DimLayout) -> None:
        unify(self.table, a, b, self.where)

    def split(self, dim: DimLayout, sizes: list[int]) -> list[DimLayout]:
        return split(self.table, dim, sizes, self.where)

    def opaque(self, size: int, why: str = "") -> DimLayout:
        return opaque(size, why or f"computed by {self.where}")

    def require_size(self, value: Any, dim: DimLayout) -> None:
        """The int ``value`` is used as the size of ``dim`` (view shapes, split sizes, ...)."""
        self.state.require_size(value, dim, self.where)

    def keep_true(self, op: str, lhs: Any, rhs: Any) -> None:
        """A condition between sizes that the op needs (``op`` from ``"lt"``, ``"le"``, ...):
        a selection that would make it false is refused."""
        self.state.comparisons.append(Comparison(op, expr_of(lhs), expr_of(rhs), True, self.where))

    def claim_selection(self, indices: torch.Tensor, dim: DimLayout) -> bool:
        """This op indexes its own ``dim`` by the values of ``indices`` (chosen by ``topk``):
        couple them (see :meth:`TraceState.claim_selection`)."""
        self.claimed.append(indices)
        return self.state.claim_selection(indices, dim, self.where)

    def freeze(self, dim: DimLayout, why: str) -> None:
        self.table.freeze_many(dim.atoms, f"{why} ({self.where})")

    def mixing(self, dim: DimLayout, why: str) -> None:
        """Channels of ``dim`` are mixed by a normalisation or reduction: not exactly prunable."""
        if not dim.is_opaque:
            self.table.mark_mixing(dim.atoms[dim.atoms >= 0], f"{why} ({self.where})")

    def sizes_used_as_values(self, values: Any) -> None:
        """Tracked sizes passed as scalars (``x / c``, ``torch.tensor(c)``) make results depend on
        the channel count: the dims they come from are reported as not exactly prunable."""
        if isinstance(values, TrackedInt):
            self.state.value_use(values.expr, self.where)
        elif isinstance(values, (list, tuple)):
            for value in values:
                self.sizes_used_as_values(value)
        elif isinstance(values, dict):
            self.sizes_used_as_values(list(values.values()))

    def input_tensors(self) -> list[torch.Tensor]:
        return list(iter_tensors((self.args, self.kwargs)))

    def output_tensors(self) -> list[torch.Tensor]:
        return list(iter_tensors(self.out))


def apply_rule(ctx: OpContext, rule: Optional[Rule]) -> None:
    """Run the rule; with no rule, a failing rule, or outputs left without layout: freeze."""
    outputs = ctx.output_tensors()
    if rule is None:
        if outputs:
            refuse(ctx, f"unsupported op {ctx.name} in module {ctx.module}")
        return
    try:
        rule(ctx)
    except Exception as error:  # a rule that cannot handle these arguments must not guess
        refuse(ctx, f"op {ctx.name} in module {ctx.module} not understood ({error})")
        return
    if any(ctx.state.layouts.get(t) is None and id(t) not in ctx.state.refs for t in outputs):
        refuse(ctx, f"op {ctx.name} in module {ctx.module} produced an output without a rule")


def refuse(ctx: OpContext, reason: str) -> None:
    """Freeze every channel an op touches and give its outputs fixed-size layouts.

    The op is listed in ``DependencyGraph.unsupported()`` when it touched channels of a
    floating-point tensor or made one; ops on lengths, masks and indices only (``__rshift__``,
    ``__invert__``) freeze no channel worth naming."""
    inputs = ctx.input_tensors()
    outputs = ctx.output_tensors()
    if any(_floating(t) and not all(d.is_opaque for d in ctx.layout(t)) for t in inputs) or any(
        _floating(t) for t in outputs
    ):
        ctx.state.unsupported.append(Unsupported(ctx.name, ctx.module))
    for tensor in inputs:
        for dim in ctx.layout(tensor):
            ctx.table.freeze_many(dim.atoms, reason)
    for tensor in outputs:
        if any(tensor is t for t in inputs):
            continue
        ctx.state.layouts[tensor] = [opaque(size, reason) for size in tensor.shape]


def _floating(tensor: torch.Tensor) -> bool:
    return tensor.is_floating_point() or tensor.is_complex()


def normalize_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim
