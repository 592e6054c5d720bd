"""Reconstruction and calibrated, reconstruction-aware selection (OBS).

Each test builds a net whose answer is known: removed channels that are linear combinations of
kept ones (a perfect refit exists), constant channels (bias compensation is exact), duplicated
channels (OBS must find them), and checks the numbers the report gives against outputs measured
directly on the calibration inputs.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import torchslim as tp
from tests.helpers import tiny_llama
from torchslim.pruner import reconstruct as refit
from torchslim.pruner.reconstruct import Reconstruction, ReconstructionError


class LinearMLP(nn.Module):
    """16 hidden units computed linearly from 8 inputs: any 8 independent ones span the rest."""

    def __init__(self, bias: bool = True) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 4, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


class ConstantUnit(nn.Module):
    """Hidden unit 0 is ReLU(3) = 3 for every input: its contribution is a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 3, bias=False)
        with torch.no_grad():
            self.a.weight[0] = 0.0
            self.a.bias[0] = 3.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class Fixed(tp.importance.Importance):
    """Scores that make the pruner remove the given channels of every group."""

    def __init__(self, lowest: list[int]) -> None:
        self.lowest = lowest

    def __call__(self, group: tp.Group) -> torch.Tensor:
        scores = torch.ones(group.size, dtype=torch.float64)
        scores[self.lowest] = 0.0
        return scores


def _inputs(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _relative_error(model: nn.Module, dense: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x) - dense(x)).pow(2).sum() / dense(x).pow(2).sum())


def test_a_linear_combination_of_kept_channels_is_refit_exactly():
    torch.manual_seed(0)
    model = LinearMLP().eval()
    dense = copy.deepcopy(model)
    x = _inputs(512, 8)
    plain = copy.deepcopy(model)
    tp.pruner.MagnitudePruner(plain, x[:2], pruning_ratio=0.25, ignored_layers=[plain.b]).step()
    pruner = tp.pruner.MagnitudePruner(model, x[:2], pruning_ratio=0.25, ignored_layers=[model.b])
    pruner.step(reconstruct=Reconstruction([x[:256], x[256:]], ridge=1e-9))
    assert model.a.out_features == plain.a.out_features == 12
    assert _relative_error(plain, dense, x) > 0.05
    assert _relative_error(model, dense, x) < 1e-8
    (layer,) = pruner.reconstruction.layers
    assert (layer.name, layer.removed, layer.kept) == ("b", 4, 12)
    assert layer.before == pytest.approx(_relative_error(plain, dense, x), rel=0.2)
    assert layer.after < 1e-8


def test_bias_compensation_moves_a_constant_channel_into_a_new_bias_and_saves_it(tmp_path):
    torch.manual_seed(0)
    model = ConstantUnit().eval()
    dense = copy.deepcopy(model)
    x = _inputs(64, 6)
    pruner = tp.pruner.MetaPruner(
        model, x[:2], importance=Fixed([0]), pruning_ratio=0.2, ignored_layers=[model.b]
    )
    pruner.step(reconstruct=Reconstruction([x], weights=False))
    assert model.a.out_features == 4 and model.b.bias is not None
    with torch.no_grad():
        expected = 3.0 * dense.b.weight[:, 0]
        assert torch.allclose(model.b.bias, expected, atol=1e-6)
    assert _relative_error(model, dense, x) < 1e-12
    assert pruner.reconstruction.layers[0].added_bias
    tp.save_pruned(model, tmp_path / "m.safetensors")
    fresh = tp.load_pruned(ConstantUnit().eval(), tmp_path / "m.safetensors")
    assert torch.equal(fresh(x), model(x))


def test_without_bias_compensation_no_bias_is_added():
    model = ConstantUnit().eval()
    x = _inputs(64, 6)
    pruner = tp.pruner.MetaPruner(
        model, x[:2], importance=Fixed([0]), pruning_ratio=0.2, ignored_layers=[model.b]
    )
    pruner.step(reconstruct=Reconstruction([x], bias=False))
    assert model.b.bias is None and not pruner.reconstruction.layers[0].added_bias
    assert "1 without bias compensation" in str(pruner.reconstruction)


