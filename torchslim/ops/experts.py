"""Routed experts (mixture-of-experts layers) traced as one op.

A Hugging Face experts layer (``Qwen3MoeExperts``, ``MixtralExperts``, ... : any module built by
transformers' ``use_experts_implementation``, or written in its convention without it, as
``Step3p7Experts``) keeps every expert in fused 3-D parameters
(``gate_up_proj[E, 2I, H]``, ``down_proj[E, H, I]``) and runs only the experts that
``top_k_index`` names, through data-dependent kernels (``torch._grouped_mm`` over tokens sorted
by expert, or a Python loop over the experts hit). While tracing, the layer's forward is one
call of :func:`routed_experts`, whose rule traces what every expert computes on every token
(the same projections, gate and activation, on a leading expert dim), so the ordinary rules
couple the hidden width and the experts' neurons; and the layer's expert dim is coupled with
the positions ``top_k_index`` was chosen from (the router's rows): removing expert ``e``
removes its slice of every fused tensor and the router row that selects it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn
from torch.overrides import handle_torch_function, has_torch_function

from torchslim.ops.registry import OpContext, register_rule

_FLAGS = ("num_experts", "has_gate", "has_bias", "is_transposed")
#: what a routed-experts layer's forward takes, by name
_ROUTED_ARGUMENTS = ("hidden_states", "top_k_index", "top_k_weights")


@dataclass(frozen=True)
class ExpertsLayout:
    """How a fused experts layer holds its weights: a fused gate (``gate_up_proj``, else
    ``up_proj``), per-expert biases (``<name>_bias``), weights stored ``[experts, in, out]``."""

    has_gate: bool
    has_bias: bool
    is_transposed: bool


def experts_layout(module: nn.Module) -> Optional[ExpertsLayout]:
    """The layout of a fused experts layer in transformers' convention, ``None`` for any other
    module: the flags ``use_experts_implementation`` sets, or, for a layer written without it
    (Step3p7's), the same read from its 3-D weights (a fused ``gate_up_proj`` and
    ``down_proj``, whose shapes say which dim is the hidden width, with biases for both or
    neither) and a forward taking ``hidden_states, top_k_index, top_k_weights``."""
    if all(hasattr(module, flag) for flag in _FLAGS):
        layout = ExpertsLayout(bool(module.has_gate), bool(module.has_bias), module.is_transposed)
        first = getattr(module, "gate_up_proj" if layout.has_gate else "up_proj", None)
        return layout if _three_d(first, getattr(module, "down_proj", None)) else None
    return _inferred_layout(module)


def _three_d(*weights: Any) -> bool:
    return all(isinstance(w, torch.Tensor) and w.dim() == 3 for w in weights)


def _inferred_layout(module: nn.Module) -> Optional[ExpertsLayout]:
    """A gated layer only: without the gate both weights are ``[E, a, b]`` and ``[E, b, a]``
    whichever way they are stored, so which dim is the hidden width cannot be read."""
    if not isinstance(getattr(module, "num_experts", None), int):
        return None  # most modules, at once (this runs for every coupled module)
    first, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    if not (_three_d(first, down) and hasattr(module, "_apply_gate") and _takes_routing(module)):
        return None
    stored = first.shape[2] == down.shape[1] and first.shape[1] == 2 * down.shape[2]
    transposed = first.shape[1] == down.shape[2] and first.shape[2] == 2 * down.shape[1]
    biases = [
        isinstance(getattr(module, f"{n}_bias", None), torch.Tensor)
        for n in ("gate_up_proj", "down_proj")
    ]
    if stored == transposed or biases[0] != biases[1]:  # a layout or biases it cannot read
        return None
    return ExpertsLayout(True, biases[0], transposed)


def _takes_routing(module: nn.Module) -> bool:
    try:
        names = list(inspect.signature(type(module).forward).parameters)[1:4]
    except (TypeError, ValueError):
        return False
    return tuple(names) == _ROUTED_ARGUMENTS


def is_routed_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a fused experts layer (see :func:`experts_layout`)."""
    return experts_layout(module) is not None


