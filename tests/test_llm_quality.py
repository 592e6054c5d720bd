"""Opt-in check on a real pretrained LLM (SmolLM2-135M from ``make llm-data``): calibrated
pruning with reconstruction keeps more of what the model knows than without it."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import torchslim as tp

CACHE = Path(__file__).resolve().parent.parent / ".cache"
MODEL = CACHE / "smollm2-135m"

pytestmark = pytest.mark.skipif(
    not (MODEL / "config.json").is_file() or not (CACHE / "text" / "news.txt").is_file(),
    reason="SmolLM2-135M and its texts are not in .cache: run `make llm-data`",
)


def test_reconstruction_lowers_the_perplexity_of_a_pruned_smollm2():
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL)
    dense = transformers.AutoModelForCausalLM.from_pretrained(MODEL).eval()
    calibration = list(tp.hf.token_blocks(tokenizer, CACHE / "text" / "news.txt", 256, 8).split(2))
    evaluation = tp.hf.token_blocks(tokenizer, CACHE / "text" / "wiki.txt", 256, 2)
    results = {}
    for reconstruct in (False, True):
        model = copy.deepcopy(dense)
        wanda = tp.importance.WandaImportance()
        with wanda.record(model), torch.no_grad():
            for batch in calibration:
                model(input_ids=batch, use_cache=False)
        pruner = tp.pruner.MetaPruner(
            model,
            calibration[0][:1, :32],
            importance=wanda,
            pruning_ratio=0.0,
            pruning_ratio_dict={"heads": 1 / 3},
            ignored_layers=[model.lm_head],
        )
        pruner.step(reconstruct=calibration if reconstruct else None)
        assert model.config.num_key_value_heads == 2 and model.config.num_attention_heads == 6
        results[reconstruct] = tp.hf.perplexity(model, evaluation.split(1))
    dense_ppl = tp.hf.perplexity(dense, evaluation.split(1))
    assert dense_ppl < results[True] < 0.5 * results[False]
