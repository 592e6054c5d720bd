"""The high-level pruner: which groups lose how many channels at each step.

``MetaPruner`` builds the dependency graph once, scores groups with an importance criterion and
removes the lowest-scoring channels, per group (local) or ranked across groups (global), in
``iterative_steps`` steps or until a MACs / parameter target is reached.
"""

from __future__ import annotations

import copy
import math
import warnings
from fnmatch import fnmatchcase
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from torchslim.capture.modules import unwrap_model
from torchslim.graph.checkpoint import trial
from torchslim.graph.dependency import ROOT_TYPES, DependencyGraph, Group
from torchslim.graph.kinds import KINDS, group_kind
from torchslim.importance import (
    Importance,
    MagnitudeImportance,
    importance_names,
    make_importance,
)
from torchslim.pruner.compat import (
    HEAD_KINDS,
    check_channel_groups,
    check_num_heads,
    head_ratios,
    isomorphic_pools,
)
from torchslim.pruner.reconstruct import Reconstruction, ReconstructionReport
from torchslim.pruner.safety import SafePruning, StepReport, prune_checked, prune_merged
from torchslim.pruner.schedule import linear_scheduler
from torchslim.pruner.summary import KindSummary, summarise, unmet_requests
from torchslim.pruning.reparametrised import detach_cached
from torchslim.utils.ops_counter import count_ops_and_params
from torchslim.verify import VerifyReport, verify

Scope = Union[nn.Module, Sequence[nn.Module]]
Calibration = Union[None, Reconstruction, Iterable[Any]]
DEFAULT_ROOTS = ROOT_TYPES
#: counts below a refused one tried in turn before bisecting (a multiple of 8 is among them)
NEARBY_COUNTS = 16


