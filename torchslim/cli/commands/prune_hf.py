"""``torchslim prune-hf``: prune a Hugging Face checkpoint folder shard by shard, without
loading it (see :func:`torchslim.hf.prune_checkpoint`)."""

from __future__ import annotations

import argparse
import resource
from pathlib import Path
from typing import Any

import torch

import torchslim as tp
from torchslim.cli.commands.prune import check_ratio, kind_ratios, text_blocks
from torchslim.cli.common import add_command, table, write_recipe
from torchslim.hf.stream import CALIBRATED, STREAMED
from torchslim.utils.ops_counter import count

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def register(commands: Any) -> None:
    sub = add_command(
        commands,
        "prune-hf",
        "Prune a Hugging Face checkpoint folder shard by shard (L2 magnitude, Wanda or FLAP's "
        "fluctuation), without loading it.",
        run,
        model=False,
        recipe=True,
    )
    sub.add_argument("src", type=Path, help="a save_pretrained folder (safetensors shards)")
    sub.add_argument(
        "kind_ratios",
        nargs="*",
        metavar="KIND=RATIO",
        default=[],
        help="ratios per kind of channel, as neurons=0.2 heads=0.25 (or --kinds)",
    )
    sub.add_argument("--out", type=Path, required=True, help="the pruned folder to write")
    sub.add_argument(
        "--kinds", help="ratios per kind of channel, as neurons=0.2,heads=0.25,width=0.1"
    )
    sub.add_argument("--ratio", type=float, help="fraction of every group's channels")
    sub.add_argument("--global", dest="global_pruning", action="store_true", help="rank globally")
    sub.add_argument("--round-to", type=int, help="keep channel counts multiples of this")
    sub.add_argument(
        "--max-shard-size", type=float, default=5.0, help="gigabytes per written shard"
    )
    sub.add_argument(
        "--trust-pickle",
        action="store_true",
        help="read pickle (.bin) shards (torch.load with weights_only=True); writes safetensors",
    )
    sub.add_argument(
        "--importance",
        choices=sorted(STREAMED),
        default="magnitude",
        help="L2 magnitude (one pass, no data), or Wanda or FLAP's fluctuation recorded on "
        "--calibration one module's weights at a time",
    )
    sub.add_argument(
        "--calibration", help="a UTF-8 text file, read with SRC's tokenizer (wanda, fluctuation)"
    )
    sub.add_argument("--calibration-size", type=int, default=4096, help="calibration tokens")
    sub.add_argument(
        "--calibration-length", type=int, default=128, help="tokens per calibration sequence"
    )
    sub.add_argument(
        "--reconstruct",
        action="store_true",
        help="refit the layers reading removed channels on --calibration, a decoder layer at a "
        "time",
    )
    sub.add_argument(
        "--calibration-dtype",
        choices=sorted(DTYPES),
        help="run the calibration forward in this dtype (float32: many times faster than a "
        "bfloat16 checkpoint's own dtype on CPUs without bfloat16 matrix units)",
    )


def run(args: argparse.Namespace) -> int:
    kinds = kind_ratios(args.kinds)
    for kind, ratio in kind_ratios(",".join(args.kind_ratios)).items():
        if kind in kinds:
            raise ValueError(f"the ratio of {kind} is given twice (--kinds and {kind}=RATIO)")
        kinds[kind] = ratio
    if args.ratio is None and not kinds:
        raise ValueError("give --kinds, --ratio or both")
    check_ratio(args.ratio)
    calibration = None
    calibrated = " or ".join(CALIBRATED)
    calibrating = args.importance != "magnitude" or args.reconstruct
    if not calibrating and args.calibration is not None:
        raise ValueError(
            f"--calibration calibrates --importance {calibrated} and --reconstruct; magnitude "
            "needs no data"
        )
    if not calibrating and args.calibration_dtype is not None:
        raise ValueError(
            f"--calibration-dtype sets the dtype of the calibration of --importance {calibrated} "
            "and --reconstruct"
        )
    if calibrating:
        if args.calibration is None:
            needs = "--reconstruct" if args.reconstruct else f"--importance {args.importance}"
            raise ValueError(f"{needs} needs --calibration TEXT_FILE")
        if min(args.calibration_size, args.calibration_length) < 2:
            raise ValueError("--calibration-size and --calibration-length must be at least 2")
        calibration = text_blocks(
            args.src, args.calibration, args.calibration_size, args.calibration_length
        )
    recipe = {
        "pruning_ratio": args.ratio or 0.0,
        "pruning_ratio_dict": kinds or None,
        "global_pruning": args.global_pruning,
        "round_to": args.round_to,
    }
    report = tp.hf.prune_checkpoint(
        args.src,
        args.out,
        recipe,
        importance=args.importance,
        calibration=calibration,
        max_shard_bytes=int(args.max_shard_size * 1e9),
        trust_pickle=args.trust_pickle,
        calibration_dtype=DTYPES.get(args.calibration_dtype),
        reconstruct=args.reconstruct,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    rows = [
        ("params", count(report.params_before), count(report.params_after)),
        *((name, str(a), str(b)) for name, (a, b) in report.changed.items()),
    ]
    print(table(rows, ("", "before", "after")))
    print(
        f"read {report.bytes_read / 1e9:.2f} GB, wrote {report.bytes_written / 1e9:.2f} GB in "
        f"{report.seconds:.1f} s ({report.bytes_read / 1e6 / max(report.seconds, 1e-9):.0f} "
        f"MB/s read); peak memory {peak:.2f} GB"
    )
    if report.reconstruction is not None:
        print(report.reconstruction)
    folder = args.out.resolve()
    recipe = folder.with_name(f"{folder.name}.recipe.yaml")
    write_recipe(args, recipe)
    loader = "plain from_pretrained" if report.plain_config else "tp.hf.from_pretrained"
    print(f"wrote {args.out}/ ({loader} loads it) and {recipe}")
    return 0
