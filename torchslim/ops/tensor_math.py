"""Contractions (matmul, einsum, attention), reductions and softmax, and spatial ops (pooling,
interpolation, padding, pixel shuffle, sampling)."""

from __future__ import annotations

import re
from typing import Any, Sequence

import torch

from torchslim.ops.registry import OpContext, normalize_dim, register_rule, rule_for
from torchslim.spaces.layout import DimLayout, TensorLayout, concat, merge

# ----------------------------------------------------------------------------- contractions


def _batch_dims(ctx: OpContext, layouts: Sequence[TensorLayout], shapes: Sequence[Any]) -> list:
    """Broadcast leading (batch) dims of several operands, unifying dims of equal size."""
    ndim = max(len(s) for s in shapes)
    result = []
    for j in range(ndim):
        candidates = []
        size = 1
        for shape in shapes:
            k = j - (ndim - len(shape))
            if k >= 0 and shape[k] != 1:
                size = shape[k]
        for layout, shape in zip(layouts, shapes):
            k = j - (ndim - len(shape))
            if k >= 0 and shape[k] == size:
                candidates.append(layout[k])
        for other in candidates[1:]:
            ctx.unify(candidates[0], other)
        result.append(candidates[0] if candidates else ctx.opaque(size))
    return result


def _matmul(ctx: OpContext, a: torch.Tensor, b: torch.Tensor) -> TensorLayout:
    al, bl = list(ctx.layout(a)), list(ctx.layout(b))
    a_shape, b_shape = list(a.shape), list(b.shape)
    if a.dim() == 1:
        al, a_shape = [ctx.opaque(1)] + al, [1] + a_shape
    if b.dim() == 1:
        bl, b_shape = bl + [ctx.opaque(1)], b_shape + [1]
    ctx.unify(al[-1], bl[-2])
    batch = _batch_dims(ctx, [al[:-2], bl[:-2]], [a_shape[:-2], b_shape[:-2]])
    out = batch + ([al[-2]] if a.dim() > 1 else []) + ([bl[-1]] if b.dim() > 1 else [])
    return out


@rule_for("matmul", "__matmul__", "mm", "bmm", "mv", "dot", "vdot", "inner")
def matmul_rule(ctx: OpContext) -> None:
    ctx.set_out(ctx.out, _matmul(ctx, ctx.arg(0, "input"), ctx.arg(1, "other")))


@rule_for("__rmatmul__")
def rmatmul_rule(ctx: OpContext) -> None:
    ctx.set_out(ctx.out, _matmul(ctx, ctx.args[1], ctx.args[0]))


@rule_for("addmm", "baddbmm", "addmv", "addbmm")
def addmm_rule(ctx: OpContext) -> None:
    bias, a, b = ctx.arg(0, "input"), ctx.arg(1, "mat1"), ctx.arg(2, "mat2")
    layout = _matmul(ctx, a, b)
    if ctx.name.endswith("addbmm"):
        raise ValueError("addbmm reduces the batch")
    offset = len(layout) - bias.dim()
    for k, dim in enumerate(ctx.layout(bias)):
        if bias.shape[k] == layout[offset + k].size:
            ctx.unify(dim, layout[offset + k])
    ctx.set_out(ctx.out, layout)


@rule_for("einsum")
def einsum_rule(ctx: OpContext) -> None:
    equation = ctx.args[0].replace(" ", "")
    operands = ctx.args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    if "..." in equation:
        raise ValueError("einsum with ellipsis")
    inputs, _, output = equation.partition("->")
    terms = inputs.split(",")
    if not output and "->" not in equation:
        letters = re.sub(r"[^a-zA-Z]", "", inputs)
        output = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    seen: dict[str, DimLayout] = {}
    for term, tensor in zip(terms, operands):
        for letter, dim in zip(term, ctx.layout(tensor)):
            if letter in seen and seen[letter].size == dim.size:
                ctx.unify(seen[letter], dim)
            elif letter not in seen or seen[letter].size == 1:
                seen[letter] = dim
    ctx.set_out(ctx.out, [seen[c] for c in output])


