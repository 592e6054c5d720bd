"""Writing around the page cache, writing behind, reading ahead, recycled slice memory, and
freed heap memory handed back."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from torchslim.pruning import take as take_module
from torchslim.utils import readahead, uncached


def _ranges(size: int, seed: int) -> list[tuple[int, int]]:
    """Adjacent ranges covering ``size`` bytes, of odd lengths across block boundaries,
    shuffled (a shard's tensors are written in the order their plans become final)."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.choice(np.arange(1, size), 12, replace=False))
    bounds = [0, *cuts.tolist(), size]
    ranges = list(zip(bounds, bounds[1:]))
    rng.shuffle(ranges)
    return ranges


def _takes_direct(folder) -> bool:
    probe = folder / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_RDWR | getattr(os, "O_DIRECT", 0)))
    except OSError:
        return False
    return hasattr(os, "O_DIRECT")


@pytest.mark.parametrize("direct", [True, False])
def test_ranges_written_in_any_order_leave_exactly_their_bytes(tmp_path, monkeypatch, direct):
    monkeypatch.setattr(uncached, "STAGE_BYTES", 3 * uncached.BLOCK)  # ranges span stages
    calls = []
    original = uncached._write_direct
    monkeypatch.setattr(uncached, "_write_direct", lambda *a: calls.append(a) or original(*a))
    if not direct:  # a file system that refuses O_DIRECT at open (tmpfs)
        real_open = os.open
        monkeypatch.setattr(
            uncached.os,
            "open",
            lambda path, flags, *a: (
                (_ for _ in ()).throw(OSError(errno.EINVAL, "no O_DIRECT"))
                if flags & getattr(os, "O_DIRECT", 0)
                else real_open(path, flags, *a)
            ),
        )
    size = 40 * uncached.BLOCK + 123
    expected = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    path = tmp_path / "shard"
    path.write_bytes(b"\xff" * 37)
    with open(path, "r+b") as handle:
        handle.truncate(size)
    ranges = _ranges(size, 1)
    for start, end in ranges:
        uncached.write_at(path, start, expected[start:end])
    assert path.stat().st_size == size
    assert np.array_equal(np.fromfile(path, np.uint8), expected)
    if direct:
        if not _takes_direct(tmp_path):
            pytest.skip("this temporary folder's file system refuses O_DIRECT")
        large = sum(end - start >= uncached.BLOCK for start, end in ranges)
        assert len(calls) == large >= 6  # ranges of a block or more go around the page cache
    else:
        assert calls == []


def test_a_direct_write_the_file_system_refuses_is_written_through_the_cache(tmp_path, monkeypatch):
    def refuse(*_):
        raise OSError(errno.EINVAL, "refused")

    monkeypatch.setattr(uncached, "_write_direct", refuse)
    path = tmp_path / "shard"
    path.write_bytes(bytes(3 * uncached.BLOCK))
    data = np.arange(2 * uncached.BLOCK, dtype=np.uint8)
    uncached.write_at(path, 5, data)
    written = np.fromfile(path, np.uint8)
    assert np.array_equal(written[5 : 5 + len(data)], data) and not written[:5].any()
    assert len(written) == 3 * uncached.BLOCK


def test_writes_behind_land_in_order_within_their_byte_bound_and_errors_reach_the_caller(
    tmp_path, monkeypatch
):
    path = tmp_path / "out"
    path.write_bytes(bytes(64))
    writes = uncached.WriteBehind(max_bytes=16)
    seen = []
    original = uncached.write_at

    def slow(path, offset, data):
        seen.append(writes._state.waiting)
        time.sleep(0.01)
        original(path, offset, data)

    monkeypatch.setattr(uncached, "write_at", slow)
    for offset in range(0, 64, 8):
        writes.write(path, offset, np.full(8, offset, np.uint8))
    writes.close()
    assert np.array_equal(np.fromfile(path, np.uint8), np.repeat(np.arange(0, 64, 8), 8))
    assert max(seen) <= 16 and len(seen) == 8

    failing = uncached.WriteBehind(max_bytes=1 << 20)
    failing.write(tmp_path / "missing" / "file", 0, np.zeros(4, np.uint8))
    with pytest.raises(OSError):
        failing.close()


def test_an_abandoned_writer_s_thread_ends():
    writes = uncached.WriteBehind(max_bytes=1 << 20)
    thread = writes._thread
    del writes
    thread.join(timeout=5)
    assert not thread.is_alive()


