"""Writing a streamed prune's shards: each tensor as soon as the plan for it is final.

:func:`plan_ahead` finds, before the step, what it will do but for which channels go (the same
step with placeholder scores on ``meta``, undone): the output's shapes, so that the shards can
be laid out, and the number of operations each module gets, so that a tensor is known to be
final once its module has them all. :class:`StreamedOutput` then writes each tensor at that
moment, from the copy its last group's scores were read into.
"""

from __future__ import annotations

import math
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from torchslim.graph.checkpoint import trial
from torchslim.graph.record import model_history
from torchslim.hf.replay import CheckpointTensors, Pieces, Ref, label
from torchslim.hf.shards import ShardWriter
from torchslim.persistence import CheckpointError
from torchslim.pruner.meta import MetaPruner
from torchslim.utils.progress import progress

#: tensors bigger than this whose rows the plan keeps are sliced and written a block at a time
PIECE_BYTES = 256 * 2**20


@dataclass
class Ahead:
    """What the step will do, found before it: the pieces each stored tensor is written as
    (saved name, shape, dtype) and the number of operations each module gets."""

    planned: dict[Ref, Pieces]
    operations: Counter[str]
    #: checkpoint bytes of the tensors of the largest group within a layer (holding under a
    #: quarter of the checkpoint, unlike the hidden width, which spans every layer)
    largest_group: int


class StreamedOutput:
    """The pruned checkpoint's shards. With the plan known ahead (:func:`plan_ahead`) each
    tensor is written as soon as its module has all its operations, from the copy kept since
    its last group scored it (:data:`~torchslim.hf.replay.KEEP_BYTES`) instead of reading it
    again; the rest after the step. Should the step end otherwise than planned (a group the
    safety net refused), everything is written again from the final plan."""

    def __init__(
        self, folder: Path, layers: CheckpointTensors, max_bytes: int, ahead: Optional[Ahead]
    ) -> None:
        self.folder, self.layers, self.max_bytes, self.ahead = folder, layers, max_bytes, ahead
        self.written: dict[Ref, list[list[dict[str, Any]]]] = {}  # the operations each saw
        self.writer = None if ahead is None else self._writer(ahead.planned)

    def _writer(self, planned: dict[Ref, Pieces]) -> ShardWriter:
        layout = [piece for pieces in planned.values() for piece in pieces]
        return ShardWriter(self.folder, self.max_bytes, layout)

    def flush(self) -> None:
        """Write every tensor whose plan is final by now."""
        if self.ahead is None or self.writer is None:
            return
        for ref, pieces in self.ahead.planned.items():
            if ref in self.written or not self._final(ref, self.ahead.operations):
                continue
            if self.layers.planned(*ref) != pieces:
                self.ahead = None  # the step departs from the plan: all is written after it
                return
            self._write(ref, self.writer)

    def finish(self, stored: list[Ref]) -> int:
        """Write what is left; the bytes of the output."""
        planned = {ref: self.layers.planned(*ref) for ref in stored}
        if (
            self.writer is None
            or self.ahead is None
            or planned != self.ahead.planned
            or any(ops != self._operations(ref) for ref, ops in self.written.items())
        ):
            if self.writer is not None:
                self.writer.discard()
            for file in self.folder.glob("*.safetensors"):
                file.unlink()
            self.writer, self.written = self._writer(planned), {}
        writer = self.writer
        rest = [ref for ref in stored if ref not in self.written]
        for ref in progress(rest, "writing", unit="B", size=lambda r: _bytes(planned[r])):
            self._write(ref, writer)
        writer.close()
        return writer.bytes_written

    def _modules(self, ref: Ref) -> list[str]:
        """The modules holding tensor ``ref`` (several for a tied one)."""
        return [name for name, _ in self.layers.owners[self.layers.keys[ref]]]

    def _operations(self, ref: Ref) -> list[list[dict[str, Any]]]:
        return [list(self.layers.operations(name)) for name in self._modules(ref)]

    def _final(self, ref: Ref, operations: Counter[str]) -> bool:
        if self.layers.reader.converted(self.layers.keys[ref]):
            return False  # its saved pieces follow the model's config: written after the step
        return all(
            len(self.layers.operations(name)) == operations.get(label(name), 0)
            for name in self._modules(ref)
        )

    def _write(self, ref: Ref, writer: ShardWriter) -> None:
        for saved, piece, start in self.layers.pieces(*ref, PIECE_BYTES):
            writer.add(saved, piece, start)
        self.written[ref] = self._operations(ref)
        self.layers.drop(*ref)


def _placeholder_scores(group: Any) -> torch.Tensor:
    return torch.zeros(group.size, dtype=torch.float64)


def plan_ahead(
    pruner: MetaPruner, layers: CheckpointTensors, ids: torch.Tensor, arguments: dict[str, Any]
) -> Optional[Ahead]:
    """The step's outcome but for which channels go, from the same step with placeholder
    scores on ``meta``, undone: the real step's wherever the number of channels each group
    loses follows from the ratios alone (``None`` with a global ranking or a MAC / parameter
    target, whose output is written after the step). Refuses, before anything is written, a
    pruning that changes computed buffers."""
    if pruner.global_pruning or pruner.target_macs is not None or pruner.target_params is not None:
        return None
    model = pruner.model
    begin = len(model_history(model))
    graph = pruner.DG
    with trial(graph), graph.deferred(notify=False), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        MetaPruner(model, ids, graph=graph, importance=_placeholder_scores, **arguments).step()
        refuse_computed_buffers(layers.dense, model)
        planned = {ref: layers.planned(*ref) for ref in stored_refs(layers)}
        steps = model_history(model)[begin:]
    operations = Counter(op["module"] for step in steps for op in step["ops"])
    total = sum(layers.nbytes(ref) for ref in layers.keys)
    sizes = [0]
    for step in steps:
        modules = {op["module"] for op in step["ops"]}
        size = sum(layers.nbytes(ref) for ref in layers.keys if label(ref[0]) in modules)
        sizes += [size] if size < total / 4 else []
    return Ahead(planned, operations, max(sizes))


def stored_refs(layers: CheckpointTensors) -> list[Ref]:
    """The tensors to write, in order (a tied one once, under the layer it is pruned through)."""
    return [(n, attr) for n, m in layers.dense.named_modules() for attr in layers.stored(n, m)]


def refuse_computed_buffers(dense: nn.Module, pruned: nn.Module) -> None:
    """Buffers the model computes rather than loads (RoPE frequencies) have no values on
    ``meta``: a pruning that changes one cannot be streamed."""
    saved = set(dense.state_dict())
    before = dict(dense.named_buffers())
    changed = [
        name
        for name, buffer in pruned.named_buffers()
        if name not in saved and name in before and buffer.shape != before[name].shape
    ]
    if changed:
        raise CheckpointError(
            f"the pruning changes computed buffers ({', '.join(changed[:3])}): their values "
            "cannot be streamed; prune these channels (head_dim) in memory"
        )


def _bytes(pieces: Pieces) -> int:
    return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in pieces)
