"""Pruned models keep running: sizes compared in the forward, size lists in attributes, caches
filled by the forward, weight norm and spectral norm, and ratios on widths split into factors."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_exact, build
from torch import nn

import torchslim as tp
from torchslim.graph.checkpoint import Checkpoint
from torchslim.pruning.journal import journaled

PARAM = nn.utils.parametrizations


class AssertsChannels(nn.Module):
    """diffusers' Upsample2D / Downsample2D: ``assert x.shape[1] == self.channels``."""

    def __init__(self, channels: int, literal: bool = False) -> None:
        super().__init__()
        self.channels = channels
        self.literal = literal

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.literal:
            assert x.shape[1] == 16
        else:
            assert x.shape[1] == self.channels
        return x * 2


class DoublesWide(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.shape[1] > 8 else x


def _sandwich(middle: nn.Module, width: int = 16) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), middle, nn.Conv2d(width, 4, 1))


def _prune(model: nn.Module, inputs: torch.Tensor, ratio: float = 0.5, **kwargs) -> nn.Module:
    tp.pruner.MagnitudePruner(model.eval(), inputs, pruning_ratio=ratio, **kwargs).step()
    return model


def test_an_attribute_compared_with_a_size_follows_the_pruned_channels():
    x = torch.randn(1, 3, 8, 8)
    model = _sandwich(AssertsChannels(16))
    assert_exact(model, x)
    _prune(model, x)
    assert model[0].out_channels == 8 and model[1].channels == 8
    assert model(x).shape == (1, 4, 8, 8)


def test_a_size_compared_with_a_literal_freezes_its_channels_naming_the_comparison():
    x = torch.randn(1, 3, 8, 8)
    model = _sandwich(AssertsChannels(16, literal=True))
    graph = build(model, x)
    assert not list(graph.get_all_groups())
    reasons = {r for c in graph.analysis.couplings.values() for r in c.frozen.values()}
    assert any("a size compared with 16 in 1" in r for r in reasons), reasons
    _prune(model, x)
    assert model(x).shape == (1, 4, 8, 8)


def test_pruning_that_would_flip_a_comparison_is_refused_with_the_comparison_named():
    x = torch.randn(1, 3, 8, 8)
    model = _sandwich(DoublesWide())
    (group,) = list(build(model, x).get_all_groups())
    assert group.refusal(list(range(7))) is None  # 9 channels left: still wider than 8
    reason = group.refusal(list(range(8)))
    assert "`size(16) > 8` (now True) in 1" in reason
    with pytest.warns(UserWarning, match=r"7 of the 8 channels asked removed \(.*size\(16\) > 8"):
        _prune(model, x)  # 50% would leave 8: refused, the most that keeps the outcome taken
    assert model[0].out_channels == 9


class SplitsBySizes(nn.Module):
    """timm's InceptionDWConv2d with equal branches: ``split(x, self.split_indexes)``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.split_indexes = (width // 4,) * 4
        self.branch = nn.Conv2d(width // 4, width // 4, 3, padding=1, groups=width // 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b, c, d = torch.split(x, self.split_indexes, dim=1)
        return torch.cat([a, self.branch(b), c, d], dim=1)


def test_equal_split_sizes_held_in_an_attribute_all_follow_pruning():
    x = torch.randn(1, 3, 8, 8)
    model = _sandwich(SplitsBySizes(16))
    assert_exact(model, x)
    _prune(model, x)
    assert model[1].split_indexes == (2, 2, 2, 2)
    assert model(x).shape == (1, 4, 8, 8)


class CachesBias(nn.Module):
    """timm's EfficientFormerV2 attention: a bias gathered from a parameter, cached in eval."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(width, 1, 1))
        self.cache: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            if "bias" not in self.cache:
                self.cache["bias"] = self.bias * 1.0
            return x + self.cache["bias"]
        return x + self.bias


def test_a_cache_the_traced_forward_fills_is_left_as_it_was():
    x = torch.randn(1, 3, 8, 8)
    model = _sandwich(CachesBias(16))
    _prune(model, x)
    assert model[1].cache == {} and model[1].bias.shape == (8, 1, 1)
    assert model(x).shape == (1, 4, 8, 8)


class DecodesOnAGrid(nn.Module):
    """Like ultralytics' Detect: a grid rebuilt when the input shape differs from the one
    stored on the module (a class attribute until the first forward sets it)."""

    shape = None

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.grid = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.shape != y.shape:
            self.grid, self.shape = torch.arange(y.shape[-1], dtype=y.dtype), y.shape
        return y + self.grid


