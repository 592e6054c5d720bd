"""Ready-made ``eval_fn`` metrics (higher is better) for searches without labels."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.graph.capture import call_forward, iter_tensors
from torchslim.search.space import EvalFn

AGREEMENTS = ("top1", "cosine")


def output_agreement(reference: nn.Module, inputs: Any, kind: str = "top1") -> EvalFn:
    """How closely a pruned model's outputs follow ``reference``'s on ``inputs``: the fraction
    of equal argmax over the last dim (``top1``) or the mean cosine similarity per sample
    (``cosine``). The reference outputs are computed once, now."""
    if kind not in AGREEMENTS:
        raise ValueError(f"agreement kind must be one of {', '.join(AGREEMENTS)}, got {kind!r}")
    expected = _output(reference, inputs)

    def agreement(model: nn.Module) -> float:
        got = _output(model, inputs)
        if kind == "top1":
            return float((got.argmax(-1) == expected.argmax(-1)).float().mean())
        return float(F.cosine_similarity(got.flatten(1), expected.flatten(1)).mean())

    return agreement


def _output(model: nn.Module, inputs: Any) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        outputs = list(iter_tensors(call_forward(model, inputs, None)))
    if not outputs:
        raise ValueError("the model returned no tensor to compare")
    return outputs[0].float()
