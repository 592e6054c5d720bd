"""Int attributes and config fields the forward uses as sizes follow the pruning.

Each model here hard-codes a size in an attribute (``self.head_dim``), derives one from several
attributes, reads one from a shared config, ties weights or sizes a tensor from another tensor.
The graph must update what it can infer, refuse what it cannot (naming the attribute), and the
pruned model must stay exact against its zero-masked original.
"""

from __future__ import annotations

import copy
import re
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim as tp
from tests.helpers import assert_exact, build

torch.manual_seed(0)
TOKENS = torch.randn(2, 5, 12)


def _group(graph: tp.DependencyGraph, size: int, root: str) -> tp.Group:
    return next(g for g in graph.all_groups() if g.size == size and g.root.label == root)


class FusedQKV(nn.Module):
    """Phi-3 style: one projection, sliced at ``num_heads * head_dim``; ``num_heads`` itself is
    never a size on its own, so it is solved from the slice bound."""

    def __init__(self, heads: int = 4, kv_heads: int = 2, head_dim: int = 3) -> None:
        super().__init__()
        self.num_heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.qkv = nn.Linear(12, (heads + 2 * kv_heads) * head_dim)
        self.o = nn.Linear(heads * head_dim, 12)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x)
        q_end = self.num_heads * self.head_dim
        kv_end = q_end + self.kv_heads * self.head_dim
        q = qkv[..., :q_end].view(b, n, -1, self.head_dim).transpose(1, 2)
        k = qkv[..., q_end:kv_end].view(b, n, -1, self.head_dim).transpose(1, 2)
        v = qkv[..., kv_end:].view(b, n, -1, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, scale=0.5, enable_gqa=True)
        return self.o(out.transpose(1, 2).reshape(b, n, -1))


def test_solved_attributes_follow_heads_and_offsets():
    graph = assert_exact(FusedQKV(), TOKENS)
    model = copy.deepcopy(graph.model)
    pruned = tp.DependencyGraph().build_dependency(model, TOKENS)
    kv_heads = _group(pruned, 2, "qkv.weight[dim 0]")
    offsets = _group(pruned, 3, "qkv.weight[dim 0]")
    kv_heads.prune([1])
    offsets.prune([0])
    assert (model.num_heads, model.kv_heads, model.head_dim) == (2, 1, 2)
    assert model.qkv.out_features == (2 + 2 * 1) * 2
    assert model(TOKENS).shape == TOKENS.shape
    attrs = [op for step in pruned.history for op in step["ops"] if op["role"] == "attr"]
    assert {op["attr"] for op in attrs} == {"num_heads", "kv_heads", "head_dim"}


class TwoUnknowns(nn.Module):
    """``self.a * self.b`` as a size, neither ever a size by itself: cannot be inferred."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = 3, 4
        self.proj = nn.Linear(12, 12)
        self.out = nn.Linear(12, 12)

    def forward(self, x):
        return self.out(self.proj(x).reshape(x.shape[0], x.shape[1], self.a * self.b))


def test_an_attribute_that_cannot_be_inferred_is_named_in_the_refusal():
    graph = build(TwoUnknowns(), TOKENS)
    group = graph.get_pruning_group(graph.model.proj, tp.prune_linear_out_channels, [0])
    reason = group.refusal()
    assert re.search(r"size from attribute [ab] in Tensor.reshape in <model>", reason), reason
    assert "cannot be inferred" in reason


class SharedAttribute(nn.Module):
    """One attribute sizes a prunable dim and a fixed one: it must stay, so the dim is frozen."""

    def __init__(self) -> None:
        super().__init__()
        self.width = 12
        self.proj = nn.Linear(12, 12)

    def forward(self, x):
        fixed = x.reshape(x.shape[0], x.shape[1], self.width)
        return self.proj(x).view(x.shape[0], x.shape[1], self.width) + fixed


def test_an_attribute_that_also_sizes_a_fixed_dim_freezes_its_channels():
    graph = build(SharedAttribute(), TOKENS)
    group = graph.get_pruning_group(graph.model.proj, tp.prune_linear_out_channels, [0])
    assert "a model input" in group.refusal() or "fixed" in group.refusal()


class ConfigReader(nn.Module):
    """Reads the head size from a config shared with its sibling at every forward."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.proj = nn.Linear(12, 12)
        self.out = nn.Linear(12, 12)

    def forward(self, x):
        heads = self.proj(x).view(*x.shape[:2], -1, self.config.head_size)
        return self.out(heads.flatten(2))


