"""Whole residual blocks: found by the graph, scored, removed; configs, plans and the KV cache
follow; models whose blocks cannot go are refused with the reason, untouched."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Iterator

import pytest
import torch
from helpers import tiny_llama
from torch import nn

import torchslim as tp

transformers = pytest.importorskip("transformers")
TOKENS = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(0))


@contextmanager
def skipping(modules: list[nn.Module]) -> Iterator[None]:
    """The reference: the dense model with these blocks passing their input through."""
    handles = [
        m.register_forward_hook(
            lambda _m, args, kw, out: args[0] if args else next(iter(kw.values())), with_kwargs=True
        )
        for m in modules
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _removable(graph: tp.DependencyGraph) -> list[str]:
    return [b.name for b in graph.blocks if b.removable]


def test_the_graph_finds_residual_blocks_and_says_why_others_stay():
    from torchvision.models import resnet18

    graph = tp.DependencyGraph().build_dependency(resnet18().eval(), torch.randn(1, 3, 64, 64))
    assert _removable(graph) == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]
    reasons = {b.name: b.reason for b in graph.blocks}
    assert reasons["layer2.0"] == "its output [1, 128, 8, 8] differs from its input [1, 64, 16, 16]"
    assert "not a residual block" in reasons["layer2.0.downsample.1"]  # a BatchNorm


def _gemma() -> nn.Module:
    config = transformers.Gemma3TextConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        sliding_window=4,
        layer_types=["sliding_attention", "full_attention"] * 2,
    )
    torch.manual_seed(0)
    return transformers.Gemma3ForCausalLM(config).eval()


@pytest.mark.parametrize("make", [lambda: tiny_llama(4), _gemma], ids=["llama", "gemma3"])
def test_removed_decoder_layers_reload_and_generate_with_the_kv_cache(make, tmp_path):
    model = make()
    dense = copy.deepcopy(model)
    types = list(getattr(model.config, "layer_types", None) or [])
    result = tp.prune_blocks(model, TOKENS, n=2, calibration=[TOKENS, TOKENS.flip(1)])
    gone = [int(name.rsplit(".", 1)[1]) for name in result.removed]
    assert len(gone) == 2 and set(result.scores) == {f"model.layers.{i}" for i in range(4)}
    assert sorted(result.scores[n] for n in result.removed) == sorted(result.scores.values())[:2]
    assert model.config.num_hidden_layers == 2 and len(model.model.layers) == 2
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1]
    if types:
        assert model.config.layer_types == [t for i, t in enumerate(types) if i not in gone]
    with torch.no_grad():
        got = model(TOKENS).logits
        with skipping([dense.model.layers[i] for i in gone]):
            expected = dense(TOKENS).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, got)
        mask = torch.ones_like(TOKENS)
        kwargs = dict(attention_mask=mask, max_new_tokens=6, do_sample=False)
        generated = reloaded.generate(TOKENS, **kwargs)
        assert torch.equal(generated, model.generate(TOKENS, **kwargs))
        cacheless = model.generate(TOKENS, use_cache=False, **kwargs)
    assert torch.equal(generated, cacheless)  # the KV cache slots follow the layers


def test_blocks_compose_with_per_layer_widths_through_plans_and_checkpoints(tmp_path):
    model = tiny_llama(4)
    dense = copy.deepcopy(model)
    tp.prune_blocks(model, TOKENS, n=1)
    graph = tp.DependencyGraph().build_dependency(model, TOKENS)
    groups = [g for g in graph.get_all_groups() if g.size == 64]
    groups[0].prune(list(range(16)))  # one layer narrower than the others: no plain config
    with torch.no_grad():
        got = model(TOKENS).logits
    assert model.config.num_hidden_layers == 3

    model.save_pretrained(tmp_path / "hf")
    reloaded = tp.hf.from_pretrained(tmp_path / "hf").eval()
    assert reloaded.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, got)
        mask = torch.ones_like(TOKENS)
        assert reloaded.generate(TOKENS, attention_mask=mask, max_new_tokens=3).shape == (2, 13)

    tp.save_pruned(model, tmp_path / "plan.safetensors")
    loaded = tp.load_pruned(dense, tmp_path / "plan.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(TOKENS).logits, got)
    with pytest.raises(tp.CheckpointError, match="holds 3 blocks, the plan expects 4"):
        tp.load_pruned(copy.deepcopy(model), tmp_path / "plan.safetensors")


def test_vision_blocks_go_by_influence_or_a_measured_loss():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8).eval()
    x = torch.randn(2, 3, 32, 32)
    dense = copy.deepcopy(model)
    with torch.no_grad():
        model.blocks[5].attn.proj.weight.zero_()  # block 5 adds (almost) nothing: x + mlp(x)
        model.blocks[5].mlp.fc2.weight.zero_()
        model.blocks[5].mlp.fc2.bias.zero_()
        model.blocks[5].attn.proj.bias.zero_()
    dense = copy.deepcopy(model)
    result = tp.prune_blocks(model, x, n=1)
    assert result.removed == ["blocks.5"] and result.scores["blocks.5"] < 1e-12
    assert len(model.blocks) == 11

    target = dense(x).detach()

    def loss(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m(x) - target).pow(2).mean())

    again = copy.deepcopy(dense)
    result = tp.prune_blocks(again, x, ratio=0.25, importance=loss)
    assert len(result.removed) == 3 and "blocks.5" in result.removed
    assert sorted(result.scores, key=result.scores.get)[:3] == result.removed
    with torch.no_grad():
        with skipping([dense.blocks[int(n.split(".")[1])] for n in result.removed]):
            expected = dense(x)
        torch.testing.assert_close(again(x), expected)
    seeded = [
        tp.prune_blocks(copy.deepcopy(dense), x, n=2, importance="random", seed=3).removed
        for _ in range(2)
    ]
    assert seeded[0] == seeded[1]


class _ReadsMiddle(nn.Module):
    """A feature pyramid: the output of block 1 is read by the head besides block 2."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Residual() for _ in range(3))
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        x = self.blocks[0](x)
        middle = self.blocks[1](x)
        return self.head(self.blocks[2](middle) + middle)


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        return x + self.fc(x).relu()


