"""Shape ops: reshapes (products and factorisations), permutations, concatenation (direct sums),
splits and indexing (sub-ranges), broadcasting copies, and tensor factories.

Every int argument that fixes a size is checked with :meth:`OpContext.require_size`: a literal
freezes the positions it measures, a size computed from ``x.shape`` is verified later.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from torchslim.ops.registry import OpContext, normalize_dim, rule_for
from torchslim.spaces.layout import DimLayout, TensorLayout, concat, merge, take
from torchslim.spaces.symbolic import TrackedInt, is_literal

# ---------------------------------------------------------------------------------- reshapes


def reshape_layout(
    ctx: OpContext, layout: TensorLayout, in_sizes: Sequence[int], out_sizes: Sequence[int]
) -> TensorLayout:
    """Map dims through a row-major reshape: blocks of equal product are merged then split."""
    in_sizes, out_sizes = list(in_sizes), list(out_sizes)
    if 0 in in_sizes or 0 in out_sizes:
        return [ctx.opaque(s) for s in out_sizes]
    result: TensorLayout = []
    i = j = 0
    while i < len(in_sizes) or j < len(out_sizes):
        block_in, block_out = [], []
        p_in = p_out = 1
        if i < len(in_sizes):
            block_in.append(i)
            p_in *= in_sizes[i]
            i += 1
        if j < len(out_sizes):
            block_out.append(j)
            p_out *= out_sizes[j]
            j += 1
        while p_in != p_out:
            if p_in < p_out and i < len(in_sizes):
                block_in.append(i)
                p_in *= in_sizes[i]
                i += 1
            elif p_out < p_in and j < len(out_sizes):
                block_out.append(j)
                p_out *= out_sizes[j]
                j += 1
            else:
                raise ValueError(f"cannot map shape {in_sizes} to {out_sizes}")
        if not block_out:
            for k in block_in:  # a size-1 dim dropped: the one position it holds must stay
                ctx.freeze(layout[k], "a size-1 dim removed by a reshape")
            continue
        if not block_in:
            result.extend(ctx.opaque(out_sizes[k]) for k in block_out)
            continue
        if len(block_in) == 1 and len(block_out) == 1:
            result.append(layout[block_in[0]])
            continue
        merged = merge([layout[k] for k in block_in])
        result.extend(ctx.split(merged, [out_sizes[k] for k in block_out]))
    return result


def _shape_args(args: Sequence[Any]) -> list[Any]:
    if len(args) == 1 and isinstance(args[0], (tuple, list, torch.Size)):
        return list(args[0])
    return list(args)


def _reshape_to(ctx: OpContext, x: torch.Tensor, requested: Sequence[Any]) -> None:
    out = ctx.out
    layout = reshape_layout(ctx, ctx.layout(x), x.shape, out.shape)
    if len(requested) == out.dim():
        for value, dim in zip(requested, layout):
            if not (isinstance(value, int) and not isinstance(value, TrackedInt) and value == -1):
                ctx.require_size(value, dim)
    ctx.set_out(out, layout)


@rule_for("view", "reshape", "_reshape_alias")
def view_rule(ctx: OpContext) -> None:
    shape = ctx.kwargs.get("shape", ctx.kwargs.get("size"))
    requested = list(shape) if shape is not None else _shape_args(ctx.args[1:])
    if len(requested) == 1 and isinstance(requested[0], torch.dtype):
        raise ValueError("view(dtype) reinterprets memory")
    _reshape_to(ctx, ctx.args[0], requested)


@rule_for("view_as", "reshape_as")
def view_as_rule(ctx: OpContext) -> None:
    _reshape_to(ctx, ctx.args[0], ctx.state.tracked_sizes(ctx.args[1]))


@rule_for("flatten", "ravel", "squeeze", "unsqueeze", "squeeze_", "unsqueeze_", "atleast_2d")
def derived_reshape_rule(ctx: OpContext) -> None:
    """Reshapes whose sizes all derive from the input's own shape."""
    _reshape_to(ctx, ctx.args[0], [])


