"""Int attributes that the forward uses as sizes (``self.head_dim``, ``self.num_heads``,
``self.config.num_attention_heads``): found while tracing, updated after pruning.

During the trace every int attribute of every module, and every int field of a module's
``config``, reads as a :class:`~torchslim.spaces.symbolic.TrackedInt` whose expression names an
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

from torchslim.spaces.symbolic import TrackedInt

CONFIG_PREFIX = "config."
#: Where a module that wrote a config field keeps the config it shared before taking its own
#: copy (for the model itself: its config before pruning).
SHARED_CONFIG = "_torchslim_shared_config"
#: The names of the config fields written on a module's own copy (``{"hidden_sizes"}``).
WRITTEN_CONFIG_FIELDS = "_torchslim_written_config_fields"


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


def _is_int(value: Any) -> bool:
    return type(value) is int


def _int_fields(obj: Any) -> list[tuple[str, Any]]:
    """Int attributes, and tuples or lists of ints (``self.shape = (dim, 1, 1)``)."""
    return [
        (name, value)
        for name, value in vars(obj).items()
        if not name.startswith("__")
        and (
            _is_int(value)
            or (isinstance(value, (tuple, list)) and value and all(map(_is_int, value)))
        )
    ]


def _tracked_value(
    slots: dict[tuple[int, str], AttributeSlot],
    module_name: str,
    module: nn.Module,
    name: str,
    value: Any,
) -> Any:
    """The value to read while tracing: tracked ints, element by element for sequences."""
    if _is_int(value):
        slot = slots.get((id(module), name))
        if slot is None:
            slot = slots[id(module), name] = AttributeSlot(module_name, module, name, value)
        return slot.tracked()
    return type(value)(
        _tracked_value(slots, module_name, module, f"{name}[{i}]", item)
        for i, item in enumerate(value)
    )


@contextmanager
def tracked_attributes(
    model: nn.Module, slots: dict[tuple[int, str], AttributeSlot]
) -> Iterator[None]:
    """Make int attributes (and config fields) of every module read as tracked ints.

    ``slots`` persists across traces of the same model (eval, then train mode), so both runs
    bind the same slots. Every attribute gets its value back on exit, even one the forward
    changed, and ints the forward stored on modules lose their tracking: tracing leaves no trace.
    """
    restore: list[tuple[dict, str, Any]] = []
    for module_name, module in model.named_modules():
        state = vars(module)
        for name, value in _int_fields(module):
            tracked = _tracked_value(slots, module_name, module, name, value)
            restore.append((state, name, value))
            state[name] = tracked
        config = state.get("config")
        if config is None or isinstance(config, nn.Module) or not hasattr(config, "__dict__"):
            continue
        reading = copy.copy(config)
        for name, value in _int_fields(config):
            tracked = _tracked_value(slots, module_name, module, CONFIG_PREFIX + name, value)
            vars(reading)[name] = tracked
        restore.append((state, "config", config))
        state["config"] = reading
    try:
        yield
    finally:
        for state, name, value in reversed(restore):
            state[name] = value
        for module in model.modules():
            state = vars(module)
            for name, value in list(state.items()):
                if isinstance(value, TrackedInt):
                    state[name] = int(value)
                elif isinstance(value, (tuple, list)) and any(
                    isinstance(v, TrackedInt) for v in value
                ):
                    state[name] = type(value)(
                        int(v) if isinstance(v, TrackedInt) else v for v in value
                    )


def _owner_and_field(module: nn.Module, name: str, writing: bool) -> tuple[dict, str]:
    """The ``__dict__`` holding an attribute, and its key there. Writing a config field gives
    the module its own copy of its config first, so modules sharing the config are not
    affected, and names the field among those written."""
    state = vars(module)
    if not name.startswith(CONFIG_PREFIX):
        return state, name
    key = name[len(CONFIG_PREFIX) :]
    if writing:
        if SHARED_CONFIG not in state:
            state[SHARED_CONFIG] = state["config"]
            state["config"] = copy.copy(state["config"])
        state.setdefault(WRITTEN_CONFIG_FIELDS, set()).add(split_index(key)[0])
    return vars(state["config"]), key


def split_index(key: str) -> tuple[str, Optional[int]]:
    """``"shape[0]"`` -> ``("shape", 0)``; a plain name -> ``(name, None)``."""
    if key.endswith("]") and "[" in key:
        base, _, index = key[:-1].rpartition("[")
        return base, int(index)
    return key, None


def set_attribute(module: nn.Module, name: str, value: int) -> None:
    """Set an int attribute, an element of a tuple/list attribute (``"shape[0]"``), or a
    config field (``"config.head_dim"``) of ``module``."""
    holder, key = _owner_and_field(module, name, writing=True)
    key, index = split_index(key)
    if index is None:
        holder[key] = int(value)
        return
    items = list(holder[key])
    items[index] = int(value)
    holder[key] = type(holder[key])(items)


def get_attribute(module: nn.Module, name: str) -> Optional[int]:
    try:
        holder, key = _owner_and_field(module, name, writing=False)
    except KeyError:
        return None
    key, index = split_index(key)
    value = holder.get(key)
    return value if index is None or value is None else value[index]
