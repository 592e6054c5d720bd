"""What torchslim keeps on a model it pruned: one plain dict under one attribute.

``model._torchslim`` travels with the model (``copy.deepcopy``, ``torch.save``; being plain
data, a saved model loads where torchslim is not installed) and holds:

- ``"history"``: the pruning steps applied, the plan :func:`torchslim.save_pruned` writes
  (so a model can be saved without the graph that pruned it);
- ``"size_attributes"``: ``"module:attribute"`` of the int attributes its forward uses as
  sizes, found while tracing;
- ``"dense_config"``: a Hugging Face model's config before its first pruning step;
- ``"config_probes"``: which config fields size which tensors, computed once per model.
"""

from __future__ import annotations

from typing import Any

from torch import nn

RECORD_ATTRIBUTE = "_torchslim"


def model_record(model: nn.Module) -> dict[str, Any]:
    """The model's record, created empty on first use."""
    return model.__dict__.setdefault(RECORD_ATTRIBUTE, {})


def recorded(model: nn.Module, key: str, default: Any = None) -> Any:
    """One entry of the model's record, without creating anything."""
    return model.__dict__.get(RECORD_ATTRIBUTE, {}).get(key, default)


def model_history(model: nn.Module) -> list[dict[str, Any]]:
    """The steps applied to ``model`` so far (a list the graph appends to)."""
    return model_record(model).setdefault("history", [])
