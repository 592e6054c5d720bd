"""Importance criteria: magnitude, BN scale, group norm, LAMP, FPGM, random, Taylor, Hessian
(OBD), activations, weights-times-activations (Wanda), FLAP's fluctuation and structured OBS. Each only says how to score the positions of one parameter dim; the
group mechanism in :mod:`.base` does the rest."""

from __future__ import annotations

import math
from typing import Any, Iterable, Optional

import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from torchslim.graph.dependency import Group
from torchslim.graph.record import model_history
from torchslim.importance import moments
from torchslim.importance.base import (
    GroupImportance,
    Importance,
    is_norm_layer,
    normalize,
    norms,
    per_position,
    position_norms,
    slices,
)
from torchslim.importance.registry import register_importance
from torchslim.pruning.functions import SLICE_FOLLOWERS
from torchslim.pruning.layers import layer_kind
from torchslim.pruning.roles import Role
from torchslim.pruning.take import take
from torchslim.spaces.analysis import ParamDim


class MagnitudeImportance(GroupImportance):
    """``sum |w|^p`` over each position's slice (p=1: L1, p=2: squared L2)."""

    def __init__(self, p: float = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if p <= 0:
            raise ValueError(f"p must be positive, got {p}")
        self.p = p

    def position_scores(self, member: ParamDim, tensor: torch.Tensor) -> torch.Tensor:
        return position_norms(tensor, member.dim, self.p)


register_importance("l1", lambda: MagnitudeImportance(p=1))
register_importance("l2", lambda: MagnitudeImportance(p=2))


@register_importance("group-norm")
class GroupNormImportance(MagnitudeImportance):
    """The L-p norm of each channel over the *whole* group: ``(sum over layers |w|^p)^(1/p)``."""

    def __init__(self, p: float = 2, normalizer: Any = "max", **kwargs: Any) -> None:
        super().__init__(p=p, group_reduction="sum", normalizer=None, **kwargs)
        self.group_normalizer = normalizer

    def __call__(self, group: Group) -> Optional[torch.Tensor]:
        scores = super().__call__(group)
        return None if scores is None else normalize(scores.pow(1 / self.p), self.group_normalizer)


@register_importance("lamp")
class LAMPImportance(MagnitudeImportance):
    """Layer-adaptive magnitude: squared magnitude, normalised by LAMP within the group."""

    def __init__(self, p: float = 2, **kwargs: Any) -> None:
        kwargs.setdefault("normalizer", "lamp")
        super().__init__(p=p, **kwargs)


@register_importance("bn")
class BNScaleImportance(GroupImportance):
    """``|gamma|`` of the normalisation layers in the group (None if there is none)."""

    def __init__(self, normalizer: Any = None, **kwargs: Any) -> None:
        super().__init__(normalizer=normalizer, **kwargs)

    def accepts(self, group: Group, member: ParamDim) -> bool:
        return (
            is_norm_layer(member.ref.module)
            and member.ref.name == "weight"
            and super().accepts(group, member)
        )

    def position_scores(self, member: ParamDim, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().double().abs()


@register_importance("fpgm")
class FPGMImportance(GroupImportance):
    """Filter pruning via geometric median: channels close to all others are redundant.

    Score of a position: the sum of L-p distances from its slice to every other slice."""

    def __init__(self, p: float = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.p = p

    def position_scores(self, member: ParamDim, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        if tensor.dim() < 2:
            return None
        flat = slices(tensor, member.dim)
        return torch.cdist(flat[None], flat[None], p=self.p)[0].sum(1)


@register_importance("random")
class RandomImportance(Importance):
    """Uniform random scores, seeded through ``torch.manual_seed``."""

    def __call__(self, group: Group) -> torch.Tensor:
        return torch.rand(group.size, dtype=torch.float64)


class TaylorImportance(GroupImportance):
    """First-order Taylor: ``|sum w * dL/dw|`` over each position's slice (needs ``.grad``).

    Every parameter with a gradient counts, BatchNorm and LayerNorm scales included.
    ``multivariate=True`` takes the absolute value after summing (the whole slice as one
    variable); the default sums per-weight absolute values."""

    calibrated = True

    def __init__(self, multivariate: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.multivariate = multivariate

    def position_scores(self, member: ParamDim, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        if tensor.grad is None:
            return None
        if self.multivariate:
            return per_position(
                lambda w, g: (w.double() * g.double()).sum(1).abs(), member.dim, tensor, tensor.grad
            )
        return per_position(
            lambda w, g: norms(w.double() * g.double(), 1), member.dim, tensor, tensor.grad
        )


class HessianImportance(GroupImportance):
    """Optimal Brain Damage: ``sum 0.5 * w^2 * H_diag`` with the diagonal Hessian estimated as
    the mean of squared per-batch gradients (Fisher).

    Call :meth:`accumulate_grad` after every ``loss.backward()``; the mean is over the batches
    accumulated so far, so the score does not grow with the number of batches.
    """

    calibrated = True

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sum = WeakIdKeyDictionary()  # squared gradients, by parameter
        self._batches = 0
        SLICE_FOLLOWERS.add(self)

    def accumulate_grad(self, model: nn.Module) -> None:
        with torch.no_grad():
            for param in model.parameters():
                if param.grad is None:
                    continue
                square = param.grad.detach().pow(2)
                previous = self._sum.get(param)
                if previous is not None and previous.shape == square.shape:
                    previous.add_(square)
                else:
                    self._sum[param] = square.clone()
        self._batches += 1

    def __getstate__(self) -> dict[str, Any]:
        """Copies and pickles start without squared gradients (kept per parameter object)."""
        return {**vars(self), "_sum": None, "_batches": 0}

    def __setstate__(self, state: dict[str, Any]) -> None:
        vars(self).update(state)
        self._sum = WeakIdKeyDictionary()
        SLICE_FOLLOWERS.add(self)

    def sliced(self, old: torch.Tensor, new: torch.Tensor, dim: int, index: torch.Tensor) -> None:
        """A parameter was sliced (a group pruned before this one was scored): its squared
        gradients follow, the old ones stay for an undo that puts the old parameter back."""
        square = self._sum.get(old)
        if square is not None and square.shape == old.shape:
            self._sum[new] = take(square, dim, index)

    def zero_grad(self) -> None:
        self._sum.clear()
        self._batches = 0

    def position_scores(self, member: ParamDim, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        hessian = self._sum.get(tensor)
        if hessian is None or hessian.shape != tensor.shape or not self._batches:
            return None
        batches = self._batches
        return per_position(
            lambda w, h: (0.5 * w.double().pow(2) * h.double() / batches).sum(1),
            member.dim,
            tensor,
            hessian,
        )


class _Recorder(GroupImportance):
    """Criteria that need calibration data: ``with imp.record(model): model(batch)`` hooks the
    layers :meth:`wants` and passes what they see to :meth:`observe`.

    Statistics keep the shapes they were recorded with; when the model is pruned afterwards
    (target mode re-scores between increments), :meth:`surviving` replays the pruning history
    recorded on the model since then to find which recorded positions are still there."""

    calibrated = True
    _history: Optional[list[dict[str, Any]]] = None
    _mark = 0

    def record(self, model: nn.Module) -> _Recording:
        self._history = model_history(model)
        self._mark = len(self._history)
        return _Recording(self, model)

    def surviving(self, name: str, role: Role, size: int) -> list[int]:
        """Positions of a ``size``-long recorded dim of layer ``name`` that the pruning since
        recording left (``role``: ``Role.IN`` or ``Role.OUT``), in order."""
        alive = list(range(size))
        for step in (self._history or [])[self._mark :]:
            for op in step["ops"]:
                if op["module"] == name and op["role"] == role:
                    gone = set(op["idxs"])
                    alive = [a for k, a in enumerate(alive) if k not in gone]
        return alive

    def current(
        self, member: ParamDim, role: Role, recorded: torch.Tensor, size: int
    ) -> Optional[torch.Tensor]:
        """``recorded`` (one value per recorded position) restricted to the ``size`` positions
        the member's dim still has; ``None`` if the history does not explain that size."""
        if size == recorded.numel():
            return recorded
        alive = self.surviving(member.ref.module_name, role, recorded.numel())
        return recorded[alive] if len(alive) == size else None

    def hooks(self, model: nn.Module) -> list[Any]:
        """Hook handles for one recording (by default :meth:`attach` on each module it
        :meth:`wants`)."""
        return [self.attach(module) for module in model.modules() if self.wants(module)]

    def wants(self, module: nn.Module) -> bool:
        raise NotImplementedError

    def attach(self, module: nn.Module) -> Any:
        raise NotImplementedError


class ActivationImportance(_Recorder):
    """Mean absolute activation of each output channel, recorded on calibration batches.

    ``with imp.record(model): model(batch)`` hooks every conv and linear layer and accumulates
    the mean of ``|output|`` per channel (dim 1 for convolutions, the last dim for linear).
    Groups are scored from the layers whose outputs they remove."""

    def __init__(
        self,
        layer_types: Iterable[type] = (nn.modules.conv._ConvNd, nn.Linear),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.layer_types = tuple(layer_types)
        self._sum: dict[int, torch.Tensor] = {}
        self._count: dict[int, int] = {}

    def wants(self, module: nn.Module) -> bool:
        return isinstance(module, self.layer_types)

    def attach(self, module: nn.Module) -> Any:
        return module.register_forward_hook(self._hook)

    def _hook(self, module: nn.Module, _inputs: Any, output: Any) -> None:
        if not isinstance(output, torch.Tensor):
            return
        dim = output.dim() - 1 if isinstance(module, nn.Linear) else min(1, output.dim() - 1)
        values = output.detach().abs().double().movedim(dim, 0).reshape(output.shape[dim], -1)
        key = id(module)
        fresh = _accumulate(self._sum, key, values.mean(1))
        self._count[key] = (0 if fresh else self._count[key]) + 1

    def accepts(self, group: Group, member: ParamDim) -> bool:
        return (
            id(member.ref.module) in self._sum
            and member.ref.name == "weight"
            and group.handler_role(member) == Role.OUT
        )

    def position_scores(self, member: ParamDim, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        key = id(member.ref.module)
        size = tensor.shape[member.dim]
        return self.current(member, Role.OUT, self._sum[key] / self._count[key], size)


@register_importance("wanda")
class WandaImportance(_Recorder):
    """Weights times input activations (Wanda, for structured pruning): a channel is scored
    where it is consumed, as ``||X_j||_2 * sum_i |W_ij|`` over the weights of every layer that
    reads it (``down_proj`` for an MLP neuron, ``o_proj`` for a head, every projection reading
    the hidden state for a width channel), ``||X_j||_2`` being the norm of that input channel
    over the calibration tokens: the size of what the layer loses without it.

    ``with imp.record(model): model(batch)`` on a few calibration batches, then use it like any
    criterion. Only linear and convolution layers whose inputs were recorded take part."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._squares: dict[int, torch.Tensor] = {}

    def wants(self, module: nn.Module) -> bool:
        return layer_kind(module).input_dim(module) is not None

    def attach(self, module: nn.Module) -> Any:
        return module.register_forward_pre_hook(self._hook)

    def _hook(self, module: nn.Module, inputs: Any) -> None:
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        if x is None or x.device.type == "meta":
            return
        channel = x.dim() - 1 if not isinstance(module, nn.modules.conv._ConvNd) else 1
        self.observe(id(module), x.detach(), channel)

    def observe(self, key: int, x: torch.Tensor, channel: int) -> None:
        """Add what layer ``key`` read, ``x`` with its input channels along ``channel``."""
        # a block of channels at a time: no float64 copy of a whole LLM activation
        _accumulate(self._squares, key, per_position(lambda rows: norms(rows, 2), channel, x))

    def accepts(self, group: Group, member: ParamDim) -> bool:
        return (
            id(member.ref.module) in self._squares
            and member.ref.name == "weight"
            and member.dim == layer_kind(member.ref.module).input_dim(member.ref.module)
            and super().accepts(group, member)
        )

    def position_scores(self, member: ParamDim, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        recorded = self._squares[id(member.ref.module)].sqrt()
        inputs = self.current(member, Role.IN, recorded, tensor.shape[member.dim])
        if inputs is None:
            return None
        return position_norms(tensor, member.dim, 1) * inputs


@register_importance("fluctuation")
class FluctuationImportance(WandaImportance):
    """The fluctuation metric of FLAP (An et al., AAAI 2024): a channel is scored where it is
    consumed, as ``Var(X_j) * ||W_:j||_2^2`` over the layers that read it (``down_proj`` for
    an MLP neuron, ``o_proj`` for a head), ``Var(X_j)`` being the variance of that input
    channel over the calibration tokens: how much of the layer's output moves with it. The
    part that does not move, its mean, a bias can take over when the channel goes (FLAP's bias
    compensation: ``pruner.step(reconstruct=tp.pruner.Reconstruction(batches, weights=False,
    add_bias=True))``), so a channel with a large but steady input ranks low, where Wanda,
    which scores ``E[X_j^2]``, keeps it. FLAP ranks every layer's channels together
    (``normalizer="gaussian"``, ``global_pruning=True``).

    Recorded like :class:`WandaImportance`: ``with imp.record(model): model(batch)``."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._sums: dict[int, torch.Tensor] = {}
        self._counts: dict[int, int] = {}

    def observe(self, key: int, x: torch.Tensor, channel: int) -> None:
        super().observe(key, x, channel)
        fresh = _accumulate(self._sums, key, per_position(_sums, channel, x))
        self._counts[key] = (0 if fresh else self._counts[key]) + x.numel() // x.shape[channel]

    def position_scores(self, member: ParamDim, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        key = id(member.ref.module)
        if not self._counts[key]:  # only empty inputs recorded
            return None
        mean = self._sums[key] / self._counts[key]
        variance = (self._squares[key] / self._counts[key] - mean * mean).clamp(min=0)
        inputs = self.current(member, Role.IN, variance, tensor.shape[member.dim])
        if inputs is None:
            return None
        return position_norms(tensor, member.dim, 2) * inputs


def _sums(rows: torch.Tensor) -> torch.Tensor:
    return rows.sum(1, dtype=torch.float64)


def _accumulate(store: dict[int, torch.Tensor], key: int, value: torch.Tensor) -> bool:
    """Add ``value`` to ``store[key]``; start afresh where the shape changed (the layer was
    pruned since). Returns whether it started afresh."""
    fresh = key not in store or store[key].shape != value.shape
    store[key] = value if fresh else store[key] + value
    return fresh


class _Recording:
    def __init__(self, importance: _Recorder, model: nn.Module) -> None:
        self.importance = importance
        self.model = model
        self.handles: list[Any] = []

    def __enter__(self) -> _Recorder:
        self.handles = self.importance.hooks(self.model)
        return self.importance

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()


GroupMagnitudeImportance = MagnitudeImportance
GroupTaylorImportance = TaylorImportance
GroupHessianImportance = HessianImportance
OBDImportance = HessianImportance


@register_importance("obs")
class OBSImportance(_Recorder):
    """Structured Optimal Brain Surgeon: the output error a channel's removal leaves in the
    layers that read it *after* they are refit (ZipLM / SlimGPT-style), from calibration inputs.

    ``with imp.record(model): model(batch)`` accumulates the input second moments ``H = E[x
    x^T]`` of every linear and convolution layer. For a group, channels are then removed
    greedily, the cheapest first, from all its consumers at once: removing the block ``B`` of
    input features costs ``tr(W_B (H^-1)_BB^-1 W_B^T)`` and the remaining weights are updated by
    the least-squares compensation, so redundant channels (whose contribution others can take
    over) go first, where magnitude or Wanda see only each channel alone. A channel's score is the
    cumulative error, relative to each consumer's output energy and averaged over consumers,
    after it is removed: scores are comparable across groups, so global pruning allocates the
    removals where the error stays smallest. ``steps`` bounds the greedy rounds per group (blocks
    of channels are removed per round); ``damping`` is added to ``H``'s diagonal, relative to
    its mean. Pair it with ``step(reconstruct=batches)``, which applies the compensation."""

    def __init__(self, steps: int = 64, damping: float = 1e-2, **kwargs: Any) -> None:
        kwargs.setdefault("normalizer", None)
        super().__init__(**kwargs)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        if damping < 0:
            raise ValueError(f"damping must be >= 0, got {damping}")
        self.steps = steps
        self.damping = damping
        self._moments: dict[int, moments.InputMoments] = {}

    def wants(self, module: nn.Module) -> bool:
        return moments.unsupported(module) is None

    def attach(self, module: nn.Module) -> Any:
        stats = self._moments.get(id(module))
        if stats is None or stats.features != moments.input_channels(module) * (
            moments.kernel_size(module)
        ):
            stats = self._moments[id(module)] = moments.InputMoments(module, type(module).__name__)
        return module.register_forward_pre_hook(stats.observe)

    @torch.no_grad()
    def __call__(self, group: Group) -> Optional[torch.Tensor]:
        consumers = [c for c in (self._consumer(group, m, i) for m, i in group.index_maps()) if c]
        if not consumers:
            return None
        alive = list(group.prunable_idxs)
        scores = torch.zeros(group.size, dtype=torch.float64)
        batch = max(1, math.ceil(len(alive) / self.steps))
        cumulative = 0.0
        while alive:
            costs = sum(c.costs(alive) for c in consumers) / len(consumers)
            order = torch.argsort(costs, stable=True)[:batch].tolist()
            taken = [alive[k] for k in order]
            scores[taken] = cumulative + costs[order]
            joint = sum(c.remove(taken) for c in consumers) / len(consumers)
            cumulative = max(cumulative + joint, float(scores[taken].max()))
            chosen = set(taken)
            alive = [i for i in alive if i not in chosen]
        frozen = set(range(group.size)) - set(group.prunable_idxs)
        scores[sorted(frozen)] = cumulative
        return normalize(scores, self.normalizer)

    def _consumer(self, group: Group, member: ParamDim, index: Any) -> Optional[_Surgeon]:
        module = member.ref.module
        stats = self._moments.get(id(module))
        if (
            stats is None
            or not stats.count
            or member.ref.name != "weight"
            or group.handler_role(member) != Role.IN
            or len(index) != moments.input_channels(module)
        ):
            return None
        per_channel = moments.kernel_size(module)
        if stats.features != len(index) * per_channel:
            if stats.groups != 1:
                return None
            alive = self.surviving(member.ref.module_name, Role.IN, stats.features // per_channel)
            if len(alive) != len(index):
                return None
            stats = stats.subset(alive)
        return _Surgeon(module, stats, index, self.damping)


class _Surgeon:
    """One consumer during the greedy removal: its weight rows and inverse input moments,
    updated as blocks of features are removed."""

    def __init__(self, module: nn.Module, stats: moments.InputMoments, index: Any, damping: float):
        self.weight = moments.weight_rows(module).clone()
        hessian = stats.second()
        self.energy = float(torch.einsum("goi,gij,goj->", self.weight, hessian, self.weight))
        diagonal = hessian.diagonal(dim1=1, dim2=2)
        eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype)
        hessian = hessian + (damping * diagonal.mean(1).clamp(min=1e-12)).view(-1, 1, 1) * eye
        self.inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
        per_channel = moments.kernel_size(module)
        self.blocks: dict[int, list[int]] = {}
        for position, i in enumerate(index.tolist()):
            if i >= 0:
                block = self.blocks.setdefault(i, [])
                block.extend(range(position * per_channel, (position + 1) * per_channel))

    def costs(self, channels: list[int]) -> torch.Tensor:
        """Relative output error of removing each channel alone, from the current state."""
        out = torch.zeros(len(channels), dtype=torch.float64)
        by_size: dict[int, list[int]] = {}
        for k, i in enumerate(channels):
            if i in self.blocks:
                by_size.setdefault(len(self.blocks[i]), []).append(k)
        for ks in by_size.values():
            features = torch.tensor([self.blocks[channels[k]] for k in ks])
            inverse = self.inverse[:, features.unsqueeze(-1), features.unsqueeze(-2)]
            rows = self.weight[:, :, features].permute(0, 2, 3, 1)
            solved = torch.linalg.solve(inverse, rows)
            out[ks] = (rows * solved).sum((0, 2, 3)) / max(self.energy, 1e-300)
        return out

    def remove(self, channels: list[int]) -> float:
        """Remove the channels' features with the optimal update; their joint relative cost."""
        features = [f for i in channels for f in self.blocks.pop(i, [])]
        if not features:
            return 0.0
        block = torch.tensor(features)
        inverse_bb = self.inverse[:, block][:, :, block]
        through = torch.linalg.solve(inverse_bb, self.inverse[:, block, :])
        rows = self.weight[:, :, block]
        cost = float((rows * torch.linalg.solve(inverse_bb, rows.transpose(1, 2)).mT).sum())
        self.weight -= rows @ through
        self.inverse -= self.inverse[:, :, block] @ through
        return cost / max(self.energy, 1e-300)