def test_blocks_that_cannot_go_are_refused_with_the_reason_and_the_model_untouched():
    model = _ReadsMiddle().eval()
    x = torch.randn(3, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    graph = tp.DependencyGraph().build_dependency(model, x)
    reasons = {b.name: b.reason for b in graph.blocks}
    assert reasons["blocks.0"] is None and reasons["blocks.2"] is None
    assert reasons["blocks.1"].startswith("its output is read by Tensor.add in <model>")
    with pytest.raises(
        ValueError, match=r"only 2 can be removed \(the others: blocks.1: its output is read by"
    ):
        tp.prune_blocks(model, x, n=3)
    assert len(model.blocks) == 3
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="exactly one of n"):
        tp.prune_blocks(model, x)
    with pytest.raises(ValueError, match="importance must be one of"):
        tp.prune_blocks(model, x, n=1, importance="cosine")
    widening = nn.Sequential(nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 32))
    reasons = {b.name: b.reason for b in tp.DependencyGraph().build_dependency(widening, x).blocks}
    assert reasons["0"] == "its output [3, 32] differs from its input [3, 16]"
    assert reasons["1"] == "no addition inside it reads its input (it is not a residual block)"


def test_resnet_blocks_go_and_the_rest_computes_as_before():
    from torchvision.models import resnet18

    model = resnet18().eval()
    dense = copy.deepcopy(model)
    x = torch.randn(2, 3, 64, 64)
    result = tp.prune_blocks(model, x, n=2)
    gone = [dense.get_submodule(name) for name in result.removed]
    assert len(gone) == 2 and sum(len(getattr(model, f"layer{i}")) for i in range(1, 5)) == 6
    with torch.no_grad(), skipping(gone):
        expected = dense(x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


class _Body(nn.Module):
    """An EDSR-style block: ``x + body(x)`` where the body is itself a Sequential."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16))

    def forward(self, x):
        return x + self.body(x)


def test_a_block_whose_body_is_a_container_is_still_a_residual_block():
    model = nn.Sequential(nn.Linear(8, 16), _Body(), _Body(), nn.Linear(16, 2)).eval()
    x = torch.randn(4, 8)
    graph = tp.DependencyGraph().build_dependency(model, x)
    reasons = {b.name: b.reason for b in graph.blocks}
    assert reasons["1"] is None and reasons["2"] is None
    assert "not a residual block" in reasons["1.body.0"]
    dense = copy.deepcopy(model)
    result = tp.prune_blocks(model, x, n=1, importance="random")
    with torch.no_grad(), skipping([dense.get_submodule(result.removed[0])]):
        torch.testing.assert_close(model(x), dense(x), rtol=0, atol=0)


class _CountsItsBlocks(nn.Module):
    """A forward that needs all its blocks (a count the trace cannot see)."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Residual() for _ in range(3))

    def forward(self, x):
        assert len(self.blocks) == 3, "three blocks expected"
        for block in self.blocks:
            x = block(x)
        return x


def test_a_removal_that_breaks_the_forward_is_undone_and_named():
    model = _CountsItsBlocks().eval()
    x = torch.randn(2, 16)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"removing blocks\.\d breaks the model \(.*three blocks"):
        tp.prune_blocks(model, x, n=1)
    assert len(model.blocks) == 3 and not tp.graph.record.model_history(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        model(x)
