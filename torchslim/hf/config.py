"""Find the Hugging Face config that describes a pruned model.

After pruning, a ``PreTrainedModel``'s ``config`` still describes the dense widths. The config
that fits is found without per-model tables: the model's class is built on the ``meta`` device
(no memory, milliseconds) from trial configs, and a trial fits when it builds exactly the pruned
model's parameter shapes, the attributes its forward uses as sizes and the buffers it computes.
Which field moves which sizes is learnt once per model by *probing*: doubling one numeric field
at a time (``hidden_size``, ``num_attention_heads``, ``head_dim``, list elements...). A joint
log-linear solve and single-field proportions then suggest values, and their combinations are
built, fewest changes first, until one fits. Models pruned to different widths per layer have no
such config; :func:`fitting_config` returns ``None`` for them.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import Counter
from contextlib import AbstractContextManager, ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import numpy as np
import torch
from torch import nn

from torchslim.graph.record import model_record, recorded
from torchslim.spaces.attributes import split_index

Shapes = dict[str, Any]

#: Fields that model classes derive when the config leaves them unset (``head_dim`` from the
#: hidden size and head count, GPT-2's ``n_inner`` as 4 x ``n_embd``): setting them explicitly
#: is how a head size or MLP width that no longer follows the hidden size becomes expressible.
OPTIONAL_FIELDS = {
    "head_dim": lambda c: _derived_head_dim(c),
    "n_inner": lambda c: 4 * c.n_embd if isinstance(getattr(c, "n_embd", None), int) else None,
}

#: How a field of one layer is named (``"per_layer_config[3].num_attention_heads"``) where the
#: config is heterogeneous (transformers' ``per_layer_config``: layer ``i`` built from its own
#: overrides of the global fields).
LAYER_CONFIG = "per_layer_config"
LAYER_FIELD = LAYER_CONFIG + "[{}].{}"


def field(config: Any, name: str, default: Any = None) -> Any:
    """A config field's global value. A heterogeneous config refuses to read a field that some
    layer overrides (``AmbiguousGlobalPerLayerAttributeError``); fitting needs the global one."""
    read = getattr(config, "_getattr_without_heterogeneous_validation", None)
    return read(name, default) if read is not None else getattr(config, name, default)


def config_value(config: Any, name: str) -> Any:
    """A field's global value, or for :data:`LAYER_CONFIG` the per-layer overrides (a value
    that can be set back, where reading the attribute gives a view of per-layer configs)."""
    return layer_overrides(config) if name == LAYER_CONFIG else field(config, name)


def layer_overrides(config: Any) -> dict[int, dict[str, Any]]:
    """A copy of the per-layer overrides of a heterogeneous config (``{}`` for other configs)."""
    spec = vars(config).get("_heterogeneity_spec")
    return copy.deepcopy(spec.per_layer_overrides) if spec is not None else {}


def _derived_head_dim(config: Any) -> Optional[int]:
    hidden = field(config, "hidden_size")
    heads = field(config, "num_attention_heads")
    if isinstance(hidden, int) and isinstance(heads, int) and heads and hidden % heads == 0:
        return hidden // heads
    return None


def model_shapes(model: nn.Module) -> Shapes:
    """Shapes of every parameter and persistent buffer, by state-dict name, and every module's
    public int attributes (``"layers.0.attn:head_dim"``): equal shapes can hide a different
    split into heads, so the attributes pruning changed must match too."""
    shapes: Shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    shapes.update(int_attributes(model))
    return shapes


def int_attributes(model: nn.Module) -> dict[str, tuple[int]]:
    return {
        f"{name}:{attribute}": (value,)
        for name, module in model.named_modules()
        for attribute, value in vars(module).items()
        if type(value) is int and not attribute.startswith("_")
    }


def pruned_signature(model: nn.Module) -> Shapes:
    """What a fitting config must reproduce: every tensor shape, and the int attributes the
    forward uses as sizes (which pruning keeps up to date; others may still hold dense values
    until the fitting config's are copied in)."""
    used = recorded(model, "size_attributes", set())
    return {k: v for k, v in model_shapes(model).items() if ":" not in k or k in used}


@contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build modules whose parameters live on ``meta`` (no memory, and initialisers run on
    ``meta`` for free) while buffers stay real, so values computed at construction, such as
    rotary frequencies, are kept."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: Optional[nn.Parameter]) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def build(model_class: type, config: Any, buffers: bool = False) -> Optional[nn.Module]:
    """``model_class(config)`` on ``meta`` (with real buffers if asked); ``None`` if the class
    rejects the config. Without buffers the weights' initialisers are skipped: a config fit
    builds dozens of models for their shapes alone, and on ``meta`` the initialisers still
    cost a third of each build."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with ExitStack() as stack:
            stack.enter_context(parameters_on_meta() if buffers else torch.device("meta"))
            if not buffers:  # real buffers may be filled by an initialiser
                stack.enter_context(_initialisers_skipped())
            return model_class(config)
    except Exception:  # a trial config the class rejects is simply not a candidate
        return None
    finally:
        logging.set_verbosity(verbosity)


def _initialisers_skipped() -> AbstractContextManager[Any]:
    """transformers' own switch that turns weight initialisers into no-ops (where the
    installed version has one)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:
        try:
            from transformers.modeling_utils import no_init_weights
        except ImportError:
            return nullcontext()
    return no_init_weights()


