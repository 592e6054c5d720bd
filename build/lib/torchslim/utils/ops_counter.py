"""Counting multiply-accumulates (MACs) and parameters from one forward pass.

MACs are counted per torch call (``F.conv2d``, ``F.linear``, ``matmul``, ``einsum``,
``scaled_dot_product_attention``, ...) with a :class:`TorchFunctionMode`, not per module type, so
grouped and transposed convolutions, attention written with ``@`` and layers nobody registered
are all counted from their real shapes. Element-wise ops, norms and pooling are not MACs and
are left out. Works on ``meta`` tensors, so LLM-sized models can be counted without memory.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any, Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from torchslim.capture.modules import call_forward, watched

MacRule = Callable[[tuple, dict, Any], int]


def _arg(args: tuple, kwargs: dict, position: int, name: str) -> Any:
    return args[position] if len(args) > position else kwargs[name]


def _conv(args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    weight = _arg(args, kwargs, 1, "weight")
    return out.numel() * math.prod(weight.shape[1:])


def _conv_transpose(args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    source, weight = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
    return source.numel() * math.prod(weight.shape[1:])


def _linear(args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    return out.numel() * _arg(args, kwargs, 1, "weight").shape[-1]


def _product_with(position: int, name: str) -> MacRule:
    """Matrix products: every output element sums over the left operand's last dim."""

    def rule(args: tuple, kwargs: dict, out: torch.Tensor) -> int:
        left = _arg(args, kwargs, position, name)
        return out.numel() * (left.shape[-1] if left.dim() else 1)

    return rule


