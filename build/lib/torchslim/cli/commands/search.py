"""``torchslim sensitivity`` and ``torchslim search``: how much to prune where, from a metric.

torchslim sensitivity resnet18 --eval agreement --ratios 0.25,0.5,0.75 --out sens/
torchslim search resnet18 --target-macs 0.5 --eval mypkg.evals:val_accuracy --out pruned/
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import torchslim as tp
from torchslim.cli.common import (
    add_command,
    add_ignore_argument,
    add_importance_argument,
    aligned,
    example_of,
    ignored_modules,
    importance_of,
    model_of,
    output_name,
    random_inputs,
    write_recipe,
)
from torchslim.search.sensitivity import DEFAULT_RATIOS, Sensitivity

AGREEMENT = {"agreement": "top1", "cosine": "cosine"}
REFUSED = 3


def register(commands: Any) -> None:
    sensitivity = add_command(
        commands,
        "sensitivity",
        "Prune each unit alone at several ratios; table, curves and JSON.",
        run_sensitivity,
    )
    _shared(sensitivity)
    search = add_command(
        commands,
        "search",
        "Find per-unit ratios meeting a MACs/params/latency target; write the plan.",
        run_search,
    )
    _shared(search)
    target = search.add_mutually_exclusive_group()
    target.add_argument("--target-macs", type=float, help="fraction of the dense MACs to keep")
    target.add_argument("--target-params", type=float, help="fraction of dense params to keep")
    target.add_argument("--target-latency", type=float, help="fraction of dense latency to keep")
    search.add_argument("--sensitivity", type=Path, help="reuse a .sensitivity.json")
    search.add_argument("--seed", type=int, default=0, help="seed of the local refinement")
    search.add_argument("--refine-steps", type=int, default=20, help="refinement moves")
    search.add_argument("--runtime", choices=tp.search.runtime.RUNTIMES, default="torch")
    search.add_argument("--threads", type=int, help="CPU threads while timing (default: all)")
    search.add_argument("--repeats", type=int, default=20, help="timed runs per measurement")
    search.add_argument("--rounding", choices=("latency", "none"), default="latency")
    search.add_argument(
        "--timings",
        default=str(tp.search.timings.default_path()),
        help="a table of measured times that reruns reuse, so the same flags give the same "
        "result; 'none' measures afresh (default: %(default)s)",
    )
    search.add_argument("--no-guard", action="store_true", help="ship even if not faster")
    search.add_argument(
        "--min-speedup", type=float, default=1.0, help="the guard's required speed-up"
    )
    search.add_argument(
        "--min-metric",
        type=float,
        help="refuse a result whose --eval metric is below this (default: 0.5 for `agreement` "
        "and `cosine`, none for your own function)",
    )


def _timings(args: argparse.Namespace) -> Optional[str]:
    return None if args.timings.lower() == "none" else args.timings


def _shared(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "--eval",
        dest="eval_spec",
        help="package.module:function (model -> float, higher is better), or `agreement` / "
        "`cosine`: top-1 agreement / cosine similarity with the dense model on random inputs",
    )
    sub.add_argument("--samples", type=int, default=32, help="random inputs for agreement")
    sub.add_argument(
        "--ratios",
        default=",".join(f"{r:g}" for r in DEFAULT_RATIOS),
        help="ratios tried per unit",
    )
    sub.add_argument("--units", help="comma-separated module names (default: each group root)")
    add_importance_argument(sub)
    add_ignore_argument(sub)
    sub.add_argument("--out", type=Path, help="directory for the outputs")


def resolve_eval(spec: str, model: nn.Module, example: torch.Tensor, samples: int) -> Any:
    """``--eval``: a built-in agreement metric or an importable ``module:function``."""
    if spec in AGREEMENT:
        if samples < 1:
            raise ValueError(f"--samples must be >= 1, got {samples}")
        shape = (samples, *example.shape[1:])
        inputs = random_inputs(model, shape, not example.is_floating_point())
        return tp.search.output_agreement(model, inputs, AGREEMENT[spec])
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ValueError(
            f"--eval must be `agreement`, `cosine` or package.module:function, got {spec!r}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--eval: cannot import {module_name!r}: {error}") from error
    function = getattr(module, name, None)
    if not callable(function):
        raise ValueError(f"--eval: {module_name} has no function {name!r}")
    return function


def _options(model: nn.Module, args: argparse.Namespace) -> dict[str, Any]:
    ignored_modules(model, args.ignore)
    return {
        "units": args.units.split(",") if args.units else None,
        "importance": importance_of(args),
        "ignored_layers": list(args.ignore),
    }


def _ratios(text: str) -> list[float]:
    try:
        return [float(r) for r in text.split(",") if r.strip()]
    except ValueError as error:
        raise ValueError(f"--ratios must be numbers like 0.25,0.5, got {text!r}") from error


def _min_metric(args: argparse.Namespace) -> Optional[float]:
    """``--min-metric``, or 0.5 for the built-in agreement metrics: a pruned model agreeing
    with the dense one on fewer than half of the inputs does not do the same job."""
    if args.min_metric is not None:
        return args.min_metric
    return 0.5 if args.eval_spec in AGREEMENT else None


def _required_eval(args: argparse.Namespace) -> str:
    if not args.eval_spec:
        raise ValueError("give --eval package.module:function (or `agreement`)")
    return args.eval_spec


def run_sensitivity(args: argparse.Namespace) -> int:
    model = model_of(args)
    example = example_of(args, model)
    eval_fn = resolve_eval(_required_eval(args), model, example, args.samples)
    table = tp.search.sensitivity(
        model, example, eval_fn, ratios=_ratios(args.ratios), **_options(model, args)
    )
    text = tp.search.sensitivity_markdown(table)
    print(aligned(text))
    if args.out:
        name = output_name(args.model)
        tp.search.report.write_json(args.out / f"{name}.sensitivity.json", table.to_dict())
        (args.out / f"{name}.sensitivity.md").write_text(text)
        plots = tp.search.plot_sensitivity(table, args.out / f"{name}.sensitivity")
        write_recipe(args, args.out / f"{name}.recipe.yaml")
        print(f"wrote {args.out / f'{name}.sensitivity.json'}, .md and {len(plots)} curves")
    return 0


def run_search(args: argparse.Namespace) -> int:
    kinds = {"macs": args.target_macs, "params": args.target_params}
    kinds["latency"] = args.target_latency
    given = [(kind, value) for kind, value in kinds.items() if value is not None]
    if len(given) != 1:
        raise ValueError("give one of --target-macs, --target-params, --target-latency")
    target = tp.search.Target(*given[0])
    model = model_of(args)
    example = example_of(args, model)
    eval_fn = resolve_eval(_required_eval(args), model, example, args.samples)
    table = None
    if args.sensitivity:
        table = Sensitivity.from_dict(json.loads(args.sensitivity.read_text()))
    result = tp.search.search(
        model,
        example,
        eval_fn,
        target,
        sensitivity=table,
        ratios=_ratios(args.ratios),
        seed=args.seed,
        refine_steps=args.refine_steps,
        runtime=tp.search.Runtime(args.runtime, args.threads, args.repeats, timings=_timings(args)),
        rounding=args.rounding,
        use_guard=not args.no_guard,
        min_speedup=args.min_speedup,
        min_metric=_min_metric(args),
        **_options(model, args),
    )
    print(aligned(tp.search.search_markdown(result)))
    if args.rounding == "latency" or not args.no_guard:
        print(
            f"note: times kept in {args.timings} and reused by reruns (--timings none measures "
            "afresh)"
            if _timings(args)
            else "note: latency-aware rounding and the guard chose from times measured now; "
            "a rerun can choose other channel counts"
        )
    if args.out:
        name = output_name(args.model)
        tp.search.save_result(result, args.out / f"{name}.safetensors")
        write_recipe(args, args.out / f"{name}.recipe.yaml")
        written = f"{name}.safetensors, .plan.json, " if result.accepted else ""
        print(f"wrote {args.out}/{written}{name}.search.json and .search.md")
    if not result.accepted:
        print(f"torchslim: {result.refusal}", file=sys.stderr)
        return REFUSED
    return 0
