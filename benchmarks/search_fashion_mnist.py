"""Searched per-layer ratios vs one uniform ratio at 2x fewer MACs, Fashion-MNIST, same run.

The small ResNet of ``benchmarks/accuracy.py`` is trained on 55,000 real Fashion-MNIST training
images (``apt-get install dataset-fashion-mnist``); the other 5,000 are the search's validation
set (accuracy on 2,000 of them; the test set is never seen by the search). Then:

- uniform: the smallest uniform ratio that halves the MACs (bisection), L2 magnitude;
- searched, accuracy right after pruning: ``tp.search.search`` to ``Target("macs", 0.5)`` with
  ``eval_fn`` = validation accuracy, same importance, no rounding;
- the same + latency-aware rounding and the guard (PyTorch CPU, one thread);
- searched, accuracy after a short fine-tune: the same search with ``eval_fn`` =
  ``tp.search.after_finetune(validation accuracy, tp.search.short_finetune(batches))``, every
  candidate (sensitivity trials included) trained for ``--probe-steps`` fixed batches of the
  training images first.

Each model is fine-tuned with the same schedule for every budget in ``--finetune`` and every seed
in ``--seeds``, and evaluated on the 10,000 test images.

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
from torchslim.cli.datasets import FASHION_MNIST, Split, accuracy, load_dataset  # noqa: E402

VALIDATION = 5000
BATCH = 128


def probe_batches(data: Split, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``steps`` fixed training batches for the short fine-tune of every search candidate."""
    x, y = data
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1))
    return [(x[i], y[i]) for i in order[: steps * BATCH].split(BATCH)]


def finetuned(model: nn.Module, data: Split, test: Split, epochs: float, seeds: list[int]) -> list:
    """Test accuracy after fine-tuning a copy for ``epochs``, once per seed."""
    found = []
    for seed in seeds:
        torch.manual_seed(seed)
        tuned = copy.deepcopy(model)
        train(tuned, data, epochs, 0.02, seed)
        found.append(accuracy(tuned, test))
    return found


