"""Pruning a Hugging Face checkpoint without holding it in memory, one tensor at a time.

:func:`prune_checkpoint` builds the model from ``config.json`` on ``meta`` (no memory), traces
it and lets :class:`~torchslim.pruner.MetaPruner` choose and prune there. Calibrated criteria
(Wanda) first record their statistics in a forward that holds one module's weights at a time
(:mod:`torchslim.hf.onload`). Each tensor a group scores is read from its shard when it is
scored, with the plan recorded so far replayed on it, so the choice is the one made in memory;
then every tensor is read once more, sliced as the plan says and written into shards planned
from the pruned shapes (tensors transformers converts, such as experts saved one by one, go
through its converters: :mod:`torchslim.hf.conversion`). Peak memory is about one tensor and
its sliced copy (a fused experts tensor: its saved pieces too), or a block of rows of an
embedding. The output is a ``save_pretrained``
folder: the config follows the pruning (or records the plan when widths differ per layer:
``tp.hf.from_pretrained`` loads it); tokenizer and generation files are copied; it is written
to a temporary folder and moved into place, so an interrupted run leaves no half-written
output.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from torchslim.graph.kinds import KINDS
from torchslim.graph.record import model_history
from torchslim.hf.checkpoint import model_class_of
from torchslim.hf.conversion import ConvertedReader
from torchslim.hf.onload import computed_buffers, onloaded, own_tensors
from torchslim.hf.shards import ShardReader, ShardWriter
from torchslim.hf.sync import RECORD_KEY
from torchslim.importance.criteria import MagnitudeImportance, WandaImportance
from torchslim.persistence import CheckpointError, apply_operation, atomic_folder
from torchslim.pruner.meta import MetaPruner
from torchslim.pruning.journal import unjournaled
from torchslim.spaces.analysis import ParamDim
from torchslim.utils.progress import meter, progress

COPIED = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*", "merges.txt")
COPIED += ("chat_template.*", "generation_config.json")
PathLike = Union[str, Path]
#: tensors bigger than this whose rows the plan keeps are sliced and written a block at a time
PIECE_BYTES = 256 * 2**20


@dataclass
class StreamReport:
    """What :func:`prune_checkpoint` did: parameters before and after, bytes read and written,
    seconds, and whether a plain config describes the result."""

    params_before: int
    params_after: int
    bytes_read: int
    bytes_written: int
    seconds: float
    plain_config: bool
    #: config fields the pruning changed: ``{"intermediate_size": (14336, 11469)}``
    changed: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def __str__(self) -> str:
        return (
            f"params {self.params_before:,} -> {self.params_after:,}; read "
            f"{self.bytes_read / 1e9:.2f} GB, wrote {self.bytes_written / 1e9:.2f} GB in "
            f"{self.seconds:.1f} s; "
            + ("plain config" if self.plain_config else "per-layer plan (tp.hf.from_pretrained)")
        )


class _Layers:
    """Real tensors of one layer at a time: read from the checkpoint, with the plan recorded
    so far on the pruned model replayed on them (what the in-memory model holds by then)."""

    def __init__(self, dense: nn.Module, pruned: nn.Module, reader: ConvertedReader) -> None:
        self.dense = dense
        self.pruned = pruned
        self.reader = reader
        self.keys = _checkpoint_keys(dense, reader)
        self.owners: dict[str, list[tuple[str, str]]] = {}
        for ref, key in self.keys.items():
            self.owners.setdefault(key, []).append(ref)
        self.ops: dict[str, list[dict[str, Any]]] = {}  # the plan so far, by module
        self.steps_indexed = 0

    def _operations(self, label: str) -> list[dict[str, Any]]:
        """The plan's operations on module ``label`` so far (steps indexed as they come)."""
        history = model_history(self.pruned)
        for step in history[self.steps_indexed :]:
            for op in step["ops"]:
                self.ops.setdefault(op["module"], []).append(op)
        self.steps_indexed = len(history)
        return self.ops.get(label, [])

    def owner(self, name: str, attr: str) -> tuple[str, str]:
        """The layer a shared (tied) tensor is pruned through: the one the plan names."""
        owners = self.owners[self.keys[(name, attr)]]
        if len(owners) == 1:
            return name, attr
        return next((o for o in owners if self._operations(o[0] or "<model>")), owners[0])

    def tensor(self, name: str, attr: str, rows: slice = slice(None)) -> torch.Tensor:
        """The real tensor ``name.attr`` (its ``rows`` only) as the pruned model holds it now."""
        owner, owner_attr = self.owner(name, attr)
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
        dense = getattr(self.dense.get_submodule(name), attr)
        pruned = getattr(self.pruned.get_submodule(name), attr)
        size = dense.numel() * self.reader.dtype(key).itemsize
        whole = size <= max_bytes or dense.dim() < 2
        if self.reader.converted(key):
            for saved, piece in self.reader.saved(
                self.pruned, key, self.tensor(name, attr)
            ).items():
                yield saved, piece, 0
        elif whole or pruned.shape[0] != dense.shape[0]:
            yield key, self.tensor(name, attr), 0
        else:
            step = max(1, max_bytes * dense.shape[0] // size)
            for start in range(0, dense.shape[0], step):
                yield key, self.tensor(name, attr, slice(start, start + step)), start

    def planned(self, name: str, attr: str) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
        """The saved names, pruned shapes and stored dtype of ``name.attr``'s pieces."""
        key = self.keys[(name, attr)]
        meta = getattr(self.pruned.get_submodule(name), attr)
        dtype = self.reader.dtype(key)
        pieces = self.reader.saved(self.pruned, key, meta)
        return [(saved, tuple(piece.shape), dtype) for saved, piece in pieces.items()]

    def read(self, name: str, attr: str, rows: slice = slice(None)) -> Optional[torch.Tensor]:
        """``name.attr`` (its ``rows``) as the checkpoint holds it, dense; ``None`` where the
        checkpoint has no such tensor (one the model computes)."""
        key = self.keys.get((name, attr))
        return None if key is None else self.reader.get(key, rows)

    def current(self, name: str, attrs: list[str], rows: slice = slice(None)) -> nn.Module:
        """A copy of layer ``name`` whose ``attrs`` (their ``rows``) are real and pruned as
        planned so far."""
        module = self.dense.get_submodule(name)
        layer = copy.copy(module)
        layer._parameters, layer._buffers = dict(module._parameters), dict(module._buffers)
        for attr in attrs:
            real = self.read(name, attr, rows)
            if attr in layer._parameters:
                layer._parameters[attr] = nn.Parameter(real, requires_grad=False)
            else:
                layer._buffers[attr] = real
        with unjournaled():  # a copy: nothing to undo, and a trial must not keep its slices
            for op in self._operations(name or "<model>"):
                apply_operation(layer, op)
        return layer

    def stored(self, name: str, module: nn.Module) -> list[str]:
        """The module's own tensors that the checkpoint holds (a tied tensor under the name
        of the layer it is pruned through)."""
        return [
            attr
            for attr, _ in own_tensors(module)
            if (name, attr) in self.keys and self.owner(name, attr) == (name, attr)
        ]


class _Streamed:
    """A criterion on a model on ``meta`` whose scored tensors are read from the checkpoint as
    the model holds them at that moment (see :class:`_Layers`)."""

    layers: _Layers

    def position_scores(self, member: ParamDim, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        name, attr = member.ref.module_name, member.ref.name
        if (name, attr) not in self.layers.keys:
            return None
        return super().position_scores(member, self.layers.tensor(name, attr))  # type: ignore[misc]


class _StreamedMagnitude(_Streamed, MagnitudeImportance):
    pass


class _StreamedWanda(_Streamed, WandaImportance):
    pass


#: the criteria ``prune_checkpoint`` streams, by name (calibrated ones record first)
STREAMED: dict[str, type] = {"magnitude": _StreamedMagnitude, "wanda": _StreamedWanda}


def _record(model: nn.Module, layers: _Layers, criterion: Any, batches: list[torch.Tensor]) -> None:
    """Record a calibrated criterion on the dense model, one module's weights in memory at a
    time: what recording in memory records, for a checkpoint that does not fit."""
    head = model.get_output_embeddings()
    with ExitStack() as stack:
        for context in (
            computed_buffers(model),
            onloaded(model, layers.read, skipped=head),
            criterion.record(model),
            torch.no_grad(),
        ):
            stack.enter_context(context)
        for ids in batches:
            model(ids, use_cache=False)


def prune_checkpoint(
    src: PathLike,
    dst: PathLike,
    recipe: Mapping[str, Any],
    *,
    importance: str = "magnitude",
    calibration: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]] = None,
    p: int = 2,
    model_class: Optional[type] = None,
    max_shard_bytes: int = 5 * 10**9,
    example_length: int = 16,
    trust_pickle: bool = False,
) -> StreamReport:
    """Prune the checkpoint folder ``src`` into ``dst`` by ``recipe`` without loading it.

    ``recipe``: keyword arguments of :class:`~torchslim.pruner.MetaPruner`
    (``pruning_ratio_dict``, ``pruning_ratio``, ``global_pruning``, ``round_to``, ...), or
    kinds and ratios alone (``{"neurons": 0.2}``). ``importance``: ``"magnitude"`` ranks
    channels by the L``p`` norm of their coupled slices, as ``MagnitudeImportance(p)`` does in
    memory; ``"wanda"`` as ``WandaImportance`` recorded on ``calibration`` (token ids
    ``[sequences, length]``, or a list of such batches), which runs through the model one
    module's weights at a time first. ``model_class`` defaults to the class
    ``config.architectures`` names. ``trust_pickle`` lets pickle (``.bin``) shards be read
    (mapped by ``torch.load(weights_only=True, mmap=True)``); the output is safetensors."""
    import transformers

    start = time.time()
    src, dst = Path(src), Path(dst)
    batches = _calibration_batches(importance, calibration)
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} has no config.json")
    reader = ShardReader(src, trust_pickle=trust_pickle)
    config = transformers.AutoConfig.from_pretrained(src)
    model_class = model_class or model_class_of(config)
    with torch.device("meta"):
        model = model_class(copy.deepcopy(config)).eval()
        dense = model_class(copy.deepcopy(config)).eval()
    layers = _Layers(dense, model, ConvertedReader(reader, dense))
    criterion = STREAMED[importance](**({"p": p} if importance == "magnitude" else {}))
    criterion.layers = layers
    if batches:
        with meter("calibrating (read)") as reader.observer:
            _record(model, layers, criterion, batches)
    ids = torch.zeros(1, example_length, dtype=torch.long, device="meta")
    with warnings.catch_warnings(), meter("scoring (read)") as reader.observer:
        warnings.filterwarnings("ignore", ".* ranks .* without calibration data")
        pruner = MetaPruner(model, ids, importance=criterion, **_pruner_arguments(recipe))
        params_before = _count(model)
        pruner.step()
    _refuse_computed_buffers(dense, model)
    plain = not hasattr(model.config, RECORD_KEY)

    def write(folder: Path) -> None:
        stored = [
            (name, attr) for name, m in dense.named_modules() for attr in layers.stored(name, m)
        ]
        reader.observer = lambda _: None  # the writing bar counts from here
        planned = {ref: layers.planned(*ref) for ref in stored}
        layout = [piece for pieces in planned.values() for piece in pieces]
        writer = ShardWriter(folder, max_shard_bytes, layout)
        for name, attr in progress(stored, "writing", unit="B", size=lambda r: _bytes(planned[r])):
            for saved, piece, start in layers.pieces(name, attr, PIECE_BYTES):
                writer.add(saved, piece, start)
        writer.close()
        model.config.save_pretrained(folder)
        for pattern in COPIED:
            for file in src.glob(pattern):
                if file.is_file() and not (folder / file.name).exists():
                    shutil.copy2(file, folder / file.name)
        report.bytes_written = writer.bytes_written

    before, after = vars(config), vars(model.config)
    changed = {
        k: (v, after.get(k)) for k, v in before.items() if type(v) is int and after.get(k) != v
    }
    report = StreamReport(params_before, _count(model), 0, 0, 0.0, plain, changed)
    atomic_folder(dst, write)
    report.bytes_read = reader.bytes_read
    report.seconds = time.time() - start
    return report


