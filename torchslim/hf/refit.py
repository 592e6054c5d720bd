"""Reconstruction of a streamed prune, one decoder layer at a time.

What :func:`~torchslim.pruner.reconstruct.reconstruct` does in memory, for a checkpoint that
does not fit: the same consumers are refit in the same runs (``max_memory``), each on the
inputs the in-memory model gives it (the runs before it already refit), but the calibration
batches go through the model built on ``meta`` a decoder layer at a time, each module's
weights read just before its forward (:mod:`torchslim.hf.onload`). The hidden states between
layers are kept, so each layer runs about twice (recording, then carrying the refit run's
inputs on), not once per run. Refit weights go to files beside the output until they are
written, so memory holds one layer's weights, the statistics of one run and the hidden states.
"""

from __future__ import annotations

import dataclasses
from contextlib import ExitStack, suppress
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from torchslim.capture.modules import forwards_replaced
from torchslim.graph.dependency import Group
from torchslim.hf.onload import Reader, computed_buffers, onloaded
from torchslim.persistence import CheckpointError
from torchslim.pruner.reconstruct import (
    LayerResult,
    Reconstruction,
    ReconstructionReport,
    RefitLayer,
    chunks,
    refit_layers,
    require_inputs,
)
from torchslim.utils.progress import progress

Ref = tuple[str, str]


class RefitStore:
    """Refit tensors, dense-shaped, in files of ``folder`` until the output is written."""

    def __init__(self, folder: Path, forget: Callable[[str, str], None]) -> None:
        """``forget(name, attr)``: drop any copy of the tensor read before it was refit."""
        self.folder, self.forget = folder, forget
        self.files: dict[Ref, Path] = {}

    def put(self, ref: Ref, tensor: torch.Tensor) -> None:
        path = self.folder / f"{len(self.files)}.safetensors"
        save_file({"tensor": tensor.detach().contiguous()}, str(path))
        self.files[ref] = path
        self.forget(*ref)

    def get(self, ref: Ref, rows: slice = slice(None)) -> Optional[torch.Tensor]:
        """The refit tensor ``ref`` (its ``rows``); ``None`` where it was not refit."""
        path = self.files.get(ref)
        if path is None:
            return None
        with safe_open(str(path), "pt") as file:
            if rows == slice(None):
                return file.get_tensor("tensor")
            return file.get_slice("tensor")[rows]


class StreamedReconstruction(Reconstruction):
    """A :class:`Reconstruction` of a model on ``meta`` whose weights ``read`` gives (the
    checkpoint's, as it holds them), run a decoder layer at a time; the refit weights go to
    ``store``, and ``read`` must give them from there once they are in it."""

    def __init__(
        self,
        config: Reconstruction,
        read: Reader,
        store: RefitStore,
        dtype: Optional[torch.dtype] = None,
    ) -> None:
        options = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
        super().__init__(**{**options, "add_bias": False})
        self.read, self.store, self.dtype = read, store, dtype

    def run(
        self,
        model: nn.Module,
        groups: list[Group],
        forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    ) -> ReconstructionReport:
        report = ReconstructionReport()
        layers = refit_layers(model, groups, report)
        if not layers:
            return report
        blocks = decoder_layers(model, [layer.module for layer in layers])
        position = {id(m): k for k, block in enumerate(blocks) for m in block.modules()}
        head = model.get_output_embeddings()
        consumers = {id(layer.module) for layer in layers}
        with ExitStack() as stack:
            for context in (
                computed_buffers(model),
                onloaded(
                    model,
                    self.read,
                    skipped=None if id(head) in consumers else head,
                    dtype=self.dtype,
                ),
                torch.no_grad(),
            ):
                stack.enter_context(context)
            run = _LayerRun(model, blocks, list(self.batches))
            runs = chunks(layers, self.max_memory)
            for chunk in progress(runs, "refitting", unit="layer", size=len):
                first = position.get(id(chunk[0].module), len(blocks))
                last = position.get(id(chunk[-1].module), len(blocks))
                run.advance(first)
                run.record(chunk, last)
                report.tokens = require_inputs(chunk)
                for layer in chunk:
                    report.layers.append(self._solve(layer))
        return report

    def _solve(self, layer: RefitLayer) -> LayerResult:
        """Refit ``layer`` with its real tensors in place, and store what changed."""
        module, name = layer.module, layer.name
        held = dict(module._parameters)
        stored = {}  # the checkpoint's dtypes
        try:
            for attr, tensor in held.items():
                real = None if tensor is None else self.read(name, attr)
                if real is not None:
                    stored[attr] = real.dtype
                    real = real if self.dtype is None else real.to(self.dtype)
                    module._parameters[attr] = nn.Parameter(real, requires_grad=False)
            result = layer.solve(self, add_bias_allowed=False)
            self.store.put((name, "weight"), module.weight.to(stored["weight"]))
            if result.compensated:
                self.store.put((name, "bias"), module.bias.to(stored["bias"]))
        finally:
            module._parameters.clear()
            module._parameters.update(held)
        return result


