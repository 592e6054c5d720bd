"""The one mechanism every importance criterion shares.

A criterion scores *positions* of one parameter dim (one conv filter, one BN scale, one input
column of the next layer). :meth:`GroupImportance.__call__` adds position scores up per group
index with :meth:`Group.index_maps` (so a head's 64 positions make one head score), reduces the
per-layer vectors of the group to one (``mean``, ``sum``, ``max``, ``prod``, ``first``) and
normalises the result. Lower scores are pruned first.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Union

import numpy as np
import torch
from torch import nn

from torchslim.graph.dependency import Group
from torchslim.pruning.layers import PER_CHANNEL, layer_kind
from torchslim.spaces.analysis import ParamDim

REDUCTIONS = ("mean", "sum", "max", "prod", "first")
#: ``"standarization"`` is torch-pruning's spelling of ``"standardization"`` (min-max scaling).
NORMALIZERS = ("mean", "max", "sum", "standardization", "standarization", "gaussian", "lamp")
Normalizer = Union[None, str, Callable[[torch.Tensor], torch.Tensor]]


class Importance:
    """Anything that maps a group to one score per group index (or ``None``: skip the group).

    ``calibrated``: whether the scores come from data the model saw (activations, gradients),
    not from the weights alone."""

    calibrated: bool = False

    def __call__(self, group: Group) -> Optional[torch.Tensor]:
        raise NotImplementedError


class GroupImportance(Importance):
    """Score positions of every coupled parameter dim, then reduce onto the group's channels.

    Subclasses implement :meth:`position_scores`. ``bias`` includes 1-D bias vectors,
    ``include_buffers`` running statistics; by default both are left out.
    """

    def __init__(
        self,
        group_reduction: Optional[str] = "mean",
        normalizer: Normalizer = "mean",
        bias: bool = False,
        include_buffers: bool = False,
    ) -> None:
        if group_reduction is not None and group_reduction not in REDUCTIONS:
            raise ValueError(f"group_reduction must be one of {REDUCTIONS} or None")
        if isinstance(normalizer, str) and normalizer not in NORMALIZERS:
            raise ValueError(f"normalizer must be one of {NORMALIZERS}, a callable or None")
        self.group_reduction = group_reduction
        self.normalizer = normalizer
        self.bias = bias
        self.include_buffers = include_buffers

    def position_scores(self, member: ParamDim, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        """One non-negative score per position of ``tensor`` along ``member.dim`` (or None)."""
        raise NotImplementedError

    def accepts(self, group: Group, member: ParamDim) -> bool:
        """Whether a coupled parameter dim takes part in the score."""
        if member.ref.is_buffer and not self.include_buffers:
            return False
        tensor = getattr(member.ref.module, member.ref.name)
        if member.ref.name == "bias" and tensor.dim() == 1 and not self.bias:
            return False
        return group.handler_role(member) is not None

    @torch.no_grad()
    def __call__(self, group: Group) -> Optional[torch.Tensor]:
        per_layer = []
        for member, index in group.index_maps():
            if not self.accepts(group, member):
                continue
            tensor = getattr(member.ref.module, member.ref.name)
            scores = self.position_scores(member, tensor)
            if scores is None:
                continue
            per_layer.append(_scatter(scores.detach().double().cpu(), index, group.size))
        if not per_layer:
            return None
        return normalize(reduce_layers(per_layer, self.group_reduction), self.normalizer)


def _scatter(scores: torch.Tensor, index: np.ndarray, size: int) -> torch.Tensor:
    """Sum the scores of positions that belong to the same group index."""
    if index.size == size and (not size or (index[0] == 0 and (np.diff(index) == 1).all())):
        return scores  # position i is group index i (most layers): nothing to add up
    keep = torch.as_tensor(index >= 0)
    out = torch.zeros(size, dtype=scores.dtype)
    target = torch.as_tensor(index, dtype=torch.long)[keep]
    return out.index_add_(0, target, scores[keep])


def rows(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """``[positions, everything else]``: the slice of each position along ``dim``, in the
    tensor's own dtype."""
    moved = tensor.detach().movedim(dim, 0)
    return moved.reshape(moved.shape[0], math.prod(moved.shape[1:]))  # also when empty


