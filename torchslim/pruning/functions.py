"""Layer pruning functions: physically remove channels and keep every attribute consistent.

Each supported layer type has one :class:`BasePruningFunc` that says which tensor dims are its
output and input channels (:meth:`~BasePruningFunc.param_roles`) and how to fix its attributes
after slicing (``out_channels``, ``num_features``, ``normalized_shape``, ``groups`` ...). All
slicing goes through :func:`slice_parameter`. The module-level ``prune_*`` names are the API
users know (``tp.prune_conv_out_channels(model.conv1, idxs=[2, 6, 9])``).
"""

from __future__ import annotations

import weakref
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from torchslim.pruning.reparametrised import find as find_reparametrised
from torchslim.pruning.reparametrised import replace_tensor, slice_weight
from torchslim.pruning.roles import Role
from torchslim.pruning.take import take

Indices = Union[Sequence[int], np.ndarray, torch.Tensor, range]

#: what else follows a parameter when it is sliced, as its ``.grad`` does: objects with a
#: ``sliced(old, new, dim, index)`` method (statistics kept per parameter), held weakly
SLICE_FOLLOWERS: weakref.WeakSet[Any] = weakref.WeakSet()


def slice_parameter(module: nn.Module, name: str, dim: int, keep: Indices) -> None:
    """Replace parameter or buffer ``name`` of ``module`` by its slice along ``dim``.

    Parameters become new ``nn.Parameter`` objects with the same ``requires_grad`` and their
    gradient sliced alike (gradient-based importance keeps working between groups), and so
    is what :data:`SLICE_FOLLOWERS` keep for them; buffers stay
    buffers with the same persistence. A weight computed by weight norm or spectral norm is
    sliced through the tensors it is computed from.
    """
    reparametrised = find_reparametrised(module, name)
    if reparametrised is not None:
        slice_weight(reparametrised, dim, keep.tolist() if torch.is_tensor(keep) else list(keep))
        return
    tensor = getattr(module, name)
    if torch.is_tensor(keep):
        index = keep.to(device=tensor.device, dtype=torch.long)
    else:
        index = torch.as_tensor(list(keep), dtype=torch.long, device=tensor.device)
    replace_tensor(module, name, take(tensor, dim, index), dim, index)
    sliced = getattr(module, name)
    if isinstance(tensor, nn.Parameter) and tensor.grad is not None:
        sliced.grad = take(tensor.grad, dim, index)
    for follower in list(SLICE_FOLLOWERS):
        follower.sliced(tensor, sliced, dim, index)


def add_bias(layer: nn.Module) -> None:
    """Give a linear or convolution layer without a bias a zero one, in its weight's dtype and
    on its device (bias compensation moves removed channels' mean contribution into it)."""
    if not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)):
        raise ValueError(f"cannot add a bias to a {type(layer).__name__}")
    if layer.bias is not None:
        raise ValueError(f"the {type(layer).__name__} already has a bias")
    weight = layer.weight
    out = weight.shape[1] * layer.groups if getattr(layer, "transposed", False) else weight.shape[0]
    layer.bias = nn.Parameter(
        torch.zeros(out, dtype=weight.dtype, device=weight.device),
        requires_grad=weight.requires_grad,
    )


def normalise_indices(layer: nn.Module, idxs: Indices, total: int) -> list[int]:
    """Sorted unique ints, range-checked; refuses to remove every channel."""
    if isinstance(idxs, torch.Tensor):
        idxs = idxs.flatten().tolist()
    unique = sorted({int(i) for i in idxs})
    kind = type(layer).__name__
    for i in unique:
        if not 0 <= i < total:
            raise ValueError(f"{kind}: channel index {i} out of range [0, {total})")
    if total and len(unique) >= total:
        raise ValueError(f"{kind}: pruning would remove all {total} channels")
    return unique


def keep_indices(total: int, removed: Sequence[int]) -> list[int]:
    gone = set(removed)
    return [i for i in range(total) if i not in gone]


