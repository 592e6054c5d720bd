"""``torchslim prune``: prune a model and write its weights, pruning plan and recipe."""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

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
from torchslim.cli.models import hf_folder_of
from torchslim.graph.kinds import KINDS
from torchslim.hf.folder import copy_companions
from torchslim.utils.ops_counter import count
from torchslim.utils.progress import progress

CALIBRATION_BATCH = 128


def register(commands: Any) -> None:
    sub = add_command(commands, "prune", "Prune a model and write weights + pruning plan.", run)
    amount = sub.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=float, help="fraction of every group's channels to remove")
    amount.add_argument("--target-macs", type=float, help="fraction of the dense MACs to keep")
    sub.add_argument(
        "--kinds",
        help="ratios per kind of channel, as neurons=0.2,heads=0.25 (kinds: "
        f"{', '.join(KINDS)}); with or instead of --ratio",
    )
    sub.add_argument(
        "--blocks",
        type=int,
        default=0,
        help="remove this many whole residual blocks first (decoder layers, ResNet/ViT "
        "blocks), those with the least block influence on the calibration data",
    )
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
        help="what calibrates --importance wanda/obs/fisher/obdc and --reconstruct: training "
        f"images ({', '.join(DATASETS)}) or, for a Hugging Face language model, a UTF-8 text "
        "file read with the folder's tokenizer",
    )
    sub.add_argument("--data-dir", type=Path, help="folder with the IDX files (mnist)")
    sub.add_argument(
        "--calibration-size",
        type=int,
        default=1024,
        help="calibration images, or tokens of a text (in blocks of --input-shape's length)",
    )
    sub.add_argument(
        "--reconstruct",
        action="store_true",
        help="refit the layers reading removed channels on the calibration images",
    )
    sub.add_argument(
        "--out",
        type=Path,
        help="directory for <model>.safetensors + plan, or <model>/ by save_pretrained for a "
        "Hugging Face model",
    )


