"""The public dependency graph: build it from one forward pass, get coupled groups, prune them.

The API follows the one users know (``DependencyGraph().build_dependency``,
``get_pruning_group``, ``get_all_groups``, ``Group.prune``, iteration as ``(dep, idxs)``); the
groups underneath come from the exact index-space analysis in :mod:`.analysis`.
"""

from __future__ import annotations

import logging
from collections import namedtuple
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from torchslim.capture.modules import call_forward, unwrap_model
from torchslim.capture.recorder import run_traced
from torchslim.capture.twin import swapped_to_meta, to_meta
from torchslim.graph.blocks import Block, residual_blocks
from torchslim.graph.checkpoint import Checkpoint
from torchslim.graph.collector import collection_paused
from torchslim.graph.forward_check import ForwardCheck, ForwardFailure
from torchslim.graph.hooks import run_prune_hooks
from torchslim.graph.record import model_history, model_record
from torchslim.graph.state import Positions, PruningState, Removed
from torchslim.ops.experts import is_routed_experts
from torchslim.pruning.functions import BasePruningFunc, ParameterHandler
from torchslim.pruning.layers import get_pruner, is_linear_like, role_of
from torchslim.pruning.reparametrised import resolve as resolve_reparametrised
from torchslim.pruning.roles import Role
from torchslim.spaces.analysis import Analysis, Coupling, ParamDim, lookup
from torchslim.spaces.attributes import get_attribute, set_attribute
from torchslim.spaces.integers import distinct, first_occurrences
from torchslim.spaces.layout import opaque
from torchslim.spaces.trace import TraceState, Unsupported, iter_tensors

ForwardFn = Callable[[nn.Module, Any], Any]
Handled = tuple[Optional[Callable], Optional[Role]]
#: a member's layer name, layer, tensor name and dim (see :meth:`DependencyGraph.pruned_through`)
Through = tuple[str, nn.Module, str, Optional[int]]
LOG = logging.getLogger("torchslim")

#: Layers whose outputs root the groups ``get_all_groups`` yields (torch-pruning's default:
#: convolutions, linear and recurrent layers).
ROOT_TYPES: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear, nn.RNNBase, nn.RNNCellBase)


@dataclass(frozen=True)
class Node:
    """A module of the model, named by its qualified path."""

    module: nn.Module
    name: str

    def __str__(self) -> str:
        return self.name or "<model>"


@dataclass(frozen=True)
class Dependency:
    """Pruning ``source`` triggers ``handler`` on ``target`` (on the positions given with it)."""

    trigger: Callable
    handler: Callable
    source: Node
    target: Node

    def __call__(self, idxs: Sequence[int]) -> Any:
        return self.handler(self.target.module, idxs)

    def __str__(self) -> str:
        return (
            f"{_fn_name(self.trigger)} on {self.source} => {_fn_name(self.handler)} on "
            f"{self.target} ({type(self.target.module).__name__})"
        )


def _fn_name(fn: Callable) -> str:
    return getattr(fn, "__name__", None) or type(fn).__name__


class GroupItem(namedtuple("GroupItem", ["dep", "idxs"])):
    """One dependency of a group with the positions it removes there: the named tuple
    ``(dep, idxs)`` torch-pruning scripts index and unpack (``dep, idxs = group[0]``), and
    ``root_idxs``, the group index of each of those positions."""

    def __new__(cls, dep: Dependency, idxs: list[int], root_idxs: Sequence[int] = ()):
        item = super().__new__(cls, dep, idxs)
        item.root_idxs = list(root_idxs)
        return item