class MetaPruner:
    """Prune a model by ``pruning_ratio`` of every group's channels, scored by ``importance``.

    ``pruning_ratio_dict`` maps a module (or a tuple of modules) to its own ratio, applied to
    the groups rooted anywhere inside it, or a kind of channel (``"heads"``, ``"query_heads"``,
    ``"head_dim"``, ``"neurons"``, ``"width"``, see :mod:`torchslim.graph.kinds`) to the ratio
    of the groups of that kind: ``{"heads": 0.25, "neurons": 0.5, "width": 0.25}`` with
    ``pruning_ratio=0`` prunes a quarter of the heads, half of the MLP and a quarter of the
    hidden size of a transformer; with ``global_pruning`` the groups of each kind are ranked
    together (``{"neurons": 0.2}``: a fifth of the model's MLP neurons, taken where the scores
    are lowest, each layer within ``max_pruning_ratio``). ``ignored_layers`` takes modules,
    module types or parameters. ``round_to`` keeps the remaining channel count of every group a multiple of it.
    ``target_macs`` / ``target_params`` (fractions of the dense count, e.g. 0.5 for 2x fewer)
    switch to target mode: each step prunes in small global increments until the count is
    reached. ``ch_sparsity`` / ``ch_sparsity_dict`` are the older names of the ratios.
    ``graph`` reuses a dependency graph already built on ``model`` instead of tracing it again
    (searches apply many configurations to one graph); ``trace_on_meta`` forces tracing on a
    weightless copy (``True``) or on the model (``False``); by default the copy is traced
    unless its forward needs real values (see ``DependencyGraph.build_dependency``).
    ``exact_only`` leaves alone the groups whose channels pass through channel-mixing ops
    (LayerNorm statistics, a head size used as a scale): what remains is exactly the original
    with the removed channels zeroed. Every step ends with a forward check of the pruned model
    (on ``meta`` where possible); groups that break it are refused and the rest pruned
    (:attr:`refused`, :attr:`last_step`).

    torch-pruning's head and channel-group arguments work on top of what the graph infers
    (:mod:`torchslim.pruner.compat`): ``num_heads={layer: n}`` is checked against the heads
    found (an error names the layer); once heads are declared they go only with
    ``prune_num_heads=True``, at ``head_pruning_ratio`` (``head_pruning_ratio_dict`` per
    layer); ``prune_head_dims=False`` keeps head sizes; ``isomorphic=True`` with global
    pruning ranks structurally identical groups among themselves; ``in_channel_groups`` /
    ``out_channel_groups`` / ``channel_groups`` are checked to divide their layers' channels.
    """

    def __init__(
        self,
        model: nn.Module,
        example_inputs: Any,
        importance: Optional[Importance] = None,
        global_pruning: bool = False,
        pruning_ratio: float = 0.5,
        pruning_ratio_dict: Optional[dict[Any, float]] = None,
        max_pruning_ratio: float = 1.0,
        iterative_steps: int = 1,
        iterative_pruning_ratio_scheduler: Callable[[float, int], list[float]] = linear_scheduler,
        ignored_layers: Optional[Iterable[Any]] = None,
        round_to: Optional[int] = None,
        root_module_types: Optional[Sequence[type]] = None,
        forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
        output_transform: Optional[Callable[[Any], Any]] = None,
        customized_pruners: Optional[dict[Any, Any]] = None,
        unwrapped_parameters: Optional[Iterable[Any]] = None,
        target_macs: Optional[float] = None,
        target_params: Optional[float] = None,
        target_increment: float = 0.02,
        ch_sparsity: Optional[float] = None,
        ch_sparsity_dict: Optional[dict[Any, float]] = None,
        trace_train_mode: bool = True,
        graph: Optional[DependencyGraph] = None,
        trace_on_meta: Optional[bool] = None,
        exact_only: bool = False,
        isomorphic: bool = False,
        in_channel_groups: Optional[dict[nn.Module, int]] = None,
        out_channel_groups: Optional[dict[nn.Module, int]] = None,
        num_heads: Optional[dict[nn.Module, int]] = None,
        prune_num_heads: bool = False,
        prune_head_dims: bool = True,
        head_pruning_ratio: float = 0.0,
        head_pruning_ratio_dict: Optional[dict[nn.Module, float]] = None,
        channel_groups: Optional[dict[nn.Module, int]] = None,
    ) -> None:
        model = unwrap_model(model)
        if graph is not None and graph.model is not model:
            raise ValueError("graph was built on another model than the one given")
        self.model = model
        self.example_inputs = example_inputs
        self.forward_fn = forward_fn
        self.importance = _criterion(importance)
        self.global_pruning = global_pruning
        self.pruning_ratio = _ratio("pruning_ratio", _first(ch_sparsity, pruning_ratio))
        self.max_pruning_ratio = _ratio("max_pruning_ratio", max_pruning_ratio, upper=1.0)
        if not isinstance(iterative_steps, int) or iterative_steps < 1:
            raise ValueError(f"iterative_steps must be an int >= 1, got {iterative_steps!r}")
        if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
            raise ValueError(f"round_to must be a positive int, got {round_to!r}")
        for name, value in (("target_macs", target_macs), ("target_params", target_params)):
            if value is not None and not 0.0 < value < 1.0:
                raise ValueError(f"{name} must be a fraction in (0, 1), got {value}")
        if not 0.0 < target_increment < 1.0:
            raise ValueError(f"target_increment must be in (0, 1), got {target_increment}")
        self.iterative_steps = iterative_steps
        self.round_to = round_to
        self.target_macs = target_macs
        self.target_params = target_params
        self.target_increment = target_increment
        self.scheduler = iterative_pruning_ratio_scheduler
        self.schedule = iterative_pruning_ratio_scheduler(self.pruning_ratio, iterative_steps)
        self.current_step = 0
        self.root_module_types = tuple(root_module_types or DEFAULT_ROOTS)

        self.ignored_modules, self.ignored_params = _split_ignored(model, ignored_layers or [])
        ratio_dict = dict(_first(ch_sparsity_dict, pruning_ratio_dict) or {})
        self.kind_ratios = {
            kind: _ratio(f"pruning_ratio_dict[{kind!r}]", ratio)
            for kind, ratio in ratio_dict.items()
            if isinstance(kind, str)
        }
        unknown = set(self.kind_ratios) - set(KINDS)
        if unknown:
            raise ValueError(f"pruning_ratio_dict: unknown kinds {sorted(unknown)}; use {KINDS}")
        if self.kind_ratios and not getattr(self.importance, "calibrated", False):
            warnings.warn(
                f"{type(self.importance).__name__} ranks {', '.join(sorted(self.kind_ratios))} "
                "without calibration data: on a pretrained language model that can destroy it "
                "(SmolLM2-135M, 20% of MLP neurons by L2 magnitude: perplexity 24 -> 568,180). "
                "Use a calibrated criterion (tp.importance.FisherImportance(), recorded with "
                "loss.backward() inside imp.record(model), or WandaImportance(), on forward "
                "passes alone), global_pruning=True and step(reconstruct=batches)",
                UserWarning,
                stacklevel=2,
            )
        declared = bool(num_heads or head_pruning_ratio_dict or prune_num_heads)
        _ratio("head_pruning_ratio", head_pruning_ratio)
        for kind, ratio in head_ratios(
            declared, prune_num_heads, head_pruning_ratio, prune_head_dims
        ).items():
            self.kind_ratios.setdefault(kind, ratio)
        self.head_scopes = _scopes(model, dict(head_pruning_ratio_dict or {}))
        self.isomorphic = isomorphic
        for argument, groups in (
            ("in_channel_groups", in_channel_groups),
            ("out_channel_groups", out_channel_groups),
            ("channel_groups", channel_groups),
        ):
            check_channel_groups(model, dict(groups or {}), argument)
        scoped = {k: v for k, v in ratio_dict.items() if not isinstance(k, str)}
        self.ratio_scopes = _scopes(model, scoped)
        self._kinds: dict[int, str] = {}
        self.DG = graph or DependencyGraph().build_dependency(
            model,
            example_inputs,
            forward_fn=forward_fn,
            output_transform=output_transform,
            unwrapped_parameters=unwrapped_parameters,
            customized_pruners=customized_pruners,
            trace_train_mode=trace_train_mode,
            trace_on_meta=trace_on_meta,
        )
        if num_heads:
            check_num_heads(self.DG, dict(num_heads))
        self.exact_only = exact_only
        #: Groups the safety net refused (the pruned forward failed), with the failure.
        self.refused: dict[int, str] = {}
        #: Groups that lost fewer channels than asked because the graph refuses more (a
        #: ``topk`` needing ``k`` experts, a size comparison), with what was removed and why.
        self.cut_short: dict[int, str] = {}
        #: What the last step pruned and did not (``None`` before any, and after an
        #: interactive step whose groups the caller prunes).
        self.last_step: Optional[StepReport] = None
        self.initial_sizes = {g.coupling.id: g.size for g in self.groups()}
        #: What the last ``step(reconstruct=...)`` refit (``None`` before any).
        self.reconstruction: Optional[ReconstructionReport] = None
        targeted = target_macs is not None or target_params is not None
        self.base_macs, self.base_params = self._count() if targeted else (None, None)

    # ------------------------------------------------------------------------------ groups

    def groups(self) -> list[Group]:
        """The groups this pruner may prune: ignored layers and parameters left out, and groups
        refused by the safety net; with ``exact_only``, groups with channel-mixing ops too."""
        return [
            g
            for g in self._candidates()
            if g.coupling.id not in self.refused and not (self.exact_only and g.mixing)
        ]

    def _candidates(self) -> list[Group]:
        groups = self.DG.get_all_groups(
            ignored_layers=self.ignored_modules, root_module_types=self.root_module_types
        )
        return [g for g in groups if not self._touches_ignored_param(g)]

    def _skipped_mixing(self) -> list[str]:
        if not self.exact_only:
            return []
        return [g.root.label for g in self._candidates() if g.mixing]

    def _touches_ignored_param(self, group: Group) -> bool:
        return bool(self.ignored_params) and any(
            id(getattr(m.ref.module, m.ref.name, None)) in self.ignored_params
            for m in group.coupling.members
        )

    def kind_of(self, group: Group) -> str:
        """The group's kind of channel (see :mod:`torchslim.graph.kinds`), found once."""
        kind = self._kinds.get(group.coupling.id)
        if kind is None:
            kind = self._kinds[group.coupling.id] = group_kind(group)
        return kind

    def summary(self) -> list[KindSummary]:
        """Per kind of channel, what was asked and what was pruned so far, and why groups
        kept all their channels (see :mod:`torchslim.pruner.summary`)."""
        return summarise(self)

    def _ratio_for(self, group: Group) -> Optional[float]:
        return self._ratio_source(group)[0]

    def _ratio_source(self, group: Group) -> tuple[Optional[float], Optional[str]]:
        """The group's own ratio, and the kind it comes from (``None`` for a module scope)."""
        root = id(group.root.ref.module)
        for members, ratio in self.ratio_scopes:
            if root in members:
                return ratio, None
        if self.kind_ratios:
            kind = self.kind_of(group)
            if kind in HEAD_KINDS and self.head_scopes:
                touched = {id(m.ref.module) for m in group.coupling.members}
                for members, ratio in self.head_scopes:
                    if touched & members:
                        return ratio, None
            return self.kind_ratios.get(kind), kind
        return None, None

    def pruning_history(self) -> list[tuple[str, bool, list[int]]]:
        """What this pruner's graph pruned, in torch-pruning's form (see
        :meth:`DependencyGraph.pruning_history`)."""
        return self.DG.pruning_history()

    def load_pruning_history(self, pruning_history: Iterable[Sequence[Any]]) -> None:
        """Replay a pruning history on this pruner's model."""
        self.DG.load_pruning_history(pruning_history)

    # ------------------------------------------------------------------------------ steps

    def step_and_verify(
        self, tolerance: float = 1e-6, reconstruct: Calibration = None
    ) -> VerifyReport:
        """Run the next step and check it: the pruned model against the model as it was
        before the step, with the removed channels zeroed (float64, see :func:`verify`). With
        ``reconstruct`` the reference is the model after the refit (a deliberate weight change,
        reported in :attr:`reconstruction`), so the check is still of the structural prune."""
        groups = self.step(interactive=True, reconstruct=reconstruct)
        detach_cached(self.model)
        reference = copy.deepcopy(self.DG)  # after any refit: step() refits before it returns
        result = self._prune_checked(groups)
        selections = []
        for group, classes in result.pruned:
            like = reference.group_like(group)
            merged = reference.group_of(like.coupling, like.root, classes)
            selections.append((merged, list(merged.idxs)))
        return verify(
            reference,
            self.example_inputs,
            selections,
            forward_fn=self.forward_fn,
            per_group=False,
            tolerance=tolerance,
        )

    def step(
        self, interactive: bool = False, reconstruct: Calibration = None
    ) -> Union[None, Iterator[Group]]:
        """Run the next iterative step; with ``interactive=True`` yield its groups instead,
        each with ``idxs`` set, for the caller to ``group.prune()`` (one at a time).

        ``reconstruct``: calibration batches (inputs of the form ``example_inputs`` takes) or a
        :class:`~torchslim.pruner.reconstruct.Reconstruction`; the layers that consume the
        removed channels are then refit on them before the groups are pruned (see
        :mod:`torchslim.pruner.reconstruct`). With ``interactive=True`` every yielded group must
        then be pruned: the refit already assumes its channels are gone."""
        if self.current_step >= self.iterative_steps:
            raise RuntimeError(
                f"all {self.iterative_steps} iterative steps are done; build a new pruner "
                "to prune further"
            )
        config = _reconstruction(reconstruct)
        self.current_step += 1
        self.cut_short.clear()
        if self.target_macs is not None or self.target_params is not None:
            selections: Iterable[Group] = self._target_step()
        else:
            selections = self._ratio_step(self.schedule[self.current_step - 1])
        if config is not None:
            try:
                selections = self._reconstructed(selections, config)
            except BaseException:
                self.current_step -= 1
                raise
        if interactive:
            self.last_step = None
            return iter(selections)
        self._prune_checked(selections)
        return None

    def _prune_checked(self, selections: Iterable[Group]) -> SafePruning:
        """Prune a step's groups through the safety net, refuse for later steps the groups
        that broke the forward, and report (see :class:`StepReport`)."""
        result = prune_checked(self.DG, selections)
        for (group, _), reason in result.refused:
            self.refused[group.coupling.id] = reason
        self.last_step = report = StepReport.of(result, self._skipped_mixing())
        if self.current_step == self.iterative_steps:
            for message in unmet_requests(self):
                warnings.warn(message, UserWarning, stacklevel=3)
        if report.mixing:
            reasons = sorted({r for _, rs in report.mixing for r in rs})
            warnings.warn(
                f"{len(report.mixing)} of the {len(report.pruned)} groups this step pruned pass "
                f"through channel-mixing ops ({reasons[0]}{', ...' if len(reasons) > 1 else ''}): "
                "the pruned model is not the original with those channels zeroed (exact_only=True "
                "leaves such groups alone)",
                UserWarning,
                stacklevel=3,
            )
        return result

    def _reconstructed(self, selections: Iterable[Group], config: Reconstruction) -> list[Group]:
        """The step's groups, found by pruning them in a trial that is then undone (target
        mode counts MACs between increments), merged per coupling, with their consumers refit
        on the model as it was before the step."""
        with trial(self.DG), self.DG.deferred(notify=False):
            chosen = prune_merged(selections)
        groups = [self.DG.group_of(g.coupling, g.root, classes) for g, classes in chosen]
        self.reconstruction = config.run(self.model, groups, self.forward_fn)
        return groups

    def _ratio_step(self, ratio: float) -> Iterator[Group]:
        groups = self.groups()
        local, pooled = [], []
        by_kind: dict[str, list[Group]] = {}
        sources = {g.coupling.id: self._ratio_source(g) for g in groups}
        followers = self._factor_followers([g for g in groups if sources[g.coupling.id][0] is None])
        for group in groups:
            custom, kind = sources[group.coupling.id]
            if custom is None and group.coupling.id in followers:
                continue
            if not self.global_pruning or (custom is not None and kind is None):
                local.append((group, ratio if custom is None else self._scheduled(custom)))
            elif custom is not None:
                by_kind.setdefault(kind, []).append(group)
            else:
                pooled.append(group)
        postponed = []
        for group, group_ratio in local:
            chosen, scores = self._select_local(group, group_ratio)
            if chosen and group.refusal(chosen) is not None:
                postponed.append((group, scores, chosen))
            elif chosen:
                yield group.select(chosen)
        for kind, members in by_kind.items():
            yield from self._select_global(members, self._scheduled(self.kind_ratios[kind]))
        pools = isomorphic_pools(pooled) if self.isomorphic else [pooled]
        for pool in pools:
            yield from self._select_global(pool, ratio)
        # Refused while groups of this step were still whole (a size comparison with them, as
        # an LSTM's hidden units before its projection): once more, now that they are pruned.
        for group, scores, chosen in postponed:
            chosen = self._admissible(group, scores, chosen)
            if chosen:
                yield group.select(chosen)

    def _factor_followers(self, groups: list[Group]) -> set[int]:
        """Groups the default ratio leaves alone because a width they factor is already cut.

        Where one width is the product of several groups (a residual width feeding
        ``nn.MultiheadAttention`` is heads x offsets), cutting every factor by the ratio would
        remove far more than asked (0.5 -> 75%); the factor with the most channels takes the
        ratio, and the others keep their size unless a ratio of their own is given."""
        sizes = {g.coupling.id: self.initial_sizes.get(g.coupling.id, g.size) for g in groups}
        cofactors = self.DG.analysis.cofactors

        def rank(coupling: int) -> tuple[int, int]:
            return sizes[coupling], -coupling

        return {
            coupling
            for coupling in sizes
            if any(rank(o) > rank(coupling) for o in cofactors.get(coupling, ()) if o in sizes)
        }

    def _scheduled(self, ratio: float) -> float:
        return self.scheduler(ratio, self.iterative_steps)[self.current_step - 1]

    def _budget(self, group: Group, ratio: float) -> int:
        """How many more channels this group may lose to reach ``ratio`` of its first size."""
        initial = self.initial_sizes.get(group.coupling.id, group.size)
        ratio = min(ratio, self.max_pruning_ratio)
        already = initial - group.size
        return max(0, min(int(math.floor(initial * ratio)) - already, group.size - 1))

    def _rounded(self, group: Group, count: int) -> int:
        if not self.round_to or count <= 0:
            return count
        remaining = group.size - count
        remaining = int(math.ceil(remaining / self.round_to) * self.round_to)
        return max(0, group.size - remaining)

    def _scores(self, group: Group) -> Optional[torch.Tensor]:
        scores = self.importance(group)
        if scores is None:
            return None
        if scores.numel() != group.size:
            raise ValueError(
                f"{type(self.importance).__name__} returned {scores.numel()} scores for a group "
                f"of {group.size} channels ({group.root.label})"
            )
        return scores

    def _select_local(self, group: Group, ratio: float) -> tuple[list[int], Optional[torch.Tensor]]:
        """The lowest-scored channels of ``group`` for ``ratio``, and the scores."""
        count = self._rounded(group, self._budget(group, ratio))
        scores = self._scores(group) if count else None
        if scores is None:
            return [], None
        return _lowest(scores, group.prunable_idxs, count), scores

    def _select_global(self, groups: list[Group], ratio: float) -> Iterator[Group]:
        scored = [(g, self._scores(g)) for g in groups]
        scored = [(g, s) for g, s in scored if s is not None]
        total = sum(self.initial_sizes.get(g.coupling.id, g.size) for g, _ in scored)
        already = sum(self.initial_sizes.get(g.coupling.id, g.size) - g.size for g, _ in scored)
        wanted = int(math.floor(total * ratio)) - already
        yield from self._take_lowest(scored, wanted, cap_ratio=self.max_pruning_ratio)

    def _take_lowest(
        self, scored: list[tuple[Group, torch.Tensor]], wanted: int, cap_ratio: float
    ) -> Iterator[Group]:
        """The ``wanted`` lowest scores across groups, each group within its cap."""
        if wanted <= 0:
            return
        candidates = [
            (float(scores[i]), k, i)
            for k, (group, scores) in enumerate(scored)
            for i in group.prunable_idxs
        ]
        candidates.sort()
        chosen: dict[int, list[int]] = {}
        caps = [self._budget(group, cap_ratio) for group, _ in scored]
        taken = 0
        for _, k, i in candidates:
            if taken >= wanted:
                break
            if len(chosen.get(k, [])) < caps[k]:
                chosen.setdefault(k, []).append(i)
                taken += 1
        for k, idxs in sorted(chosen.items()):
            group, scores = scored[k]
            idxs = self._admissible(group, scores, idxs)
            if idxs:
                yield group.select(idxs)

    def _admissible(self, group: Group, scores: torch.Tensor, idxs: list[int]) -> list[int]:
        """The lowest-scored of ``idxs`` (rounded) that the graph accepts: all of them, or,
        where it refuses that many, the largest accepted count among the
        :data:`NEARBY_COUNTS` below it (a size that must stay a multiple, as the widths a
        grouped matrix product reads), else one found by bisection: the most it accepts when
        refusals grow with the count (a ``topk`` that needs ``k`` experts left, a size
        comparison); a smaller one, or none, where they do not."""
        chosen = _lowest(scores, idxs, self._rounded(group, len(idxs)))
        reason = group.refusal(chosen) if chosen else None
        if reason is None:
            return chosen
        accepted: list[int] = []
        for count in range(len(chosen) - 1, max(len(chosen) - 1 - NEARBY_COUNTS, 0), -1):
            trial = _lowest(scores, idxs, self._rounded(group, count))
            if trial and group.refusal(trial) is None:
                accepted = trial
                break
        low, high = 0, 0 if accepted else len(chosen)
        while high - low > 1:
            middle = (low + high) // 2
            trial = _lowest(scores, idxs, self._rounded(group, middle))
            if trial and group.refusal(trial) is None:
                low, accepted = middle, trial
            else:
                high = middle
        self.cut_short[group.coupling.id] = (
            f"{group.root.label}: {len(accepted)} of the {len(chosen)} channels asked removed "
            f"({reason})"
        )
        return accepted

    # ------------------------------------------------------------------------ target mode

    def _count(self) -> tuple[int, int]:
        with torch.no_grad():
            return count_ops_and_params(self.model, self.example_inputs, self.forward_fn)

    def _target_step(self) -> Iterator[Group]:
        """Yield groups in global increments until this step's share of the target is reached
        (each increment is counted after the caller pruned the previous one)."""
        fraction = self.current_step / self.iterative_steps
        goal_macs = _interpolate(self.target_macs, fraction) * self.base_macs
        goal_params = _interpolate(self.target_params, fraction) * self.base_params
        last = None
        while True:
            macs, params = self._count()
            if macs <= goal_macs and params <= goal_params:
                return
            if (macs, params) == last:
                raise RuntimeError("groups yielded by step(interactive=True) must be pruned")
            last = macs, params
            groups = [g for g in self.groups() if self._ratio_for(g) is None]
            scored = [(g, s) for g in groups if (s := self._scores(g)) is not None]
            remaining = sum(len(g.prunable_idxs) for g, _ in scored)
            wanted = max(1, int(remaining * self.target_increment))
            increment = list(self._take_lowest(scored, wanted, cap_ratio=self.max_pruning_ratio))
            if not increment:
                raise RuntimeError(
                    f"cannot reach the target: {macs / self.base_macs:.3f} of the MACs and "
                    f"{params / self.base_params:.3f} of the parameters remain and no group "
                    "can lose more channels (max_pruning_ratio, ignored layers, round_to)"
                )
            yield from increment

    # -------------------------------------------------------------------- regularisation

    def regularize(self, model: nn.Module, reg: Optional[float] = None) -> None:
        """Sparse-training hook, called after ``loss.backward()``; plain pruners add nothing."""

    def update_regularizer(self) -> None:
        """Refresh the groups regularisation acts on (call after pruning)."""


