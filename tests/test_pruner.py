"""High-level pruners: ratios, scopes, global ranking, rounding, targets, sparse training."""

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import resnet18

import torchslim as tp
from torchslim.zoo import randomize_constant_parameters

X = torch.randn(1, 3, 64, 64)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return randomize_constant_parameters(resnet18().eval())


def widths(model):
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]


def test_seed_loop_halves_every_stage_in_five_steps(model):
    imp = tp.importance.MagnitudeImportance(p=2)
    ignored_layers = [m for m in model.modules() if isinstance(m, nn.Linear)]
    pruner = tp.pruner.MagnitudePruner(
        model, X, importance=imp, iterative_steps=5, ch_sparsity=0.5, ignored_layers=ignored_layers
    )
    base_macs, base_params = tp.utils.count_ops_and_params(model, X)
    history = []
    for _ in range(5):
        pruner.step()
        history.append(tp.utils.count_ops_and_params(model, X))
    assert set(widths(model)) == {32, 64, 128, 256}
    assert model.fc.out_features == 1000 and model(X).shape == (1, 1000)
    macs = [m for m, _ in history]
    assert macs == sorted(macs, reverse=True) and macs[-1] < 0.3 * base_macs
    with pytest.raises(RuntimeError, match="all 5 iterative steps are done"):
        pruner.step()


def test_interactive_groups_verify_exactly_before_pruning(model):
    pruner = tp.pruner.MagnitudePruner(model, X, pruning_ratio=0.25)
    report = pruner.step_and_verify()
    assert report.ok and report.worst < 1e-10
    assert report.checks[0].group == "12 groups together"
    assert model.layer1[0].conv1.out_channels == 48


def test_interactive_caller_may_change_indices(model):
    pruner = tp.pruner.MagnitudePruner(model, X, pruning_ratio=0.5)
    for group in pruner.step(interactive=True):
        group.prune(idxs=group.idxs[:1])
    assert set(widths(model)) == {63, 127, 255, 511}


def test_ratio_dict_scopes_modules_and_tuples(model):
    ratios = {model.layer1: 0.5, (model.layer3, model.layer4[1]): 0.25}
    tp.pruner.MagnitudePruner(model, X, pruning_ratio=0.0, pruning_ratio_dict=ratios).step()
    assert model.layer1[0].conv1.out_channels == 32
    assert model.layer2[0].conv1.out_channels == 128
    assert model.layer3[1].conv1.out_channels == 192
    assert model.layer4[1].conv1.out_channels == 384
    assert model.layer4[0].conv1.out_channels == 512


def test_global_pruning_ranks_across_groups_within_the_cap(model):
    pruner = tp.pruner.MagnitudePruner(
        model, X, pruning_ratio=0.4, global_pruning=True, max_pruning_ratio=0.6
    )
    before = {g.coupling.id: g.size for g in pruner.groups()}
    pruner.step()
    after = {g.coupling.id: g.size for g in pruner.DG.get_all_groups()}
    removed = sum(before[k] - after[k] for k in before)
    assert removed == math.floor(0.4 * sum(before.values()))
    assert all(after[k] >= math.ceil(0.4 * before[k]) for k in before)
    assert len({(before[k] - after[k]) / before[k] for k in before}) > 1, "not uniform"


def test_round_to_keeps_multiples(model):
    tp.pruner.MagnitudePruner(model, X, pruning_ratio=0.3, round_to=16).step()
    assert all(w % 16 == 0 for w in widths(model)[1:])
    assert model.conv1.out_channels == 48  # 64 * 0.7 = 44.8 rounds up to 48


def test_ignored_types_and_parameters(model):
    ignored = [nn.Linear, model.layer1[0].conv1.weight]
    tp.pruner.MagnitudePruner(model, X, pruning_ratio=0.5, ignored_layers=ignored).step()
    assert model.layer1[0].conv1.out_channels == 64
    assert model.layer1[1].conv1.out_channels == 32


def test_target_macs_reaches_two_times_fewer(model):
    pruner = tp.pruner.MagnitudePruner(model, X, target_macs=0.5, global_pruning=True)
    pruner.step()
    macs, _ = tp.utils.count_ops_and_params(model, X)
    assert 0.45 * pruner.base_macs < macs <= 0.5 * pruner.base_macs
    assert model(X).shape == (1, 1000)


