"""Progress bars for long loops (tqdm on a terminal when installed, silent otherwise: tqdm is
optional)."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


def progress(
    items: Iterable[T],
    description: str,
    enabled: bool = True,
    unit: str = "trial",
    size: Optional[Callable[[T], float]] = None,
) -> Iterator[T]:
    """Iterate ``items`` with a tqdm bar named ``description`` when enabled and stderr is a
    terminal (logs and pipes get no carriage-return noise). With ``size`` the bar counts
    ``size(item)`` per item (bytes: ``unit="B"`` shows them scaled, with their rate)."""
    items = list(items)
    weight = size or (lambda _: 1)
    total = sum(weight(item) for item in items)
    with meter(description, total, unit, enabled) as advance:
        for item in items:
            yield item
            advance(weight(item))


@contextmanager
def meter(
    description: str, total: Optional[float] = None, unit: str = "B", enabled: bool = True
) -> Iterator[Callable[[float], Any]]:
    """A bar advanced by hand, ``advance(n)`` (bytes as they are read), with its rate;
    ``total`` may be unknown. Silent off a terminal or without tqdm."""
    enabled = enabled and sys.stderr.isatty()
    try:
        from tqdm import tqdm
    except ImportError:
        enabled = False
    if not enabled:
        yield lambda _: None
        return
    scaled = unit == "B"
    with tqdm(total=total, desc=description, unit=unit, unit_scale=scaled, leave=False) as bar:
        yield bar.update