def build_shapes(model_class: type, config: Any) -> Optional[Shapes]:
    """The shapes ``model_class(config)`` has; ``None`` if it cannot build."""
    built = build(model_class, config)
    return None if built is None else model_shapes(built)


def same_computed_values(model: nn.Module, model_class: type, config: Any) -> bool:
    """Whether what a class computes from the config at construction comes out as in
    ``model``: buffers it does not save (rotary frequencies; pruning can remove some of them,
    which a config cannot express) and float attributes (BioGPT's embedding scale
    ``sqrt(hidden_size)``: pruning keeps the dense value, a narrower config would not)."""
    built = build(model_class, config, buffers=True)
    if built is None:
        return False
    saved = set(model.state_dict().keys())
    mine = {n: b for n, b in model.named_buffers() if n not in saved}
    theirs = dict(built.named_buffers())
    same_buffers = all(
        name in theirs
        and theirs[name].shape == buffer.shape
        and (buffer.device.type == "meta" or torch.equal(theirs[name], buffer.to(theirs[name])))
        for name, buffer in mine.items()
    )
    floats, built_floats = float_attributes(model), float_attributes(built)
    return same_buffers and all(
        floats[key] == built_floats[key] for key in floats.keys() & built_floats.keys()
    )


def float_attributes(model: nn.Module) -> dict[str, float]:
    """Every module's public float attributes that the eval forward may use, as
    ``"layers.0.attn:scaling"``: dropout and drop-path rates are left out (a shallower config
    spreads drop-path rates over fewer blocks than the ones that stayed were built with)."""
    return {
        f"{name}:{attribute}": value
        for name, module in model.named_modules()
        if not isinstance(module, nn.modules.dropout._DropoutNd)
        for attribute, value in vars(module).items()
        if type(value) is float and not attribute.startswith("_") and "drop" not in attribute
    }


def mismatches(built: Optional[Shapes], target: Shapes) -> float:
    """Number of differing dims plus missing or extra tensors (inf if it did not build);
    attributes count only where ``target`` names them."""
    if built is None:
        return math.inf
    built = {k: v for k, v in built.items() if ":" not in k or k in target}
    count = len(built.keys() ^ target.keys())
    for name in built.keys() & target.keys():
        a, b = built[name], target[name]
        count += sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
    return count


@dataclass
class FieldProbe:
    """How one config field moves shapes: ``(tensor, dim) -> size ratio`` when it doubles."""

    name: str
    value: float
    ratios: dict[tuple[str, int], float]


def numeric_field(value: Any) -> bool:
    """Whether a config value is one a fit may change: a number or a list of ints
    (``hidden_sizes``, ``num_heads``)."""
    return type(value) in (int, float) or (
        isinstance(value, list) and bool(value) and all(type(v) is int for v in value)
    )


