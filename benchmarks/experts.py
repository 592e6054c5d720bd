"""Removing whole experts of a mixture-of-experts LM, by criterion.

A tiny Qwen3-MoE (byte-level: 256 tokens, hidden 128, 4 layers of 8 experts, top-2, router
load-balancing loss as transformers computes it) is trained here, seeded, on English Wikipedia
prose (gensim's 2016 sample, from ``make llm-data``) for a fixed number of steps, so routing is
learned rather than random. Then 25% and 50% of every layer's experts are removed one-shot by
each criterion (calibration: 16 blocks of the news text): L2 magnitude of the expert's weights
and router row, routing frequency, REAP (router-weighted expert activation norm), and random
(mean of 3 seeds). Columns: perplexity per byte on held-out Wikipedia, and top-1 next-byte
agreement with the dense model there.

    make llm-data
    .venv/bin/python benchmarks/experts.py --markdown benchmarks/results/experts.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchslim as tp  # noqa: E402
from benchmarks.report import publish  # noqa: E402
from torchslim.hf.text import perplexity  # noqa: E402

TEXT = Path(__file__).resolve().parent.parent / ".cache" / "text"
BLOCK = 256
EVAL_BLOCKS = 32
CALIBRATION_BLOCKS = 16
STEPS = 1000
BATCH = 16
CRITERIA = ("magnitude", "routing_frequency", "reap", "random")
RATIOS = (0.25, 0.5)
RANDOM_SEEDS = (0, 1, 2)


def byte_blocks(path: Path, count: int, skip: int = 0) -> torch.Tensor:
    """``[count, BLOCK]`` byte ids of a UTF-8 file, after ``skip`` blocks."""
    data = torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8).long()
    blocks = data[: len(data) // BLOCK * BLOCK].view(-1, BLOCK)
    if len(blocks) < skip + count:
        raise SystemExit(f"{path} is too short: run `make llm-data`")
    return blocks[skip : skip + count]


def train(steps: int, seed: int = 0) -> nn.Module:
    """The tiny MoE, trained on the start of the Wikipedia text."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        vocab_size=256,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        moe_intermediate_size=128,
        num_experts=8,
        num_experts_per_tok=2,
        output_router_logits=True,
        router_aux_loss_coef=0.01,
    )
    model = Qwen3MoeForCausalLM(config)
    data = byte_blocks(TEXT / "wiki.txt", steps * BATCH // 4, skip=EVAL_BLOCKS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        batch = data[torch.randint(0, len(data), (BATCH,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 250 == 0:
            print(f"step {step}: loss {float(loss.detach()):.3f}", flush=True)
    model.config.output_router_logits = False
    return model.eval()


@torch.no_grad()
def agreement(dense: nn.Module, pruned: nn.Module, blocks: torch.Tensor) -> float:
    """Share of positions where both models predict the same next byte."""
    same = total = 0
    for batch in blocks.split(8):
        a = dense(input_ids=batch, use_cache=False).logits.argmax(-1)
        b = pruned(input_ids=batch, use_cache=False).logits.argmax(-1)
        same += int((a == b).sum())
        total += a.numel()
    return same / total


def prune(
    dense: nn.Module, criterion: str, ratio: float, calibration: torch.Tensor, seed: int = 0
) -> nn.Module:
    model = copy.deepcopy(dense)
    if criterion == "magnitude":
        importance = tp.importance.MagnitudeImportance()
    elif criterion == "random":
        torch.manual_seed(seed)
        importance = tp.importance.RandomImportance()
    else:
        importance = tp.importance.make_importance(criterion)
        with importance.record(model), torch.no_grad():
            for batch in calibration.split(8):
                model(input_ids=batch, use_cache=False)
    tp.pruner.MetaPruner(
        model,
        calibration[:1, :32],
        importance=importance,
        pruning_ratio=0.0,
        pruning_ratio_dict={"experts": ratio},
    ).step()
    return model


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--markdown", type=Path, default=None)
    args = parser.parse_args(argv)
    start = time.time()
    dense = train(args.steps)
    evaluation = byte_blocks(TEXT / "wiki.txt", EVAL_BLOCKS)
    calibration = byte_blocks(TEXT / "news.txt", CALIBRATION_BLOCKS)
    dense_ppl = perplexity(dense, evaluation.split(8))
    lines = [
        "| experts removed | criterion | perplexity (bytes) | top-1 agreement | experts / layer |",
        "|---|---|---|---|---|",
        f"| none (dense) | - | {dense_ppl:.3f} | 100.0% | 8 |",
    ]
    for ratio in RATIOS:
        for criterion in CRITERIA:
            seeds = RANDOM_SEEDS if criterion == "random" else (0,)
            ppls, agreements = [], []
            for seed in seeds:
                model = prune(dense, criterion, ratio, calibration, seed)
                ppls.append(perplexity(model, evaluation.split(8)))
                agreements.append(agreement(dense, model, evaluation))
            left = model.model.layers[0].mlp.experts.num_experts
            mean = "mean of 3 seeds: " if len(seeds) > 1 else ""
            lines.append(
                f"| {ratio:.0%} | {criterion} | {mean}{sum(ppls) / len(ppls):.3f} | "
                f"{100 * sum(agreements) / len(agreements):.1f}% | {left} |"
            )
            print(lines[-1], flush=True)
    footer = (
        f"Tiny Qwen3-MoE trained here for {args.steps} steps (seed 0); perplexity per byte on "
        f"{EVAL_BLOCKS} x {BLOCK} bytes of held-out Wikipedia, calibration on "
        f"{CALIBRATION_BLOCKS} x {BLOCK} bytes of news; {time.time() - start:.0f} s on this "
        "machine (training included)."
    )
    publish(lines, footer, args.markdown)


if __name__ == "__main__":
    main()