def _weight(module: nn.Module, name: str, layout: ExpertsLayout) -> torch.Tensor:
    """Expert weights as ``[experts, out, in]``."""
    weight = getattr(module, name)
    return weight.transpose(1, 2) if layout.is_transposed else weight


def _layout(module: nn.Module) -> ExpertsLayout:
    layout = experts_layout(module)
    if layout is None:
        raise TypeError(f"{type(module).__name__} is not a fused experts layer")
    return layout


def _check_width(module: nn.Module, hidden_states: torch.Tensor) -> None:
    layout = _layout(module)
    first = _weight(module, "gate_up_proj" if layout.has_gate else "up_proj", layout)
    if hidden_states.shape[-1] != first.shape[-1]:
        raise RuntimeError(
            f"routed experts: hidden states of width {hidden_states.shape[-1]}, "
            f"expert weights of input width {first.shape[-1]}"
        )


def routed_experts(
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """The experts layer's own forward, as one call a ``TorchFunctionMode`` sees (on ``meta``
    tensors, a shape-only answer: the real kernels need real routing)."""
    tensors = (hidden_states, top_k_index, top_k_weights)
    if has_torch_function(tensors):
        return handle_torch_function(routed_experts, tensors, module, *tensors)
    if hidden_states.is_meta:
        _check_width(module, hidden_states)
        return torch.empty_like(hidden_states)
    return type(module).forward(module, hidden_states, top_k_index, top_k_weights)


def expert_outputs(
    module: nn.Module, hidden_states: torch.Tensor, experts: Optional[slice] = None
) -> torch.Tensor:
    """What each expert (of ``experts``, all by default) computes on each token,
    ``[experts, tokens, hidden]``: the layer's projections, biases, gate and norm, with the
    expert dim leading. Routing weights are not applied."""

    layout = _layout(module)

    def weight(name: str) -> torch.Tensor:
        return _weight(module, name, layout)[experts or slice(None)]

    def bias(name: str) -> torch.Tensor:
        return getattr(module, f"{name}_bias")[experts or slice(None)].unsqueeze(1)

    first = "gate_up_proj" if layout.has_gate else "up_proj"
    out = torch.matmul(hidden_states, weight(first).transpose(1, 2))
    if layout.has_bias:
        out = out + bias(first)
    out = module._apply_gate(out) if layout.has_gate else module.act_fn(out)
    out = torch.matmul(out, weight("down_proj").transpose(1, 2))
    if layout.has_bias:
        out = out + bias("down_proj")
    if getattr(module, "has_post_expert_norm", False):
        out = module.post_expert_norm(out)
    return out


def routed_experts_rule(ctx: OpContext) -> None:
    """Hidden width and expert neurons as the experts' layers use them; the expert dim
    follows the router's positions that ``top_k_index`` selects, and ``num_experts``."""
    module, hidden_states, top_k_index = ctx.args[:3]
    if hidden_states.dim() != 2:
        raise ValueError("hidden states of rank other than 2")
    every: Any = ctx.retrace(lambda: expert_outputs(module, hidden_states))
    experts, _, width = ctx.layout(every)
    if not ctx.claim_selection(top_k_index, experts):
        ctx.freeze(experts, "experts chosen by indices that were not traced from a topk")
    ctx.require_size(module.num_experts, experts)
    if all(hasattr(module, flag) for flag in _FLAGS):
        down = module.down_proj
        neurons = ctx.state.tracked_sizes(down)[1 if module.is_transposed else 2]
        for size in (ctx.state.tracked_sizes(every)[2], neurons):
            _keep_aligned(ctx, size)
    ctx.set_out(ctx.out, [ctx.layout(hidden_states)[0], width])


def _keep_aligned(ctx: OpContext, size: int) -> None:
    """``torch._grouped_mm``, which transformers' experts layers run by default (and may run
    once reloaded whatever they run now), needs the hidden width and the experts' neurons to
    span multiples of 16 bytes: the traced size's multiple of 8 (bfloat16) or else of 4
    (float32) is kept, so that a pruned layer runs in the dtypes the traced one ran in."""
    multiple = next((m for m in (8, 4) if int(size) % m == 0), None)
    if multiple is not None:
        ctx.keep_true("eq", size % multiple, 0)


register_rule([routed_experts], routed_experts_rule)