def _fields(config: Any) -> dict[str, Any]:
    """Positive numeric fields of a config, list elements included (``"num_heads[2]"``)."""
    fields: dict[str, Any] = {}
    for name, value in vars(config).items():
        if isinstance(value, list) and numeric_field(value):
            fields.update({f"{name}[{i}]": v for i, v in enumerate(value) if v > 0})
        elif numeric_field(value) and value > 0:
            fields[name] = value
    return fields


def set_field(config: Any, name: str, value: Any) -> None:
    """Set a config field, one element of a list field (``"num_heads[2]"``), or one layer's
    field (:data:`LAYER_FIELD`)."""
    if name.startswith(LAYER_CONFIG + "["):
        layer, _, attribute = name.removeprefix(LAYER_CONFIG + "[").partition("].")
        overrides = layer_overrides(config)
        overrides.setdefault(int(layer), {})[attribute] = value
        config.per_layer_config = overrides
        return
    base, index = split_index(name)
    if index is None:
        setattr(config, name, value)
        return
    items = list(getattr(config, base))
    items[index] = value
    setattr(config, base, items)


def probe_fields(model_class: type, config: Any) -> list[FieldProbe]:
    """Double each numeric field of ``config`` once and record which dims follow it."""
    base = build_shapes(model_class, config)
    if base is None:
        return []
    probes = []
    for name, value in _fields(config).items():
        trial = copy.deepcopy(config)
        set_field(trial, name, 2 * value)
        built = build_shapes(model_class, trial)
        if built is None:
            continue
        ratios = {
            (key, d): built[key][d] / size
            for key, shape in base.items()
            if key in built and len(built[key]) == len(shape)
            for d, size in enumerate(shape)
            if built[key][d] != size and size
        }
        if ratios:
            probes.append(FieldProbe(name, value, ratios))
    return probes


def _solve(probes: list[FieldProbe], base: Shapes, target: Shapes) -> dict[str, float]:
    """Field values from a least-squares fit of ``log size = sum(e_f * log field)``, where the
    exponents ``e_f`` come from the probes (x2 -> 1, x0.5 -> -1): sizes that are products and
    quotients of fields (``head_dim = hidden_size / num_heads``) are solved jointly."""
    keys = sorted({key for probe in probes for key in probe.ratios})
    rows, rhs = [], []
    for key, d in keys:
        ratios = [probe.ratios.get((key, d), 1.0) for probe in probes]
        if key not in target or any(r not in (0.5, 1.0, 2.0) for r in ratios):
            continue
        rows.append([math.log2(r) for r in ratios])
        rhs.append(math.log2(target[key][d] / base[key][d]) if target[key][d] else -30.0)
    if not rows:
        return {}
    solution = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return {p.name: float(p.value * 2.0**x) for p, x in zip(probes, solution) if abs(x) > 1e-9}