class Group:
    """A set of coupled channels across layers, with the indices to remove from each.

    ``idxs`` index the group's channels: for a plain layer these are its output channels; for a
    dim built from factors (attention heads, channel-shuffle groups) one index is one factor
    value. Iterating yields ``(dep, idxs)`` pairs with positions in each layer's own dim.
    """

    def __init__(
        self, graph: DependencyGraph, coupling: Coupling, root: ParamDim, idxs: Sequence[int]
    ):
        self._graph = graph
        self.coupling = coupling
        self.root = root
        self._refused: Optional[tuple[Removed, int, tuple[int, ...], Optional[str]]] = None
        self._positions: Optional[tuple[Removed, int, tuple[int, ...], Positions]] = None
        self.select(idxs)

    @property
    def graph(self) -> DependencyGraph:
        """The dependency graph this group belongs to."""
        return self._graph

    @property
    def size(self) -> int:
        """Number of channels (index values) in the whole group."""
        return self._graph.live_count(self.coupling)

    @property
    def items(self) -> list[GroupItem]:
        if self._items is None:
            self._items = self._graph.group_items(
                self.coupling, self.root, self.idxs, self.positions(self.idxs)
            )
        return self._items

    def positions(self, idxs: Sequence[int]) -> Positions:
        """For each member (by ``id``), the positions removing ``idxs`` deletes from it. The
        last answer is kept while the graph's pruning state is the same: checking, listing and
        removing a selection ask for the same positions."""
        stamp = self._stamp(idxs)
        if _current(self._positions, stamp):
            return self._positions[3]
        live = self._graph.live_classes(self.coupling)
        removed = np.array([live[i] for i in stamp[2] if 0 <= i < len(live)], np.int64)
        found = {id(m): m.positions_of(removed) for m in self.coupling.members}
        self._positions = (*stamp, found)
        return found

    def _stamp(self, idxs: Sequence[int]) -> tuple[Removed, int, tuple[int, ...]]:
        """What an answer about ``idxs`` depends on: the pruning state (its removed classes,
        replaced at every step, and its number of steps) and the indices."""
        state = self._graph._require_state()
        return state.removed, len(state.history), tuple(idxs)

    def __iter__(self) -> Iterator[GroupItem]:
        return iter(self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, k: int) -> GroupItem:
        return self.items[k]

    @property
    def mixing(self) -> set[str]:
        """Reasons why pruning this group is not exactly equivalent (normalisations...).
        None for experts: removing one is exact against the model whose router never selects
        it, whatever mixes the router's logits (a softmax over the experts)."""
        return set() if self.routes_experts else set(self.coupling.mixing)

    @property
    def routes_experts(self) -> bool:
        """Whether the channels are the experts of a routed-experts layer (the leading dim of
        its fused weights, with the router rows that select them)."""
        return any(m.dim == 0 and is_routed_experts(m.ref.module) for m in self.coupling.members)

    @property
    def prunable_idxs(self) -> list[int]:
        """Group indices that may be removed (not frozen by an op, input or output)."""
        classes = self._graph.live_classes(self.coupling)
        return [i for i, c in enumerate(classes) if c not in self.coupling.frozen]

    def refusal(self, idxs: Optional[Sequence[int]] = None) -> Optional[str]:
        """Why these indices cannot be removed, or ``None`` if they can. The last answer is
        kept while the graph's pruning state is the same (a pruner checks its selection, then
        pruning checks it again)."""
        stamp = self._stamp(self.idxs if idxs is None else idxs)
        if _current(self._refused, stamp):
            return self._refused[3]
        reason = self._graph.refusal(self.coupling, stamp[2], self.positions(stamp[2]))
        self._refused = (*stamp, reason)
        return reason

    def select(self, idxs: Sequence[int]) -> Group:
        """Make ``idxs`` the indices this group removes (items are recomputed lazily)."""
        ordered = isinstance(idxs, range) and idxs.step > 0
        self.idxs = list(idxs) if ordered else sorted({int(i) for i in idxs})
        self._items: Optional[list[GroupItem]] = None
        return self

    def prune(self, idxs: Optional[Sequence[int]] = None, record_history: bool = True) -> None:
        """Remove ``idxs`` (default: the indices the group was created with) everywhere."""
        if idxs is not None:
            self.select(idxs)
        self._graph.prune_group(self, record_history)

    def selected_classes(self) -> list[int]:
        """The classes ``idxs`` stand for: stable ids of the selected channels, which stay valid
        while other channels of the group are pruned (see :meth:`DependencyGraph.group_of`)."""
        live = self._graph.live_classes(self.coupling)
        return [live[i] for i in self.idxs]

    def removed_positions(self, idxs: Sequence[int]) -> list[tuple[ParamDim, np.ndarray]]:
        """For every coupled parameter dim, the positions removing ``idxs`` would delete."""
        live = self._graph.live_classes(self.coupling)
        removed = np.array([live[i] for i in idxs], np.int64)
        found = [(m, m.positions_of(removed)) for m in self.coupling.members]
        return [(m, p) for m, p in found if p.size]

    def index_maps(self) -> list[tuple[ParamDim, np.ndarray]]:
        """For every coupled parameter dim, the group index of each of its positions (-1 where a
        position belongs to no channel of this group). Importance criteria score positions and
        add them up per group index with this map."""
        live = np.asarray(self._graph.live_classes(self.coupling), np.int64)
        order = np.argsort(live)
        sorted_live = live[order]
        maps = []
        for member in self.coupling.members:
            terms = member.terms
            if terms.shape[1] == 0 or not live.size:
                continue
            slot, hit = lookup(sorted_live, terms)
            index = np.where(hit, order[slot], -1)
            if terms.shape[1] == 1:
                first = index[:, 0]
            else:
                first = np.where(hit.any(axis=1), index.max(axis=1, initial=-1), -1)
            if (first >= 0).any():
                maps.append((member, first))
        return maps

    def handler_role(self, member: ParamDim) -> Optional[str]:
        """:class:`~torchslim.pruning.roles.Role` ``OUT``, ``IN`` or ``PARAM``: how this member's
        layer is pruned."""
        return self._graph.pruning_function(member)[1]

    def has_dep(self, dep: Dependency) -> bool:
        return any(item.dep == dep for item in self.items)

    def has_pruning_op(self, dep: Dependency, idxs: Sequence[int]) -> bool:
        return any(item.dep == dep and set(idxs) <= set(item.idxs) for item in self.items)

    def details(self) -> str:
        lines = ["-" * 32, " " * 10 + "Pruning Group", "-" * 32]
        for k, item in enumerate(self.items):
            tag = " (Pruning Root)" if k == 0 else ""
            lines.append(f"[{k}] {item.dep}, idxs ({len(item.idxs)})={item.idxs}{tag}")
        if self.mixing:
            lines.append("not exactly equivalent: " + "; ".join(sorted(self.mixing)))
        lines.append("-" * 32)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.details()

    exec = prune


