"""Recording one forward pass: every torch call, with exact arguments and the module running it.

A :class:`torch.overrides.TorchFunctionMode` sees ``F.conv2d``, ``torch.cat(dim=-1)`` and
``x.view(...)`` with their real arguments, needs no autograd, and works unchanged on ``meta`` and
fake tensors. Module pre/post hooks keep the stack of modules executing, so every op knows where
it was called. Each call is handed to its op rule (see :mod:`torchslim.ops`) right away, which
updates the dimension layouts; calls with no rule freeze everything they touch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from torchslim.graph.atoms import AtomTable
from torchslim.graph.attributes import AttributeSlot, tracked_attributes
from torchslim.graph.layout import DimLayout, TensorLayout, opaque, same_positions, unify
from torchslim.graph.symbolic import (
    VALUE_USE_LISTENERS,
    TrackedInt,
    TrackedShape,
    expr_of,
    is_literal,
    symbols,
)

_PASSTHROUGH = {
    torch.Tensor.dim,
    torch.Tensor.ndimension,
    torch.Tensor.numel,
    torch.Tensor.is_floating_point,
    torch.Tensor.is_complex,
    torch.Tensor.element_size,
    torch.Tensor.get_device,
    torch.Tensor.__format__,
    torch.Tensor.__repr__,
    torch.Tensor.__hash__,
    torch.Tensor.__bool__,
    torch.Tensor.__float__,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.item,
    torch.Tensor.is_contiguous,
    torch.Tensor.stride,
    torch.Tensor.storage_offset,
    torch.is_tensor,
    torch.is_floating_point,
    torch.numel,
    torch.Tensor.__reduce_ex__,
    torch.Tensor.__deepcopy__,
}
_PROPERTY_PASSTHROUGH = {
    "dtype",
    "device",
    "is_cuda",
    "is_meta",
    "is_sparse",
    "is_quantized",
    "requires_grad",
    "ndim",
    "layout",
    "is_leaf",
    "grad_fn",
    "names",
    "is_nested",
    "itemsize",
    "nbytes",
}


@dataclass
class TensorRef:
    """A parameter or buffer of the model, by owner and attribute name.

    The tensor is looked up when asked for, so a graph never keeps a pruned-away tensor alive
    (an LLM's old weights are freed as soon as each layer is sliced)."""

    module_name: str
    module: nn.Module
    name: str
    is_buffer: bool

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.name)

    @property
    def qualified(self) -> str:
        return f"{self.module_name}.{self.name}" if self.module_name else self.name


@dataclass
class SizeCheck:
    """An int argument that must keep matching the surviving size of some positions."""

    expr: Any
    atoms: np.ndarray
    where: str

    @property
    def attributes(self) -> list[AttributeSlot]:
        return [key for key in symbols(self.expr) if isinstance(key, AttributeSlot)]


@dataclass
class Unsupported:
    """An op with no rule: what it was, where it ran, and how many tensors it touched."""

    op: str
    module: str