def test_attributes_the_traced_forward_adds_are_taken_away_again():
    model = DecodesOnAGrid()  # never run before the trace
    tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 5, 5))
    assert "shape" not in vars(model) and model.grid.numel() == 0
    assert model(torch.randn(1, 3, 5, 5)).shape == (1, 8, 5, 5)


NORMS = {
    "weight_norm hook": nn.utils.weight_norm,
    "weight_norm parametrization": PARAM.weight_norm,
    "spectral_norm hook": nn.utils.spectral_norm,
    "spectral_norm parametrization": PARAM.spectral_norm,
}


def _normed_net(wrap) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3),
        nn.ReLU(),
        wrap(nn.Conv2d(16, 16, 3)),
        nn.ReLU(),
        wrap(nn.ConvTranspose2d(16, 12, 3)),
        nn.ReLU(),
        wrap(nn.Conv2d(12, 6, 1)),
    ).eval()


@pytest.mark.parametrize("form", sorted(NORMS))
def test_weight_and_spectral_norm_prune_like_plain_layers_and_stay_exact(form):
    x = torch.randn(1, 3, 12, 12)
    model = _normed_net(NORMS[form])
    plain = _normed_net(lambda layer: layer)
    graph = assert_exact(model, x, min_groups=3)
    assert not graph.unsupported()
    assert len(list(graph.get_all_groups())) == len(list(build(plain, x).get_all_groups()))
    _prune(model, x)
    assert model(x).shape == (1, 6, 10, 10)
    widths = [m.out_channels for m in model if isinstance(m, nn.modules.conv._ConvNd)]
    assert widths == [8, 8, 6, 6]


def test_pruning_inside_the_norm_rescales_g_so_the_weight_keeps_its_columns():
    x = torch.randn(1, 3, 12, 12)
    model = _normed_net(nn.utils.weight_norm)
    normed = model[2]
    before = normed.weight.detach().clone()
    (group,) = [g for g in build(model, x).get_all_groups() if g.root.ref.module is model[0]]
    group.prune([1, 5, 9])
    model(x)
    kept = [c for c in range(16) if c not in (1, 5, 9)]
    torch.testing.assert_close(normed.weight, before[:, kept], rtol=1e-6, atol=1e-7)