class TwoReaders(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(head_size=4, hidden_size=12)
        self.first = ConfigReader(self.config)
        self.second = ConfigReader(self.config)

    def forward(self, x):
        return self.second(self.first(x))


def test_config_fields_read_in_the_forward_get_a_per_module_copy():
    graph = assert_exact(TwoReaders(), TOKENS)
    model = graph.model
    offsets = _group(graph, 4, "first.proj.weight[dim 0]")
    offsets.prune([1])
    assert model.first.config.head_size == 3
    assert model.second.config.head_size == 4 and model.config.head_size == 4
    assert model.first.config is not model.config and model.second.config is model.config
    assert model.first.config.hidden_size == 12
    assert model(TOKENS).shape == TOKENS.shape


class TiedLM(nn.Module):
    """Input embedding and output head share one weight."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.mix = nn.Linear(8, 8)
        self.head = nn.Linear(8, 20, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.relu(self.mix(self.embed(ids))))


IDS = torch.randint(0, 20, (2, 6))


def test_tied_weights_stay_tied_through_pruning_and_reloading(tmp_path):
    graph = assert_exact(TiedLM(), IDS)
    model = graph.model
    group = graph.get_pruning_group(model.embed, tp.prune_embedding_out_channels, [0, 5])
    assert group.refusal() is None
    group.prune()
    assert model.head.weight is model.embed.weight and model.head.weight.shape == (20, 6)
    assert model.head.in_features == 6 and model(IDS).shape == (2, 6, 20)
    tp.save_pruned(model, tmp_path / "tied.safetensors")
    fresh = tp.load_pruned(TiedLM(), tmp_path / "tied.safetensors")
    assert fresh.head.weight is fresh.embed.weight
    assert torch.equal(fresh(IDS), model(IDS))


def test_plans_replay_attribute_updates(tmp_path):
    model = FusedQKV()
    graph = build(model, TOKENS)
    _group(graph, 3, "qkv.weight[dim 0]").prune([2])
    tp.save_pruned(model, tmp_path / "fused.safetensors")
    fresh = tp.load_pruned(FusedQKV(), tmp_path / "fused.safetensors")
    assert (fresh.num_heads, fresh.kv_heads, fresh.head_dim) == (4, 2, 2)
    assert torch.equal(fresh(TOKENS), model(TOKENS))


class WidthFromInput(nn.Module):
    """Swin style: the head size is the *input* width over the head count, and the attention
    output is reshaped back to the input width: the residual is tied to heads x offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.num_heads = 3
        self.embed = nn.Linear(5, 12)
        self.qkv = nn.Linear(12, 36)
        self.proj = nn.Linear(12, 12)
        self.head = nn.Linear(12, 2)

    def forward(self, x):
        x = self.embed(x)
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v
        return self.head(x + self.proj(attn.transpose(1, 2).reshape(b, n, c)))


def test_a_width_taken_from_another_tensor_couples_it_with_the_heads():
    graph = assert_exact(WidthFromInput(), torch.randn(2, 4, 5))
    residual = graph.get_pruning_group(graph.model.embed, tp.prune_linear_out_channels, [0])
    deps = {dep.target.name for dep, _ in residual}
    assert {"embed", "qkv", "proj", "head"} <= deps, "the residual and the heads go together"
    heads = _group(graph, 3, "embed.weight[dim 0]")
    heads.prune([1])
    assert graph.model.num_heads == 2 and graph.model.embed.out_features == 8


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(6, 24)
        self.attn = nn.MultiheadAttention(24, 4, batch_first=True)
        self.head = nn.Linear(24, 3)

    def forward(self, x):
        h = self.embed(x)
        return self.head(h + self.attn(h, h, h, need_weights=False)[0])


def test_multihead_attention_heads_are_traced_and_its_attributes_follow():
    x = torch.randn(2, 5, 6)
    graph = assert_exact(Encoder(), x)
    model = graph.model
    heads = _group(graph, 4, "embed.weight[dim 0]")
    offsets = _group(graph, 6, "embed.weight[dim 0]")
    assert not heads.mixing, "whole heads keep the attention scale"
    assert any("attention scale" in reason for reason in offsets.mixing)
    heads.prune([0, 3])
    attn = model.attn
    assert (attn.num_heads, attn.head_dim, attn.embed_dim, attn.kdim) == (2, 6, 12, 12)
    assert attn.in_proj_weight.shape == (36, 12) and attn.out_proj.weight.shape == (12, 12)
    assert model(x).shape == (2, 5, 3)


@pytest.mark.parametrize("scale", [None, 0.5])
def test_grouped_query_attention_in_sdpa_couples_values_with_keys(scale):
    class GQA(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q, self.k, self.v = nn.Linear(12, 12), nn.Linear(12, 6), nn.Linear(12, 6)
            self.o = nn.Linear(12, 12)

        def forward(self, x):
            b, n, _ = x.shape
            q = self.q(x).view(b, n, -1, 3).transpose(1, 2)
            k = self.k(x).view(b, n, -1, 3).transpose(1, 2)
            v = self.v(x).view(b, n, -1, 3).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=True)
            return self.o(out.transpose(1, 2).reshape(b, n, -1))

    graph = assert_exact(GQA(), TOKENS)
    group = graph.get_pruning_group(graph.model.v, tp.prune_linear_out_channels, [0, 1, 2])
    deps = {dep.target.name: idxs for dep, idxs in group}
    assert deps["k"] == [0, 1, 2] and deps["q"] == list(range(6)) and deps["o"] == list(range(6))


class Counting(nn.Module):
    """Changes an int attribute and caches a size on itself during the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.proj = nn.Linear(12, 12)

    def forward(self, x):
        self.calls += 1
        self.last_width = x.shape[-1]
        self.last_shape = tuple(x.shape)
        return self.proj(x)


def test_tracing_leaves_attributes_as_they_were():
    model = Counting()
    build(model, TOKENS)
    assert model.calls == 0 and type(model.calls) is int
    assert not hasattr(model, "last_width") and not hasattr(model, "last_shape")
    model(torch.zeros(TOKENS.shape))
    assert type(model.last_width) is int and all(type(s) is int for s in model.last_shape)
