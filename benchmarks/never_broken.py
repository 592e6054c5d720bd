"""Does a plain pruning step hand back a model that runs? One model per timm family.

For each family (timm module) the smallest-named model is built with random weights and pruned
by one ``MagnitudePruner(pruning_ratio=0.5)`` step on its default input size, as a new user
would. Reported per model: the pruned forward runs with the dense output shape, the largest
fraction of any parameter dim removed (``pruning_ratio`` must not compound past 0.5), groups
the safety net refused, parameters kept. Each model runs in its own subprocess with a time limit.

    python benchmarks/never_broken.py                 # every family
    python benchmarks/never_broken.py --markdown out.md
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

SMALL = ("atto", "femto", "pico", "nano", "tiny", "xxs", "xs", "small", "s0", "b0", "18", "lite0")


def families() -> list[str]:
    """The smallest-named model of every timm family (model module)."""
    import timm

    chosen = []
    for module in sorted(timm.list_modules()):
        names = timm.list_models(module=module)
        if not names:
            continue

        def rank(name: str) -> tuple[int, int, str]:
            hits = [k for k, tag in enumerate(SMALL) if tag in name]
            return (hits[0] if hits else len(SMALL), len(name), name)

        chosen.append(min(names, key=rank))
    return chosen


def run_one(name: str) -> dict:
    """Build, prune and check one model (runs inside the subprocess)."""
    import warnings

    import timm
    import torch

    import torchslim as tp

    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(1, *size)
    with torch.no_grad():
        dense = model(x).shape
    shapes = {n: p.shape for n, p in model.named_parameters()}
    params = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    try:
        pruner = tp.pruner.MagnitudePruner(model, x, pruning_ratio=0.5)
        pruner.step()
    except Exception as error:
        return {"status": "prune failed", "note": f"{type(error).__name__}: {error}"[:160]}
    seconds = time.perf_counter() - start
    removed = max(
        ((b - a) / b for n, p in model.named_parameters() for b, a in zip(shapes[n], p.shape)),
        default=0.0,
    )
    result = {
        "seconds": round(seconds, 1),
        "max_removed": round(removed, 3),
        "refused": len(getattr(pruner, "refused", {})),
        "kept": round(sum(p.numel() for p in model.parameters()) / params, 3),
    }
    try:
        with torch.no_grad():
            shape = model(x).shape
    except Exception as error:
        return {**result, "status": "crash", "note": f"{type(error).__name__}: {error}"[:160]}
    return {**result, "status": "ok" if shape == dense else "shape changed"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="timm model names (default: one per family)")
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model")
    parser.add_argument("--json", type=Path, help="also write every model's result here")
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    results = {}
    for name in args.names or families():
        try:
            done = subprocess.run(
                [sys.executable, __file__, "--one", name],
                capture_output=True,
                text=True,
                timeout=args.timeout,
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            results[name] = (
                json.loads(lines[-1])
                if lines
                else {"status": "error", "note": (done.stderr.strip().splitlines() or [""])[-1]}
            )
        except subprocess.TimeoutExpired:
            results[name] = {"status": "timeout"}
        print(name, results[name], flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    if args.markdown:
        args.markdown.write_text(markdown(results))


def markdown(results: dict) -> str:
    counts: dict[str, int] = {}
    for result in results.values():
        counts[result["status"]] = counts.get(result["status"], 0) + 1
    pruned = [r for r in results.values() if "max_removed" in r]
    over = [n for n, r in results.items() if r.get("max_removed", 0) > 0.5 + 1e-9]
    lines = [
        "| models | pruned forward runs | crashes after pruning | over-pruned (> 50% of a dim) "
        "| groups refused by the safety net |",
        "|---|---|---|---|---|",
        f"| {len(results)} | {counts.get('ok', 0)} | {counts.get('crash', 0)} | {len(over)} | "
        f"{sum(r['refused'] for r in pruned)} |",
        "",
    ]
    others = {n: r for n, r in results.items() if r["status"] not in ("ok",)}
    for name, result in sorted(others.items()):
        note = re.sub(r"\s+", " ", result.get("note", ""))
        lines.append(f"- {name}: {result['status']} {note}".rstrip())
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
