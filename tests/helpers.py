"""Shared test helpers: exactness assertions used by the op-rule, fuzz and zoo tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import torchslim as tp
from torchslim.verify import random_selections


def build(model: nn.Module, inputs: Any, **kwargs: Any) -> tp.DependencyGraph:
    return tp.DependencyGraph().build_dependency(model.eval(), example_inputs=inputs, **kwargs)


def assert_exact(
    model: nn.Module,
    inputs: Any,
    *,
    ratio: float = 0.3,
    min_groups: int = 1,
    per_group: bool = True,
    graph: Optional[tp.DependencyGraph] = None,
) -> tp.DependencyGraph:
    """Prune a random ``ratio`` of every prunable group and check the exactness guarantee:
    every group without a channel-mixing op matches its zero-masked original; pruning all of
    them together keeps the forward running with the original output shapes."""
    graph = graph or build(model, inputs)
    selections = random_selections(graph, ratio=ratio, seed=0)
    assert len(selections) >= min_groups, f"only {len(selections)} prunable groups"
    report = tp.verify(graph, inputs, selections, per_group=per_group)
    assert report.ok, str(report)
    pruned = copy.deepcopy(graph)
    reference_shapes = [t.shape for t in _outputs(graph.model, inputs)]
    with pruned.deferred():
        for group, idxs in selections:
            pruned.group_like(group).prune(idxs)
    assert [t.shape for t in _outputs(pruned.model, inputs)] == reference_shapes
    return graph


def _outputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    from torchslim.spaces.trace import iter_tensors

    with torch.no_grad():
        out = model(*inputs) if isinstance(inputs, tuple) else model(inputs)
    return list(iter_tensors(out))


def group_sizes(graph: tp.DependencyGraph) -> list[int]:
    return sorted(g.size for g in graph.get_all_groups(root_module_types=(nn.Module,)))


#: the shape of the tiny decoder LLMs of the tests (vocabulary 97, hidden 32, 64 MLP neurons
#: per layer, 4 query and 2 KV heads), any transformers config class
TINY_LM = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_key_value_heads=2,
)


def tiny_llama(layers: int = 2, **extra: Any) -> nn.Module:
    """A random ``LlamaForCausalLM`` of :data:`TINY_LM`'s shape, seeded, in eval mode."""
    import transformers

    config = transformers.LlamaConfig(**TINY_LM, num_hidden_layers=layers, **extra)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_step3p7(layers: int = 3) -> nn.Module:
    """A random ``Step3p7TextModel`` (dense MLPs), seeded, whose attention layers are built
    from ``config.per_layer_config[i]``; its sliding-window layer 1 has 2 heads where the others
    have 4, so its config is heterogeneous before any pruning."""
    from transformers.models.step3p7 import configuration_step3p7, modeling_step3p7

    config = configuration_step3p7.Step3p7TextConfig(
        **TINY_LM,
        head_dim=8,
        num_hidden_layers=layers,
        mlp_layer_types=["dense"] * layers,
        layer_types=["sliding_attention" if i == 1 else "full_attention" for i in range(layers)],
        sliding_window=4,
        num_sliding_attention_heads=2,
    )
    torch.manual_seed(0)
    return modeling_step3p7.Step3p7TextModel(config).eval()


WORDS = "the quick brown fox jumps over the lazy dog while a small cat sleeps in the sun. " * 40


def tiny_llama_folder(path: Path) -> Path:
    """:func:`tiny_llama` saved by ``save_pretrained`` into ``path``, with a word-level
    tokenizer of :data:`WORDS` (trained here, nothing downloaded)."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tiny_llama().save_pretrained(path)
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([WORDS], trainers.WordLevelTrainer(special_tokens=["<unk>"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(path)
    return path


def group_signatures(graph) -> list[tuple]:
    """Everything a graph says about its groups: members and positions, prunable positions,
    mixing labels and the refusal of the first position."""
    return [
        (
            str(group),
            [int(i) for i in group.prunable_idxs],
            sorted(group.mixing),
            str(group.refusal([0]) if group.prunable_idxs else ""),
        )
        for group in graph.all_groups()
    ]
