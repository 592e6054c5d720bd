"""Importance criteria on a hand-computable group: conv(1->3) -> BN(3) -> conv(3->2).

Channel k of the group owns conv0's filter k (one weight), BN scale k, and conv2's input
column k (two weights). Every expected number below is worked out by hand from those values.
"""

import copy
import pickle

import pytest
import torch
from torch import nn

import torchslim as tp
from torchslim.importance import base, lamp, normalize, reduce_layers
from torchslim.importance.base import position_norms, rows
from torchslim.pruner.reconstruct import Reconstruction

CONV0 = [1.0, 2.0, 3.0]
GAMMA = [0.5, -4.0, 1.0]
CONV2 = [[1.0, 1.0, 1.0], [1.0, -1.0, 2.0]]  # column k = input channel k


def tiny() -> nn.Sequential:
    model = nn.Sequential(
        nn.Conv2d(1, 3, 1, bias=False), nn.BatchNorm2d(3), nn.Conv2d(3, 2, 1, bias=False)
    ).eval()
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor(CONV0).view(3, 1, 1, 1))
        model[1].weight.copy_(torch.tensor(GAMMA))
        model[2].weight.copy_(torch.tensor(CONV2).view(2, 3, 1, 1))
    return model


@pytest.fixture
def group():
    model = tiny()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 1, 4, 4))
    return graph.get_pruning_group(model[0], tp.prune_conv_out_channels, [0])


def close(actual, expected):
    assert torch.allclose(actual, torch.tensor(expected, dtype=torch.float64), atol=1e-4)


def test_magnitude_l1_mean_over_layers(group):
    # channel 0: |1| + |0.5| + (|1| + |1|) = 3.5 over 3 layers
    imp = tp.importance.MagnitudeImportance(p=1, normalizer=None)
    close(imp(group), [3.5 / 3, 8 / 3, 7 / 3])


@pytest.mark.parametrize(
    ("reduction", "expected"),
    [
        ("sum", [3.25, 22.0, 15.0]),  # 1 + 0.25 + 2;  4 + 16 + 2;  9 + 1 + 5
        ("max", [2.0, 16.0, 9.0]),
        ("prod", [0.5, 128.0, 45.0]),
        ("first", [1.0, 4.0, 9.0]),
    ],
)
def test_magnitude_l2_group_reductions(group, reduction, expected):
    imp = tp.importance.MagnitudeImportance(p=2, group_reduction=reduction, normalizer=None)
    close(imp(group), expected)


def test_normalizers():
    scores = torch.tensor([1.0, 2.0, 5.0], dtype=torch.float64)
    close(normalize(scores, "mean"), [0.375, 0.75, 1.875])
    close(normalize(scores, "max"), [0.2, 0.4, 1.0])
    close(normalize(scores, "sum"), [0.125, 0.25, 0.625])
    close(normalize(scores, "standardization"), [0.0, 0.25, 1.0])
    std = (26 / 9) ** 0.5  # population std of 1, 2, 5 around their mean 8/3
    close(normalize(scores, "gaussian"), [(1 - 8 / 3) / std, (2 - 8 / 3) / std, (5 - 8 / 3) / std])
    close(lamp(torch.tensor([3.0, 1.0, 2.0], dtype=torch.float64)), [1.0, 1 / 6, 2 / 5])
    close(reduce_layers([scores, scores], None), [2.0, 4.0, 10.0])


def test_bn_scale_group_norm_and_lamp(group):
    close(tp.importance.BNScaleImportance()(group), [0.5, 4.0, 1.0])
    close(tp.importance.GroupNormImportance(normalizer=None)(group), [3.25**0.5, 22**0.5, 15**0.5])
    close(tp.importance.LAMPImportance(group_reduction="first")(group), [1 / 14, 4 / 13, 1.0])


def test_fpgm_sums_distances_between_slices(group):
    # conv0 filters 1, 2, 3: distance sums 3, 2, 3. conv2 columns (1, 1), (1, -1), (1, 2):
    # distances 2, 1, 3 -> sums 3, 5, 4. The BN scale (1-D) is skipped. Mean of the two layers.
    close(tp.importance.FPGMImportance(normalizer=None)(group), [3.0, 3.5, 3.5])


