"""Hugging Face transformers: configs that follow pruning, and loading pruned checkpoints.

Importing torchslim registers :func:`~torchslim.hf.sync.after_pruning` with the dependency graph;
it does nothing for models that are not ``transformers.PreTrainedModel`` instances.
"""

from torchslim.graph.dependency import PRUNE_LISTENERS
from torchslim.hf.checkpoint import from_pretrained
from torchslim.hf.config import fitting_config
from torchslim.hf.sync import RECORD_KEY, after_pruning, is_hf_model, sync_config

if after_pruning not in PRUNE_LISTENERS:
    PRUNE_LISTENERS.append(after_pruning)

__all__ = [
    "RECORD_KEY",
    "fitting_config",
    "from_pretrained",
    "is_hf_model",
    "sync_config",
]
