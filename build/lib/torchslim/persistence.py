"""Saving pruned models without pickling code: weights in safetensors plus a JSON pruning plan.

``save_pruned(model, "net.safetensors")`` writes the weights with the plan embedded in the file's
metadata (one file to move around), and the same plan as ``net.plan.json`` for people to read
and diff. ``load_pruned(fresh_model, "net.safetensors")`` replays the plan on a freshly built
model (every pruning call, so attributes such as ``groups`` or ``num_heads`` follow) and loads
the weights. A SHA-256 over plan and tensors catches tampering; every write goes to a temporary
file renamed into place, so a failed save never damages the previous file.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from torch import nn

from torchslim.graph.hooks import run_prune_hooks
from torchslim.graph.record import model_history, recorded
from torchslim.pruning.blocks import remove_blocks
from torchslim.pruning.functions import BasePruningFunc, ParameterHandler, add_bias
from torchslim.pruning.layers import get_pruner
from torchslim.pruning.roles import Role
from torchslim.pruning.tied import TiedParameters
from torchslim.spaces.attributes import set_attribute

FORMAT = "torchslim.pruned/1"
PathLike = Union[str, os.PathLike]


class CheckpointError(ValueError):
    """A saved file that is truncated, tampered with, or does not fit the model."""


def pruning_plan(model: nn.Module) -> dict[str, Any]:
    """The plan of a model pruned through torchslim groups: steps and resulting shapes."""
    return {
        "format": FORMAT,
        "steps": list(recorded(model, "history", [])),
        "shapes": {name: list(t.shape) for name, t in model.state_dict().items()},
    }


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: PathLike, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temporary file next to ``path``, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; a saved file follows the umask
        with open(tmp, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_folder(path: PathLike, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` on a temporary folder next to ``path``, then move it into place; a
    folder already at ``path`` stays whole until the new one is complete."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    old = tmp.with_suffix(".old")
    try:
        write(tmp)
        umask = _umask()
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a saved folder follows the umask
        for file in tmp.rglob("*"):
            if file.is_file():
                os.chmod(file, 0o666 & ~umask)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not path.exists():
            os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return path


def save_pruned(model: nn.Module, path: PathLike) -> Path:
    """Write weights + plan to ``path`` (safetensors) and the plan to ``<path>.plan.json``."""
    from safetensors.torch import save_file

    path = Path(path)
    plan = pruning_plan(model)
    tensors = {k: v.detach().contiguous().cpu() for k, v in _unique_state(model).items()}
    plan_text = json.dumps(plan, sort_keys=True)
    metadata = {"format": FORMAT, "plan": plan_text, "sha256": _digest(plan_text, tensors)}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    readable = json.dumps(plan, indent=1, sort_keys=True) + "\n"
    atomic_write(plan_path(path), lambda tmp: tmp.write_text(readable))
    return path


def plan_path(path: PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".plan.json")


def load_pruned(
    model: nn.Module,
    path: PathLike,
    customized_pruners: Optional[dict[Any, BasePruningFunc]] = None,
) -> nn.Module:
    """Re-apply the saved plan to a freshly constructed ``model`` and load the saved weights."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no pruned checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            names = handle.keys()
            tensors = {name: handle.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from error
    if metadata.get("format") != FORMAT or "plan" not in metadata:
        raise CheckpointError(f"{path} was not written by torchslim.save_pruned")
    if metadata.get("sha256") != _digest(metadata["plan"], tensors):
        raise CheckpointError(f"{path}: checksum mismatch, the file was modified after saving")
    plan = json.loads(metadata["plan"])
    apply_plan(model, plan, customized_pruners)
    run_prune_hooks(model)  # a Hugging Face config follows, as after pruning
    _load_weights(model, tensors, path)
    return model


def apply_plan(
    model: nn.Module,
    plan: dict[str, Any],
    customized_pruners: Optional[dict[Any, BasePruningFunc]] = None,
) -> nn.Module:
    """Replay every pruning call of ``plan`` on ``model``, then check the resulting shapes."""
    modules = dict(model.named_modules())
    custom = dict(customized_pruners or {})
    ties = TiedParameters(model)
    for number, step in enumerate(plan.get("steps", []), 1):
        for op in step["ops"]:
            module = modules.get(op["module"]) if op["module"] != "<model>" else model
            if module is None:
                raise CheckpointError(
                    f"plan step {number} ({step['group']}) prunes {op['module']!r}, which this "
                    "model does not have"
                )
            apply_operation(module, op, custom, number)
            if op["role"] == Role.BLOCKS:  # later steps name the blocks by their new places
                modules = dict(model.named_modules())
        ties.retie()
    model_history(model).extend(plan.get("steps", []))
    state = model.state_dict()
    for name, shape in plan.get("shapes", {}).items():
        if name not in state:
            raise CheckpointError(f"the plan expects {name!r}, which this model does not have")
        if list(state[name].shape) != shape:
            raise CheckpointError(
                f"{name}: shape {list(state[name].shape)} after replaying the plan, "
                f"the plan says {shape}"
            )
    return model


def apply_operation(
    module: nn.Module, op: dict[str, Any], custom: Optional[dict[Any, Any]] = None, number: int = 0
) -> None:
    """Replay one operation of a plan step (``op``: module, role, indices...) on ``module``."""
    custom = custom or {}
    try:
        role = Role(op["role"])
        if role == Role.PARAM:
            ParameterHandler(op["param"], op["dim"])(module, op["idxs"])
            return
        if role == Role.ATTR:
            set_attribute(module, op["attr"], op["value"])
            return
        if role == Role.BIAS:
            add_bias(module)
            return
        if role == Role.BLOCKS:
            if len(module) != op["of"]:
                raise ValueError(f"it holds {len(module)} blocks, the plan expects {op['of']}")
            remove_blocks(module, op["idxs"])
            return
        pruner = get_pruner(module, custom)
        if pruner is None:
            raise CheckpointError(f"no pruning function for {type(module).__name__}")
        handler = pruner.prune_out_channels if role == Role.OUT else pruner.prune_in_channels
        handler(module, op["idxs"])
    except (ValueError, IndexError, AttributeError) as error:
        raise CheckpointError(
            f"plan step {number} does not fit module {op['module']!r}: {error}"
        ) from error


def _load_weights(model: nn.Module, tensors: dict[str, torch.Tensor], path: Path) -> None:
    state = model.state_dict()
    missing = sorted(set(_unique_state(model)) - set(tensors))
    unexpected = sorted(set(tensors) - set(state))
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing tensors {missing[:5]}, unexpected {unexpected[:5]}")
    for name, tensor in tensors.items():
        if state[name].shape != tensor.shape:
            raise CheckpointError(
                f"{path}: {name} has shape {list(tensor.shape)}, the model {list(state[name].shape)}"
            )
    model.load_state_dict(tensors, strict=False)


def _unique_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without aliases (tied weights are stored once, safetensors refuses
    shared storage)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor.detach()
    return out


def _digest(plan_text: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(plan_text.encode())
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        digest.update(str(list(tensor.shape)).encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def state_dict(model: nn.Module) -> dict[str, Any]:
    """torch-pruning's ``tp.state_dict``: the model's pruning plan and its tensors, as plain
    data (``torch.save`` it; ``torch.load`` with the default ``weights_only=True`` reads it back,
    and :func:`load_state_dict` rebuilds the pruned model from a freshly built one)."""
    return {
        "format": FORMAT,
        "plan": pruning_plan(model),
        "state_dict": {k: v.detach().cpu() for k, v in _unique_state(model).items()},
    }


def load_state_dict(
    model: nn.Module,
    state_dict: dict[str, Any],
    customized_pruners: Optional[dict[Any, BasePruningFunc]] = None,
) -> nn.Module:
    """Make a freshly built ``model`` the pruned one ``state_dict`` describes: one written by
    :func:`state_dict`, or by torch-pruning's ``tp.state_dict`` (module tensors and plain
    attributes; anything else it holds, such as hooks, is not applied)."""
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"a state dict must be a dict, got {type(state_dict).__name__}")
    if "full_state_dict" in state_dict and "attributions" in state_dict:
        _load_peer_state(model, state_dict)
    elif state_dict.get("format") == FORMAT and "plan" in state_dict:
        apply_plan(model, state_dict["plan"], customized_pruners)
        run_prune_hooks(model)
        _load_weights(model, state_dict["state_dict"], Path("state_dict"))
    else:
        raise CheckpointError(
            "not a pruned state dict: expected the output of tp.state_dict(model) (keys "
            f"'format', 'plan', 'state_dict'), got keys {sorted(state_dict)[:6]}"
        )
    return model


_PLAIN = (int, float, bool, str, type(None))


def _load_peer_state(model: nn.Module, saved: dict[str, Any]) -> None:
    modules = dict(model.named_modules())
    unknown = sorted(set(saved["full_state_dict"]) - set(modules))
    if unknown:
        raise CheckpointError(f"the state dict has modules this model does not: {unknown[:5]}")
    for name, state in saved["full_state_dict"].items():
        module = modules[name]
        for kind in ("_parameters", "_buffers"):
            for key, tensor in (state.get(kind) or {}).items():
                target = getattr(module, kind)
                target[key] = (
                    tensor
                    if tensor is None or kind == "_buffers"
                    else nn.Parameter(tensor.detach(), requires_grad=tensor.requires_grad)
                )
        for key, value in saved["attributions"].get(name, {}).items():
            plain = isinstance(value, _PLAIN) or (
                isinstance(value, (tuple, list)) and all(isinstance(v, _PLAIN) for v in value)
            )
            if plain and key in vars(module):
                setattr(module, key, value)


def save(obj: Any, path: PathLike) -> None:
    """torch-pruning's ``tp.save``: ``torch.save``, written to a temporary file renamed into
    place (a failed save never damages the previous file)."""
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load(path: PathLike, map_location: Any = None, weights_only: bool = True) -> Any:
    """torch-pruning's ``tp.load``: ``torch.load`` of tensors and plain data only by default;
    a file that needs pickled code gets a clear error (pass ``weights_only=False`` only for
    files you trust)."""
    try:
        return torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as error:
        raise CheckpointError(
            f"{path} holds pickled objects beyond tensors and plain data ({error}); torchslim "
            "does not run pickled code by default: save with tp.state_dict(model), or pass "
            "weights_only=False for a file you trust"
        ) from error
