"""A journal of tensor replacements: pruning can be undone without keeping whole old tensors.

While a :func:`journaled` block is active, every tensor that pruning replaces on a module (see
:func:`~torchslim.pruning.reparametrised.replace_tensor`) is recorded. A replacement that is a
slice (``new = old.index_select(dim, keep)``) keeps only the positions it removed (and their
gradient); any other keeps the old tensor. :meth:`Journal.undo` rebuilds the old tensors in
reverse order. Pruning 20% of an LLM's channels thus holds about a fifth of its weights for the
undo, where holding the old tensors would hold all of them (and twice the model at the peak).
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from torchslim.pruning.take import take

Setter = Callable[[nn.Module, str, torch.Tensor], None]
_ACTIVE: ContextVar[Optional[Journal]] = ContextVar("torchslim_journal", default=None)


@dataclass
class _Entry:
    holder: nn.Module
    name: str
    old: Optional[torch.Tensor]  # the old tensor itself, when the change is not a slice
    dim: int = 0
    shape: tuple[int, ...] = ()
    keep: Optional[torch.Tensor] = None
    gone: Optional[torch.Tensor] = None
    removed: Optional[torch.Tensor] = None
    removed_grad: Optional[torch.Tensor] = None

    def rebuild(self, current: torch.Tensor) -> torch.Tensor:
        """The old tensor, from the current (sliced) one and the removed positions."""
        return _merge(current.detach(), self.dim, self.shape, self.keep, self.gone, self.removed)


class Journal:
    """The replacements made while it is active, undone by :meth:`undo`."""

    def __init__(self) -> None:
        self.entries: list[_Entry] = []

    def record(
        self,
        holder: nn.Module,
        name: str,
        old: torch.Tensor,
        dim: Optional[int],
        keep: Optional[torch.Tensor],
    ) -> None:
        if dim is None or keep is None or old.is_meta:  # a meta tensor costs nothing to keep
            self.entries.append(_Entry(holder, name, old))
            return
        mask = torch.ones(old.shape[dim], dtype=torch.bool, device=old.device)
        mask[keep] = False
        gone = mask.nonzero().flatten()
        with torch.no_grad():
            removed = take(old, dim, gone)
            grad = old.grad if isinstance(old, nn.Parameter) else None
            removed_grad = None if grad is None else take(grad, dim, gone)
        self.entries.append(
            _Entry(holder, name, None, dim, tuple(old.shape), keep, gone, removed, removed_grad)
        )

    def undo(self, replace: Setter) -> None:
        """Put every recorded tensor back, newest first (``replace`` sets a tensor the way
        pruning does: a parameter stays a parameter)."""
        with unjournaled(), torch.no_grad():
            for entry in reversed(self.entries):
                self._undo(entry, replace)
        self.entries.clear()

    @staticmethod
    def _undo(entry: _Entry, replace: Setter) -> None:
        if entry.old is not None:
            _restore_object(entry.holder, entry.name, entry.old)
            return
        current = getattr(entry.holder, entry.name)
        grad = current.grad if isinstance(current, nn.Parameter) else None
        replace(entry.holder, entry.name, entry.rebuild(current))
        if entry.removed_grad is not None and grad is not None:
            getattr(entry.holder, entry.name).grad = _merge(
                grad, entry.dim, entry.shape, entry.keep, entry.gone, entry.removed_grad
            )


def _merge(
    kept: torch.Tensor,
    dim: int,
    shape: tuple[int, ...],
    keep: torch.Tensor,
    gone: torch.Tensor,
    removed: torch.Tensor,
) -> torch.Tensor:
    full = kept.new_empty(shape)
    full.index_copy_(dim, keep.to(kept.device), kept)
    full.index_copy_(dim, gone.to(kept.device), removed)
    return full


def _restore_object(holder: nn.Module, name: str, old: torch.Tensor) -> None:
    if name in holder._parameters:
        holder._parameters[name] = old
    elif name in holder._buffers:
        holder._buffers[name] = old
    else:
        setattr(holder, name, old)


def active() -> Optional[Journal]:
    """The journal recording now, if any."""
    return _ACTIVE.get()


@contextmanager
def journaled() -> Iterator[Journal]:
    """Record the tensor replacements made inside the block."""
    journal = Journal()
    token = _ACTIVE.set(journal)
    try:
        yield journal
    finally:
        _ACTIVE.reset(token)


@contextmanager
def unjournaled() -> Iterator[None]:
    """Replacements inside the block are not recorded (pruning a temporary copy of a layer
    while a trial is open: the journal would keep the copy's removed slices)."""
    token = _ACTIVE.set(None)
    try:
        yield
    finally:
        _ACTIVE.reset(token)
