"""Find the Hugging Face config that describes a pruned model.

After pruning, a ``PreTrainedModel``'s ``config`` still describes the dense widths. The config
that fits is found without per-model tables: the model's class is built on the ``meta`` device
(no memory, milliseconds) from trial configs, and a trial fits when it builds exactly the pruned
model's parameter shapes. Which field moves which shapes is learnt once per model by *probing*:
doubling one int field at a time (``hidden_size``, ``num_attention_heads``, ``head_dim``, ...).
The pruned shapes then suggest values for each field, and the combinations of those
suggestions are tried until one builds the pruned shapes exactly. Models pruned to different widths per
layer have no such config; :func:`fitting_config` returns ``None`` for them.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import nn

Shapes = dict[str, Any]

#: Fields that many model classes read with ``getattr(config, name, default)``: probed even when
#: the config does not set them, because setting them is how per-head widths become expressible.
OPTIONAL_FIELDS = {"head_dim": lambda c: _derived_head_dim(c)}
PROBE_ATTRIBUTE = "_torchslim_config_probe"


def _derived_head_dim(config: Any) -> Optional[int]:
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    if isinstance(hidden, int) and isinstance(heads, int) and heads and hidden % heads == 0:
        return hidden // heads
    return None


def model_shapes(model: nn.Module) -> Shapes:
    """Shapes of every parameter and persistent buffer, by state-dict name, and every module's
    public int attributes (``num_heads``, ``head_dim``): equal shapes can hide a different
    split into heads, so both must match."""
    shapes: Shapes = {name: tuple(t.shape) for name, t in model.state_dict(keep_vars=True).items()}
    for name, module in model.named_modules():
        for attribute, value in vars(module).items():
            if type(value) is int and not attribute.startswith("_"):
                shapes[f"{name}:{attribute}"] = (value,)
    return shapes


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
    rejects the config."""
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        with parameters_on_meta() if buffers else torch.device("meta"):
            return model_class(config)
    except Exception:  # a trial config the class rejects is simply not a candidate
        return None
    finally:
        logging.set_verbosity(verbosity)


def build_shapes(model_class: type, config: Any) -> Optional[Shapes]:
    """The shapes ``model_class(config)`` has; ``None`` if it cannot build."""
    built = build(model_class, config)
    return None if built is None else model_shapes(built)


def same_computed_buffers(model: nn.Module, model_class: type, config: Any) -> bool:
    """Whether the buffers a class computes at construction and does not save (rotary
    frequencies) come out as in ``model``: pruning can remove some of them, which a config
    cannot express."""
    built = build(model_class, config, buffers=True)
    if built is None:
        return False
    saved = set(model.state_dict().keys())
    mine = {n: b for n, b in model.named_buffers() if n not in saved}
    theirs = dict(built.named_buffers())
    return all(
        name in theirs
        and theirs[name].shape == buffer.shape
        and (buffer.device.type == "meta" or torch.equal(theirs[name], buffer.to(theirs[name])))
        for name, buffer in mine.items()
    )


def mismatches(built: Optional[Shapes], target: Shapes) -> float:
    """Number of differing dims plus missing or extra tensors (inf if it did not build)."""
    if built is None:
        return math.inf
    count = len(built.keys() ^ target.keys())
    for name in built.keys() & target.keys():
        a, b = built[name], target[name]
        count += sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
    return count


@dataclass
class FieldProbe:
    """How one config field moves shapes: ``(tensor, dim) -> size ratio`` when it doubles."""

    name: str
    value: int
    ratios: dict[tuple[str, int], float]


def probe_fields(model_class: type, config: Any) -> list[FieldProbe]:
    """Double each int field of ``config`` once and record which dims follow it."""
    base = build_shapes(model_class, config)
    if base is None:
        return []
    fields = {k: v for k, v in vars(config).items() if type(v) is int and v > 0}
    for name, default in OPTIONAL_FIELDS.items():
        if getattr(config, name, None) is None and default(config) is not None:
            fields[name] = default(config)
    probes = []
    for name, value in fields.items():
        trial = copy.deepcopy(config)
        setattr(trial, name, 2 * value)
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


def _suggestions(probe: FieldProbe, current: Shapes, target: Shapes) -> list[int]:
    """Values of a field that the target shapes imply through dims proportional to it."""
    votes: Counter[int] = Counter()
    for (key, d), ratio in probe.ratios.items():
        if key not in target or key not in current or current[key][d] == target[key][d]:
            continue
        was, now = current[key][d], target[key][d]
        if ratio == 2 and (probe.value * now) % was == 0:
            votes[probe.value * now // was] += 1
        elif ratio == 0.5 and now and (probe.value * was) % now == 0:
            votes[probe.value * was // now] += 1
    return [value for value, _ in votes.most_common(3) if value > 0]


def fitting_config(model: nn.Module, dense_config: Any, max_trials: int = 4096) -> Optional[Any]:
    """A copy of ``dense_config`` under which ``type(model)`` builds exactly ``model``'s shapes,
    or ``None`` when no such config exists (widths that differ from layer to layer).

    Every combination of suggested field values is tried, fewest changes first (fields are
    coupled: a pruned ``q_proj`` may mean fewer heads or a smaller ``head_dim``)."""
    model_class = type(model)
    target = model_shapes(model)
    dense_shapes = build_shapes(model_class, dense_config)
    if mismatches(dense_shapes, target) == 0:
        fits = same_computed_buffers(model, model_class, dense_config)
        return copy.deepcopy(dense_config) if fits else None
    options = [
        [(probe.name, value) for value in _suggestions(probe, dense_shapes, target)]
        for probe in _probes(model, model_class, dense_config)
    ]
    options = [choices for choices in options if choices]
    if not options or math.prod(len(c) + 1 for c in options) > max_trials:
        return None
    trials = itertools.product(*[[None, *choices] for choices in options])
    for changes in sorted(trials, key=lambda t: sum(c is not None for c in t)):
        trial = copy.deepcopy(dense_config)
        for change in changes:
            if change is not None:
                setattr(trial, *change)
        if mismatches(build_shapes(model_class, trial), target) == 0:
            return trial if same_computed_buffers(model, model_class, trial) else None
    return None


def _probes(model: nn.Module, model_class: type, dense_config: Any) -> list[FieldProbe]:
    """Probes are structural: computed once per model and kept on it."""
    cached = model.__dict__.get(PROBE_ATTRIBUTE)
    if cached is None:
        cached = probe_fields(model_class, dense_config)
        model.__dict__[PROBE_ATTRIBUTE] = cached
    return cached