def test_bn_scale_skips_groups_without_normalisation():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 2))
    group = graph.get_pruning_group(model[0], tp.prune_linear_out_channels, [0])
    assert tp.importance.BNScaleImportance()(group) is None


def _backward(model: nn.Module, x: torch.Tensor) -> None:
    model.zero_grad()
    model(x).sum().backward()


def test_taylor_uses_weight_times_gradient_for_every_layer_kind(group):
    model = group.root.ref.module  # conv0; find the whole model through the graph
    graph_model = group._graph.model
    x = torch.ones(1, 1, 1, 1)
    _backward(graph_model, x)
    # with eval BN: y = sum_k c2[:, k] * (gamma_k * (w_k x - 0) / sqrt(1 + eps) + 0)
    eps = graph_model[1].eps
    inv = 1 / (1 + eps) ** 0.5
    column = [sum(col) for col in zip(*CONV2)]  # d(sum y)/d(bn_out_k) = column sums 2, 0, 3
    conv0 = [abs(CONV0[k] * column[k] * GAMMA[k] * inv) for k in range(3)]
    bn = [abs(GAMMA[k] * column[k] * CONV0[k] * inv) for k in range(3)]
    bn_out = [GAMMA[k] * CONV0[k] * inv for k in range(3)]
    conv2 = [abs(CONV2[0][k] * bn_out[k]) + abs(CONV2[1][k] * bn_out[k]) for k in range(3)]
    expected = [(conv0[k] + bn[k] + conv2[k]) / 3 for k in range(3)]
    close(tp.importance.TaylorImportance(normalizer=None)(group), expected)
    assert model is graph_model[0]


def test_hessian_averages_squared_gradients_over_batches(group):
    model = group._graph.model
    imp = tp.importance.HessianImportance(normalizer=None, group_reduction="first")
    grads = []
    for scale in (1.0, 3.0):
        _backward(model, torch.full((1, 1, 1, 1), scale))
        grads.append(model[0].weight.grad.view(-1).clone())
        imp.accumulate_grad(model)
    fisher = (grads[0] ** 2 + grads[1] ** 2) / 2
    expected = 0.5 * torch.tensor(CONV0) ** 2 * fisher
    close(imp(group), expected.tolist())
    imp.accumulate_grad(model)  # a third batch equal to the second changes the mean
    fisher3 = (grads[0] ** 2 + 2 * grads[1] ** 2) / 3
    close(imp(group), (0.5 * torch.tensor(CONV0) ** 2 * fisher3).tolist())
    for copied in (copy.deepcopy(imp), pickle.loads(pickle.dumps(imp))):
        assert copied(group) is None  # statistics are kept per parameter object: not copied
    imp.zero_grad()
    assert imp(group) is None


def test_hessian_follows_a_parameter_an_earlier_group_sliced():
    model = nn.Sequential(*(nn.Conv2d(a, b, 1, bias=False) for a, b in ((1, 4), (4, 3), (3, 2))))
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    graph = tp.DependencyGraph().build_dependency(model.eval(), x)
    imp = tp.importance.HessianImportance(normalizer=None, group_reduction="first")
    model(x).square().sum().backward()
    imp.accumulate_grad(model)
    square = model[1].weight.grad.detach().double() ** 2
    before = model[1].weight
    graph.get_pruning_group(model[0], tp.prune_conv_out_channels, [1, 2]).prune()
    assert model[1].weight is not before  # sliced: a new parameter of 2 input channels
    weight = model[1].weight.detach().double()
    expected = (0.5 * weight**2 * square[:, [0, 3]]).sum((1, 2, 3))
    close(
        imp(graph.get_pruning_group(model[1], tp.prune_conv_out_channels, [0])), expected.tolist()
    )


def recorded_on_two_batches(group, imp) -> torch.Tensor:
    """The group's scores by ``imp`` recorded on an all-1 and an all-(-3) image."""
    model = group._graph.model
    with imp.record(model):
        model(torch.full((1, 1, 2, 2), 1.0))
        model(torch.full((1, 1, 2, 2), -3.0))
    return imp(group)


