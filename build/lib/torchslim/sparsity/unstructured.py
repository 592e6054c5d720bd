"""Unstructured magnitude pruning in the PaddleSlim shape: ``UnstructuredPruner`` (ratio or
threshold mode) and ``GMPUnstructuredPruner`` (gradual magnitude pruning, cubic schedule).

    pruner = UnstructuredPruner(model, mode="ratio", ratio=0.55)
    for batch in loader:
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        pruner.step()            # recompute masks from the current weights
    pruner.update_params()       # before evaluating or saving
    UnstructuredPruner.total_sparse(model)
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import nn

from torchslim.sparsity.masks import MaskSet, sparsity

NORM_TYPES: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.RMSNorm,
)


def default_skip_params(model: nn.Module) -> set[str]:
    """Names of parameters left dense by default: every normalisation layer's parameters and
    every bias (any 1-D parameter)."""
    skipped = set()
    for module_name, module in model.named_modules():
        is_norm = isinstance(module, NORM_TYPES) or "Norm" in type(module).__name__
        for name, param in module.named_parameters(recurse=False):
            if is_norm or param.dim() < 2:
                skipped.add(f"{module_name}.{name}" if module_name else name)
    return skipped


class UnstructuredPruner:
    """Mask the smallest weights: a fraction ``ratio`` of them (ranked across all layers, or
    per layer with ``local_sparsity``) or every weight with ``|w| < threshold``.

    ``skip_params_func(model)`` returns names to leave dense: parameter names (``"fc.weight"``)
    or module names (``"bn1"``, all its parameters). ``prune_params_type="conv1x1_only"`` limits
    pruning to 1x1 convolutions, as in PaddleSlim.
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str = "ratio",
        threshold: float = 0.01,
        ratio: float = 0.55,
        prune_params_type: Optional[str] = None,
        skip_params_func: Optional[Callable[[nn.Module], set[str]]] = None,
        local_sparsity: bool = False,
    ) -> None:
        if mode not in ("ratio", "threshold"):
            raise ValueError(f"mode must be 'ratio' or 'threshold', got {mode!r}")
        _check_ratio(ratio)
        if not threshold >= 0:
            raise ValueError(f"threshold must be >= 0, got {threshold}")
        if prune_params_type not in (None, "conv1x1_only"):
            raise ValueError(
                f"prune_params_type must be None or 'conv1x1_only', got {prune_params_type!r}"
            )
        self.model = model
        self.mode = mode
        self.threshold = threshold
        self.ratio = ratio
        self.local_sparsity = local_sparsity
        skipped = (skip_params_func or default_skip_params)(model)
        params = {
            name: param
            for name, param in model.named_parameters()
            if not _skipped(name, skipped) and _type_allowed(model, name, prune_params_type)
        }
        if not params:
            raise ValueError("no parameter left to prune after skip_params_func")
        self.masks = MaskSet(model, params)
        self.step()

    # ---------------------------------------------------------------------------- masks

    def update_threshold(self) -> None:
        """Ratio mode: the magnitude below which ``ratio`` of the weights fall."""
        if self.mode != "ratio" or self.local_sparsity:
            return
        magnitudes = torch.cat(
            [p.detach().abs().flatten().float() for p in self.masks.params.values()]
        )
        self.threshold = _kth_magnitude(magnitudes, self.ratio)

    @torch.no_grad()
    def mask_parameters(self) -> None:
        """New masks from the current weights (masked weights are zero, so they stay out).

        Threshold mode keeps ``|w| >= threshold``; global ratio mode keeps ``|w| >`` the
        ``ratio`` quantile of all weights; ``local_sparsity`` removes exactly ``ratio`` of each
        layer's weights (ties broken by position)."""
        for name, param in self.masks.params.items():
            magnitude = param.detach().abs()
            if self.mode == "threshold":
                keep = magnitude >= self.threshold
            elif self.local_sparsity:
                keep = _keep_largest(magnitude, int(self.ratio * magnitude.numel()))
            else:
                keep = magnitude > self.threshold
            self.masks.masks[name] = keep

    def step(self) -> None:
        """Recompute the threshold (ratio mode) and the masks, then zero the masked weights."""
        self.update_threshold()
        self.mask_parameters()
        self.masks.apply()

    def update_params(self) -> None:
        """Zero the masked weights (before evaluation or saving)."""
        self.masks.apply()

    def strip(self) -> nn.Module:
        """Bake the zeros in and remove every hook: a plain model with the original keys."""
        return self.masks.remove()

    # -------------------------------------------------------------------------- reports

    @staticmethod
    def total_sparse(model: nn.Module) -> float:
        """Fraction of zeros over all parameters of ``model``."""
        total = sum(p.numel() for p in model.parameters())
        zeros = sum(p.numel() - int(torch.count_nonzero(p)) for p in model.parameters())
        return zeros / max(1, total)

    def sparsity_report(self) -> dict[str, float]:
        """Per pruned parameter: the fraction of its weights that are zero."""
        return {name: sparsity(param) for name, param in self.masks.params.items()}

    def __str__(self) -> str:
        lines = [f"{'parameter':<48} {'sparsity':>9}"]
        lines += [f"{name:<48} {value:>9.2%}" for name, value in self.sparsity_report().items()]
        lines.append(f"{'whole model':<48} {self.total_sparse(self.model):>9.2%}")
        return "\n".join(lines)