class Convs(nn.Module):
    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.stem = nn.Conv1d(3, 8, 3) if isinstance(conv, nn.Conv1d) else nn.Conv2d(3, 8, 3)
        self.act = nn.ReLU()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.act(self.stem(x)))


#: name -> (consumer, input shape, group indices removed, stem channels they remove)
CONVS = {
    "conv2d-stride-padding": (
        lambda: nn.Conv2d(8, 6, 3, stride=2, padding=1),
        (4, 3, 12, 12),
        [1, 4],
        [1, 4],
    ),
    "conv2d-dilated-reflect": (
        lambda: nn.Conv2d(8, 6, 3, padding=2, dilation=2, padding_mode="reflect"),
        (4, 3, 12, 12),
        [1, 4],
        [1, 4],
    ),
    # a grouped consumer couples the same offset of both groups: index 1 is channels 1 and 5
    "conv2d-grouped": (
        lambda: nn.Conv2d(8, 4, 3, groups=2, bias=False),
        (4, 3, 10, 10),
        [1],
        [1, 5],
    ),
    "conv1d": (lambda: nn.Conv1d(8, 5, 5, padding="same"), (4, 3, 20), [1, 4], [1, 4]),
}


@pytest.mark.parametrize("name", sorted(CONVS))
def test_a_convolution_is_refit_through_im2col_and_the_report_measures_it(name):
    """The output error the report predicts from the input moments equals the error measured
    on the calibration inputs: the im2col features match the convolution exactly."""
    factory, shape, idxs, channels = CONVS[name]
    torch.manual_seed(0)
    model = Convs(factory()).eval()
    x = _inputs(*shape)
    seen = {}
    handle = model.conv.register_forward_pre_hook(lambda m, i: seen.update(x=i[0]))
    with torch.no_grad():
        model(x)
    handle.remove()
    dense_conv = copy.deepcopy(model.conv)
    graph_inputs = x[:1]
    pruner = tp.pruner.MetaPruner(
        model, graph_inputs, importance=Fixed(idxs), pruning_ratio=0.25, ignored_layers=[model.conv]
    )
    pruner.step(reconstruct=Reconstruction([x]))
    (layer,) = pruner.reconstruction.layers
    keep = [c for c in range(8) if c not in channels]
    with torch.no_grad():
        reference = dense_conv(seen["x"])
        bias_free = copy.deepcopy(dense_conv)
        if bias_free.bias is not None:
            bias_free.bias.zero_()
        energy = bias_free(seen["x"]).pow(2).sum()
        refit = model.conv(seen["x"][:, keep])
    measured = float((reference - refit).pow(2).sum() / energy)
    assert layer.after == pytest.approx(measured, rel=1e-6, abs=1e-12)
    assert layer.after < layer.before


def test_a_refit_model_still_verifies_exactly_against_its_refit_weights():
    torch.manual_seed(0)
    model = LinearMLP().eval()
    x = _inputs(128, 8)
    pruner = tp.pruner.MagnitudePruner(model, x[:2], pruning_ratio=0.25, ignored_layers=[model.b])
    report = pruner.step_and_verify(reconstruct=[x])
    assert report.ok and report.worst < 1e-12
    assert pruner.reconstruction.layers and "deliberate weight change" in str(pruner.reconstruction)


def test_target_mode_reconstructs_the_whole_step():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 2)
    )
    x = _inputs(256, 8)
    pruner = tp.pruner.MagnitudePruner(model, x[:2], target_params=0.5, global_pruning=True)
    pruner.step(reconstruct=[x])
    macs, params = tp.utils.count_ops_and_params(model, x[:2])
    assert params <= 0.5 * pruner.base_params
    names = {layer.name for layer in pruner.reconstruction.layers}
    assert names == {"2", "4"}
    assert model(x).shape == (256, 2)


def test_reconstruction_is_deterministic():
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).eval()
        x = _inputs(64, 8)
        tp.pruner.MagnitudePruner(model, x[:2], pruning_ratio=0.5).step(
            reconstruct=[x[:32], x[32:]]
        )
        results.append(model[2].weight.detach().clone())
    assert torch.equal(*results)


