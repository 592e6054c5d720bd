"""Ready-made ``eval_fn`` metrics (higher is better): agreement with the dense model for
searches without labels, and any metric measured after a short fine-tune of each candidate."""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from torchslim.capture.modules import call_forward
from torchslim.search.space import EvalFn
from torchslim.spaces.trace import iter_tensors

AGREEMENTS = ("top1", "cosine")
Batch = tuple[torch.Tensor, torch.Tensor]


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


def after_finetune(eval_fn: EvalFn, finetune: Callable[[nn.Module], None]) -> EvalFn:
    """``eval_fn`` of each candidate after ``finetune`` trained a copy of it (NetAdapt's
    short-term fine-tune). Right after pruning, accuracy mostly tells how much the cut disturbed
    the rest of the network; after a few steps of training it tells more of what the structure
    can still learn, which is what the real fine-tune will exploit. The candidate is not
    touched: searches share its unpruned parameters with the dense model."""

    def metric(model: nn.Module) -> float:
        tuned = copy.deepcopy(model)
        with torch.enable_grad():
            finetune(tuned)
        tuned.eval()
        with torch.no_grad():
            return eval_fn(tuned)

    return metric


def short_finetune(
    batches: Sequence[Batch],
    lr: float = 0.01,
    momentum: float = 0.9,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.cross_entropy,
) -> Callable[[nn.Module], None]:
    """One SGD step per ``(inputs, targets)`` batch, in order, in train mode: every candidate
    gets the same steps, so the metric stays deterministic for a deterministic model."""
    if not batches:
        raise ValueError("short_finetune needs at least one (inputs, targets) batch")

    def finetune(model: nn.Module) -> None:
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
        model.train()
        for inputs, targets in batches:
            optimizer.zero_grad()
            loss(model(inputs), targets).backward()
            optimizer.step()

    return finetune
