"""What a pruner was asked for and what it did, per kind of channel (:data:`KINDS`): groups and
channels before and after, and why groups kept every channel (a ratio that rounds to nothing,
``round_to``, a refusal, ``exact_only``, a global ranking that took channels elsewhere), so a
request that did nothing is said, not silent."""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional

from torchslim.graph.dependency import Group
from torchslim.graph.kinds import KINDS

if TYPE_CHECKING:
    from torchslim.pruner.meta import MetaPruner


@dataclass
class KindSummary:
    """One kind of channel: the ratio asked (``None`` under a MACs or params target), its
    groups, how many lost channels, its channels before and after, and why the others kept
    all of theirs (reason -> number of groups)."""

    kind: str
    asked: Optional[float]
    groups: int = 0
    pruned: int = 0
    before: int = 0
    after: int = 0
    whole: Counter = field(default_factory=Counter)

    @property
    def why_not(self) -> str:
        return "; ".join(f"{n} {reason}" for reason, n in self.whole.most_common())


def summarise(pruner: MetaPruner) -> list[KindSummary]:
    """Per kind, what ``pruner`` has pruned so far against its groups' first sizes."""
    rows: dict[str, KindSummary] = {}
    candidates = pruner._candidates()
    seen = {group.coupling.id for group in candidates}
    left_out = {group.coupling.id: (group, why) for group, why in _left_out(pruner, seen)}
    for group in [*candidates, *(group for group, _ in left_out.values())]:
        kind = pruner.kind_of(group)
        initial = pruner.initial_sizes.get(group.coupling.id, group.size)
        asked = _asked(pruner, group)
        row = rows.setdefault(kind, KindSummary(kind, asked))
        row.asked = asked if row.asked is None else max(row.asked, asked or 0.0)
        row.groups += 1
        row.before += initial
        row.after += group.size
        if group.size < initial:
            row.pruned += 1
        elif group.coupling.id in left_out:
            row.whole[left_out[group.coupling.id][1]] += 1
        else:
            row.whole[_why_whole(pruner, group, initial, asked)] += 1
    return sorted(rows.values(), key=lambda row: KINDS.index(row.kind))


def unmet_requests(pruner: MetaPruner, summary: Optional[list[KindSummary]] = None) -> list[str]:
    """The requests that removed nothing (a kind's ratio, or the ratio of every group), and
    groups that lost fewer channels than asked because the graph refuses more. ``summary``
    (:func:`summarise`) is computed here if it is needed and not given."""
    wanted = {kind for kind, ratio in pruner.kind_ratios.items() if ratio > 0}
    unmet = bool(wanted) or pruner.pruning_ratio > 0
    if unmet and summary is None:
        shrunk = (
            group
            for group in pruner._candidates()
            if group.size < pruner.initial_sizes.get(group.coupling.id, group.size)
        )
        if wanted:
            pruned = {pruner.kind_of(group) for group in shrunk}
            unmet = not wanted <= pruned or (pruner.pruning_ratio > 0 and not pruned)
        else:  # only the plain ratio was asked for: unmet if no group shrank
            unmet = next(shrunk, None) is None
        if unmet:
            summary = summarise(pruner)
    rows = summary if unmet and summary is not None else []
    messages = [
        f"asked for {pruner.kind_ratios[row.kind]:.0%} of the {row.kind}, none were "
        f"removed ({row.groups} groups: {row.why_not})"
        for row in rows
        if pruner.kind_ratios.get(row.kind, 0) > 0 and row.pruned == 0
    ]
    messages += list(pruner.cut_short.values())
    if unmet and pruner.pruning_ratio > 0 and not any(row.pruned for row in rows):
        reasons = "; ".join(row.why_not for row in rows if row.whole)
        messages.append(
            f"pruning_ratio={pruner.pruning_ratio:g} removed no channel ({reasons or 'no groups'})"
        )
    return messages


def _left_out(pruner: MetaPruner, seen: set[int]) -> Iterator[tuple[Group, str]]:
    """The groups of more than one channel that the pruner never considers, and why: a layer
    ignored, or a refusal of the graph (a model input or output, a hard-coded size, ...)."""
    ignored = {id(m) for m in pruner.ignored_modules}
    for group in pruner.DG.all_groups():
        if group.coupling.id in seen or group.size <= 1:
            continue
        members = group.coupling.members
        if any(id(m.ref.module) in ignored for m in members) or pruner._touches_ignored_param(
            group
        ):
            yield group, "in ignored layers"
        else:
            yield group, f"refused ({group.refusal([0]) or 'not rooted at a prunable layer'})"


def _asked(pruner: MetaPruner, group: Group) -> Optional[float]:
    if pruner.target_macs is not None or pruner.target_params is not None:
        return None
    own = pruner._ratio_for(group)
    return pruner.pruning_ratio if own is None else own


def _why_whole(pruner: MetaPruner, group: Group, initial: int, asked: Optional[float]) -> str:
    if group.coupling.id in pruner.refused:
        return f"refused ({pruner.refused[group.coupling.id].split(':')[0]})"
    if not len(group.prunable_idxs):
        return f"refused ({group.refusal([0]) or 'no prunable channel'})"
    if pruner.exact_only and group.mixing:
        return "left alone by exact_only (channel-mixing ops)"
    if asked is None:
        return "not needed for the target"
    if asked == 0:
        return "not asked"
    if initial <= 1:
        return "with 1 channel"
    count = math.floor(initial * min(asked, pruner.max_pruning_ratio))
    if count == 0:
        return f"where {asked:.0%} of {initial} rounds to 0"
    if pruner.round_to and pruner._rounded(group, count) == 0:
        return f"where round_to={pruner.round_to} keeps all {initial}"
    if pruner.global_pruning:
        return "ranked above the channels taken elsewhere (global)"
    return "not scored by the importance"
