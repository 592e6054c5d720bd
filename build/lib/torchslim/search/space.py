"""The search space: a working copy of the model traced once, split into units that each get one
pruning ratio, and one way of pruning every configuration (importance, ignored layers, round_to).

A *unit* is a module scope: by default the root layer of each prunable group (``layer1.0.conv1``
prunes the group of that conv's output channels), or blocks given by name (``layer1``: every
group rooted inside gets the same ratio), exactly as ``MetaPruner(pruning_ratio_dict=...)``
reads them. Configurations are applied to the one traced graph and undone after each trial.
"""

from __future__ import annotations

import copy
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from torchslim.capture.modules import unwrap_model
from torchslim.graph.checkpoint import trial
from torchslim.graph.dependency import DependencyGraph
from torchslim.importance import Importance, MagnitudeImportance
from torchslim.pruner.meta import MetaPruner
from torchslim.utils.ops_counter import count_ops_and_params

EvalFn = Callable[[nn.Module], float]
Ratios = dict[str, float]


@dataclass(frozen=True)
class Unit:
    """A module scope that gets one ratio: its name, the groups it prunes and their channels."""

    name: str
    groups: tuple[str, ...]
    channels: int


class SearchSpace:
    """Prune a private copy of ``model`` by per-unit ratios, one configuration at a time.

    ``units``: module names (blocks); ``None`` gives one unit per group root. ``ignored_layers``
    takes module names, modules of ``model`` or module types. ``round_to`` is MetaPruner's.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        units: Optional[Sequence[str]] = None,
        importance: Optional[Importance] = None,
        ignored_layers: Optional[Iterable[Union[str, nn.Module, type]]] = None,
        round_to: Optional[int] = None,
        forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    ) -> None:
        original = unwrap_model(model)
        self.model = copy.deepcopy(original).eval()
        self.example_inputs = example_inputs
        self.importance = importance if importance is not None else MagnitudeImportance(p=2)
        self.round_to = round_to
        self.forward_fn = forward_fn
        self.modules = dict(self.model.named_modules())
        self._ignored = _ignored_in_copy(original, self.modules, ignored_layers or [])
        self.graph = DependencyGraph().build_dependency(
            self.model, example_inputs, forward_fn=forward_fn
        )
        self.roots = self._roots()
        if not self.roots:
            raise ValueError("the model has no prunable group (all frozen or ignored)")
        self.units = self.roots if units is None else self._scoped(units)
        self.dense_macs, self.dense_params = self.count()

    # ------------------------------------------------------------------------------ units

    def _roots(self) -> list[Unit]:
        found: dict[str, list[tuple[str, int]]] = {}
        for group in self.pruner({}).groups():
            found.setdefault(group.root.ref.module_name, []).append((group.root.label, group.size))
        return [
            Unit(name, tuple(label for label, _ in groups), sum(size for _, size in groups))
            for name, groups in found.items()
        ]

    def _scoped(self, names: Sequence[str]) -> list[Unit]:
        names = list(names)
        for name in names:
            if name not in self.modules:
                raise ValueError(f"unit {name!r} names no module of the model")
        for a in names:
            for b in names:
                if a != b and _inside(b, a):
                    raise ValueError(f"units {a!r} and {b!r} overlap; give disjoint scopes")
        units = []
        for name in names:
            roots = [r for r in self.roots if _inside(r.name, name)]
            if not roots:
                raise ValueError(f"unit {name!r} holds no prunable group")
            groups = tuple(g for r in roots for g in r.groups)
            units.append(Unit(name, groups, sum(r.channels for r in roots)))
        return units

    def unit(self, name: str) -> Unit:
        for unit in self.units:
            if unit.name == name:
                return unit
        raise ValueError(f"unknown unit {name!r}; units are {', '.join(self.names)}")

    @property
    def names(self) -> list[str]:
        return [u.name for u in self.units]

    def root_ratios(self, ratios: Ratios) -> Ratios:
        """The same configuration with one ratio per group root (blocks expanded)."""
        self.check(ratios)
        return {
            root.name: ratio
            for name, ratio in ratios.items()
            for root in self.roots
            if _inside(root.name, name)
        }

    # ------------------------------------------------------------------------- pruning

    def check(self, ratios: Ratios) -> None:
        """Clear errors for unknown units and ratios outside [0, 1)."""
        known = {u.name for u in self.units} | {r.name for r in self.roots}
        for name, ratio in ratios.items():
            if name not in known:
                raise ValueError(f"unknown unit {name!r}; units are {', '.join(self.names)}")
            if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
                raise ValueError(f"ratio for unit {name!r} must be in [0, 1), got {ratio!r}")

    def pruner(self, ratios: Ratios, round_to: Optional[int] = None) -> MetaPruner:
        return MetaPruner(
            self.model,
            self.example_inputs,
            importance=self.importance,
            pruning_ratio=0.0,
            pruning_ratio_dict={self.modules[n]: r for n, r in ratios.items() if r > 0},
            ignored_layers=self._ignored,
            round_to=round_to if round_to is not None else self.round_to,
            forward_fn=self.forward_fn,
            graph=self.graph,
        )

    @contextmanager
    def trial(self, ratios: Ratios, round_to: Optional[int] = None) -> Iterator[nn.Module]:
        """The working model pruned by ``ratios`` inside the block, dense again after it."""
        self.check(ratios)
        with trial(self.graph):
            self.pruner(ratios, round_to).step()
            yield self.model

    def export(self, ratios: Ratios, round_to: Optional[int] = None) -> nn.Module:
        """A pruned copy of the model (with its pruning plan, for ``tp.save_pruned``)."""
        with self.trial(ratios, round_to) as model:
            return copy.deepcopy(model)

    def count(self) -> tuple[int, int]:
        """MACs and parameters of the working model as it is now."""
        with torch.no_grad():
            return count_ops_and_params(self.model, self.example_inputs, self.forward_fn)

    def widths(self) -> dict[str, list[int]]:
        """Channels left in each group root's groups, as the working model is now."""
        found: dict[str, list[int]] = {}
        for group in self.pruner({}).groups():
            found.setdefault(group.root.ref.module_name, []).append(group.size)
        return found

    def channels(self, unit: str) -> int:
        """Channels left in the groups of ``unit``, as the working model is now."""
        return sum(sum(w) for root, w in self.widths().items() if _inside(root, unit))


