"""Integers that remember which tensor sizes they were computed from.

While tracing, ``x.size()`` and ``x.shape`` return :class:`TrackedInt` values. Arithmetic on them
keeps an expression tree, so when ``x.view(b, c // g, g)`` is recorded we know that ``c // g``
will follow the channel count after pruning while the literal ``g`` will not. Any int that lost
its history (``int(c / 2)``, a config value) is a literal, the safe assumption.
"""

from __future__ import annotations

import operator
import sys
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any, Callable, Iterator, Optional

Expr = Any  # ("lit", int) | ("dim", key) | ("attr", slot) | (op_name, Expr, Expr) | ("neg", Expr)

#: Expression kinds that stand for a size known to the graph: a tensor dim, or an int attribute.
SYMBOLS = ("dim", "attr")

_BINARY: dict[str, Callable[[int, int], int]] = {
    "add": operator.add,
    "sub": operator.sub,
    "mul": operator.mul,
    "floordiv": operator.floordiv,
    "mod": operator.mod,
    "pow": operator.pow,
    "truediv": operator.truediv,
}

ValueUseHook = Callable[[Expr], None]
ComparisonHook = Callable[[str, int, int, bool, str], None]
_OBSERVER: ContextVar[Optional[tuple[ValueUseHook, ComparisonHook]]] = ContextVar(
    "torchslim_size_observer", default=None
)

_COMPARE: dict[str, Callable[[int, int], bool]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
}
COMPARISON_SYMBOLS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


def compare(op: str, lhs: int, rhs: int) -> bool:
    return _COMPARE[op](lhs, rhs)


@contextmanager
def observed(on_value_use: ValueUseHook, on_comparison: ComparisonHook) -> Iterator[None]:
    """Inside the block, ``on_value_use(expr)`` hears of every tracked size turned into a value
    that is not a size (a float such as ``c ** -0.5`` or ``math.sqrt(c)``: pruning that dim
    changes the value), and ``on_comparison(op, lhs, rhs, outcome, filename)`` of every
    tracked size compared with an int (``assert x.shape[1] == self.channels``), naming the
    file of the code that compared."""
    token = _OBSERVER.set((on_value_use, on_comparison))
    try:
        yield
    finally:
        _OBSERVER.reset(token)


def report_value_use(expr: Expr) -> None:
    observer = _OBSERVER.get()
    if observer is not None:
        observer[0](expr)


def expr_of(value: Any) -> Expr:
    """Expression for an int argument: tracked history, or a literal."""
    if isinstance(value, TrackedInt):
        return value.expr
    return ("lit", int(value))


def is_literal(value: Any) -> bool:
    return not isinstance(value, TrackedInt)


def evaluate(expr: Expr, dim_size: Callable[[Any], int]) -> int:
    """Evaluate an expression with ``dim_size(key)`` giving each symbol's size."""

    def leaf(node: Expr) -> int:
        return node[1] if node[0] == "lit" else dim_size(node[1])

    def apply(kind: str, operands: list[int]) -> int:
        if kind == "neg":
            return -operands[0]
        lhs, rhs = operands
        if kind in ("floordiv", "mod") and rhs == 0:
            return -(2**62)
        return _BINARY[kind](lhs, rhs)

    return _fold(expr, leaf, apply)


def _fold(expr: Expr, leaf: Callable[[Expr], Any], apply: Callable[[str, list[Any]], Any]) -> Any:
    """``expr`` reduced bottom-up, operands left to right: ``leaf`` of each literal and symbol,
    ``apply(kind, results of the operands)`` of each operation; without recursion, as a size
    computed in a loop can nest deeper than Python's stack allows."""
    results: list[Any] = []
    known: dict[int, Any] = {}  # a shared subexpression is reduced once
    pending: list[tuple[Expr, bool]] = [(expr, False)]
    while pending:
        node, expanded = pending.pop()
        if id(node) in known:
            results.append(known[id(node)])
            continue
        kind, *operands = node
        if kind == "lit" or kind in SYMBOLS:
            value = leaf(node)
        elif not expanded:
            pending.append((node, True))
            pending.extend((operand, False) for operand in reversed(operands))
            continue
        else:
            value = apply(kind, results[len(results) - len(operands) :])
            del results[len(results) - len(operands) :]
        known[id(node)] = value
        results.append(value)
    return results[0]