def test_slices_reuse_the_memory_of_dead_slices_of_their_size_and_never_a_live_one(monkeypatch):
    monkeypatch.setattr(take_module, "_HUGE_BYTES", 1 << 16)
    source = torch.randn(256, 512)
    rows = torch.arange(0, 256, 2)  # 128 x 512 float32: 256 KiB
    outside = take_module.take(source, 0, rows)
    with take_module.recycling(max_bytes=1 << 19):
        first = take_module.take(source, 0, rows)
        address = first.data_ptr()
        kept = take_module.take(source, 0, rows)  # ``first`` lives: fresh memory
        assert kept.data_ptr() != address
        del first
        again = take_module.take(source, 1, torch.arange(0, 512, 2))  # 256 x 256: same size
        assert again.data_ptr() == address
        assert torch.equal(again, source[:, ::2]) and torch.equal(kept, source[::2])
        del kept, again
        assert take_module._RECYCLER.held <= 1 << 19
    assert take_module._RECYCLER is None
    assert torch.equal(outside, source[::2])


def test_recycled_memory_is_bounded_oldest_out_and_dropped_with_the_block(monkeypatch):
    monkeypatch.setattr(take_module, "_HUGE_BYTES", 1 << 16)
    source = torch.randn(512, 512)
    with take_module.recycling(max_bytes=600 << 10):
        recycler = take_module._RECYCLER
        take_module.take(source, 0, torch.arange(128))  # rows of 2 KiB: 256 KiB, dies at once
        alive = take_module.take(source, 0, torch.arange(128))  # its memory again
        assert not recycler.free and recycler.held == 0
        for count in (160, 192, 350):  # 320, 384 and 700 KiB, each dying at once
            take_module.take(source, 0, torch.arange(count))
        assert list(recycler.free) == [384 << 10] and recycler.held == 384 << 10
        del alive  # 256 KiB more: the oldest, 384 KiB, goes
        assert list(recycler.free) == [256 << 10] and recycler.held == 256 << 10
    assert recycler.held == 0 and not recycler.free


def test_reading_ahead_asks_for_each_file_in_order_within_its_window(tmp_path, monkeypatch):
    step = readahead.STEP
    files = [tmp_path / "a", tmp_path / "b"]
    files[0].write_bytes(bytes(3 * step + 5))
    files[1].write_bytes(bytes(step))
    asked = []
    monkeypatch.setattr(
        readahead.os, "posix_fadvise", lambda fd, offset, length, advice: asked.append(offset)
    )
    consumed = [0]
    with readahead.Readahead(files, lambda: consumed[0], window=step) as ahead:
        deadline = time.time() + 5
        while len(asked) < 2 and time.time() < deadline:
            time.sleep(0.01)
        time.sleep(0.05)
        assert asked == [0, step]  # a window's worth, then it waits for the reader
        consumed[0] = 10 * step
        while ahead.thread.is_alive() and time.time() < deadline:
            time.sleep(0.01)
    assert asked == [0, step, 2 * step, 3 * step, 0]


def test_reading_ahead_stops_with_its_block_while_it_waits(tmp_path, monkeypatch):
    big = tmp_path / "big"
    with open(big, "wb") as handle:
        handle.truncate(100 * readahead.STEP)
    asked = []
    monkeypatch.setattr(readahead.os, "posix_fadvise", lambda fd, offset, *_: asked.append(offset))
    with readahead.Readahead([big], lambda: 0, window=readahead.STEP) as ahead:
        time.sleep(0.05)
    assert not ahead.thread.is_alive() and asked == [0, readahead.STEP]


def test_a_discarded_shard_writer_s_queued_writes_never_reach_the_files_written_anew(
    tmp_path, monkeypatch
):
    from torchslim.hf.shards import ShardWriter

    original = uncached.write_at

    def slow(path, offset, data):
        if data[3] == 0x3F:  # the old writer's float 1.0: still queued when the new one writes
            time.sleep(0.05)
        original(path, offset, data)

    monkeypatch.setattr(uncached, "write_at", slow)
    layout = [(f"t{i}", (256,), torch.float32) for i in range(4)]
    old = ShardWriter(tmp_path, 1 << 20, layout)
    for name, _, _ in layout:
        old.add(name, torch.full((256,), 1.0))
    old.discard()
    for file in tmp_path.glob("*.safetensors"):
        file.unlink()
    new = ShardWriter(tmp_path, 1 << 20, layout)
    for name, _, _ in layout:
        new.add(name, torch.full((256,), 2.0))
    new.close()
    time.sleep(0.3)  # any write the old writer still held would have landed by now
    from safetensors.torch import load_file

    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[name], torch.full((256,), 2.0)) for name, _, _ in layout)


def _resident_anonymous() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


def test_freed_heap_memory_goes_back_to_the_system():
    from torchslim.utils import heap

    if heap._malloc_trim() is None or not Path("/proc/self/status").exists():
        pytest.skip("no glibc malloc_trim here: trim does nothing")
    blocks = [np.ones(64 << 10, np.uint8) for _ in range(3000)]  # 64 KiB: from the heap
    last = blocks[-1]  # the top of the heap stays in use, so free() cannot shrink it
    del blocks
    before = _resident_anonymous()
    assert heap.trim()
    assert before - _resident_anonymous() > 64 << 20  # of 192 MiB freed
    assert last.sum() == 64 << 10