@dataclass
class TraceState:
    """Everything the rules build while the forward runs."""

    model: nn.Module
    table: AtomTable = field(default_factory=AtomTable)
    layouts: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    refs: dict[int, TensorRef] = field(default_factory=dict)
    param_layouts: dict[int, TensorLayout] = field(default_factory=dict)
    module_stack: list[str] = field(default_factory=list)
    checks: list[SizeCheck] = field(default_factory=list)
    attributes: dict[tuple[int, str], AttributeSlot] = field(default_factory=dict)
    attribute_values: list[tuple[AttributeSlot, str]] = field(default_factory=list)
    unsupported: list[Unsupported] = field(default_factory=list)
    ran: set[int] = field(default_factory=set)
    calls: int = 0

    def __post_init__(self) -> None:
        for module_name, module in self.model.named_modules(remove_duplicate=False):
            for name, tensor in module.named_parameters(recurse=False):
                self.refs.setdefault(id(tensor), TensorRef(module_name, module, name, False))
            for name, tensor in module.named_buffers(recurse=False):
                if tensor is not None:
                    self.refs.setdefault(id(tensor), TensorRef(module_name, module, name, True))

    @property
    def module_path(self) -> str:
        return self.module_stack[-1] if self.module_stack else "<model>"

    def layout(self, tensor: torch.Tensor) -> TensorLayout:
        """The layout of a tensor, creating one for parameters and unknown constants."""
        known = self.layouts.get(tensor)
        if known is not None:
            return known
        ref = self.refs.get(id(tensor))
        if ref is not None and ref.tensor is tensor:
            layout = self.param_layouts.get(id(tensor))
            if layout is None:
                layout = [
                    DimLayout(
                        self.table.new_family(size, "param", f"{ref.qualified} dim {d}")[:, None]
                    )
                    for d, size in enumerate(tensor.shape)
                ]
                self.param_layouts[id(tensor)] = layout
            return layout
        reason = f"a tensor constant used in {self.module_path}"
        layout = [opaque(size, reason) for size in tensor.shape]
        self.layouts[tensor] = layout
        return layout

    def set_layout(self, tensor: torch.Tensor, layout: TensorLayout) -> None:
        if len(layout) != tensor.dim():
            raise AssertionError(f"layout rank {len(layout)} != tensor rank {tensor.dim()}")
        for dim, size in zip(layout, tensor.shape):
            if dim.size != size:
                raise AssertionError(f"layout size {dim.size} != tensor size {size}")
        if id(tensor) in self.param_layouts:
            for mine, theirs in zip(self.param_layouts[id(tensor)], layout):
                unify(self.table, mine, theirs, "an in-place update of a parameter")
            return
        self.layouts[tensor] = layout

    def tracked_sizes(self, tensor: torch.Tensor) -> TrackedShape:
        layout = self.layout(tensor)
        return TrackedShape(
            TrackedInt(size, ("dim", dim)) for size, dim in zip(tensor.shape, layout)
        )

    def value_use(self, expr: Any, where: str) -> None:
        """A channel count became a value (a scale, a fill): pruning that dim changes results.

        Attributes are resolved to the positions they count once tracing is over."""
        reason = f"a channel count used as a value in {where}"
        for key in symbols(expr):
            if isinstance(key, AttributeSlot):
                self.attribute_values.append((key, reason))
            elif not key.is_opaque:
                self.table.mark_mixing(key.atoms[key.atoms >= 0], reason)

    def require_size(self, value: Any, dim: DimLayout, where: str) -> None:
        """Record that ``value`` must equal the number of surviving positions of ``dim``.

        An attribute used as a size by itself counts those positions: all positions it counts
        are coupled (they shrink together, and the attribute follows them)."""
        expr = expr_of(value)
        if expr[0] == "attr":
            self._bind(expr[1], dim, where)
        elif expr[0] == "dim":
            self._match(expr[1], dim, where)
        attributes = any(isinstance(key, AttributeSlot) for key in symbols(expr))
        if dim.is_opaque and not attributes:
            return
        if is_literal(value):
            self.table.freeze_many(dim.atoms, f"hard-coded size {int(value)} in {where}")
        else:
            self.checks.append(SizeCheck(expr, dim.atoms, where))

    def _bind(self, slot: AttributeSlot, dim: DimLayout, where: str) -> None:
        slot.uses.append(where)
        if slot.layout is None:
            slot.layout = dim
        else:
            unify(self.table, slot.layout, dim, f"{where} (attribute {slot.label})")

    def _match(self, source: DimLayout, dim: DimLayout, where: str) -> None:
        """A dim sized by another tensor's dim (``y.reshape(b, n, x.shape[-1])``) keeps that
        size only if both shrink together: unless they already hold the same channels, their
        positions are coupled one to one."""
        if source is dim or source.is_opaque or dim.is_opaque or source.size != dim.size:
            return
        if not same_positions(self.table, source, dim):
            unify(self.table, source, dim, f"{where} (a size taken from another tensor)")

    def finish(self) -> None:
        """Mark the positions of attributes used as values (``self.head_dim ** -0.5``)."""
        for slot, reason in self.attribute_values:
            if slot.layout is not None and not slot.layout.is_opaque:
                atoms = slot.layout.atoms
                self.table.mark_mixing(atoms[atoms >= 0], reason)
        self.attribute_values.clear()