@rule_for("scaled_dot_product_attention")
def sdpa_rule(ctx: OpContext) -> None:
    q, k, v = ctx.args[:3]
    ql, kl, vl = ctx.layout(q), ctx.layout(k), ctx.layout(v)
    ctx.unify(ql[-1], kl[-1])
    ctx.unify(kl[-2], vl[-2])
    if ctx.arg(6, "scale", None) is None:
        ctx.mixing(ql[-1], "the default attention scale depends on the head size")
    q_batch, k_batch, v_batch = ql[:-2], kl[:-2], vl[:-2]
    if ctx.kwargs.get("enable_gqa") and q.shape[-3] != k.shape[-3]:
        heads, groups = k.shape[-3], q.shape[-3] // k.shape[-3]
        kv_part, _ = ctx.split(q_batch[-1], [heads, groups])
        ctx.unify(kv_part, k_batch[-1])
        ctx.unify(kv_part, v_batch[-1])
        shapes = [t.shape[:-3] for t in (q, k, v)]
        lead = _batch_dims(ctx, [q_batch[:-1], k_batch[:-1], v_batch[:-1]], shapes)
        batch = lead + [q_batch[-1]]
    else:
        shapes = [t.shape[:-2] for t in (q, k, v)]
        batch = _batch_dims(ctx, [q_batch, k_batch, v_batch], shapes)
    mask = ctx.arg(3, "attn_mask", None)
    if isinstance(mask, torch.Tensor) and mask.dim() > 0:
        target = batch + [ql[-2], kl[-2]]
        for a, b in zip(reversed(target), reversed(ctx.layout(mask))):
            if a.size == b.size:
                ctx.unify(a, b)
    ctx.set_out(ctx.out, batch + [ql[-2], vl[-1]])


# -------------------------------------------------------------------------------- reductions


def _reduced_dims(ctx: OpContext, ndim: int) -> list[int]:
    dims = ctx.arg(1, "dim", None)
    if dims is None and "axis" in ctx.kwargs:
        dims = ctx.kwargs["axis"]
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, int):
        return [normalize_dim(dims, ndim)]
    return [normalize_dim(d, ndim) for d in dims]


def reduction_rule(ctx: OpContext) -> None:
    """sum/mean/max/...: reduced dims vanish (or stay as size 1); their channels are mixed."""
    x = ctx.args[0]
    if len(ctx.args) > 1 and isinstance(ctx.args[1], torch.Tensor):
        raise ValueError("binary form of a reduction")
    layout = ctx.layout(x)
    dims = _reduced_dims(ctx, x.dim())
    keep = bool(ctx.arg(2, "keepdim", False))
    for d in dims:
        ctx.mixing(layout[d], "a reduction")
    out = []
    for d, dim in enumerate(layout):
        if d not in dims:
            out.append(dim)
        elif keep:
            out.append(ctx.opaque(1, "a reduced dim"))
    for tensor in ctx.output_tensors():
        ctx.set_out(
            tensor, out if tensor.dim() == len(out) else [ctx.opaque(s) for s in tensor.shape]
        )


register_rule(
    [
        f
        for name in [
            "sum",
            "mean",
            "amax",
            "amin",
            "max",
            "min",
            "prod",
            "std",
            "var",
            "norm",
            "logsumexp",
            "argmax",
            "argmin",
            "all",
            "any",
            "count_nonzero",
            "median",
            "nanmean",
            "nansum",
            "var_mean",
            "std_mean",
        ]
        for f in [getattr(torch, name, None), getattr(torch.Tensor, name, None)]
        if f is not None
    ],
    reduction_rule,
)


@rule_for("softmax", "log_softmax", "softmin", "cumsum", "cumprod", "normalize", "logcumsumexp")
def along_dim_rule(ctx: OpContext) -> None:
    """Ops that mix positions along one dim but keep every shape."""
    x = ctx.args[0]
    layout = ctx.layout(x)
    default = 1 if ctx.name.endswith("normalize") else None
    dim = ctx.arg(2 if ctx.name.endswith("normalize") else 1, "dim", default)
    if dim is None:
        raise ValueError("implicit dim")
    ctx.mixing(layout[normalize_dim(dim, x.dim())], ctx.name)
    ctx.set_out(ctx.out, list(layout))