def test_activation_importance_averages_output_magnitudes(group):
    scores = recorded_on_two_batches(group, tp.importance.ActivationImportance(normalizer=None))
    # conv0 output channel k is w_k * x: mean |.| over the two batches = 2 * |w_k|
    close(scores, [2.0, 4.0, 6.0])


def test_wanda_importance_scores_channels_where_they_are_consumed(group):
    scores = recorded_on_two_batches(group, tp.importance.WandaImportance(normalizer=None))
    # conv2 reads channel k = BN(w_k * x): four 1s and four -3s times gamma_k w_k / sqrt(1+eps)
    norm = (40 / (1 + 1e-5)) ** 0.5
    expected = [
        abs(g * w) * norm * sum(abs(row[k]) for row in CONV2)
        for k, (g, w) in enumerate(zip(GAMMA, CONV0))
    ]
    close(scores, expected)


@pytest.mark.parametrize(
    ("layer", "shape", "channel"),
    [(nn.Linear(6, 3), (4, 5, 6), 2), (nn.Conv2d(6, 3, 1), (4, 6, 3, 3), 1)],
)
def test_wanda_records_float64_sums_of_squares_a_block_of_channels_at_a_time(
    layer, shape, channel, monkeypatch
):
    # an LLM's MLP activation is hundreds of MB: never copied whole to float64
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 40)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    imp = tp.importance.WandaImportance()
    with imp.record(layer):
        layer(x)
        layer(2 * x)
    others = [d for d in range(x.dim()) if d != channel]
    expected = 5 * x.double().square().sum(others)
    recorded = imp._squares[id(layer)]
    assert recorded.dtype == torch.float64
    torch.testing.assert_close(recorded, expected, rtol=1e-12, atol=0)


def test_fluctuation_scores_the_variance_a_channel_feeds_its_consumer(group):
    scores = recorded_on_two_batches(group, tp.importance.FluctuationImportance(normalizer=None))
    # conv2 reads a_k * x, a_k = gamma_k w_k / sqrt(1+eps): four 1s and four -3s, so
    # E[(a x)^2] = 5 a^2 and E[a x] = -a: variance 4 a^2, times the squared norm of column k
    expected = [
        4 * (g * w) ** 2 / (1 + 1e-5) * sum(row[k] ** 2 for row in CONV2)
        for k, (g, w) in enumerate(zip(GAMMA, CONV0))
    ]
    close(scores, expected)


def test_fluctuation_drops_a_steady_channel_whose_mean_a_bias_then_carries():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    with torch.no_grad():  # channel 0 reads nothing: a steady 10, the largest input by far
        model[0].weight[0] = 0.0
        model[0].bias[0] = 10.0
    batches = [torch.randn(8, 4) for _ in range(3)]
    probe = torch.randn(5, 4)
    dense = model(probe).detach()
    scores = {}
    for name in ("wanda", "fluctuation"):
        imp = tp.importance.make_importance(name)
        with imp.record(model):
            for batch in batches:
                model(batch)
        graph = tp.DependencyGraph().build_dependency(model, probe)
        (hidden,) = [g for g in graph.get_all_groups() if g.size == 3]
        scores[name] = imp(hidden)
    assert scores["wanda"].argmax() == 0 and scores["fluctuation"].argmin() == 0
    imp = tp.importance.FluctuationImportance()
    with imp.record(model):
        for batch in batches:
            model(batch)
    pruner = tp.pruner.MetaPruner(model, probe, importance=imp, pruning_ratio=1 / 3)
    pruner.step(reconstruct=Reconstruction(batches, weights=False))
    assert model[1].in_features == 2
    torch.testing.assert_close(model(probe), dense, rtol=1e-5, atol=1e-5)


