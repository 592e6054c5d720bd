"""Resolve the MODEL argument of the CLI: a torchvision or timm name, ``package.module:factory``,
a whole-model ``.pt`` file (pickled code: only with ``--trust-pickle``), any of these followed by
``@pruned.safetensors``, or a local Hugging Face folder (``config.json`` + weights, optionally
as ``AutoModelForX:folder`` to choose the class)."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from torchslim.hf import from_pretrained, is_hf_model
from torchslim.persistence import CheckpointError, load_pruned
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
    folder = hf_folder_of(spec)
    if folder is not None:
        return load_hf_folder(folder, "" if Path(spec) == folder else spec.partition(":")[0])
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


def is_hf_folder(path: Path) -> bool:
    """A folder that ``save_pretrained`` wrote (or a hub snapshot): it has a ``config.json``."""
    return path.is_dir() and (path / "config.json").is_file()


def hf_folder_of(spec: str) -> Optional[Path]:
    """The Hugging Face folder MODEL names, if it names one."""
    for candidate in (spec, spec.partition(":")[2]):
        if candidate and is_hf_folder(Path(candidate)):
            return Path(candidate)
    return None


def load_hf_folder(path: Path, class_name: str = "") -> nn.Module:
    """The model of a local Hugging Face folder, by transformers' own loading (a folder pruned
    to per-layer widths too); the class is ``class_name`` or the one its config names."""
    try:
        import transformers
    except ImportError:
        raise ModelNotFound(
            f"{path} is a Hugging Face folder, and transformers is not installed "
            "(pip install transformers)"
        ) from None
    model_class = None
    if class_name:
        model_class = getattr(transformers, class_name, None)
        if model_class is None or not hasattr(model_class, "from_pretrained"):
            raise ModelNotFound(
                f"transformers has no model class {class_name!r} (as in "
                f"AutoModelForCausalLM:{path})"
            )
    try:
        return from_pretrained(path, model_class, local_files_only=True).eval()
    except CheckpointError:
        raise
    except ValueError as error:
        raise ModelNotFound(
            f"{path}: {error}; name the class as in AutoModelForCausalLM:{path}"
        ) from error


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


def takes_token_ids(model: nn.Module) -> bool:
    """A Hugging Face model whose main input is ``input_ids`` (a language model), or a model
    whose first layer is an ``nn.Embedding``."""
    if is_hf_model(model):
        return model.main_input_name == "input_ids"
    first = next((m for m in model.modules() if not next(m.children(), None)), None)
    return isinstance(first, nn.Embedding)


def default_shape(model: nn.Module, tokens: bool) -> tuple[int, ...]:
    """The example shape when ``--input-shape`` is not given: 16 tokens, a Hugging Face vision
    model's own image size, or an ImageNet image."""
    if tokens:
        return (1, 16)
    config = getattr(model, "config", None)
    size = getattr(config, "image_size", None)
    if isinstance(size, int):
        return (1, getattr(config, "num_channels", 3), size, size)
    return (1, 3, 224, 224)


def vocabulary(model: nn.Module) -> int:
    """How many token ids the model's first embedding takes."""
    embedding = getattr(model, "get_input_embeddings", lambda: None)()
    if embedding is None:
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    if embedding is None:
        raise ValueError(
            "--input-dtype long needs an nn.Embedding to size the token ids, and this model "
            "has none: give --input-dtype float"
        )
    return embedding.num_embeddings


def tensor_output(model: nn.Module) -> nn.Module:
    """``model`` as a module returning one tensor, for timing and ONNX export: a Hugging Face
    model's first output (logits, last hidden state), without the key/value cache, and for
    token inputs with an explicit all-ones attention mask (without one transformers looks for
    packed sequences with an op ONNX does not have)."""
    if not is_hf_model(model):
        return model
    options = {"return_dict": False}
    if getattr(model.config, "use_cache", None) is not None:
        options["use_cache"] = False
    return _FirstOutput(model, options, takes_token_ids(model))


class _FirstOutput(nn.Module):
    def __init__(self, model: nn.Module, options: dict[str, bool], masked: bool) -> None:
        super().__init__()
        self.model, self.options, self.masked = model, options, masked

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        mask = {"attention_mask": torch.ones_like(inputs)} if self.masked else {}
        return self.model(inputs, **mask, **self.options)[0]
