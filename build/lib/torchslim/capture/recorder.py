"""Recording one forward pass: every torch call, with exact arguments and the module running it.

A :class:`torch.overrides.TorchFunctionMode` sees ``F.conv2d``, ``torch.cat(dim=-1)`` and
``x.view(...)`` with their real arguments, needs no autograd, and works unchanged on ``meta`` and
fake tensors. Module pre/post hooks keep the stack of modules executing, so every op knows where
it was called. Each call is handed to its op rule (see :mod:`torchslim.ops`) right away, which
updates the dimension layouts; calls with no rule freeze everything they touch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode

from torchslim.capture.blocks import block_hooks
from torchslim.capture.experts import experts_as_ops
from torchslim.capture.modules import watched
from torchslim.capture.shortcuts import shortcut
from torchslim.ops.registry import OpContext, apply_rule, lookup
from torchslim.spaces.attributes import tracked_attributes
from torchslim.spaces.symbolic import observed
from torchslim.spaces.trace import TraceState

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
_VALUE_READS = {
    torch.Tensor.item,
    torch.Tensor.__int__,
    torch.Tensor.__index__,
    torch.Tensor.__float__,
    torch.Tensor.__bool__,
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


class Recorder(TorchFunctionMode):
    """Hands every torch call made during the forward to its op rule."""

    def __init__(self, state: TraceState) -> None:
        super().__init__()
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        owner = getattr(func, "__self__", None)
        if owner is torch._C.TensorBase.shape or func in (torch.Tensor.size, torch.Tensor.__len__):
            return self._sizes(func, args)
        if func in _PASSTHROUGH or getattr(owner, "__name__", None) in _PROPERTY_PASSTHROUGH:
            if self.state.selections and func in _VALUE_READS:
                self.state.indices_read([args[0]], [])
            return func(*args, **kwargs)
        self.state.inside_op += 1
        try:
            out = shortcut(func, args, kwargs)
            if out is None:
                out = func(*args, **kwargs)
            self.state.calls += 1
            context = OpContext(self.state, func, args, kwargs, out, retrace=self.retrace)
            apply_rule(context, lookup(func))
            if self.state.selections or self.state.block_outputs or self.state.block_inputs:
                inputs = context.input_tensors()
                self.state.indices_read(inputs, context.claimed)
                self.state.block_tensors_read(inputs, context.name, context.where)
        finally:
            self.state.inside_op -= 1
        return out

    def retrace(self, call: Callable[[], Any]) -> Any:
        """Run ``call()`` under a fresh recorder on the same state: the rule of a fused op
        traces an equivalent composition of basic ops this way."""
        with torch.no_grad(), Recorder(self.state):
            return call()

    def _sizes(self, func, args):
        sizes = self.state.tracked_sizes(args[0])
        if func is torch.Tensor.__len__:
            return sizes[0]
        if func is torch.Tensor.size and len(args) > 1:
            return sizes[args[1]]
        return sizes


def run_traced(state: TraceState, call: Callable[[], Any], training: bool = False) -> Any:
    """Run ``call()`` (the forward) under the recorder, leaving no trace on the model (see
    :func:`~torchslim.capture.modules.untouched`)."""
    model = state.model

    def listener(expr: Any) -> None:
        state.value_use(expr, state.module_path)

    with (
        watched(model, state.module_stack, state.ran, training),
        observed(listener, state.compare),
        tracked_attributes(model, state.attributes),
        experts_as_ops(model),
        block_hooks(model, state, record=not training),
        Recorder(state),
    ):
        return call()