@rule_for("topk", "sort", "argsort", "kthvalue")
def selection_rule(ctx: OpContext) -> None:
    """The chosen positions depend on the values: the dim is frozen unless only ops that
    follow the positions read the indices (a routed-experts layer, see ``ops.experts``, or a
    ``gather``); ``topk`` also needs ``k`` positions to remain."""
    x = ctx.args[0]
    layout = list(ctx.layout(x))
    dim = ctx.kwargs.get("dim", -1)
    if ctx.name.endswith("topk") and len(ctx.args) > 2:
        dim = ctx.args[2]
    elif not ctx.name.endswith("topk") and len(ctx.args) > 1 and isinstance(ctx.args[1], int):
        dim = ctx.args[1]
    dim = normalize_dim(dim, x.dim())
    outputs = ctx.output_tensors()
    indices = [t for t in outputs if t.dtype == torch.long]
    if len(indices) != 1:
        ctx.freeze(layout[dim], "positions chosen by value")
    else:
        ctx.state.select_by_value(indices[0], layout[dim], ctx.where)
    if ctx.name.endswith("topk"):
        ctx.keep_true("le", ctx.arg(1, "k"), ctx.state.tracked_sizes(x)[dim])
    for tensor in outputs:
        out = list(layout)
        out[dim] = ctx.opaque(tensor.shape[dim], "positions chosen by value")
        ctx.set_out(tensor, out)


@rule_for("gather")
def gather_rule(ctx: OpContext) -> None:
    """``x.gather(dim, index)``: the values at the positions ``index`` names along ``dim``.
    Indices a ``topk`` chose from positions coupled with ``x``'s dim (a router's top-k weights
    read back from its scores) follow them, as the experts layer routed by them does: a
    removed position is never chosen. Other indices freeze ``x``'s dim. The other dims pair
    with ``index``'s where their sizes agree."""
    x, index = ctx.args[0], ctx.arg(2, "index")
    dim = normalize_dim(ctx.arg(1, "dim"), x.dim())
    layout = list(ctx.layout(x))
    if not ctx.claim_selection(index, layout[dim]):
        ctx.freeze(layout[dim], "positions read by gather")
    out = list(ctx.layout(index))
    for d in range(x.dim()):
        if d == dim:
            out[d] = ctx.opaque(index.shape[d], "positions chosen by value")
        elif x.shape[d] == index.shape[d]:
            ctx.unify(layout[d], out[d])
        else:
            ctx.freeze(layout[d], "a dim gather reads in part")
            ctx.freeze(out[d], "a dim gather reads in part")
    ctx.set_out(ctx.out, out)


# ---------------------------------------------------------------------------------- spatial


def _keep_leading(ctx: OpContext, n_leading: int) -> None:
    """Channels (and batch) keep their positions; every later (spatial) dim is recomputed."""
    x = ctx.args[0]
    layout = ctx.layout(x)
    for tensor in ctx.output_tensors():
        lead = list(layout[: tensor.dim() - (x.dim() - n_leading)])
        spatial = [ctx.opaque(s, "a spatial dim") for s in tensor.shape[len(lead) :]]
        ctx.set_out(tensor, lead + spatial)


def pooling_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    rank = int(re.search(r"(\d)d", ctx.name).group(1))
    _keep_leading(ctx, x.dim() - rank)


register_rule(
    [
        getattr(torch.nn.functional, f"{kind}{n}d")
        for kind in (
            "max_pool",
            "avg_pool",
            "adaptive_avg_pool",
            "adaptive_max_pool",
            "lp_pool",
            "fractional_max_pool",
            "max_pool",
        )
        for n in (1, 2, 3)
        if hasattr(torch.nn.functional, f"{kind}{n}d")
    ]
    + [
        getattr(torch, f"{kind}{n}d")
        for kind in ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool")
        for n in (1, 2, 3)
        if hasattr(torch, f"{kind}{n}d")
    ]
    + [
        getattr(torch.nn.functional, f"{kind}_with_indices")
        for kind in ("max_pool1d", "max_pool2d", "max_pool3d")
        if hasattr(torch.nn.functional, f"{kind}_with_indices")
    ],
    pooling_rule,
)


