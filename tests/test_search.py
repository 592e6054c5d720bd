"""tp.search: undoing trials, sensitivity tables, the budget search, measured rounding, the guard;
determinism for a seed, and every reported number recomputed from the saved plan."""

import json
import math

import pytest
import torch
import torchvision
from torch import nn

import torchslim as tp
from torchslim.graph.record import model_history
from torchslim.search import Sensitivity, Target, Trial

X = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
BATCH = torch.randn(16, 3, 16, 16, generator=torch.Generator().manual_seed(2))


class Toy(nn.Module):
    """Stem + one residual block (coupled with the stem) + a strided conv + classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.BatchNorm2d(16), nn.ReLU())
        self.conv1 = nn.Conv2d(16, 24, 3, 1, 1)
        self.bn1 = nn.BatchNorm2d(24)
        self.conv2 = nn.Conv2d(24, 16, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(16)
        self.down = nn.Sequential(nn.Conv2d(16, 40, 3, 2, 1), nn.BatchNorm2d(40), nn.ReLU())
        self.fc = nn.Linear(40, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.fc(self.down(x).mean((2, 3)))


def toy() -> nn.Module:
    torch.manual_seed(0)
    model = Toy().eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):  # non-trivial BN so pruning changes outputs
            nn.init.uniform_(module.weight, 0.2, 1.0)
            nn.init.normal_(module.running_mean, 0, 0.1)
    return model


def metric_for(model: nn.Module):
    return tp.search.output_agreement(model, BATCH, "cosine")


def sized_cost(layer: nn.Module) -> float:
    """Weight size, tripled when the output channels are not a multiple of 8."""
    return layer.weight.numel() * (3.0 if layer.weight.shape[0] % 8 else 1.0)


def aligned_cost(layer: nn.Module) -> float:
    """Only alignment matters: kernels of any aligned width take the same time."""
    return 3.0 if layer.weight.shape[0] % 8 else 1.0


class ChannelCostRuntime(tp.search.Runtime):
    """A deterministic stand-in for a runtime: a model or layer costs the sum of its convs' and
    linears' ``layer_cost``; ``slowdown`` multiplies every model's cost but the first (dense)."""

    def __init__(self, layer_cost=sized_cost, slowdown: float = 1.0) -> None:
        super().__init__("torch", repeats=1)
        self.layer_cost, self.slowdown = layer_cost, slowdown

    def time(self, jobs):
        return [self._cost(module) for module, _ in jobs]

    def time_models(self, models, example_inputs):
        costs = [self._cost(m) for m in models]
        return [costs[0]] + [c * self.slowdown for c in costs[1:]]

    def _cost(self, module: nn.Module) -> float:
        layers = [m for m in module.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        return sum(self.layer_cost(layer) for layer in layers)


def search_toy(**options):
    model = toy()
    settings = dict(
        target=Target("macs", 0.6),
        ratios=(0.25, 0.5, 0.75),
        refine_steps=4,
        show_progress=False,
        ignored_layers=["fc"],
    )
    settings.update(options)
    return model, tp.search.search(model, X, metric_for(model), **settings)


# ---------------------------------------------------------------------------------- undo


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    ).eval()


@pytest.mark.parametrize(("build", "x"), [(toy, X), (small_vit, torch.randn(1, 3, 32, 32))])
def test_a_trial_is_undone_completely(build, x):
    space = tp.search.SearchSpace(build(), x)
    with torch.no_grad():
        before = space.model(x)
    tensors = dict(space.model.state_dict(keep_vars=True))
    attributes = {n: dict(vars(m)) for n, m in space.model.named_modules()}
    removed, history = dict(space.graph.state.removed), len(space.graph.history)

    def sizes() -> list[tuple[int, int]]:
        groups = list(space.graph.get_all_groups())
        assert all(g.idxs == list(range(g.size)) for g in groups)  # made for the state now
        return [(g.coupling.id, g.size) for g in groups]

    dense_sizes = sizes()
    first = next(space.graph.get_all_groups()).select([0])  # a caller's selection stays its own
    assert next(space.graph.get_all_groups()).idxs == list(range(first.size))
    for unit in space.units:
        for ratio in (0.3, 0.6):
            with space.trial({unit.name: ratio}):
                macs, _ = space.count()
                assert macs < space.dense_macs
                assert sum(size for _, size in sizes()) < sum(size for _, size in dense_sizes)
            assert sizes() == dense_sizes
    with torch.no_grad():
        assert torch.equal(space.model(x), before)
    assert all(space.model.state_dict(keep_vars=True)[k] is v for k, v in tensors.items())
    for name, module in space.model.named_modules():
        assert {k: v for k, v in vars(module).items()} == attributes[name]
    assert space.graph.state.removed == removed and len(space.graph.history) == history
    # pruning after all those trials gives exactly what a fresh graph gives
    config = {unit.name: 0.5 for unit in space.units}
    again = space.export(config)
    fresh = tp.search.SearchSpace(build(), x).export(config)
    assert model_history(again) == model_history(fresh)
    with torch.no_grad():
        assert torch.equal(again(x), fresh(x))


def test_an_error_inside_a_trial_still_restores_the_model():
    space = tp.search.SearchSpace(toy(), X)
    weight = space.model.conv1.weight
    with pytest.raises(RuntimeError, match="boom"), space.trial({"conv1": 0.5}):
        assert space.model.conv1.out_channels == 12
        raise RuntimeError("boom")
    assert space.model.conv1.weight is weight and space.model.conv1.out_channels == 24


def test_keep_ratio_leaves_exactly_the_count_asked_for():
    for size in range(1, 80):
        for keep in range(1, size + 1):
            assert size - math.floor(size * tp.search.keep_ratio(size, keep)) == keep


# --------------------------------------------------------------------------- sensitivity


def test_sensitivity_table_curves_and_json(tmp_path):
    model = toy()
    dense_params = sum(p.numel() for p in model.parameters())
    table = tp.search.sensitivity(
        model, X, metric_for(model), ratios=(0.5, 0.25), show_progress=False
    )
    assert sum(p.numel() for p in model.parameters()) == dense_params  # model untouched
    assert table.ratios == [0.25, 0.5] and table.baseline == pytest.approx(1.0)
    assert table.channels == {"stem.0": 16, "conv1": 24, "down.0": 40}
    assert len(table.trials) == 3 * 2
    for unit, size in table.channels.items():
        curve = table.curve(unit)
        assert [t.channels for t in curve] == [size, size - size // 4, size - size // 2]
        assert curve[0].macs > curve[1].macs > curve[2].macs
        assert all(t.metric < 1.0 for t in curve[1:])
    assert Sensitivity.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    paths = tp.search.plot_sensitivity(table, tmp_path)
    assert sorted(p.name for p in paths) == ["all.png", "conv1.png", "down.0.png", "stem.0.png"]
    assert all(p.stat().st_size > 5000 for p in paths)
    assert "| conv1 | 24 |" in tp.search.sensitivity_markdown(table)


def test_block_units_prune_every_group_inside():
    space = tp.search.SearchSpace(toy(), X, units=["stem", "down"])
    assert [(u.name, u.channels) for u in space.units] == [("stem", 16), ("down", 40)]
    with space.trial({"stem": 0.5, "down": 0.5}) as model:
        assert model.stem[0].out_channels == 8 and model.down[0].out_channels == 20
        assert model.conv1.out_channels == 24  # not in a unit: not pruned


# ------------------------------------------------------------------------------- search


def test_greedy_path_takes_the_cheapest_drop_per_mac_first():
    def trial(unit, ratio, macs, metric):
        return Trial(unit, ratio, 0, macs, 0, metric)

    table = Sensitivity(
        [0.5],
        1.0,
        100,
        0,
        {"a": 8, "b": 8, "c": 8},
        [trial("a", 0.5, 90, 0.9), trial("b", 0.5, 80, 0.9), trial("c", 0.5, 95, 1.0)],
    )
    # c costs nothing; b loses 0.1 for 20 MACs, a 0.1 for 10 MACs
    assert tp.search.greedy_path(table, ["a", "b", "c"], "macs") == [
        (0, 0, 0),
        (0, 0, 1),
        (0, 1, 1),
        (1, 1, 1),
    ]


def test_search_is_deterministic_for_a_seed():
    _, first = search_toy(seed=3, rounding="none", use_guard=False)
    _, second = search_toy(seed=3, rounding="none", use_guard=False)
    assert first.ratios == second.ratios and first.log == second.log
    assert first.metric == second.metric and first.macs == second.macs
    phases = [entry["phase"] for entry in first.log]
    assert phases[0] == "bisect" and "greedy" in phases and phases.count("refine") >= 4
    assert first.macs <= 0.6 * first.dense["macs"]


def test_every_reported_number_is_recomputed_from_the_saved_plan(tmp_path):
    model, result = search_toy(runtime=ChannelCostRuntime())
    assert result.accepted and result.applied["candidate"] == "latency-aware"
    path = tp.search.save_result(result, tmp_path / "toy.safetensors")
    report = json.loads((tmp_path / "toy.search.json").read_text())
    loaded = tp.load_pruned(Toy(), path)  # fresh architecture: plan + weights from the file
    macs, params = tp.utils.count_ops_and_params(loaded, X)
    assert (macs, params) == (report["macs"], report["params"]) == (result.macs, result.params)
    assert metric_for(model)(loaded) == report["metric"] == result.metric
    assert macs <= 0.6 * report["dense"]["macs"]
    dense_macs, dense_params = tp.utils.count_ops_and_params(model, X)
    assert (report["dense"]["macs"], report["dense"]["params"]) == (dense_macs, dense_params)
    assert report["dense"]["metric"] == metric_for(model)(model)
    widths = {"stem.0": loaded.stem[0], "conv1": loaded.conv1, "down.0": loaded.down[0]}
    for root, kept in report["applied"]["channels"].items():
        assert widths[root].out_channels == kept
    plan = json.loads((tmp_path / "toy.plan.json").read_text())
    replayed = tp.apply_plan(Toy(), plan)
    assert tp.utils.count_ops_and_params(replayed, X) == (macs, params)
    sensitivity = Sensitivity.from_dict(report["sensitivity"])
    assert sensitivity.baseline == report["dense"]["metric"]


def test_a_params_target_is_met():
    _, result = search_toy(target=Target("params", 0.7), rounding="none", use_guard=False)
    assert result.params <= 0.7 * result.dense["params"]


def test_a_latency_target_is_met_on_the_runtime():
    runtime = ChannelCostRuntime()
    model, result = search_toy(
        target=Target("latency", 0.7), runtime=runtime, rounding="none", use_guard=False
    )
    dense_cost, pruned_cost = runtime.time_models([model, result.model], X)
    assert pruned_cost <= 0.7 * dense_cost
    assert all(e["fraction"] <= 0.7 for e in result.log if e.get("accepted"))


def test_a_metric_after_a_short_finetune_trains_copies_only():
    teacher = toy()
    inputs = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    # a rule the toy can learn: the signs of the first two input channels' means
    labels = (inputs[:, 0].mean((1, 2)) > 0).long() + 2 * (inputs[:, 1].mean((1, 2)) > 0).long()
    batches = [(inputs[i : i + 16], labels[i : i + 16]) for i in range(0, 64, 16)] * 5

    def agreement(model):
        return float((model(inputs).argmax(1) == labels).float().mean())

    metric = tp.search.after_finetune(agreement, tp.search.short_finetune(batches, lr=0.1))
    space = tp.search.SearchSpace(teacher, X, ignored_layers=["fc"])
    dense = {k: v.clone() for k, v in space.model.state_dict().items()}
    with space.trial({"conv1": 0.75, "down.0": 0.75}) as pruned:
        before = tp.search.evaluate(agreement, pruned)
        after = tp.search.evaluate(metric, pruned)
        assert after == tp.search.evaluate(metric, pruned)  # same steps, same number
        assert after > before + 0.25  # a few steps learn what the untrained cut cannot
        assert tp.search.evaluate(agreement, pruned) == before  # the candidate is untouched
    # every trial trained a copy: the dense weights the trials share are untouched
    table = tp.search.analyse(space, metric, (0.5,), show_progress=False)
    assert all(torch.equal(v, dense[k]) for k, v in space.model.state_dict().items())
    assert tp.search.evaluate(metric, space.model) == table.baseline


# ---------------------------------------------------------------- rounding and the guard


def test_candidate_counts_round_both_ways_within_the_size():
    assert tp.search.candidate_counts(13, 64) == [8, 13, 16, 32, 64]
    assert tp.search.candidate_counts(5, 6, (4,)) == [4, 5]


SEARCHED = {"stem.0": 0.3, "conv1": 0.5, "down.0": 0.3}  # 12, 12 and 28 channels kept


def proportional_cost(layer: nn.Module) -> float:
    """Time in proportion to the weight: no count is faster than its size says."""
    return float(layer.weight.numel())


def small_kernel_cost(speed: float):
    """Proportional, but layers of at most 8 output channels run ``speed`` times the time."""
    return lambda layer: layer.weight.numel() * (speed if layer.weight.shape[0] <= 8 else 1.0)


def rounded(cost, fraction=None, ratios=SEARCHED):
    """Latency-aware rounding of ``ratios`` on the toy with a stand-in runtime: the channels
    kept per group root, the MACs fraction, the stand-in time, and the log."""
    space = tp.search.SearchSpace(toy(), X, ignored_layers=["fc"])
    budget = tp.search.Budget(space, Target("macs", fraction)) if fraction else None
    runtime = ChannelCostRuntime(cost)
    config, log = tp.search.latency_aware_rounding(
        space, ratios, runtime, budget, show_progress=False
    )
    with space.trial(config) as model:
        kept = {root: sum(widths) for root, widths in space.widths().items()}
        macs = space.count()[0] / space.dense_macs
        ms = runtime.time_models([model], X)[0]
    return kept, macs, ms, log


def test_rounding_rounds_up_when_the_extra_channels_are_free():
    # only alignment costs time: the next multiple of 8 is free, and taken
    kept, _, ms, log = rounded(aligned_cost)
    assert kept == {"stem.0": 16, "conv1": 16, "down.0": 32}
    assert [e["rule"] for e in log] == ["free"] * 3
    assert ms == 4 * 1.0 + 3.0  # four aligned convs; the classifier's 10 outputs are not
    # time in proportion to channels: no count is worth more or less than its MACs, none moves
    kept, _, _, log = rounded(proportional_cost)
    assert kept == {"stem.0": 12, "conv1": 12, "down.0": 28}
    assert [e["rule"] for e in log] == ["kept"] * 3


def test_rounding_rounds_down_only_when_the_time_saved_beats_the_macs_removed():
    # 8 channels run at 0.4x: the time saved is more than 1.5x what 4 fewer channels explain
    kept, _, _, log = rounded(small_kernel_cost(0.4))
    assert kept["conv1"] == 8 and log[1]["rule"] == "worth it"
    ms, expected = log[1]["ms"], log[1]["expected_ms"]
    assert ms["12"] - ms["8"] >= 1.5 * (ms["12"] - expected["8"]) > 0
    # at 0.9x it saves only ~1.2x the proportional time: not worth the channels
    kept, _, _, log = rounded(small_kernel_cost(0.9))
    assert kept == {"stem.0": 12, "conv1": 12, "down.0": 28}
    assert [e["rule"] for e in log] == ["kept"] * 3


def test_rounding_up_trades_for_the_target_instead_of_missing_it():
    space = tp.search.SearchSpace(toy(), X, ignored_layers=["fc"])
    with space.trial(SEARCHED) as model:
        searched_macs = space.count()[0] / space.dense_macs
        searched_ms = ChannelCostRuntime(aligned_cost).time_models([model], X)[0]
    kept, macs, ms, log = rounded(aligned_cost, searched_macs + 1e-9)
    # all three round-ups are free but together miss the target: the repair rounds conv1 and
    # down.0 down to aligned counts to pay for the stem's, then checks the target again
    assert macs <= searched_macs and macs > 0.95 * searched_macs
    assert kept == {"stem.0": 16, "conv1": 8, "down.0": 24}
    assert ms < 0.5 * searched_ms
    repairs = [(e["unit"], e["from"], e["to"]) for e in log if e["phase"] == "round-repair"]
    assert repairs == [("down.0", 32, 24), ("conv1", 16, 8)]
    # with a proportional runtime nothing is free and the searched counts stand
    assert rounded(proportional_cost, searched_macs + 1e-9)[1] == searched_macs


def test_the_guard_rolls_back_or_refuses_a_slower_model():
    dense = toy()
    space = tp.search.SearchSpace(dense, X)
    odd = space.export({"conv1": tp.search.keep_ratio(24, 23)})  # 23 channels: 3x the cost
    aligned = space.export({"conv1": tp.search.keep_ratio(24, 16)})
    runtime = ChannelCostRuntime()
    verdict = tp.search.guard(dense, {"odd": odd, "aligned": aligned}, X, runtime)
    assert verdict.chosen == "aligned" and "rolled back to aligned" in verdict.message
    assert verdict.speedup("odd") < 1.0 < verdict.speedup("aligned")
    verdict = tp.search.guard(dense, {"odd": odd}, X, runtime)
    assert verdict.chosen is None and verdict.message.startswith("guard: refused")


def test_a_search_whose_result_is_slower_is_refused(tmp_path):
    _, result = search_toy(runtime=ChannelCostRuntime(slowdown=10.0))
    assert not result.accepted and result.model is None and result.metric is None
    assert "refused" in result.verdict.message
    tp.search.save_result(result, tmp_path / "toy.safetensors")
    assert not (tmp_path / "toy.safetensors").exists()
    assert json.loads((tmp_path / "toy.search.json").read_text())["accepted"] is False


def test_real_runtimes_time_models_in_turns():
    model = toy()
    wide = [nn.Conv2d(64, 64, 3, padding=1) for _ in range(3)]
    fast, slow = nn.Conv2d(3, 4, 1).eval(), nn.Sequential(nn.Conv2d(3, 64, 1), *wide).eval()
    for name in ("torch", "onnxruntime"):
        runtime = tp.search.Runtime(name, threads=1, repeats=5)
        dense_ms, small_ms, big_ms = runtime.time_models([model, fast, slow], X)
        assert small_ms < dense_ms < big_ms


def test_a_timing_table_times_each_job_once_and_survives_a_reload(tmp_path, monkeypatch):
    measured = []

    def fake_ms(runs, repeats, warmup):
        measured.append(len(runs))
        return [float(len(measured) * 10 + k) for k in range(len(runs))]

    monkeypatch.setattr("torchslim.search.runtime.interleaved_ms", fake_ms)
    path = tmp_path / "timings.json"
    small, wide = nn.Conv2d(3, 4, 1).eval(), nn.Conv2d(3, 8, 1).eval()
    runtime = tp.search.Runtime("torch", threads=1, repeats=2, timings=path)
    first = runtime.time([(small, (X,)), (wide, (X,))])
    assert first == [10.0, 11.0] and measured == [2]
    copy_of_small = nn.Conv2d(3, 4, 1).eval()  # other weights, same structure: same time
    again = tp.search.Runtime("torch", threads=1, repeats=2, timings=path)
    assert again.time([(wide, (X,)), (copy_of_small, (X,))]) == [11.0, 10.0]
    assert measured == [2]
    assert again.time([(small, (X[:, :, :4],))]) == [20.0]  # other input shape: timed
    other = tp.search.Runtime("torch", threads=1, repeats=3, timings=path)
    assert other.time([(small, (X,))]) == [30.0] and len(tp.search.TimingTable(path)) == 4
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable timing table.*delete it"):
        tp.search.Runtime("torch", timings=path)


# -------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: Target("flops", 0.5), "target kind must be one of macs, params, latency"),
        (lambda: Target("macs", 1.5), r"target macs must be a fraction in \(0, 1\)"),
        (
            lambda: tp.search.sensitivity(toy(), X, len, ratios=(0.5, 1.2)),
            r"sensitivity ratios must be in \(0, 1\), got 1.2",
        ),
        (lambda: tp.search.SearchSpace(toy(), X, units=["head"]), "unit 'head' names no module"),
        (
            lambda: tp.search.SearchSpace(toy(), X, units=["stem", "stem.0"]),
            "units 'stem' and 'stem.0' overlap",
        ),
        (lambda: tp.search.SearchSpace(toy(), X, units=["bn1"]), "'bn1' holds no prunable group"),
        (lambda: tp.search.SearchSpace(toy(), X).check({"conv9": 0.1}), "unknown unit 'conv9'"),
        (
            lambda: tp.search.SearchSpace(toy(), X).check({"conv1": 1.0}),
            r"ratio for unit 'conv1' must be in \[0, 1\)",
        ),
        (
            lambda: tp.search.sensitivity(toy(), X, lambda m: float("nan"), ratios=(0.5,)),
            "eval_fn returned nan",
        ),
        (
            lambda: tp.search.sensitivity(toy(), X, lambda m: "high", ratios=(0.5,)),
            "eval_fn must return a number, got str",
        ),
        (
            lambda: search_toy(target=Target("macs", 0.05), rounding="none", use_guard=False),
            "cannot reach macs <= 0.05 of dense",
        ),
        (lambda: search_toy(), "measure on a runtime"),
        (lambda: tp.search.Runtime("cuda"), "needs a CUDA device"),
        (lambda: tp.search.Runtime("tpu"), "runtime must be one of"),
        (lambda: tp.search.output_agreement(toy(), X, "l2"), "agreement kind must be one of"),
        (lambda: tp.search.SearchSpace(toy(), X, ignored_layers=["head"]), "ignored_layers takes"),
    ],
    ids=[
        "target-kind",
        "target-fraction",
        "sensitivity-ratio",
        "unit-not-a-module",
        "overlapping-units",
        "unit-without-group",
        "unknown-unit",
        "ratio-out-of-range",
        "nan-metric",
        "metric-not-a-number",
        "unreachable-target",
        "no-runtime",
        "no-cuda",
        "unknown-runtime",
        "agreement-kind",
        "ignored-name",
    ],
)
def test_bad_input_gets_a_clear_error(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
