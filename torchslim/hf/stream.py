"""Pruning a Hugging Face checkpoint without holding it in memory, one tensor at a time.

:func:`prune_checkpoint` builds the model from ``config.json`` on ``meta`` (no memory), traces
it and lets :class:`~torchslim.pruner.MetaPruner` choose and prune there. Calibrated criteria
(Wanda, FLAP's fluctuation) first record their statistics in a forward that holds one module's
weights at a time (:mod:`torchslim.hf.onload`). Each tensor a group scores is read from its
shard when it is scored, with the plan recorded so far replayed on it, so the choice is the one
made in memory.
The output's shapes are known before the step (the same step with placeholder scores,
undone), so each tensor is written into its shard as soon as the plan for it is final, from
the copy its last group's scores were read into (:mod:`torchslim.hf.output`): a Llama-shaped
checkpoint is read about twice (for the hidden width's scores, then for each layer's own
groups), not three times.
Tensors transformers converts, such as experts saved one by one, go through its converters
(:mod:`torchslim.hf.conversion`). Peak memory is about one layer's kept tensors and a sliced
copy, or a block of rows of an embedding. The output is a ``save_pretrained`` folder: the
config follows the pruning (or records the plan when widths differ per layer:
``tp.hf.from_pretrained`` loads it); tokenizer and generation files are copied; it is written
to a temporary folder and moved into place, so an interrupted run leaves no half-written
output.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import warnings
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from torchslim.graph.kinds import KINDS
from torchslim.hf.checkpoint import built, model_class_of
from torchslim.hf.config import numeric_field
from torchslim.hf.conversion import ConvertedReader
from torchslim.hf.folder import copy_companions, save_pretrained
from torchslim.hf.layer_config import layer_changes
from torchslim.hf.onload import computed_buffers, onloaded
from torchslim.hf.output import (
    PIECE_BYTES,
    StreamedOutput,
    plan_ahead,
    refuse_computed_buffers,
    stored_refs,
)
from torchslim.hf.refit import RefitStore, StreamedReconstruction
from torchslim.hf.replay import CheckpointTensors
from torchslim.hf.shards import ShardReader
from torchslim.hf.sync import RECORD_KEY
from torchslim.importance.criteria import (
    FluctuationImportance,
    MagnitudeImportance,
    WandaImportance,
)
from torchslim.persistence import CheckpointError, atomic_folder
from torchslim.pruner.meta import MetaPruner
from torchslim.pruner.reconstruct import Reconstruction, ReconstructionReport
from torchslim.pruning.take import recycling
from torchslim.spaces.analysis import ParamDim
from torchslim.utils import heap
from torchslim.utils.hardware import native_bfloat16
from torchslim.utils.progress import meter
from torchslim.utils.readahead import Readahead

PathLike = Union[str, Path]
#: memory of dead slices kept for the next slice of the same size (each layer slices the same
#: shapes; fresh memory must be cleared by the kernel first, slower than the slicing itself)
RECYCLED_BYTES = 256 * 2**20


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
    #: what reconstruction refit (``None`` without it)
    reconstruction: Optional[ReconstructionReport] = None

    def __str__(self) -> str:
        return (
            f"params {self.params_before:,} -> {self.params_after:,}; read "
            f"{self.bytes_read / 1e9:.2f} GB, wrote {self.bytes_written / 1e9:.2f} GB in "
            f"{self.seconds:.1f} s; "
            + ("plain config" if self.plain_config else "per-layer plan (tp.hf.from_pretrained)")
            + ("" if self.reconstruction is None else f"\n{self.reconstruction}")
        )


class _Streamed:
    """A criterion on a model on ``meta`` whose scored tensors are read from the checkpoint as
    the model holds them at that moment (see :class:`CheckpointTensors`)."""

    layers: CheckpointTensors
    output: Optional[StreamedOutput] = None

    def __call__(self, group: Any) -> Optional[torch.Tensor]:
        if self.output is not None:  # the groups pruned so far may have finished some tensors
            self.output.flush()
        return super().__call__(group)  # type: ignore[misc]

    def position_scores(self, member: ParamDim, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        """Scores of a tensor bigger than the kept copies hold, a block of rows at a time
        (summed over the blocks where the positions are columns: the criteria streamed here
        add up over rows)."""
        name, attr = member.ref.module_name, member.ref.name
        if (name, attr) not in self.layers.keys:
            return None
        scores = []
        for rows in self.layers.scored_blocks(name, attr, PIECE_BYTES):
            block = self.layers.tensor(name, attr, rows)
            scores.append(super().position_scores(member, block))  # type: ignore[misc]
            if scores[-1] is None:
                return None
        if len(scores) == 1:
            return scores[0]
        return torch.cat(scores) if member.dim == 0 else torch.stack(scores).sum(0)


class _StreamedMagnitude(_Streamed, MagnitudeImportance):
    pass


class _StreamedWanda(_Streamed, WandaImportance):
    pass


class _StreamedFluctuation(_Streamed, FluctuationImportance):
    pass


#: the criteria ``prune_checkpoint`` streams, by name (calibrated ones record first)
STREAMED: dict[str, type] = {
    "magnitude": _StreamedMagnitude,
    "wanda": _StreamedWanda,
    "fluctuation": _StreamedFluctuation,
}
#: the streamed criteria that need calibration token ids
CALIBRATED = tuple(name for name in STREAMED if name != "magnitude")


def _record(
    model: nn.Module,
    layers: CheckpointTensors,
    criterion: Any,
    batches: list[torch.Tensor],
    dtype: Optional[torch.dtype],
) -> None:
    """Record a calibrated criterion on the dense model, one module's weights in memory at a
    time (cast to ``dtype`` when given): what recording in memory records, for a checkpoint
    that does not fit."""
    head = model.get_output_embeddings()
    with ExitStack() as stack:
        for context in (
            computed_buffers(model),
            onloaded(model, layers.read, skipped=head, dtype=dtype),
            criterion.record(model),
            torch.no_grad(),
        ):
            stack.enter_context(context)
        for ids in batches:
            model(ids, use_cache=False)
    heap.trim()  # the module copies and activations freed, not kept resident for the step


def _warn_if_slow(layers: CheckpointTensors, dtype: Optional[torch.dtype]) -> None:
    """A calibration forward in bfloat16 on a CPU without bfloat16 matrix units is slow: say
    so, and what to do."""
    if dtype is None and not native_bfloat16():
        stored = {layers.reader.dtype(key) for key in set(layers.keys.values())}
        if torch.bfloat16 in stored:
            warnings.warn(
                "calibrating a bfloat16 checkpoint on a CPU without bfloat16 matrix units (AMX "
                "or AVX512-BF16) runs many times slower than float32 (an 8B model on 32 x 128 "
                "tokens: over 20 minutes on an AVX2-only CPU); pass "
                "calibration_dtype=torch.float32 (--calibration-dtype float32), which holds one "
                "module's weights in float32",
                stacklevel=3,
            )


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
    calibration_dtype: Optional[torch.dtype] = None,
    reconstruct: Union[bool, Reconstruction] = False,
) -> StreamReport:
    """Prune the checkpoint folder ``src`` into ``dst`` by ``recipe`` without loading it.
    ``src`` may be a checkpoint already pruned to per-layer widths: the plan its config records
    is replayed on ``meta`` first, and ``dst`` records the whole plan from the dense model.

    ``recipe``: keyword arguments of :class:`~torchslim.pruner.MetaPruner`
    (``pruning_ratio_dict``, ``pruning_ratio``, ``global_pruning``, ``round_to``, ...), or
    kinds and ratios alone (``{"neurons": 0.2}``). ``importance``: ``"magnitude"`` ranks
    channels by the L``p`` norm of their coupled slices, as ``MagnitudeImportance(p)`` does in
    memory; ``"wanda"`` as ``WandaImportance`` and ``"fluctuation"`` as FLAP's
    ``FluctuationImportance``, recorded on ``calibration`` (token ids ``[sequences, length]``,
    or a list of such batches), which runs through the model one module's weights at a time
    first. ``model_class`` defaults to the class ``config.architectures`` names.
    ``trust_pickle`` lets pickle (``.bin``) shards be read (mapped by
    ``torch.load(weights_only=True, mmap=True)``); the output is safetensors.
    ``calibration_dtype`` (``torch.float32``): the calibration forward runs in it instead of
    the checkpoint's dtype, which on a CPU without bfloat16 matrix units is many times faster
    for a bfloat16 checkpoint (warned there), at twice one module's memory; the statistics are
    then a float32 forward's, as recording on the model cast to float32 in memory.
    ``reconstruct`` (``True``, or a :class:`~torchslim.pruner.Reconstruction` for its options;
    its batches are token ids as ``calibration`` takes them, ``calibration`` itself with
    ``True``): the layers reading removed channels are refit as ``step(reconstruct=...)``
    refits them in memory, a decoder layer at a time (:mod:`torchslim.hf.refit`); no bias is
    added (a config has no field for one layer's bias)."""
    import transformers

    start = time.time()
    src, dst = Path(src), Path(dst)
    refit = _reconstruction(reconstruct, calibration)
    batches = _calibration_batches(importance, calibration, refit is not None)
    calibrating = bool(batches) or refit is not None
    if calibration_dtype is not None and not (calibrating and calibration_dtype.is_floating_point):
        raise ValueError(
            f"calibration_dtype={calibration_dtype}: a floating-point dtype for the calibration "
            f"forward of a calibrated criterion (importance={_calibrated()}) or of reconstruct"
        )
    if not (src / "config.json").is_file():
        raise CheckpointError(f"{src} has no config.json")
    config = transformers.AutoConfig.from_pretrained(src)
    record = getattr(config, RECORD_KEY, None)
    if isinstance(record, dict) and record.get("buffers"):
        raise CheckpointError(
            f"{src} was pruned to per-layer widths that change computed buffers "
            f"({', '.join(list(record['buffers'])[:3])}): their values cannot be streamed; "
            "prune it further in memory (tp.hf.from_pretrained, `torchslim prune`)"
        )
    reader = ShardReader(src, trust_pickle=trust_pickle)
    model_class = model_class or model_class_of(config)
    with Readahead(reader.files, lambda: reader.bytes_read):  # the disk works meanwhile
        with torch.device("meta"):  # a plan the source records (per-layer widths) replayed
            model = built(model_class, config, src / "config.json")
            dense = built(model_class, config, src / "config.json")
        layers = CheckpointTensors(dense, model, ConvertedReader(reader, dense))
        criterion = STREAMED[importance](**({"p": p} if importance == "magnitude" else {}))
        criterion.layers = layers
        if calibrating:
            _warn_if_slow(layers, calibration_dtype)
        if batches:
            with meter("calibrating (read)") as reader.observer:
                _record(model, layers, criterion, batches, calibration_dtype)
        ids = torch.zeros(1, example_length, dtype=torch.long, device="meta")
        arguments = _pruner_arguments(recipe)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".* ranks .* without calibration data")
            pruner = MetaPruner(model, ids, importance=criterion, **arguments)
        report = StreamReport(
            params_before=_count(model),
            params_after=0,
            bytes_read=0,
            bytes_written=0,
            seconds=0.0,
            plain_config=True,
        )
        ahead = plan_ahead(pruner, layers, ids, arguments)
        layers.keep_at_least(ahead.largest_group if ahead is not None else 0)

        def write(folder: Path) -> None:
            step = None
            if refit is not None:  # refit tensors wait beside the output until written
                scratch = scratches.enter_context(
                    tempfile.TemporaryDirectory(prefix=f".{dst.name}.refit.", dir=folder.parent)
                )
                store = RefitStore(Path(scratch), layers.drop)
                layers.replaced = store.get
                step = StreamedReconstruction(refit, layers.read, store, calibration_dtype)
            planned = ahead if refit is None else None
            criterion.output = output = StreamedOutput(folder, layers, max_shard_bytes, planned)
            with meter("scoring (read)") as reader.observer, recycling(RECYCLED_BYTES):
                pruner.step(reconstruct=step)
            report.reconstruction = pruner.reconstruction
            refuse_computed_buffers(dense, model)
            reader.observer = lambda _: None  # the writing bar counts from here
            report.bytes_written = output.finish(stored_refs(layers))
            save_pretrained(model.config, folder)
            copy_companions(src, folder)
            before, after = vars(config), vars(model.config)
            report.changed = {
                k: (v, after.get(k))
                for k, v in before.items()
                if numeric_field(v) and after.get(k) != v
            }
            report.changed.update(layer_changes(config, model.config))
            report.params_after = _count(model)
            report.plain_config = not hasattr(model.config, RECORD_KEY)

        with ExitStack() as scratches:
            atomic_folder(dst, write)
    report.bytes_read = reader.bytes_read
    report.seconds = time.time() - start
    return report


