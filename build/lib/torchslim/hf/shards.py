"""Reading and writing safetensors checkpoints one tensor at a time (``save_pretrained``
layout: ``model.safetensors``, or shards listed by ``model.safetensors.index.json``)."""

from __future__ import annotations

import contextlib
import json
import math
import pickle
import struct
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from torchslim.persistence import CheckpointError
from torchslim.utils.uncached import WriteBehind

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
#: bytes of tensors waiting to be written while the next ones are prepared
WRITE_BEHIND_BYTES = 256 * 2**20


class ShardReader:
    """The tensors of a checkpoint folder by name, each read from its shard when asked.

    safetensors shards are read a tensor (or a block of rows) at a time. Pickle (``.bin``)
    shards only with ``trust_pickle``: ``torch.load(weights_only=True, mmap=True)`` maps a
    shard without reading it and restricts unpickling to tensors and plain containers, but it
    still unpickles the file."""

    def __init__(self, folder: Path, trust_pickle: bool = False) -> None:
        self.folder = folder
        self.pickled = False
        if (folder / INDEX).is_file():
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        elif (folder / SINGLE).is_file():
            weight_map = {name: SINGLE for name in _keys(folder / SINGLE)}
        elif any(folder.glob("*.bin")):
            if not trust_pickle:
                raise CheckpointError(
                    f"{folder} holds pickle (.bin) weights, and unpickling a file can run code "
                    "from it: convert them to safetensors, or pass trust_pickle=True "
                    "(--trust-pickle) to map them with torch.load(weights_only=True)"
                )
            self.pickled = True
            if (folder / PICKLE_INDEX).is_file():
                weight_map = json.loads((folder / PICKLE_INDEX).read_text())["weight_map"]
            else:
                weight_map = dict.fromkeys(self._pickled(PICKLE_SINGLE), PICKLE_SINGLE)
        else:
            raise CheckpointError(f"no safetensors weights in {folder}")
        missing = sorted({f for f in weight_map.values() if not (folder / f).is_file()})
        if missing:
            listed = PICKLE_INDEX if self.pickled else INDEX
            raise CheckpointError(f"{folder}: shards listed in {listed} are missing: {missing}")
        self.weight_map: dict[str, str] = weight_map
        self.bytes_read = 0
        self._dtypes: dict[str, tuple[Optional[torch.dtype], str]] = {}  # a shard at a time
        #: told the bytes of each read (a progress bar)
        self.observer: Callable[[int], Any] = lambda _: None

    @property
    def files(self) -> list[Path]:
        """The shard files, in their numbering's order."""
        return [self.folder / file for file in sorted(set(self.weight_map.values()))]

    def _pickled(self, file: str) -> dict[str, torch.Tensor]:
        """A pickle shard's tensors, mapped from the file, not read."""
        try:
            state = torch.load(self.folder / file, map_location="cpu", mmap=True, weights_only=True)
        except (RuntimeError, OSError, ValueError, pickle.UnpicklingError) as error:
            raise CheckpointError(
                f"{self.folder / file}: not a state dict torch.load can map ({error})"
            ) from error
        return state

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype of a tensor: its shard's header (a pickle shard: mapped) is read
        once, for all its tensors."""
        if name not in self._dtypes:
            self._dtypes.update(self._shard_dtypes(self.weight_map[name]))
        dtype, stored = self._dtypes[name]
        if dtype is None:
            raise CheckpointError(f"{name}: dtype {stored} is not supported here")
        return dtype

    def _shard_dtypes(self, file: str) -> dict[str, tuple[Optional[torch.dtype], str]]:
        """Each tensor's dtype in shard ``file`` (``None`` where unsupported), and its label."""
        if self.pickled:
            return {n: (t.dtype, str(t.dtype)) for n, t in self._pickled(file).items()}
        from safetensors import safe_open

        by_label = {label: dtype for dtype, label in DTYPES.items()}
        with safe_open(str(self.folder / file), framework="pt") as handle:
            names = handle.keys()
            labels = {name: handle.get_slice(name).get_dtype() for name in names}
        return {name: (by_label.get(label), label) for name, label in labels.items()}

    def get(self, name: str, rows: slice = slice(None)) -> torch.Tensor:
        """Tensor ``name`` (its ``rows`` only: the rest is never read)."""
        if self.pickled:
            tensor = self._pickled(self.weight_map[name])[name][rows]
        else:
            from safetensors import safe_open

            with safe_open(str(self.folder / self.weight_map[name]), framework="pt") as handle:
                if rows == slice(None):
                    tensor = handle.get_tensor(name)
                else:
                    tensor = handle.get_slice(name)[rows]
        self.bytes_read += tensor.numel() * tensor.element_size()
        self.observer(tensor.numel() * tensor.element_size())
        return tensor


