"""Fused ops traced through an equivalent composition of basic ops.

Some torch functions do a whole layer's work in one call (``F.multi_head_attention_forward``:
projections, heads, attention, output projection). Their rule re-runs a structurally equivalent
composition of basic ops under the recorder, so the ordinary rules derive the channel couplings
(heads, head offsets, the tie between the residual width and the heads) and the attributes the
layer reads (``num_heads``, ``head_dim``, ``embed_dim``); the outputs take the composition's
layouts. The real op's outputs are what the model uses; the composition's values are discarded.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.ops.registry import OpContext, rule_for


def trace_composition(ctx: OpContext, composition: Callable[..., Any], *args: Any) -> None:
    """Run ``composition(*args)`` under the recorder and give the op's outputs its layouts."""
    result = ctx.retrace(lambda: composition(*args))
    outputs = ctx.output_tensors()
    results = [result] if isinstance(result, torch.Tensor) else list(result)
    for real, composed in zip(outputs, results):
        if composed is None or real.shape != composed.shape:
            raise ValueError("the composition does not reproduce the op's output shapes")
        ctx.set_out(real, list(ctx.layout(composed)))


def _attention_module(ctx: OpContext) -> nn.MultiheadAttention:
    module = ctx.running_module()
    if not isinstance(module, nn.MultiheadAttention):
        raise ValueError("F.multi_head_attention_forward called outside nn.MultiheadAttention")
    return module


@rule_for("multi_head_attention_forward")
def multi_head_attention_rule(ctx: OpContext) -> None:
    """``nn.MultiheadAttention``: its heads and head offsets are prunable; because the forward
    derives ``head_dim`` from the input width, the residual width is tied to them."""
    bound = inspect.signature(F.multi_head_attention_forward).bind(*ctx.args, **ctx.kwargs)
    bound.apply_defaults()
    call = bound.arguments
    if call["bias_k"] is not None or call["add_zero_attn"] or call["static_k"] is not None:
        raise ValueError("bias_k/bias_v, add_zero_attn and static keys are not modelled")
    if call["static_v"] is not None:
        raise ValueError("static values are not modelled")
    trace_composition(ctx, _multi_head_attention, _attention_module(ctx), call)


def _multi_head_attention(module: nn.MultiheadAttention, call: dict[str, Any]) -> Any:
    query, key, value = call["query"], call["key"], call["value"]
    if query.dim() == 2:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
    length, batch, width = query.shape
    source = key.shape[0]
    if call["use_separate_proj_weight"]:
        weights = (call["q_proj_weight"], call["k_proj_weight"], call["v_proj_weight"])
    else:
        weights = call["in_proj_weight"].chunk(3)
    bias = call["in_proj_bias"]
    biases = bias.chunk(3) if bias is not None else (None, None, None)
    key.view(source, batch, module.kdim)
    value.view(source, batch, module.vdim)
    q = F.linear(query, weights[0], biases[0]).view(length, batch, call["embed_dim_to_check"])
    k = F.linear(key, weights[1], biases[1])
    v = F.linear(value, weights[2], biases[2])
    heads, head_dim = call["num_heads"], module.head_dim
    q = q.view(length, batch, heads, head_dim).permute(1, 2, 0, 3)
    k = k.view(source, batch, heads, head_dim).permute(1, 2, 0, 3)
    v = v.view(source, batch, heads, head_dim).permute(1, 2, 0, 3)
    attended = F.scaled_dot_product_attention(q, k, v)
    merged = attended.permute(2, 0, 1, 3).reshape(length, batch, width)
    out = F.linear(merged, call["out_proj_weight"], call["out_proj_bias"])
    if call["query"].dim() == 2:
        out = out.squeeze(1)
    weights_out = None
    if call["need_weights"]:
        scores = torch.matmul(q, k.transpose(-1, -2)).softmax(-1)
        weights_out = scores.mean(1) if call["average_attn_weights"] else scores
        if call["query"].dim() == 2:
            weights_out = weights_out.squeeze(0)
    return out, weights_out
