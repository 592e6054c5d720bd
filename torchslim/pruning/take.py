"""``index_select`` at memory speed. Keeping the input channels of a weight gathers along a
dim other than the first, which PyTorch's CPU kernel does element by element on one thread
(about 5 ns each for bfloat16; minutes for an 8B model). NumPy's ``take`` on the same bytes
viewed as integers of the item's width is about 3x faster, and large gathers are split by
output rows over the intra-op threads (NumPy releases the GIL): about 7x along a later dim,
2x along the first. The bits are copied unchanged, so the result is identical. A large result
is backed by transparent huge pages (:func:`huge_pages`): filling fresh memory 4 KiB page by
page costs as much as the gather itself. Within :func:`recycling`, the memory of large results
that have died is handed to the next result of the same size instead of fresh memory, which
the kernel must clear first (and, short of free memory, reclaim)."""

from __future__ import annotations

import ctypes
import math
import mmap
import os
import sys
import threading
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import lru_cache
from typing import Callable, Iterator, Optional

import numpy as np
import torch

#: integer dtypes of each item size: the bytes of any tensor of that width, as NumPy takes them
_SAME_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
#: elements below which one thread does the whole gather
_SPLIT_ELEMENTS = 1 << 22
#: tensors below this many elements go through ``index_select`` itself: on them the
#: conversions to NumPy cost more than the copy (15 of 18 us for a 2k-element conv weight)
_SMALL_ELEMENTS = 1 << 16
#: results at least this big are backed by transparent huge pages where the kernel offers them
_HUGE_BYTES = 1 << 25


#: memory formats a sliced tensor keeps (``index_select`` and the gather below answer in the
#: default one): a model converted to ``channels_last`` stays so once pruned
_KEPT_FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}


