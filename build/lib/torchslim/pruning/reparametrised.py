"""Weights computed from other tensors: weight norm and spectral norm, in both forms (the old
forward pre-hooks ``nn.utils.weight_norm`` / ``spectral_norm`` and
``nn.utils.parametrizations``).

The graph traces the tensors a layer really stores (``weight_g`` and ``weight_v``;
``parametrizations.weight.original0`` ...); each of them stands for one dim of the layer's
logical ``weight`` (:func:`resolve`), so the layer's own pruning function prunes them.
:func:`slice_weight` slices them together so that the new weight is exactly the kept part of
the old one: weight norm's ``g`` absorbs the change of ``||v||`` when columns inside the norm
go, spectral norm's ``u`` is rescaled so that ``sigma`` stays (exact in eval mode; in training
the power iteration estimates ``sigma`` of the smaller matrix, as it does after any update).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _SpectralNorm, _WeightNorm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.nn.utils.weight_norm import WeightNorm

from torchslim.pruning.journal import active as active_journal
from torchslim.pruning.take import take

PARAMETRIZATIONS = ".parametrizations."


@dataclass
class Reparametrised:
    """One layer weight computed by weight norm or spectral norm."""

    kind: str  # "weight_norm" | "spectral_norm"
    layer: nn.Module
    name: str
    dim: int
    hook: Any  # the old-form forward pre-hook, or the parametrization module

    @property
    def parametrized(self) -> bool:
        return isinstance(self.hook, nn.Module)

    def slots(self) -> dict[str, tuple[nn.Module, str]]:
        """Where each stored tensor lives: ``g``/``v`` (weight norm), ``W``/``u``/``v``."""
        if self.parametrized:
            holder = self.layer.parametrizations[self.name]
            if self.kind == "weight_norm":
                return {"g": (holder, "original0"), "v": (holder, "original1")}
            return {"W": (holder, "original"), "u": (self.hook, "_u"), "v": (self.hook, "_v")}
        if self.kind == "weight_norm":
            return {"g": (self.layer, self.name + "_g"), "v": (self.layer, self.name + "_v")}
        suffixes = {"W": "_orig", "u": "_u", "v": "_v"}
        return {key: (self.layer, self.name + s) for key, s in suffixes.items()}

    def get(self, key: str) -> torch.Tensor:
        holder, attr = self.slots()[key]
        return getattr(holder, attr)

    def set(self, key: str, data: torch.Tensor) -> None:
        holder, attr = self.slots()[key]
        replace_tensor(holder, attr, data)

    def refresh(self) -> None:
        """Recompute an old-form hook's cached weight attribute from the sliced tensors."""
        if self.parametrized:
            return
        with torch.no_grad():
            if self.kind == "weight_norm":
                weight = self.hook.compute_weight(self.layer)
            else:
                weight = self.hook.compute_weight(self.layer, do_power_iteration=False)
        setattr(self.layer, self.name, weight)


def replace_tensor(
    holder: nn.Module,
    name: str,
    data: torch.Tensor,
    dim: Optional[int] = None,
    keep: Optional[torch.Tensor] = None,
) -> None:
    """Put ``data`` in place of ``holder.name``: a parameter stays a parameter (with its
    ``requires_grad``), a buffer a buffer, a plain attribute a plain attribute. ``dim`` and
    ``keep`` say that ``data`` is the old tensor's ``index_select(dim, keep)``, which lets an
    active :mod:`~torchslim.pruning.journal` keep only the removed positions for an undo."""
    old = getattr(holder, name)
    journal = active_journal()
    if journal is not None:
        journal.record(holder, name, old, dim, keep)
    if isinstance(old, nn.Parameter):
        setattr(holder, name, nn.Parameter(data, requires_grad=old.requires_grad))
    elif name in holder._buffers:
        holder._buffers[name] = data
    else:
        setattr(holder, name, data)


def find(layer: nn.Module, name: str) -> Optional[Reparametrised]:
    """The weight norm or spectral norm computing ``layer.<name>``, if any."""
    for hook in layer._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == name:
            return Reparametrised("weight_norm", layer, name, hook.dim, hook)
        if isinstance(hook, SpectralNorm) and hook.name == name:
            return Reparametrised("spectral_norm", layer, name, hook.dim, hook)
    if parametrize.is_parametrized(layer, name) and len(layer.parametrizations[name]) == 1:
        module = layer.parametrizations[name][0]
        if isinstance(module, _WeightNorm):
            return Reparametrised("weight_norm", layer, name, module.dim, module)
        if isinstance(module, _SpectralNorm):
            return Reparametrised("spectral_norm", layer, name, module.dim, module)
    return None


def in_layer(layer: nn.Module) -> list[Reparametrised]:
    """Every reparametrised weight of one layer."""
    names = [h.name for h in layer._forward_pre_hooks.values() if hasattr(h, "name")]
    if parametrize.is_parametrized(layer):
        names += list(layer.parametrizations.keys())
    return [r for name in dict.fromkeys(names) if (r := find(layer, name)) is not None]


@dataclass
class Resolved:
    """The layer weight dim a stored tensor dim stands for (``dim=None``: sliced along with
    the weight, no pruning function of its own)."""

    owner_name: str
    owner: nn.Module
    name: str
    dim: Optional[int]


