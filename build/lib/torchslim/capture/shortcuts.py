"""Shape-only results for common ops on ``meta`` tensors.

On ``meta`` tensors an op computes nothing but its output's shape, dtype and strides. For
normalisations, activations and element-wise arithmetic between tensors of one layout that is
the first input's, yet PyTorch derives it through Python reference implementations, about
milliseconds a call (a quarter of a ResNet's trace). These ops answer ``torch.empty_like`` of
their input instead (the input itself when in place); arithmetic between contiguous tensors of
one dtype, one of which has the broadcast shape, a contiguous tensor of that shape; linear
layers (0.7 ms a call on a 3-D input: most of a ViT's trace), 2-D convolutions (0.1 ms) and
adaptive average pooling of contiguous inputs, a contiguous tensor of the output's shape. With any non-``meta`` tensor,
another dtype, shape or stride among the operands than these cases allow, or a keyword this
table does not know, the op runs as usual.
"""

from __future__ import annotations

from contextlib import contextmanager
from numbers import Number
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode


def _argument(args: tuple, kwargs: dict, at: int, name: str, default: Any = None) -> Any:
    return kwargs.get(name, args[at] if len(args) > at else default)


def _batch_norm_fits(args: tuple, kwargs: dict) -> bool:
    """What ``F.batch_norm`` and its kernel check before computing: a non-negative ``eps``
    (positive in train mode), more than one value per channel in train mode, running
    statistics in eval mode, and every vector one per channel (a shortcut must not skip an
    error)."""
    x = args[0]
    training = _argument(args, kwargs, 5, "training", False)
    eps = _argument(args, kwargs, 7, "eps", 1e-5)
    vectors = [_argument(args, kwargs, k, n) for k, n in enumerate(_BN_VECTORS, start=1)]
    if x.dim() < 2 or eps < 0:
        return False
    if training and (eps <= 0 or x.numel() <= x.shape[1]):
        return False
    if not training and (vectors[0] is None or vectors[1] is None):
        return False
    return all(v is None or tuple(v.shape) == (x.shape[1],) for v in vectors)


def _layer_norm_fits(args: tuple, kwargs: dict) -> bool:
    x, shape = args[0], tuple(_argument(args, kwargs, 1, "normalized_shape", ()))
    vectors = [_argument(args, kwargs, 2, "weight"), _argument(args, kwargs, 3, "bias")]
    return (
        0 < len(shape) <= x.dim()
        and tuple(x.shape[-len(shape) :]) == shape
        and all(v is None or tuple(v.shape) == shape for v in vectors)
    )


def _group_norm_fits(args: tuple, kwargs: dict) -> bool:
    x, groups = args[0], _argument(args, kwargs, 1, "num_groups", 0)
    vectors = [_argument(args, kwargs, 2, "weight"), _argument(args, kwargs, 3, "bias")]
    return (
        x.dim() >= 2
        and isinstance(groups, int)
        and groups > 0
        and x.shape[1] % groups == 0
        and all(v is None or tuple(v.shape) == (x.shape[1],) for v in vectors)
    )


_BN_VECTORS = ("running_mean", "running_var", "weight", "bias")
Fits = Callable[[tuple, dict], bool]
# Output like the first input: the position of an ``inplace`` argument (if any) and the check
# of the other arguments that the op's own meta kernel would make.
_LIKE_INPUT: dict[Callable, tuple[Optional[int], Optional[Fits]]] = {
    F.batch_norm: (None, _batch_norm_fits),
    F.layer_norm: (None, _layer_norm_fits),
    F.group_norm: (None, _group_norm_fits),
    F.gelu: (None, None),
    F.relu: (1, None),
    F.relu6: (1, None),
    F.silu: (1, None),
    F.hardswish: (1, None),
    F.hardsigmoid: (1, None),
    F.mish: (1, None),
    F.hardtanh: (3, None),
    F.leaky_relu: (2, None),
    F.elu: (2, None),
    torch.relu: (None, None),
    torch.sigmoid: (None, None),
    torch.tanh: (None, None),
    torch.Tensor.relu: (None, None),
    torch.Tensor.sigmoid: (None, None),
    torch.Tensor.tanh: (None, None),
}
_IN_PLACE = {torch.relu_, torch.Tensor.relu_, torch.Tensor.sigmoid_, torch.Tensor.tanh_}
_ARITHMETIC = {
    torch.add,
    torch.mul,
    torch.sub,
    torch.Tensor.add,
    torch.Tensor.mul,
    torch.Tensor.sub,
    torch.Tensor.__add__,
    torch.Tensor.__radd__,
    torch.Tensor.__mul__,
    torch.Tensor.__rmul__,
    torch.Tensor.__sub__,
}
_ARITHMETIC_IN_PLACE = {
    torch.Tensor.add_,
    torch.Tensor.mul_,
    torch.Tensor.sub_,
    torch.Tensor.__iadd__,
    torch.Tensor.__imul__,
}
_KEYWORDS = {
    "inplace",
    "output_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "alpha",
    "weight",
    "bias",
    "eps",
    "momentum",
    "training",
    "approximate",
    "running_mean",
    "running_var",
    "normalized_shape",
    "num_groups",
    "negative_slope",
    "min_val",
    "max_val",
}


