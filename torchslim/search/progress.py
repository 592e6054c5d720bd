"""Progress bars for long searches (tqdm when installed, silent otherwise)."""

from __future__ import annotations

from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], description: str, enabled: bool = True) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar named ``description`` (to stderr) when enabled."""
    items = list(items)
    if enabled:
        try:
            from tqdm import tqdm
        except ImportError:
            enabled = False
    yield from tqdm(items, desc=description, unit="trial", leave=False) if enabled else items
