"""Searched per-layer ratios vs one uniform ratio at 2x fewer MACs, Fashion-MNIST, same run.

The small ResNet of ``benchmarks/accuracy.py`` is trained on 55,000 real Fashion-MNIST training
images (``apt-get install dataset-fashion-mnist``); the other 5,000 are the search's validation
set (``eval_fn`` = accuracy on 2,000 of them; the test set is never seen by the search). Then:

- uniform: the smallest uniform ratio that halves the MACs (bisection), L2 magnitude;
- searched: ``tp.search.search`` to ``Target("macs", 0.5)``, same importance, no rounding;
- searched + latency-aware: the same search with measured rounding and the guard.

Each is fine-tuned with the same budget (1 epoch, same schedule) for every seed in ``--seeds``
and evaluated on the 10,000 test images.

    python benchmarks/search_fashion_mnist.py --markdown benchmarks/results/search_fashion_mnist.md
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from functools import partial
from pathlib import Path
from typing import Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchslim as ts  # noqa: E402
from benchmarks.accuracy import INPUT, SmallResNet, prune_uniform, train, uniform_to_half  # noqa: E402
from benchmarks.report import publish  # noqa: E402
from torchslim.data import FASHION_MNIST, accuracy, load_dataset  # noqa: E402

VALIDATION = 5000


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=FASHION_MNIST)
    parser.add_argument("--epochs", type=float, default=3.0, help="dense training epochs")
    parser.add_argument("--finetune", type=float, default=1.0, help="fine-tune epochs, each model")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="fine-tune seeds")
    parser.add_argument("--refine-steps", type=int, default=20)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--out", type=Path, help="folder for the searched plans and reports")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    torch.manual_seed(0)
    (x, y), test_data = load_dataset("fashion-mnist", args.data)
    train_data = (x[:-VALIDATION], y[:-VALIDATION])
    validation = (x[-VALIDATION:][:2000], y[-VALIDATION:][:2000])
    dense = SmallResNet()
    train(dense, train_data, args.epochs, 0.1, 0)

    def eval_fn(model: nn.Module) -> float:
        return accuracy(model, validation)

    base_macs, _ = ts.utils.count_ops_and_params(dense, INPUT)
    uniform, ratio = uniform_to_half(partial(prune_uniform, ts), dense)
    runtime = ts.search.Runtime("torch", threads=1)
    options = dict(target=ts.search.Target("macs", 0.5), seed=0, ignored_layers=["fc"])
    searched = ts.search.search(
        dense,
        INPUT,
        eval_fn,
        refine_steps=args.refine_steps,
        rounding="none",
        use_guard=False,
        **options,
    )
    aware = ts.search.search(
        dense,
        INPUT,
        eval_fn,
        sensitivity=searched.sensitivity,
        refine_steps=args.refine_steps,
        runtime=runtime,
        **options,
    )
    if args.out:
        ts.search.save_result(searched, args.out / "searched.safetensors")
        ts.search.save_result(aware, args.out / "latency_aware.safetensors")
    candidates = {
        f"uniform ratio {ratio:.3f}": uniform,
        "searched (per-unit ratios)": searched.model,
        "searched + latency-aware rounding": aware.model,
    }
    lines = [
        "| model | MACs | params | val. acc. (search) | test acc. before fine-tune | "
        "test acc. after fine-tune, mean | per seed |",
        "|---|---|---|---|---|---|---|",
        f"| dense | {base_macs / 1e6:.2f} M (1.00x) | "
        f"{sum(p.numel() for p in dense.parameters()) / 1e3:.1f} K | {eval_fn(dense):.4f} | "
        f"{accuracy(dense, test_data):.4f} | - | - |",
    ]
    for name, model in candidates.items():
        if model is None:
            lines.append(f"| {name} | refused by the guard | | | | | |")
            continue
        macs, params = ts.utils.count_ops_and_params(model, INPUT)
        tuned = []
        for seed in args.seeds:
            torch.manual_seed(seed)
            copy_ = copy.deepcopy(model)
            train(copy_, train_data, args.finetune, 0.02, seed)
            tuned.append(accuracy(copy_, test_data))
        lines.append(
            f"| {name} | {macs / 1e6:.2f} M ({macs / base_macs:.2f}x) | {params / 1e3:.1f} K | "
            f"{eval_fn(model):.4f} | {accuracy(model, test_data):.4f} | "
            f"{statistics.mean(tuned):.4f} | {', '.join(f'{a:.4f}' for a in tuned)} |"
        )
    channels = searched.applied["channels"]
    lines += [
        "",
        "Searched channels per group root (dense -> kept): "
        + ", ".join(
            f"{root} {searched.applied['dense_channels'][root]}->{kept}"
            for root, kept in channels.items()
        ),
        "",
        aware.verdict.message if aware.verdict else "",
    ]
    footer = (
        f"Fashion-MNIST: trained on 55,000 images, searched on 2,000 held-out training images, "
        f"tested on the 10,000 test images; {args.epochs:g} dense epochs, {args.finetune:g} "
        f"fine-tune epoch(s) per model and seed (seeds {', '.join(map(str, args.seeds))}); "
        f"search seed 0, {args.refine_steps} refinement steps; "
        f"{time.perf_counter() - start:.0f} s on this machine."
    )
    publish(lines, footer, args.markdown)


if __name__ == "__main__":
    main()
