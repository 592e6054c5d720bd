"""Python's cyclic garbage collector, paused while the graph does bulk bookkeeping."""

from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def collection_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off inside the block (as it was before afterwards):
    a trace, a group's pruning or a forward check allocates thousands of short-lived objects,
    and the collections they trigger rescan the objects of the process (5-25% of a graph
    build, more in a process holding many objects). Objects freed by reference counting go at
    once as ever; only reference cycles wait for the block's end."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()
