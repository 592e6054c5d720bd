"""Every torchvision model: prune a random 30% of every prunable group, check exactness.

``make test`` runs a representative slice (one model of each architecture family that needs its
own rules); ``make zoo`` runs all of them (``pytest -m zoo --zoo-all``).
"""

from __future__ import annotations

import copy

import pytest
import torch

import torchslim as tp
from tests.helpers import group_signatures
from torchslim.spaces.trace import iter_tensors
from torchslim.verify import random_selections
from torchslim.zoo import build_torchvision, randomize_constant_parameters, torchvision_names

SLICE = {
    "resnet18",
    "resnext50_32x4d",
    "densenet121",
    "googlenet",
    "inception_v3",
    "mobilenet_v3_small",
    "shufflenet_v2_x0_5",
    "regnet_y_400mf",
    "efficientnet_b0",
    "squeezenet1_1",
    "convnext_tiny",
    "swin_t",
    "maxvit_t",
    "vit_b_32",
    "lraspp_mobilenet_v3_large",
    "fcn_resnet50",
    "ssdlite320_mobilenet_v3_large",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "r3d_18",
    "raft_small",
}


def pytest_generate_tests(metafunc):
    if "zoo_entry" in metafunc.fixturenames:
        everything = metafunc.config.getoption("--zoo-all")
        entries = [(k, n) for k, n in torchvision_names() if everything or n in SLICE]
        metafunc.parametrize("zoo_entry", entries, ids=[n for _, n in entries])


def _outputs(zoo, model):
    with torch.no_grad():
        if zoo.dense_forward is not None:
            out = zoo.dense_forward(model, zoo.inputs)
        elif isinstance(zoo.inputs, tuple):
            out = model(*zoo.inputs)
        else:
            out = model(zoo.inputs)
    return list(iter_tensors(out))


@pytest.mark.zoo
def test_meta_and_real_traces_find_the_same_groups(zoo_entry):
    kind, name = zoo_entry
    zoo = build_torchvision(name, kind)
    forward = zoo.dense_forward if kind == "optical_flow" else None
    graphs = [
        tp.DependencyGraph().build_dependency(
            zoo.model, zoo.inputs, forward_fn=forward, trace_on_meta=on_meta
        )
        for on_meta in (None, False)
    ]
    assert group_signatures(graphs[0]) == group_signatures(graphs[1]), name
    said = "forward fails on meta tensors" in graphs[0].summary()
    assert graphs[0].traced_on_meta is not said
    assert graphs[0].traced_on_meta or kind == "detection"  # post-processing needs values


@pytest.mark.zoo
def test_torchvision_model_prunes_exactly(zoo_entry):
    kind, name = zoo_entry
    zoo = build_torchvision(name, kind)
    randomize_constant_parameters(zoo.model)
    forward = zoo.dense_forward
    trace_forward = forward if kind == "optical_flow" else None
    graph = tp.DependencyGraph().build_dependency(zoo.model, zoo.inputs, forward_fn=trace_forward)
    selections = random_selections(graph, ratio=0.3, seed=0)
    assert selections, f"{name}: no prunable group"
    report = tp.verify(graph, zoo.inputs, selections, per_group=False, forward_fn=forward)
    assert report.ok, f"{name}\n{report}"
    shapes = [t.shape for t in _outputs(zoo, zoo.model)]
    pruned = copy.deepcopy(graph)
    with pruned.deferred():
        for group, idxs in selections:
            pruned.group_like(group).prune(idxs)
    assert pruned.forward_failure() is None
    assert [t.shape for t in _outputs(zoo, pruned.model)] == shapes
    before = sum(p.numel() for p in zoo.model.parameters())
    assert sum(p.numel() for p in pruned.model.parameters()) < before