def take(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``tensor.detach().index_select(dim, index)`` without autograd history: contiguous, or
    channels-last where ``tensor`` is (and is not also contiguous)."""
    tensor = tensor.detach()
    result = _gather(tensor, dim, index)
    kept = _KEPT_FORMATS.get(tensor.dim())
    if kept is not None and not tensor.is_contiguous() and tensor.is_contiguous(memory_format=kept):
        return result.contiguous(memory_format=kept)
    return result


def _gather(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    if tensor.numel() < _SMALL_ELEMENTS or not _plain(tensor, dim, index):
        # index_select's own answer (or its own error)
        return tensor.index_select(dim, index)
    dim %= tensor.dim()
    width = _SAME_WIDTH[tensor.element_size()]
    source = tensor.view(width).numpy()
    positions = index.cpu().numpy().astype(np.intp, copy=False)
    if positions.size and (positions.min() < 0 or positions.max() >= source.shape[dim]):
        raise IndexError(f"index out of range for dim {dim} of size {source.shape[dim]}")
    shape = list(source.shape)
    shape[dim] = positions.size
    result = _empty(shape, width)
    out = result.numpy()
    threads = min(torch.get_num_threads(), len(out)) if out.size > _SPLIT_ELEMENTS else 1
    if threads == 1:
        np.take(source, positions, dim, out, "clip")
        return result.view(tensor.dtype)
    bounds = np.linspace(0, len(out), threads + 1).astype(int)
    rows = list(zip(bounds, bounds[1:]))
    if dim == 0:  # output rows come from the index
        parts = [(source, positions[a:b], out[a:b]) for a, b in rows]
    else:
        parts = [(source[a:b], positions, out[a:b]) for a, b in rows]
    # mode="clip" writes straight into ``out`` (the default buffers it); the range is checked
    jobs = [_pool().submit(np.take, s, p, dim, o, "clip") for s, p, o in parts[1:]]
    np.take(*parts[0][:2], dim, parts[0][2], "clip")
    for job in jobs:
        job.result()
    return result.view(tensor.dtype)


def _empty(shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """A result's memory: recycled where :func:`recycling` has some of its size, else fresh
    (torch-owned, as index_select's), backed by huge pages where large."""
    nbytes = math.prod(shape) * dtype.itemsize
    recycler = _RECYCLER
    if recycler is not None and nbytes >= _HUGE_BYTES:
        return recycler.empty(nbytes).view(dtype).view(shape)
    result = torch.empty(shape, dtype=dtype)
    huge_pages(result)
    return result


class _Recycler:
    """Buffers of large results, each handed back when the last tensor on its memory dies
    (the storage holds the NumPy view a finalizer watches) and kept, up to ``max_bytes``
    (oldest dropped first), for the next result of the same size."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.free: OrderedDict[int, list[np.ndarray]] = OrderedDict()
        self.held = 0
        self.open = True
        self.lock = threading.Lock()

    def empty(self, nbytes: int) -> torch.Tensor:
        buffer = None
        with self.lock:
            buffers = self.free.get(nbytes)
            if buffers:
                buffer = buffers.pop()
                self.held -= nbytes
                if not buffers:
                    del self.free[nbytes]
        if buffer is None:
            buffer = np.empty(nbytes, np.uint8)
            huge_pages(torch.from_numpy(buffer))
        view = buffer.view()  # the storage's own reference: it dies with the storage
        weakref.finalize(view, self._release, buffer).atexit = False
        return torch.from_numpy(view)

    def _release(self, buffer: np.ndarray) -> None:
        with self.lock:
            if not self.open or buffer.nbytes > self.max_bytes:
                return
            self.free.setdefault(buffer.nbytes, []).append(buffer)
            self.free.move_to_end(buffer.nbytes)
            self.held += buffer.nbytes
            while self.held > self.max_bytes:
                size, buffers = next(iter(self.free.items()))
                buffers.pop(0)
                self.held -= size
                if not buffers:
                    del self.free[size]

    def close(self) -> None:
        with self.lock:
            self.open, self.free, self.held = False, OrderedDict(), 0


_RECYCLER: Optional[_Recycler] = None


@contextmanager
def recycling(max_bytes: int) -> Iterator[None]:
    """Within the block, the memory of large :func:`take` results that have died (up to
    ``max_bytes`` of it) serves the next result of the same size. A model pruned layer by layer
    slices tensors of the same few shapes again and again; reused memory skips the kernel's
    clearing of fresh pages, which for a streamed 8B checkpoint took as long as the gathers.
    The memory held for reuse adds to the peak, by at most ``max_bytes``."""
    global _RECYCLER
    outer, _RECYCLER = _RECYCLER, _Recycler(max_bytes)
    try:
        yield
    finally:
        _RECYCLER.close()
        _RECYCLER = outer


def _plain(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> bool:
    """A dense CPU tensor of a plain item width, an in-range dim and a 1-D integer index."""
    return (
        tensor.dim() > 0
        and -tensor.dim() <= dim < tensor.dim()
        and tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and not tensor.is_quantized
        and not (tensor.is_complex() or tensor.is_conj() or tensor.is_neg())
        and tensor.element_size() in _SAME_WIDTH
        and index.dim() == 1
        and index.dtype in (torch.int32, torch.int64)
    )


def huge_pages(tensor: torch.Tensor) -> bool:
    """Ask Linux to back the untouched memory of a large fresh tensor with transparent huge
    pages (``madvise(MADV_HUGEPAGE)``, what ``THP_MEM_ALLOC_ENABLE=1`` does for every
    allocation): filling it then faults in 2 MiB pages instead of 4 KiB ones, which saves
    about a tenth of the 8B model's prune in memory and a quarter of its streamed prune. Only
    advice: the memory stays torch's, and nothing changes where the kernel has huge pages
    off. Returns whether the kernel took it."""
    nbytes = tensor.numel() * tensor.element_size()
    madvise = _madvise()
    page = mmap.PAGESIZE
    start = -(-tensor.data_ptr() // page) * page
    end = (tensor.data_ptr() + nbytes) // page * page
    if nbytes < _HUGE_BYTES or madvise is None or end <= start:
        return False
    return madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), mmap.MADV_HUGEPAGE) == 0


@lru_cache(maxsize=1)
def _madvise() -> Optional[Callable[..., int]]:
    """libc's ``madvise`` on Linux, else ``None``."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    return ctypes.CDLL(None, use_errno=True).madvise


@lru_cache(maxsize=1)
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(thread_name_prefix="torchslim-take")


os.register_at_fork(after_in_child=_pool.cache_clear)  # a forked child has none of its threads
