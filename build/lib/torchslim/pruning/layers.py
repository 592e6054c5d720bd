"""The layer registry: the one answer to "what is this layer".

For each layer type, a :class:`LayerKind` says how it is pruned (its :class:`BasePruningFunc`,
which knows its output and input channel dims), whether it normalises (per channel like
BatchNorm, or over the channels like LayerNorm), whether it is an embedding, and whether its
weight contracts input channels into outputs (a linear or convolution layer). The graph, the
group kinds, the importance criteria, reconstruction and persistence all ask here.

A new layer type takes one :func:`register_layer` call (``register_pruner``, the peer's name,
registers a pruning function alone).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Union

from torch import nn

from torchslim.pruning.functions import (
    BATCHNORM_PRUNER,
    CONV_PRUNER,
    EMBEDDING_PRUNER,
    GROUPNORM_PRUNER,
    LAYERNORM_PRUNER,
    LINEAR_PRUNER,
    PRELU_PRUNER,
    TRANSPOSED_LINEAR_PRUNER,
    BasePruningFunc,
    ParameterHandler,
    TransposedLinearPruner,
)
from torchslim.pruning.roles import Role

#: ``LayerKind.norm``: statistics per channel (pruning is exact) ...
PER_CHANNEL = "per_channel"
#: ... or over the channels (LayerNorm, RMSNorm, GroupNorm: pruning changes the others).
OVER_CHANNELS = "over_channels"


@dataclass(frozen=True)
class LayerKind:
    """What torchslim knows about one layer type."""

    pruner: Optional[BasePruningFunc] = None
    norm: Optional[str] = None
    embedding: bool = False
    contracts: bool = False

    def dims(self, layer: nn.Module, role: Role) -> list[tuple[str, int]]:
        """``(tensor name, dim)`` of this layer's tensors holding ``role`` channels."""
        if self.pruner is None:
            return []
        return [key for key, r in self.pruner.param_roles(layer).items() if r == role]

    def input_dim(self, layer: nn.Module) -> Optional[int]:
        """The weight dim that meets every input channel of a linear or ungrouped, not
        transposed convolution layer (what input-activation criteria scale); else ``None``."""
        if not self.contracts or getattr(layer, "groups", 1) != 1:
            return None
        if getattr(layer, "transposed", False):
            return None
        return next((dim for name, dim in self.dims(layer, Role.IN) if name == "weight"), None)


UNKNOWN = LayerKind()
_BY_TYPE: dict[type, LayerKind] = {}
#: Layer classes of optional packages, by ``module.qualname`` (matched without importing them).
_BY_NAME: dict[str, LayerKind] = {}
#: Layers recognised by their structure when no class matches.
_BY_SHAPE: list[tuple[Callable[[nn.Module], bool], LayerKind]] = []


def register_layer(
    module_type: Union[type, str],
    pruner: Optional[BasePruningFunc],
    *,
    norm: Optional[str] = None,
    embedding: bool = False,
    contracts: bool = False,
) -> None:
    """Describe layers of ``module_type`` (a class, or ``"package.module.Class"`` for a class
    of an optional package); subclasses without their own entry share it."""
    if norm not in (None, PER_CHANNEL, OVER_CHANNELS):
        raise ValueError(f"norm must be None, {PER_CHANNEL!r} or {OVER_CHANNELS!r}, not {norm!r}")
    kind = LayerKind(pruner, norm, embedding, contracts)
    if isinstance(module_type, str):
        _BY_NAME[module_type] = kind
    else:
        _BY_TYPE[module_type] = kind


def register_pruner(module_type: type, pruner: BasePruningFunc) -> None:
    """Use ``pruner`` for layers of ``module_type`` (and subclasses without their own),
    keeping what else is registered about that type."""
    known = _BY_TYPE.get(module_type)
    _BY_TYPE[module_type] = replace(known or UNKNOWN, pruner=pruner)