def test_a_residual_width_feeding_multihead_attention_loses_the_ratio_once():
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(8, 64)
            self.attn = nn.MultiheadAttention(64, 4, batch_first=True)
            self.head = nn.Linear(64, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.embed(x)
            return self.head(h + self.attn(h, h, h)[0])

    x = torch.randn(2, 5, 8)
    model = _prune(Block(), x)
    assert (model.attn.embed_dim, model.attn.num_heads, model.attn.head_dim) == (32, 4, 8)
    heads = _prune(Block(), x, pruning_ratio_dict={"heads": 0.5})
    assert heads.attn.num_heads == 2
    assert model(x).shape == (2, 5, 8)


def test_timm_models_whose_pruned_forward_used_to_fail_now_run():
    timm = pytest.importorskip("timm")
    x = torch.randn(1, 3, 224, 224)
    for name in ("inception_next_atto", "efficientformerv2_s0"):
        model = timm.create_model(name).eval()
        shape = model(x).shape
        _prune(model, x)
        assert model(x).shape == shape, name


def test_wav2vec2_hidden_width_passes_its_weight_normed_positional_conv():
    transformers = pytest.importorskip("transformers")
    config = transformers.Wav2Vec2Config(
        vocab_size=12,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    )
    torch.manual_seed(0)
    model = transformers.Wav2Vec2ForCTC(config).eval()
    x = torch.randn(1, 1600)
    graph = build(model, x)
    hidden = [
        g
        for g in graph.get_all_groups()
        if g.root.label == "wav2vec2.feature_projection.projection.weight[dim 0]"
    ]
    assert hidden and not graph.unsupported()
    report = tp.verify(graph, x, [(hidden[0], [0, 3])])
    assert report.checks[0].mixing  # LayerNorm: reported, not exact
    _prune(model, x, ignored_layers=[model.lm_head])
    conv = model.wav2vec2.encoder.pos_conv_embed.conv
    assert (conv.in_channels, conv.out_channels, conv.groups) == (16, 16, 4)
    assert model.lm_head.in_features == 16
    assert model(x).logits.shape == (1, 159, 12)


def test_ops_without_rules_on_lengths_and_masks_are_not_listed_as_unsupported():
    class Lengths(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(3, 8, 1)
            self.register_buffer("lengths", torch.tensor([6, 4]))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            halved = self.lengths >> 1
            keep = torch.arange(x.shape[-1])[None] < halved[:, None]
            y = self.conv(x) * keep[:, None]
            return torch.special.i0(y)

    graph = build(Lengths(), torch.randn(2, 3, 6))
    assert [u.op for u in graph.unsupported()] == ["torch.special_i0"]


class ChecksWidthAsText(nn.Module):
    """A check the tracer cannot see (the size goes through a string)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if f"{x.shape[1]}" != "16":
            raise ValueError(f"expected 16 channels, got {x.shape[1]}")
        return x


class TwoBranches(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 1)
        self.check = ChecksWidthAsText()
        self.b = nn.Conv2d(3, 12, 1)
        self.head = nn.Conv2d(28, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.check(self.a(x)), self.b(x)], dim=1))


@pytest.mark.parametrize("journal", [False, True], ids=["by-reference", "journaled"])
def test_a_step_refuses_the_groups_that_break_the_forward_and_prunes_the_rest(journal, monkeypatch):
    # small weights are restored from references to the old tensors; an LLM's (above
    # JOURNAL_ABOVE bytes) from a journal of the removed positions, as new tensors
    monkeypatch.setattr(tp.pruner.safety, "JOURNAL_ABOVE", 0 if journal else 1 << 29)
    x = torch.randn(1, 3, 4, 4)
    model = TwoBranches().eval()
    weight = model.a.weight
    kept = weight.detach().clone()
    pruner = tp.pruner.MagnitudePruner(model, x, pruning_ratio=0.5)
    pruner.step()
    assert (model.a.out_channels, model.b.out_channels) == (16, 6)
    assert torch.equal(model.a.weight, kept) and (model.a.weight is weight) != journal
    assert model(x).shape == (1, 4, 4, 4)
    ((label, reason),) = pruner.last_step.refused
    assert label == "a.weight[dim 0]"
    assert "fails in check: ValueError: expected 16 channels, got 8" in reason
    assert pruner.last_step.pruned == [("b.weight[dim 0]", 6)]
    assert list(pruner.refused.values()) == [reason]


def test_group_prune_that_breaks_the_forward_raises_and_leaves_the_model_whole():
    x = torch.randn(1, 3, 4, 4)
    model = TwoBranches().eval()
    graph = build(model, x)
    (group,) = [g for g in graph.get_all_groups() if g.root.ref.module is model.a]
    weights = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(ValueError, match="fails in check: ValueError: expected 16"):
        group.prune([0, 1])
    assert model.a.out_channels == 16 and model.head.in_channels == 28
    assert all(torch.equal(weights[n], p) for n, p in model.state_dict().items())
    assert model(x).shape == (1, 4, 4, 4)


def test_a_pruning_function_that_fails_halfway_leaves_the_model_whole():
    class Failing(tp.pruning.functions.ConvPruner):
        def prune_in_channels(self, layer, idxs):
            raise RuntimeError("disk full")

    x = torch.randn(1, 3, 4, 4)
    model = _sandwich(nn.ReLU())
    graph = build(model, x, customized_pruners={model[2]: Failing()})
    (group,) = list(graph.get_all_groups())
    with pytest.raises(RuntimeError, match="disk full"):
        group.prune([0, 1])
    assert model[0].weight.shape == (16, 3, 3, 3) and model[0].out_channels == 16
    assert model(x).shape == (1, 4, 4, 4)


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.norm = nn.LayerNorm(16)
        self.b = nn.Linear(6, 12)
        self.head = nn.Linear(28, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.norm(self.a(x)), torch.relu(self.b(x))], dim=-1))


def test_exact_only_leaves_mixing_groups_alone_and_steps_report_them():
    x = torch.randn(3, 6)
    model = Normed().eval()
    pruner = tp.pruner.MagnitudePruner(model, x, pruning_ratio=0.5, exact_only=True)
    pruner.step()
    assert (model.a.out_features, model.b.out_features) == (16, 6)
    assert pruner.last_step.skipped_mixing == ["a.weight[dim 0]"]
    report = tp.verify(build(Normed().eval(), x), x)
    assert {c.status for c in report.checks} == {"ok", "mixing"}

    model = Normed().eval()
    pruner = tp.pruner.MagnitudePruner(model, x, pruning_ratio=0.5)
    with pytest.warns(UserWarning, match=r"1 of the 2 groups this step pruned pass through"):
        pruner.step()
    assert model.a.out_features == 8
    assert [label for label, _ in pruner.last_step.mixing] == ["a.weight[dim 0]"]
    assert "LayerNorm statistics" in pruner.last_step.mixing[0][1][0]


def test_a_size_made_a_plain_int_is_named_as_such_in_the_refusal():
    class Flattens(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(x.shape[0], int(x.shape[1]), -1).mean(-1)[..., None, None]

    x = torch.randn(1, 3, 8, 8)
    graph = build(_sandwich(Flattens(), width=12), x)
    reasons = {r for c in graph.analysis.couplings.values() for r in c.frozen.values()}
    assert any(
        r.startswith("hard-coded size 12 in Tensor.reshape in 1 (a literal, or a size the model")
        and "int()" in r
        for r in reasons
    ), reasons


class Gated(nn.Module):
    """timm's FocalModulation: the last gate channel, a slice of size 1, scales every channel."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.f = nn.Conv2d(width, width + 3, 1)
        self.levels = 2
        self.input_split = [width, self.levels + 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx, gates = torch.split(self.f(x), self.input_split, 1)
        out = ctx * gates[:, self.levels :]
        for level in range(self.levels):
            out = out + ctx * gates[:, level : level + 1]
        return out


def test_a_size_one_slice_broadcast_over_channels_keeps_its_channel():
    x = torch.randn(1, 3, 8, 8)
    model = _sandwich(Gated(16))
    graph = build(model, x)
    (gate,) = [g for g in graph.all_groups() if g.size == 3 and g.root.ref.module is model[1].f]
    assert not gate.prunable_idxs
    assert "a size-1 dim broadcast to 16" in gate.refusal([2])
    _prune(model, x)
    assert model[1].f.out_channels == 11 and model(x).shape == (1, 4, 8, 8)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.mid = nn.utils.weight_norm(nn.Linear(16, 24))
        self.proj = nn.Linear(24, 16)
        self.out = nn.Linear(16, 20, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return self.out(x + self.proj(torch.relu(self.mid(x))))


def test_a_journaled_checkpoint_restores_every_tensor_without_holding_them():
    torch.manual_seed(0)
    model = Tied().eval()
    ids = torch.randint(0, 20, (2, 5))
    model(ids).sum().backward()
    before = {n: t.detach().clone() for n, t in model.state_dict(keep_vars=True).items()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    graph = build(model, ids)
    with journaled() as journal:
        checkpoint = Checkpoint(graph, journal)
        with graph.deferred(notify=False):
            for group in graph.get_all_groups():
                if len(group.prunable_idxs) > 1:
                    group.prune(group.prunable_idxs[:1])
    assert model.mid.weight_v.shape[0] < 24 and model.embed.weight.shape[1] < 16
    assert model.out.weight is model.embed.weight
    held = sum(e.removed.numel() for e in journal.entries if e.removed is not None)
    assert 0 < held < sum(t.numel() for t in before.values()) / 2
    checkpoint.restore()
    after = model.state_dict(keep_vars=True)
    assert set(after) == set(before)
    assert all(torch.equal(after[n].detach(), t) for n, t in before.items())
    assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters() if n in grads)
    assert model.proj.in_features == 24 and model.attn.embed_dim == 16
    assert model.out.weight is model.embed.weight
    with torch.no_grad():
        assert model(ids).shape == (2, 5, 20)


def test_a_checkpoint_by_reference_gives_back_the_same_tensors_and_ties():
    torch.manual_seed(0)
    model = Tied().eval()
    ids = torch.randint(0, 20, (2, 5))
    model(ids).sum().backward()
    before = dict(model.state_dict(keep_vars=True))
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    graph = build(model, ids)
    checkpoint = Checkpoint(graph)
    with graph.deferred(notify=False):
        for group in graph.get_all_groups():
            if len(group.prunable_idxs) > 1:
                group.prune(group.prunable_idxs[:1])
    assert model.mid.weight_v.shape[0] < 24 and model.embed.weight.shape[1] < 16
    checkpoint.restore()
    after = model.state_dict(keep_vars=True)
    assert set(after) == set(before) and all(after[n] is t for n, t in before.items())
    assert all(p.grad is grads[n] for n, p in model.named_parameters() if n in grads)
    assert model.proj.in_features == 24 and model.attn.embed_dim == 16
    assert model.out.weight is model.embed.weight
    with torch.no_grad():
        assert model(ids).shape == (2, 5, 20)
