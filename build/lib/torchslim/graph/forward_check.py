"""Does the pruned model still run the forward it was traced with?

The graph keeps the example inputs and the structure of the dense outputs. The check runs the
pruned model once on them, in eval mode and leaving no trace: on a ``meta`` twin when the dense
model runs there (no FLOPs, no memory; output shapes are then compared too), for real
otherwise (detectors, whose forward reads values and whose output sizes depend on them: ranks
are compared). A forward that raises, or outputs of another structure, is a
:class:`ForwardFailure` naming the exception and the innermost module it was raised in.
"""

from __future__ import annotations

import traceback
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from torchslim.capture.experts import experts_as_ops
from torchslim.capture.modules import call_forward, untouched
from torchslim.capture.shortcuts import meta_shortcuts
from torchslim.capture.twin import MetaTwins, swapped_to_meta, to_meta
from torchslim.graph.collector import collection_paused


@dataclass
class ForwardFailure:
    """Why a pruned model failed its forward check."""

    error: str
    module: str

    def __str__(self) -> str:
        return f"the pruned model's forward fails in {self.module}: {self.error}"


def signature(outputs: Any, shapes: bool = True) -> Any:
    """The structure of a forward's outputs with every tensor replaced by its shape (or, with
    ``shapes=False``, its rank)."""
    if isinstance(outputs, torch.Tensor):
        return ("tensor", tuple(outputs.shape) if shapes else (outputs.dim(),))
    if isinstance(outputs, dict):
        return ("dict", tuple((k, signature(v, shapes)) for k, v in outputs.items()))
    if isinstance(outputs, (list, tuple)):
        return (type(outputs).__name__, tuple(signature(v, shapes) for v in outputs))
    if hasattr(outputs, "__dataclass_fields__"):
        fields = outputs.__dataclass_fields__
        return ("fields", tuple((k, signature(getattr(outputs, k), shapes)) for k in fields))
    return ("value", type(outputs).__name__)


class ForwardCheck:
    """Runs a model on its example inputs and compares the outputs with the dense run's."""

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        forward_fn: Optional[Callable[[nn.Module, Any], Any]],
        dense_outputs: Any,
        on_meta: bool,
    ) -> None:
        self.model = model
        self.example_inputs = example_inputs
        self.forward_fn = forward_fn
        self._dense = {shapes: signature(dense_outputs, shapes) for shapes in (True, False)}
        self.on_meta = on_meta
        self._twins = MetaTwins()

    @property
    def expected(self) -> Any:
        return self._dense[self.on_meta]

    def probed(self) -> ForwardCheck:
        """This check on ``meta`` if the dense model gives the same outputs there, else for
        real."""
        self.on_meta = True
        if self.failure() is not None:
            self.on_meta = False
        return self

    def failure(self) -> Optional[ForwardFailure]:
        """``None`` if the model runs and its outputs have the dense structure and shapes."""
        model, inputs = self.model, self.example_inputs
        if self.on_meta:
            inputs = to_meta(inputs)
        try:
            with (
                collection_paused(),
                untouched(model),
                experts_as_ops(model),
                swapped_to_meta(model, self._twins) if self.on_meta else nullcontext(),
                meta_shortcuts() if self.on_meta else nullcontext(),
            ):
                outputs = call_forward(model, inputs, self.forward_fn)
        except Exception as error:
            return ForwardFailure(f"{type(error).__name__}: {error}", _raised_in(model, error))
        got = signature(outputs, shapes=self.on_meta)
        if got != self.expected:
            return ForwardFailure(
                f"outputs {_describe(got)} instead of {_describe(self.expected)}", "<model>"
            )
        return None


def _raised_in(model: nn.Module, error: BaseException) -> str:
    """The innermost module of ``model`` whose method was running when ``error`` was raised."""
    names = {id(module): name or "<model>" for name, module in model.named_modules()}
    found = "<model>"
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = names[id(owner)]
    return found


def _describe(sig: Any) -> str:
    kind, body = sig
    if kind == "tensor":
        return "x".join(map(str, body)) or "scalar"
    if kind == "value":
        return body
    inner = ", ".join(
        f"{item[0]}: {_describe(item[1])}" if kind in ("dict", "fields") else _describe(item)
        for item in body
    )
    return f"({inner})"
