"""The real tensors of a checkpoint as a model pruned on ``meta`` holds them, one at a time.

A tensor is read from its shard (:class:`~torchslim.hf.conversion.ConvertedReader`: names
transformers converts included) and the plan recorded so far on the pruned model is replayed on
a copy of its layer, so it is what the in-memory model would hold at that moment. Recent copies
are kept, up to a byte budget, with the operations replayed on them: the next request for a
tensor replays only the operations since, instead of reading it again.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from torchslim.graph.record import model_history
from torchslim.hf.conversion import ConvertedReader
from torchslim.hf.onload import own_tensors
from torchslim.persistence import CheckpointError, apply_operation
from torchslim.pruning.journal import unjournaled

Ref = tuple[str, str]  # (module name, attribute)
Pieces = list[tuple[str, tuple[int, ...], torch.dtype]]  # (saved name, shape, dtype) of each
#: real tensors kept once read and sliced, newest first, up to this many bytes or the tensors
#: of the largest group within a layer, whichever is more: the next request for one (the next
#: group's scores, or its writing once its plan is final) replays only the operations since,
#: instead of reading it again (an 8B model's MLP is 352 MB, a 70B model's 1.4 GB)
KEEP_BYTES = 512 * 2**20


class CheckpointTensors:
    """The real tensors of a checkpoint, one at a time: read from it, with the plan recorded
    so far on the pruned model replayed on them (what the in-memory model holds by then)."""

    def __init__(self, dense: nn.Module, pruned: nn.Module, reader: ConvertedReader) -> None:
        """``dense``: the model the checkpoint holds (with the plan a checkpoint pruned to
        per-layer widths records, replayed), and ``pruned`` a copy of it that pruning changes;
        the steps of its plan from now on are what is replayed on the checkpoint's tensors."""
        self.dense = dense
        self.pruned = pruned
        self.reader = reader
        self.keys = checkpoint_keys(dense, reader)
        self.owners: dict[str, list[tuple[str, str]]] = {}
        for ref, key in self.keys.items():
            self.owners.setdefault(key, []).append(ref)
        self.ops: dict[str, list[dict[str, Any]]] = {}  # the plan so far, by module
        self.held = list(model_history(pruned))  # steps the checkpoint's tensors already hold
        self.indexed: list[dict[str, Any]] = list(self.held)  # the steps indexed in ``ops``
        #: layer copies whose tensor is real, with the operations replayed on it and its
        #: bytes, newest last, kept for the next request (see :data:`KEEP_BYTES`)
        self.kept: OrderedDict[Ref, tuple[nn.Module, list[dict[str, Any]], int]] = OrderedDict()
        self.keep_bytes = KEEP_BYTES
        #: tensors to read from elsewhere than the checkpoint (refit ones), ``None`` otherwise
        self.replaced: Optional[Callable[[Ref, slice], Optional[torch.Tensor]]] = None

    def keep_at_least(self, size: int) -> None:
        """Keep copies up to ``size`` bytes, if that is more than :data:`KEEP_BYTES`."""
        self.keep_bytes = max(KEEP_BYTES, size)

    def operations(self, name: str) -> list[dict[str, Any]]:
        """The plan's operations on module ``name`` so far (steps indexed as they come; all
        again when an undo has cut the plan back)."""
        history = model_history(self.pruned)
        done = len(self.indexed)
        if done > len(history) or (done and history[done - 1] is not self.indexed[-1]):
            self.ops, self.indexed, done = {}, list(self.held), len(self.held)
        for step in history[done:]:
            for op in step["ops"]:
                self.ops.setdefault(op["module"], []).append(op)
        self.indexed.extend(history[done:])
        return self.ops.get(label(name), [])

    def owner(self, name: str, attr: str) -> tuple[str, str]:
        """The layer a shared (tied) tensor is pruned through: the one the plan names."""
        owners = self.owners[self.keys[(name, attr)]]
        if len(owners) == 1:
            return name, attr
        return next((o for o in owners if self.operations(o[0])), owners[0])

    def tensor(self, name: str, attr: str, rows: slice = slice(None)) -> torch.Tensor:
        """The real tensor ``name.attr`` (its ``rows`` only) as the pruned model holds it now."""
        owner, owner_attr = self.owner(name, attr)
        if rows == slice(None):
            real = self._whole(owner, owner_attr)
        else:
            real = getattr(self.current(owner, [owner_attr], rows), owner_attr)
        expected = getattr(self.pruned.get_submodule(name), attr).shape
        if rows != slice(None):
            expected = (len(range(expected[0])[rows]), *expected[1:])
        if real.shape != expected:
            raise CheckpointError(
                f"{self.keys[(name, attr)]}: {list(real.shape)} after replaying the plan, the "
                f"pruned model holds {list(expected)}"
            )
        return real

    def pieces(
        self, name: str, attr: str, max_bytes: int
    ) -> Iterator[tuple[str, torch.Tensor, int]]:
        """``name.attr`` as planned, as ``(saved name, block, first row)``: in blocks of whole
        rows of about ``max_bytes`` when the plan keeps every row (an embedding pruned in
        width: reading and slicing it whole would hold both copies), in the pieces
        ``save_pretrained`` splits it into (fused experts), else whole."""
        key = self.keys[(name, attr)]
        if self.reader.converted(key):
            for saved, piece in self.reader.saved(
                self.pruned, key, self.tensor(name, attr)
            ).items():
                yield saved, piece, 0
        else:
            for rows in self.row_blocks(name, attr, max_bytes):
                yield key, self.tensor(name, attr, rows), rows.start or 0

    def row_blocks(self, name: str, attr: str, max_bytes: int) -> list[slice]:
        """The rows of ``name.attr`` in blocks of about ``max_bytes``, where it is bigger than
        that and the plan so far keeps all its rows (reading a block never reads the rest);
        one block of everything otherwise."""
        dense = getattr(self.dense.get_submodule(name), attr)
        pruned = getattr(self.pruned.get_submodule(name), attr)
        size = self.nbytes((name, attr))
        if size <= max_bytes or dense.dim() < 2 or pruned.shape[0] != dense.shape[0]:
            return [slice(None)]
        step = max(1, max_bytes * dense.shape[0] // size)
        return [slice(start, start + step) for start in range(0, dense.shape[0], step)]

    def scored_blocks(self, name: str, attr: str, max_bytes: int) -> list[slice]:
        """The rows of ``name.attr`` to score at a time: all of them where the kept copies
        can hold the tensor (the next request reuses it), else :meth:`row_blocks`, so that a
        tensor never kept (an embedding) is never in memory whole (its pages mapped from the
        shard count as the process's memory as long as any of it is referenced)."""
        if self.nbytes((name, attr)) <= self.keep_bytes or self.reader.converted(
            self.keys[(name, attr)]
        ):
            return [slice(None)]
        return self.row_blocks(name, attr, max_bytes)

    def planned(self, name: str, attr: str) -> Pieces:
        """The saved names, pruned shapes and stored dtype of ``name.attr``'s pieces."""
        key = self.keys[(name, attr)]
        meta = getattr(self.pruned.get_submodule(name), attr)
        dtype = self.reader.dtype(key)
        pieces = self.reader.saved(self.pruned, key, meta)
        return [(saved, tuple(piece.shape), dtype) for saved, piece in pieces.items()]

    def read(self, name: str, attr: str, rows: slice = slice(None)) -> Optional[torch.Tensor]:
        """``name.attr`` (its ``rows``) as the checkpoint holds it (or as :attr:`replaced`
        gives it), dense; ``None`` where the checkpoint has no such tensor (one the model
        computes)."""
        replaced = None if self.replaced is None else self.replaced((name, attr), rows)
        if replaced is not None:
            return replaced
        key = self.keys.get((name, attr))
        return None if key is None else self.reader.get(key, rows)

    def current(self, name: str, attrs: list[str], rows: slice = slice(None)) -> nn.Module:
        """A copy of layer ``name`` whose ``attrs`` (their ``rows``) are real and pruned as
        planned so far."""
        layer = self._dense_copy(name, attrs, rows)
        replay(layer, self.operations(name))
        return layer

    def _dense_copy(self, name: str, attrs: list[str], rows: slice = slice(None)) -> nn.Module:
        module = self.dense.get_submodule(name)
        layer = copy.copy(module)
        layer._parameters, layer._buffers = dict(module._parameters), dict(module._buffers)
        for attr in attrs:
            real = self.read(name, attr, rows)
            if attr in layer._parameters:
                layer._parameters[attr] = nn.Parameter(real, requires_grad=False)
            else:
                layer._buffers[attr] = real
        return layer

    def _whole(self, name: str, attr: str) -> torch.Tensor:
        """The real tensor ``name.attr`` as planned so far: a kept copy brought up to date
        (the operations since it was kept replayed on it), else read and replayed."""
        ops = self.operations(name)
        layer, done, _ = self.kept.pop((name, attr), (None, [], 0))
        if layer is None or any(a is not b for a, b in zip(done, ops)) or len(done) > len(ops):
            layer, done = self._dense_copy(name, [attr]), []
        replay(layer, ops[len(done) :])
        tensor = getattr(layer, attr)
        size = tensor.numel() * tensor.element_size()
        if size <= self.keep_bytes:
            self.kept[(name, attr)] = (layer, list(ops), size)
            while sum(entry[2] for entry in self.kept.values()) > self.keep_bytes:
                self.kept.popitem(last=False)
        return tensor

    def nbytes(self, ref: Ref) -> int:
        """Bytes of tensor ``ref`` in the checkpoint."""
        dense = getattr(self.dense.get_submodule(ref[0]), ref[1])
        return dense.numel() * self.reader.dtype(self.keys[ref]).itemsize

    def drop(self, name: str, attr: str) -> None:
        """Forget the kept copy of ``name.attr`` (written: it will not be asked for again)."""
        self.kept.pop(self.owner(name, attr), None)

    def stored(self, name: str, module: nn.Module) -> list[str]:
        """The module's own tensors that the checkpoint holds (a tied tensor under the name
        of the layer it is pruned through)."""
        return [
            attr
            for attr, _ in own_tensors(module)
            if (name, attr) in self.keys and self.owner(name, attr) == (name, attr)
        ]


def label(name: str) -> str:
    """How the plan's operations name module ``name`` (the model itself: ``<model>``)."""
    return name or "<model>"


def replay(layer: nn.Module, ops: list[dict[str, Any]]) -> None:
    """Apply plan operations to a layer copy."""
    with unjournaled():  # a copy: nothing to undo, and a trial must not keep its slices
        for op in ops:
            apply_operation(layer, op)


def checkpoint_keys(model: nn.Module, reader: ConvertedReader) -> dict[tuple[str, str], str]:
    """The name each (module, attribute) tensor is read under (the model's, once
    transformers' conversions apply; tied ones are stored once, under one of their names);
    refuses a checkpoint with tensors the config does not build, or without ones it does."""
    stored = set(reader.sources)
    state = model.state_dict(keep_vars=True)
    unexplained = sorted(stored - set(state))
    if unexplained:
        raise CheckpointError(
            f"tensors the config does not explain: {unexplained[:5]} (a checkpoint of another "
            "architecture, or names no transformers conversion maps)"
        )
    by_tensor: dict[int, str] = {}
    for name, tensor in state.items():
        if name in stored:
            by_tensor.setdefault(id(tensor), name)
    absent = sorted(n for n, t in model.named_parameters() if id(t) not in by_tensor)
    if absent:
        raise CheckpointError(f"the checkpoint lacks tensors the config builds: {absent[:5]}")
    keys = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, tensor in own_tensors(module):
            if id(tensor) in by_tensor:
                keys[(name, attr)] = by_tensor[id(tensor)]
    return keys
