"""Printing a benchmark's markdown table and writing it where the README's figures come from."""

from __future__ import annotations

from pathlib import Path
from typing import Optional


def publish(lines: list[str], footer: str, path: Optional[Path]) -> None:
    """Print the table and its footer; also write them to ``path`` when given."""
    text = "\n".join([*lines, "", footer])
    print(text)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