def calibration_batches(
    args: argparse.Namespace, model: nn.Module, example: torch.Tensor, importance: object
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of inputs and their labels (a token block is its own label) for calibrated
    criteria, reconstruction and the block influence of ``--blocks`` (none needed: an empty
    list)."""
    wanted = args.reconstruct or hasattr(importance, "record")
    if not wanted and not (args.blocks and args.calibration):
        return []
    tokens = not example.is_floating_point()
    if args.calibration is None:
        what = (
            "a text file (UTF-8)" if tokens else "digits, fashion-mnist or mnist (with --data-dir)"
        )
        raise ValueError(
            f"--importance {args.importance} and --reconstruct need calibration data: "
            f"give --calibration {what}"
        )
    if args.calibration_size < 1:
        raise ValueError(f"--calibration-size must be positive, got {args.calibration_size}")
    if tokens:
        folder = hf_folder_of(args.model or "")
        blocks = text_blocks(folder, args.calibration, args.calibration_size, example.shape[-1])
        return [(ids, ids) for ids in blocks.split(example.shape[0])]
    if args.calibration not in DATASETS:
        raise ValueError(
            f"--calibration {args.calibration}: give one of {', '.join(DATASETS)} (a text file "
            "calibrates Hugging Face language models)"
        )
    (images, labels), _ = load_dataset(args.calibration, args.data_dir)
    size = args.calibration_size
    return list(zip(images[:size].split(CALIBRATION_BATCH), labels[:size].split(CALIBRATION_BATCH)))


def text_blocks(
    folder: Optional[Path],
    path: str,
    tokens: Optional[int],
    length: int,
    option: str = "--calibration",
) -> torch.Tensor:
    """The text file ``path`` (given as ``option``) as blocks of ``length`` tokens (about
    ``tokens`` in all; ``None``: the whole text), by the tokenizer of the Hugging Face
    ``folder``."""
    text = Path(path)
    if folder is None:
        raise ValueError(
            f"{option} with a text file needs MODEL to be a Hugging Face folder with its tokenizer"
        )
    if not text.is_file():
        raise ValueError(f"{option} {text}: no such text file")
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as error:
        raise ValueError(f"{folder} has no tokenizer to read {option} with: {error}") from None
    count = None if tokens is None else max(1, tokens // length)
    return tp.hf.token_blocks(tokenizer, text, length, count)


def calibrate(model: nn.Module, importance: Any, batches: list) -> None:
    """Record a calibrated criterion: forward passes, and for criteria that need gradients
    (``needs_loss``: Fisher, OBDC) the loss on the labels (cross-entropy, or a language model's
    next-token loss), backward, ``step()``."""
    if not hasattr(importance, "record"):
        return
    gradients = getattr(importance, "needs_loss", False)
    with importance.record(model), torch.set_grad_enabled(gradients):
        for inputs, labels in batches:
            if not gradients:
                model(inputs)
                continue
            if inputs.is_floating_point():
                loss = nn.functional.cross_entropy(model(inputs), labels)
            else:
                loss = model(inputs, labels=labels).loss
            loss.backward()
            getattr(importance, "step", lambda: None)()
    model.zero_grad(set_to_none=True)


def kind_ratios(text: Optional[str]) -> dict[str, float]:
    """``neurons=0.2,heads=0.25`` -> ``{"neurons": 0.2, "heads": 0.25}``."""
    ratios = {}
    for entry in filter(None, (part.strip() for part in (text or "").split(","))):
        kind, _, value = entry.partition("=")
        if kind not in KINDS:
            raise ValueError(f"--kinds: unknown kind {kind!r}; use {', '.join(KINDS)}")
        try:
            ratios[kind] = float(value)
        except ValueError:
            raise ValueError(f"--kinds: {entry!r} is not KIND=RATIO (as neurons=0.2)") from None
        if not 0 <= ratios[kind] < 1:
            raise ValueError(f"--kinds: the ratio of {kind} must be in [0, 1), got {value}")
    return ratios


def check_ratio(ratio: Optional[float]) -> None:
    """``--ratio`` is a fraction of the channels: in [0, 1)."""
    if ratio is not None and not 0 <= ratio < 1:
        raise ValueError(f"--ratio must be in [0, 1), got {ratio}")


def run(args: argparse.Namespace) -> int:
    kinds = kind_ratios(args.kinds)
    widths = args.ratio is not None or args.target_macs is not None or bool(kinds)
    if not widths and not args.blocks:
        raise ValueError("give --ratio, --kinds, --target-macs or --blocks")
    if args.blocks < 0:
        raise ValueError(f"--blocks must be at least 0, got {args.blocks}")
    if kinds and args.target_macs is not None:
        raise ValueError("give --kinds with --ratio or alone, not with --target-macs")
    check_ratio(args.ratio)
    if args.target_macs is not None and not 0 < args.target_macs <= 1:
        raise ValueError(f"--target-macs must be in (0, 1], got {args.target_macs}")
    if args.out:
        check_writable(args.out)
    model = model_of(args)
    example = example_of(args, model)
    ignored = ignored_modules(model, args.ignore)
    before_macs, before_params = tp.utils.count_ops_and_params(model, example)
    importance = importance_of(args)
    batches = calibration_batches(args, model, example, importance)
    if args.blocks:
        inputs = [x for x, _ in batches] or None
        removed = tp.prune_blocks(
            model, example, n=args.blocks, calibration=inputs, ignored_blocks=ignored
        ).removed
        print(f"removed {len(removed)} blocks (least block influence): {', '.join(removed)}")
    lines = (
        prune_widths(args, model, example, importance, batches, ignored, kinds) if widths else []
    )
    macs, params = tp.utils.count_ops_and_params(model, example)
    rows = [
        ("params", count(before_params), count(params), f"{before_params / params:.2f}x"),
        ("MACs", count(before_macs), count(macs), f"{before_macs / macs:.2f}x"),
    ]
    print(table(rows, ("", "before", "after", "reduction")))
    for line in lines:
        print(line)
    if not args.out:
        print("nothing written: give --out DIR to save the pruned weights, plan and recipe")
        return 0
    name = output_name(args.model)
    recipe = args.out / f"{name}.recipe.yaml"
    if tp.hf.is_hf_model(model):
        folder = save_hf_folder(model, args.out / name, hf_folder_of(args.model))
        write_recipe(args, recipe)
        print(f"wrote {folder}/ (save_pretrained; {hf_loader(model)} loads it) and {recipe}")
        return 0
    path = tp.save_pruned(model, args.out / f"{name}.safetensors")
    write_recipe(args, recipe)
    print(f"wrote {path}, {tp.persistence.plan_path(path)} and {recipe}")
    return 0


def prune_widths(
    args: argparse.Namespace,
    model: nn.Module,
    example: torch.Tensor,
    importance: Any,
    batches: list,
    ignored: list,
    kinds: dict[str, float],
) -> list[str]:
    """Prune channels, heads, neurons and widths as asked (calibrating the criterion first);
    the report lines: per kind, unmet requests, reconstruction, mixing, refusals, exactness."""
    calibrate(model, importance, batches)
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=importance,
        pruning_ratio=args.ratio if args.ratio is not None else 0.0,
        pruning_ratio_dict=kinds or None,
        target_macs=args.target_macs,
        global_pruning=args.global_pruning or args.target_macs is not None,
        iterative_steps=args.steps,
        round_to=args.round_to,
        ignored_layers=ignored,
        exact_only=args.exact_only,
    )
    steps = progress(range(args.steps), "pruning", enabled=args.steps > 1, unit="step")
    reconstruct = [images for images, _ in batches] if args.reconstruct else None
    reports, pruned, mixing, refused = [], set(), set(), {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "of the .* groups this step pruned pass through")
        warnings.filterwarnings("ignore", "asked for .* none were removed")
        warnings.filterwarnings("ignore", "pruning_ratio=.* removed no channel")
        warnings.filterwarnings("ignore", ".* of the .* channels asked removed")
        for _ in steps:
            if args.verify:
                reports.append(pruner.step_and_verify(reconstruct=reconstruct))
            else:
                pruner.step(reconstruct=reconstruct)
            pruned.update(label for label, _ in pruner.last_step.pruned)
            mixing.update(label for label, _ in pruner.last_step.mixing)
            refused.update(pruner.last_step.refused)
    summary = pruner.summary()
    lines = ["\n" + kinds_table(summary)]
    lines += [f"warning: {message}" for message in tp.pruner.unmet_requests(pruner, summary)]
    if pruner.reconstruction is not None:
        lines.append(str(pruner.reconstruction))
    if mixing:
        lines.append(
            f"{len(mixing)} pruned groups pass through channel-mixing ops (LayerNorm, a head "
            "size used as a scale): not exactly the original with their channels zeroed; "
            "--exact-only leaves them alone"
        )
    lines += [f"refused {label}: {reason}" for label, reason in refused.items()]
    if args.verify:
        worst = max(report.worst for report in reports)
        status = "ok" if all(report.ok for report in reports) else "FAIL"
        lines.append(
            f"exactness check: {status}: {len(pruned - mixing)} pruned groups exact (relative "
            f"error {worst:.1e}); {len(mixing)} through channel-mixing ops, not exact by design "
            f"(not checked); {len(refused)} refused"
        )
    return lines


def kinds_table(summary: list[tp.pruner.KindSummary]) -> str:
    """Per kind of channel: asked, groups pruned, channels before -> after, and why not."""
    rows = [
        (
            row.kind,
            "target" if row.asked is None else f"{row.asked:.0%}",
            f"{row.pruned}/{row.groups}",
            f"{row.before} -> {row.after}",
            row.why_not,
        )
        for row in summary
    ]
    return table(rows, ("kind", "asked", "groups pruned", "channels", "groups kept whole"))


def hf_loader(model: nn.Module) -> str:
    """What loads the folder a pruned Hugging Face model saves into."""
    if hasattr(model.config, tp.hf.RECORD_KEY):
        return "tp.hf.from_pretrained (per-layer widths)"
    return "plain from_pretrained"


def save_hf_folder(model: nn.Module, folder: Path, source: Optional[Path]) -> Path:
    """``save_pretrained`` into ``folder`` (whole or not at all), with the source folder's
    tokenizer and processor files, so the folder is as usable as the one pruned."""

    def write(tmp: Path) -> None:
        tp.hf.save_pretrained(model, tmp)
        if source is not None:
            copy_companions(source, tmp)

    return tp.persistence.atomic_folder(folder, write)