def resolve(
    model: nn.Module, module_name: str, module: nn.Module, tensor: str, dim: int
) -> Optional[Resolved]:
    """Which dim of which layer weight the tensor ``module_name.tensor`` dim ``dim`` stores."""
    owner_name, owner = module_name, module
    if isinstance(module, (parametrize.ParametrizationList, _SpectralNorm)):
        owner_name = f".{module_name}".rpartition(PARAMETRIZATIONS)[0][1:]
        owner = model.get_submodule(owner_name) if owner_name else model
    for rep in in_layer(owner):
        for key, (holder, attr) in rep.slots().items():
            if holder is module and attr == tensor:
                return Resolved(owner_name, owner, rep.name, _logical_dim(rep, key, dim))
    return None


def _logical_dim(rep: Reparametrised, key: str, dim: int) -> Optional[int]:
    if key == "W" or (key == "v" and rep.kind == "weight_norm"):
        return dim  # same shape as the weight
    if key == "u" or (key == "g" and dim == rep.dim):
        return rep.dim  # one entry per row of the normalised matrix
    return None  # g's size-1 dims, spectral norm's v over the flattened other dims


def slice_weight(rep: Reparametrised, dim: int, keep: Sequence[int]) -> None:
    """Keep positions ``keep`` of the logical weight's ``dim``, slicing the stored tensors so
    that the new weight equals the same slice of the old one (see the module docstring)."""
    with torch.no_grad():
        if rep.kind == "weight_norm":
            _slice_weight_norm(rep, dim, keep)
        else:
            _slice_spectral_norm(rep, dim, keep)
    rep.refresh()


def _slice_weight_norm(rep: Reparametrised, dim: int, keep: Sequence[int]) -> None:
    g, v = rep.get("g").detach(), rep.get("v").detach()
    index = torch.as_tensor(list(keep), dtype=torch.long, device=v.device)
    kept = take(v, dim, index)
    if dim == rep.dim:
        g = g.index_select(dim, index)
    else:
        g = (g.double() * _norm_change(v, kept, rep.dim)).to(g.dtype)
    rep.set("g", g.contiguous())
    rep.set("v", kept.contiguous())


def _norm_change(old_v: torch.Tensor, new_v: torch.Tensor, dim: int) -> torch.Tensor:
    """``||new_v|| / ||old_v||`` per normalised row (1 where the old norm is 0): the factor by
    which ``g`` keeps ``g * v / ||v||`` unchanged on the columns ``new_v`` still holds."""
    before = torch.norm_except_dim(old_v.double(), 2, dim)
    after = torch.norm_except_dim(new_v.double(), 2, dim)
    return torch.where(before > 0, after / before.clamp_min(1e-300), 1.0)


def _sigma(weight: torch.Tensor, u: torch.Tensor, v: torch.Tensor, dim: int) -> torch.Tensor:
    """Spectral norm's eval-mode estimate ``u^T W v``, in float64."""
    matrix = weight.double().movedim(dim, 0).reshape(weight.shape[dim], -1)
    return torch.dot(u.double(), matrix @ v.double())


def _slice_spectral_norm(rep: Reparametrised, dim: int, keep: Sequence[int]) -> None:
    weight, u, v = (rep.get(k).detach() for k in ("W", "u", "v"))
    index = torch.as_tensor(list(keep), dtype=torch.long, device=weight.device)
    sigma = _sigma(weight, u, v, rep.dim)
    kept = take(weight, dim, index)
    if dim == rep.dim:
        u = u.index_select(0, index)
    else:
        moved = [d for d in range(weight.dim()) if d != rep.dim]
        columns = torch.arange(v.numel(), device=v.device)
        columns = columns.reshape([weight.shape[d] for d in moved])
        v = v.index_select(0, columns.index_select(moved.index(dim), index).reshape(-1))
    new_sigma = _sigma(kept, u, v, rep.dim)
    if new_sigma != 0:
        u = (u.double() * (sigma / new_sigma)).to(u.dtype)
    rep.set("W", kept.contiguous())
    rep.set("u", u.contiguous())
    rep.set("v", v.contiguous())


def zero_positions(layer: nn.Module, name: str, dim: int, positions: Sequence[int]) -> None:
    """Zero positions of ``layer.<name>`` along ``dim``; for a weight computed by weight norm
    or spectral norm, change the stored tensors so that exactly those slices of the computed
    weight become zero (the reference of the exactness check)."""
    index = torch.as_tensor(list(positions), dtype=torch.long)
    rep = find(layer, name)
    with torch.no_grad():
        if rep is None:
            getattr(layer, name).index_fill_(dim, index, 0)
            return
        if rep.kind == "weight_norm":
            _zero_weight_norm(rep, dim, index)
        else:
            _zero_spectral_norm(rep, dim, index)
    rep.refresh()


def _zero_weight_norm(rep: Reparametrised, dim: int, index: torch.Tensor) -> None:
    g, v = rep.get("g"), rep.get("v")
    if dim == rep.dim:
        g.index_fill_(dim, index, 0)
        return
    zeroed = v.index_fill(dim, index, 0)
    g.copy_(g.double() * _norm_change(v, zeroed, rep.dim))
    v.copy_(zeroed)


def _zero_spectral_norm(rep: Reparametrised, dim: int, index: torch.Tensor) -> None:
    weight, u, v = (rep.get(k) for k in ("W", "u", "v"))
    sigma = _sigma(weight, u, v, rep.dim)
    weight.index_fill_(dim, index, 0)
    new_sigma = _sigma(weight, u, v, rep.dim)
    if new_sigma != 0:
        u.copy_(u.double() * (sigma / new_sigma))


def detach_cached(model: nn.Module) -> None:
    """Recompute the weights old-form hooks cache on their layers without autograd history:
    ``copy.deepcopy`` refuses a module holding a non-leaf tensor."""
    for module in model.modules():
        for rep in in_layer(module):
            rep.refresh()
