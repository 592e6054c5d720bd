"""Recurrent layers: ``torch.lstm``, ``torch.gru``, ``torch.rnn_tanh``/``rnn_relu`` (what
``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` call, padded or packed) and their one-step cells.

Each layer and direction has ``weight_ih [gates * H, inputs]``, ``weight_hh [gates * H, H_out]``,
optional biases ``[gates * H]`` and, for an LSTM with ``proj_size``, ``weight_hr [P, H]``
(``H_out`` is ``P`` then, else ``H``). Hidden unit ``j`` is row ``j`` of every gate block: the
gate rows split as ``gates x H``, the gate factor is fixed. A unit whose gate rows are zero
stays zero from a zero initial state (every gate's pre-activation is 0: the LSTM's candidate is
``tanh(0) = 0``, the GRU's new state ``tanh(0 + r * 0) = 0``), so pruning it is exact.

All layers and directions of one module share ``hidden_size`` (and ``proj_size``), and the
states ``h_0``/``c_0`` hold every layer's units along one dim: the units of all layers and
directions are one group (unit ``j`` goes from every layer at once). A deeper layer reads the
previous layer's directions concatenated. The module's ``input_size``, ``hidden_size`` and
``proj_size`` follow pruning.
"""

from __future__ import annotations

from typing import Optional

import torch

from torchslim.ops.registry import OpContext, rule_for
from torchslim.spaces.layout import DimLayout, concat

GATES = {"lstm": 4, "gru": 3, "rnn_tanh": 1, "rnn_relu": 1}


def _hidden(ctx: OpContext, rows: DimLayout, gates: int) -> DimLayout:
    """The hidden units of a ``gates * H`` dim (the gate factor is fixed)."""
    if gates == 1:
        return rows
    gate, hidden = ctx.split(rows, [gates, rows.size // gates])
    ctx.freeze(gate, "the gates of a recurrent layer")
    return hidden


def _bind(ctx: OpContext, owner: Optional[torch.nn.Module], name: str, dim: DimLayout) -> None:
    """The module attribute ``name`` counts the positions of ``dim``."""
    if owner is not None and isinstance(getattr(owner, name, None), int):
        ctx.require_size(getattr(owner, name), dim)


def _cell(
    ctx: OpContext,
    gates: int,
    inputs: DimLayout,
    weights: list[torch.Tensor],
    has_bias: bool,
    proj: bool,
) -> tuple[DimLayout, DimLayout]:
    """Couple one layer-direction's tensors; its hidden units and output units."""
    w_ih, w_hh = weights[0], weights[1]
    hidden = _hidden(ctx, ctx.layout(w_ih)[0], gates)
    ctx.unify(_hidden(ctx, ctx.layout(w_hh)[0], gates), hidden)
    ctx.unify(ctx.layout(w_ih)[1], inputs)
    if has_bias:
        for bias in weights[2:4]:
            if bias is not None:
                ctx.unify(_hidden(ctx, ctx.layout(bias)[0], gates), hidden)
    out = hidden
    if proj:
        projection = ctx.layout(weights[-1])
        ctx.unify(projection[1], hidden)
        out = projection[0]
    ctx.unify(ctx.layout(w_hh)[1], out)
    return hidden, out


@rule_for(*GATES)
def recurrent_rule(ctx: OpContext) -> None:
    gates = GATES[ctx.func.__name__]
    lstm = gates == 4
    second = ctx.args[1]
    shift = int(isinstance(second, torch.Tensor) and not second.is_floating_point())  # packed
    x, hx, params, has_bias, layers = ctx.args[0], *ctx.args[1 + shift : 5 + shift]
    bidirectional = ctx.args[7 + shift]
    layers, directions = int(layers), 2 if bidirectional else 1
    states = list(hx) if lstm else [hx]
    per_cell = len(params) // (layers * directions)
    proj = per_cell == 2 + 2 * bool(has_bias) + 1
    owner = ctx.owner(params[0])
    for state in states:
        ctx.freeze(ctx.layout(state)[0], "the layers and directions of a recurrent state")
    h_units = ctx.layout(states[0])[-1]
    c_units = ctx.layout(states[1])[-1] if lstm else h_units
    inputs = ctx.layout(x)[-1]
    _bind(ctx, owner, "input_size", inputs)
    for layer in range(layers):
        outputs = []
        for direction in range(directions):
            first = (layer * directions + direction) * per_cell
            weights = params[first : first + per_cell]
            hidden, out = _cell(ctx, gates, inputs, weights, bool(has_bias), proj)
            ctx.unify(out, h_units)
            ctx.unify(hidden, c_units)
            outputs.append(out)
        inputs = concat(outputs)
    _bind(ctx, owner, "hidden_size", c_units)
    if proj:
        _bind(ctx, owner, "proj_size", h_units)
        if owner is not None:
            ctx.keep_true("lt", owner.proj_size, owner.hidden_size)  # else torch sees no projection
    output, *final = ctx.out
    ctx.set_out(output, list(ctx.layout(x))[:-1] + [inputs])
    for tensor, state in zip(final, states):
        ctx.set_out(tensor, list(ctx.layout(state)))


@rule_for("lstm_cell", "gru_cell", "rnn_tanh_cell", "rnn_relu_cell")
def recurrent_cell_rule(ctx: OpContext) -> None:
    gates = GATES[ctx.func.__name__.removesuffix("_cell")]
    lstm = gates == 4
    x = ctx.args[0]
    states = list(ctx.arg(1, "hx")) if lstm else [ctx.arg(1, "hx")]
    weights = [ctx.arg(i, n, None) for i, n in enumerate(("w_ih", "w_hh", "b_ih", "b_hh"), 2)]
    has_bias = weights[2] is not None
    hidden, out = _cell(ctx, gates, ctx.layout(x)[-1], weights, has_bias, proj=False)
    for state in states:
        ctx.unify(ctx.layout(state)[-1], hidden)
    owner = ctx.owner(weights[0])
    _bind(ctx, owner, "input_size", ctx.layout(x)[-1])
    _bind(ctx, owner, "hidden_size", hidden)
    outputs = list(ctx.out) if isinstance(ctx.out, (tuple, list)) else [ctx.out]
    for tensor in outputs:
        ctx.set_out(tensor, list(ctx.layout(x))[:-1] + [hidden])


@rule_for("_pack_padded_sequence")
def pack_rule(ctx: OpContext) -> None:
    """``[T, B, *features]`` (or batch first) packed into ``[sum of lengths, *features]``."""
    x = ctx.args[0]
    data, batch_sizes = ctx.out
    ctx.set_out(data, [ctx.opaque(data.shape[0], "packed time steps")] + ctx.layout(x)[2:])
    ctx.set_out(batch_sizes, [ctx.opaque(batch_sizes.shape[0], "packed batch sizes")])


@rule_for("_pad_packed_sequence")
def pad_packed_rule(ctx: OpContext) -> None:
    """Packed ``[sum of lengths, *features]`` padded back to ``[T, B, *features]``."""
    data = ctx.args[0]
    padded, lengths = ctx.out
    leading = [ctx.opaque(size, "padded time and batch") for size in padded.shape[:2]]
    ctx.set_out(padded, leading + ctx.layout(data)[1:])
    ctx.set_out(lengths, [ctx.opaque(lengths.shape[0], "sequence lengths")])
