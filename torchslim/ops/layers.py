"""Ops that carry parameters: convolutions, linear maps, normalisations, embeddings, PReLU."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from torchslim.ops.registry import OpContext, rule_for
from torchslim.spaces.layout import DimLayout, merge


def _unify_vector(ctx: OpContext, vector: Optional[torch.Tensor], dim: DimLayout) -> None:
    _unify_vectors(ctx, [vector], dim)


def _unify_vectors(ctx: OpContext, vectors: list[Optional[torch.Tensor]], dim: DimLayout) -> None:
    """Per-channel vectors (a norm's weight, bias and statistics) indexed by ``dim``: unified
    with one another first, then once with ``dim``, whose expansion (a product of head or
    group factors, say) is then computed once instead of once per vector."""
    layouts = [
        ctx.layout(v)[0] for v in vectors if v is not None and v.dim() == 1 and len(v) == dim.size
    ]
    for a, b in zip(layouts, layouts[1:]):
        ctx.unify(b, a)
    if layouts:
        ctx.unify(layouts[-1], dim)


def _spatial_out(ctx: OpContext, batch: list[DimLayout], channels: DimLayout) -> None:
    out = ctx.out
    n_spatial = out.dim() - len(batch) - 1
    spatial = [ctx.opaque(s, "a spatial dim") for s in out.shape[out.dim() - n_spatial :]]
    ctx.set_out(out, batch + [channels] + spatial)


@rule_for("conv1d", "conv2d", "conv3d")
def conv_rule(ctx: OpContext) -> None:
    x, weight = ctx.arg(0, "input"), ctx.arg(1, "weight")
    bias = ctx.arg(2, "bias", None)
    groups = int(ctx.arg(6, "groups", 1))
    xl, wl = ctx.layout(x), ctx.layout(weight)
    batch = xl[:1] if x.dim() == weight.dim() else []
    channels = xl[len(batch)]
    if groups == 1:
        ctx.unify(wl[1], channels)
    else:
        g_in, per_group_in = ctx.split(channels, [groups, channels.size // groups])
        g_out, _ = ctx.split(wl[0], [groups, wl[0].size // groups])
        ctx.unify(g_in, g_out)
        ctx.unify(wl[1], per_group_in)
        if not isinstance(ctx.owner(weight), nn.modules.conv._ConvNd):
            ctx.freeze(g_out, "literal groups of a functional convolution")
    _unify_vector(ctx, bias, wl[0])
    _spatial_out(ctx, batch, wl[0])


@rule_for("conv_transpose1d", "conv_transpose2d", "conv_transpose3d")
def conv_transpose_rule(ctx: OpContext) -> None:
    x, weight = ctx.arg(0, "input"), ctx.arg(1, "weight")
    bias = ctx.arg(2, "bias", None)
    groups = int(ctx.arg(6, "groups", 1))
    xl, wl = ctx.layout(x), ctx.layout(weight)
    batch = xl[:1] if x.dim() == weight.dim() else []
    channels = xl[len(batch)]
    ctx.unify(wl[0], channels)
    if groups == 1:
        out_channels = wl[1]
    else:
        g_in, _ = ctx.split(channels, [groups, channels.size // groups])
        out_channels = merge([g_in, wl[1]])
        if not isinstance(ctx.owner(weight), nn.modules.conv._ConvNd):
            ctx.freeze(g_in, "literal groups of a functional convolution")
    if bias is not None:
        ctx.unify(ctx.layout(bias)[0], out_channels)
    _spatial_out(ctx, batch, out_channels)


@rule_for("linear")
def linear_rule(ctx: OpContext) -> None:
    x, weight = ctx.arg(0, "input"), ctx.arg(1, "weight")
    bias = ctx.arg(2, "bias", None)
    xl, wl = ctx.layout(x), ctx.layout(weight)
    ctx.unify(wl[-1], xl[-1])
    out_features = wl[0] if weight.dim() == 2 else ctx.opaque(1)
    if bias is not None and bias.dim() == 1:
        ctx.unify(ctx.layout(bias)[0], out_features)
    ctx.set_out(ctx.out, list(xl[:-1]) + ([out_features] if weight.dim() == 2 else []))


def _per_channel_norm(ctx: OpContext, vectors: list[Optional[torch.Tensor]]) -> None:
    x = ctx.args[0]
    xl = ctx.layout(x)
    channels = xl[1] if x.dim() > 1 else xl[0]
    _unify_vectors(ctx, vectors, channels)
    ctx.set_out(ctx.out, list(xl))


@rule_for("batch_norm")
def batch_norm_rule(ctx: OpContext) -> None:
    names = ["running_mean", "running_var", "weight", "bias"]
    _per_channel_norm(ctx, [ctx.arg(i + 1, n, None) for i, n in enumerate(names)])


@rule_for("instance_norm")
def instance_norm_rule(ctx: OpContext) -> None:
    names = ["running_mean", "running_var", "weight", "bias"]
    vectors = [ctx.arg(i + 1, n, None) for i, n in enumerate(names)]
    _per_channel_norm(ctx, vectors)
    module = ctx.running_module()
    if isinstance(module, nn.modules.instancenorm._InstanceNorm) and all(
        v is None for v in vectors
    ):
        # no tensor of its own to prune, so no pruning function sets ``num_features``: it
        # follows the channels as an attribute that counts them
        x = ctx.args[0]
        ctx.require_size(module.num_features, ctx.layout(x)[1 if x.dim() > 1 else 0])


def _trailing_norm(ctx: OpContext, shape_arg: str, weight_index: int, label: str) -> None:
    """LayerNorm / RMSNorm: weights over the trailing dims, statistics mix those channels."""
    x = ctx.args[0]
    xl = list(ctx.layout(x))
    shape = list(ctx.arg(1, shape_arg))
    weight = ctx.arg(weight_index, "weight", None)
    bias = ctx.arg(weight_index + 1, "bias", None) if label == "LayerNorm" else None
    trailing = xl[len(xl) - len(shape) :]
    owner = ctx.owner(weight)
    for size, dim in zip(shape, trailing):
        if owner is None or not hasattr(owner, "normalized_shape"):
            ctx.require_size(size, dim)
        ctx.mixing(dim, f"{label} statistics")
    for vector in (weight, bias):
        if vector is not None:
            for a, b in zip(ctx.layout(vector), trailing[len(trailing) - vector.dim() :]):
                ctx.unify(a, b)
    ctx.set_out(ctx.out, xl)


@rule_for("layer_norm")
def layer_norm_rule(ctx: OpContext) -> None:
    _trailing_norm(ctx, "normalized_shape", 2, "LayerNorm")


@rule_for("rms_norm")
def rms_norm_rule(ctx: OpContext) -> None:
    _trailing_norm(ctx, "normalized_shape", 2, "RMSNorm")


@rule_for("group_norm")
def group_norm_rule(ctx: OpContext) -> None:
    x = ctx.args[0]
    groups = ctx.arg(1, "num_groups")
    xl = list(ctx.layout(x))
    channels = xl[1]
    outer, _ = ctx.split(channels, [int(groups), channels.size // int(groups)])
    ctx.freeze(outer, "the number of GroupNorm groups")
    ctx.mixing(channels, "GroupNorm statistics")
    _unify_vectors(ctx, [ctx.arg(2, "weight", None), ctx.arg(3, "bias", None)], channels)
    ctx.set_out(ctx.out, xl)


@rule_for("embedding")
def embedding_rule(ctx: OpContext) -> None:
    indices, weight = ctx.arg(0, "input"), ctx.arg(1, "weight")
    wl = ctx.layout(weight)
    ctx.freeze(wl[0], "embedding rows are looked up by token id")
    ctx.set_out(ctx.out, list(ctx.layout(indices)) + [wl[1]])


@rule_for("prelu")
def prelu_rule(ctx: OpContext) -> None:
    x, weight = ctx.arg(0, "input"), ctx.arg(1, "weight")
    xl = ctx.layout(x)
    if weight.numel() > 1:
        ctx.unify(ctx.layout(weight)[0], xl[1] if x.dim() > 1 else xl[0])
    ctx.set_out(ctx.out, list(xl))


@rule_for("_weight_norm")
def weight_norm_rule(ctx: OpContext) -> None:
    """``w = g * v / ||v||`` (the norm over every dim but ``dim``; over all of ``v`` for -1):
    ``w`` has ``v``'s positions and ``g`` scales its ``dim``. Pruning inside the norm stays
    exact because ``g`` absorbs the change (see ``pruning.reparametrised``)."""
    v, g = ctx.arg(0, "v"), ctx.arg(1, "g")
    dim = ctx.arg(2, "dim", 0)
    layout = list(ctx.layout(v))
    if dim != -1 and g.dim() == v.dim():
        ctx.unify(ctx.layout(g)[dim], layout[dim])
    ctx.set_out(ctx.out, layout)