class BasePruningFunc:
    """Prunes one layer type along its output or input channels.

    Subclasses list their tensors' channel dims in :meth:`param_roles` and fix attributes in
    :meth:`sync`; custom layers can subclass this and be registered with :func:`torchslim.pruning.layers.register_layer`.
    """

    TARGET_MODULES: tuple[type, ...] = ()

    def __init__(self, pruning_dim: int = 1) -> None:
        #: torch-pruning's argument: the dim a bare-parameter pruner slices (layer pruners know
        #: their dims from :meth:`param_roles`).
        self.pruning_dim = pruning_dim

    def param_roles(self, layer: nn.Module) -> dict[tuple[str, int], Role]:
        """``(tensor_name, dim) -> Role.OUT | Role.IN`` for the tensors this layer has."""
        return {}

    def get_out_channels(self, layer: nn.Module) -> Optional[int]:
        return self._size(layer, Role.OUT)

    def get_in_channels(self, layer: nn.Module) -> Optional[int]:
        return self._size(layer, Role.IN)

    def _size(self, layer: nn.Module, role: Role) -> Optional[int]:
        for (name, dim), r in self.param_roles(layer).items():
            if r == role:
                return getattr(layer, name).shape[dim]
        return None

    def _prune_role(self, layer: nn.Module, role: Role, idxs: Indices) -> nn.Module:
        total = self._size(layer, role)
        if total is None:
            return layer
        keep = keep_indices(total, normalise_indices(layer, idxs, total))
        index = torch.tensor(keep, dtype=torch.long)  # one conversion for all the layer's tensors
        for (name, dim), r in self.param_roles(layer).items():
            if r == role:
                slice_parameter(layer, name, dim, index)
        self.sync(layer)
        return layer

    def prune_out_channels(self, layer: nn.Module, idxs: Indices) -> nn.Module:
        return self._prune_role(layer, Role.OUT, idxs)

    def prune_in_channels(self, layer: nn.Module, idxs: Indices) -> nn.Module:
        return self._prune_role(layer, Role.IN, idxs)

    def sync(self, layer: nn.Module) -> None:
        """Update the layer's attributes from its sliced tensors."""

    def __call__(self, layer: nn.Module, idxs: Indices) -> nn.Module:
        return self.prune_out_channels(layer, idxs)


def _present(layer: nn.Module, roles: dict[tuple[str, int], Role]) -> dict[tuple[str, int], Role]:
    return {key: role for key, role in roles.items() if getattr(layer, key[0], None) is not None}


