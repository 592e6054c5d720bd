"""The registries and hooks that say what a layer is, which criteria exist, what runs after
pruning, and what a pruned model keeps: one answer each, open to users."""

import logging
import pickle
import warnings

import pytest
import torch
from torch import nn

import torchslim as tp
from torchslim.cli.main import main
from torchslim.graph.hooks import register_prune_hook
from torchslim.graph.record import model_record
from torchslim.pruning import Role, layer_kind, register_layer
from torchslim.pruning.layers import OVER_CHANNELS, PER_CHANNEL, role_of


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).mean((2, 3)))


X = torch.randn(2, 3, 8, 8)


def test_one_registry_answers_what_a_layer_is():
    assert layer_kind(nn.BatchNorm2d(4)).norm == PER_CHANNEL
    assert layer_kind(nn.LayerNorm(4)).norm == OVER_CHANNELS
    assert layer_kind(nn.GroupNorm(2, 4)).norm == OVER_CHANNELS
    assert layer_kind(nn.Embedding(10, 4)).embedding
    assert layer_kind(nn.Linear(4, 5)).input_dim(nn.Linear(4, 5)) == 1
    assert layer_kind(nn.Conv2d(4, 4, 3, groups=2)).input_dim(nn.Conv2d(4, 4, 3, groups=2)) is None
    assert layer_kind(nn.ReLU()).pruner is None

    class MyRMSNorm(nn.Module):  # recognised by its structure
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    assert layer_kind(MyRMSNorm()).norm == OVER_CHANNELS


def test_a_registered_layer_kind_reaches_criteria_and_kinds():
    class Scale(nn.BatchNorm2d):
        pass

    class Gate(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(width) + 0.5)

        def forward(self, x):
            return x * self.weight[:, None, None]

    class GatePruner(tp.BasePruningFunc):
        def param_roles(self, layer):
            return {("weight", 0): Role.OUT}

    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.gate = Gate(8)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            return self.head(self.gate(self.conv(x)).mean((2, 3)))

    assert layer_kind(Scale(4)).norm == PER_CHANNEL  # subclasses share their base's entry
    register_layer(Gate, GatePruner(), norm=PER_CHANNEL)
    model = Gated()
    with torch.no_grad():
        model.gate.weight.copy_(torch.arange(1.0, 9.0))
    pruner = tp.pruner.MetaPruner(
        model, X, importance=tp.importance.BNScaleImportance(), pruning_ratio=0.25
    )
    pruner.step()
    # BN-scale importance now reads the gate as a per-channel scale: the two smallest go
    assert model.gate.weight.tolist() == [3.0, 4.0, 5.0, 6.0, 7.0, 8.0]


def test_roles_come_from_the_registry_not_from_names():
    assert role_of(tp.prune_conv_out_channels) == Role.OUT
    assert role_of(tp.prune_linear_in_channels) == Role.IN
    assert tp.DependencyGraph.is_out_channel_pruning_fn(tp.prune_conv)

    def prune_my_out_layer(layer, idxs):
        return layer

    assert not tp.DependencyGraph.is_out_channel_pruning_fn(prune_my_out_layer)
    with pytest.raises(ValueError, match="not a layer pruning function"):
        role_of(prune_my_out_layer)


def test_plans_store_roles_as_plain_strings():
    model = Net()
    tp.pruner.MetaPruner(model, X, pruning_ratio=0.25, ignored_layers=[model.head]).step()
    roles = {op["role"] for step in model_record(model)["history"] for op in step["ops"]}
    assert roles == {"out", "in"} and all(type(r) is str for r in roles)


def test_a_pruned_model_keeps_only_plain_data():
    model = Net()
    tp.pruner.MetaPruner(model, X, pruning_ratio=0.25, ignored_layers=[model.head]).step()
    record = vars(model)["_torchslim"]
    assert set(record) == {"history", "size_attributes"}
    assert b"torchslim" not in pickle.dumps(record)  # torch.save'd models load without us


def test_prune_hooks_run_after_each_step_and_can_be_removed():
    seen = []
    handle = register_prune_hook(seen.append)
    model = Net()
    try:
        pruner = tp.pruner.MetaPruner(model, X, pruning_ratio=0.25, iterative_steps=2)
        pruner.step()
        pruner.step()
    finally:
        handle.remove()
    assert seen == [model, model]
    tp.pruner.MetaPruner(Net(), X, pruning_ratio=0.25).step()
    assert len(seen) == 2


def test_build_dependency_checks_unwrapped_parameters_and_logs_when_verbose(caplog):
    model = Net()
    with pytest.raises(ValueError, match="not in the model"):
        tp.DependencyGraph().build_dependency(
            model, X, unwrapped_parameters=[(nn.Parameter(torch.ones(3)), 0)]
        )
    with pytest.raises(ValueError, match="dim 2 out of range"):
        tp.DependencyGraph().build_dependency(model, X, unwrapped_parameters=[(model.bn.weight, 2)])
    with caplog.at_level(logging.INFO, logger="torchslim"):
        tp.DependencyGraph().build_dependency(model, X, verbose=False)
        assert not caplog.records
        graph = tp.DependencyGraph().build_dependency(model, X)
    assert [r.getMessage() for r in caplog.records] == [graph.summary()]
    assert "groups, 1 prunable" in graph.summary()


def test_a_registered_criterion_reaches_the_cli(tmp_path, capsys):
    made = []

    def smallest_first():
        made.append(tp.importance.RandomImportance())
        return made[-1]

    tp.importance.register_importance("test-random", smallest_first)
    assert "test-random" in tp.importance.importance_names()
    code = main(
        [
            "prune",
            "torchslim.cli.demo:DigitsNet",
            "--input-shape",
            "1,1,8,8",
            "--ratio",
            "0.25",
            "--importance",
            "test-random",
        ]
    )
    assert code == 0 and len(made) == 1
    assert "reduction" in capsys.readouterr().out


def test_old_import_paths_work_with_a_deprecation_warning():
    from torchslim.spaces.trace import iter_tensors

    with pytest.warns(DeprecationWarning, match="torchslim.spaces.trace.iter_tensors"):
        from torchslim.graph.capture import iter_tensors as old
    assert old is iter_tensors
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        from torchslim.capture.modules import call_forward  # noqa: F401
    with pytest.raises(ImportError):
        from torchslim.graph.capture import no_such_name  # noqa: F401