@pytest.mark.parametrize(
    "batches, message",
    [
        ([], "at least one calibration batch"),
        ([torch.randn(4, 5)], "calibration batch 0 failed"),
        ([torch.randint(0, 3, (4, 8))], "calibration batch 0 failed"),
    ],
)
def test_bad_calibration_batches_get_a_clear_error_and_leave_the_model_alone(batches, message):
    torch.manual_seed(0)
    model = LinearMLP(bias=False).eval()
    state = copy.deepcopy(model.state_dict())
    x = _inputs(16, 8)
    pruner = tp.pruner.MagnitudePruner(model, x[:2], pruning_ratio=0.25, ignored_layers=[model.b])
    with pytest.raises(ReconstructionError, match=message):
        pruner.step(reconstruct=batches)
    assert model.b.bias is None and pruner.current_step == 0
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert set(state) == set(model.state_dict())
    pruner.step()
    assert model.a.out_features == 12


def test_a_singular_system_names_the_layer_and_leaves_the_model_alone():
    """Hidden unit 10 is kept but always zero: without damping its row of the system is zero."""
    torch.manual_seed(0)
    model = LinearMLP().eval()
    with torch.no_grad():
        model.a.weight[10] = 0.0
        model.a.bias[10] = 0.0
    state = copy.deepcopy(model.state_dict())
    x = _inputs(64, 8)
    pruner = tp.pruner.MetaPruner(
        model, x[:2], importance=Fixed([0, 1]), pruning_ratio=0.125, ignored_layers=[model.b]
    )
    with pytest.raises(ReconstructionError, match=r"^b: the least-squares system is singular"):
        pruner.step(reconstruct=Reconstruction([x], ridge=0.0, bias=False))
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_reconstruct_takes_batches_or_a_reconstruction():
    model = LinearMLP().eval()
    pruner = tp.pruner.MagnitudePruner(model, _inputs(2, 8), pruning_ratio=0.25)
    with pytest.raises(TypeError, match="iterable of calibration batches"):
        pruner.step(reconstruct=_inputs(4, 8))
    with pytest.raises(ValueError, match="weights=True, bias=True or both"):
        Reconstruction([], weights=False, bias=False)