def _reconstruction(value: Calibration) -> Optional[Reconstruction]:
    if value is None or isinstance(value, Reconstruction):
        return value
    if isinstance(value, (torch.Tensor, dict)) or not isinstance(value, Iterable):
        raise TypeError(
            "reconstruct takes an iterable of calibration batches (a list of example inputs) "
            f"or a Reconstruction, got {type(value).__name__}"
        )
    return Reconstruction(value)


def _lowest(scores: torch.Tensor, candidates: Iterable[int], count: int) -> list[int]:
    """The ``count`` candidates with the lowest scores (ties: lower index), sorted."""
    values = scores.tolist()
    return sorted(sorted(candidates, key=lambda i: (values[i], i))[:count])


def _interpolate(target: Optional[float], fraction: float) -> float:
    return 1.0 - (1.0 - target) * fraction if target is not None else math.inf


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _ratio(name: str, value: float, upper: float = 1.0 - 1e-12) -> float:
    if not isinstance(value, (int, float)) or not 0.0 <= value <= upper:
        bound = "[0, 1]" if upper == 1.0 else "[0, 1)"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    return float(value)


def _criterion(importance: Any) -> Any:
    """The importance criterion: an instance, a criterion class (made with no arguments) or a
    registered name (``"l1"``, ``"wanda"``, ... see ``tp.importance.importance_names()``)."""
    if importance is None:
        return MagnitudeImportance(p=2)
    if isinstance(importance, str):
        return make_importance(importance)
    if isinstance(importance, type) and issubclass(importance, Importance):
        return importance()
    if isinstance(importance, type) or not callable(importance):
        raise TypeError(
            "importance must be a criterion such as tp.importance.MagnitudeImportance(p=2) or "
            f"a registered name ({', '.join(importance_names())}), got {importance!r}"
        )
    return importance


