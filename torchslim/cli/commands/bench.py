"""``torchslim bench``: CPU latency of a model and its pruned version."""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

import torchslim as tp
from torchslim.cli.common import add_command, example_of, model_of, table
from torchslim.utils.latency import export_onnx, latency_ms


def register(commands: Any) -> None:
    sub = add_command(commands, "bench", "CPU latency of a model and its pruned version.", run)
    sub.add_argument("pruned", type=Path, help="a .safetensors written by `torchslim prune`")
    sub.add_argument("--repeats", type=int, default=30, help="timed runs (median reported)")
    sub.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime timing")


def run(args: argparse.Namespace) -> int:
    model, example = model_of(args), example_of(args)
    pruned = tp.load_pruned(copy.deepcopy(model), args.pruned)
    rows = []
    timings = {}
    for name, candidate in (("dense", model), ("pruned", pruned)):
        timings[name] = latency_ms(candidate.eval(), example, args.repeats)
        row = [name, f"{timings[name]:.2f} ms"]
        if not args.no_onnx:
            with tempfile.TemporaryDirectory() as folder:
                onnx = export_onnx(candidate, example, Path(folder) / "m.onnx", args.repeats)
            row.append(f"{onnx['onnx_ms']:.2f} ms")
        rows.append(tuple(row))
    header = ("", "PyTorch CPU") + (() if args.no_onnx else ("ONNX Runtime",))
    print(table(rows, header))
    speedup = timings["dense"] / timings["pruned"]
    print(f"\nPyTorch speed-up: {speedup:.2f}x")
    if speedup <= 1.0:
        print("warning: the pruned model is not faster than the dense one on this machine")
    widths = sorted({m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)})
    unaligned = [c for c in widths if c % 8]
    if unaligned:
        print(
            f"advice: {len(unaligned)} conv widths are not multiples of 8 (e.g. {unaligned[:4]}); "
            "CPU and GPU kernels are usually faster with `torchslim prune --round-to 8`"
        )
    return 0
