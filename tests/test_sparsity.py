"""Unstructured (PaddleSlim-style) and N:M sparsity: achieved sparsity, skipped layers, masks
that survive optimizers, clean export, and the hand-off from structural pruning."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchslim as tp
from torchslim.sparsity import (
    GMPUnstructuredPruner,
    NMSparsifier,
    UnstructuredPruner,
    check_nm,
    nm_mask,
    satisfies_nm,
    to_semi_structured,
    to_sparse_csr,
)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def prunable(model):
    return {n: p for n, p in model.named_parameters() if p.dim() > 1}


def zeros(tensors):
    return sum(int((t == 0).sum()) for t in tensors)


def train(model, pruner, optimizer, steps=5):
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(steps):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step()


def test_seed_ratio_mode_reaches_the_ratio_and_leaves_norms_and_biases():
    model = small_cnn()
    pruner = UnstructuredPruner(model, mode="ratio", ratio=0.55)
    train(model, pruner, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9))
    pruner.update_params()
    weights = prunable(model).values()
    total = sum(w.numel() for w in weights)
    assert zeros(weights) == int(0.55 * total)
    for name, param in model.named_parameters():
        if param.dim() == 1:
            assert int((param == 0).sum()) == 0, f"{name} was pruned"
    expected = zeros(weights) / sum(p.numel() for p in model.parameters())
    assert UnstructuredPruner.total_sparse(model) == pytest.approx(expected)
    assert "whole model" in str(pruner) and set(pruner.sparsity_report()) == set(prunable(model))


def test_seed_threshold_mode_removes_exactly_the_small_weights():
    model = small_cnn()
    before = {n: p.detach().clone() for n, p in prunable(model).items()}
    pruner = UnstructuredPruner(model, mode="threshold", threshold=0.1)
    pruner.update_params()
    for name, param in prunable(model).items():
        small = before[name].abs() < 0.1
        assert torch.all(param[small] == 0) and torch.equal(param[~small], before[name][~small])


def test_custom_skip_params_func_by_module_or_parameter_name():
    model = small_cnn()

    def skip(m):
        return {"8", "0.weight"}

    pruner = UnstructuredPruner(model, ratio=0.5, skip_params_func=skip)
    names = {n for n, _ in model.named_parameters()}
    assert set(pruner.masks.params) == names - {"8.weight", "8.bias", "0.weight"}
    assert zeros([model[8].weight, model[0].weight]) == 0


def test_local_sparsity_prunes_each_layer_by_the_ratio():
    model = small_cnn()
    pruner = UnstructuredPruner(model, ratio=0.3, local_sparsity=True)
    for name, param in prunable(model).items():
        assert int((param == 0).sum()) == int(0.3 * param.numel()), name
    assert all(
        v == pytest.approx(int(0.3 * prunable(model)[k].numel()) / prunable(model)[k].numel())
        for k, v in pruner.sparsity_report().items()
    )


@pytest.mark.parametrize(
    "make_optimizer",
    [
        lambda params: torch.optim.SGD(params, lr=0.5, momentum=0.9),
        lambda params: torch.optim.Adam(params, lr=0.05),
    ],
    ids=["sgd-momentum", "adam"],
)
def test_optimizers_never_revive_a_pruned_weight(make_optimizer):
    model = small_cnn()
    optimizer = make_optimizer(model.parameters())
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    F.cross_entropy(model(x), y).backward()
    optimizer.step()  # momentum / moments built on the dense weights
    optimizer.zero_grad()
    pruner = UnstructuredPruner(model, mode="threshold", threshold=0.15)
    masks = {n: m.clone() for n, m in pruner.masks.masks.items()}
    for _ in range(4):
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        for name, param in pruner.masks.params.items():
            assert torch.all(param[~masks[name]] == 0), name


def test_strip_leaves_a_plain_model_with_the_original_keys():
    model = small_cnn()
    keys = list(model.state_dict())
    pruner = UnstructuredPruner(model, ratio=0.6)
    plain = pruner.strip()
    assert list(plain.state_dict()) == keys
    assert all(not m._forward_pre_hooks for m in plain.modules())
    fresh = small_cnn()
    fresh.load_state_dict(plain.state_dict())
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(fresh.eval()(x), plain.eval()(x))
    optimizer = torch.optim.SGD(plain.parameters(), lr=1.0)
    plain(x).sum().backward()
    optimizer.step()  # no hook left: weights move freely again
    assert UnstructuredPruner.total_sparse(plain) < 0.1


def test_gmp_follows_the_cubic_schedule():
    model = small_cnn()
    configs = {
        "stable_iterations": 2,
        "pruning_iterations": 10,
        "pruning_steps": 5,
        "initial_ratio": 0.1,
    }
    pruner = GMPUnstructuredPruner(model, ratio=0.8, configs=configs)
    assert pruner.scheduled_ratio(0) == 0.0
    assert pruner.scheduled_ratio(2) == pytest.approx(0.1)
    assert pruner.scheduled_ratio(7) == pytest.approx(0.8 - 0.7 * (1 - 4 / 10) ** 3)  # t=4
    assert pruner.scheduled_ratio(12) == pytest.approx(0.8)
    for _ in range(13):
        pruner.step()
    weights = prunable(model).values()
    assert zeros(weights) == int(0.8 * sum(w.numel() for w in weights))
    with pytest.raises(ValueError, match="unknown GMP configs"):
        GMPUnstructuredPruner(small_cnn(), configs={"pruning_iteration": 3})


def test_nm_mask_keeps_the_largest_in_every_block():
    weight = torch.tensor([[0.1, -3.0, 2.0, 0.5, 1.0, 1.5, -0.2, 0.3]])
    assert nm_mask(weight, 2, 4).tolist() == [[False, True, True, False, True, True, False, False]]
    assert nm_mask(weight, 1, 4).sum() == 2 and nm_mask(weight, 4, 8).sum() == 4


@pytest.mark.parametrize(("n", "m"), [(2, 4), (1, 4), (4, 8)])
def test_nm_sparsifier_on_linear_and_conv(n, m):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 4 * 4, 8))
    sparsifier = NMSparsifier(model, n, m)
    assert check_nm(model, n, m) == []
    conv = model[0].weight
    assert int((conv != 0).sum()) == conv.numel() * n // m
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(2, 8, 6, 6)).sum().backward()
    optimizer.step()
    assert check_nm(model, n, m) == []
    sparsifier.strip()
    assert satisfies_nm(model[3].weight, n, m)


def test_semi_structured_hand_off_is_skipped_cleanly_on_cpu():
    model = nn.Sequential(nn.Linear(8, 8))
    NMSparsifier(model, 2, 4).strip()
    with pytest.warns(UserWarning, match="not on a CUDA device"):
        assert to_semi_structured(model) == []
    assert satisfies_nm(model[0].weight, 2, 4)


def test_structural_pruning_with_round_to_keeps_nm_alignment():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 24, 3),
        nn.BatchNorm2d(24),
        nn.ReLU(),
        nn.Conv2d(24, 16, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    ).eval()
    x = torch.randn(1, 3, 8, 8)
    unrounded, aligned = copy.deepcopy(model), copy.deepcopy(model)
    tp.pruner.MagnitudePruner(aligned, x, pruning_ratio=0.3, round_to=4).step()
    assert aligned[3].in_channels % 4 == 0 and aligned[3].in_channels < 24
    NMSparsifier(aligned, 2, 4, skip=lambda name, module: name == "0")
    assert check_nm(aligned, 2, 4, layer_types=(nn.Linear,)) == []
    assert satisfies_nm(aligned[3].weight, 2, 4)
    tp.pruner.MagnitudePruner(unrounded, x, pruning_ratio=0.3).step()
    assert unrounded[3].in_channels == 17
    with pytest.raises(ValueError, match=r"3.weight: input size 17 is not divisible by m=4"):
        NMSparsifier(unrounded, 2, 4, skip=lambda name, module: name == "0")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.0}, r"ratio must be in \[0, 1\)"),
        ({"ratio": -0.2}, r"ratio must be in \[0, 1\)"),
        ({"mode": "threshold", "threshold": -0.01}, "threshold must be >= 0"),
        ({"mode": "percent"}, "mode must be 'ratio' or 'threshold'"),
    ],
)
def test_bad_settings_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        UnstructuredPruner(small_cnn(), **kwargs)


def test_bad_patterns_fail_clearly():
    with pytest.raises(ValueError, match="0 < n < m"):
        nm_mask(torch.ones(4, 8), 4, 4)
    with pytest.raises(ValueError, match="input size 6 is not divisible by m=4"):
        nm_mask(torch.ones(4, 6), 2, 4)


def test_csr_export_computes_the_same_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 4)).eval()
    UnstructuredPruner(model, ratio=0.8).strip()
    x = torch.randn(3, 64)
    expected = model(x)
    assert to_sparse_csr(model, min_sparsity=0.5) == ["0", "2"]
    assert model[0].weight.layout == torch.sparse_csr
    assert torch.allclose(model(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match="min_sparsity"):
        to_sparse_csr(model, min_sparsity=2.0)


def test_conv1x1_only_prunes_just_pointwise_convolutions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 1), nn.Flatten(), nn.Linear(8, 2))
    pruner = UnstructuredPruner(model, ratio=0.5, prune_params_type="conv1x1_only")
    assert set(pruner.masks.params) == {"1.weight"}
    assert (
        int((model[1].weight == 0).sum()) == 32 and zeros([model[0].weight, model[3].weight]) == 0
    )