def _split_ignored(model: nn.Module, ignored: Iterable[Any]) -> tuple[list[nn.Module], set[int]]:
    """Ignored modules (types expand to every module of that type) and ignored parameters."""
    modules: list[nn.Module] = []
    params: set[int] = set()
    ignored = list(ignored)
    if not ignored:
        return modules, params
    known_modules = {id(m) for m in model.modules()}
    known_params = {id(p) for p in model.parameters()}
    for item in ignored:
        if isinstance(item, type):
            modules.extend(m for m in model.modules() if isinstance(m, item))
        elif isinstance(item, nn.Parameter):
            if id(item) not in known_params:
                raise ValueError("ignored_layers holds a parameter that is not in the model")
            params.add(id(item))
        elif isinstance(item, nn.Module):
            if id(item) not in known_modules:
                raise ValueError(f"ignored_layers holds a {type(item).__name__} not in the model")
            modules.extend(item.modules())
        elif isinstance(item, str):
            named = [m for name, m in model.named_modules() if name and fnmatchcase(name, item)]
            named_params = [p for name, p in model.named_parameters() if fnmatchcase(name, item)]
            if not named and not named_params:
                raise ValueError(
                    f"ignored_layers: {item!r} names no module or parameter of the model "
                    "(names as in model.named_modules(), globs like 'layer4.*' allowed)"
                )
            for module in named:
                modules.extend(module.modules())
            params.update(id(p) for p in named_params)
        else:
            raise TypeError(
                "ignored_layers takes modules, module types, parameters or names (globs "
                f"allowed), got {item!r}"
            )
    return modules, params


def _scopes(model: nn.Module, ratio_dict: dict[Any, float]) -> list[tuple[set[int], float]]:
    known = {id(m) for m in model.modules()}
    scopes = []
    for key, ratio in ratio_dict.items():
        members = key if isinstance(key, (tuple, list)) else (key,)
        ids: set[int] = set()
        for module in members:
            if not isinstance(module, nn.Module) or id(module) not in known:
                raise ValueError("pruning_ratio_dict keys must be modules of the model")
            ids.update(id(m) for m in module.modules())
        scopes.append((ids, _ratio("pruning_ratio_dict value", ratio)))
    return scopes