def _addbmm(args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    batch = _arg(args, kwargs, 1, "batch1")
    return out.numel() * batch.shape[0] * batch.shape[-1]


def _bilinear(args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    weight = _arg(args, kwargs, 2, "weight")
    return out.numel() * weight.shape[1] * weight.shape[2]


def _einsum(args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    equation = args[0]
    operands = args[1:]
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    inputs = equation.replace(" ", "").split("->")[0].split(",")
    sizes: dict[str, int] = {}
    for labels, operand in zip(inputs, operands):
        explicit = labels.replace("...", "")
        offset = operand.dim() - len(explicit) if "..." in labels else 0
        start = labels.find("...") if "..." in labels else len(labels)
        for position, label in enumerate(explicit):
            dim = position if position < start else position + offset
            sizes[label] = max(sizes.get(label, 1), operand.shape[dim])
    output_labels = re.sub(r"[^A-Za-z]", "", equation.split("->")[1]) if "->" in equation else ""
    broadcast = out.numel() // max(1, math.prod(sizes.get(label, 1) for label in output_labels))
    return math.prod(sizes.values()) * max(1, broadcast)


def _attention(args: tuple, kwargs: dict, out: torch.Tensor) -> int:
    query, key, value = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
    rows = math.prod(query.shape[:-1])
    return rows * key.shape[-2] * (query.shape[-1] + value.shape[-1])


def _multi_head_attention(args: tuple, kwargs: dict, out: Any) -> int:
    """``F.multi_head_attention_forward``: its inner calls are hidden from a mode, so add them up."""
    query, key, value = args[:3]
    embed = query.shape[-1]
    rows = math.prod(query.shape[:-1])
    keys = math.prod(key.shape[:-1])
    projections = rows * embed * embed * 2 + keys * embed * (key.shape[-1] + value.shape[-1])
    batch = rows // query.shape[0]
    return projections + batch * query.shape[0] * key.shape[0] * embed * 2


def _recurrent(args: tuple, kwargs: dict, out: Any) -> int:
    """``torch.lstm``/``gru``/``rnn_*`` (padded or packed): every weight matrix of every layer
    and direction is applied once per step of every sequence."""
    packed = not args[1].is_floating_point() if isinstance(args[1], torch.Tensor) else False
    params = args[3] if packed else args[2]
    steps = math.prod(out[0].shape[:-1])
    return steps * sum(w.numel() for w in params if w.dim() == 2)


def _recurrent_cell(args: tuple, kwargs: dict, out: Any) -> int:
    h = out[0] if isinstance(out, (tuple, list)) else out
    return math.prod(h.shape[:-1]) * (args[2].numel() + args[3].numel())


MAC_RULES: dict[Any, MacRule] = {
    F.multi_head_attention_forward: _multi_head_attention,
    F.conv1d: _conv,
    F.conv2d: _conv,
    F.conv3d: _conv,
    F.conv_transpose1d: _conv_transpose,
    F.conv_transpose2d: _conv_transpose,
    F.conv_transpose3d: _conv_transpose,
    F.linear: _linear,
    F.bilinear: _bilinear,
    torch.einsum: _einsum,
    F.scaled_dot_product_attention: _attention,
    torch.addbmm: _addbmm,
    torch.Tensor.addbmm: _addbmm,
}
for _name in ("matmul", "mm", "bmm", "__matmul__", "mv", "inner"):
    for _owner in (torch, torch.Tensor):
        if hasattr(_owner, _name):
            MAC_RULES[getattr(_owner, _name)] = _product_with(0, "input")
MAC_RULES[torch.Tensor.__rmatmul__] = _product_with(1, "other")
for _name in ("lstm", "gru", "rnn_tanh", "rnn_relu"):
    MAC_RULES[getattr(torch, _name)] = _recurrent
    MAC_RULES[getattr(torch, f"{_name}_cell")] = _recurrent_cell
for _name in ("addmm", "baddbmm", "addmv"):
    for _owner in (torch, torch.Tensor):
        MAC_RULES[getattr(_owner, _name)] = _product_with(1, "mat1")


class _MacCounter(TorchFunctionMode):
    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.per_module: dict[str, int] = defaultdict(int)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        rule = MAC_RULES.get(func)
        if rule is not None:
            self.per_module[self.stack[-1] if self.stack else ""] += int(rule(args, kwargs, out))
        return out


def count_ops_and_params(
    model: nn.Module,
    example_inputs: Any,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    layer_wise: bool = False,
) -> Union[tuple[int, int], tuple[int, int, dict[nn.Module, int], dict[nn.Module, int]]]:
    """Return ``(macs, params)`` of one forward pass on ``example_inputs``.

    With ``layer_wise=True`` also return two dicts keyed by module, every module of the model
    and the model itself (as torch-pruning): the MACs each module's forward ran, its children
    included, and the parameters it holds, its children's included (a shared parameter once).
    The model's entries are the totals. The forward runs in eval mode without autograd and
    leaves the model as it was (modes, caches, RNG state).
    """
    stack: list[str] = []
    counter = _MacCounter(stack)
    with watched(model, stack), counter:
        call_forward(model, example_inputs, forward_fn)
    params = sum(p.numel() for p in model.parameters())
    macs = sum(counter.per_module.values())
    if not layer_wise:
        return macs, params
    modules = dict(model.named_modules())
    layer_macs: dict[nn.Module, int] = {}
    for name in reversed(list(modules)):  # children before their parents
        module = modules[name]
        children = sum(layer_macs.get(child, 0) for child in module.children())
        layer_macs[module] = counter.per_module.get(name, 0) + children
    layer_macs[model] = macs
    layer_params = {m: sum(p.numel() for p in m.parameters()) for m in modules.values()}
    return macs, params, layer_macs, layer_params


def own_counts(
    model: nn.Module, layer_macs: dict[nn.Module, int], layer_params: dict[nn.Module, int]
) -> list[tuple[str, int, int]]:
    """``(name, MACs, params)`` each module runs and holds itself, its children's left out
    (from :func:`count_ops_and_params` with ``layer_wise=True``), for modules with either."""
    rows = []
    for name, module in model.named_modules():
        children = list(module.children())
        macs = layer_macs.get(module, 0) - sum(layer_macs.get(c, 0) for c in children)
        params = sum(p.numel() for p in module.parameters(recurse=False))
        if macs or params:
            rows.append((name or "<model>", macs, params))
    return rows


def count(n: float) -> str:
    """A count of MACs or parameters as every command prints it: 4 significant digits with
    K, M, G or T (``11.69 M``, ``148.6 M``, ``1.820 G``)."""
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= scale:
            value = n / scale
            digits = 4 - len(str(int(abs(value))))
            return f"{value:.{max(digits, 0)}f} {suffix}"
    return f"{n:g}"