def test_pruners_do_not_share_state(model):
    other = copy.deepcopy(model)
    first = tp.pruner.MagnitudePruner(model, X, pruning_ratio_dict={model.layer1: 0.5})
    second = tp.pruner.MagnitudePruner(other, X)
    assert first.ratio_scopes and not second.ratio_scopes
    assert first.ignored_modules is not second.ignored_modules
    assert first.DG is not second.DG


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pruning_ratio": 1.0}, r"pruning_ratio must be in \[0, 1\)"),
        ({"pruning_ratio": -0.1}, "pruning_ratio must be in"),
        ({"round_to": 0}, "round_to must be a positive int"),
        ({"iterative_steps": 0}, "iterative_steps must be an int >= 1"),
        ({"target_macs": 1.5}, r"target_macs must be a fraction in \(0, 1\)"),
        ({"ignored_layers": [nn.Conv2d(1, 1, 1)]}, "Conv2d not in the model"),
        ({"pruning_ratio_dict": {nn.Conv2d(1, 1, 1): 0.5}}, "keys must be modules of the model"),
        ({"pruning_ratio_dict": {"head": 0.5}}, r"unknown kinds \['head'\]; use \('width'"),
        ({"pruning_ratio_dict": {"heads": 1.5}}, r"pruning_ratio_dict\['heads'\] must be in"),
    ],
)
def test_bad_options_fail_clearly(model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        tp.pruner.MagnitudePruner(model, X, **kwargs)


def test_bn_scale_regularizer_adds_signed_l1(model):
    pruner = tp.pruner.BNScalePruner(model, X, reg=1e-2, bias_reg=1e-3)
    model.zero_grad()
    model(X).sum().backward()
    bn = model.layer1[0].bn1
    grad, bias_grad = bn.weight.grad.clone(), bn.bias.grad.clone()
    pruner.regularize(model)
    assert torch.allclose(bn.weight.grad - grad, 1e-2 * torch.sign(bn.weight), atol=1e-5)
    assert torch.allclose(bn.bias.grad - bias_grad, 1e-3 * torch.sign(bn.bias), atol=1e-5)
    pruner.regularize(model, reg=tp.pruner.decaying_l1(epoch=5, epochs=10))
    expected = 1e-2 * torch.sign(bn.weight) + 1e-2 * (1 - 0.9 * 0.5) * torch.sign(bn.weight)
    assert torch.allclose(bn.weight.grad - grad, expected, atol=1e-5)


def test_group_lasso_gradient_is_weight_over_group_channel_norm():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 1))
    pruner = tp.pruner.GroupNormPruner(model, torch.randn(1, 2), reg=0.1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    pruner.regularize(model)
    first, second = model[0].weight.detach(), model[2].weight.detach()
    norms = (first.pow(2).sum(1) + second[0].pow(2)).sqrt()
    assert torch.allclose(model[0].weight.grad, 0.1 * first / norms[:, None])
    assert torch.allclose(model[2].weight.grad[0], 0.1 * second[0] / norms)


def test_regularize_accepts_a_distributed_data_parallel_model(tmp_path, model):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1
    )
    try:
        wrapped = nn.parallel.DistributedDataParallel(model)
        pruner = tp.pruner.BNScalePruner(wrapped, X, reg=1e-2)
        wrapped(X).sum().backward()
        grad = model.bn1.weight.grad.clone()
        pruner.regularize(wrapped)
        assert torch.allclose(
            model.bn1.weight.grad - grad, 1e-2 * torch.sign(model.bn1.weight), atol=1e-5
        )
        pruner.step()
        assert model.conv1.out_channels == 32
    finally:
        dist.destroy_process_group()