class _Stop(BaseException):
    """The inputs needed are recorded: the rest of the forward is not needed (a
    ``BaseException``, so that a model's ``except Exception`` does not swallow it)."""


class _LayerRun:
    """The calibration batches' hidden states at the input of one decoder layer, moved on a
    layer at a time."""

    def __init__(self, model: nn.Module, blocks: nn.ModuleList, batches: list[Any]) -> None:
        self.model, self.blocks, self.batches = model, blocks, batches
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

        def first_inputs(_: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.calls.append((args, kwargs))
            raise _Stop

        handle = blocks[0].register_forward_pre_hook(first_inputs, with_kwargs=True)
        try:
            for ids in batches:
                with suppress(_Stop):
                    model(ids, use_cache=False)
        finally:
            handle.remove()
        if len(self.calls) != len(batches):
            raise CheckpointError(
                f"{len(batches)} calibration batches reached the first decoder layer "
                f"{len(self.calls)} times: its inputs cannot be carried a layer at a time"
            )
        self.hidden = [args[0] for args, _ in self.calls]
        self.at = 0  # the layer whose inputs ``hidden`` holds
        self.outputs: list[Any] = []  # what the layer before it returned, as it returned it

    def advance(self, layer: int) -> None:
        """Carry the hidden states to the inputs of ``layer`` (the weights as they are now)."""
        while self.at < min(layer, len(self.blocks)):
            self.hidden, self.outputs = self._through(self.blocks[self.at], self.hidden)
            self.at += 1

    def record(self, chunk: list[RefitLayer], last: int) -> None:
        """Run the layers from here to ``last`` (past the last layer: the modules after
        them) with ``chunk`` recording its inputs; ``hidden`` stays where it is."""
        handles = [layer.module.register_forward_pre_hook(layer.observe) for layer in chunk]
        try:
            hidden, outputs = self.hidden, self.outputs
            for block in self.blocks[self.at : last + 1]:
                hidden, outputs = self._through(block, hidden)
            if last >= len(self.blocks):
                self._after(chunk[-1].module, outputs)
        finally:
            for handle in handles:
                handle.remove()

    def _through(self, block: nn.Module, hidden: list[torch.Tensor]) -> tuple[list, list]:
        outputs = [block(h, *args[1:], **kwargs) for h, (args, kwargs) in zip(hidden, self.calls)]
        return [o[0] if isinstance(o, tuple) else o for o in outputs], outputs

    def _after(self, stop: nn.Module, outputs: list[Any]) -> None:
        """The modules after the decoder layers, on the last layer's ``outputs``, up to the
        input of ``stop``."""

        def halt(*_: Any) -> None:
            raise _Stop

        handle = stop.register_forward_pre_hook(halt)
        try:
            for ids, output in zip(self.batches, outputs):
                same = {block: (lambda *a, o=output, **k: o) for block in self.blocks}
                with forwards_replaced(same), suppress(_Stop):
                    self.model(ids, use_cache=False)
        finally:
            handle.remove()


def decoder_layers(model: nn.Module, consumers: list[nn.Module]) -> nn.ModuleList:
    """The model's list of decoder layers: the ``ModuleList`` of one kind of layer holding the
    most of ``consumers``; refuses a consumer before it (nothing can carry its inputs)."""
    inside = {id(m) for m in consumers}
    best, count = None, 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len({type(c) for c in module}) == 1:
            held = sum(id(m) in inside for block in module for m in block.modules())
            if held > count:
                best, count = module, held
    if best is None:
        raise CheckpointError(
            "reconstruction streams a model a decoder layer at a time, and this model has no "
            "list of decoder layers holding the layers to refit: reconstruct it in memory"
        )
    order = {id(m): k for k, m in enumerate(model.modules())}
    start = order[id(best[0])]
    early = [m for m in consumers if order[id(m)] < start]
    if early:
        names = {id(m): n for n, m in model.named_modules()}
        raise CheckpointError(
            f"{names[id(early[0])]} is refit but comes before the decoder layers, whose inputs "
            "a streamed reconstruction carries: reconstruct it in memory"
        )
    return best
