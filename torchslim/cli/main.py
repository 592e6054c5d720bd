"""The ``torchslim`` command: ``inspect`` a model's groups, ``prune`` it, ``search`` for per-layer
ratios, ``demo`` the library.

torchslim inspect resnet18 --input-shape 1,3,224,224
torchslim prune resnet18 --ratio 0.5 --round-to 8 --ignore fc --out pruned/
torchslim search resnet18 --target-macs 0.5 --eval agreement --out pruned/
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

import torchslim as tp
from torchslim.cli.finetune import add_arguments as add_finetune_arguments
from torchslim.cli.finetune import run_finetune
from torchslim.cli.models import ModelNotFound, load_model, parse_shape
from torchslim.cli.search import add_commands as add_search_commands
from torchslim.cli.search import run_search, run_sensitivity
from torchslim.graph.kinds import group_kind

IMPORTANCE = {
    "l1": lambda: tp.importance.MagnitudeImportance(p=1),
    "l2": lambda: tp.importance.MagnitudeImportance(p=2),
    "group-norm": lambda: tp.importance.GroupNormImportance(),
    "lamp": lambda: tp.importance.LAMPImportance(),
    "fpgm": lambda: tp.importance.FPGMImportance(),
    "bn": lambda: tp.importance.BNScaleImportance(),
    "random": lambda: tp.importance.RandomImportance(),
    "wanda": lambda: tp.importance.WandaImportance(),
    "obs": lambda: tp.importance.OBSImportance(),
}
CALIBRATION_BATCH = 128


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchslim",
        description="Structural pruning of PyTorch models on an exact dependency graph.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def model_command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "model",
            nargs="?",
            help="torchvision or timm name, package.module:factory or .pt, optionally followed "
            "by @pruned.safetensors (a checkpoint from `torchslim prune`)",
        )
        sub.add_argument("--config", type=Path, help="YAML recipe with any of these options")
        sub.add_argument(
            "--input-shape", default="1,3,224,224", help="example input shape (default 1,3,224,224)"
        )
        sub.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled .pt")
        return sub

    inspect = model_command("inspect", "List coupled groups, what is prunable and what is not.")
    inspect.add_argument("--layers", action="store_true", help="also print per-layer MACs/params")

    demo = commands.add_parser(
        "demo",
        help="Train, sparse-train, prune, fine-tune and export a CNN on real digits.",
        description=(
            "The whole workflow on scikit-learn's bundled handwritten digits: train a small CNN, "
            "sparse-train it (BN L1), prune it to a MACs target, fine-tune, evaluate, export to "
            "ONNX and write a report with plots."
        ),
    )
    demo.add_argument("--out", type=Path, default=Path("torchslim-demo"), help="report folder")
    demo.add_argument("--epochs", type=int, default=30, help="dense training epochs")
    demo.add_argument("--target-macs", type=float, default=0.5, help="fraction of MACs to keep")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--config", type=Path, help="YAML recipe with any of these options")
    demo.add_argument(
        "--dataset",
        choices=("digits", "fashion-mnist", "mnist"),
        default="digits",
        help="digits (in scikit-learn), fashion-mnist (apt-get install dataset-fashion-mnist), "
        "or mnist (raw IDX files in --data-dir)",
    )
    demo.add_argument("--data-dir", type=Path, help="folder with the IDX files")

    bench = model_command("bench", "CPU latency of a model and its pruned version.")
    bench.add_argument("pruned", type=Path, help="a .safetensors written by `torchslim prune`")
    bench.add_argument("--repeats", type=int, default=30, help="timed runs (median reported)")
    bench.add_argument("--no-onnx", action="store_true", help="skip the ONNX Runtime timing")

    finetune = model_command(
        "finetune",
        "Fine-tune a pruned checkpoint (MODEL builds the architecture); runs under torchrun.",
    )
    add_finetune_arguments(finetune)

    prune = model_command("prune", "Prune a model and write weights + pruning plan.")
    amount = prune.add_mutually_exclusive_group()
    amount.add_argument("--ratio", type=float, help="fraction of every group's channels to remove")
    amount.add_argument("--target-macs", type=float, help="fraction of the dense MACs to keep")
    prune.add_argument("--importance", choices=sorted(IMPORTANCE), default="l2")
    prune.add_argument("--round-to", type=int, help="keep channel counts multiples of this")
    prune.add_argument("--global", dest="global_pruning", action="store_true", help="rank globally")
    prune.add_argument("--steps", type=int, default=1, help="iterative steps (default 1)")
    prune.add_argument("--ignore", action="append", default=[], help="module name(s) to keep")
    prune.add_argument("--verify", action="store_true", help="run the exactness check")
    prune.add_argument(
        "--exact-only",
        action="store_true",
        help="leave alone groups whose channels pass through channel-mixing ops (LayerNorm ...)",
    )
    prune.add_argument(
        "--calibration",
        choices=("digits", "fashion-mnist", "mnist"),
        help="training images that calibrate --importance wanda/obs and --reconstruct",
    )
    prune.add_argument("--data-dir", type=Path, help="folder with the IDX files (mnist)")
    prune.add_argument(
        "--calibration-size", type=int, default=1024, help="calibration images (default 1024)"
    )
    prune.add_argument(
        "--reconstruct",
        action="store_true",
        help="refit the layers reading removed channels on the calibration images",
    )
    prune.add_argument("--out", type=Path, help="directory for <model>.safetensors + plan")
    add_search_commands(model_command)
    return parser


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    """Parse, with a ``--config`` recipe's values as defaults: flags given on the command
    line win, so a recipe can be rerun as is or tweaked."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args
    import yaml

    subparser = parser._subparsers._group_actions[0].choices[args.command]
    actions = {a.dest: a for a in subparser._actions if a.dest not in ("help", "config")}
    try:
        recipe = yaml.safe_load(args.config.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ValueError(f"cannot read --config {args.config}: {error}") from error
    if not isinstance(recipe, dict):
        raise ValueError(f"--config {args.config} must hold a mapping of option: value")
    values = {str(k).replace("-", "_"): v for k, v in recipe.items()}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        raise ValueError(f"--config {args.config}: unknown options {', '.join(unknown)}")
    for dest, value in values.items():
        convert = actions[dest].type
        if callable(convert) and isinstance(value, (str, int, float)):
            values[dest] = convert(value)
    for dest in _replaced_by_flags(subparser, argv or sys.argv[1:]):
        values.pop(dest, None)
    subparser.set_defaults(**values)
    return parser.parse_args(argv)


def _replaced_by_flags(subparser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """Recipe keys that a flag on the command line replaces: the other options of its
    mutually exclusive group (``--ratio`` replaces a recipe's ``target_macs``)."""
    given = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    replaced = set()
    for group in subparser._mutually_exclusive_groups:
        chosen = [a for a in group._group_actions if given & set(a.option_strings)]
        if chosen:
            replaced.update(a.dest for a in group._group_actions if a not in chosen)
    return replaced


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = parse(argv)
        if args.command != "demo" and not args.model:
            raise ValueError("give a MODEL (or `model:` in --config)")
        if args.command == "demo":
            return demo(args)
        model = load_model(args.model, args.trust_pickle)
        if args.command == "finetune":
            return run_finetune(model, args)
        example = torch.randn(parse_shape(args.input_shape))
        if args.command == "inspect":
            return inspect(model, example, args)
        if args.command == "bench":
            return bench(model, example, args)
        if args.command == "sensitivity":
            return run_sensitivity(model, example, args)
        if args.command == "search":
            return run_search(model, example, args)
        return prune(model, example, args)
    except (ModelNotFound, ValueError, RuntimeError, OSError) as error:
        print(f"torchslim: error: {error}", file=sys.stderr)
        return 2
    except ImportError as error:
        print(
            f"torchslim: error: {error.name or error} is needed for this command: "
            "pip install 'torchslim[cli]'",
            file=sys.stderr,
        )
        return 2


def _table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, tuple("-" * w for w in widths), *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines
    )


def demo(args: argparse.Namespace) -> int:
    from torchslim.cli.demo import run_demo
    from torchslim.cli.report import summary_rows

    results = run_demo(
        args.out,
        epochs=args.epochs,
        target_macs=args.target_macs,
        seed=args.seed,
        dataset=args.dataset,
        data_dir=args.data_dir,
    )
    print(_table(summary_rows(results), ("", "dense", "pruned")))
    print(f"\nreport: {args.out / 'report.md'} (plots: channels.png, steps.png, loss.png)")
    return 0


def bench(model: nn.Module, example: torch.Tensor, args: argparse.Namespace) -> int:
    import tempfile

    from torchslim.utils.latency import export_onnx, latency_ms

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
    print(_table(rows, header))
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


def output_name(spec: str) -> str:
    """``resnet18`` -> resnet18, ``pkg.mod:Net`` -> Net, ``path/to/model.pt`` -> model."""
    spec = spec.partition("@")[0]
    if ":" in spec:
        return spec.partition(":")[2]
    return Path(spec).stem if spec.endswith((".pt", ".pth")) else spec.replace("/", "_")


def write_recipe(args: argparse.Namespace, path: Path) -> None:
    """The effective options of this run, for ``--config`` to repeat it."""
    import yaml

    skip = {"command", "config", "out", "trust_pickle"}
    recipe = {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in skip
    }
    tp.persistence.atomic_write(
        path, lambda tmp: tmp.write_text(yaml.safe_dump(recipe, sort_keys=True))
    )


def inspect(model: nn.Module, example: torch.Tensor, args: argparse.Namespace) -> int:
    graph = tp.DependencyGraph().build_dependency(model, example)
    rows = []
    for group in graph.all_groups():
        prunable = len(group.prunable_idxs)
        if not prunable:
            status = "refused: " + (group.refusal([0]) or "no prunable channel")
        elif group.mixing:
            status = "prunable, not exact: " + "; ".join(sorted(group.mixing))
        else:
            status = "prunable"
        layers = len({m.ref.module_name for m in group.coupling.members})
        kind = group_kind(group)
        rows.append((group.root.label, kind, group.size, prunable, layers, status[:100]))
    header = ("group (root)", "kind", "channels", "prunable", "layers", "status")
    print(_table(rows, header))
    macs, params, layer_macs, layer_params = tp.utils.count_ops_and_params(
        model, example, layer_wise=True
    )
    usable = sum(1 for r in rows if r[3])
    print(
        f"\n{len(rows)} groups, {usable} prunable; {params / 1e6:.3f} M params, "
        f"{macs / 1e9:.4f} G MACs"
    )
    for entry in graph.unsupported():
        print(f"unsupported op {entry.op} in module {entry.module}")
    if args.layers:
        names = [n for n in layer_params if layer_params[n] or layer_macs.get(n)]
        layer_rows = [(n, layer_macs.get(n, 0), layer_params[n]) for n in names]
        print("\n" + _table(layer_rows, ("layer", "MACs", "params")))
    return 0


def calibration_batches(args: argparse.Namespace, importance: object) -> list[torch.Tensor]:
    """Batches of training images for calibrated criteria and reconstruction (none needed:
    an empty list)."""
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
    from torchslim.data import load_dataset

    (images, _), _ = load_dataset(args.calibration, args.data_dir)
    return list(images[: args.calibration_size].split(CALIBRATION_BATCH))


def prune(model: nn.Module, example: torch.Tensor, args: argparse.Namespace) -> int:
    if (args.ratio is None) == (args.target_macs is None):
        raise ValueError("give exactly one of --ratio and --target-macs")
    modules = dict(model.named_modules())
    missing = [name for name in args.ignore if name not in modules]
    if missing:
        raise ValueError(f"--ignore names no module of this model: {', '.join(missing)}")
    before_macs, before_params = tp.utils.count_ops_and_params(model, example)
    importance = IMPORTANCE[args.importance]()
    batches = calibration_batches(args, importance)
    if hasattr(importance, "record"):
        with importance.record(model), torch.no_grad():
            for batch in batches:
                model(batch)
    pruner = tp.pruner.MetaPruner(
        model,
        example,
        importance=importance,
        pruning_ratio=args.ratio if args.ratio is not None else 0.0,
        target_macs=args.target_macs,
        global_pruning=args.global_pruning or args.target_macs is not None,
        iterative_steps=args.steps,
        round_to=args.round_to,
        ignored_layers=[modules[name] for name in args.ignore],
        exact_only=args.exact_only,
    )
    from tqdm import tqdm

    steps = tqdm(range(args.steps), desc="pruning", unit="step", disable=args.steps == 1)
    reconstruct = batches if args.reconstruct else None
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
    print(_table(rows, ("", "before", "after", "reduction")))
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
    if args.out:
        name = output_name(args.model)
        path = tp.save_pruned(model, args.out / f"{name}.safetensors")
        write_recipe(args, args.out / f"{name}.recipe.yaml")
        print(f"wrote {path} and {path.with_name(path.stem + '.plan.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