PruningPlan = Group


def _current(known: Optional[tuple[Any, ...]], stamp: tuple[Removed, int, tuple[int, ...]]) -> bool:
    """Whether an answer kept with its :meth:`Group._stamp` still holds."""
    return known is not None and known[0] is stamp[0] and known[1:3] == stamp[1:]


@dataclass(frozen=True)
class _Walk:
    """The groups one walk over the model found, and the pruning state it walked."""

    removed: Removed
    steps: int
    groups: list[tuple[Coupling, ParamDim]]


class DependencyGraph:
    """Which parameters of a model are coupled, found from one traced forward pass."""

    def __init__(self) -> None:
        self.model: Optional[nn.Module] = None
        self.analysis: Optional[Analysis] = None
        self.customized_pruners: dict[Any, BasePruningFunc] = {}
        self.ignored_params: list[nn.Parameter] = []
        #: What pruning through this graph changed (removed classes, terms, ties, steps).
        self.state: Optional[PruningState] = None
        self._deferred = 0
        self._pending = False
        self._unsupported: list[Unsupported] = []
        self._calls = 0
        self.traced_on_meta = False
        self.notes: list[str] = []
        #: Children of ``ModuleList`` / ``Sequential`` containers, and whether each can be
        #: removed whole (see :mod:`torchslim.graph.blocks`).
        self.blocks: list[Block] = []
        self._handlers: dict[tuple[int, str, int], tuple[nn.Module, Handled, Through]] = {}
        self._walks: dict[tuple[Any, ...], _Walk] = {}
        #: Per walk key, the parameter dims groups may be rooted at (fixed for a graph; the
        #: couplings they hold are found again in each pruning state).
        self._rooted: dict[tuple[Any, ...], list[ParamDim]] = {}
        #: Run after each ``Group.prune`` outside a pruner's step (see :meth:`forward_failure`);
        #: set to ``None`` to skip.
        self.forward_check: Optional[ForwardCheck] = None

    # ------------------------------------------------------------------------- building

    def build_dependency(
        self,
        model: nn.Module,
        example_inputs: Any,
        forward_fn: Optional[ForwardFn] = None,
        output_transform: Optional[Callable[[Any], Any]] = None,
        unwrapped_parameters: Any = None,
        customized_pruners: Optional[dict[Any, BasePruningFunc]] = None,
        ignored_params: Optional[Iterable[nn.Parameter]] = None,
        verbose: bool = True,
        trace_train_mode: bool = True,
        trace_on_meta: Optional[bool] = None,
    ) -> DependencyGraph:
        """Trace ``model`` on ``example_inputs`` and compute its coupled groups.

        The forward runs in eval mode on a weightless ``meta`` copy of the model and inputs (no
        FLOPs, no memory), and the graph is then bound to ``model`` itself. A forward that
        needs real values (``.item()``, data-dependent shapes such as a detector's
        post-processing, tensors made on the CPU) fails on ``meta``; it is then traced on the
        real tensors, and :meth:`summary` says why. The groups are the same either way (op
        rules never read values). ``trace_on_meta=True`` or ``False`` forces one or the other.
        If layers with parameters did not run (auxiliary heads that only run while training)
        and ``trace_train_mode`` is set, it runs once more in train mode so they are coupled
        too; a train-mode forward that fails (e.g. a detector that wants targets) is skipped
        and noted.

        Parameters used outside their module's forward (cls tokens, layer scales) are found
        by the trace; ``unwrapped_parameters`` (the peer's ``[(param, dim), ...]``) is checked
        to name parameters of ``model`` with a valid dim. With ``verbose`` the summary
        (:meth:`summary`) is logged at INFO level on the ``torchslim`` logger.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        model = unwrap_model(model)
        _check_unwrapped(model, unwrapped_parameters)
        self.model = model
        self.customized_pruners = dict(customized_pruners or {})
        self._handlers = {}
        self._walks = {}
        self._rooted = {}
        self.ignored_params = list(ignored_params or [])
        if not any(True for _ in iter_tensors(example_inputs)):
            raise ValueError("example_inputs must contain at least one tensor")
        _check_devices(model, example_inputs)
        with collection_paused():
            fallback = []
            tries = (True, False) if trace_on_meta is None else (trace_on_meta,)
            for on_meta in tries:
                try:
                    state, outputs, notes = self._trace(
                        model,
                        example_inputs,
                        forward_fn,
                        output_transform,
                        trace_train_mode,
                        on_meta,
                    )
                    break
                except Exception as error:
                    if on_meta and len(tries) > 1:
                        fallback.append(
                            "traced on real tensors: the forward fails on meta tensors "
                            f"({type(error).__name__}: {_first_line(error)})"
                        )
                        continue
                    raise RuntimeError(
                        f"the model's forward failed on the example inputs while tracing: {error}"
                    ) from error
            self.traced_on_meta = on_meta
            self.notes = fallback + notes
            check = ForwardCheck(model, example_inputs, forward_fn, outputs, on_meta=on_meta)
            self.forward_check = check if on_meta else check.probed()
            self._unsupported = state.unsupported
            self._calls = state.calls
            self.analysis = Analysis(state)
        self.blocks = residual_blocks(model, state.table, list(state.blocks.values()))
        known = model_record(model).setdefault("size_attributes", set())
        known.update(
            f"{slot.module_name}:{slot.name}"
            for slot in self.analysis.sizes.slots
            if slot.layout is None or not slot.layout.is_opaque
        )
        self.state = PruningState(self.analysis, model)
        if verbose and LOG.isEnabledFor(logging.INFO):
            LOG.info("%s", self.summary())
        return self

    def _trace(
        self,
        model: nn.Module,
        example_inputs: Any,
        forward_fn: Optional[ForwardFn],
        output_transform: Optional[Callable[[Any], Any]],
        train_mode: bool,
        on_meta: bool,
    ) -> tuple[TraceState, Any, list[str]]:
        """One trace (eval mode, then train mode if layers with parameters did not run) of the
        model on its own tensors, or with them swapped for ``meta`` ones; the eval outputs and
        a note if the train-mode forward failed (a failed trace leaves no note behind)."""
        notes = []
        inputs = to_meta(example_inputs) if on_meta else example_inputs
        with swapped_to_meta(model) if on_meta else nullcontext():
            state = TraceState(model)
            for tensor in iter_tensors(inputs):
                state.layouts[tensor] = [opaque(s, "a model input") for s in tensor.shape]

            def call() -> Any:
                return call_forward(model, inputs, forward_fn)

            outputs = run_traced(state, call)
            self._freeze_outputs(state, outputs, output_transform)
            if train_mode and _layers_not_run(model, state):
                selections = len(state.all_selections)
                try:
                    trained = run_traced(state, call, training=True)
                    self._freeze_outputs(state, trained, output_transform)
                except Exception as error:
                    del state.all_selections[selections:]  # a forward cut short claims nothing
                    notes.append(f"train-mode forward skipped: {type(error).__name__}: {error}")
            state.finish()
        return state, outputs, notes

    def summary(self) -> str:
        """What the trace found: calls recorded, groups and how many are prunable, ops without
        rules (whose channels are frozen) and notes."""
        groups = self.all_groups()
        prunable = sum(1 for group in groups if group.prunable_idxs)
        on = "meta" if self.traced_on_meta else "real"
        lines = [
            f"{self._calls} torch calls traced on {on} tensors; {len(groups)} groups, "
            f"{prunable} prunable",
            *(f"unsupported op {u.op} in module {u.module}" for u in self.unsupported()),
            *self.notes,
        ]
        return "\n".join(lines)

    @staticmethod
    def _freeze_outputs(state: TraceState, outputs: Any, transform: Optional[Callable]) -> None:
        if transform is not None:
            outputs = transform(outputs)
        for tensor in iter_tensors(outputs):
            for dim in state.layout(tensor):
                state.table.freeze_many(dim.atoms, "a model output")

    @property
    def calls(self) -> int:
        """Number of torch calls recorded while tracing."""
        return self._calls

    def unsupported(self) -> list[Unsupported]:
        """Ops met while tracing that have no rule (the channels they touch are frozen)."""
        unique: dict[tuple[str, str], Unsupported] = {}
        for entry in self._unsupported:
            unique.setdefault((entry.op, entry.module), entry)
        return list(unique.values())

    def forward_failure(self) -> Optional[ForwardFailure]:
        """Why the model, as pruned so far, no longer runs the forward it was traced with (or
        gives outputs of another structure); ``None`` if it does (see :mod:`.forward_check`)."""
        return None if self.forward_check is None else self.forward_check.failure()

    @property
    def history(self) -> list[dict[str, Any]]:
        """The steps pruned through this graph (the model keeps its own, see
        :func:`~torchslim.graph.record.model_history`)."""
        return [] if self.state is None else self.state.history

    def pruning_history(self) -> list[tuple[str, bool, list[int]]]:
        """torch-pruning's record of what was pruned through this graph: ``(root module name,
        whether its outputs were pruned, the root's indices)`` per group pruned, in order (see
        :meth:`load_pruning_history`; :func:`torchslim.save_pruned` keeps the full plan)."""
        replayable = (Role.OUT.value, Role.IN.value)
        found = []
        for step in self.history:
            root = next((op for op in step["ops"] if op["role"] in replayable), None)
            if root is not None:
                found.append((root["module"], root["role"] == Role.OUT.value, list(root["idxs"])))
        return found

    def load_pruning_history(self, pruning_history: Iterable[Sequence[Any]]) -> None:
        """Prune this graph's model as ``pruning_history`` says (the output of
        :meth:`pruning_history`, here or from torch-pruning, on a model built the same way)."""
        self._require_state()
        model = self.model
        for number, (name, is_out, idxs) in enumerate(pruning_history, 1):
            try:
                module = model if name in ("", "<model>") else model.get_submodule(name)
            except AttributeError:
                raise ValueError(
                    f"pruning history entry {number} prunes {name!r}, which this model does not have"
                ) from None
            pruner = self.get_pruner_of_module(module)
            if pruner is None:
                raise ValueError(
                    f"pruning history entry {number}: no pruning function for {name!r} "
                    f"({type(module).__name__})"
                )
            handler = pruner.prune_out_channels if is_out else pruner.prune_in_channels
            self.get_pruning_group(module, handler, list(idxs)).prune()

    def _require_state(self) -> PruningState:
        if self.state is None:
            raise RuntimeError("call build_dependency(model, example_inputs) first")
        return self.state

    def _require(self) -> Analysis:
        if self.analysis is None:
            raise RuntimeError("call build_dependency(model, example_inputs) first")
        return self.analysis

    # ------------------------------------------------------------------------ handlers

    def get_pruner_of_module(self, module: nn.Module) -> Optional[BasePruningFunc]:
        return get_pruner(module, self.customized_pruners)

    def pruning_function(self, member: ParamDim) -> tuple[Optional[Callable], Optional[Role]]:
        """The pruning function for a parameter dim, and its role (``OUT``/``IN``/``PARAM``; a
        tensor that a weight norm or spectral norm slices along with the weight: ``COVERED``).
        Found once per layer tensor dim (the cache holds the layer, so a key is never reused
        by another module)."""
        return self._handled(member)[1]

    def pruned_through(self, member: ParamDim) -> Through:
        """The layer, tensor name and dim a member's positions are pruned through: itself, or
        for the tensors of a weight norm / spectral norm, the layer weight they compute."""
        return self._handled(member)[2]

    def _handled(self, member: ParamDim) -> tuple[nn.Module, Handled, Through]:
        key = (id(member.ref.module), member.ref.name, member.dim)
        cached = self._handlers.get(key)
        if cached is None or cached[0] is not member.ref.module:
            through = self._through(member)
            handled = self._find_function(through)
            cached = self._handlers[key] = (member.ref.module, handled, through)
        return cached

    def _find_function(self, through: Through) -> Handled:
        _, module, name, dim = through
        if dim is None:
            return None, Role.COVERED
        pruner = self.get_pruner_of_module(module)
        if pruner is None:
            return ParameterHandler(name, dim), Role.PARAM
        role = pruner.param_roles(module).get((name, dim))
        if role == Role.OUT:
            return pruner.prune_out_channels, role
        if role == Role.IN:
            return pruner.prune_in_channels, role
        return None, None

    def _through(self, member: ParamDim) -> Through:
        ref = member.ref
        found = resolve_reparametrised(
            self.model, ref.module_name, ref.module, ref.name, member.dim
        )
        if found is None:
            return ref.module_name, ref.module, ref.name, member.dim
        return found.owner_name, found.owner, found.name, found.dim

    # -------------------------------------------------------------------------- groups

    def live_classes(self, coupling: Coupling) -> list[int]:
        """The coupling's channels (classes) not pruned yet: what a group's indices index."""
        return self._require_state().live(coupling)

    def live_count(self, coupling: Coupling) -> int:
        """How many of the coupling's channels are not pruned yet."""
        return self._require_state().size(coupling)

    def _members(self, module: nn.Module, role: Optional[str]) -> list[ParamDim]:
        found = []
        for member in self._require().members_of(module):
            if member.terms.shape[1] > 0:
                _, member_role = self.pruning_function(member)
                if role is None or member_role == role:
                    found.append(member)
        return found

    def _couplings_of(self, member: ParamDim) -> list[Coupling]:
        """The couplings of a member's channels, in the order of their smallest class."""
        analysis = self._require()
        ids = analysis.couplings_of(distinct(member.terms)) + 1  # -1 (none) to 0
        present, first = first_occurrences(ids, int(ids.max(initial=0)) + 1)
        ordered = (present[np.argsort(first)] - 1).tolist()
        return [analysis.couplings[c] for c in ordered if c in analysis.couplings]

    def _declared_members(self, module: nn.Module, fn: Callable, role: Role) -> list[ParamDim]:
        """Members at the dims a layer pruning function declares for ``role``, for layers the
        graph slices tensor by tensor (``nn.LSTM``: its outputs are ``weight_hh_l0``'s
        columns)."""
        pruner = getattr(fn, "__self__", None)
        if not isinstance(pruner, BasePruningFunc):
            return []
        declared = {key for key, r in pruner.param_roles(module).items() if r == role}
        return [m for m in self._members(module, None) if (m.ref.name, m.dim) in declared]

    def get_pruning_group(
        self, module: nn.Module, pruning_fn: Callable, idxs: Sequence[int]
    ) -> Group:
        """The group that removing channels ``idxs`` of ``module`` (via ``pruning_fn``) triggers."""
        role = Role.IN if role_of(pruning_fn) == Role.IN else Role.OUT
        members = (
            self._declared_members(module, pruning_fn, role)
            or self._members(module, role)
            or self._members(module, None)
        )
        if not members:
            raise ValueError(
                f"{type(module).__name__} is not a traced layer with prunable channels"
            )
        root = members[0]
        idxs = _as_index_list(idxs)
        if any(i < 0 or i >= root.terms.shape[0] for i in idxs):
            raise ValueError(
                f"indices {idxs} out of range for {root.label} of size {root.terms.shape[0]}"
            )
        coupling, classes = self._coupling_for(root, idxs)
        live = self.live_classes(coupling)
        selected = [live.index(k) for k in classes if k in live]
        return Group(self, coupling, root, selected)

    get_pruning_plan = get_pruning_group

    def _coupling_for(self, root: ParamDim, idxs: list[int]) -> tuple[Coupling, list[int]]:
        """The coupling and classes meant by removing positions ``idxs`` of ``root``.

        Classes whose positions all lie inside ``idxs`` are preferred (k_proj rows 0-2 are one
        KV head, not offsets 0-2 of every head), the coupling covering most of ``idxs`` wins,
        unfrozen before frozen. If no class fits inside, the classes touched in the coupling
        that removes the fewest extra positions are taken (one channel of a head selects the
        whole head)."""
        requested = set(idxs)
        rows = root.terms[idxs]
        touched = distinct(rows[rows >= 0]).tolist()
        inside = [k for k in touched if set(root.positions_of(np.array([k]))) <= requested]
        candidates = self._couplings_of(root)

        def choice(classes: list[int], sign: int) -> tuple[Optional[Coupling], list[int]]:
            best, best_key, best_classes = None, None, []
            for coupling in candidates:
                members = set(coupling.classes)
                mine = [k for k in classes if k in members]
                if not mine:
                    continue
                covered = root.positions_of(np.array(mine, np.int64)).size
                key = (any(k in coupling.frozen for k in mine), sign * covered)
                if best_key is None or key < best_key:
                    best, best_key, best_classes = coupling, key, mine
            return best, best_classes

        coupling, classes = choice(inside, -1)
        if coupling is None:
            coupling, classes = choice(touched, 1)
        return (coupling or candidates[0]), classes

    def get_all_groups(
        self,
        ignored_layers: Iterable[nn.Module] = (),
        root_module_types: Sequence[type] = ROOT_TYPES,
    ) -> Iterator[Group]:
        """Each prunable group once, rooted at the first layer of ``root_module_types``.

        The layers that root groups are found once per graph, and their groups once per
        pruning state (a search, whose trials return to the state they started from, finds the
        groups again without walking)."""
        self._require()
        state = self._require_state()
        ignored = frozenset(id(m) for m in ignored_layers)
        key = (ignored, tuple(root_module_types))
        walk = self._walks.get(key)
        if walk is None or walk.removed is not state.removed or walk.steps != len(state.history):
            roots = self._rooted.get(key)
            if roots is None:
                roots = self._rooted[key] = list(self._roots(ignored, tuple(root_module_types)))
            found = list(self._walk(roots, ignored))
            walk = self._walks[key] = _Walk(state.removed, len(state.history), found)
        for coupling, root in walk.groups:
            yield Group(self, coupling, root, range(self.live_count(coupling)))

    def _roots(
        self, ignored: frozenset[int], root_module_types: tuple[type, ...]
    ) -> Iterator[ParamDim]:
        """The parameter dims groups may be rooted at, in the model's order: the outputs (else
        the parameters) of layers of ``root_module_types`` not ignored."""
        for _, module in self.model.named_modules():
            if _is_root(module, root_module_types) and id(module) not in ignored:
                yield from self._members(module, Role.OUT) or self._members(module, Role.PARAM)

    def _walk(
        self, roots: list[ParamDim], ignored: frozenset[int]
    ) -> Iterator[tuple[Coupling, ParamDim]]:
        visited: set[int] = set()
        for root in roots:
            for coupling in self._couplings_of(root):
                if coupling.id in visited:
                    continue
                visited.add(coupling.id)
                if self._touches_ignored_out(coupling, ignored):
                    continue
                if self._any_prunable(coupling) and self._structural_refusal(coupling) is None:
                    yield coupling, root

    def _any_prunable(self, coupling: Coupling) -> bool:
        """Whether some live channel of ``coupling`` is not frozen (``Group.prunable_idxs``
        is not empty), answered at the first one."""
        frozen = coupling.frozen
        return any(c not in frozen for c in self.live_classes(coupling))

    def _touches_ignored_out(self, coupling: Coupling, ignored: set[int]) -> bool:
        for member in coupling.members:
            if id(member.ref.module) in ignored and self.pruning_function(member)[1] == Role.OUT:
                return True
        return False

    def all_groups(self) -> list[Group]:
        """Every coupling with at least one prunable dependency, prunable or refused."""
        analysis = self._require()
        groups = []
        for coupling in analysis.couplings.values():
            handled = [m for m in coupling.members if self.pruning_function(m)[1] is not None]
            if handled:
                root = next(
                    (m for m in handled if self.pruning_function(m)[1] == Role.OUT), handled[0]
                )
                groups.append(Group(self, coupling, root, []))
        return groups

    def group_of(self, coupling: Coupling, root: ParamDim, classes: Iterable[int]) -> Group:
        """The group of ``coupling`` selecting the channels with these class ids (from
        :meth:`Group.selected_classes`; classes pruned since are left out)."""
        index = {c: i for i, c in enumerate(self.live_classes(coupling))}
        return Group(self, coupling, root, [index[c] for c in classes if c in index])

    def group_like(self, group: Group) -> Group:
        """The same group in this graph (e.g. a deep copy of the graph ``group`` came from)."""
        analysis = self._require()
        coupling = analysis.couplings[group.coupling.id]
        root = next(m for m in coupling.members if m.label == group.root.label)
        return Group(self, coupling, root, group.idxs)

    # ------------------------------------------------------------------------- checking

    def _structural_refusal(self, coupling: Coupling) -> Optional[str]:
        """Why no index of this group can be pruned, whatever the indices."""
        for member in coupling.members:
            handler, role = self.pruning_function(member)
            if handler is None and role != Role.COVERED:
                return f"{member.label} has no pruning function"
        return None

    def refusal(
        self, coupling: Coupling, idxs: Sequence[int], positions: Optional[Positions] = None
    ) -> Optional[str]:
        """Why removing ``idxs`` of ``coupling`` is refused, or ``None`` (see
        :meth:`Group.refusal`; ``positions``: :meth:`Group.positions` of ``idxs``)."""
        live = self.live_classes(coupling)
        for i in idxs:
            if not 0 <= i < len(live):
                return f"index {i} out of range for a group of {len(live)} channels"
            if live[i] in coupling.frozen:
                return coupling.frozen[live[i]]
        structural = self._structural_refusal(coupling)
        if structural is not None:
            return structural
        removed = np.array([live[i] for i in idxs], np.int64)
        for member in coupling.members:
            n = member.terms.shape[0]
            gone = member.positions_of(removed) if positions is None else positions[id(member)]
            if n and gone.size >= n:
                return f"pruning would remove every channel of {member.label}"
        return self.analysis.size_violation(
            coupling.id, self._require_state().removed_with(coupling, removed)
        )

    def check_pruning_group(self, group: Group) -> bool:
        """True if the group can be pruned: nothing frozen, and no layer left empty."""
        return group.refusal() is None

    @staticmethod
    def is_out_channel_pruning_fn(fn: Callable) -> bool:
        """Whether ``fn`` prunes a layer's outputs (decided by the layer registry's
        :func:`~torchslim.pruning.layers.role_of`)."""
        try:
            return role_of(fn) in (Role.OUT, Role.PARAM)
        except ValueError:
            return False

    # -------------------------------------------------------------------------- pruning

    def group_items(
        self,
        coupling: Coupling,
        root: ParamDim,
        idxs: Sequence[int],
        positions: Optional[Positions] = None,
    ) -> list[GroupItem]:
        """The ``(dep, idxs)`` items removing ``idxs`` of ``coupling`` from ``root`` takes
        (``positions``: :meth:`Group.positions` of ``idxs``)."""
        live = self.live_classes(coupling)
        removed = np.array([live[i] for i in idxs if 0 <= i < len(live)], np.int64)
        live_array = np.asarray(live, np.int64)
        order = np.argsort(live_array)
        sorted_live = live_array[order]
        by_dep: dict[Dependency, GroupItem] = {}
        source = Node(root.ref.module, root.ref.module_name)
        root_handler, _ = self.pruning_function(root)
        ordered = [root] + [m for m in coupling.members if m is not root]
        for member in ordered:
            handler, _ = self.pruning_function(member)
            if handler is None:
                continue
            target_name, target_module, name, dim = self.pruned_through(member)
            gone = member.positions_of(removed) if positions is None else positions[id(member)]
            pruned = _role_positions(target_module, name, dim, gone)
            if pruned.size == 0 and member is not root:
                continue
            target = Node(target_module, target_name)
            dep = Dependency(root_handler or handler, handler, source, target)
            if dep in by_dep:
                continue
            rows = member.terms[gone]
            if rows.shape[1] == 1:
                firsts = rows[:, 0]
            else:
                firsts = (
                    rows[np.arange(len(rows)), np.argmax(rows >= 0, axis=1)] if rows.size else rows
                )
                firsts = np.reshape(firsts, -1)
            root_idxs = np.full(firsts.size, -1, np.int64)
            if live_array.size and firsts.size:
                slot, hit = lookup(sorted_live, firsts)
                root_idxs[hit] = order[slot[hit]]
            by_dep[dep] = GroupItem(dep, pruned.tolist(), root_idxs.tolist())
        return list(by_dep.values())

    def prune_group(self, group: Group, record_history: bool = True) -> None:
        """Prune one group. Outside a pruner's step (``deferred``) an error leaves the model
        as it was, and so does a pruned model that fails its forward check."""
        reason = group.refusal()
        if reason is not None:
            raise ValueError(f"cannot prune this group: {reason}")
        if self._deferred:
            self._apply(group, record_history)
            self._pending = True
            return
        checkpoint = Checkpoint(self)
        try:
            self._apply(group, record_history)
            failure = self.forward_failure()
        except BaseException:
            checkpoint.restore()
            raise
        if failure is not None:
            checkpoint.restore()
            raise ValueError(f"cannot prune this group, {failure}; the model is left as it was")
        self._pending = True
        self._notify()

    def _apply(self, group: Group, record_history: bool) -> None:
        live = self.live_classes(group.coupling)
        removed = np.array([live[i] for i in group.idxs], np.int64)
        positions = group.positions(group.idxs)
        operations = []
        for item in group.items:
            if item.idxs:
                item.dep(item.idxs)
                operations.append(_operation(item))
        state = self._require_state()
        state.ties.retie()
        state.remove(group.coupling, removed, positions)
        for slot, value in self.analysis.attribute_values(group.coupling.id, state.removed):
            if get_attribute(slot.module, slot.name) != value:
                set_attribute(slot.module, slot.name, value)
                operations.append(
                    {
                        "module": slot.module_name,
                        "role": Role.ATTR.value,
                        "attr": slot.name,
                        "value": value,
                    }
                )
        if record_history:
            step = {"group": group.root.label, "idxs": list(group.idxs), "ops": operations}
            state.history.append(step)
            model_history(self.model).append(step)
        group.select(group.idxs)

    @contextmanager
    def deferred(self, notify: bool = True) -> Iterator[None]:
        """Prune several groups and notify listeners (config sync) once, at the end; with
        ``notify=False`` not at all (pruning that is undone afterwards, see ``trial``)."""
        pending = self._pending
        self._deferred += 1
        try:
            yield
        finally:
            self._deferred -= 1
            if not notify:
                self._pending = pending
            if not self._deferred:
                self._notify()

    def _notify(self) -> None:
        if self._pending:
            self._pending = False
            run_prune_hooks(self.model)