def _suggestions(probe: FieldProbe, base: Shapes, target: Shapes) -> set[int]:
    """Values of an int field that the target shapes imply through dims proportional to it."""
    votes: Counter[int] = Counter()
    if not isinstance(probe.value, int):
        return set()
    for (key, d), ratio in probe.ratios.items():
        if key not in target or key not in base or base[key][d] == target[key][d]:
            continue
        was, now = base[key][d], target[key][d]
        if ratio == 2 and (probe.value * now) % was == 0:
            votes[probe.value * now // was] += 1
        elif ratio == 0.5 and now and (probe.value * was) % now == 0:
            votes[probe.value * was // now] += 1
    return {value for value, _ in votes.most_common(3) if value > 0}


def _with_optional_fields(model_class: type, config: Any) -> Optional[Any]:
    """``config`` with the fields classes derive when unset (``head_dim``) set explicitly, if
    that builds the same model; ``None`` if there is nothing to set."""
    explicit = copy.deepcopy(config)
    changed = False
    for name, default in OPTIONAL_FIELDS.items():
        value = default(config)
        if field(config, name) is None and value is not None:
            setattr(explicit, name, value)
            changed = True
    same = changed and build_shapes(model_class, explicit) == build_shapes(model_class, config)
    return explicit if same else None


def fitting_config(model: nn.Module, dense_config: Any, max_trials: int = 512) -> Optional[Any]:
    """A copy of ``dense_config`` under which ``type(model)`` builds exactly ``model``'s shapes,
    or ``None`` when no such config exists (widths that differ from layer to layer).

    Candidate values for each field come from a joint log-linear solve and from single-field
    proportions; combinations are tried fewest changes first, first with the config as it is,
    then with optional fields (``head_dim``) made explicit."""
    model_class = type(model)
    target = pruned_signature(model)
    bases = [dense_config, _with_optional_fields(model_class, dense_config)]
    for number, base in enumerate(b for b in bases if b is not None):
        fitted = fit(model, model_class, base, target, max_trials, _probes(model, number, base))
        if fitted is not None:
            return fitted
    return None


def fit(
    model: nn.Module,
    model_class: type,
    base: Any,
    target: Shapes,
    max_trials: int,
    probes: list[FieldProbe],
    buffers: bool = True,
    base_shapes: Optional[Shapes] = None,
) -> Optional[Any]:
    """The first change of ``base`` by the probes' suggested values (fewest changes first)
    under which ``model_class`` builds ``target`` (and ``model``'s computed values, unless
    ``buffers`` is false: a fit of one layer, whose other layers still differ).
    ``base_shapes``: what ``base`` builds, when the caller has it."""
    if base_shapes is None:
        base_shapes = build_shapes(model_class, base) or {}
    solved = _solve(probes, base_shapes, target)
    options = []
    for probe in probes:
        values: set[Any] = set(_suggestions(probe, base_shapes, target))
        solution = solved.get(probe.name)
        if solution is not None and isinstance(probe.value, int):
            values.update({math.floor(solution), math.ceil(solution)})
        elif solution is not None:
            values.add(round(solution, 6))
        values.discard(probe.value)
        options.append([(probe.name, v) for v in sorted(values) if v > 0])
    options = [choices for choices in options if choices]
    if math.prod(len(c) + 1 for c in options) > max_trials:
        return None
    trials = itertools.product(*[[None, *choices] for choices in options])
    for changes in sorted(trials, key=lambda t: sum(c is not None for c in t)):
        trial = copy.deepcopy(base)
        try:
            for change in changes:
                if change is not None:
                    set_field(trial, *change)
        except (TypeError, ValueError):  # the config class validates its fields
            continue
        if not _valid(trial):
            continue
        shapes_fit = mismatches(build_shapes(model_class, trial), target) == 0
        if (
            shapes_fit
            and (not buffers or same_computed_values(model, model_class, trial))
            and _reloads_alike(model_class, trial, target)
        ):
            return trial
    return None


def as_loaded(config: Any) -> Any:
    """``config`` as ``from_pretrained`` will read it back: a config class may derive fields
    from others when it loads (Step3p7 keeps the rotary parameters of the layer types present)."""
    try:
        return type(config).from_dict(config.to_dict())
    except Exception:  # a config class that cannot read its own dict: compare as it is
        return config


def _reloads_alike(model_class: type, config: Any, target: Shapes) -> bool:
    """Whether ``config``, saved and read back, still builds ``target``: a class that derives
    a field from another when it loads would otherwise undo a fitted field."""
    loaded = as_loaded(config)
    return loaded is config or mismatches(build_shapes(model_class, loaded), target) == 0


def _valid(config: Any) -> bool:
    """Whether the config class accepts the config as a whole (``save_pretrained`` checks it:
    a hidden size that is not a multiple of the heads is refused even with ``head_dim`` set)."""
    validate = getattr(config, "validate", None)
    try:
        if validate is not None:
            validate()
    except Exception:  # validators raise their own error types
        return False
    return True


def _probes(model: nn.Module, number: int, base: Any) -> list[FieldProbe]:
    """Probes are structural: computed once per model (and base config) and kept on it."""
    cache = model_record(model).setdefault("config_probes", {})
    if number not in cache:
        cache[number] = probe_fields(type(model), base)
    return cache[number]
