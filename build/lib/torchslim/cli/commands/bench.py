"""``torchslim bench``: CPU latency of a model and its pruned version, in PyTorch and in ONNX
Runtime, timed in turns."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from torch import nn

import torchslim as tp
from torchslim.cli.common import add_command, example_of, model_of, table
from torchslim.cli.models import hf_folder_of, load_hf_folder, tensor_output


def register(commands: Any) -> None:
    sub = add_command(commands, "bench", "CPU latency of a model and its pruned version.", run)
    sub.add_argument(
        "pruned",
        type=Path,
        help="a .safetensors written by `torchslim prune`, or its Hugging Face folder",
    )
    sub.add_argument("--repeats", type=int, default=30, help="timed runs (median reported)")
    sub.add_argument("--threads", type=int, help="CPU threads while timing (default: all)")
    sub.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime timing")


def pruned_model(args: argparse.Namespace, dense: nn.Module) -> nn.Module:
    """The pruned model: a Hugging Face folder as it is, or the dense model with a pruned
    checkpoint applied."""
    folder = hf_folder_of(str(args.pruned))
    if folder is not None:
        return load_hf_folder(folder)
    return tp.load_pruned(copy.deepcopy(dense), args.pruned)


def run(args: argparse.Namespace) -> int:
    model = model_of(args)
    example = example_of(args, model)
    pruned = pruned_model(args, model)
    candidates = [tensor_output(model), tensor_output(pruned)]
    runtimes = [tp.search.Runtime("torch", args.threads, args.repeats)]
    if not args.no_onnx:
        runtimes.append(tp.search.Runtime("onnxruntime", args.threads, args.repeats))
    timings = [runtime.time_models(candidates, example) for runtime in runtimes]
    names = ["PyTorch CPU", "ONNX Runtime"][: len(runtimes)]
    rows = [
        (name, f"{before:.2f} ms", f"{after:.2f} ms", f"{before / after:.2f}x")
        for name, (before, after) in zip(names, timings)
    ]
    threads = f", {args.threads} thread(s)" if args.threads else ""
    print(table(rows, (f"median of {args.repeats}{threads}", "dense", "pruned", "speed-up")))
    for name, (before, after) in zip(names, timings):
        if after >= before:
            print(f"warning: in {name} the pruned model is not faster than the dense one here")
    widths = sorted({m.out_channels for m in pruned.modules() if isinstance(m, nn.Conv2d)})
    unaligned = [c for c in widths if c % 8]
    if unaligned:
        print(
            f"advice: {len(unaligned)} conv widths are not multiples of 8 (e.g. {unaligned[:4]}); "
            "CPU and GPU kernels are usually faster with `torchslim prune --round-to 8`"
        )
    return 0
