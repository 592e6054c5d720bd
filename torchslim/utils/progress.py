"""Progress bars for long loops (tqdm on a terminal when installed, silent otherwise: tqdm is
optional)."""

from __future__ import annotations

import sys
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T], description: str, enabled: bool = True, unit: str = "trial"
) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar named ``description`` when enabled and stderr is a
    terminal (logs and pipes get no carriage-return noise)."""
    items = list(items)
    enabled = enabled and sys.stderr.isatty()
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            enabled = False
    yield from tqdm(items, desc=description, unit=unit, leave=False) if enabled else items
