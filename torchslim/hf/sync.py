"""Keep a pruned Hugging Face model's ``config`` true, so ``save_pretrained`` just works.

After every pruning step (or once per ``pruner.step()``), :func:`sync_config` looks for the
config that builds the pruned model exactly (:mod:`.config`). If there is one (every layer pruned
alike), its fields are written into ``model.config``: ``save_pretrained`` then writes a
checkpoint that plain ``AutoModel*.from_pretrained`` loads, without torchslim. If there is none
(widths differ per layer), a config with per-layer overrides (transformers'
``per_layer_config``) is looked for where the model's class builds its layers from one; failing
that, ``model.config`` keeps the dense fields and records the pruning plan
under :data:`RECORD_KEY`; :func:`torchslim.hf.from_pretrained` rebuilds such checkpoints. Fields
the model's own forward reads as sizes keep their pruned values even then (the model must run),
their dense values recorded with the plan, which is replayed from them.
"""

from __future__ import annotations

import copy
import sys
from typing import Any, Optional

from torch import nn

from torchslim.graph.record import model_history, model_record, recorded
from torchslim.hf.config import (
    LAYER_CONFIG,
    OPTIONAL_FIELDS,
    as_loaded,
    build,
    field,
    fitting_config,
    int_attributes,
    layer_overrides,
    numeric_field,
)
from torchslim.hf.depth import shallower
from torchslim.hf.layer_config import fitting_layer_config
from torchslim.persistence import pruning_plan
from torchslim.spaces.attributes import SHARED_CONFIG, WRITTEN_CONFIG_FIELDS

RECORD_KEY = "torchslim_plan"
#: Config fields as the plan's replay starts from them, kept in the plan record: the dense
#: depth (before blocks were removed) and the dense values of fields the model's own forward
#: reads, which the saved config holds pruned.
DENSE_DEPTH = "dense_depth"


def is_hf_model(model: nn.Module) -> bool:
    """A ``transformers.PreTrainedModel``, asked without importing anything: such a model
    exists only once its module is loaded (reading ``transformers.PreTrainedModel`` would load
    it, seconds of imports for a torchvision model in a process that imported transformers)."""
    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def dense_config(model: nn.Module) -> Any:
    """The config the model had before its first pruning step (kept on the model)."""
    dense = recorded(model, "dense_config")
    if dense is None:
        dense = copy.deepcopy(vars(model).get(SHARED_CONFIG, model.config))
        if hasattr(dense, RECORD_KEY):
            delattr(dense, RECORD_KEY)
        model_record(model)["dense_config"] = dense
    return dense


def sync_config(model: nn.Module) -> bool:
    """Update ``model.config`` to the pruned depth and widths; ``True`` if a plain config
    fits. Without one, the depth still follows (the KV cache is laid out from it), as do
    the fields the model's own forward reads as sizes, and their dense values are recorded
    with the plan for :func:`torchslim.hf.from_pretrained`."""
    original = dense_config(model)
    dense = shallower(original, model_history(model))
    fitted = fitting_config(model, dense) or fitting_layer_config(model, dense)
    config = model.config
    source = fitted if fitted is not None else dense
    # fields the model's own forward reads as sizes (Segformer's config.hidden_sizes[-1])
    # keep their pruned values when no config fits; the plan's replay starts from dense
    read = vars(model).get(WRITTEN_CONFIG_FIELDS, set()) if fitted is None else set()
    for name, value in vars(source).items():
        if numeric_field(value) and name not in read and field(config, name) != value:
            setattr(config, name, copy.copy(value))
    if hasattr(type(config), LAYER_CONFIG):
        config.per_layer_config = layer_overrides(source) or None
    spec = "_heterogeneity_spec"  # the overrides' object: recorded as a plain mapping below
    loaded = vars(dense if dense is original else as_loaded(dense))
    depth = {k: v for k, v in vars(original).items() if k != spec and loaded.get(k) != v}
    for name in depth.keys() & vars(dense).keys():
        setattr(config, name, copy.deepcopy(vars(dense)[name]))
    if layer_overrides(original) != layer_overrides(dense):
        depth[LAYER_CONFIG] = {str(i): v for i, v in layer_overrides(original).items()}
    for name in OPTIONAL_FIELDS:
        if name in vars(config) and name not in vars(source):
            delattr(config, name)
    if fitted is not None:
        if hasattr(config, RECORD_KEY):
            delattr(config, RECORD_KEY)
        _copy_attributes(model, build(type(model), fitted))
        return True
    for name in read:
        if vars(config).get(name) != vars(original).get(name):
            depth[name] = copy.deepcopy(vars(original)[name])
    plan = {**pruning_plan(model), "buffers": computed_buffers(model), DENSE_DEPTH: depth}
    setattr(config, RECORD_KEY, plan)
    return False


def _copy_attributes(model: nn.Module, built: Optional[nn.Module]) -> None:
    """Give every module the int attributes the fitting config builds (``hidden_size`` of a
    layer that the forward never reads keeps its dense value until now)."""
    if built is None:
        return
    for (name, attribute), (value,) in (
        (key.split(":"), value) for key, value in int_attributes(built).items()
    ):
        module = model.get_submodule(name) if name else model
        if (
            getattr(module, attribute, None) != value
            and type(getattr(module, attribute, None)) is int
        ):
            setattr(module, attribute, value)


def computed_buffers(model: nn.Module) -> dict[str, list]:
    """Buffers that are not saved with the weights but were pruned (rotary frequencies):
    ``from_pretrained`` recomputes them for dense widths, so their values travel in the plan."""
    saved = set(model.state_dict().keys())
    touched = {op["module"] for step in model_history(model) for op in step["ops"]}
    return {
        name: buffer.tolist()
        for name, buffer in model.named_buffers()
        if name not in saved and name.rpartition(".")[0] in touched and buffer.device.type != "meta"
    }


def after_pruning(model: nn.Module) -> None:
    """Listener the dependency graph calls after pruning (see ``DependencyGraph.deferred``)."""
    if is_hf_model(model):
        sync_config(model)