class BaseBEVBackbone(nn.Module):
    """The PointPillars 2-D backbone of seed 000: strided conv blocks, each upsampled by a
    ConvTranspose2d deblock, the deblock outputs concatenated."""

    def __init__(self, in_channels=64, layers=(3, 5, 5), filters=(64, 128, 256), up=(128,) * 3):
        super().__init__()
        self.blocks, self.deblocks = nn.ModuleList(), nn.ModuleList()
        channels = in_channels
        for index, (count, width) in enumerate(zip(layers, filters)):
            stride = 2 if index else 1
            body = [nn.ZeroPad2d(1), nn.Conv2d(channels, width, 3, stride, bias=False)]
            body += [nn.BatchNorm2d(width), nn.ReLU()]
            for _ in range(count):
                body += [nn.Conv2d(width, width, 3, padding=1, bias=False)]
                body += [nn.BatchNorm2d(width), nn.ReLU()]
            self.blocks.append(nn.Sequential(*body))
            scale = 2**index
            self.deblocks.append(
                nn.Sequential(
                    nn.ConvTranspose2d(width, up[index], scale, stride=scale, bias=False),
                    nn.BatchNorm2d(up[index]),
                    nn.ReLU(),
                )
            )
            channels = width

    def forward(self, x):
        ups = []
        for block, deblock in zip(self.blocks, self.deblocks):
            x = block(x)
            ups.append(deblock(x))
        return torch.cat(ups, dim=1)


def test_seed_pointpillars_recipe():
    torch.manual_seed(0)
    model = randomize_constant_parameters(BaseBEVBackbone().eval())
    example_inputs = torch.randn(1, 64, 32, 32)
    imp = tp.importance.GroupNormImportance()
    ignored_layers = [m for m in model.modules() if isinstance(m, nn.ConvTranspose2d)]
    pruner = tp.pruner.GroupNormPruner(
        model,
        example_inputs,
        importance=imp,
        iterative_steps=5,
        pruning_ratio=0.2,
        ignored_layers=ignored_layers,
    )
    base_macs, base_params = tp.utils.count_ops_and_params(model, example_inputs)
    for _ in range(5):
        pruner.step()
    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    assert [d[0].out_channels for d in model.deblocks] == [128, 128, 128]
    assert [b[1].out_channels for b in model.blocks] == [52, 103, 205]
    assert model(example_inputs).shape == (1, 384, 32, 32)
    assert 0.55 < params / base_params < 0.75 and macs < base_macs


class C2fLike(nn.Module):
    """A YOLOv8 C2f block: conv, chunk in two, a bottleneck chain on one half, concat all."""

    def __init__(self, c1=16, c2=32, n=2):
        super().__init__()
        self.c = c2 // 2
        self.cv1 = nn.Sequential(
            nn.Conv2d(c1, 2 * self.c, 1, bias=False), nn.BatchNorm2d(2 * self.c)
        )
        self.m = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(self.c, self.c, 3, padding=1, bias=False), nn.BatchNorm2d(self.c)
            )
            for _ in range(n)
        )
        self.cv2 = nn.Sequential(nn.Conv2d((2 + n) * self.c, c2, 1, bias=False), nn.BatchNorm2d(c2))
        self.head = nn.Conv2d(c2, 5, 1)

    def forward(self, x):
        y = list(F.silu(self.cv1(x)).chunk(2, 1))
        for block in self.m:
            y.append(y[-1] + F.silu(block(y[-1])))
        return self.head(F.silu(self.cv2(torch.cat(y, 1))))


def test_seed_yolo_bn_l1_sparse_training_then_prune():
    torch.manual_seed(0)
    model = C2fLike()
    x, target = torch.randn(8, 16, 8, 8), torch.randn(8, 5, 8, 8)
    pruner = tp.pruner.BNScalePruner(model, x[:1], pruning_ratio=0.5, bias_reg=1e-2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    epochs = 4
    for epoch in range(epochs):
        optimizer.zero_grad()
        F.mse_loss(model(x), target).backward()
        pruner.regularize(model, reg=tp.pruner.decaying_l1(epoch, epochs))
        optimizer.step()
    model.eval()
    pruner.step()
    assert model.cv1[0].out_channels == 16 and model.m[0][0].out_channels == 8
    assert model.cv2[0].in_channels == 32 and model.head.out_channels == 5
    assert model(x).shape == (8, 5, 8, 8)


class Gain(nn.Module):
    """A custom layer whose ``channels`` attribute must follow pruning."""

    def __init__(self, channels):
        super().__init__()
        self.channels = channels
        self.gain = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x):
        return x * self.gain[None, :, None, None]


class GainPruner(tp.BasePruningFunc):
    def param_roles(self, layer):
        return {("gain", 0): "out"}

    def sync(self, layer):
        layer.channels = layer.gain.numel()


