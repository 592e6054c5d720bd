"""Old import paths that keep working for one release, with a deprecation warning."""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any, Callable


def moved_to(old: str, *targets: ModuleType) -> Callable[[str], Any]:
    """A module ``__getattr__`` for the old module ``old``: each name is looked up in
    ``targets`` (the modules it moved to) and handed out with a ``DeprecationWarning``."""

    def __getattr__(name: str) -> Any:
        for target in targets:
            if hasattr(target, name):
                warnings.warn(
                    f"{old}.{name} moved to {target.__name__}.{name}; "
                    "the old path will be removed in the next release",
                    DeprecationWarning,
                    stacklevel=2,
                )
                return getattr(target, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    return __getattr__
