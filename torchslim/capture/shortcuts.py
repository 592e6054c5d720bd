"""Shape-only results for common ops on ``meta`` tensors.

On ``meta`` tensors an op computes nothing but its output's shape, dtype and strides. For
normalisations, activations and element-wise arithmetic between tensors of one layout that is
the first input's, yet PyTorch derives it through Python reference implementations, about
milliseconds a call (a quarter of a ResNet's trace). These ops answer ``torch.empty_like`` of
their input instead (the input itself when in place); with any non-``meta`` tensor, another
dtype, shape or stride among the operands, or a keyword this table does not know, the op runs
as usual.
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
    if func in _ARITHMETIC or func in _ARITHMETIC_IN_PLACE:
        if len(args) != 2 or not _same_layout(first, args[1]):
            return None
        return first if func in _ARITHMETIC_IN_PLACE else _like(first)
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
