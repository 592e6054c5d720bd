"""Accuracy after pruning on real data: Fashion-MNIST, torchslim vs torch-pruning, same run.

A small ResNet is trained on the real Fashion-MNIST images (Debian package
``dataset-fashion-mnist``: ``apt-get install dataset-fashion-mnist``, files under
``/usr/share/datasets/fashion-mnist``), then pruned to 2x fewer MACs by each library with the
same criterion (L2 magnitude) and the same protocol (one uniform ratio per group, found by
bisection so MACs <= 50% of dense), fine-tuned with the same budget and evaluated on the test
set. torchslim's target mode (global ranking until MACs reach 50%) is reported as well.

    python benchmarks/accuracy.py --markdown benchmarks/results/accuracy.md
"""

from __future__ import annotations

import argparse
import copy
import importlib
import sys
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchslim as ts  # noqa: E402
from benchmarks.report import publish  # noqa: E402
from torchslim.cli.datasets import FASHION_MNIST, accuracy, load_dataset  # noqa: E402

INPUT = torch.randn(1, 1, 28, 28)


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class SmallResNet(nn.Module):
    """A ResNet for 28x28 grayscale: a stride-2 stem, three stages of two blocks (16/32/64)."""

    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU()
        )
        layers, cin = [], widths[0]
        for index, width in enumerate(widths):
            stride = 1 if index == 0 else 2
            layers += [Block(cin, width, stride), Block(width, width, 1)]
            cin = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


def train(
    model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], epochs: float, lr: float, seed: int
) -> None:
    x, y = data
    generator = torch.Generator().manual_seed(seed)
    steps = int(epochs * len(x) / 128)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    model.train()
    order = torch.randperm(len(x), generator=generator)
    for step in range(steps):
        start = (step * 128) % len(x)
        if start + 128 > len(x):
            order = torch.randperm(len(x), generator=generator)
            start = 0
        batch = order[start : start + 128]
        optimizer.zero_grad()
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
        schedule.step()
    model.eval()


def uniform_to_half(
    prune: Callable[[nn.Module, float], None], dense: nn.Module
) -> tuple[nn.Module, float]:
    """The smallest uniform ratio (bisection, 1/256 resolution) that halves the MACs."""
    base, _ = ts.utils.count_ops_and_params(dense, INPUT)
    low, high = 0.0, 0.9
    best = None
    for _ in range(8):
        middle = (low + high) / 2
        model = copy.deepcopy(dense)
        prune(model, middle)
        macs, _ = ts.utils.count_ops_and_params(model, INPUT)
        if macs <= 0.5 * base:
            best, high = (model, middle), middle
        else:
            low = middle
    if best is None:
        raise RuntimeError("no ratio reached 2x fewer MACs")
    return best


def prune_uniform(library: Any, model: nn.Module, ratio: float) -> None:
    """The same recipe through either library's API (``torchslim`` or ``torch_pruning``)."""
    library.pruner.MagnitudePruner(
        model,
        INPUT,
        importance=library.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio,
        ignored_layers=[model.fc],
    ).step()


def prune_torchslim_target(model: nn.Module) -> None:
    ts.pruner.MagnitudePruner(
        model,
        INPUT,
        importance=ts.importance.MagnitudeImportance(p=2),
        target_macs=0.5,
        global_pruning=True,
        max_pruning_ratio=0.8,
        ignored_layers=[model.fc],
    ).step()


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=FASHION_MNIST)
    parser.add_argument("--epochs", type=float, default=3.0, help="dense training epochs")
    parser.add_argument("--finetune", type=float, default=1.0, help="fine-tune epochs, each model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    train_data, test_data = load_dataset("fashion-mnist", args.data)
    start = time.perf_counter()
    dense = SmallResNet()
    train(dense, train_data, args.epochs, 0.1, args.seed)
    base_macs, base_params = ts.utils.count_ops_and_params(dense, INPUT)
    rows: list[tuple[Any, ...]] = [
        ("dense", accuracy(dense, test_data), "-", base_macs, base_params, "-")
    ]
    candidates = {
        "torchslim, uniform ratio": lambda: uniform_to_half(partial(prune_uniform, ts), dense),
        "torch-pruning, uniform ratio": lambda: uniform_to_half(
            partial(prune_uniform, importlib.import_module("torch_pruning")), dense
        ),
        "torchslim, target_macs=0.5 (global)": lambda: (
            _pruned(dense, prune_torchslim_target),
            "global",
        ),
    }
    for name, build in candidates.items():
        model, ratio = build()
        one_shot = accuracy(model, test_data)
        train(model, train_data, args.finetune, 0.02, args.seed)
        macs, params = ts.utils.count_ops_and_params(model, INPUT)
        rows.append((name, accuracy(model, test_data), one_shot, macs, params, ratio))
    lines = [
        "| model | test accuracy | before fine-tune | MACs | params | ratio |",
        "|---|---|---|---|---|---|",
    ]
    for name, acc, one_shot, macs, params, ratio in rows:
        shot = one_shot if isinstance(one_shot, str) else f"{one_shot:.4f}"
        rate = ratio if isinstance(ratio, str) else f"{ratio:.3f}"
        lines.append(
            f"| {name} | {acc:.4f} | {shot} | {macs / 1e6:.2f} M ({macs / base_macs:.2f}x) | "
            f"{params / 1e3:.1f} K | {rate} |"
        )
    footer = (
        f"Fashion-MNIST test set (10,000 images); {args.epochs:g} dense epochs, "
        f"{args.finetune:g} fine-tune epoch(s) each; seed {args.seed}; "
        f"{time.perf_counter() - start:.0f} s on this machine."
    )
    publish(lines, footer, args.markdown)


def _pruned(dense: nn.Module, prune: Callable[[nn.Module], None]) -> nn.Module:
    model = copy.deepcopy(dense)
    prune(model)
    return model


if __name__ == "__main__":
    main()
