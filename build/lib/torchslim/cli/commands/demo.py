"""``torchslim demo``: the whole workflow on a real dataset (see :mod:`torchslim.cli.demo`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from torchslim.cli.common import DATASETS, add_command, table
from torchslim.cli.demo import run_demo
from torchslim.cli.report import summary_rows


def register(commands: Any) -> None:
    sub = add_command(
        commands,
        "demo",
        "Train, sparse-train, prune, fine-tune and export a CNN on real digits.",
        run,
        model=False,
    )
    sub.description = (
        "The whole workflow on scikit-learn's bundled handwritten digits: train a small CNN, "
        "sparse-train it (BN L1), prune it to a MACs target, fine-tune, evaluate, export to "
        "ONNX and write a report with plots."
    )
    sub.add_argument("--out", type=Path, default=Path("torchslim-demo"), help="report folder")
    sub.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    sub.add_argument("--target-macs", type=float, default=0.5, help="fraction of MACs to keep")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--config", type=Path, help="YAML recipe with any of these options")
    sub.add_argument(
        "--dataset",
        choices=DATASETS,
        default="digits",
        help="digits (in scikit-learn), fashion-mnist (apt-get install dataset-fashion-mnist), "
        "or mnist (raw IDX files in --data-dir)",
    )
    sub.add_argument("--data-dir", type=Path, help="folder with the IDX files")


def run(args: argparse.Namespace) -> int:
    results = run_demo(
        args.out,
        epochs=args.epochs,
        target_macs=args.target_macs,
        seed=args.seed,
        dataset=args.dataset,
        data_dir=args.data_dir,
    )
    print(table(summary_rows(results), ("", "dense", "pruned")))
    print(f"\nreport: {args.out / 'report.md'} (plots: channels.png, steps.png, loss.png)")
    return 0