def _linear(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """``F.linear``'s output: the input's leading dims and the weight's rows, contiguous."""
    x, weight, bias = (
        args[0],
        _argument(args, kwargs, 1, "weight"),
        _argument(args, kwargs, 2, "bias"),
    )
    if not (
        isinstance(weight, torch.Tensor)
        and weight.is_meta
        and weight.dim() == 2
        and weight.dtype == x.dtype
        and x.dtype.is_floating_point
        and x.dim() >= 1
        and x.shape[-1] == weight.shape[1]
        and _fits_bias(bias, x, weight.shape[0])
    ):
        return None
    return torch.empty((*x.shape[:-1], weight.shape[0]), dtype=x.dtype, device=x.device)


def _fits_bias(bias: Any, x: torch.Tensor, out: int) -> bool:
    """No bias, or a ``meta`` vector of ``x``'s dtype with one value per output channel."""
    return bias is None or (
        isinstance(bias, torch.Tensor)
        and bias.is_meta
        and bias.dtype == x.dtype
        and tuple(bias.shape) == (out,)
    )


def _adaptive_avg_pool2d(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """``F.adaptive_avg_pool2d``'s output for a contiguous input with no empty dims but the
    batch: its leading dims and the output size (``None`` keeps the input's)."""
    x, size = args[0], _argument(args, kwargs, 1, "output_size")
    if x.dim() not in (3, 4) or not _row_major(x) or not x.is_floating_point():
        return None
    if any(n == 0 for n in x.shape[x.dim() - 3 :]):
        return None
    pair = (size, size) if _is_int(size) else tuple(size) if isinstance(size, (tuple, list)) else ()
    if len(pair) != 2:
        return None
    spatial = [x.shape[-2 + k] if s is None else s for k, s in enumerate(pair)]
    if not all(_is_int(s) and s >= 0 for s in spatial):
        return None
    return torch.empty((*x.shape[:-2], *map(int, spatial)), dtype=x.dtype, device=x.device)


def _row_major(x: torch.Tensor) -> bool:
    """Strides of a fresh row-major tensor, size-1 dims included (``is_contiguous`` ignores
    those, but the kernels' choice of memory format does not: an N x C x 1 x 1 tensor with
    channels-last strides gives channels-last results)."""
    stride, expected = x.stride(), 1
    for k in range(x.dim() - 1, -1, -1):
        if stride[k] != expected:
            return False
        expected *= max(x.shape[k], 1)
    return True


def _is_int(value: Any) -> bool:
    """An int, or a traced attribute's (an int subclass), not a bool."""
    return isinstance(value, int) and not isinstance(value, bool)


def _pair(value: Any) -> Optional[tuple[int, int]]:
    """A 2-D op's int-or-pair argument as a pair (``None``: something else)."""
    if _is_int(value):
        return int(value), int(value)
    if isinstance(value, (tuple, list)) and len(value) in (1, 2) and all(map(_is_int, value)):
        return int(value[0]), int(value[-1])
    return None


def _conv2d(args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """``F.conv2d``'s output for contiguous 4-D operands of one floating dtype, with every
    check the kernel makes (channels and groups, bias, positive strides and dilations, a kernel
    that fits the padded input): the batch, the weight's rows and the strided spatial size."""
    x, weight = args[0], _argument(args, kwargs, 1, "weight")
    bias = _argument(args, kwargs, 2, "bias")
    groups = _argument(args, kwargs, 6, "groups", 1)
    if not (
        isinstance(weight, torch.Tensor)
        and weight.is_meta
        and x.dim() == 4
        and weight.dim() == 4
        and x.dtype == weight.dtype
        and x.is_floating_point()
        and _row_major(x)
        and _row_major(weight)
        and isinstance(groups, int)
        and groups > 0
        and all(n > 0 for n in (*x.shape[1:], *weight.shape))
        and weight.shape[1] * groups == x.shape[1]
        and weight.shape[0] % groups == 0
        and _fits_bias(bias, x, weight.shape[0])
    ):
        return None
    stride = _pair(_argument(args, kwargs, 3, "stride", 1))
    dilation = _pair(_argument(args, kwargs, 5, "dilation", 1))
    padding = _argument(args, kwargs, 4, "padding", 0)
    if stride is None or dilation is None or min(stride) <= 0 or min(dilation) <= 0:
        return None
    if padding == "same":  # padded so that the output keeps the input's size
        if stride != (1, 1):
            return None
        return torch.empty(
            (x.shape[0], weight.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device
        )
    padding = _pair(0 if padding == "valid" else padding)
    if padding is None or min(padding) < 0:
        return None
    spatial = []
    for size, kernel, s, d, p in zip(x.shape[2:], weight.shape[2:], stride, dilation, padding):
        span = d * (kernel - 1) + 1
        if size + 2 * p < span:
            return None
        spatial.append((size + 2 * p - span) // s + 1)
    return torch.empty((x.shape[0], weight.shape[0], *spatial), dtype=x.dtype, device=x.device)


_SHAPED: dict[Callable, Callable[[tuple, dict], Optional[torch.Tensor]]] = {
    F.conv2d: _conv2d,
    F.linear: _linear,
    F.adaptive_avg_pool2d: _adaptive_avg_pool2d,
}


_SHAPED_KEYWORDS = {"weight", "bias", "output_size", "stride", "padding", "dilation", "groups"}


def shortcut(func: Callable, args: tuple, kwargs: dict) -> Any:
    """The shape-only result of ``func(*args, **kwargs)``, or ``None`` to run it."""
    if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_meta:
        return None
    if not set(kwargs) <= _KEYWORDS or "out" in kwargs:
        return None
    first = args[0]
    if func in _LIKE_INPUT:
        if not all(a.is_meta for a in _tensors(args, kwargs)):
            return None
        at, fits = _LIKE_INPUT[func]
        if fits is not None and not fits(args, kwargs):
            return None
        inplace = at is not None and _argument(args, kwargs, at, "inplace", False)
        return first if inplace else _like(first)
    if func in _IN_PLACE and len(args) == 1 and not kwargs:
        return first
    if func in _SHAPED and set(kwargs) <= _SHAPED_KEYWORDS:
        return _SHAPED[func](args, kwargs)
    if func in _ARITHMETIC or func in _ARITHMETIC_IN_PLACE:
        if len(args) != 2 or first.dtype == torch.bool:
            return None
        if "alpha" in kwargs and not (first.is_floating_point() or _is_int(kwargs["alpha"])):
            return None  # an integer tensor refuses a fractional alpha
        in_place = func in _ARITHMETIC_IN_PLACE
        if _same_layout(first, args[1]):
            return first if in_place else _like(first)
        return _broadcast(first, args[1], in_place)
    return None


def _like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)``: for a dense input its strides (what ``empty_like`` keeps), made
    directly instead of through PyTorch's Python reference of ``empty_like`` (15x slower)."""
    if x.layout == torch.strided and (
        x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)
    ):
        return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device=x.device)
    return torch.empty_like(x)


def _same_layout(first: torch.Tensor, other: Any) -> bool:
    if isinstance(other, torch.Tensor):
        return (
            other.is_meta
            and other.shape == first.shape
            and other.dtype == first.dtype
            and other.stride() == first.stride()
        )
    floating = first.is_floating_point()
    return (
        isinstance(other, Number)
        and not isinstance(other, complex)
        and (floating or isinstance(other, int))
    )


def _broadcast(first: torch.Tensor, other: Any, in_place: bool) -> Any:
    """Arithmetic between contiguous ``meta`` tensors of one dtype, one of which has the shape
    both broadcast to (a squeeze-and-excitation scale times its input): a contiguous result of
    that shape (the first operand itself in place, which must have it)."""
    if not (
        isinstance(other, torch.Tensor)
        and other.is_meta
        and other.dtype == first.dtype
        and _row_major(first)
        and _row_major(other)
    ):
        return None
    try:
        shape = torch.broadcast_shapes(first.shape, other.shape)
    except RuntimeError:
        return None
    if in_place:
        return first if shape == first.shape else None
    if shape != first.shape and shape != other.shape:
        return None
    return torch.empty(shape, dtype=first.dtype, device=first.device)


def _tensors(args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            yield value


class _Shortcuts(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = shortcut(func, args, kwargs)
        return func(*args, **kwargs) if out is None else out


@contextmanager
def meta_shortcuts() -> Iterator[None]:
    """Answer the ops above by shape inside the block (a ``meta`` forward check)."""
    with _Shortcuts():
        yield
