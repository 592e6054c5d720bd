"""Expert saliency from routing on calibration data (groups of kind ``"experts"``).

``RoutingImportance(method="frequency")`` scores an expert by how often the router selects it;
``method="reap"`` by REAP's router-weighted expert activation norm: the mean, over the tokens
routed to the expert, of its routing weight times the norm of its output, so an expert chosen
often but contributing little ranks low. Groups of other kinds go to ``others`` (or are not
scored).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from torchslim.graph.dependency import Group
from torchslim.importance.base import Importance
from torchslim.importance.criteria import _Recorder
from torchslim.importance.registry import register_importance
from torchslim.ops.experts import expert_outputs, is_routed_experts
from torchslim.spaces.analysis import ParamDim

METHODS = ("frequency", "reap")


class RoutingImportance(_Recorder):
    """Calibrated expert scores: ``with imp.record(model): model(batch)`` on a few batches,
    then prune ``{"experts": ratio}`` with it. ``others`` scores the groups that are not
    experts (e.g. ``WandaImportance()`` recorded in the same pass)."""

    def __init__(
        self, method: str = "reap", others: Optional[Importance] = None, normalizer: Any = "mean"
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        super().__init__(normalizer=normalizer)
        self.method = method
        self.others = others
        self._totals: dict[int, torch.Tensor] = {}
        self._counts: dict[int, torch.Tensor] = {}

    def record(self, model: nn.Module) -> Any:
        if isinstance(self.others, _Recorder):
            self.others.record(model)  # its pruning-history mark; its hooks join this recording
        return super().record(model)

    def hooks(self, model: nn.Module) -> list[Any]:
        handles = super().hooks(model)
        if isinstance(self.others, _Recorder):
            handles += self.others.hooks(model)
        return handles

    def wants(self, module: nn.Module) -> bool:
        return is_routed_experts(module)

    def attach(self, module: nn.Module) -> Any:
        return module.register_forward_pre_hook(self._hook, with_kwargs=True)

    @torch.no_grad()
    def _hook(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        names = ("hidden_states", "top_k_index", "top_k_weights")
        values = list(args) + [kwargs[n] for n in names[len(args) :] if n in kwargs]
        if len(values) < 3 or values[0].device.type == "meta":
            return
        hidden, index, weights = values[:3]
        experts = int(module.num_experts)
        totals = torch.zeros(experts, dtype=torch.float64)
        chosen = index[index < experts].reshape(-1)
        counts = torch.bincount(chosen, minlength=experts).double().cpu()
        if self.method == "frequency":
            totals += counts
        else:
            for expert in torch.nonzero(counts).flatten().tolist():
                token, slot = torch.nonzero(index == expert, as_tuple=True)
                out = expert_outputs(module, hidden[token], slice(expert, expert + 1))[0]
                gated = weights[token, slot].double() * out.double().norm(dim=-1)
                totals[expert] += float(gated.sum())
        key = id(module)
        if key in self._totals and self._totals[key].shape == totals.shape:
            self._totals[key] += totals
            self._counts[key] += counts
        else:
            self._totals[key], self._counts[key] = totals, counts

    def scores_of(self, module: nn.Module) -> Optional[torch.Tensor]:
        """One score per expert of ``module`` (None if it was not recorded)."""
        key = id(module)
        if key not in self._totals:
            return None
        if self.method == "frequency":
            return self._totals[key]
        return self._totals[key] / self._counts[key].clamp(min=1)

    def accepts(self, group: Group, member: ParamDim) -> bool:
        """The expert dim of the experts layer's weights (the router's rows follow them)."""
        return (
            member.dim == 0
            and is_routed_experts(member.ref.module)
            and super().accepts(group, member)
        )

    def position_scores(self, member: ParamDim, tensor: torch.Tensor) -> Optional[torch.Tensor]:
        scores = self.scores_of(member.ref.module)
        return scores if scores is not None and scores.numel() == tensor.shape[0] else None

    def __call__(self, group: Group) -> Optional[torch.Tensor]:
        if not group.routes_experts:
            return self.others(group) if self.others is not None else None
        return super().__call__(group)


register_importance("reap", lambda: RoutingImportance("reap"))
register_importance("routing_frequency", lambda: RoutingImportance("frequency"))
