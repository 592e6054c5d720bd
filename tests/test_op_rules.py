"""Every op rule on a tiny model where a wrong index mapping would change the output.

Each model is pruned by a random 30% of every prunable group and checked with ``tp.verify``
against the zero-masked original (float64, relative error < 1e-6), group by group.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim as tp
from tests.helpers import assert_exact, build, group_signatures
from torchslim.spaces.symbolic import describe, evaluate, symbols

torch.manual_seed(0)
IMG = torch.randn(2, 3, 8, 8)


def conv_bn(cin: int, cout: int, **kwargs) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, **kwargs), nn.BatchNorm2d(cout), nn.ReLU()
    )


def randomized(model: nn.Module) -> nn.Module:
    from torchslim.zoo import randomize_constant_parameters

    return randomize_constant_parameters(model.eval())


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.a = conv_bn(8, 8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.scale = nn.Parameter(torch.rand(1, 8, 1, 1) + 0.5)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.b(self.a(x)) * self.scale
        x = torch.relu(x + y)
        x += 1.0
        return self.head(x.mean((2, 3)))


def test_elementwise_broadcast_and_bare_parameter_follow_the_residual_stream():
    graph = assert_exact(randomized(Residual()), IMG)
    group = graph.get_pruning_group(graph.model.stem[0], tp.prune_conv_out_channels, [1, 4])
    deps = {dep.target.name: idxs for dep, idxs in group}
    assert deps == {name: [1, 4] for name in ("stem.0", "stem.1", "a.0", "b", "", "head")}
    assert isinstance(graph.model.scale, nn.Parameter), "the bare layer scale is pruned in place"


class InstanceNormed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.InstanceNorm2d(8)  # no weights, no statistics: nothing of its own to slice
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.stem(x))))


def test_an_instance_norm_without_tensors_keeps_num_features_true():
    model = assert_exact(randomized(InstanceNormed()), IMG).model
    tp.pruner.MagnitudePruner(model, IMG, pruning_ratio=0.5, ignored_layers=[model.head]).step()
    assert model.stem.out_channels < 8 and model.norm.num_features == model.stem.out_channels
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when num_features disagrees with the input
        model(IMG)


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3, 6), conv_bn(3, 4)
        self.mix = nn.Conv2d(6 + 4 + 6, 7, 1)
        self.fc = nn.Linear(7 * 2, 3)

    def forward(self, x):
        a = self.a(x)
        z = self.mix(torch.cat([a, self.b(x), a], dim=1))
        pooled = torch.cat([z.amax((2, 3)), z.mean(dim=(-1, -2))], dim=-1)
        return self.fc(pooled)


def test_cat_is_a_direct_sum_and_reuse_of_a_tensor_couples_both_copies():
    graph = assert_exact(randomized(Concat()), IMG)
    group = graph.get_pruning_group(graph.model.a[0], tp.prune_conv_out_channels, [2])
    (mix_idxs,) = [idxs for dep, idxs in group if dep.target.name == "mix"]
    assert mix_idxs == [2, 12], "channel 2 of `a` appears twice in the concatenation"


class SplitHalves(nn.Module):
    """YOLO C2f-style: one conv's output chunked in two, both halves consumed separately."""

    def __init__(self, use_split: bool) -> None:
        super().__init__()
        self.use_split = use_split
        self.cv1 = conv_bn(3, 8)
        self.m = conv_bn(4, 4)
        self.cv2 = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        y = self.cv1(x)
        if self.use_split:
            half = y.shape[1] // 2
            a, b = y.split([half, half], dim=1)
        else:
            a, b = y.chunk(2, 1)
        return self.cv2(torch.cat([a, b, self.m(b)], 1))


@pytest.mark.parametrize("use_split", [False, True])
def test_chunk_and_tracked_split_prune_both_halves_symmetrically(use_split):
    graph = assert_exact(randomized(SplitHalves(use_split)), IMG)
    group = graph.get_pruning_group(graph.model.cv1[0], tp.prune_conv_out_channels, [1])
    (cv1_idxs,) = [idxs for dep, idxs in group if dep.target.name == "cv1.0"]
    assert cv1_idxs == [1, 5]


class LiteralSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.cv1 = conv_bn(3, 8)
        self.cv2 = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        a, b = self.cv1(x).split([3, 5], dim=1)
        return self.cv2(torch.cat([b, a], 1))


