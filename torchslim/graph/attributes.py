"""Int attributes that the forward uses as sizes (``self.head_dim``, ``self.num_heads``,
``self.config.num_attention_heads``): found while tracing, updated after pruning.

During the trace every int attribute of every module, and every int field of a module's
``config``, reads as a :class:`~torchslim.graph.symbolic.TrackedInt` whose expression names an
:class:`AttributeSlot`. When such a value fixes the size of some positions (a ``view`` size, a
split size, a slice bound), the graph learns which positions the attribute counts, so pruning
those positions can set the attribute to the surviving count instead of freezing them as a
hard-coded size. A module's ``config`` is read through a per-module copy, so a layer whose width
differs from the others gets its own config values.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from torch import nn

from torchslim.graph.symbolic import TrackedInt

CONFIG_PREFIX = "config."
OWNS_CONFIG_FLAG = "_torchslim_owns_config"


@dataclass(eq=False)
class AttributeSlot:
    """One int attribute of one module (``name`` is ``"config.<field>"`` for config fields)."""

    module_name: str
    module: nn.Module
    name: str
    value: int
    layout: Any = None  # the DimLayout of the positions it counts, once used as a size
    uses: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return f"{self.module_name}.{self.name}" if self.module_name else self.name

    def tracked(self) -> TrackedInt:
        return TrackedInt(self.value, ("attr", self))


def _int_fields(obj: Any) -> list[tuple[str, int]]:
    return [
        (name, value)
        for name, value in vars(obj).items()
        if type(value) is int and not name.startswith("__")
    ]


@contextmanager
def tracked_attributes(
    model: nn.Module, slots: dict[tuple[int, str], AttributeSlot]
) -> Iterator[None]:
    """Make int attributes (and config fields) of every module read as tracked ints.

    ``slots`` persists across traces of the same model (eval, then train mode), so both runs
    bind the same slots. Everything is restored on exit.
    """
    restore: list[tuple[dict, str, Any]] = []
    for module_name, module in model.named_modules():
        state = vars(module)
        for name, value in _int_fields(module):
            slot = slots.setdefault(
                (id(module), name), AttributeSlot(module_name, module, name, value)
            )
            restore.append((state, name, value))
            state[name] = slot.tracked()
        config = state.get("config")
        if config is None or isinstance(config, nn.Module) or not hasattr(config, "__dict__"):
            continue
        reading = copy.copy(config)
        for name, value in _int_fields(config):
            key = (id(module), CONFIG_PREFIX + name)
            slot = slots.setdefault(
                key, AttributeSlot(module_name, module, CONFIG_PREFIX + name, value)
            )
            vars(reading)[name] = slot.tracked()
        restore.append((state, "config", config))
        state["config"] = reading
    try:
        yield
    finally:
        for state, name, value in reversed(restore):
            current = state.get(name)
            if name == "config" or isinstance(current, TrackedInt):
                state[name] = value


def set_attribute(module: nn.Module, name: str, value: int) -> None:
    """Set a module attribute, or a config field through the module's own copy of its config
    (made on first write, so other modules sharing the config are not affected)."""
    if not name.startswith(CONFIG_PREFIX):
        setattr(module, name, int(value))
        return
    state = vars(module)
    if not state.get(OWNS_CONFIG_FLAG, False):
        state["config"] = copy.copy(state["config"])
        state[OWNS_CONFIG_FLAG] = True
    vars(state["config"])[name[len(CONFIG_PREFIX) :]] = int(value)


def get_attribute(module: nn.Module, name: str) -> Optional[int]:
    if name.startswith(CONFIG_PREFIX):
        return getattr(getattr(module, "config", None), name[len(CONFIG_PREFIX) :], None)
    return getattr(module, name, None)
