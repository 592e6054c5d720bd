"""Writing bytes into a file around the page cache (``O_DIRECT``), where the file system allows.

A streamed prune writes gigabytes that nothing reads back soon. Through the page cache each
byte is copied into fresh cache pages (about a CPU second per GB on a 2-core machine), and the
dirty pages push out the checkpoint that is being read a second time, which is then read from
the disk again. ``O_DIRECT`` moves the bytes from a staging buffer straight to the disk.
It needs the memory, the file offset and the length aligned to the device's blocks, so each
range is copied into an aligned staging buffer whose first and last blocks are first read back
from the file (read-modify-write: the bytes of neighbouring ranges written before survive).
Where ``O_DIRECT`` is refused (tmpfs, macOS) the bytes go through the page cache as usual.
"""

from __future__ import annotations

import errno
import mmap
import os
import queue
import threading
import weakref
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np

#: alignment of offsets, lengths and memory for ``O_DIRECT`` (a multiple of every common
#: logical block size)
BLOCK = 4096
#: bytes staged and written per ``pwrite``
STAGE_BYTES = 16 * 2**20
#: one staging buffer, shared by every writing thread
_STAGE_LOCK = threading.Lock()


def write_at(path: Path, offset: int, data: np.ndarray) -> None:
    """Write the bytes of ``data`` (any contiguous array) into the existing file ``path`` at
    ``offset``; the file keeps its size unless the range ends past it."""
    data = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    flag = getattr(os, "O_DIRECT", 0)
    if flag and len(data) >= BLOCK:
        try:
            fd = os.open(path, os.O_RDWR | flag)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                with _STAGE_LOCK:
                    _write_direct(fd, offset, data)
                return
            except OSError as error:
                if error.errno != errno.EINVAL:  # a file system that takes O_DIRECT only at open
                    raise
            finally:
                os.close(fd)
    with open(path, "r+b") as handle:
        handle.seek(offset)
        handle.write(data.data)


def _write_direct(fd: int, offset: int, data: np.ndarray) -> None:
    size = os.fstat(fd).st_size
    stage = _stage()
    done = 0
    while done < len(data):
        start = offset + done
        base = start - start % BLOCK
        lead = start - base
        count = min(len(data) - done, len(stage) - lead)
        stop = -(-(start + count) // BLOCK) * BLOCK
        if lead:  # the bytes before ``start`` in its first block
            _read_block(fd, stage, 0, base)
        if (start + count) % BLOCK:  # the bytes after the range in its last block
            _read_block(fd, stage, stop - BLOCK - base, stop - BLOCK)
        stage[lead : lead + count] = data[done : done + count]
        view = memoryview(stage)[: stop - base]
        written = 0
        while written < len(view):
            written += os.pwrite(fd, view[written:], base + written)
        done += count
    end = offset + len(data)
    if os.fstat(fd).st_size > max(size, end):  # the last block ran past the end of the file
        os.ftruncate(fd, max(size, end))


def _read_block(fd: int, stage: np.ndarray, at: int, offset: int) -> None:
    """The file's block at ``offset`` into ``stage[at:at + BLOCK]`` (zeros past its end)."""
    block = memoryview(stage)[at : at + BLOCK]
    got = os.preadv(fd, [block], offset)
    stage[at + got : at + BLOCK] = 0


@lru_cache(maxsize=1)
def _stage_buffer(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size)  # anonymous maps are page-aligned


def _stage() -> np.ndarray:
    """The staging buffer, of :data:`STAGE_BYTES` (made again when that changes)."""
    return np.frombuffer(_stage_buffer(STAGE_BYTES), np.uint8)


class WriteBehind:
    """:func:`write_at` on a thread of its own, so the caller prepares the next bytes while the
    disk takes these (an ``O_DIRECT`` write blocks until the device has them: about 6 s of the
    11 GB a streamed 8B prune writes). At most ``max_bytes`` wait at a time (the arrays are
    held until written); an error is raised by the next :meth:`write` or by :meth:`close`.
    The thread ends with :meth:`close`, or when the object is collected unclosed."""

    def __init__(self, max_bytes: int) -> None:
        self._state = _Pending(max_bytes)
        self._thread = threading.Thread(
            target=_drain, args=(self._state,), daemon=True, name="torchslim-writer"
        )
        self._thread.start()
        weakref.finalize(self, self._state.queue.put, None)

    def write(self, path: Path, offset: int, data: np.ndarray) -> None:
        """Queue ``write_at(path, offset, data)``; ``data`` must not change until written."""
        state = self._state
        state.raise_error()
        with state.room:
            while state.waiting and state.waiting + data.nbytes > state.max_bytes:
                state.room.wait()
            state.waiting += data.nbytes
        state.queue.put((path, offset, data))

    def close(self) -> None:
        """Wait for every queued write; raise the first error one met."""
        self._state.queue.put(None)
        self._thread.join()
        self._state.raise_error()


class _Pending:
    """What the writing thread shares with its :class:`WriteBehind` (not the object itself,
    which it would keep alive)."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.queue: queue.SimpleQueue[Optional[tuple[Path, int, np.ndarray]]] = queue.SimpleQueue()
        self.room = threading.Condition()
        self.waiting = 0
        self.error: Optional[BaseException] = None

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def _drain(state: _Pending) -> None:
    while (item := state.queue.get()) is not None:
        path, offset, data = item
        try:
            if state.error is None:
                write_at(path, offset, data)
        except BaseException as error:  # handed to the caller's next write or close
            state.error = error
        finally:
            with state.room:
                state.waiting -= data.nbytes
                state.room.notify_all()