class GMPUnstructuredPruner(UnstructuredPruner):
    """Gradual magnitude pruning: the ratio grows from ``initial_ratio`` to ``ratio`` along
    ``ratio_t = ratio + (initial - ratio) * (1 - t / T)^3`` over ``pruning_iterations``,
    updated ``pruning_steps`` times, after ``stable_iterations`` dense ones. Call ``step()``
    once per iteration. ``configs`` takes the same keys as PaddleSlim's.
    """

    def __init__(
        self,
        model: nn.Module,
        ratio: float = 0.55,
        prune_params_type: Optional[str] = None,
        skip_params_func: Optional[Callable[[nn.Module], set[str]]] = None,
        local_sparsity: bool = False,
        configs: Optional[dict[str, Any]] = None,
    ) -> None:
        settings = {
            "stable_iterations": 0,
            "pruning_iterations": 1000,
            "tunning_iterations": 0,
            "pruning_steps": 100,
            "initial_ratio": 0.15,
            "resume_iteration": -1,
        }
        unknown = set(configs or {}) - set(settings)
        if unknown:
            raise ValueError(f"unknown GMP configs: {sorted(unknown)}")
        settings.update(configs or {})
        if settings["pruning_iterations"] < 1 or settings["pruning_steps"] < 1:
            raise ValueError("pruning_iterations and pruning_steps must be >= 1")
        _check_ratio(settings["initial_ratio"])
        self.final_ratio = _check_ratio(ratio)
        self.configs = settings
        self.iteration = settings["resume_iteration"]
        super().__init__(
            model,
            mode="ratio",
            ratio=self.scheduled_ratio(max(self.iteration, 0)),
            prune_params_type=prune_params_type,
            skip_params_func=skip_params_func,
            local_sparsity=local_sparsity,
        )

    def scheduled_ratio(self, iteration: int) -> float:
        """The cubic schedule, held constant between its ``pruning_steps`` updates."""
        c = self.configs
        if iteration < c["stable_iterations"]:
            return 0.0
        span = c["pruning_iterations"]
        every = max(1, span // c["pruning_steps"])
        t = min(span, (iteration - c["stable_iterations"]) // every * every)
        return self.final_ratio + (c["initial_ratio"] - self.final_ratio) * (1 - t / span) ** 3

    def step(self) -> None:
        self.iteration += 1
        self.ratio = self.scheduled_ratio(max(self.iteration, 0))
        super().step()


def _check_ratio(ratio: float) -> float:
    if not isinstance(ratio, (int, float)) or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio!r}")
    return float(ratio)


def _skipped(name: str, skipped: set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:k]) in skipped for k in range(1, len(parts) + 1))


def _type_allowed(model: nn.Module, name: str, kind: Optional[str]) -> bool:
    if kind is None:
        return True
    owner = model.get_submodule(name.rpartition(".")[0])
    return (
        isinstance(owner, nn.Conv2d)
        and name.endswith("weight")
        and tuple(owner.kernel_size) == (1, 1)
    )


def _kth_magnitude(magnitudes: torch.Tensor, ratio: float) -> float:
    """The ``ratio`` quantile: weights not above it are masked (-inf when none are)."""
    count = int(ratio * magnitudes.numel())
    if count == 0:
        return float("-inf")
    return float(torch.kthvalue(magnitudes, count).values)


def _keep_largest(magnitude: torch.Tensor, count: int) -> torch.Tensor:
    """Mask exactly the ``count`` smallest magnitudes."""
    keep = torch.ones(magnitude.numel(), dtype=torch.bool)
    if count:
        order = torch.argsort(magnitude.flatten(), stable=True)
        keep[order[:count]] = False
    return keep.view_as(magnitude)
