"""Text for causal language models: token blocks from a text file, and perplexity.

Calibration, healing and evaluation all read a text as fixed-length blocks of token ids, so that
every batch has the same shape and a run is deterministic.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Iterable, Optional, Union

import torch
from torch import nn


def token_blocks(
    tokenizer: Any,
    text: Union[str, Path],
    block_size: int = 512,
    max_blocks: Optional[int] = None,
    skip_blocks: int = 0,
) -> torch.Tensor:
    """``[blocks, block_size]`` token ids of ``text`` (a string or a path to a UTF-8 file),
    cut into consecutive blocks; the last partial block is dropped. ``skip_blocks`` leaves the
    first blocks out (e.g. calibration from one part of a file, healing from another)."""
    if isinstance(text, Path):
        text = text.read_text(encoding="utf-8")
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    count = ids.numel() // block_size
    blocks = ids[: count * block_size].view(count, block_size)[skip_blocks:]
    if max_blocks is not None:
        blocks = blocks[:max_blocks]
    if not len(blocks):
        raise ValueError(
            f"the text has {ids.numel()} tokens: not enough for one block of {block_size} "
            f"after skipping {skip_blocks} blocks"
        )
    return blocks


@torch.no_grad()
def perplexity(model: nn.Module, blocks: Union[torch.Tensor, Iterable[torch.Tensor]]) -> float:
    """``exp`` of the mean next-token cross-entropy of a causal LM over the blocks (each block
    predicted from its own start, every token after the first counted once)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in blocks:
            batch = batch.view(-1, batch.shape[-1])
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += targets.numel()
    finally:
        model.train(was_training)
    if not count:
        raise ValueError("perplexity needs at least one block of two or more tokens")
    return math.exp(total / count)
