"""FisherImportance: the empirical Fisher of channel masks, checked against masks put into the
forward by hand and differentiated sample by sample."""

import pytest
import torch
from torch import nn

import torchslim as tp
from torchslim.importance.fisher import FisherRecordingError


class SharedRead(nn.Module):
    """``h`` is read by two layers (one mask on ``h`` reaches both)."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(4, 6)
        self.q = nn.Linear(6, 3)
        self.k = nn.Linear(6, 3)
        self.out = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.tanh(self.up(x))
        if mask is not None:
            h = h * mask
        return self.out(self.q(h) * self.k(h))


class Flattened(nn.Module):
    """Conv channel ``c`` is read at four positions of the linear layer's input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 1)
        self.fc = nn.Linear(12, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        if mask is not None:
            h = h * mask.view(1, -1, 1, 1)
        return self.fc(h.flatten(1))


class Temporary(nn.Module):
    """``a`` reads a temporary freed as soon as it is read; the new tensor ``c`` reads is then
    often made at its address, under its ``id``."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.c = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.a(x * 2)
        if mask is not None:
            h = h * mask
        return self.c(torch.cat([h, h], -1))


def loss_of(output: torch.Tensor) -> torch.Tensor:
    return output.pow(2).sum()


def brute_force(model: nn.Module, batches: list[torch.Tensor], channels: int) -> torch.Tensor:
    """``mean_s (dL_s/dm)^2 / 2`` with the mask in the forward, one sample at a time."""
    squares = []
    for batch in batches:
        for sample in batch:
            mask = torch.ones(channels, dtype=torch.float64, requires_grad=True)
            (grad,) = torch.autograd.grad(loss_of(model(sample[None], mask)), mask)
            squares.append(grad.pow(2))
    return torch.stack(squares).mean(0) / 2


def recorded(model: nn.Module, batches: list[torch.Tensor]) -> tp.importance.FisherImportance:
    imp = tp.importance.FisherImportance()
    with imp.record(model):
        for batch in batches:
            loss_of(model(batch)).backward()
    return imp


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize(
    ("net", "root", "channels", "shape"),
    [(SharedRead, "up", 6, (4,)), (Flattened, "conv", 3, (1, 2, 2)), (Temporary, "a", 4, (4,))],
)
def test_fisher_equals_the_mask_gradient_per_sample(net, root, channels, shape, frozen):
    torch.manual_seed(0)
    model = net().double()
    batches = [torch.randn(3, *shape, dtype=torch.float64), torch.randn(2, *shape).double()]
    expected = brute_force(model, batches, channels)
    model.requires_grad_(not frozen)
    imp = recorded(model, batches)
    graph = tp.DependencyGraph().build_dependency(model, batches[0])
    layer = getattr(model, root)
    pruning_fn = tp.prune_conv_out_channels if root == "conv" else tp.prune_linear_out_channels
    group = graph.get_pruning_group(layer, pruning_fn, [0])
    assert torch.allclose(imp(group), expected, rtol=1e-10, atol=0)
    if frozen:
        assert all(p.grad is None for p in model.parameters())


def test_fisher_places_global_removals_where_the_loss_changes_least():
    torch.manual_seed(0)
    model = nn.ModuleDict(
        {
            "a": nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)),
            "b": nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)),
        }
    )
    with torch.no_grad():
        model["b"][2].weight.mul_(0.01)  # b's neurons barely reach the output

    class Parallel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.branches = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.branches["a"](x) + self.branches["b"](x)

    net = Parallel()
    batches = [torch.randn(8, 4) for _ in range(2)]
    imp = recorded(net, batches)
    pruner = tp.pruner.MetaPruner(
        net,
        batches[0],
        importance=imp,
        pruning_ratio=0.25,
        global_pruning=True,
        ignored_layers=[model["a"][2], model["b"][2]],
    )
    pruner.step()
    assert (model["a"][0].out_features, model["b"][0].out_features) == (8, 4)


def test_fisher_without_gradients_says_how_to_record():
    model = SharedRead()
    imp = tp.importance.FisherImportance()
    with imp.record(model), torch.no_grad():
        model(torch.randn(2, 4))
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(2, 4))
    group = graph.get_pruning_group(model.up, tp.prune_linear_out_channels, [0])
    with pytest.raises(FisherRecordingError, match=r"loss.backward\(\) inside"):
        imp(group)


def test_fisher_is_registered_for_the_cli():
    assert isinstance(tp.importance.make_importance("fisher"), tp.importance.FisherImportance)


def test_labels_drawn_from_the_model_record_the_true_fisher():
    logits = torch.tensor([2.0, 0.5, -1.0, 0.0]).repeat(20000, 1).requires_grad_()
    loss = tp.importance.sampled_label_loss(logits, torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad(loss * len(logits), logits)  # a row: softmax - onehot(label)
    p = logits[0].detach().softmax(0)
    # the mean square is the diagonal of the softmax curvature diag(p) - p p^T: p (1 - p)
    assert torch.allclose(grad.pow(2).mean(0), p * (1 - p), atol=0.01)
    again = tp.importance.sampled_label_loss(logits, torch.Generator().manual_seed(0))
    assert float(again) == float(loss)
