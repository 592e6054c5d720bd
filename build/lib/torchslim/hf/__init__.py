"""Hugging Face transformers: configs that follow pruning, loading pruned checkpoints, text
blocks and perplexity, and healing a pruned causal LM.

Importing torchslim registers :func:`~torchslim.hf.sync.after_pruning` as a prune hook
(:mod:`torchslim.graph.hooks`);
it does nothing for models that are not ``transformers.PreTrainedModel`` instances.
"""

from torchslim.graph.hooks import register_prune_hook
from torchslim.hf.checkpoint import from_pretrained
from torchslim.hf.config import fitting_config
from torchslim.hf.folder import compact_plan, save_pretrained
from torchslim.hf.heal import HealingLog, distillation_loss, heal
from torchslim.hf.stream import StreamReport, prune_checkpoint
from torchslim.hf.sync import RECORD_KEY, after_pruning, is_hf_model, sync_config
from torchslim.hf.text import perplexity, token_blocks

register_prune_hook(after_pruning)

__all__ = [
    "RECORD_KEY",
    "HealingLog",
    "StreamReport",
    "compact_plan",
    "distillation_loss",
    "fitting_config",
    "from_pretrained",
    "heal",
    "is_hf_model",
    "perplexity",
    "prune_checkpoint",
    "save_pretrained",
    "sync_config",
    "token_blocks",
]