@rule_for("unflatten")
def unflatten_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    dim = normalize_dim(ctx.arg(1, "dim"), x.dim())
    sizes = list(ctx.arg(2, "sizes"))
    requested = [-1] * dim + sizes + [-1] * (x.dim() - dim - 1)
    _reshape_to(ctx, x, requested)


# ------------------------------------------------------------------------------ permutations


def _permuted(ctx: OpContext, order: Sequence[int]) -> None:
    layout = ctx.layout(ctx.args[0])
    ctx.set_out(ctx.out, [layout[d] for d in order])


@rule_for("permute")
def permute_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    dims = ctx.kwargs.get("dims")
    order = list(dims) if dims is not None else _shape_args(ctx.args[1:])
    _permuted(ctx, [normalize_dim(int(d), x.dim()) for d in order])


@rule_for("transpose", "swapaxes", "swapdims", "transpose_")
def transpose_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    a = normalize_dim(int(ctx.arg(1, "dim0")), x.dim())
    b = normalize_dim(int(ctx.arg(2, "dim1")), x.dim())
    order = list(range(x.dim()))
    order[a], order[b] = order[b], order[a]
    _permuted(ctx, order)


@rule_for("t", "T", "mT", "adjoint", "H", "mH")
def matrix_transpose_rule(ctx: OpContext) -> None:
    n = ctx.args[0].dim()
    order = list(range(n))
    if n >= 2:
        order[-1], order[-2] = order[-2], order[-1]
    if ctx.name in ("Tensor.T",):
        order = list(reversed(range(n)))
    _permuted(ctx, order)


@rule_for("movedim", "moveaxis")
def movedim_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    src, dst = ctx.arg(1, "source"), ctx.arg(2, "destination")
    src = [src] if isinstance(src, int) else list(src)
    dst = [dst] if isinstance(dst, int) else list(dst)
    src = [normalize_dim(s, x.dim()) for s in src]
    dst = [normalize_dim(d, x.dim()) for d in dst]
    order = [None] * x.dim()
    for s, d in zip(src, dst):
        order[d] = s
    rest = iter(d for d in range(x.dim()) if d not in src)
    _permuted(ctx, [o if o is not None else next(rest) for o in order])


@rule_for("data")
def alias_rule(ctx: OpContext) -> None:
    ctx.set_out(ctx.out, list(ctx.layout(ctx.args[0])))


# --------------------------------------------------------------------- concatenation, stacking


def _unify_all_but(ctx: OpContext, tensors: Sequence[torch.Tensor], skip: int) -> TensorLayout:
    layouts = [ctx.layout(t) for t in tensors]
    first = list(layouts[0])
    for other in layouts[1:]:
        for d, (a, b) in enumerate(zip(first, other)):
            if d != skip:
                ctx.unify(a, b)
    return first


@rule_for("cat", "concat", "concatenate")
def cat_rule(ctx: OpContext) -> None:
    tensors = [t for t in ctx.arg(0, "tensors") if not (t.dim() == 1 and t.shape[0] == 0)]
    tensors = tensors or list(ctx.arg(0, "tensors"))
    dim = normalize_dim(ctx.arg(1, "dim", 0), ctx.out.dim())
    layout = _unify_all_but(ctx, tensors, dim)
    layout[dim] = concat([ctx.layout(t)[dim] for t in tensors])
    ctx.set_out(ctx.out, layout)


@rule_for("stack", "hstack", "vstack")
def stack_rule(ctx: OpContext) -> None:
    tensors = list(ctx.arg(0, "tensors"))
    if ctx.name != "torch.stack":
        raise ValueError("only torch.stack is modelled")
    dim = normalize_dim(ctx.arg(1, "dim", 0), ctx.out.dim())
    layout = _unify_all_but(ctx, tensors, -1)
    layout.insert(dim, ctx.opaque(len(tensors), "a stacking index"))
    ctx.set_out(ctx.out, layout)