def _check_unwrapped(model: nn.Module, unwrapped: Any) -> None:
    """``unwrapped_parameters`` must name parameters of ``model``, each with a dim it has."""
    parameters = {id(p) for p in model.parameters()}
    for item in unwrapped or []:
        param, dim = (item[0], item[1]) if isinstance(item, (tuple, list)) else (item, None)
        if not isinstance(param, torch.Tensor) or id(param) not in parameters:
            raise ValueError("unwrapped_parameters holds a parameter that is not in the model")
        if dim is not None and not -param.dim() <= int(dim) < param.dim():
            raise ValueError(
                f"unwrapped_parameters: dim {dim} out of range for a parameter of shape "
                f"{tuple(param.shape)}"
            )


def _operation(item: GroupItem) -> dict[str, Any]:
    """One pruning call as plain data, enough to replay it on a fresh model."""
    handler = item.dep.handler
    op: dict[str, Any] = {"module": item.dep.target.name, "idxs": [int(i) for i in item.idxs]}
    role = role_of(handler)
    op["role"] = role.value
    if role == Role.PARAM:
        op.update(param=handler.name, dim=handler.dim)
    return op


def _is_root(module: nn.Module, types: tuple[type, ...]) -> bool:
    """A layer of ``types``; layers pruned like ``nn.Linear`` (``Conv1D``) and routed experts
    (fused linear layers) count as Linear."""
    return isinstance(module, types) or (
        nn.Linear in types and (is_linear_like(module) or is_routed_experts(module))
    )