def slices(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`rows` in float64."""
    return rows(tensor, dim).double()


#: Elements converted to float64 at a time by :func:`per_position` (256 MB).
CHUNK_ELEMENTS = 1 << 25


def per_position(fn: Callable[..., torch.Tensor], dim: int, *tensors: torch.Tensor) -> torch.Tensor:
    """``fn(*slices)`` for every position along ``dim``, a block of positions at a time, so no
    float64 copy of a whole LLM embedding is ever made. ``fn`` maps ``[k, rest]`` slices (in the
    tensors' own dtype) to ``k`` float64 scores."""
    first = tensors[0]
    rest = max(1, first.numel() // max(first.shape[dim], 1))
    step = max(1, CHUNK_ELEMENTS // rest)
    scores = [
        fn(*(rows(t, dim) for t in chunk)) for chunk in zip(*(t.split(step, dim) for t in tensors))
    ]
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)


def norms(rows: torch.Tensor, p: float) -> torch.Tensor:
    """``sum |x|^p`` of each row, accumulated in float64 without a float64 copy of the rows."""
    return torch.linalg.vector_norm(rows, ord=p, dim=1, dtype=torch.float64).pow(p)


#: Elements of a float32 / bfloat16 / float16 tensor reduced in float32 at a time by
#: :func:`position_norms` (1 MB: a block and its source stay in a core's L2 cache while it is
#: reduced; on this project's 2-core Xeon, 1.5x faster than 4 MB blocks on one thread).
NORM_BLOCK = 1 << 18
#: dtypes whose norms :func:`position_norms` sums in float32 blocks
BLOCKED = (torch.float32, torch.bfloat16, torch.float16)


def position_norms(tensor: torch.Tensor, dim: int, p: float) -> torch.Tensor:
    """``sum |x|^p`` over each position's slice along ``dim``, in float64.

    float32, bfloat16 and float16 tensors (nearly every model's weights) are read at memory
    speed: in contiguous blocks of rows of about :data:`NORM_BLOCK` elements, each reduced in
    float32 (PyTorch's cascade sums), the block sums added in float64. A float32 sum then
    covers at most one block's part of a position, so its relative error against float64 stays
    near 1e-7 and below 1e-5 (tested), far under the rounding of bfloat16 weights (2^-8), and
    on float32 weights small enough that only positions whose scores tie to six digits can
    rank differently; summing in float64 throughout is several times slower. float64 tensors
    accumulate in float64 (:func:`per_position`)."""
    if tensor.dtype not in BLOCKED or tensor.dim() == 0 or len(tensor) == 0:
        return per_position(lambda w: norms(w, p), dim, tensor)
    tensor = tensor.detach()
    others = [d for d in range(tensor.dim()) if d != dim]
    if tensor.numel() <= NORM_BLOCK:  # one block: no buffer to reuse
        values = torch.empty(tensor.shape, dtype=torch.float32)  # row-major, as the blocks are
        _power(tensor, values, p)
        return (values.sum(others) if others else values).double()
    step = max(1, NORM_BLOCK // max(1, tensor[0].numel()))
    work = torch.empty((min(step, len(tensor)), *tensor.shape[1:]), dtype=torch.float32)
    parts = []
    for block in tensor.split(step, 0):
        values = work[: len(block)]  # one float32 buffer, reused: no allocation per block
        _power(block, values, p)
        parts.append((values.sum(others) if others else values.clone()).double())
    return torch.cat(parts) if dim == 0 else torch.stack(parts).sum(0)


def _power(block: torch.Tensor, out: torch.Tensor, p: float) -> None:
    """``|block|^p`` into the float32 buffer ``out`` (low-precision blocks converted first)."""
    if block.dtype != out.dtype:
        out.copy_(block)
        block = out
    if p == 2:
        torch.mul(block, block, out=out)
    else:
        torch.abs(block, out=out)
        if p != 1:
            out.pow_(p)


def reduce_layers(per_layer: list[torch.Tensor], how: Optional[str]) -> torch.Tensor:
    """Reduce the score vectors of a group's layers to one (``None``: sum)."""
    stacked = torch.stack(per_layer)
    if how == "first":
        return stacked[0]
    if how == "mean":
        return stacked.mean(0)
    if how == "max":
        return stacked.max(0).values
    if how == "prod":
        return stacked.prod(0)
    return stacked.sum(0)


def normalize(scores: torch.Tensor, how: Normalizer) -> torch.Tensor:
    """Make scores comparable across groups (global pruning ranks them together)."""
    if how is None:
        return scores
    if callable(how):
        return how(scores)
    eps = 1e-12
    if how == "mean":
        return scores / (scores.mean() + eps)
    if how == "max":
        return scores / (scores.max() + eps)
    if how == "sum":
        return scores / (scores.sum() + eps)
    if how in ("standardization", "standarization"):
        return (scores - scores.min()) / (scores.max() - scores.min() + eps)
    if how == "gaussian":
        return (scores - scores.mean()) / (scores.std(unbiased=False) + eps)
    return lamp(scores)


def lamp(scores: torch.Tensor) -> torch.Tensor:
    """LAMP: each score divided by the sum of the scores not smaller than it."""
    order = torch.argsort(scores)
    ascending = scores[order]
    tail = torch.flip(torch.cumsum(torch.flip(ascending, [0]), 0), [0])
    out = torch.empty_like(scores)
    out[order] = ascending / (tail + 1e-12)
    return out


def is_norm_layer(module: nn.Module) -> bool:
    """A normalisation with per-channel statistics (BatchNorm, InstanceNorm, FrozenBatchNorm):
    its scale is a channel's importance for BN-scale criteria."""
    return layer_kind(module).norm == PER_CHANNEL