def test_literal_split_sizes_refuse_the_group_and_name_the_op():
    graph = build(LiteralSplit(), IMG)
    group = graph.get_pruning_group(graph.model.cv1[0], tp.prune_conv_out_channels, [0])
    reason = group.refusal()
    assert reason is not None and "hard-coded size" in reason and "split" in reason
    assert not graph.check_pruning_group(group)
    with pytest.raises(ValueError, match="hard-coded size"):
        group.prune()


class FlattenLinear(nn.Module):
    def __init__(self, literal: bool) -> None:
        super().__init__()
        self.literal = literal
        self.conv = conv_bn(3, 6)
        self.fc = nn.Linear(6 * 4 * 4, 4)

    def forward(self, x):
        x = F.max_pool2d(self.conv(x), 2)
        x = x.view(x.size(0), 96) if self.literal else torch.flatten(x, 1)
        return self.fc(x)


def test_flatten_into_linear_prunes_whole_spatial_blocks():
    graph = assert_exact(randomized(FlattenLinear(literal=False)), IMG)
    group = graph.get_pruning_group(graph.model.conv[0], tp.prune_conv_out_channels, [1])
    (fc_idxs,) = [idxs for dep, idxs in group if dep.target.name == "fc"]
    assert fc_idxs == list(range(16, 32))


def test_literal_view_size_freezes_the_channels():
    graph = build(FlattenLinear(literal=True), IMG)
    group = graph.get_pruning_group(graph.model.conv[0], tp.prune_conv_out_channels, [1])
    assert "hard-coded size 96" in group.refusal()