def _reconstruction(
    reconstruct: Union[bool, Reconstruction],
    calibration: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]],
) -> Optional[Reconstruction]:
    """What to refit with (``None``: nothing), its batches checked as calibration."""
    if isinstance(reconstruct, Reconstruction):
        if reconstruct.add_bias:
            raise ValueError(
                "a streamed reconstruction adds no bias: the output's config has no field for "
                "one layer's bias (add_bias=False or None)"
            )
        return dataclasses.replace(reconstruct, batches=_token_batches(reconstruct.batches))
    if reconstruct is not True and reconstruct is not False:
        raise ValueError(f"reconstruct: True, False or a Reconstruction, got {reconstruct!r}")
    if not reconstruct:
        return None
    if calibration is None:
        raise ValueError("reconstruct=True refits on the calibration token ids: give calibration")
    return Reconstruction(_token_batches(calibration))


def _calibration_batches(
    importance: str,
    calibration: Optional[Union[torch.Tensor, Sequence[torch.Tensor]]],
    reconstructing: bool = False,
) -> list[torch.Tensor]:
    """The calibration batches a criterion needs (none for magnitude), checked; calibration
    for magnitude only when ``reconstructing`` (it refits on it)."""
    if importance not in STREAMED:
        raise ValueError(
            f"importance {importance!r} cannot be streamed: choose one of {', '.join(STREAMED)}"
        )
    if importance == "magnitude":
        if calibration is not None and not reconstructing:
            raise ValueError(
                f"magnitude needs no calibration: give importance={_calibrated()} (or "
                "reconstruct=True) to use it"
            )
        return []
    if calibration is None:
        raise ValueError(f"importance {importance!r} needs calibration token ids")
    return _token_batches(calibration)


def _token_batches(
    calibration: Union[torch.Tensor, Sequence[torch.Tensor]],
) -> list[torch.Tensor]:
    """Token id batches ``[sequences, length]``, checked."""
    batches = [calibration] if isinstance(calibration, torch.Tensor) else list(calibration)
    if not batches:
        raise ValueError("calibration: needs calibration token ids, got none")
    for ids in batches:
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(
                "calibration: token ids [sequences, length] (or a list of them), got "
                f"{getattr(ids, 'shape', type(ids).__name__)}"
            )
        if not ids.numel():
            raise ValueError(f"calibration: an empty batch of token ids {list(ids.shape)}")
    return batches


def _calibrated() -> str:
    return " or ".join(map(repr, CALIBRATED))


def _pruner_arguments(recipe: Mapping[str, Any]) -> dict[str, Any]:
    recipe = dict(recipe)
    if recipe and set(recipe) <= set(KINDS):
        recipe = {"pruning_ratio_dict": recipe}
    recipe.setdefault("pruning_ratio", 0.0)
    return recipe


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