def symbols(expr: Expr) -> list[Any]:
    """The keys (tensor dims and attribute slots) an expression reads, each once, in the order
    they first appear. Without recursion (a size computed in a loop can nest deeper than
    Python's stack allows), and each shared subexpression walked once (such a size reuses its
    earlier values: walked as a tree, it repeats them exponentially)."""
    found: dict[int, Any] = {}
    visited: set[int] = set()
    pending = [expr]
    while pending:
        node = pending.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        kind, *operands = node
        if kind in SYMBOLS:
            found.setdefault(id(operands[0]), operands[0])
        elif kind != "lit":
            pending.extend(reversed(operands))
    return list(found.values())


def _binary(name: str, reflected: bool = False) -> Callable[[TrackedInt, Any], Any]:
    fn = _BINARY[name]

    def method(self: TrackedInt, other: Any) -> Any:
        if not isinstance(other, int) or isinstance(other, bool):
            report_value_use(self.expr)
            return fn(other, int(self)) if reflected else fn(int(self), other)
        lhs, rhs = (other, self) if reflected else (self, other)
        value = fn(int(lhs), int(rhs))
        if not isinstance(value, int):
            report_value_use((name, expr_of(lhs), expr_of(rhs)))
            return value
        return TrackedInt(value, (name, expr_of(lhs), expr_of(rhs)))

    return method


def _comparison(name: str) -> Callable[[TrackedInt, Any], Any]:
    fn = _COMPARE[name]
    fallback = getattr(int, f"__{name}__")

    def method(self: TrackedInt, other: Any) -> Any:
        if not isinstance(other, int) or isinstance(other, bool):
            return fallback(self, other)
        outcome = fn(int(self), int(other))
        observer = _OBSERVER.get()
        if observer is not None:
            observer[1](name, self, other, outcome, sys._getframe(1).f_code.co_filename)
        return outcome

    return method


def describe(expr: Expr) -> str:
    """Readable form of an expression: ``(size(16) * block.heads)``."""
    signs = {"add": "+", "sub": "-", "mul": "*", "floordiv": "//", "mod": "%", "pow": "**"}

    def leaf(node: Expr) -> str:
        kind, value = node
        if kind == "lit":
            return str(value)
        return f"size({value.size})" if kind == "dim" else value.label

    def apply(kind: str, operands: list[str]) -> str:
        if kind == "neg":
            return f"-{operands[0]}"
        return f"({operands[0]} {signs.get(kind, '/')} {operands[1]})"

    return _fold(expr, leaf, apply)


class TrackedInt(int):
    """An ``int`` carrying the expression it was computed from."""

    expr: Expr

    def __new__(cls, value: int, expr: Expr) -> TrackedInt:
        obj = super().__new__(cls, value)
        obj.expr = expr
        return obj

    __add__ = _binary("add")
    __radd__ = _binary("add", reflected=True)
    __sub__ = _binary("sub")
    __rsub__ = _binary("sub", reflected=True)
    __mul__ = _binary("mul")
    __rmul__ = _binary("mul", reflected=True)
    __floordiv__ = _binary("floordiv")
    __rfloordiv__ = _binary("floordiv", reflected=True)
    __mod__ = _binary("mod")
    __rmod__ = _binary("mod", reflected=True)
    __pow__ = _binary("pow")
    __truediv__ = _binary("truediv")
    __rtruediv__ = _binary("truediv", reflected=True)
    __eq__ = _comparison("eq")
    __ne__ = _comparison("ne")
    __lt__ = _comparison("lt")
    __le__ = _comparison("le")
    __gt__ = _comparison("gt")
    __ge__ = _comparison("ge")
    __hash__ = int.__hash__

    def __float__(self) -> float:
        report_value_use(self.expr)
        return float(int(self))

    def __neg__(self) -> TrackedInt:
        return TrackedInt(-int(self), ("neg", self.expr))

    def __pos__(self) -> TrackedInt:
        return self

    def __repr__(self) -> str:
        return repr(int(self))

    def __reduce__(self) -> tuple:
        return (int, (int(self),))


class TrackedShape(tuple):
    """What ``tensor.shape`` returns while tracing: a tuple of :class:`TrackedInt`."""

    def numel(self) -> int:
        total = 1
        for size in self:
            total *= size
        return total