@pytest.mark.parametrize("key", ["type", "instance"])
def test_customized_pruners_by_type_or_instance(key):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Gain(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    custom = {Gain if key == "type" else model[1]: GainPruner()}
    x = torch.randn(1, 3, 8, 8)
    tp.pruner.MagnitudePruner(model, x, pruning_ratio=0.5, customized_pruners=custom).step()
    assert model[0].out_channels == 4 and model[1].channels == 4 and model(x).shape == (1, 4, 6, 6)


def test_unwrapped_parameters_must_belong_to_the_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Gain(8), nn.ReLU(), nn.Conv2d(8, 4, 1))
    with pytest.raises(ValueError, match="unwrapped_parameters holds a parameter"):
        tp.pruner.MagnitudePruner(
            model, torch.randn(1, 3, 8, 8), unwrapped_parameters=[(nn.Parameter(torch.ones(1)), 0)]
        )


def test_step_and_verify_checks_target_mode_whose_increments_revisit_a_group():
    """Target mode prunes in increments and may take from the same group again, with indices
    relative to what the earlier increment left: the check must still compare like with like."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 32, 3), nn.ReLU(), nn.Conv2d(32, 32, 3), nn.ReLU(), nn.Conv2d(32, 8, 3)
    ).eval()
    x = torch.randn(1, 3, 16, 16)
    pruner = tp.pruner.MagnitudePruner(model, x, target_macs=0.5, global_pruning=True)
    report = pruner.step_and_verify()
    assert report.ok and report.worst < 1e-10
    assert sum(check.removed for check in report.checks) == (32 - model[0].out_channels) + (
        32 - model[2].out_channels
    )


def test_importance_and_ignored_layers_by_name():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    by_name = resnet18().eval()
    pruner = tp.pruner.MetaPruner(
        by_name, x, importance="l1", pruning_ratio=0.5, ignored_layers=["layer4.*", "conv1"]
    )
    assert isinstance(pruner.importance, tp.importance.MagnitudeImportance)
    assert pruner.importance.p == 1
    pruner.step()
    assert (
        by_name.layer4[0].conv1.out_channels == 512 and by_name.layer2[0].conv1.out_channels == 64
    )
    assert by_name.conv1.out_channels == 64  # conv1 kept: its residual width stays whole
    cls = tp.pruner.MetaPruner(resnet18(), x, importance=tp.importance.MagnitudeImportance)
    assert isinstance(cls.importance, tp.importance.MagnitudeImportance)
    with pytest.raises(ValueError, match="names no module or parameter of the model"):
        tp.pruner.MetaPruner(resnet18(), x, ignored_layers=["head"])
    with pytest.raises(ValueError, match="unknown importance 'l3'"):
        tp.pruner.MetaPruner(resnet18(), x, importance="l3")
    with pytest.raises(TypeError, match="importance must be a criterion"):
        tp.pruner.MetaPruner(resnet18(), x, importance=3)


def test_the_summary_says_per_kind_what_was_asked_and_why_groups_kept_every_channel():
    from helpers import tiny_llama

    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    pruner = tp.pruner.MetaPruner(
        model, ids, pruning_ratio=0.0, pruning_ratio_dict={"heads": 0.25, "neurons": 0.2}
    )
    with pytest.warns(UserWarning, match=r"asked for 25% of the heads, none were removed"):
        pruner.step()
    rows = {row.kind: row for row in pruner.summary()}
    neurons = rows["neurons"]  # two MLPs, and lm_head's outputs (97, refused: a model output)
    assert (neurons.groups, neurons.pruned, neurons.before, neurons.after) == (3, 2, 225, 201)
    assert neurons.why_not == "1 refused (a model output)"
    assert rows["heads"].why_not == "2 where 25% of 2 rounds to 0"
    assert rows["width"].why_not == "1 not asked" and rows["width"].asked == 0.0


def test_a_pruning_ratio_that_removes_nothing_is_said_and_one_that_prunes_is_not():
    x = torch.randn(1, 3, 32, 32)
    with pytest.warns(UserWarning, match=r"pruning_ratio=0.001 removed no channel \(\d+ where"):
        tp.pruner.MagnitudePruner(resnet18(), x, pruning_ratio=0.001).step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tp.pruner.MagnitudePruner(resnet18(), x, pruning_ratio=0.5).step()
