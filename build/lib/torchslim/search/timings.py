"""A table of measured times, kept on disk, so a rerun decides from the same numbers.

Latency-aware rounding, a latency target and the guard all decide from times measured on a
shared machine; measured afresh, two identical runs can choose differently. A
:class:`TimingTable` stores each measurement under a key describing what was timed (the runtime
and its threads and repeats, the torch version, the module's class, ``repr``, parameter and
buffer shapes and dtypes, and the input shapes and dtypes) and hands it back whenever the same
thing is timed again, so the same flags, seed and table give the same result. Weight values
are not in the key: dense kernels take the same time whatever the values. Delete the file (or
use another one) to measure afresh, e.g. after the machine's load or software changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path
from typing import Sequence, Union

import torch
from torch import nn

from torchslim.persistence import atomic_write

FORMAT = "torchslim-timings/1"


def default_path() -> Path:
    """``$XDG_CACHE_HOME/torchslim/timings.json`` (``~/.cache/...`` when unset)."""
    cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(cache) / "torchslim" / "timings.json"


class TimingTable:
    """Milliseconds by key, read from and written back to ``path`` (``None``: in memory)."""

    def __init__(self, path: Union[None, str, Path] = None) -> None:
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, float] = {}
        if self.path is not None and self.path.exists():
            self.entries = _read(self.path)

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __getitem__(self, key: str) -> float:
        return self.entries[key]

    def __len__(self) -> int:
        return len(self.entries)

    def update(self, measured: dict[str, float]) -> None:
        """Add ``measured`` and write the table (atomically) when it has a file."""
        self.entries.update(measured)
        if self.path is not None and measured:
            text = json.dumps({"format": FORMAT, "ms": self.entries}, indent=0, sort_keys=True)
            atomic_write(self.path, lambda tmp: tmp.write_text(text))


def job_key(
    runtime: str, module: nn.Module, inputs: Sequence[torch.Tensor], repeats: int, warmup: int
) -> str:
    """What decides a job's time, hashed: the runtime, the module's structure and shapes, the
    inputs' shapes (the module doc lists the parts)."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    described = {
        "runtime": runtime,
        "repeats": repeats,
        "warmup": warmup,
        "torch": torch.__version__,
        "machine": platform.machine(),
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "repr": repr(module),
        "tensors": [(n, list(t.shape), str(t.dtype)) for n, t in tensors],
        "inputs": [(list(x.shape), str(x.dtype), str(x.device)) for x in inputs],
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def _read(path: Path) -> dict[str, float]:
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(
            f"{path} is not a readable timing table ({error}); delete it to measure afresh"
        ) from error
    entries = saved.get("ms") if isinstance(saved, dict) else None
    if not isinstance(entries, dict) or saved.get("format") != FORMAT:
        raise ValueError(f"{path} is not a {FORMAT} timing table; delete it to measure afresh")
    return {str(k): float(v) for k, v in entries.items()}
