"""MACs and parameter counting: hand-computed values for every counted op."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import torchslim as tp


def macs(model: nn.Module, inputs) -> int:
    return tp.utils.count_ops_and_params(model, inputs)[0]


@pytest.mark.parametrize(
    ("layer", "shape", "expected"),
    [
        # out numel (1*8*6*6) x in/groups (4) x kernel (3*3)
        (nn.Conv2d(4, 8, 3), (1, 4, 8, 8), 288 * 4 * 9),
        # grouped: each output sees 4/2 input channels
        (nn.Conv2d(4, 8, 3, groups=2), (1, 4, 8, 8), 288 * 2 * 9),
        # depthwise: one input channel per output
        (nn.Conv2d(8, 8, 3, groups=8, padding=1), (2, 8, 5, 5), 2 * 8 * 25 * 9),
        # transposed: every input element scatters into out/groups x kernel outputs
        (nn.ConvTranspose2d(4, 6, 3, stride=2), (1, 4, 5, 5), 100 * 6 * 9),
        (nn.ConvTranspose1d(4, 6, 3, groups=2), (3, 4, 7), 3 * 4 * 7 * 3 * 3),
        (nn.Conv3d(2, 3, 2), (1, 2, 3, 3, 3), 3 * 8 * 2 * 8),
        (nn.Linear(10, 7), (5, 3, 10), 15 * 7 * 10),
    ],
)
def test_layer_macs_match_hand_counts(layer, shape, expected):
    assert macs(layer, torch.randn(shape)) == expected


class Attention(nn.Module):
    def forward(self, q, k, v):
        scores = q @ k.transpose(-1, -2)
        mixed = torch.einsum("bhls,bhsd->bhld", scores, v)
        return mixed + F.scaled_dot_product_attention(q, k, v)


def test_attention_products_are_counted():
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 7, 4), torch.randn(2, 3, 7, 6)
    # q@k^T: 2*3*5*7 outputs x 4; einsum: 2*3*5*7*6; sdpa: 2*3*5 rows x 7 x (4 + 6)
    expected = 210 * 4 + 210 * 6 + 30 * 7 * 10
    assert macs(Attention(), (q, k, v)) == expected


def test_multihead_attention_counts_projections_and_attention():
    layer = nn.MultiheadAttention(16, 4, batch_first=True)
    x = torch.randn(2, 5, 16)
    projections = 4 * 10 * 16 * 16
    attention = 2 * 2 * 5 * 5 * 16
    total, params, per_layer, _ = tp.utils.count_ops_and_params(layer, (x, x, x), layer_wise=True)
    assert total == projections + attention
    assert params == 4 * 16 * 16 + 4 * 16
    assert per_layer == {layer: total, layer.out_proj: 0}  # out_proj runs inside the MHA op


def test_resnet18_matches_published_count_and_restores_train_mode():
    model = torchvision.models.resnet18()
    model.train()
    before = model.bn1.running_mean.clone()
    total, params = tp.utils.count_ops_and_params(model, torch.randn(1, 3, 224, 224))
    assert params == 11_689_512
    assert round(total / 1e9, 2) == 1.81
    assert model.training and model.layer1[0].bn1.training
    assert torch.equal(model.bn1.running_mean, before)


def test_layer_wise_breakdown_sums_to_totals_and_counts_shared_params_once():
    shared = nn.Linear(4, 4)
    model = nn.Sequential(shared, nn.ReLU(), shared, nn.Conv1d(4, 2, 1))
    x = torch.randn(3, 4, 4)
    total, params, layer_macs, layer_params = tp.utils.count_ops_and_params(
        model, x, layer_wise=True
    )
    assert params == 20 + 10
    assert layer_params == {model: params, shared: 20, model[1]: 0, model[3]: 10}
    assert layer_macs == {model: total, shared: 2 * 48 * 4, model[1]: 0, model[3]: 3 * 2 * 4 * 4}
    assert total == 2 * 48 * 4 + 3 * 2 * 4 * 4
    own = tp.utils.ops_counter.own_counts(model, layer_macs, layer_params)
    assert own == [("0", 2 * 48 * 4, 20), ("3", 3 * 2 * 4 * 4, 10)]


def test_recurrent_layers_count_every_weight_once_per_step():
    model = nn.LSTM(5, 6, num_layers=2, bidirectional=True, proj_size=3)
    x = torch.randn(7, 2, 5)
    weights = sum(p.numel() for n, p in model.named_parameters() if "weight" in n)
    assert tp.utils.count_ops_and_params(model, x)[0] == 7 * 2 * weights
    cell = nn.GRUCell(5, 6)
    assert tp.utils.count_ops_and_params(cell, torch.randn(4, 5))[0] == 4 * 3 * 6 * (5 + 6)


def test_counting_runs_on_meta_tensors():
    model = torchvision.models.resnet18().to("meta")
    total, params = tp.utils.count_ops_and_params(model, torch.empty(1, 3, 224, 224, device="meta"))
    assert params == 11_689_512
    assert round(total / 1e9, 2) == 1.81


def test_forward_fn_and_dict_inputs():
    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)

        def forward(self, x, scale=1.0):
            return self.fc(x) * scale

    model = Named()
    x = torch.randn(4, 3)
    assert macs(model, {"x": x, "scale": 2.0}) == 24
    total, _ = tp.utils.count_ops_and_params(model, x, forward_fn=lambda m, i: m(i[:2]))
    assert total == 12


def test_counts_print_alike_in_every_command():
    from torchslim.utils.ops_counter import count

    printed = [count(n) for n in (610, 94_190, 609_500, 11_689_512, 148_600_000, 1.82e9, 3e12)]
    assert printed == ["610", "94.19 K", "609.5 K", "11.69 M", "148.6 M", "1.820 G", "3.000 T"]
