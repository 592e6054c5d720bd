"""The API shown in the seed documents runs unchanged with ``import torchslim as tp``."""

from __future__ import annotations

import copy

import pytest
import torch
from torchvision.models import resnet18

import torchslim as tp
from torchslim.zoo import randomize_constant_parameters


@pytest.fixture
def model():
    torch.manual_seed(0)
    return randomize_constant_parameters(resnet18().eval())


def test_minimal_example_prunes_conv1_and_everything_coupled(model):
    DG = tp.DependencyGraph()
    DG.build_dependency(model, example_inputs=torch.randn(1, 3, 64, 64))
    pruning_idxs = [2, 6, 9]
    pruning_group = DG.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=pruning_idxs)
    text = pruning_group.details()
    assert "Pruning Root" in text and str(pruning_group) == text
    targets = {dep.target.name for dep, _ in pruning_group}
    assert {"conv1", "bn1", "layer1.0.conv1", "layer1.0.bn2", "layer2.0.downsample.0"} <= targets
    assert all(idxs == [2, 6, 9] for _, idxs in pruning_group)
    assert DG.check_pruning_group(pruning_group)
    pruning_group.prune()
    assert model.conv1.out_channels == 61 and model.bn1.num_features == 61
    assert model.layer2[0].downsample[0].in_channels == 61
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_scanning_all_groups_and_pruning_partial_indices(model):
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 64, 64))
    reference = copy.deepcopy(model)
    count = 0
    for group in DG.get_all_groups(
        ignored_layers=[model.conv1], root_module_types=[torch.nn.Conv2d]
    ):
        idxs = [2, 4, 6]
        group.prune(idxs=idxs)
        count += 1
    assert count == 11, "12 groups minus the one rooted at the ignored conv1"
    assert model.conv1.out_channels == 64
    assert model.layer1[0].conv1.out_channels == 61
    assert model(torch.randn(1, 3, 64, 64)).shape == reference(torch.randn(1, 3, 64, 64)).shape


def test_iteration_yields_dep_and_idxs_with_target_and_handler(model):
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 64, 64))
    group = DG.get_pruning_group(model.layer1[0].conv1, tp.prune_conv_out_channels, idxs=[0])
    handlers = {dep.target.name: dep.handler for dep, _ in group}
    assert handlers["layer1.0.conv1"] == tp.prune_conv_out_channels
    assert handlers["layer1.0.bn1"] == tp.prune_batchnorm_out_channels
    assert handlers["layer1.0.conv2"] == tp.prune_conv_in_channels
    assert DG.is_out_channel_pruning_fn(tp.prune_conv_out_channels)
    assert not DG.is_out_channel_pruning_fn(tp.prune_linear_in_channels)
    for dep, idxs in group:
        assert dep.target.module is dict(model.named_modules())[dep.target.name]
        assert idxs == [0]


def test_low_level_functions_fix_dependencies_by_hand(model):
    tp.prune_conv_out_channels(model.conv1, idxs=[2, 6, 9])
    tp.prune_batchnorm_out_channels(model.bn1, idxs=[2, 6, 9])
    for block in model.layer1:
        tp.prune_conv_in_channels(block.conv1, idxs=[2, 6, 9])
        tp.prune_conv_out_channels(block.conv2, idxs=[2, 6, 9])
        tp.prune_batchnorm_out_channels(block.bn2, idxs=[2, 6, 9])
    tp.prune_conv_in_channels(model.layer2[0].conv1, idxs=[2, 6, 9])
    tp.prune_conv_in_channels(model.layer2[0].downsample[0], idxs=[2, 6, 9])
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 1000)


def test_old_strategy_and_pruning_plan_names(model):
    DG = tp.DependencyGraph()
    DG.build_dependency(model, example_inputs=torch.randn(1, 3, 64, 64))
    strategy = tp.strategy.L1Strategy()
    pruning_idxs = strategy(model.conv1.weight, amount=0.4)
    norms = model.conv1.weight.detach().abs().sum((1, 2, 3))
    assert len(pruning_idxs) == 25
    assert max(norms[pruning_idxs]) <= min(norms[[i for i in range(64) if i not in pruning_idxs]])
    plan = DG.get_pruning_plan(model.conv1, tp.prune_conv, idxs=pruning_idxs)
    plan.exec()
    assert model.conv1.out_channels == 39
    assert len(tp.strategy.RandomStrategy()(model.layer1[0].conv1.weight, amount=0.5)) == 32
    assert tp.strategy.L2Strategy()(model.layer1[0].conv1.weight, amount=0.0) == []


def test_pruned_model_saves_and_loads_as_a_whole_object(model, tmp_path):
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 64, 64))
    DG.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[2, 6, 9]).prune()
    torch.save(model, tmp_path / "model.pth")
    loaded = torch.load(tmp_path / "model.pth", weights_only=False)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded(x), model(x))


def test_group_membership_queries(model):
    DG = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 64, 64))
    group = DG.get_pruning_group(model.conv1, tp.prune_conv_out_channels, idxs=[1, 3])
    dep_bn = next(dep for dep, _ in group if dep.target.name == "bn1")
    assert group.has_dep(dep_bn)
    assert group.has_pruning_op(dep_bn, [1]) and not group.has_pruning_op(dep_bn, [2])
    other = DG.get_pruning_group(model.layer2[0].conv1, tp.prune_conv_out_channels, idxs=[0])
    assert not other.has_dep(dep_bn)