# --------------------------------------------------------------------------- splits, chunks


def _set_parts(ctx: OpContext, dim: int, parts: Sequence[DimLayout]) -> None:
    layout = ctx.layout(ctx.args[0])
    for tensor, part in zip(ctx.out, parts):
        out_layout = list(layout)
        out_layout[dim] = part
        ctx.set_out(tensor, out_layout)


def _equal_parts(
    ctx: OpContext, source: DimLayout, count: int, sizes: Sequence[Any]
) -> list[DimLayout]:
    """``count`` parts of equal size: a factorisation whose outer factor (the part) must stay.

    Every size given (one, or one per part as in ``split(x, self.sizes)``) must keep matching
    the part, so attributes holding them all follow the pruned part."""
    outer, inner = ctx.split(source, [count, int(sizes[0])])
    ctx.freeze(outer, "the number of parts of a split")
    for size in sizes:
        ctx.require_size(size, inner)
    return [inner] * count


def _ranges(ctx: OpContext, source: DimLayout, sizes: Sequence[Any]) -> list[DimLayout]:
    parts, start = [], 0
    for size in sizes:
        part = take(source, np.arange(start, start + int(size)))
        ctx.require_size(size, part)
        parts.append(part)
        start += int(size)
    return parts


@rule_for("split", "split_with_sizes")
def split_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    sizes = ctx.arg(1, "split_size_or_sections", None)
    if sizes is None:
        sizes = ctx.kwargs.get("split_size", ctx.kwargs.get("split_sizes"))
    dim = normalize_dim(ctx.arg(2, "dim", 0), x.dim())
    source = ctx.layout(x)[dim]
    if isinstance(sizes, int):
        if source.size % sizes == 0:
            parts = _equal_parts(ctx, source, source.size // sizes, [sizes])
        else:
            n = math.ceil(source.size / sizes)
            parts = _ranges(ctx, source, [sizes] * (n - 1) + [source.size - sizes * (n - 1)])
    elif len(set(sizes)) == 1 and all(isinstance(s, TrackedInt) for s in sizes):
        parts = _equal_parts(ctx, source, len(sizes), sizes)
    else:
        parts = _ranges(ctx, source, sizes)
    _set_parts(ctx, dim, parts)


@rule_for("chunk")
def chunk_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    chunks = ctx.arg(1, "chunks")
    dim = normalize_dim(ctx.arg(2, "dim", 0), x.dim())
    source = ctx.layout(x)[dim]
    count = len(ctx.out)
    if source.size % count == 0 and count == int(chunks):
        sizes = ctx.state.tracked_sizes(x)
        parts = _equal_parts(ctx, source, count, [sizes[dim] // chunks])
    else:
        step = math.ceil(source.size / int(chunks))
        parts = [
            take(source, np.arange(s, min(s + step, source.size)))
            for s in range(0, source.size, step)
        ]
        for part in parts:
            ctx.freeze(part, "uneven chunks")
    _set_parts(ctx, dim, parts)


@rule_for("tensor_split")
def tensor_split_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    dim = normalize_dim(ctx.arg(2, "dim", 0), x.dim())
    source = ctx.layout(x)[dim]
    ctx.freeze(source, "tensor_split")
    sizes = [t.shape[dim] for t in ctx.out]
    _set_parts(ctx, dim, _ranges(ctx, source, sizes))


@rule_for("unbind")
def unbind_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    dim = normalize_dim(ctx.arg(1, "dim", 0), x.dim())
    layout = ctx.layout(x)
    ctx.freeze(layout[dim], "each position selected by unbind")
    for tensor in ctx.out:
        ctx.set_out(tensor, layout[:dim] + layout[dim + 1 :])


# --------------------------------------------------------------------------------- indexing


def _require_index(ctx: OpContext, value: Any, dim: DimLayout) -> None:
    """``value`` is a position: rows before it (or after it, if negative) must keep their count.

    A bound past the end is clamped, and stays clamped as the dim shrinks."""
    reach = abs(int(value))
    if reach > dim.size or (reach == dim.size and is_literal(value)):
        return
    if int(value) >= 0:
        ctx.require_size(value, take(dim, np.arange(0, min(int(value), dim.size))))
    else:
        ctx.require_size(-value, take(dim, np.arange(dim.size + int(value), dim.size)))


def index_layout(
    ctx: OpContext, x: torch.Tensor, index: Any, out_shape: Sequence[int]
) -> TensorLayout:
    """Layout of ``x[index]``: basic indexing, plus tensor/list indices.

    Positions picked by index values cannot follow pruning, so an indexed dim is frozen and the
    dims the index produces are fixed-size (this also works when the values are unknown, on
    ``meta`` tensors).
    """
    items = list(index) if isinstance(index, tuple) else [index]
    layout = ctx.layout(x)
    n_real = sum(1 for it in items if it is not None and it is not Ellipsis)
    if Ellipsis in items:
        at = items.index(Ellipsis)
        items[at : at + 1] = [slice(None)] * (x.dim() - n_real)
    items += [slice(None)] * (x.dim() - sum(1 for it in items if it is not None))
    result: TensorLayout = []
    advanced: list[tuple[int, DimLayout]] = []
    d = 0
    for item in items:
        if item is None:
            result.append(ctx.opaque(1, "an inserted axis"))
            continue
        dim = layout[d]
        d += 1
        if isinstance(item, slice) and _interleaved(item, dim.size):
            result.append(_every_kth(ctx, dim, item))
        elif isinstance(item, slice):
            if item.step is not None and int(item.step) != 1:
                ctx.freeze(dim, "strided slicing")
            for bound in (item.start, item.stop):
                if bound is not None:
                    _require_index(ctx, bound, dim)
            result.append(take(dim, np.arange(dim.size)[item]))
        elif isinstance(item, int):
            position = int(item) % dim.size
            ctx.freeze(take(dim, np.array([position])), "a position selected by index")
            _require_index(ctx, item, dim)
        else:
            ctx.freeze(dim, "positions selected by an index tensor")
            advanced.append((len(result), dim))
    if advanced:
        at = advanced[0][0] if _adjacent([a[0] for a in advanced]) else 0
        sizes = list(out_shape)[at : at + len(out_shape) - len(result)]
        result[at:at] = [ctx.opaque(size, "positions selected by index tensors") for size in sizes]
    return result


def _interleaved(item: slice, size: int) -> bool:
    """``x[..., k::step]`` over a whole dim divisible by ``step`` (interleaved RoPE pairs)."""
    step = item.step
    if step is None or int(step) <= 1 or size % int(step) or item.stop is not None:
        return False
    return item.start is None or 0 <= int(item.start) < int(step)


def _every_kth(ctx: OpContext, dim: DimLayout, item: slice) -> DimLayout:
    """Every ``step``-th position: the dim is ``[size / step, step]`` and one inner offset is
    taken, so the inner factor keeps its count and the outer one may shrink."""
    outer, inner = ctx.split(dim, [dim.size // int(item.step), int(item.step)])
    ctx.freeze(inner, "positions picked by a strided slice")
    return outer


def _adjacent(positions: list[int]) -> bool:
    return all(p == positions[0] for p in positions)


@rule_for("__getitem__")
def getitem_rule(ctx: OpContext) -> None:
    ctx.set_out(ctx.out, index_layout(ctx, ctx.args[0], ctx.args[1], ctx.out.shape))


@rule_for("__setitem__")
def setitem_rule(ctx: OpContext) -> None:
    x, index, value = ctx.args
    target = index_layout(ctx, x, index, x[index].shape)
    if isinstance(value, torch.Tensor) and value.dim() > 0:
        value_layout = ctx.layout(value)
        for a, b in zip(reversed(target), reversed(value_layout)):
            if a.size == b.size:
                ctx.unify(a, b)


@rule_for("narrow")
def narrow_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    dim = normalize_dim(ctx.arg(1, "dim"), x.dim())
    start, length = ctx.arg(2, "start"), ctx.arg(3, "length")
    index = [slice(None)] * dim + [slice(start, start + length)]
    ctx.set_out(ctx.out, index_layout(ctx, x, tuple(index), ctx.out.shape))


@rule_for("select", "index_select")
def select_rule(ctx: OpContext) -> None:
    """``select(dim, i)`` and ``index_select(dim, index)``: indexing along one dim."""
    x = ctx.args[0]
    dim = normalize_dim(ctx.arg(1, "dim"), x.dim())
    index = [slice(None)] * dim + [ctx.arg(2, "index")]
    ctx.set_out(ctx.out, index_layout(ctx, x, tuple(index), ctx.out.shape))


@rule_for("flip", "fliplr", "flipud")
def flip_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    if ctx.name.endswith("fliplr"):
        dims = [1]
    elif ctx.name.endswith("flipud"):
        dims = [0]
    else:
        dims = ctx.arg(1, "dims")
        dims = [dims] if isinstance(dims, int) else list(dims)
    layout = list(ctx.layout(x))
    for d in dims:
        d = normalize_dim(d, x.dim())
        layout[d] = take(layout[d], np.arange(layout[d].size)[::-1])
    ctx.set_out(ctx.out, layout)


@rule_for("roll")
def roll_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    dims = ctx.arg(2, "dims", None)
    layout = list(ctx.layout(x))
    if dims is None:
        for dim in layout:
            ctx.freeze(dim, "roll over a flattened tensor")
        ctx.set_out(ctx.out, [ctx.opaque(s) for s in x.shape])
        return
    shifts = ctx.arg(1, "shifts")
    shifts = [shifts] if isinstance(shifts, int) else list(shifts)
    dims = [dims] if isinstance(dims, int) else list(dims)
    for shift, d in zip(shifts, dims):
        d = normalize_dim(d, x.dim())
        ctx.freeze(layout[d], "roll")
        layout[d] = take(layout[d], np.roll(np.arange(layout[d].size), int(shift)))
    ctx.set_out(ctx.out, layout)


# ------------------------------------------------------------------- broadcasting copies


@rule_for("expand", "broadcast_to")
def expand_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    requested = _shape_args(ctx.args[1:]) if ctx.args[1:] else list(ctx.kwargs.get("size"))
    _expand_to(ctx, x, requested)


@rule_for("expand_as")
def expand_as_rule(ctx: OpContext) -> None:
    _expand_to(ctx, ctx.args[0], ctx.state.tracked_sizes(ctx.args[1]))


def _expand_to(ctx: OpContext, x: torch.Tensor, requested: Sequence[Any]) -> None:
    """Dims kept from ``x`` keep their layout; a broadcast copy sized by a tracked int is a
    fresh dim that follows that size (``mask.expand(b, -1, self.num_heads, n, n)``)."""
    out = ctx.out
    layout = ctx.layout(x)
    offset = out.dim() - x.dim()
    result = []
    for j, size in enumerate(out.shape):
        k = j - offset
        value = requested[j]
        if k >= 0 and x.shape[k] == size:
            dim = layout[k]
        else:
            dim = _sized_dim(
                ctx, value if isinstance(value, TrackedInt) else size, "a broadcast copy"
            )
        if not (isinstance(value, int) and not isinstance(value, TrackedInt) and value == -1):
            ctx.require_size(value, dim)
        result.append(dim)
    ctx.set_out(out, result)


@rule_for("repeat", "tile")
def repeat_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    reps = [int(r) for r in _shape_args(ctx.args[1:])]
    layout = [ctx.opaque(1, "a repeat")] * (len(reps) - x.dim()) + list(ctx.layout(x))
    reps = [1] * (len(layout) - len(reps)) + reps
    out = [
        dim if r == 1 else merge([ctx.opaque(r, "a repeat count"), dim])
        for dim, r in zip(layout, reps)
    ]
    ctx.set_out(ctx.out, out)


@rule_for("repeat_interleave")
def repeat_interleave_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    repeats = ctx.arg(1, "repeats")
    dim = ctx.arg(2, "dim", None)
    if isinstance(repeats, torch.Tensor) or dim is None:
        raise ValueError("tensor repeats or flattening repeat_interleave")
    dim = normalize_dim(dim, x.dim())
    layout = list(ctx.layout(x))
    layout[dim] = merge([layout[dim], ctx.opaque(int(repeats), "a repeat count")])
    ctx.set_out(ctx.out, layout)


# ------------------------------------------------------------------------------- factories


def _sized_dim(ctx: OpContext, size: Any, what: str) -> DimLayout:
    """A new dim: fresh positions that follow a tracked size, or a fixed literal size."""
    if isinstance(size, TrackedInt):
        atoms = ctx.table.new_family(int(size), "fresh", f"{what} in {ctx.where}")
        return DimLayout(atoms[:, None])
    return ctx.opaque(int(size), f"{what} of literal size in {ctx.where}")


def _factory_dims(ctx: OpContext, sizes: Sequence[Any]) -> TensorLayout:
    """Factory dims follow tracked sizes (fresh positions, checked) or are fixed."""
    result = []
    for size in sizes:
        dim = _sized_dim(ctx, size, "a created tensor")
        if isinstance(size, TrackedInt):
            ctx.require_size(size, dim)
        result.append(dim)
    return result


@rule_for("zeros", "ones", "empty", "rand", "randn", "randint", "full")
def factory_rule(ctx: OpContext) -> None:
    if ctx.name.endswith("full"):
        sizes = list(ctx.arg(0, "size"))
        ctx.sizes_used_as_values(ctx.arg(1, "fill_value"))
    elif ctx.name.endswith("randint"):
        sizes = list(
            ctx.args[-1] if isinstance(ctx.args[-1], (tuple, list)) else ctx.kwargs["size"]
        )
    else:
        sizes = _shape_args(ctx.args) if ctx.args else list(ctx.kwargs["size"])
    ctx.set_out(ctx.out, _factory_dims(ctx, sizes))


@rule_for("new_zeros", "new_ones", "new_empty", "new_full")
def new_factory_rule(ctx: OpContext) -> None:
    if ctx.name.endswith("new_full"):
        sizes = list(ctx.arg(1, "size"))
        ctx.sizes_used_as_values(ctx.arg(2, "fill_value"))
    else:
        sizes = _shape_args(ctx.args[1:]) if ctx.args[1:] else list(ctx.kwargs["size"])
    ctx.set_out(ctx.out, _factory_dims(ctx, sizes))


@rule_for(
    "arange", "linspace", "logspace", "tensor", "as_tensor", "eye", "new_tensor", "from_numpy"
)
def constant_factory_rule(ctx: OpContext) -> None:
    out = ctx.out
    if not ctx.name.endswith("arange"):
        ctx.sizes_used_as_values((ctx.args, ctx.kwargs))
    if ctx.name.endswith("arange") and out.dim() == 1:
        args = [a for a in ctx.args if isinstance(a, (int, float))]
        if len(args) == 1:
            ctx.set_out(out, _factory_dims(ctx, [args[0]]))
            return
    ctx.set_out(out, [ctx.opaque(s, f"a constant created by {ctx.where}") for s in out.shape])


@rule_for("meshgrid")
def meshgrid_rule(ctx: OpContext) -> None:
    for tensor in ctx.out:
        ctx.set_out(tensor, [ctx.opaque(s, "a meshgrid") for s in tensor.shape])