def _keys(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return list(handle.keys())


#: safetensors dtype names
DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class ShardWriter:
    """Writes the tensors of a planned layout (names, shapes, dtypes, in writing order) into
    safetensors shards of at most ``max_bytes`` each (a bigger tensor gets a shard of its own):
    headers are written first, each tensor's bytes at its place as it comes (around the page
    cache, on a thread of its own: :class:`~torchslim.utils.uncached.WriteBehind`), so only
    about one tensor is ever in memory. With more than one shard, the index
    ``from_pretrained`` reads too."""

    def __init__(
        self, folder: Path, max_bytes: int, layout: list[tuple[str, tuple[int, ...], torch.dtype]]
    ) -> None:
        self.folder = folder
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            if shards[-1] and size + nbytes > max_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, shape, dtype))
            size += nbytes
        for tensors in shards:  # wider dtypes first: every tensor aligned to its item size
            tensors.sort(key=lambda t: -t[2].itemsize)
        total = len(shards)
        self.places: dict[str, tuple[Path, int, tuple[int, ...], torch.dtype]] = {}
        self.weight_map: dict[str, str] = {}
        self.bytes_written = 0
        self.rows_written: dict[str, int] = {}
        for number, tensors in enumerate(shards, 1):
            file = SINGLE if total == 1 else f"model-{number:05d}-of-{total:05d}.safetensors"
            self._start(folder / file, tensors)
            self.weight_map.update(dict.fromkeys((n for n, _, _ in tensors), file))
        self.total = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in layout)
        self.writes = WriteBehind(WRITE_BEHIND_BYTES)

    def _start(self, path: Path, tensors: list[tuple[str, tuple[int, ...], torch.dtype]]) -> None:
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape, dtype in tensors:
            end = offset + math.prod(shape) * dtype.itemsize
            header[name] = {
                "dtype": DTYPES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, end],
            }
            offset = end
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        start = 8 + len(text)
        with open(path, "wb") as handle:
            handle.write(struct.pack("<Q", len(text)) + text)
            handle.truncate(start + offset)
        for name, shape, dtype in tensors:
            self.places[name] = (path, start + header[name]["data_offsets"][0], shape, dtype)

    def add(self, name: str, tensor: torch.Tensor, start: int = 0) -> None:
        """Write tensor ``name``, or the next block of its rows (from row ``start``); the
        tensor must not change until :meth:`close`."""
        path, at, shape, dtype = self.places[name]
        count = len(tensor) if shape else 1
        fits = tuple(tensor.shape) == ((count, *shape[1:]) if shape else ())
        fits = fits and start == self.rows_written.get(name, 0) and start + count <= _rows(shape)
        if not fits or tensor.dtype != dtype:
            raise CheckpointError(
                f"{name}: {list(tensor.shape)} {tensor.dtype} from row {start} where the plan "
                f"writes {list(shape)} {dtype} from row {self.rows_written.get(name, 0)}"
            )
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self.writes.write(path, at + start * math.prod(shape[1:]) * dtype.itemsize, data)
        self.bytes_written += data.nbytes
        self.rows_written[name] = start + count

    def discard(self) -> None:
        """Wait for the queued writes, whose files are about to be deleted (their errors no
        longer matter): none may land in a file written anew under the same name."""
        with contextlib.suppress(OSError):
            self.writes.close()

    def close(self) -> None:
        """Wait for the writes; check every planned tensor was written; write the index of a
        sharded checkpoint."""
        self.writes.close()
        missing = sorted(
            name
            for name, (_, _, shape, _) in self.places.items()
            if self.rows_written.get(name, 0) != _rows(shape)
        )
        if missing:
            raise CheckpointError(f"planned tensors never written: {missing[:5]}")
        if len(set(self.weight_map.values())) > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def _rows(shape: tuple[int, ...]) -> int:
    """Rows a tensor of ``shape`` is written in (a scalar: one)."""
    return shape[0] if shape else 1
