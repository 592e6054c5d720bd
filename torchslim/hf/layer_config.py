"""Per-layer configs for models pruned to different widths per layer.

transformers' heterogeneous configs (``config.per_layer_config``: layer ``i`` built from its own
overrides of the global fields) describe such models for the classes that build each layer from
``config.per_layer_config[i]`` (Step3p7's attention, ...): plain ``from_pretrained`` then loads
the pruned checkpoint. The overrides are found as the plain config is (:mod:`.config`), one layer
at a time: each numeric field is doubled for one layer of each structure to learn which of that
layer's sizes follow it, and every layer whose sizes differ from the config's is fitted in turn.
A field the class reads from the global config does not build once overridden (transformers
refuses to read it globally), so it is no per-layer field; a model whose code never names
``per_layer_config`` is not probed at all, and keeps its recorded plan."""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path
from typing import Any, Callable, Optional

from torch import nn

from torchslim.graph.record import model_record
from torchslim.hf.config import (
    LAYER_FIELD,
    FieldProbe,
    Shapes,
    build_shapes,
    field,
    fit,
    layer_overrides,
    mismatches,
    pruned_signature,
    same_computed_values,
    set_field,
)

#: ``(tensor or attribute name relative to its layer, dim) -> size ratio`` when a field doubles
RelativeRatios = dict[tuple[str, int], float]


def fitting_layer_config(model: nn.Module, base: Any, max_trials: int = 64) -> Optional[Any]:
    """A copy of ``base`` whose ``per_layer_config`` makes ``type(model)`` build exactly
    ``model``'s shapes (the rest of the model as ``base`` builds it), or ``None``."""
    layers = field(base, "num_hidden_layers")
    supported = hasattr(type(base), "per_layer_config") and isinstance(layers, int)
    if not supported or not _reads_layer_configs(model):
        return None
    model_class, target = type(model), pruned_signature(model)
    shapes = build_shapes(model_class, base)
    lists = [name for name, m in model.named_modules() if _is_layer_list(m, layers)]
    if shapes is None or shapes.keys() - _attributes(shapes) != target.keys() - _attributes(target):
        return None
    current = base
    for prefix in lists:
        for index in range(layers):
            inside = _inside(prefix, index)
            if all(shapes.get(k) == v for k, v in target.items() if inside(k)):
                continue
            probes = _layer_probes(model, current, shapes, prefix, index)
            goal = {k: (v if inside(k) else shapes.get(k, v)) for k, v in target.items()}
            current = fit(
                model,
                model_class,
                current,
                goal,
                max_trials,
                probes,
                buffers=False,
                base_shapes=shapes,
            )
            if current is None:
                return None
            shapes = build_shapes(model_class, current) or {}
    if current is base or mismatches(shapes, target):
        return None
    return current if same_computed_values(model, model_class, current) else None


def layer_changes(before: Any, after: Any) -> dict[str, tuple[Any, Any]]:
    """The per-layer fields ``after`` overrides with values ``before`` does not give that
    layer: ``{"per_layer_config[0].num_attention_heads": (4, 2)}``."""
    changes = {}
    for index, overrides in sorted(layer_overrides(after).items()):
        was = before.per_layer_config[index] if index < len(before.per_layer_config) else None
        for name, value in overrides.items():
            old = field(was, name) if was is not None else None
            if old != value:
                changes[LAYER_FIELD.format(index, name)] = (old, value)
    return changes


def _reads_layer_configs(model: nn.Module) -> bool:
    """Whether the code of any of the model's classes names ``per_layer_config`` (a model whose
    code never reads it cannot build a layer from it: no probe is worth building). Their
    bases are not read: transformers' shared base classes name it for every model."""
    return any(_mentions_layer_configs(type(m).__module__) for m in model.modules())


@functools.cache
def _mentions_layer_configs(module_name: str) -> bool:
    path = getattr(sys.modules.get(module_name), "__file__", None)
    try:
        return "per_layer_config" in Path(path).read_text(encoding="utf-8")
    except (TypeError, OSError, UnicodeDecodeError):  # no source to read: probe to find out
        return True


def _is_layer_list(module: nn.Module, layers: int) -> bool:
    return isinstance(module, nn.ModuleList) and len(module) == layers


def _attributes(shapes: Shapes) -> set[str]:
    return {k for k in shapes if ":" in k}


def _head(prefix: str, index: int) -> str:
    """The name of layer ``index`` of the list ``prefix`` (``"model.layers.3"``)."""
    return f"{prefix}.{index}" if prefix else str(index)


def _inside(prefix: str, index: int) -> Callable[[str], bool]:
    """Whether a tensor (``"layers.3.mlp.up_proj.weight"``) or attribute (``"layers.3:size"``,
    ``"layers.3.attn:heads"``) name belongs to layer ``index`` of the list ``prefix``."""
    head = _head(prefix, index)
    return lambda key: key.startswith((f"{head}.", f"{head}:"))


def _layer_probes(
    model: nn.Module, config: Any, shapes: Shapes, prefix: str, index: int
) -> list[FieldProbe]:
    """Probes of the per-layer fields of layer ``index`` at their values in ``config`` (which
    builds ``shapes``); what each field moves is probed once per model for each structure of
    layer (its sizes under ``config``)."""
    head, inside = _head(prefix, index), _inside(prefix, index)
    relative = {k[len(head) :]: v for k, v in shapes.items() if inside(k)}
    structure = (prefix, tuple(sorted(relative.items())))
    cache = model_record(model).setdefault("layer_probes", {})
    if structure not in cache:
        cache[structure] = _probe_layer(type(model), config, shapes, prefix, index)
    values = config.per_layer_config[index]
    return [
        FieldProbe(
            LAYER_FIELD.format(index, name),
            field(values, name),
            {(head + key, d): r for (key, d), r in ratios.items()},
        )
        for name, ratios in cache[structure].items()
    ]


def _probe_layer(
    model_class: type, config: Any, base: Shapes, prefix: str, index: int
) -> dict[str, RelativeRatios]:
    """Double each scalar field for layer ``index`` alone; keep the fields that change sizes of
    that layer and nothing outside it. A class that reads the field from the global config
    does not build (transformers refuses to read an overridden field globally)."""
    head, inside = _head(prefix, index), _inside(prefix, index)
    values = config.per_layer_config[index]
    fields = {
        name: value
        for name, value in vars(values).items()
        if type(value) in (int, float) and value > 0 and name != "num_hidden_layers"
    }

    def doubled(name: str) -> Optional[Shapes]:
        trial = copy.deepcopy(config)
        try:
            set_field(trial, LAYER_FIELD.format(index, name), 2 * fields[name])
        except Exception:  # the config validates overrides with errors of its own
            return None
        return build_shapes(model_class, trial)

    probes: dict[str, RelativeRatios] = {}
    for name in fields:
        built = doubled(name)
        if built is None or built.keys() != base.keys():
            continue
        moved = [k for k in base if built[k] != base[k] and len(built[k]) == len(base[k])]
        if moved and all(inside(k) for k in moved):
            probes[name] = {
                (k[len(head) :], d): built[k][d] / size
                for k in moved
                for d, size in enumerate(base[k])
                if built[k][d] != size and size
            }
    return probes