def _check_devices(model: nn.Module, example_inputs: Any) -> None:
    """A model whose parameters all live on one device needs its example inputs there too
    (a forward on the real tensors would fail; a trace on ``meta`` would hide it)."""
    devices = {p.device for p in model.parameters()}
    if len(devices) != 1:
        return
    (device,) = devices
    for tensor in iter_tensors(example_inputs):
        if tensor.device != device:
            raise ValueError(
                f"example inputs are on {tensor.device} but the model is on {device}: move "
                f"them to one device (e.g. inputs.to('{device}'))"
            )


def _first_line(error: BaseException, limit: int = 160) -> str:
    text = str(error).strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _layers_not_run(model: nn.Module, state: TraceState) -> list[str]:
    """Layers with parameters that neither ran nor had their parameters used by another layer
    (``nn.MultiheadAttention`` uses ``out_proj.weight`` without calling ``out_proj``)."""
    return [
        name
        for name, module in model.named_modules()
        if id(module) not in state.ran
        and any(id(p) not in state.param_layouts for p in module.parameters(recurse=False))
    ]


def _role_positions(
    module: nn.Module, name: str, dim: Optional[int], positions: np.ndarray
) -> np.ndarray:
    """Positions in a parameter dim, as the layer's handler counts channels.

    A grouped convolution's weight dim 1 holds one group's worth of channels (inputs, or outputs
    when transposed); its handler counts channels of the whole layer: the same offsets in every
    group.
    """
    if (
        not isinstance(module, nn.modules.conv._ConvNd)
        or module.groups == 1
        or (name, dim) != ("weight", 1)
    ):
        return positions
    width = module.weight.shape[1]
    return np.concatenate([positions + g * width for g in range(module.groups)])


def _as_index_list(idxs: Union[Sequence[int], torch.Tensor, np.ndarray]) -> list[int]:
    if isinstance(idxs, torch.Tensor):
        idxs = idxs.tolist()
    return sorted(set(int(i) for i in idxs))