class Heads(nn.Module):
    """Attention with q/k/v projections reshaped into heads (head count derived, -1)."""

    def __init__(self, dim: int = 12, head_dim: int = 3, kv_heads: int = 0, scale: bool = True):
        super().__init__()
        self.head_dim, self.kv_heads, self.scale = head_dim, kv_heads, scale
        heads = dim // head_dim
        kv = kv_heads or heads
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, kv * head_dim)
        self.v = nn.Linear(dim, kv * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        if self.kv_heads:
            rep = q.shape[1] // k.shape[1]
            k = (
                k[:, :, None]
                .expand(b, k.shape[1], rep, n, self.head_dim)
                .reshape(b, -1, n, self.head_dim)
            )
            v = (
                v[:, :, None]
                .expand(b, v.shape[1], rep, n, self.head_dim)
                .reshape(b, -1, n, self.head_dim)
            )
        if self.scale:
            attn = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v
        else:
            attn = F.scaled_dot_product_attention(q, k, v)
        return self.o(attn.transpose(1, 2).reshape(b, n, -1)) + x


TOKENS = torch.randn(2, 5, 12)


def test_attention_heads_are_whole_groups():
    graph = assert_exact(Heads(), TOKENS)
    group = graph.get_pruning_group(graph.model.q, tp.prune_linear_out_channels, [3, 4, 5])
    deps = {dep.target.name: idxs for dep, idxs in group}
    assert deps == {"q": [3, 4, 5], "k": [3, 4, 5], "v": [3, 4, 5], "o": [3, 4, 5]}
    one_channel = graph.get_pruning_group(graph.model.q, tp.prune_linear_out_channels, [0])
    assert one_channel.idxs == [0] and one_channel[0].idxs == [0, 1, 2], "a whole head goes"
    offsets = [g for g in graph.all_groups() if g.size == 3 and g.root.label == "q.weight[dim 0]"]
    assert offsets[0].refusal([0]) is None, "self.head_dim follows the offsets pruned"


def test_grouped_query_attention_couples_each_kv_head_with_its_query_heads():
    graph = assert_exact(Heads(kv_heads=2), TOKENS)
    group = graph.get_pruning_group(graph.model.k, tp.prune_linear_out_channels, [0, 1, 2])
    deps = {dep.target.name: idxs for dep, idxs in group}
    assert deps["q"] == list(range(6)) and deps["v"] == [0, 1, 2]


def test_default_attention_scale_is_reported_as_not_exact():
    graph = build(Heads(scale=False), TOKENS)
    assert any("attention scale" in " ".join(g.mixing) for g in graph.all_groups())


class SizeAsValue(nn.Module):
    """A channel count turned into a value: the result depends on how many channels remain."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.conv = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        x = self.conv(x)
        channels = x.shape[1]
        if self.how == "pow":
            x = x * channels**-0.5
        elif self.how == "sqrt":
            x = x / math.sqrt(channels)
        elif self.how == "tensor":
            x = x / torch.sqrt(torch.tensor(channels, dtype=x.dtype))
        else:
            x = x / channels
        return self.head(x)


@pytest.mark.parametrize("how", ["pow", "sqrt", "tensor", "divide"])
def test_a_channel_count_used_as_a_value_is_reported_as_not_exact(how):
    graph = build(SizeAsValue(how), IMG)
    (group,) = [g for g in graph.all_groups() if g.root.label == "conv.weight[dim 0]"]
    assert any("channel count used as a value" in reason for reason in group.mixing)
    report = tp.verify(graph, IMG, [(group, [0, 3])])
    assert report.ok and not report.checks[0].exact_expected
    assert report.checks[0].max_rel_error > 1e-3


class Shuffle(nn.Module):
    """ShuffleNet-style: two branches concatenated, then a channel shuffle and a split."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = conv_bn(3, 4), conv_bn(3, 4)
        self.c = nn.Conv2d(4, 3, 1)
        self.d = nn.Conv2d(4, 3, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        bsz, ch, h, w = y.size()
        y = y.view(bsz, 2, ch // 2, h, w).transpose(1, 2).contiguous().view(bsz, -1, h, w)
        left, right = y.chunk(2, dim=1)
        return self.c(left) + self.d(right)


def test_channel_shuffle_couples_the_two_branches():
    graph = assert_exact(randomized(Shuffle()), IMG)
    group = graph.get_pruning_group(graph.model.a[0], tp.prune_conv_out_channels, [1])
    names = {dep.target.name for dep, _ in group}
    assert {"a.0", "b.0"} <= names


class PixelShuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Conv2d(3, 4 * 4, 3, padding=1)
        self.out = nn.Conv2d(4, 2, 3, padding=1)

    def forward(self, x):
        return self.out(F.pixel_shuffle(self.up(x), 2))


def test_pixel_shuffle_removes_whole_sub_pixel_blocks():
    graph = assert_exact(PixelShuffle(), IMG)
    group = graph.get_pruning_group(graph.model.out, tp.prune_conv_in_channels, [1])
    (up_idxs,) = [idxs for dep, idxs in group if dep.target.name == "up"]
    assert up_idxs == [4, 5, 6, 7]


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pw = conv_bn(3, 8)
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.out(self.bn(self.dw(self.grouped(self.pw(x)))))


def test_grouped_and_depthwise_convolutions():
    graph = assert_exact(randomized(Grouped()), IMG)
    sizes = sorted(g.size for g in graph.get_all_groups())
    assert 2 in sizes and 4 in sizes


class ChannelsLast(nn.Module):
    """ConvNeXt-style: permute to channels-last, Linear, permute back, layer scale, LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.fc1 = nn.Linear(6, 10)
        self.fc2 = nn.Linear(10, 6)
        self.gamma = nn.Parameter(torch.rand(6) + 0.5)
        self.norm = nn.LayerNorm(6)

    def forward(self, x):
        x = self.conv(x)
        y = x.permute(0, 2, 3, 1)
        y = self.gamma * self.fc2(F.gelu(self.fc1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


def test_permute_linear_and_layer_norm_is_reported_as_mixing():
    graph = assert_exact(ChannelsLast(), IMG)
    group = graph.get_pruning_group(graph.model.conv, tp.prune_conv_out_channels, [0])
    assert any("LayerNorm" in reason for reason in group.mixing)
    hidden = graph.get_pruning_group(graph.model.fc1, tp.prune_linear_out_channels, [0])
    assert not hidden.mixing


class Indexing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = self.conv(x)
        first = y[:, : y.shape[1] // 2] * y[:, y.shape[1] // 2 :]
        return self.out(first) + y[:, 0:1]


def test_slicing_with_tracked_bounds_and_a_selected_position():
    graph = assert_exact(Indexing(), IMG)
    group = graph.get_pruning_group(graph.model.conv, tp.prune_conv_out_channels, [0])
    assert group.refusal() is not None, "channel 0 is selected by index and must stay"
    other = graph.get_pruning_group(graph.model.conv, tp.prune_conv_out_channels, [1])
    assert other.refusal() is None


class ForegroundScores(nn.Module):
    """A detector's post-processing with two classes: drop the background column, flatten the
    ``(boxes, 1)`` foreground scores, keep those above a threshold."""

    def __init__(self) -> None:
        super().__init__()
        self.cls_score = nn.Linear(4, 2)

    def forward(self, x):
        scores = F.softmax(self.cls_score(x), -1)[:, 1:].reshape(-1)
        return scores[torch.where(scores > 0.1)[0]]


def test_a_size_one_dim_flattened_away_keeps_its_position():
    graph = build(ForegroundScores(), torch.randn(5, 4))
    group = graph.get_pruning_group(graph.model.cls_score, tp.prune_linear_out_channels, [1])
    assert "a size-1 dim removed by a reshape" in group.refusal()


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.after = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        return self.after(torch.special.i0(self.conv(x)))


def test_an_op_without_rule_refuses_its_groups_and_is_named():
    graph = build(Unknown(), IMG)
    (entry,) = graph.unsupported()
    assert entry.op == "torch.special_i0" or "i0" in entry.op
    assert entry.module == "<model>"
    group = graph.get_pruning_group(graph.model.conv, tp.prune_conv_out_channels, [0])
    assert group.refusal() == "unsupported op torch.special_i0 in module <model>"
    assert list(graph.get_all_groups()) == [], "conv feeds the unknown op, `after` is the output"


class Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.shared = conv_bn(3, 6)
        self.other = nn.Conv2d(3, 6, 3, padding=1)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(self.shared[0](x) + self.shared[0](x.flip(-1)) + self.other(x))


def test_module_used_twice_is_one_coupled_layer():
    graph = assert_exact(Reused(), IMG)
    group = graph.get_pruning_group(graph.model.other, tp.prune_conv_out_channels, [3])
    assert {"shared.0", "other", "out"} <= {dep.target.name for dep, _ in group}


class Embedded(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.fc = nn.Linear(6, 4)
        self.act = nn.PReLU(4)
        self.out = nn.Linear(4, 3)

    def forward(self, ids):
        x = self.emb(ids)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        return self.out(self.act(self.fc(x).transpose(1, 2)).transpose(1, 2))


def test_embedding_cls_token_and_prelu():
    ids = torch.randint(0, 10, (2, 5))
    graph = assert_exact(Embedded(), ids)
    group = graph.get_pruning_group(graph.model.fc, tp.prune_linear_out_channels, [1])
    assert {"fc", "act", "out"} <= {dep.target.name for dep, _ in group}
    emb = graph.get_pruning_group(graph.model.emb, tp.prune_embedding_out_channels, [2])
    assert "" in {dep.target.name for dep, _ in emb}, "the cls token is pruned with the embedding"


class Setitem(nn.Module):
    def __init__(self, doubled: bool) -> None:
        super().__init__()
        self.doubled = doubled
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a, b = self.a(x), self.b(x)
        width = a.shape[1] * 2 if self.doubled else a.shape[1] + b.shape[1]
        buf = a.new_zeros(a.shape[0], width, a.shape[2], a.shape[3])
        buf[:, : a.shape[1]] = a
        buf[:, a.shape[1] :] = b
        return self.out(torch.relu_(buf))


def test_setitem_into_a_buffer_of_tracked_size():
    graph = assert_exact(Setitem(doubled=False), IMG)
    group = graph.get_pruning_group(graph.model.b, tp.prune_conv_out_channels, [1])
    assert {dep.target.name: idxs for dep, idxs in group} == {"b": [1], "out": [5]}


def test_a_size_computed_from_the_wrong_tensor_is_caught():
    graph = build(Setitem(doubled=True), IMG)
    group = graph.get_pruning_group(graph.model.a, tp.prune_conv_out_channels, [1])
    assert group.refusal() == (
        "size argument `(size(4) * 2)` in Tensor.new_zeros in <model> would give 6 where 7 "
        "positions remain after pruning"
    )


class Transposed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.down = conv_bn(3, 6)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.out = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        y = F.interpolate(self.up(self.down(x)), scale_factor=0.5)
        return self.out(self.pool(F.pad(y, (1, 1, 1, 1))))


def test_conv_transpose_interpolate_pad_and_pooling():
    assert_exact(randomized(Transposed()), IMG, min_groups=2)


class Einsum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(6, 8)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        scores = torch.einsum("bnd,bmd->bnm", self.a(x), self.b(x))
        return self.out(torch.bmm(scores.softmax(-1), x))


def test_einsum_contracts_both_operands_together():
    graph = assert_exact(Einsum(), torch.randn(2, 5, 6))
    group = graph.get_pruning_group(graph.model.a, tp.prune_linear_out_channels, [2])
    assert {"a", "b"} <= {dep.target.name for dep, _ in group}


def test_verify_catches_a_wrong_index_mapping(monkeypatch):
    """Sabotage the flip rule (claim it keeps positions): verify must see the difference."""
    from torchslim.ops import registry, shape

    class Flipped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 6, 1)
            self.out = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.out(self.a(x).flip(1))

    model = Flipped()
    assert_exact(model, IMG)
    monkeypatch.setitem(registry._RULES, torch.Tensor.flip, shape.alias_rule)
    graph = build(model, IMG)
    group = graph.get_pruning_group(model.a, tp.prune_conv_out_channels, [0])
    report = tp.verify(graph, IMG, [group])
    assert not report.ok and report.worst > 1e-3


SEEN: list[str] = []


class Recorded(nn.Module):
    """Two linears; the device of every input they see goes to ``SEEN``. With
    ``needs_values`` the forward reads a value (``float``), which a ``meta`` tensor lacks."""

    def __init__(self, needs_values: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)
        self.needs_values = needs_values

    def forward(self, x):
        SEEN.append(x.device.type)
        h = self.a(x)
        if self.needs_values and float(h.abs().sum()) < 0:
            h = -h
        return self.b(h.relu())


def test_graphs_are_traced_on_meta_unless_the_forward_needs_values():
    x = torch.randn(3, 4)
    SEEN.clear()
    graph = tp.DependencyGraph().build_dependency(Recorded(needs_values=False), x)
    assert graph.traced_on_meta and set(SEEN) == {"meta"}  # no real FLOPs
    assert "traced on meta tensors" in graph.summary()
    reading = Recorded(needs_values=True)
    SEEN.clear()
    graph = tp.DependencyGraph().build_dependency(reading, x)
    assert not graph.traced_on_meta and SEEN[:2] == ["meta", "cpu"]
    assert (
        "traced on real tensors: the forward fails on meta tensors (RuntimeError: Tensor.item() "
        "cannot be called on meta tensors)" in graph.summary()
    )
    real = tp.DependencyGraph().build_dependency(reading, x, trace_on_meta=False)
    assert group_signatures(graph) == group_signatures(real)
    assert [len(g.prunable_idxs) for g in graph.all_groups()] == [8, 0, 0]  # hidden, in, out
    with pytest.raises(RuntimeError, match="forward failed on the example inputs while tracing"):
        tp.DependencyGraph().build_dependency(reading, x, trace_on_meta=True)


def test_a_size_computed_in_a_long_loop_is_read_evaluated_and_described():
    expr = ("dim", Slot("first", 3))
    for step in range(5000):  # deeper than Python's recursion limit (torchvision's swin_v2)
        expr = ("add", expr, ("lit", step) if step % 2 else ("attr", Slot(f"a{step}", 1)))
    found = symbols(expr)
    assert [key.label for key in found] == ["first", *(f"a{s}" for s in range(0, 5000, 2))]
    assert evaluate(expr, lambda key: key.size) == 3 + 2500 + sum(range(1, 5000, 2))
    text = describe(expr)
    assert text.startswith("(" * 5000 + "size(3) + a0) + 1) + a2)") and text.endswith("+ 4999)")
    small = (
        "floordiv",
        ("neg", ("dim", Slot("x", 6))),
        ("mul", ("lit", 2), ("attr", Slot("h", 0))),
    )
    assert describe(small) == "(-size(6) // (2 * h))"
    assert evaluate(small, lambda key: key.size) == -(2**62)  # a division by zero: no size


def test_a_size_built_from_its_own_earlier_values_is_walked_once_per_subexpression():
    expr = ("mul", ("attr", Slot("h", 2)), ("dim", Slot("x", 3)))
    for _ in range(64):  # as a tree, 2**64 leaves: shared subexpressions are read once
        expr = ("add", expr, expr)
    assert [key.label for key in symbols(expr)] == ["h", "x"]
    assert evaluate(expr, lambda key: key.size) == 6 * 2**64


@dataclass(frozen=True)
class Slot:
    label: str
    size: int
