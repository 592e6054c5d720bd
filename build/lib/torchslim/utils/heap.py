"""Handing memory the C library keeps after it was freed back to the system."""

from __future__ import annotations

import ctypes
import sys
from functools import lru_cache
from typing import Callable, Optional


def trim() -> bool:
    """Return the free parts of the C heap to the system (glibc's ``malloc_trim(0)``).

    glibc keeps memory freed by many mid-sized allocations in its heap, where it still counts
    as resident: after a streamed calibration forward (weights cast a module at a time,
    activations) over a gigabyte of it stayed, and added to the peak of the pruning step that
    follows. Returns whether anything was released; does nothing without glibc."""
    release = _malloc_trim()
    return bool(release(0)) if release is not None else False


@lru_cache(maxsize=1)
def _malloc_trim() -> Optional[Callable[[int], int]]:
    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None), "malloc_trim", None)
