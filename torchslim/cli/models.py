"""Resolve the MODEL argument of the CLI: a torchvision or timm name, ``package.module:factory``,
a whole-model ``.pt`` file (pickled code: only with ``--trust-pickle``), or any of these
followed by ``@pruned.safetensors``."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import torch
from torch import nn

from torchslim.persistence import load_pruned
from torchslim.zoo import build_torchvision, torchvision_names


class ModelNotFound(ValueError):
    """MODEL names nothing torchslim can build."""


def load_model(spec: str, trust_pickle: bool = False) -> nn.Module:
    """Build the model named by ``spec`` with random weights (nothing is downloaded).

    ``ARCH@checkpoint.safetensors`` builds ARCH and applies a pruned checkpoint written by
    ``torchslim prune`` (its plan, then its weights)."""
    if "@" in spec:
        base, _, checkpoint = spec.rpartition("@")
        return load_pruned(load_model(base, trust_pickle), checkpoint).eval()
    path = Path(spec)
    if path.suffix in (".pt", ".pth") and not path.exists():
        raise ModelNotFound(f"no such file: {spec}")
    if path.suffix in (".pt", ".pth"):
        if not trust_pickle:
            raise ModelNotFound(
                f"{spec} is a pickled model: loading it runs code from the file. Pass "
                "--trust-pickle if you trust it, or use a package.module:factory"
            )
        model = torch.load(path, weights_only=False)
        if not isinstance(model, nn.Module):
            raise ModelNotFound(f"{spec} holds a {type(model).__name__}, not a whole nn.Module")
        return model.eval()
    if ":" in spec:
        module_name, _, factory = spec.partition(":")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ModelNotFound(f"cannot import {module_name!r}: {error}") from error
        builder = getattr(module, factory, None)
        if builder is None:
            raise ModelNotFound(f"{module_name} has no attribute {factory!r}")
        return _built(spec, builder)
    if any(name == spec for _, name in torchvision_names()):
        return build_torchvision(spec).model
    try:
        import timm
    except ImportError:
        timm = None
    if timm is not None and timm.is_model(spec):
        return timm.create_model(spec, pretrained=False).eval()
    if timm is None:
        raise ModelNotFound(
            f"unknown model {spec!r}: not a torchvision name, and timm is not installed to "
            "look it up there (pip install timm); or give package.module:factory or a .pt file"
        )
    raise ModelNotFound(
        f"unknown model {spec!r}: give a torchvision or timm name, package.module:factory, "
        "or a .pt file"
    )


def _built(spec: str, builder: object) -> nn.Module:
    """``builder()``: a factory taking no arguments that returns a module."""
    if not callable(builder):
        raise ModelNotFound(f"{spec} is a {type(builder).__name__}, not a model factory")
    try:
        required = [
            name
            for name, p in inspect.signature(builder).parameters.items()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        required = []
    if required:
        raise ModelNotFound(
            f"{spec} needs arguments ({', '.join(required)}): MODEL must be a factory that "
            "takes none (write one in your package that calls it)"
        )
    model = builder()
    if not isinstance(model, nn.Module):
        raise ModelNotFound(f"{spec} returned a {type(model).__name__}, not a torch.nn.Module")
    return model.eval()


def parse_shape(text: str) -> tuple[int, ...]:
    """``1,3,224,224`` or ``1x3x224x224`` -> a shape tuple."""
    parts = text.replace("x", ",").split(",")
    try:
        shape = tuple(int(p) for p in parts if p.strip())
    except ValueError as error:
        raise ValueError(
            f"--input-shape must be integers like 1,3,224,224, got {text!r}"
        ) from error
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"--input-shape must be positive integers, got {text!r}")
    return shape