def layer_kind(
    module: nn.Module, customized: Optional[dict[Any, BasePruningFunc]] = None
) -> LayerKind:
    """The registered kind of ``module``: by class, then base classes (by class object or
    qualified name), then by structure; :data:`UNKNOWN` if none. ``customized`` pruning
    functions (keyed by instance, then type) replace the registered one."""
    kind = UNKNOWN
    for cls in type(module).__mro__:
        found = _BY_TYPE.get(cls) or _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if found is not None:
            kind = found
            break
    else:
        kind = next((k for matches, k in _BY_SHAPE if matches(module)), UNKNOWN)
    custom = customized and (customized.get(module) or customized.get(type(module)))
    return replace(kind, pruner=custom) if custom else kind


def get_pruner(
    module: nn.Module, customized: Optional[dict[Any, BasePruningFunc]] = None
) -> Optional[BasePruningFunc]:
    """The pruning function for a layer (see :func:`layer_kind`)."""
    return layer_kind(module, customized).pruner


def is_linear_like(module: nn.Module) -> bool:
    """A layer pruned like ``nn.Linear`` although it is not one (``Conv1D``)."""
    return isinstance(get_pruner(module), TransposedLinearPruner)


def role_of(fn: Callable) -> Role:
    """The role of a pruning function: a :class:`ParameterHandler` prunes a parameter dim; a
    pruning function object or its ``prune_out_channels`` prunes outputs, its
    ``prune_in_channels`` inputs."""
    if isinstance(fn, ParameterHandler):
        return Role.PARAM
    if isinstance(fn, BasePruningFunc):
        return Role.OUT
    owner = getattr(fn, "__self__", None)
    if isinstance(owner, BasePruningFunc):
        if getattr(fn, "__name__", None) == "prune_out_channels":
            return Role.OUT
        if getattr(fn, "__name__", None) == "prune_in_channels":
            return Role.IN
    raise ValueError(
        f"{fn!r} is not a layer pruning function: pass a pruner's prune_out_channels or "
        "prune_in_channels (tp.prune_conv_out_channels, ...)"
    )


def _is_rmsnorm_like(module: nn.Module) -> bool:
    """A leaf layer whose only parameter is a 1-D ``weight`` (HF LlamaRMSNorm and friends)."""
    params = dict(module.named_parameters(recurse=False))
    return (
        not list(module.children())
        and list(params) == ["weight"]
        and params["weight"].dim() == 1
        and "norm" in type(module).__name__.lower()
    )


register_layer(nn.modules.conv._ConvNd, CONV_PRUNER, contracts=True)
register_layer(nn.Linear, LINEAR_PRUNER, contracts=True)
register_layer("transformers.pytorch_utils.Conv1D", TRANSPOSED_LINEAR_PRUNER, contracts=True)
register_layer(nn.modules.batchnorm._NormBase, BATCHNORM_PRUNER, norm=PER_CHANNEL)
register_layer("torchvision.ops.misc.FrozenBatchNorm2d", BATCHNORM_PRUNER, norm=PER_CHANNEL)
register_layer(nn.LayerNorm, LAYERNORM_PRUNER, norm=OVER_CHANNELS)
register_layer(nn.RMSNorm, LAYERNORM_PRUNER, norm=OVER_CHANNELS)
register_layer(nn.GroupNorm, GROUPNORM_PRUNER, norm=OVER_CHANNELS)
register_layer(nn.PReLU, PRELU_PRUNER)
register_layer(nn.Embedding, EMBEDDING_PRUNER, embedding=True)
_BY_SHAPE.append((_is_rmsnorm_like, LayerKind(LAYERNORM_PRUNER, OVER_CHANNELS)))
# nn.MultiheadAttention has no entry: the graph traces its heads (see ops.decompositions) and
# slices each of its parameters, and its size attributes follow; tp.prune_multihead_attention_*
# serve direct calls.
