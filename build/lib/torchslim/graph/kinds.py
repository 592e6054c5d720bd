"""What a group's channels are, read from how they sit in the layers.

Pruning recipes for transformers are stated by kind ("25% of the heads, half of the MLP
neurons, a quarter of the hidden size"), so groups are labelled from their structure, without
per-model names:

- ``"heads"``: each channel is a block of consecutive rows of a projection (a head; with
  grouped-query attention, a KV head with its query heads);
- ``"query_heads"``: with grouped-query attention, the same query head in every KV group
  (pruning it changes how many query heads share a KV head);
- ``"head_dim"``: each channel is single rows spaced apart (the same offset in every head);
- ``"width"``: channels of one row that pass through a normalisation layer or an embedding
  (the residual stream: hidden size, or a CNN stage's channels behind BatchNorm);
- ``"experts"``: each channel is one expert of a routed-experts layer (its slice of the
  fused expert weights and the router row that selects it);
- ``"neurons"``: any other channel of one row (MLP neurons, plain conv filters, the neurons
  inside experts).
"""

from __future__ import annotations

import numpy as np
from torch import nn

from torchslim.graph.dependency import Group
from torchslim.pruning.layers import layer_kind
from torchslim.pruning.roles import Role
from torchslim.spaces.integers import distinct

KINDS = ("width", "heads", "query_heads", "head_dim", "neurons", "experts")


def _is_norm_or_embedding(module: nn.Module) -> bool:
    kind = layer_kind(module)
    return kind.norm is not None or kind.embedding


def _common(terms: np.ndarray) -> set[int]:
    """Classes present in every row."""
    rows = [set(row[row >= 0].tolist()) for row in terms]
    return set.intersection(*rows) if rows else set()


def _fixed(group: Group, terms: np.ndarray) -> bool:
    """Whether the other factors of these positions cannot change: one channel spanning the two
    halves of a fused gate/up projection is one neuron, not a head offset; blocks told apart
    only by the q/k/v part of a fused projection are one head."""
    own = set(group.coupling.classes)
    analysis = group.graph.analysis
    for cls in distinct(terms[terms >= 0]).tolist():
        if cls in own:
            continue
        coupling = analysis.couplings.get(analysis.coupling_of(cls))
        if coupling is None or cls not in coupling.frozen:
            return False
    return True


def group_kind(group: Group) -> str:
    """One of :data:`KINDS` for ``group``: the leading dim of routed experts' weights is the
    experts; a channel spanning several rows of a projection is a head (consecutive rows) or a
    head offset (rows spaced apart); otherwise channels that reach a normalisation or an
    embedding are the width, the rest are neurons."""
    if group.routes_experts:
        return "experts"
    for member, index in group.index_maps():
        if group.handler_role(member) != Role.OUT or member.ref.tensor.dim() < 2:
            continue
        first = index[index >= 0][0]
        rows = np.nonzero(index == first)[0]
        if rows.size > 1 and not _fixed(group, member.terms[rows]):
            runs = np.split(rows, np.nonzero(np.diff(rows) != 1)[0] + 1)
            if any(run.size == 1 for run in runs):
                return "head_dim"
            shared = [_common(member.terms[run]) for run in runs]
            apart = set().union(*shared) - set.intersection(*shared)
            return "heads" if _fixed(group, np.array(sorted(apart), np.int64)) else "query_heads"
        break
    members = group.coupling.members
    if any(_is_norm_or_embedding(m.ref.module) for m in members if m.ref.name == "weight"):
        return "width"
    return "neurons"
