"""Swapping a model's tensors for ``meta`` twins: the real tensors come back, and twins kept
between swaps are reused only for the same live tensor of the same layout."""

import copy
import gc
import pickle

import torch
from torch import nn

from torchslim.capture.twin import MetaTwins, swapped_to_meta


def test_twins_are_reused_for_unchanged_tensors_and_remade_for_changed_ones():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    twins = MetaTwins()
    weight = model[0].weight
    with swapped_to_meta(model, twins):
        first = model[0].weight
        first_mean = model[1].running_mean
        assert first.is_meta and isinstance(first, nn.Parameter) and first.shape == (3, 4)
    assert model[0].weight is weight and not weight.is_meta
    with swapped_to_meta(model, twins):
        assert model[0].weight is first and model[1].running_mean is first_mean
    model[0].weight = nn.Parameter(torch.randn(2, 4))  # pruned: a new tensor
    weight.data = torch.randn(5, 4)  # the old one changed shape in place
    with swapped_to_meta(model, twins):
        assert model[0].weight is not first and model[0].weight.shape == (2, 4)
        assert twins.of(weight).shape == (5, 4)
    model[1].running_mean.requires_grad_(False)
    model[0].weight.requires_grad_(False)
    with swapped_to_meta(model, twins):
        assert not model[0].weight.requires_grad


def test_a_shared_tensor_keeps_one_twin_and_a_dead_tensor_is_forgotten():
    shared = nn.Linear(3, 3)
    model = nn.Sequential(shared, shared)
    twins = MetaTwins()
    with swapped_to_meta(model, twins):
        assert model[0].weight is model[1].weight
    extra = torch.randn(7)
    twins.of(extra)
    count = len(twins)
    del extra
    gc.collect()
    assert len(twins) == count - 1


def test_a_tensor_with_gradients_keeps_its_twin_and_copies_start_empty():
    model = nn.Linear(2, 2)
    model.register_buffer("scale", torch.ones(2, requires_grad=True), persistent=False)
    twins = MetaTwins()
    with swapped_to_meta(model, twins):
        scale = model.scale
    with swapped_to_meta(model, twins):
        assert model.scale is scale
    assert len(copy.deepcopy(twins)) == 0 and len(pickle.loads(pickle.dumps(twins))) == 0
    assert len(twins) == 3
