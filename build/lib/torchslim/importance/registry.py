"""Importance criteria by name: how the CLI's ``--importance`` and recipes find them.

A criterion registers itself where it is defined::

    @register_importance("lamp")
    class LAMPImportance(MagnitudeImportance): ...

    register_importance("l1", lambda: MagnitudeImportance(p=1))
"""

from __future__ import annotations

from typing import Callable, Optional, TypeVar

Factory = Callable[[], object]
T = TypeVar("T")
_FACTORIES: dict[str, Factory] = {}


def register_importance(name: str, factory: Optional[Factory] = None) -> Callable[[T], T]:
    """Register ``factory`` (a no-argument callable making the criterion) under ``name``;
    without ``factory``, a class decorator registering the class itself."""

    def decorate(made: T) -> T:
        _FACTORIES[name] = made  # type: ignore[assignment]
        return made

    if factory is not None:
        decorate(factory)  # type: ignore[arg-type]
    return decorate


def importance_names() -> list[str]:
    """Registered names, sorted."""
    return sorted(_FACTORIES)


def make_importance(name: str) -> object:
    """A fresh criterion registered as ``name``."""
    if name not in _FACTORIES:
        raise ValueError(
            f"unknown importance {name!r}: choose one of {', '.join(importance_names())}"
        )
    return _FACTORIES[name]()
