"""``torchslim prune``: prune a model and write its weights, pruning plan and recipe."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any

import torch

import torchslim as tp
from torchslim.cli.common import (
    DATASETS,
    add_command,
    add_ignore_argument,
    add_importance_argument,
    check_writable,
    example_of,
    ignored_modules,
    importance_of,
    model_of,
    output_name,
    table,
    write_recipe,
)
from torchslim.cli.datasets import load_dataset
from torchslim.utils.progress import progress

CALIBRATION_BATCH = 128


def register(commands: Any) -> None:
    sub = add_command(commands, "prune", "Prune a model and write weights + pruning plan.", run)
    amount = sub.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=float, help="fraction of every group's channels to remove")
    amount.add_argument("--target-macs", type=float, help="fraction of the dense MACs to keep")
    add_importance_argument(sub)
    sub.add_argument("--round-to", type=int, help="keep channel counts multiples of this")
    sub.add_argument("--global", dest="global_pruning", action="store_true", help="rank globally")
    sub.add_argument("--steps", type=int, default=1, help="iterative steps")
    add_ignore_argument(sub)
    sub.add_argument("--verify", action="store_true", help="run the exactness check")
    sub.add_argument(
        "--exact-only",
        action="store_true",
        help="leave alone groups whose channels pass through channel-mixing ops (LayerNorm ...)",
    )
    sub.add_argument(
        "--calibration",
        choices=DATASETS,
        help="training images that calibrate --importance wanda/obs/fisher/obdc and --reconstruct",
    )
    sub.add_argument("--data-dir", type=Path, help="folder with the IDX files (mnist)")
    sub.add_argument("--calibration-size", type=int, default=1024, help="calibration images")
    sub.add_argument(
        "--reconstruct",
        action="store_true",
        help="refit the layers reading removed channels on the calibration images",
    )
    sub.add_argument("--out", type=Path, help="directory for <model>.safetensors + plan")


def calibration_batches(
    args: argparse.Namespace, importance: object
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of training images and their labels for calibrated criteria and reconstruction
    (none needed: an empty list)."""
    wanted = args.reconstruct or hasattr(importance, "record")
    if not wanted:
        return []
    if args.calibration is None:
        raise ValueError(
            f"--importance {args.importance} and --reconstruct need calibration images: "
            "give --calibration digits, fashion-mnist or mnist (with --data-dir)"
        )
    if args.calibration_size < 1:
        raise ValueError(f"--calibration-size must be positive, got {args.calibration_size}")
    (images, labels), _ = load_dataset(args.calibration, args.data_dir)
    size = args.calibration_size
    return list(zip(images[:size].split(CALIBRATION_BATCH), labels[:size].split(CALIBRATION_BATCH)))


def calibrate(model: torch.nn.Module, importance: Any, batches: list) -> None:
    """Record a calibrated criterion: forward passes, and for criteria that need gradients
    (``needs_loss``: Fisher, OBDC) the cross-entropy on the labels, backward, ``step()``."""
    if not hasattr(importance, "record"):
        return
    gradients = getattr(importance, "needs_loss", False)
    with importance.record(model), torch.set_grad_enabled(gradients):
        for images, labels in batches:
            outputs = model(images)
            if gradients:
                torch.nn.functional.cross_entropy(outputs, labels).backward()
                getattr(importance, "step", lambda: None)()
    model.zero_grad(set_to_none=True)


def run(args: argparse.Namespace) -> int:
    if (args.ratio is None) == (args.target_macs is None):
        raise ValueError("give exactly one of --ratio and --target-macs")
    if args.ratio is not None and not 0 <= args.ratio < 1:
        raise ValueError(f"--ratio must be in [0, 1), got {args.ratio}")
    if args.target_macs is not None and not 0 < args.target_macs <= 1:
        raise ValueError(f"--target-macs must be in (0, 1], got {args.target_macs}")
    if args.out:
        check_writable(args.out)
    model, example = model_of(args), example_of(args)
    ignored = ignored_modules(model, args.ignore)
    before_macs, before_params = tp.utils.count_ops_and_params(model, example)
    importance = importance_of(args)
    batches = calibration_batches(args, importance)
    calibrate(model, importance, batches)
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=importance,
        pruning_ratio=args.ratio if args.ratio is not None else 0.0,
        target_macs=args.target_macs,
        global_pruning=args.global_pruning or args.target_macs is not None,
        iterative_steps=args.steps,
        round_to=args.round_to,
        ignored_layers=ignored,
        exact_only=args.exact_only,
    )
    steps = progress(range(args.steps), "pruning", enabled=args.steps > 1, unit="step")
    reconstruct = [images for images, _ in batches] if args.reconstruct else None
    reports, mixing, refused = [], set(), {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "of the .* groups this step pruned pass through")
        for _ in steps:
            if args.verify:
                reports.append(pruner.step_and_verify(reconstruct=reconstruct))
            else:
                pruner.step(reconstruct=reconstruct)
            mixing.update(label for label, _ in pruner.last_step.mixing)
            refused.update(pruner.last_step.refused)
    macs, params = tp.utils.count_ops_and_params(model, example)
    rows = [
        (
            "params",
            f"{before_params / 1e6:.3f} M",
            f"{params / 1e6:.3f} M",
            f"{before_params / params:.2f}x",
        ),
        ("MACs", f"{before_macs / 1e9:.4f} G", f"{macs / 1e9:.4f} G", f"{before_macs / macs:.2f}x"),
    ]
    print(table(rows, ("", "before", "after", "reduction")))
    if pruner.reconstruction is not None:
        print(pruner.reconstruction)
    if mixing:
        print(
            f"{len(mixing)} pruned groups pass through channel-mixing ops (LayerNorm, a head "
            "size used as a scale): not exactly the original with their channels zeroed; "
            "--exact-only leaves them alone"
        )
    for label, reason in refused.items():
        print(f"refused {label}: {reason}")
    if args.verify:
        worst = max(report.worst for report in reports)
        status = "ok" if all(report.ok for report in reports) else "FAIL"
        print(
            f"exactness check: {status} (relative error {worst:.1e}"
            + (f"; {len(mixing)} mixing groups not checked)" if mixing else ")")
        )
    if not args.out:
        print("nothing written: give --out DIR to save the pruned weights, plan and recipe")
        return 0
    name = output_name(args.model)
    path = tp.save_pruned(model, args.out / f"{name}.safetensors")
    recipe = args.out / f"{name}.recipe.yaml"
    write_recipe(args, recipe)
    print(f"wrote {path}, {tp.persistence.plan_path(path)} and {recipe}")
    return 0