def spread(values: list[float]) -> str:
    return (
        f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f} "
        f"({min(values):.4f}–{max(values):.4f})"
    )


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=FASHION_MNIST)
    parser.add_argument("--epochs", type=float, default=3.0, help="dense training epochs")
    parser.add_argument(
        "--finetune", type=float, nargs="+", default=[0.1, 1.0], help="fine-tune budgets, epochs"
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fine-tune seeds")
    parser.add_argument("--probe-steps", type=int, default=40, help="short fine-tune per probe")
    parser.add_argument("--refine-steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (shared machine)")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--out", type=Path, help="folder for the searched plans and reports")
    args = parser.parse_args(argv)
    if len(args.seeds) < 2:
        parser.error("give at least two --seeds: the table reports their spread")
    start = time.perf_counter()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    (x, y), test_data = load_dataset("fashion-mnist", args.data)
    train_data = (x[:-VALIDATION], y[:-VALIDATION])
    validation = (x[-VALIDATION:][:2000], y[-VALIDATION:][:2000])
    dense = SmallResNet()
    train(dense, train_data, args.epochs, 0.1, 0)

    def eval_fn(model: nn.Module) -> float:
        return accuracy(model, validation)

    probe = ts.search.short_finetune(probe_batches(train_data, args.probe_steps), lr=0.01)
    after = ts.search.after_finetune(eval_fn, probe)
    base_macs, _ = ts.utils.count_ops_and_params(dense, INPUT)
    uniform, ratio = uniform_to_half(partial(prune_uniform, ts), dense)
    options = dict(
        target=ts.search.Target("macs", 0.5),
        seed=0,
        refine_steps=args.refine_steps,
        ignored_layers=["fc"],
    )
    plain = ts.search.search(dense, INPUT, eval_fn, rounding="none", use_guard=False, **options)
    aware = ts.search.search(
        dense,
        INPUT,
        eval_fn,
        sensitivity=plain.sensitivity,
        runtime=ts.search.Runtime("torch", threads=1),
        **options,
    )
    probed = ts.search.search(dense, INPUT, after, rounding="none", use_guard=False, **options)
    if args.out:
        for name, result in (("plain", plain), ("aware", aware), ("probed", probed)):
            ts.search.save_result(result, args.out / f"{name}.safetensors")
    candidates = {
        f"uniform ratio {ratio:.3f}": uniform,
        "searched, accuracy right after pruning": plain.model,
        "the same + latency-aware rounding": aware.model,
        "searched, accuracy after a short fine-tune": probed.model,
    }
    budgets = " | ".join(f"test acc. after {e:g} epoch(s)" for e in args.finetune)
    lines = [
        f"| model | MACs | params | val. acc. | test acc. before fine-tune | {budgets} |",
        "|---|---|---|---|---|" + "---|" * len(args.finetune),
        f"| dense | {base_macs / 1e6:.2f} M (1.00x) | "
        f"{sum(p.numel() for p in dense.parameters()) / 1e3:.1f} K | {eval_fn(dense):.4f} | "
        f"{accuracy(dense, test_data):.4f} |" + " - |" * len(args.finetune),
    ]
    tuned: dict[str, dict[float, list[float]]] = {}
    for name, model in candidates.items():
        if model is None:
            lines.append(f"| {name} | refused by the guard |" + " |" * (3 + len(args.finetune)))
            continue
        macs, params = ts.utils.count_ops_and_params(model, INPUT)
        tuned[name] = {
            e: finetuned(model, train_data, test_data, e, args.seeds) for e in args.finetune
        }
        cells = " | ".join(spread(tuned[name][e]) for e in args.finetune)
        lines.append(
            f"| {name} | {macs / 1e6:.2f} M ({macs / base_macs:.2f}x) | {params / 1e3:.1f} K | "
            f"{eval_fn(model):.4f} | {accuracy(model, test_data):.4f} | {cells} |"
        )
    lines += ["", *verdicts(tuned, f"uniform ratio {ratio:.3f}"), ""]
    for label, result in (("right after pruning", plain), ("after a short fine-tune", probed)):
        lines.append(
            f"Channels per group root, searched on accuracy {label} (dense -> kept): "
            + ", ".join(
                f"{root} {result.applied['dense_channels'][root]}->{kept}"
                for root, kept in result.applied["channels"].items()
            )
        )
    lines += ["", aware.verdict.message if aware.verdict else ""]
    footer = (
        f"Fashion-MNIST: trained on 55,000 images, searched on 2,000 held-out training images, "
        f"tested on the 10,000 test images; {args.epochs:g} dense epochs; fine-tune budgets "
        f"{', '.join(f'{e:g}' for e in args.finetune)} epoch(s) per model and seed (seeds "
        f"{', '.join(map(str, args.seeds))}; mean ± sample std (min–max)); search seed 0, "
        f"{args.refine_steps} refinement steps, {args.probe_steps} probe steps of {BATCH} images; "
        f"{args.threads} thread(s); {time.perf_counter() - start:.0f} s on this machine."
    )
    publish(lines, footer, args.markdown)


def verdicts(tuned: dict[str, dict[float, list[float]]], baseline: str) -> list[str]:
    """Per searched model and budget: the mean difference to uniform, and whether every seed of
    the searched model beats every seed of uniform (better beyond the seed spread)."""
    found = []
    for name, budgets in tuned.items():
        if name == baseline:
            continue
        for epochs, values in budgets.items():
            reference = tuned[baseline][epochs]
            difference = statistics.mean(values) - statistics.mean(reference)
            beyond = min(values) > max(reference)
            found.append(
                f"- {name}, {epochs:g} epoch(s): {difference:+.4f} vs uniform; "
                + ("better beyond the seed spread" if beyond else "not beyond the seed spread")
            )
    return found


if __name__ == "__main__":
    main()