def test_fluctuation_recorded_on_empty_inputs_scores_nothing():
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    imp = tp.importance.FluctuationImportance()
    with imp.record(model):
        model(torch.zeros(0, 4))
    graph = tp.DependencyGraph().build_dependency(model, torch.zeros(1, 4))
    (hidden,) = [g for g in graph.get_all_groups() if g.size == 3]
    assert imp._counts[id(model[1])] == 0 and imp(hidden) is None


def test_fluctuation_adds_batches_up_as_one_recording():
    layer = nn.Linear(6, 3)
    x = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(0)) + 2.0
    together, apart = tp.importance.FluctuationImportance(), tp.importance.FluctuationImportance()
    with together.record(layer):
        layer(x)
    with apart.record(layer):
        layer(x[:1])
        layer(x[1:])
    key = id(layer)
    assert together._counts[key] == apart._counts[key] == 20
    torch.testing.assert_close(apart._sums[key], together._sums[key], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(together._sums[key], x.double().sum((0, 1)))


def test_wanda_without_calibration_scores_nothing(group):
    assert tp.importance.WandaImportance()(group) is None


def test_random_importance_is_seeded(group):
    torch.manual_seed(1)
    first = tp.importance.RandomImportance()(group)
    torch.manual_seed(1)
    assert torch.equal(first, tp.importance.RandomImportance()(group)) and first.numel() == 3


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="group_reduction"):
        tp.importance.MagnitudeImportance(group_reduction="median")
    with pytest.raises(ValueError, match="normalizer"):
        tp.importance.MagnitudeImportance(normalizer="l2")
    with pytest.raises(ValueError, match="p must be positive"):
        tp.importance.MagnitudeImportance(p=0)


def test_scores_computed_in_blocks_of_positions_are_the_same(group, monkeypatch):
    import torchslim.importance.base as base

    imp = tp.importance.MagnitudeImportance(p=2, normalizer=None)
    whole = imp(group)
    monkeypatch.setattr(base, "CHUNK_ELEMENTS", 1)
    assert torch.equal(imp(group), whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    ("shape", "dim"), [((300, 70), 0), ((300, 70), 1), ((8, 5, 3, 3), 1), ((50,), 0)]
)
@pytest.mark.parametrize("p", [1, 2, 3])
def test_blocked_norms_match_float64(dtype, shape, dim, p, monkeypatch):
    monkeypatch.setattr(base, "NORM_BLOCK", 256)  # many blocks, as in an LLM weight
    tensor = torch.randn(shape).to(dtype)
    exact = rows(tensor, dim).double().abs().pow(p).sum(1)
    fast = position_norms(tensor, dim, p)
    assert fast.dtype == torch.float64
    assert ((fast - exact).abs() / exact).max() < 1e-6


@pytest.mark.parametrize(("shape", "dim"), [((2048, 512, 1, 1), 1), ((512, 512, 3, 3), 0)])
def test_float32_norms_in_whole_blocks_stay_within_the_documented_bound(shape, dim):
    # one 1 MB block sums 512 values of each input channel, or 4608 of each filter, in float32
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    exact = rows(tensor, dim).double().square().sum(1)
    error = ((position_norms(tensor, dim, 2) - exact).abs() / exact).max()
    assert error < 1e-5


@pytest.mark.parametrize(
    "tensor",
    [torch.randn(64, 32, 3, 3).to(memory_format=torch.channels_last), torch.randn(512, 500).t()],
    ids=["channels-last", "transposed"],
)
@pytest.mark.parametrize("dim", [0, 1])
def test_norms_of_a_strided_tensor_are_those_of_its_contiguous_copy_bit_for_bit(tensor, dim):
    # float32 sums in another order differ in the last bits: scores must not depend on strides
    assert torch.equal(position_norms(tensor, dim, 2), position_norms(tensor.contiguous(), dim, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("shape", "dim", "size"), [((0, 5), 1, 5), ((0, 5), 0, 0), ((5, 0), 0, 5)])
def test_norms_of_an_empty_tensor_are_zero_per_position(dtype, shape, dim, size):
    scores = position_norms(torch.zeros(shape, dtype=dtype), dim, 2)
    assert torch.equal(scores, torch.zeros(size, dtype=torch.float64))