@rule_for("interpolate", "upsample", "upsample_nearest", "upsample_bilinear")
def interpolate_rule(ctx: OpContext) -> None:
    _keep_leading(ctx, 2)


@rule_for("grid_sample")
def grid_sample_rule(ctx: OpContext) -> None:
    x, grid = ctx.args[0], ctx.args[1]
    ctx.unify(ctx.layout(x)[0], ctx.layout(grid)[0])
    _keep_leading(ctx, 2)


@rule_for("pad")
def pad_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    pads = [int(p) for p in ctx.arg(1, "pad")]
    mode = ctx.arg(2, "mode", "constant")
    layout = list(ctx.layout(x))
    for i in range(len(pads) // 2):
        d = x.dim() - 1 - i
        before, after = pads[2 * i], pads[2 * i + 1]
        if before == 0 and after == 0:
            continue
        if mode != "constant" or before < 0 or after < 0:
            ctx.freeze(layout[d], f"{mode} padding")
            layout[d] = ctx.opaque(ctx.out.shape[d], "a padded dim")
            continue
        layout[d] = concat([ctx.opaque(before), layout[d], ctx.opaque(after)])
    ctx.set_out(ctx.out, layout)


@rule_for("pixel_shuffle")
def pixel_shuffle_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    r = int(ctx.arg(1, "upscale_factor"))
    layout = list(ctx.layout(x))
    c = x.dim() - 3
    channels, sub_h, sub_w = ctx.split(layout[c], [layout[c].size // (r * r), r, r])
    ctx.freeze(sub_h, "pixel_shuffle sub-pixel positions")
    ctx.freeze(sub_w, "pixel_shuffle sub-pixel positions")
    out = layout[:c] + [channels] + [ctx.opaque(s, "a spatial dim") for s in ctx.out.shape[c + 1 :]]
    ctx.set_out(ctx.out, out)


@rule_for("pixel_unshuffle")
def pixel_unshuffle_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    r = int(ctx.arg(1, "downscale_factor"))
    layout = list(ctx.layout(x))
    c = x.dim() - 3
    channels = merge([layout[c], ctx.opaque(r, "a sub-pixel"), ctx.opaque(r, "a sub-pixel")])
    out = layout[:c] + [channels] + [ctx.opaque(s, "a spatial dim") for s in ctx.out.shape[c + 1 :]]
    ctx.set_out(ctx.out, out)


@rule_for("channel_shuffle", "native_channel_shuffle")
def channel_shuffle_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    groups = int(ctx.arg(1, "groups"))
    layout = list(ctx.layout(x))
    outer, inner = ctx.split(layout[1], [groups, layout[1].size // groups])
    ctx.freeze(outer, "channel_shuffle groups")
    layout[1] = merge([inner, outer])
    ctx.set_out(ctx.out, layout)


@rule_for("unfold")
def unfold_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    if ctx.name != "F.unfold":
        raise ValueError("Tensor.unfold")
    layout = ctx.layout(x)
    out = ctx.out
    per_channel = out.shape[1] // x.shape[1]
    channels = merge([layout[1], ctx.opaque(per_channel, "a kernel offset")])
    ctx.set_out(out, [layout[0], channels, ctx.opaque(out.shape[2], "a patch index")])


@rule_for("glu")
def glu_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    dim = normalize_dim(ctx.arg(1, "dim", -1), x.dim())
    layout = list(ctx.layout(x))
    outer, inner = ctx.split(layout[dim], [2, layout[dim].size // 2])
    ctx.freeze(outer, "the two halves of glu")
    layout[dim] = inner
    ctx.set_out(ctx.out, layout)


def roi_align_rule(ctx: OpContext) -> None:
    """torchvision's RoI pooling: one output per box, channels kept."""
    x = ctx.args[0]
    out = ctx.out[0] if isinstance(ctx.out, tuple) else ctx.out
    channels = ctx.layout(x)[1]
    spatial = [ctx.opaque(s, "a pooled spatial dim") for s in out.shape[2:]]
    for tensor in ctx.output_tensors():
        ctx.set_out(tensor, [ctx.opaque(out.shape[0], "one row per box"), channels, *spatial])


register_rule(["torchvision::roi_align", "torchvision::roi_pool"], roi_align_rule)