def keep_ratio(size: int, keep: int) -> float:
    """The ratio that leaves exactly ``keep`` of ``size`` channels (MetaPruner floors
    ``size * ratio``; the half channel keeps float rounding from changing the count)."""
    if not 1 <= keep <= size:
        raise ValueError(f"cannot keep {keep} of {size} channels")
    return (size - keep + 0.5) / size if keep < size else 0.0


def evaluate(eval_fn: EvalFn, model: nn.Module) -> float:
    """``eval_fn(model)`` in eval mode without autograd, checked to be a finite number."""
    model.eval()
    with torch.no_grad():
        value = eval_fn(model)
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise TypeError(f"eval_fn must return a number, got {type(value).__name__}") from error
    if not math.isfinite(number):
        raise ValueError(f"eval_fn returned {number}; it must return a finite number")
    return number


def _inside(name: str, scope: str) -> bool:
    return name == scope or scope == "" or name.startswith(scope + ".")


def _ignored_in_copy(
    original: nn.Module, modules: dict[str, nn.Module], ignored: Iterable[Any]
) -> list[Any]:
    names = {id(m): n for n, m in original.named_modules()}
    found: list[Any] = []
    for item in ignored:
        if isinstance(item, type):
            found.append(item)
        elif isinstance(item, str) and item in modules:
            found.append(modules[item])
        elif isinstance(item, nn.Module) and id(item) in names:
            found.append(modules[names[id(item)]])
        else:
            raise ValueError(
                f"ignored_layers takes module names, modules of the model or types, got {item!r}"
            )
    return found