def test_obs_finds_a_duplicated_channel_that_magnitude_keeps():
    """Hidden units 0 and 5 are identical and large; the consumer can take one over from the
    other at no cost (only the damping's), so OBS removes one of them first while magnitude
    removes small units."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    with torch.no_grad():
        model[0].weight[5] = model[0].weight[0] = 3.0 * model[0].weight[0]
        model[0].bias[5] = model[0].bias[0]
    x = _inputs(256, 4)
    obs = tp.importance.OBSImportance()
    with obs.record(model), torch.no_grad():
        model(x)
    graph = tp.DependencyGraph().build_dependency(model, x[:2])
    (group,) = [g for g in graph.get_all_groups() if g.size == 6]
    scores = obs(group)
    first = int(scores.argmin())
    assert first in (0, 5) and float(scores.min()) < 1e-3
    assert int(scores.argmax()) == 5 - first  # once one copy is gone the other is essential
    assert int(tp.importance.MagnitudeImportance()(group).argmin()) not in (0, 5)


def test_global_pruning_by_kind_allocates_across_layers_within_the_cap(tmp_path):
    model = tiny_llama(layers=3)
    with torch.no_grad():  # half of layer 1's neurons are dead: removing them costs nothing
        model.model.layers[1].mlp.up_proj.weight[:32] = 0.0
    ids = torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(0))
    obs = tp.importance.OBSImportance()
    with obs.record(model), torch.no_grad():
        model(ids)
    pruner = tp.pruner.MetaPruner(
        model,
        ids,
        importance=obs,
        pruning_ratio=0.0,
        pruning_ratio_dict={"neurons": 0.25},
        global_pruning=True,
        max_pruning_ratio=0.5,
        ignored_layers=[model.lm_head],
    )
    pruner.step(reconstruct=[ids])
    widths = [layer.mlp.down_proj.in_features for layer in model.model.layers]
    assert sum(64 - w for w in widths) == 48
    assert widths[1] == 32 and min(widths) >= 32
    model.save_pretrained(tmp_path)  # per-layer widths: the config records the plan
    loaded = tp.hf.from_pretrained(tmp_path).eval()
    assert [layer.mlp.down_proj.in_features for layer in loaded.model.layers] == widths
    with torch.no_grad():
        assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def test_a_reconstructed_language_model_round_trips_through_save_pretrained(tmp_path):
    """By default no bias is added to a Hugging Face model, so a plain config fits; biases
    added to ``down_proj`` on request are in no Llama config: the config records the plan and
    ``tp.hf.from_pretrained`` rebuilds them."""
    ids = torch.randint(0, 97, (4, 32), generator=torch.Generator().manual_seed(0))
    for add_bias in (True, None):
        model = tiny_llama(layers=2)
        wanda = tp.importance.WandaImportance()
        with wanda.record(model), torch.no_grad():
            model(ids)
        pruner = tp.pruner.MetaPruner(
            model, ids, importance=wanda, pruning_ratio=0.0, pruning_ratio_dict={"neurons": 0.25}
        )
        pruner.step(reconstruct=Reconstruction([ids[:2], ids[2:]], add_bias=add_bias))
        assert (model.model.layers[0].mlp.down_proj.bias is not None) == bool(add_bias)
        path = tmp_path / f"bias-{add_bias}"
        model.save_pretrained(path)
        loaded = tp.hf.from_pretrained(path).eval()
        plain = hasattr(model.config, tp.hf.RECORD_KEY) is False
        assert plain == (not add_bias) and model.config.intermediate_size == (
            64 if add_bias else 48
        )
        with torch.no_grad():
            assert torch.allclose(loaded(ids).logits, model(ids).logits, atol=1e-5)


def test_a_language_model_recipe_with_an_uncalibrated_criterion_says_so():
    model = tiny_llama(layers=1)
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    with pytest.warns(
        UserWarning, match=r"MagnitudeImportance ranks neurons without calibration data"
    ):
        tp.pruner.MetaPruner(model, ids, pruning_ratio=0.0, pruning_ratio_dict={"neurons": 0.2})
    wanda = tp.importance.WandaImportance()
    with wanda.record(model), torch.no_grad():
        model(ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tp.pruner.MetaPruner(
            model, ids, importance=wanda, pruning_ratio=0.0, pruning_ratio_dict={"neurons": 0.2}
        )


def test_a_consumer_the_batches_never_reach_is_named():
    class Bypass(LinearMLP):
        def forward(self, x: torch.Tensor, through: bool = True) -> torch.Tensor:
            return self.b(self.a(x)) if through else self.a(x)

    model = Bypass().eval()
    x = _inputs(16, 8)
    pruner = tp.pruner.MagnitudePruner(model, x[:2], pruning_ratio=0.25, ignored_layers=[model.b])
    with pytest.raises(ReconstructionError, match=r"^b received no calibration input"):
        pruner.step(reconstruct=[(x, False)])
    assert model.a.out_features == 16


@pytest.mark.parametrize("criterion", ["wanda", "activation", "obs"])
def test_calibrated_scores_follow_the_pruning_of_target_mode(criterion):
    """Target mode re-scores after every increment: recorded statistics are restricted to the
    channels still there (from the model's pruning history), so pruned layers keep taking part
    and the target is reached, with and without reconstruction."""
    for reconstruct in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.ReLU(), nn.Conv2d(16, 8, 3)
        ).eval()
        x = _inputs(8, 3, 12, 12)
        importance = {
            "wanda": tp.importance.WandaImportance,
            "activation": tp.importance.ActivationImportance,
            "obs": tp.importance.OBSImportance,
        }[criterion]()
        with importance.record(model), torch.no_grad():
            model(x)
        pruner = tp.pruner.MetaPruner(
            model, x[:1], importance=importance, target_macs=0.5, global_pruning=True
        )
        pruner.step(reconstruct=[x] if reconstruct else None)
        macs, _ = tp.utils.count_ops_and_params(model, x[:1])
        assert macs <= 0.5 * pruner.base_macs
        assert model[0].out_channels < 15 and model[2].out_channels < 15


class TwoBlocks(nn.Module):
    """Two MLPs and a head; the head counts its forwards."""

    def __init__(self) -> None:
        super().__init__()
        self.a1, self.b1 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.a2, self.b2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, 2)
        self.head_calls = 0
        self.head.register_forward_pre_hook(
            lambda *_: setattr(self, "head_calls", 1 + self.head_calls)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b2(torch.relu(self.a2(self.b1(torch.relu(self.a1(x)))))))


def test_a_pass_stops_each_batch_once_its_layers_have_seen_it():
    model = TwoBlocks().eval()
    x = _inputs(40, 8)
    pruner = tp.pruner.MagnitudePruner(
        model, x[:2], pruning_ratio=0.25, ignored_layers=[model.b2, model.head]
    )
    model.head_calls = 0
    pruner.step(reconstruct=Reconstruction(list(x.split(10)), max_memory=1))
    report = pruner.reconstruction
    assert [layer.name for layer in report.layers] == ["b1", "a2", "b2"]
    assert report.tokens == 40
    assert model.head_calls == 3  # the first batch of each of the three passes, not all twelve


def test_each_layer_releases_its_statistics_once_refit(monkeypatch):
    """A deep model's refit holds one run's statistics at a time, not every layer's."""
    model = TwoBlocks().eval()
    x = _inputs(40, 8)
    pruner = tp.pruner.MagnitudePruner(
        model, x[:2], pruning_ratio=0.25, ignored_layers=[model.b2, model.head]
    )
    solved, held = [], []
    solve = refit.RefitLayer.solve

    def solving(layer, *args):
        solved.append(layer)
        result = solve(layer, *args)
        held.append(sum(hasattr(done, "gram") for done in solved))
        return result

    monkeypatch.setattr(refit.RefitLayer, "solve", solving)
    pruner.step(reconstruct=Reconstruction(list(x.split(10)), max_memory=1))
    assert len(solved) == 3 and held == [0, 0, 0]  # the solved ones hold no statistics


def test_a_model_with_forward_hooks_runs_every_batch_to_the_end():
    model = TwoBlocks().eval()
    x = _inputs(40, 8)
    ends = []
    model.b1.register_forward_hook(lambda *_: ends.append(1))  # waits for b1's forward to end
    pruner = tp.pruner.MagnitudePruner(
        model, x[:2], pruning_ratio=0.25, ignored_layers=[model.b2, model.head]
    )
    model.head_calls = 0
    pruner.step(reconstruct=Reconstruction(list(x.split(10)), max_memory=1))
    assert model.head_calls == 12 and pruner.reconstruction.tokens == 40


def test_a_layer_run_twice_per_forward_is_recorded_on_every_call():
    class Twice(LinearMLP):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.relu(self.a(self.b(torch.relu(self.a(x))))))

    model = Twice().eval()
    model.b = nn.Linear(16, 8)
    x = _inputs(30, 8)
    pruner = tp.pruner.MagnitudePruner(model, x[:2], pruning_ratio=0.25)
    pruner.step(reconstruct=Reconstruction(list(x.split(10)), max_memory=1))
    assert pruner.reconstruction.tokens == 60


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_output_rows_refit_a_block_at_a_time_as_all_at_once(bias, monkeypatch):
    """The rows of a refit are independent: solved a few at a time (as a 128k-row LM head is,
    to bound its float64 working set), the weights, the bias moved in and the report are those
    of one solve."""
    x = torch.relu(_inputs(256, 6)) + 0.5  # inputs with a mean: the bias takes part of it
    results = []
    for block_bytes in (refit.ROW_BLOCK_BYTES, 1):  # all rows, then 1 row per block
        monkeypatch.setattr(refit, "ROW_BLOCK_BYTES", block_bytes)
        torch.manual_seed(0)
        model = ConstantUnit().eval()
        pruner = tp.pruner.MetaPruner(
            model, x[:2], importance=Fixed([0, 2]), pruning_ratio=0.4, ignored_layers=[model.b]
        )
        pruner.step(reconstruct=Reconstruction([x], bias=bias, add_bias=bias))
        (layer,) = pruner.reconstruction.layers
        results.append((model.b.weight.detach(), model.b.bias, layer.before, layer.after))
    (whole, whole_bias, before, after), (blocks, blocks_bias, *report) = results
    assert whole.shape == (3, 3)
    torch.testing.assert_close(blocks, whole, rtol=1e-12, atol=1e-12)
    assert (whole_bias is None) == (blocks_bias is None) == (not bias)
    if bias:
        torch.testing.assert_close(blocks_bias, whole_bias, rtol=1e-12, atol=1e-12)
    assert report == pytest.approx([before, after], rel=1e-9, abs=1e-15)