class ConvPruner(BasePruningFunc):
    """Conv1/2/3d and ConvTranspose1/2/3d, grouped and depthwise included.

    A grouped convolution's weight holds one group's worth of input channels (transposed: of
    output channels). Channels are removed either as the same offsets in every group (``groups``
    stays) or as whole groups (``groups`` shrinks, the group's inputs and outputs go together);
    anything else would change which inputs a group sees and is refused.
    """

    TARGET_MODULES = (nn.modules.conv._ConvNd,)

    def param_roles(self, layer: nn.Module) -> dict[tuple[str, int], Role]:
        out_dim, in_dim = (1, 0) if layer.transposed else (0, 1)
        roles = {("weight", out_dim): Role.OUT, ("bias", 0): Role.OUT, ("weight", in_dim): Role.IN}
        return _present(layer, roles)

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.in_channels

    def prune_out_channels(self, layer: nn.Module, idxs: Indices) -> nn.Module:
        return self._prune(layer, normalise_indices(layer, idxs, layer.out_channels), Role.OUT)

    def prune_in_channels(self, layer: nn.Module, idxs: Indices) -> nn.Module:
        return self._prune(layer, normalise_indices(layer, idxs, layer.in_channels), Role.IN)

    def _prune(self, layer: nn.Module, removed: list[int], role: Role) -> nn.Module:
        if not removed:
            return layer
        total = layer.out_channels if role == Role.OUT else layer.in_channels
        groups = layer.groups
        per_group = total // groups
        # weight dim holding this role, and whether it stores one group's worth (per group)
        dim = {(Role.OUT, False): 0, (Role.IN, False): 1, (Role.OUT, True): 1, (Role.IN, True): 0}[
            (role, layer.transposed)
        ]
        per_group_dim = (role == Role.IN) != layer.transposed
        if groups > 1:
            whole, offsets = _classify_group_removal(layer, removed, per_group, groups)
            if whole:
                return self._remove_groups(layer, whole)
            removed_in_dim = offsets if per_group_dim else removed
            width = per_group if per_group_dim else total
        else:
            removed_in_dim, width = removed, total
        slice_parameter(layer, "weight", dim, keep_indices(width, removed_in_dim))
        if role == Role.OUT and layer.bias is not None:
            slice_parameter(layer, "bias", 0, keep_indices(total, removed))
        if role == Role.OUT:
            layer.out_channels -= len(removed)
        else:
            layer.in_channels -= len(removed)
        return layer

    @staticmethod
    def _remove_groups(layer: nn.Module, blocks: list[int]) -> nn.Module:
        """Remove whole groups, their input and output channels at once.

        The graph calls this from both the output and the input side of a group; the second
        call finds the group already gone, which :func:`_classify_group_removal` cannot see, so
        whole-group removal is keyed on the weight's dim 0 and applied once per call.
        """
        groups = layer.groups
        rows_per_group = layer.weight.shape[0] // groups
        gone = set(blocks)
        kept = [b for b in range(groups) if b not in gone]
        rows = [b * rows_per_group + i for b in kept for i in range(rows_per_group)]
        slice_parameter(layer, "weight", 0, rows)
        if layer.bias is not None:
            out_per = layer.out_channels // groups
            slice_parameter(
                layer, "bias", 0, [b * out_per + i for b in kept for i in range(out_per)]
            )
        layer.out_channels = layer.out_channels // groups * len(kept)
        layer.in_channels = layer.in_channels // groups * len(kept)
        layer.groups = len(kept)
        return layer


