"""The bad-input catalogue of docs/errors.md: each misuse ends in a clear message."""

import gc

import pytest
import torch
from torch import nn

import torchslim as tp

X = torch.randn(1, 3, 8, 8)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.a(x))))


def build(model, inputs=X):
    return tp.DependencyGraph().build_dependency(model, example_inputs=inputs)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (torch.randn(1, 5, 8, 8), "forward failed on the example inputs while tracing: .*channels"),
        (X.double(), "forward failed on the example inputs while tracing: .*(type|dtype)"),
        ({"not_an_argument": X}, "forward failed on the example inputs while tracing"),
        ([1, 2, 3], "example_inputs must contain at least one tensor"),
    ],
    ids=["shape", "dtype", "keywords", "no-tensor"],
)
def test_wrong_example_inputs(inputs, message):
    with pytest.raises((RuntimeError, ValueError), match=message):
        build(Net(), inputs)


def test_a_forward_that_raises_is_reported_with_its_error():
    class Broken(Net):
        def forward(self, x):
            raise KeyError("missing feature map")

    with pytest.raises(RuntimeError, match="while tracing: 'missing feature map'"):
        build(Broken())


@pytest.mark.parametrize("collecting", [True, False])
def test_a_build_leaves_the_garbage_collector_as_it_was_even_when_it_fails(collecting):
    class Broken(Net):
        def forward(self, x):
            assert not gc.isenabled()  # paused while tracing
            raise KeyError("missing feature map")

    gc.enable() if collecting else gc.disable()
    try:
        with pytest.raises(RuntimeError, match="missing feature map"):
            build(Broken())
        assert gc.isenabled() == collecting
        build(Net())
        assert gc.isenabled() == collecting
    finally:
        gc.enable()


def test_not_a_module():
    with pytest.raises(TypeError, match="model must be an nn.Module, got function"):
        tp.DependencyGraph().build_dependency(lambda x: x, X)


@pytest.mark.parametrize("wrap", ["data_parallel", "compile"])
def test_wrapped_models_are_traced_through_their_module(wrap):
    model = Net().eval()
    wrapped = nn.DataParallel(model) if wrap == "data_parallel" else torch.compile(model)
    graph = build(wrapped)
    assert graph.model is model
    graph.get_pruning_group(model.a, tp.prune_conv_out_channels, [0]).prune()
    assert model.a.out_channels == 3 and wrapped(X).shape == (1, 2, 8, 8)


def test_train_mode_and_statistics_are_restored_after_tracing():
    model = Net().train()
    before = model.bn.running_mean.clone()
    build(model)
    assert model.training and model.bn.training
    assert torch.equal(model.bn.running_mean, before) and model.bn.num_batches_tracked == 0


def test_frozen_parameters_prune_and_stay_frozen():
    model = Net().eval().requires_grad_(False)
    group = build(model).get_pruning_group(model.a, tp.prune_conv_out_channels, [1])
    group.prune()
    assert model.a.weight.shape[0] == 3 and not model.a.weight.requires_grad


def test_group_indices_out_of_range_and_emptying_a_layer():
    model = Net().eval()
    graph = build(model)
    with pytest.raises(
        ValueError, match=r"indices \[4\] out of range for a.weight\[dim 0\] of size 4"
    ):
        graph.get_pruning_group(model.a, tp.prune_conv_out_channels, [4])
    group = graph.get_pruning_group(model.a, tp.prune_conv_out_channels, [0, 1, 2, 3])
    assert not graph.check_pruning_group(group)
    with pytest.raises(
        ValueError, match="cannot prune this group: pruning would remove every channel"
    ):
        group.prune()
    assert model.a.out_channels == 4


def test_values_leaving_torch_freeze_their_channels():
    class ToPython(Net):
        def forward(self, x):
            y = self.a(x)
            return self.b(torch.tensor(y.tolist()))

    model = ToPython().eval()
    group = build(model).get_pruning_group(model.a, tp.prune_conv_out_channels, [0])
    assert group.refusal() == "values leave torch through Tensor.tolist (Tensor.tolist in <model>)"
    with pytest.raises(ValueError, match="values leave torch"):
        group.prune()


def test_example_inputs_on_another_device():
    model = Net().to("meta")
    with pytest.raises(ValueError, match="example inputs are on cpu but the model is on meta"):
        build(model, X)


def test_a_custom_autograd_function_is_traced_through_its_torch_ops():
    class Square(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x * x

        @staticmethod
        def backward(ctx, grad):
            return grad

    class WithFunction(Net):
        def forward(self, x):
            return self.b(Square.apply(self.bn(self.a(x))))

    model = WithFunction().eval()
    graph = build(model)
    group = graph.get_pruning_group(model.a, tp.prune_conv_out_channels, [1, 2])
    report = tp.verify(graph, X, [(group, [1, 2])])
    assert report.ok and report.checks[0].exact_expected


def test_a_custom_function_calling_an_op_without_rule_is_refused_by_name():
    class Odd(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return torch.special.i0(x)

        @staticmethod
        def backward(ctx, grad):
            return grad

    class WithOdd(Net):
        def forward(self, x):
            return self.b(Odd.apply(self.a(x)))

    model = WithOdd().eval()
    group = build(model).get_pruning_group(model.a, tp.prune_conv_out_channels, [0])
    assert "unsupported op" in group.refusal() and "i0" in group.refusal()
