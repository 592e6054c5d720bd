"""Loading Hugging Face checkpoints of pruned models.

A model pruned alike in every layer saves a plain config: ``AutoModel*.from_pretrained`` loads it
and so does :func:`from_pretrained` (which then just delegates). A model with per-layer widths
saves its dense config (but its depth and the fields its own forward reads as sizes, whose
dense values the plan records) plus the pruning plan (``config.torchslim_plan``); plain
``from_pretrained`` builds the dense model and stops at the first size mismatch, while
:func:`from_pretrained` builds the dense architecture with parameters on ``meta`` (no memory),
replays the plan and assigns the saved weights.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from torchslim.hf.config import config_value
from torchslim.hf.sync import DENSE_DEPTH, RECORD_KEY, dense_config
from torchslim.persistence import CheckpointError, apply_plan


def from_pretrained(
    path: Union[str, os.PathLike], model_class: Optional[type] = None, **kwargs: Any
) -> nn.Module:
    """Load a directory written by ``save_pretrained`` from a pruned model (any widths).

    ``model_class`` defaults to the class named in ``config.architectures``; ``kwargs`` go to
    the plain ``from_pretrained`` when the config fits the weights as it is."""
    import transformers

    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(path)
    model_class = model_class or model_class_of(config)
    config, record, pruned_depth = _planned(config, path / "config.json")
    if record is None:
        return model_class.from_pretrained(path, **kwargs)
    pruned_class = _replaying(model_class, record)
    kwargs.setdefault("config", config)
    try:
        model, info = pruned_class.from_pretrained(path, output_loading_info=True, **kwargs)
    except RuntimeError as error:  # transformers stops at mismatched sizes
        raise CheckpointError(
            f"{path}: the saved weights do not fit the replayed plan: {error}"
        ) from error
    if any(info.values()):
        raise CheckpointError(f"{path}: the saved weights do not fit the replayed plan: {info}")
    with torch.no_grad():
        for name, values in record.get("buffers", {}).items():
            buffer = model.get_buffer(name)
            buffer.copy_(torch.tensor(values, dtype=buffer.dtype))
    _as_saved(model, record, pruned_depth)
    return model


def built(model_class: type, config: Any, where: Union[str, os.PathLike]) -> nn.Module:
    """The model a folder's ``config`` (read from ``where``) describes, built without loading
    weights (on the current device: ``meta`` for streaming), with the pruning plan the config
    records replayed, as :func:`from_pretrained` builds it; computed buffers keep the values
    the dense model's construction gives them."""
    config, record, pruned_depth = _planned(copy.deepcopy(config), where)
    if record is None:
        return model_class(config).eval()
    model = _replaying(model_class, record)(config).eval()
    _as_saved(model, record, pruned_depth)
    return model


def _planned(config: Any, where: Union[str, os.PathLike]) -> tuple[Any, Optional[dict], dict]:
    """``config`` made ready to build the model its recorded plan starts from (the plan taken
    out, the dense depth and the other dense values it records back), the plan (``None``: a
    plain config), and the saved values to put back once the model is built."""
    record = getattr(config, RECORD_KEY, None)
    if record is None:
        return config, None, {}
    if not isinstance(record, dict):
        raise CheckpointError(
            f"{where}: {RECORD_KEY} is {str(record)[:60]!r}, not a pruning plan "
            "(a save interrupted before its plan was written?): save the pruned model again"
        )
    delattr(config, RECORD_KEY)
    pruned_depth = {name: config_value(config, name) for name in record.get(DENSE_DEPTH, {})}
    for name, value in record.get(DENSE_DEPTH, {}).items():
        setattr(config, name, value)  # built at the dense depth, then the plan removes blocks
    return config, record, pruned_depth


def _as_saved(model: nn.Module, record: dict, pruned_depth: dict) -> None:
    """The built model's config as it was saved: the pruned depth, and the plan (as after
    pruning: saving the model again keeps it)."""
    for name, value in pruned_depth.items():
        setattr(model.config, name, value)
    setattr(model.config, RECORD_KEY, record)


def _replaying(model_class: type, plan: dict[str, Any]) -> type:
    """A subclass of ``model_class`` whose constructor replays ``plan``: ``from_pretrained``
    then builds the pruned architecture and loads the saved weights into it with its own
    machinery (weight-name conversions, sharding, dtypes, devices); it keeps the class's
    module and name, which transformers uses to find those conversions. Modules holding pruned
    computed buffers are marked initialised, so they are not recomputed for dense widths."""

    def __init__(self: nn.Module, config: Any, *args: Any, **kwargs: Any) -> None:
        model_class.__init__(self, config, *args, **kwargs)
        dense_config(self)  # the dense depth and widths, before the plan prunes
        _tie_declared_weights(self)
        apply_plan(self, plan)
        for name in plan.get("buffers", {}):
            self.get_submodule(name.rpartition(".")[0])._is_hf_initialized = True

    namespace = {
        "__init__": __init__,
        "__module__": model_class.__module__,
        "__qualname__": model_class.__qualname__,
    }
    return type(model_class.__name__, (model_class,), namespace)


def _tie_declared_weights(model: nn.Module) -> None:
    """Share the parameters the model declares as tied (``from_pretrained`` builds them apart
    and ties them after loading), so the plan prunes them once, together."""
    for target, source in getattr(model, "all_tied_weights_keys", {}).items():
        owner, _, name = target.rpartition(".")
        setattr(model.get_submodule(owner), name, model.get_parameter(source))


def model_class_of(config: Any) -> type:
    """The transformers class a config names in ``architectures``."""
    import transformers

    names = getattr(config, "architectures", None) or []
    for name in names:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    raise ValueError(f"config names no known architecture ({names}); pass model_class=")


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a ``save_pretrained`` directory (single file or sharded)."""
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"no safetensors weights in {path}")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(str(path / name)))
    return tensors