def _classify_group_removal(
    layer: nn.Module, removed: list[int], per_group: int, groups: int
) -> tuple[list[int], list[int]]:
    """Whole groups ``(blocks, [])`` or the same offsets in every group ``([], offsets)``."""
    by_block: dict[int, set[int]] = {}
    for i in removed:
        by_block.setdefault(i // per_group, set()).add(i % per_group)
    if all(len(offsets) == per_group for offsets in by_block.values()):
        return sorted(by_block), []
    if len(by_block) == groups and len({frozenset(v) for v in by_block.values()}) == 1:
        return [], sorted(next(iter(by_block.values())))
    raise ValueError(
        f"{type(layer).__name__} with groups={groups}: remove whole groups of {per_group} "
        "channels, or the same offsets in every group"
    )


class LinearPruner(BasePruningFunc):
    TARGET_MODULES = (nn.Linear,)

    def param_roles(self, layer: nn.Module) -> dict[tuple[str, int], Role]:
        return _present(
            layer, {("weight", 0): Role.OUT, ("bias", 0): Role.OUT, ("weight", 1): Role.IN}
        )

    def sync(self, layer: nn.Module) -> None:
        layer.out_features, layer.in_features = layer.weight.shape


class TransposedLinearPruner(BasePruningFunc):
    """Linear layers that store their weight as ``[in, out]`` (transformers' GPT-2 ``Conv1D``)."""

    def param_roles(self, layer: nn.Module) -> dict[tuple[str, int], Role]:
        return _present(
            layer, {("weight", 1): Role.OUT, ("bias", 0): Role.OUT, ("weight", 0): Role.IN}
        )

    def sync(self, layer: nn.Module) -> None:
        if hasattr(layer, "nf"):
            layer.nf = layer.weight.shape[1]
        if hasattr(layer, "nx"):
            layer.nx = layer.weight.shape[0]


class _SameWidthPruner(BasePruningFunc):
    """Layers whose input and output widths are the same channels (norms, PReLU)."""

    NAMES: tuple[str, ...] = ("weight", "bias", "running_mean", "running_var")

    def param_roles(self, layer: nn.Module) -> dict[tuple[str, int], Role]:
        roles = {}
        for name in self.NAMES:
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1:
                roles[(name, tensor.dim() - 1)] = Role.OUT
        return roles

    def prune_in_channels(self, layer: nn.Module, idxs: Indices) -> nn.Module:
        return self.prune_out_channels(layer, idxs)

    def get_in_channels(self, layer: nn.Module) -> Optional[int]:
        return self.get_out_channels(layer)


class BatchNormPruner(_SameWidthPruner):
    """BatchNorm, InstanceNorm (also without affine parameters or statistics), FrozenBatchNorm."""

    TARGET_MODULES = (nn.modules.batchnorm._NormBase,)

    def get_out_channels(self, layer: nn.Module) -> Optional[int]:
        return getattr(layer, "num_features", None) or super().get_out_channels(layer)

    def prune_out_channels(self, layer: nn.Module, idxs: Indices) -> nn.Module:
        width = self.get_out_channels(layer)
        removed = normalise_indices(layer, idxs, width) if width else []
        super().prune_out_channels(layer, removed)
        if hasattr(layer, "num_features"):
            layer.num_features = width - len(removed)
        return layer


class LayerNormPruner(_SameWidthPruner):
    """LayerNorm, RMSNorm and RMSNorm-like layers: only the last normalised dim is pruned."""

    TARGET_MODULES = (nn.LayerNorm, nn.RMSNorm)

    def __init__(self, metrcis: Any = None, pruning_dim: int = -1) -> None:
        """``metrcis`` (sic) and ``pruning_dim`` as torch-pruning spells them; only the last
        normalised dim is prunable here."""
        if pruning_dim != -1:
            raise ValueError(
                f"LayerNormPruner prunes the last normalised dim only, not {pruning_dim}"
            )
        super().__init__(pruning_dim)

    def sync(self, layer: nn.Module) -> None:
        width = self.get_out_channels(layer)
        if width is None:
            return
        shape = getattr(layer, "normalized_shape", None)
        if isinstance(shape, (tuple, list)) and shape:
            layer.normalized_shape = (*tuple(shape)[:-1], width)
        if isinstance(getattr(layer, "hidden_size", None), int):
            layer.hidden_size = width


class GroupNormPruner(_SameWidthPruner):
    TARGET_MODULES = (nn.GroupNorm,)

    def prune_out_channels(self, layer: nn.Module, idxs: Indices) -> nn.Module:
        remaining = layer.num_channels - len(normalise_indices(layer, idxs, layer.num_channels))
        if remaining % layer.num_groups:
            raise ValueError(
                f"GroupNorm: {remaining} channels are not divisible by num_groups={layer.num_groups}"
            )
        return super().prune_out_channels(layer, idxs)

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.num_channels

    def sync(self, layer: nn.Module) -> None:
        if layer.weight is not None:
            layer.num_channels = layer.weight.shape[0]


class PReLUPruner(_SameWidthPruner):
    """Per-channel PReLU; a PReLU with one shared slope has nothing to prune."""

    TARGET_MODULES = (nn.PReLU,)
    NAMES = ("weight",)

    def param_roles(self, layer: nn.Module) -> dict[tuple[str, int], Role]:
        return super().param_roles(layer) if layer.num_parameters > 1 else {}

    def sync(self, layer: nn.Module) -> None:
        layer.num_parameters = layer.weight.numel()


class EmbeddingPruner(BasePruningFunc):
    """The embedding dim is the output; token rows are looked up by id and never pruned."""

    TARGET_MODULES = (nn.Embedding,)

    def param_roles(self, layer: nn.Module) -> dict[tuple[str, int], Role]:
        return {("weight", 1): Role.OUT}

    def prune_in_channels(self, layer: nn.Module, idxs: Indices) -> nn.Module:
        return self.prune_out_channels(layer, idxs)

    def sync(self, layer: nn.Module) -> None:
        layer.embedding_dim = layer.weight.shape[1]


class MultiheadAttentionPruner(BasePruningFunc):
    """``nn.MultiheadAttention``: its embedding dim is both the input width and, because its
    forward derives ``head_dim = embed_dim // num_heads``, the projections' inner width.

    Removing embedding channels ``idxs`` therefore removes the same positions from the inputs,
    from q, k and v and from the output projection; ``idxs`` must be whole heads (``num_heads``
    shrinks) or the same offsets in every head (``head_dim`` shrinks, with the query rescaled so
    attention scores do not change).
    """

    TARGET_MODULES = (nn.MultiheadAttention,)

    def param_roles(self, layer: nn.Module) -> dict[tuple[str, int], Role]:
        name = "in_proj_weight" if layer._qkv_same_embed_dim else "q_proj_weight"
        return {(name, 1): Role.IN}

    def get_out_channels(self, layer: nn.Module) -> int:
        return layer.embed_dim

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.embed_dim

    def prune_in_channels(self, layer: nn.Module, idxs: Indices) -> nn.Module:
        return self.prune_out_channels(layer, idxs)

    def prune_out_channels(self, layer: nn.Module, idxs: Indices) -> nn.Module:
        removed = normalise_indices(layer, idxs, layer.embed_dim)
        if not removed:
            return layer
        heads, width = layer.num_heads, layer.embed_dim
        whole, _ = _classify_group_removal(layer, removed, width // heads, heads)
        keep = keep_indices(width, removed)
        rows = keep + [width + i for i in keep] + [2 * width + i for i in keep]
        if layer._qkv_same_embed_dim:
            slice_parameter(layer, "in_proj_weight", 0, rows)
            slice_parameter(layer, "in_proj_weight", 1, keep)
        else:
            for name in ("q_proj_weight", "k_proj_weight", "v_proj_weight"):
                slice_parameter(layer, name, 0, keep)
            slice_parameter(layer, "q_proj_weight", 1, keep)
        if layer.in_proj_bias is not None:
            slice_parameter(layer, "in_proj_bias", 0, rows)
        for name in ("bias_k", "bias_v"):
            if getattr(layer, name) is not None:
                slice_parameter(layer, name, 2, keep)
        LINEAR_PRUNER.prune_out_channels(layer.out_proj, removed)
        LINEAR_PRUNER.prune_in_channels(layer.out_proj, removed)
        layer.num_heads = heads - len(whole)
        layer.embed_dim = len(keep)
        if layer._qkv_same_embed_dim:
            layer.kdim = layer.vdim = len(keep)
        layer.head_dim = layer.embed_dim // layer.num_heads
        if layer.head_dim != width // heads:
            _keep_attention_scale(layer, layer.head_dim / (width // heads))
        return layer


def _keep_attention_scale(layer: nn.MultiheadAttention, ratio: float) -> None:
    """The forward scales scores by ``head_dim ** -0.5``; a smaller ``head_dim`` would change
    every score, so the query projection absorbs the difference and scores stay the same."""
    factor = ratio**0.5
    width = layer.embed_dim
    name = "in_proj_weight" if layer._qkv_same_embed_dim else "q_proj_weight"
    names = [name] + (["in_proj_bias"] if layer.in_proj_bias is not None else [])
    with torch.no_grad():
        for name in names:  # new tensors, not in place: a journal can undo the step
            scaled = getattr(layer, name).detach().clone()
            scaled[:width].mul_(factor)
            replace_tensor(layer, name, scaled)


class RNNPruner(BasePruningFunc):
    """``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` and their cells. Outputs are the units the layer
    emits (the projection's with ``proj_size``, else the hidden units), removed from every layer
    and direction at once since they share ``hidden_size``: row ``j`` of each gate block, column
    ``j`` of the recurrent weights, and in a deeper layer the input columns reading unit ``j`` of
    each direction. Inputs are the first layer's input features. (The dependency graph slices
    each tensor through its own positions; these serve direct calls.)"""

    TARGET_MODULES = (nn.RNNBase, nn.RNNCellBase)

    def param_roles(self, layer: nn.Module) -> dict[tuple[str, int], Role]:
        suffix = "" if isinstance(layer, nn.RNNCellBase) else "_l0"
        return {(f"weight_hh{suffix}", 1): Role.OUT, (f"weight_ih{suffix}", 1): Role.IN}

    def get_out_channels(self, layer: nn.Module) -> int:
        return getattr(layer, "proj_size", 0) or layer.hidden_size

    def get_in_channels(self, layer: nn.Module) -> int:
        return layer.input_size

    def _gates(self, layer: nn.Module) -> int:
        if isinstance(layer, (nn.LSTM, nn.LSTMCell)):
            return 4
        return 3 if isinstance(layer, (nn.GRU, nn.GRUCell)) else 1

    def _directions(self, layer: nn.Module) -> int:
        return 2 if getattr(layer, "bidirectional", False) else 1

    def _cells(self, layer: nn.Module) -> list[str]:
        """Name suffixes of each layer-direction's tensors, layer by layer."""
        if isinstance(layer, nn.RNNCellBase):
            return [""]
        directions = ["", "_reverse"][: self._directions(layer)]
        return [f"_l{k}{d}" for k in range(layer.num_layers) for d in directions]

    def prune_out_channels(self, layer: nn.Module, idxs: Indices) -> nn.Module:
        units = self.get_out_channels(layer)
        keep = keep_indices(units, normalise_indices(layer, idxs, units))
        projected = bool(getattr(layer, "proj_size", 0))
        size, gates = layer.hidden_size, self._gates(layer)
        rows = [g * size + k for g in range(gates) for k in keep]
        directions = self._directions(layer)
        columns = [d * units + k for d in range(directions) for k in keep]
        for n, suffix in enumerate(self._cells(layer)):
            slice_parameter(layer, f"weight_hh{suffix}", 1, keep)
            if projected:
                slice_parameter(layer, f"weight_hr{suffix}", 0, keep)
            else:
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                    if getattr(layer, f"{name}{suffix}", None) is not None:
                        slice_parameter(layer, f"{name}{suffix}", 0, rows)
            if n >= directions:
                slice_parameter(layer, f"weight_ih{suffix}", 1, columns)
        setattr(layer, "proj_size" if projected else "hidden_size", len(keep))
        return layer

    def prune_in_channels(self, layer: nn.Module, idxs: Indices) -> nn.Module:
        keep = keep_indices(layer.input_size, normalise_indices(layer, idxs, layer.input_size))
        for suffix in self._cells(layer)[: self._directions(layer)]:
            slice_parameter(layer, f"weight_ih{suffix}", 1, keep)
        layer.input_size = len(keep)
        return layer


class ParameterPruner(BasePruningFunc):
    """A bare ``nn.Parameter``: ``prune_parameter_out_channels(param, idxs)`` returns a new one."""

    def __init__(self, pruning_dim: int = 0) -> None:
        super().__init__(pruning_dim)

    def prune_out_channels(
        self, tensor: nn.Parameter, idxs: Indices, dim: Optional[int] = None
    ) -> nn.Parameter:
        dim = self.pruning_dim if dim is None else dim
        keep = keep_indices(tensor.shape[dim], normalise_indices(tensor, idxs, tensor.shape[dim]))
        data = take(tensor, dim, torch.as_tensor(keep, dtype=torch.long, device=tensor.device))
        return nn.Parameter(data, requires_grad=tensor.requires_grad)

    def prune_in_channels(self, tensor: nn.Parameter, idxs: Indices) -> nn.Parameter:
        return self.prune_out_channels(tensor, idxs, dim=1)


class ParameterHandler:
    """Prunes one dim of a module's parameter that no layer-specific function knows about
    (a layer scale, a positional embedding): ``handler(module, idxs)``."""

    def __init__(self, name: str, dim: int) -> None:
        self.name = name
        self.dim = dim
        self.__name__ = "prune_parameter_out_channels"

    def __call__(self, module: nn.Module, idxs: Indices) -> nn.Module:
        tensor = getattr(module, self.name)
        removed = normalise_indices(tensor, idxs, tensor.shape[self.dim])
        slice_parameter(module, self.name, self.dim, keep_indices(tensor.shape[self.dim], removed))
        return module

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ParameterHandler) and (self.name, self.dim) == (
            other.name,
            other.dim,
        )

    def __hash__(self) -> int:
        return hash((self.name, self.dim))


#: One instance per layer type, shared by the layer registry and the ``prune_*`` names.
CONV_PRUNER = ConvPruner()
LINEAR_PRUNER = LinearPruner()
BATCHNORM_PRUNER = BatchNormPruner()
LAYERNORM_PRUNER = LayerNormPruner()
GROUPNORM_PRUNER = GroupNormPruner()
PRELU_PRUNER = PReLUPruner()
EMBEDDING_PRUNER = EmbeddingPruner()
MHA_PRUNER = MultiheadAttentionPruner()
RNN_PRUNER = RNNPruner()
TRANSPOSED_LINEAR_PRUNER = TransposedLinearPruner()
PARAMETER_PRUNER = ParameterPruner()

prune_conv_out_channels = CONV_PRUNER.prune_out_channels
prune_conv_in_channels = CONV_PRUNER.prune_in_channels
prune_depthwise_conv_out_channels = CONV_PRUNER.prune_out_channels
prune_depthwise_conv_in_channels = CONV_PRUNER.prune_in_channels
prune_batchnorm_out_channels = BATCHNORM_PRUNER.prune_out_channels
prune_batchnorm_in_channels = BATCHNORM_PRUNER.prune_in_channels
prune_instancenorm_out_channels = BATCHNORM_PRUNER.prune_out_channels
prune_instancenorm_in_channels = BATCHNORM_PRUNER.prune_in_channels
prune_transposed_linear_out_channels = TRANSPOSED_LINEAR_PRUNER.prune_out_channels
prune_transposed_linear_in_channels = TRANSPOSED_LINEAR_PRUNER.prune_in_channels
prune_linear_out_channels = LINEAR_PRUNER.prune_out_channels
prune_linear_in_channels = LINEAR_PRUNER.prune_in_channels
prune_prelu_out_channels = PRELU_PRUNER.prune_out_channels
prune_prelu_in_channels = PRELU_PRUNER.prune_in_channels
prune_layernorm_out_channels = LAYERNORM_PRUNER.prune_out_channels
prune_layernorm_in_channels = LAYERNORM_PRUNER.prune_in_channels
prune_rmsnorm_out_channels = LAYERNORM_PRUNER.prune_out_channels
prune_rmsnorm_in_channels = LAYERNORM_PRUNER.prune_in_channels
prune_groupnorm_out_channels = GROUPNORM_PRUNER.prune_out_channels
prune_groupnorm_in_channels = GROUPNORM_PRUNER.prune_in_channels
prune_embedding_out_channels = EMBEDDING_PRUNER.prune_out_channels
prune_embedding_in_channels = EMBEDDING_PRUNER.prune_in_channels
prune_multihead_attention_out_channels = MHA_PRUNER.prune_out_channels
prune_multihead_attention_in_channels = MHA_PRUNER.prune_in_channels
prune_rnn_out_channels = RNN_PRUNER.prune_out_channels
prune_rnn_in_channels = RNN_PRUNER.prune_in_channels
prune_lstm_out_channels = RNN_PRUNER.prune_out_channels
prune_lstm_in_channels = RNN_PRUNER.prune_in_channels
prune_parameter_out_channels = PARAMETER_PRUNER.prune_out_channels
prune_parameter_in_channels = PARAMETER_PRUNER.prune_in_channels
prune_conv = prune_conv_out_channels
prune_linear = prune_linear_out_channels
prune_batchnorm = prune_batchnorm_out_channels

__all__ = [
    "TransposedLinearPruner",
    "RNNPruner",
    "ParameterPruner",
    "ParameterHandler",
    "BasePruningFunc",
    "slice_parameter",
    *[name for name in dir() if name.startswith("prune_")],
]
