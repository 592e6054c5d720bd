"""torch-pruning's head and channel-group arguments, on top of what the graph infers.

torchslim finds heads, head sizes and channel groups from the trace; a script written for the
peer still passes them. ``num_heads`` and the channel groups are checked against the graph (an
error names the layer when they disagree); the head switches become ratios of the kinds
``heads`` / ``query_heads`` / ``head_dim`` (see :mod:`torchslim.graph.kinds`); ``isomorphic``
ranks structurally identical groups among themselves.
"""

from __future__ import annotations

from torch import nn

from torchslim.graph.dependency import DependencyGraph, Group
from torchslim.graph.kinds import group_kind
from torchslim.pruning.layers import layer_kind
from torchslim.pruning.roles import Role
from torchslim.spaces.integers import distinct

HEAD_KINDS = ("heads", "query_heads")


def head_ratios(
    given: bool, prune_num_heads: bool, head_pruning_ratio: float, prune_head_dims: bool
) -> dict[str, float]:
    """Kind ratios the peer's head switches mean. ``given``: the script declared heads
    (``num_heads`` or a head ratio), so heads go only with ``prune_num_heads``."""
    ratios = {}
    if given:
        # whole heads go with their keys and values: under grouped-query attention a KV head
        # and its query heads (the ``heads`` kind); the queries within a group stay
        ratios["heads"] = head_pruning_ratio if prune_num_heads else 0.0
        ratios["query_heads"] = 0.0
    if not prune_head_dims:
        ratios["head_dim"] = 0.0
    return ratios


def inferred_heads(graph: DependencyGraph) -> dict[int, int]:
    """How many heads the graph finds in each layer's outputs (by module ``id``): the product
    of the head groups (``heads`` x ``query_heads`` under grouped-query attention) over its
    output rows. One pass over the groups serves every layer."""
    found: dict[int, int] = {}
    for group in graph.get_all_groups():
        if group_kind(group) not in HEAD_KINDS:
            continue
        counted: set[int] = set()  # a layer's weight and bias rows are the same heads
        for member, index in group.index_maps():
            module = member.ref.module
            outputs = layer_kind(module).dims(module, Role.OUT)
            if id(module) in counted or (member.ref.name, member.dim) not in outputs:
                continue
            counted.add(id(module))
            found[id(module)] = found.get(id(module), 1) * int(distinct(index[index >= 0]).size)
    return found


def check_num_heads(graph: DependencyGraph, num_heads: dict[nn.Module, int]) -> None:
    names = {id(m): n for n, m in graph.model.named_modules()}
    if any(id(module) not in names for module in num_heads):
        raise ValueError("num_heads keys must be modules of the model")
    found = inferred_heads(graph)
    for module, heads in num_heads.items():
        if found.get(id(module)) != heads:
            seen = (
                f"finds {found[id(module)]}"
                if id(module) in found
                else "finds no heads in its outputs"
            )
            raise ValueError(f"num_heads[{names[id(module)]}] = {heads}, but the graph {seen}")


def check_channel_groups(model: nn.Module, groups: dict[nn.Module, int], argument: str) -> None:
    """The peer's declared channel groups must divide the layer's channels (torchslim infers
    which channels go together; a declaration that cannot hold is a mistake worth naming)."""
    if not groups:
        return
    names = {id(m): n for n, m in model.named_modules()}
    for module, count in groups.items():
        name = names.get(id(module))
        if name is None:
            raise ValueError(f"{argument} keys must be modules of the model")
        pruner = layer_kind(module).pruner
        width = None if pruner is None else pruner.get_out_channels(module)
        if not isinstance(count, int) or count < 1 or (width and width % count):
            raise ValueError(f"{argument}[{name}] = {count!r} does not divide its {width} channels")


def isomorphic_pools(groups: list[Group]) -> list[list[Group]]:
    """Groups split by structure (the layer types and tensor shapes they couple): isomorphic
    pruning ranks each pool on its own."""
    pools: dict[tuple, list[Group]] = {}
    for group in groups:
        signature = tuple(
            sorted(
                (type(m.ref.module).__name__, m.ref.name, m.dim, tuple(m.ref.tensor.shape))
                for m in group.coupling.members
            )
        )
        pools.setdefault(signature, []).append(group)
    return list(pools.values())
