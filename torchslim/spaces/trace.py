"""The trace's data record: what the op rules build while the forward runs.

:class:`TraceState` holds the atom table, every tensor's layout, the size checks and comparisons
made by the model's code, the attributes read as sizes and the ops without rules. The recorder in
:mod:`torchslim.capture` fills it; the analysis in :mod:`torchslim.spaces.analysis` reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from torchslim.spaces.atoms import AtomTable
from torchslim.spaces.attributes import AttributeSlot
from torchslim.spaces.layout import DimLayout, TensorLayout, opaque, same_positions, unify
from torchslim.spaces.symbolic import (
    COMPARISON_SYMBOLS,
    TrackedInt,
    TrackedShape,
    describe,
    expr_of,
    is_literal,
    symbols,
)

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


@dataclass
class TensorRef:
    """A parameter or buffer of the model, by owner and attribute name.

    The tensor is looked up when asked for, so a graph never keeps a pruned-away tensor alive
    (an LLM's old weights are freed as soon as each layer is sliced)."""

    module_name: str
    module: nn.Module
    name: str
    is_buffer: bool

    @property
    def tensor(self) -> torch.Tensor:
        return getattr(self.module, self.name)

    @property
    def qualified(self) -> str:
        return f"{self.module_name}.{self.name}" if self.module_name else self.name


@dataclass
class SizeCheck:
    """An int argument that must keep matching the surviving size of some positions."""

    expr: Any
    atoms: np.ndarray
    where: str

    @property
    def attributes(self) -> list[AttributeSlot]:
        return [key for key in symbols(self.expr) if isinstance(key, AttributeSlot)]


@dataclass
class Comparison:
    """A comparison the forward made between a tracked size and an int (``if``, ``assert``):
    pruning must not change its outcome."""

    op: str
    lhs: Any
    rhs: Any
    outcome: bool
    where: str

    @property
    def text(self) -> str:
        return f"{describe(self.lhs)} {COMPARISON_SYMBOLS[self.op]} {describe(self.rhs)}"


@dataclass
class ValueSelection:
    """Indices whose values are positions of ``source`` (``topk``/``sort`` indices): the
    positions stay prunable only if every reader of the indices knows what they select (a
    routed-experts layer, whose experts follow the positions, or a ``gather`` from a tensor
    whose dim does); otherwise they are frozen."""

    source: DimLayout
    where: str
    claimed: bool = False
    read_elsewhere: bool = False


@dataclass
class BlockTrace:
    """One child of a ``ModuleList`` / ``Sequential`` while tracing: how often it ran, the
    layouts of its first tensor input and output, whether that input was the previous
    sibling's output, where its output was read outside the next sibling (if anywhere), and
    whether an addition inside it read its input (a skip connection, ``x + f(x)``)."""

    name: str
    container: str
    index: int
    next: Optional[str]
    calls: int = 0
    inputs: Optional[TensorLayout] = None
    output: Optional[TensorLayout] = None
    chained: bool = True
    read_by: Optional[str] = None
    skip: bool = False


@dataclass
class Unsupported:
    """An op with no rule: what it was, where it ran, and how many tensors it touched."""

    op: str
    module: str


@dataclass
class TraceState:
    """Everything the rules build while the forward runs."""

    model: nn.Module
    table: AtomTable = field(default_factory=AtomTable)
    layouts: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    refs: dict[int, TensorRef] = field(default_factory=dict)
    param_layouts: dict[int, TensorLayout] = field(default_factory=dict)
    module_stack: list[str] = field(default_factory=list)
    checks: list[SizeCheck] = field(default_factory=list)
    comparisons: list[Comparison] = field(default_factory=list)
    attributes: dict[tuple[int, str], AttributeSlot] = field(default_factory=dict)
    attribute_values: list[tuple[AttributeSlot, str]] = field(default_factory=list)
    unsupported: list[Unsupported] = field(default_factory=list)
    selections: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    all_selections: list[ValueSelection] = field(default_factory=list)
    blocks: dict[str, BlockTrace] = field(default_factory=dict)
    block_inputs: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    block_outputs: WeakIdKeyDictionary = field(default_factory=WeakIdKeyDictionary)
    ran: set[int] = field(default_factory=set)
    calls: int = 0
    inside_op: int = 0

    def __post_init__(self) -> None:
        for module_name, module in self.model.named_modules(remove_duplicate=False):
            for name, tensor in module.named_parameters(recurse=False):
                self.refs.setdefault(id(tensor), TensorRef(module_name, module, name, False))
            for name, tensor in module.named_buffers(recurse=False):
                if tensor is not None:
                    self.refs.setdefault(id(tensor), TensorRef(module_name, module, name, True))

    @property
    def module_path(self) -> str:
        return self.module_stack[-1] if self.module_stack else "<model>"

    def layout(self, tensor: torch.Tensor) -> TensorLayout:
        """The layout of a tensor, creating one for parameters and unknown constants."""
        known = self.layouts.get(tensor)
        if known is not None:
            return known
        ref = self.refs.get(id(tensor))
        if ref is not None and ref.tensor is tensor:
            layout = self.param_layouts.get(id(tensor))
            if layout is None:
                layout = [
                    DimLayout(
                        self.table.new_family(size, "param", f"{ref.qualified} dim {d}")[:, None]
                    )
                    for d, size in enumerate(tensor.shape)
                ]
                self.param_layouts[id(tensor)] = layout
            return layout
        reason = f"a tensor constant used in {self.module_path}"
        layout = [opaque(size, reason) for size in tensor.shape]
        self.layouts[tensor] = layout
        return layout

    def set_layout(self, tensor: torch.Tensor, layout: TensorLayout) -> None:
        if len(layout) != tensor.dim():
            raise AssertionError(f"layout rank {len(layout)} != tensor rank {tensor.dim()}")
        for dim, size in zip(layout, tensor.shape):
            if dim.size != size:
                raise AssertionError(f"layout size {dim.size} != tensor size {size}")
        if id(tensor) in self.param_layouts:
            for mine, theirs in zip(self.param_layouts[id(tensor)], layout):
                unify(self.table, mine, theirs, "an in-place update of a parameter")
            return
        self.layouts[tensor] = layout

    def tracked_sizes(self, tensor: torch.Tensor) -> TrackedShape:
        layout = self.layout(tensor)
        return TrackedShape(
            TrackedInt(size, ("dim", dim)) for size, dim in zip(tensor.shape, layout)
        )

    def value_use(self, expr: Any, where: str) -> None:
        """A channel count became a value (a scale, a fill): pruning that dim changes results.

        Attributes are resolved to the positions they count once tracing is over."""
        reason = f"a channel count used as a value in {where}"
        atoms = []
        for key in symbols(expr):
            if isinstance(key, AttributeSlot):
                self.attribute_values.append((key, reason))
            elif not key.is_opaque:
                atoms.append(key.atoms[key.atoms >= 0])
        if atoms:
            self.table.mark_mixing(np.concatenate(atoms), reason)

    def require_size(self, value: Any, dim: DimLayout, where: str) -> None:
        """Record that ``value`` must equal the number of surviving positions of ``dim``.

        An attribute used as a size by itself counts those positions: all positions it counts
        are coupled (they shrink together, and the attribute follows them)."""
        expr = expr_of(value)
        if expr[0] == "attr":
            self._bind(expr[1], dim, where)
        elif expr[0] == "dim":
            self._match(expr[1], dim, where)
        attributes = any(isinstance(key, AttributeSlot) for key in symbols(expr))
        if dim.is_opaque and not attributes:
            return
        if is_literal(value):
            self.table.freeze_many(
                dim.atoms,
                f"hard-coded size {int(value)} in {where} (a literal, or a size the model "
                "turned into a plain int with int() or math: it cannot follow pruning)",
            )
        else:
            self.checks.append(SizeCheck(expr, dim.atoms, where))

    def compare(self, op: str, lhs: Any, rhs: Any, outcome: bool, filename: str) -> None:
        """A comparison made by the model's own code: not inside an op with a rule, and not in
        torch's own layers (their fast-path checks choose between equal computations).

        An equality between a tensor dim and another size couples them like a size argument
        (an attribute compared with it follows the dim; a literal freezes it); any other
        comparison of prunable sizes is checked when a group is pruned."""
        if self.inside_op or filename.startswith(_TORCH_DIR):
            return
        where = self.module_path
        exprs = (expr_of(lhs), expr_of(rhs))
        keys = [key for expr in exprs for key in symbols(expr)]
        if not any(isinstance(key, AttributeSlot) or not key.is_opaque for key in keys):
            return
        if outcome == (op == "eq") and op in ("eq", "ne"):
            for side, other in ((exprs[0], rhs), (exprs[1], lhs)):
                if side[0] == "dim" and not side[1].is_opaque:
                    if is_literal(other):
                        self.table.freeze_many(
                            side[1].atoms, f"a size compared with {int(other)} in {where}"
                        )
                    else:
                        self.require_size(other, side[1], where)
                    return
        self.comparisons.append(Comparison(op, exprs[0], exprs[1], outcome, where))

    def _bind(self, slot: AttributeSlot, dim: DimLayout, where: str) -> None:
        slot.uses.append(where)
        if slot.layout is None:
            slot.layout = dim
        else:
            unify(self.table, slot.layout, dim, f"{where} (attribute {slot.label})")

    def _match(self, source: DimLayout, dim: DimLayout, where: str) -> None:
        """A dim sized by another tensor's dim (``y.reshape(b, n, x.shape[-1])``) keeps that
        size only if both shrink together: unless they already hold the same channels, their
        positions are coupled one to one."""
        if source is dim or source.is_opaque or dim.is_opaque or source.size != dim.size:
            return
        if not same_positions(self.table, source, dim):
            unify(self.table, source, dim, f"{where} (a size taken from another tensor)")

    def finish(self) -> None:
        """Mark the positions of attributes used as values (``self.head_dim ** -0.5``), and
        freeze positions selected by value whose indices were read by an op that does not know
        what they select."""
        for slot, reason in self.attribute_values:
            if slot.layout is not None and not slot.layout.is_opaque:
                atoms = slot.layout.atoms
                self.table.mark_mixing(atoms[atoms >= 0], reason)
        self.attribute_values.clear()
        for selection in self.all_selections:
            if not selection.claimed or selection.read_elsewhere:
                self.table.freeze_many(
                    selection.source.atoms, f"positions chosen by value ({selection.where})"
                )
        self.all_selections.clear()

    def select_by_value(self, indices: torch.Tensor, source: DimLayout, where: str) -> None:
        """``indices`` hold positions of ``source`` (see :class:`ValueSelection`)."""
        if not source.is_opaque:
            selection = ValueSelection(source, where)
            self.selections[indices] = selection
            self.all_selections.append(selection)

    def indices_read(self, tensors: list[torch.Tensor], claimed: list[torch.Tensor]) -> None:
        """An op read these tensors; those it did not claim are read by an op that does not
        know what their values select."""
        for tensor in tensors:
            selection = self.selections.get(tensor)
            if selection is not None and not any(tensor is c for c in claimed):
                selection.read_elsewhere = True

    def block_tensors_read(self, tensors: list[torch.Tensor], op: str, where: str) -> None:
        """An op in the current module read these tensors: a block's output read outside the
        next block is noted (removing the block would change what that op reads), and so is
        an addition inside a block reading the block's input (its skip connection)."""
        path = self.module_path
        for tensor in tensors:
            block = self.block_outputs.get(tensor)
            if block is not None and block.next is not None and not _inside(path, block.next):
                block.read_by = block.read_by or where
            if op in _ADDITIONS:
                for block in self.block_inputs.get(tensor, ()):
                    block.skip = block.skip or _inside(path, block.name)

    def claim_selection(self, indices: torch.Tensor, dim: DimLayout, where: str) -> bool:
        """An op that routes by these indices has its own ``dim`` indexed by them: couple it
        with the positions they were chosen from. False if ``indices`` are not a selection, or
        one of a dim of another size (its positions would not follow the chosen ones)."""
        selection = self.selections.get(indices)
        if selection is None or selection.source.size != dim.size:
            return False
        unify(self.table, selection.source, dim, f"{where} (indices from {selection.where})")
        selection.claimed = True
        return True


_ADDITIONS = {
    "Tensor.__add__",
    "Tensor.__radd__",
    "Tensor.__iadd__",
    "Tensor.add",
    "Tensor.add_",
    "torch.add",
}


def _inside(path: str, module: str) -> bool:
    return path == module or path.startswith(module + ".")


def first_tensor(obj: Any) -> Optional[torch.Tensor]:
    """The first tensor inside ``obj`` (in :func:`iter_tensors` order), or ``None``."""
    return next(iter_tensors(obj), None)


def iter_tensors(obj: Any, _depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor inside nested tuples, lists, dicts and dataclass-like outputs."""
    if _depth > 20:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from iter_tensors(value, _depth + 1)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from iter_tensors(value, _depth + 1)
    elif hasattr(obj, "__dataclass_fields__"):
        for name in obj.__dataclass_fields__:
            yield from iter_tensors(getattr(obj, name, None), _depth + 1)
