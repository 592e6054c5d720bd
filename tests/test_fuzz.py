"""Architecture fuzzing: random nets, random groups pruned by random amounts, each checked
for exactness (or refused with a reason). ``FUZZ_EXAMPLES`` sets the number of cases."""

import os
from typing import Callable

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torchslim as tp
from tests.fuzz_nets import FuzzNet, architectures
from tests.helpers import group_signatures
from torchslim.verify import random_selections
from torchslim.zoo import randomize_constant_parameters

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "60"))


def fuzzed(examples: int) -> Callable[[Callable], Callable]:
    """Run a test on ``examples`` random (architecture, ratio, seed) cases, reproducibly."""

    def decorate(test: Callable) -> Callable:
        cases = given(blocks=architectures(), ratio=st.floats(0.1, 0.7), seed=st.integers(0, 2**16))
        return settings(
            max_examples=examples,
            deadline=None,
            derandomize=True,
            suppress_health_check=[HealthCheck.too_slow],
        )(cases(test))

    return decorate


@fuzzed(EXAMPLES)
def test_random_architectures_prune_exactly(blocks, ratio, seed):
    torch.manual_seed(seed)
    model = randomize_constant_parameters(FuzzNet(blocks).eval(), seed)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected_shape = model(x).shape
    graph = tp.DependencyGraph().build_dependency(model, x)
    assert not graph.unsupported(), graph.unsupported()
    selections = random_selections(graph, ratio=ratio, seed=seed)
    for group in graph.all_groups():
        if not group.prunable_idxs:
            assert group.refusal([0]) is not None, "a group that cannot be pruned says why"
    report = tp.verify(graph, x, selections, per_group=True)
    assert report.ok, f"{blocks}\n{report}"
    for group, idxs in selections:
        group.prune(idxs)
    with torch.no_grad():
        assert model(x).shape == expected_shape


@fuzzed(max(EXAMPLES // 3, 10))
def test_a_pruning_ratio_never_removes_more_than_asked_of_any_dim(blocks, ratio, seed):
    torch.manual_seed(seed)
    model = randomize_constant_parameters(FuzzNet(blocks).eval(), seed)
    x = torch.randn(2, 3, 6, 6)
    shapes = {name: p.shape for name, p in model.named_parameters()}
    expected_shape = model(x).shape
    tp.pruner.MagnitudePruner(model, x, pruning_ratio=ratio).step()
    assert model(x).shape == expected_shape
    for name, param in model.named_parameters():
        for before, after in zip(shapes[name], param.shape):
            assert before - after <= ratio * before + 1e-9, (blocks, name, before, after)


@fuzzed(max(EXAMPLES // 3, 10))
def test_meta_and_real_traces_find_the_same_groups(blocks, ratio, seed):
    torch.manual_seed(seed)
    model = randomize_constant_parameters(FuzzNet(blocks).eval(), seed)
    x = torch.randn(2, 3, 6, 6)
    graphs = [tp.DependencyGraph().build_dependency(model, x, trace_on_meta=m) for m in (1, 0)]
    assert graphs[0].traced_on_meta and not graphs[1].traced_on_meta
    assert group_signatures(graphs[0]) == group_signatures(graphs[1]), blocks