def _calibration_batches(
    importance: str, calibration: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]]
) -> list[torch.Tensor]:
    """The calibration batches a criterion needs (none for magnitude), checked."""
    if importance not in STREAMED:
        raise ValueError(
            f"importance {importance!r} cannot be streamed: choose one of {', '.join(STREAMED)}"
        )
    if importance == "magnitude":
        if calibration is not None:
            raise ValueError("magnitude needs no calibration: give importance='wanda' to use it")
        return []
    if calibration is None:
        raise ValueError(f"importance {importance!r} needs calibration token ids")
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    if not batches:
        raise ValueError(f"importance {importance!r} needs calibration token ids, got none")
    for ids in batches:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(
                "calibration: token ids [sequences, length] (or a list of them), got "
                f"{getattr(ids, 'shape', type(ids).__name__)}"
            )
        if not ids.numel():
            raise ValueError(f"calibration: an empty batch of token ids {list(ids.shape)}")
    return batches


def _pruner_arguments(recipe: Mapping[str, Any]) -> dict[str, Any]:
    recipe = dict(recipe)
    if recipe and set(recipe) <= set(KINDS):
        recipe = {"pruning_ratio_dict": recipe}
    recipe.setdefault("pruning_ratio", 0.0)
    return recipe


def _checkpoint_keys(model: nn.Module, reader: ConvertedReader) -> dict[tuple[str, str], str]:
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


def _refuse_computed_buffers(dense: nn.Module, pruned: nn.Module) -> None:
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


def _bytes(pieces: list[tuple[str, tuple[int, ...], torch.dtype]]) -> int:
    return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in pieces)


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