def iter_tensors(obj: Any, _depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor inside nested tuples, lists, dicts and dataclass-like outputs."""
    if _depth > 20:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from iter_tensors(value, _depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from iter_tensors(value, _depth + 1)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from iter_tensors(getattr(obj, name, None), _depth + 1)


class Recorder(TorchFunctionMode):
    """Hands every torch call made during the forward to its op rule."""

    def __init__(self, state: TraceState, lookup: Callable[[Any], Optional[Callable]]) -> None:
        super().__init__()
        self.state = state
        self.lookup = lookup

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = getattr(func, "__self__", None)
        if owner is torch._C.TensorBase.shape or func in (torch.Tensor.size, torch.Tensor.__len__):
            return self._sizes(func, args)
        if func in _PASSTHROUGH or getattr(owner, "__name__", None) in _PROPERTY_PASSTHROUGH:
            return func(*args, **kwargs)
        out = func(*args, **kwargs)
        self.state.calls += 1
        from torchslim.ops.registry import OpContext, apply_rule

        apply_rule(OpContext(self.state, func, args, kwargs, out), self.lookup(func))
        return out

    def _sizes(self, func, args):
        sizes = self.state.tracked_sizes(args[0])
        if func is torch.Tensor.__len__:
            return sizes[0]
        if func is torch.Tensor.size and len(args) > 1:
            return sizes[args[1]]
        return sizes


def module_stack_hooks(
    model: nn.Module, stack: list[str], ran: Optional[set[int]] = None
) -> list[Any]:
    """Hooks that keep ``stack`` equal to the names of the modules currently running (and add
    the ``id`` of every module that runs to ``ran``)."""
    handles = []
    ran = set() if ran is None else ran
    for name, module in model.named_modules():

        def pre(module, _args, name=name):
            stack.append(name or "<model>")
            ran.add(id(module))

        def post(_module, _args, _out):
            stack.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    return handles


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DataParallel`` / ``DistributedDataParallel`` / ``torch.compile``
    wrappers: its layers are the ones to trace and prune (the wrappers share them)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def call_forward(
    model: nn.Module, example_inputs: Any, forward_fn: Optional[Callable] = None
) -> Any:
    """Run the model the way users pass inputs: ``forward_fn``, a dict, a tuple/list or a tensor."""
    if forward_fn is not None:
        return forward_fn(model, example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


def run_traced(
    state: TraceState,
    lookup: Callable[[Any], Optional[Callable]],
    call: Callable[[], Any],
    training: bool = False,
) -> Any:
    """Run ``call()`` (the forward) under the recorder without autograd.

    The model's train/eval flags, its buffers (BatchNorm statistics move in train mode) and the
    global RNG state are restored afterwards, so tracing leaves no trace on the model.
    """
    model = state.model
    modes = {m: m.training for m in model.modules()}
    saved = {
        name: buffer.clone()
        for name, buffer in model.named_buffers()
        if training and buffer is not None and buffer.device.type != "meta"
    }
    rng = torch.random.get_rng_state()
    handles = module_stack_hooks(model, state.module_stack, state.ran)

    def listener(expr: Any) -> None:
        state.value_use(expr, state.module_path)

    VALUE_USE_LISTENERS.append(listener)
    try:
        model.train(training)
        with torch.no_grad(), tracked_attributes(model, state.attributes), Recorder(state, lookup):
            return call()
    finally:
        VALUE_USE_LISTENERS.remove(listener)
        for handle in handles:
            handle.remove()
        for module, mode in modes.items():
            module.training = mode
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                if name in saved:
                    buffer.copy_(saved[name])
        torch.random.set_rng_state(rng)
        state.module_stack.clear()
