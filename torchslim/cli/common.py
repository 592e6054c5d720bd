"""What the CLI's commands share: the MODEL arguments, the model and its example input, the
`--ignore` check, tables, output names and recipes."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

import torchslim as tp
from torchslim.cli.models import (
    default_shape,
    hf_folder_of,
    load_model,
    parse_shape,
    takes_token_ids,
    vocabulary,
)

Run = Callable[[argparse.Namespace], int]
DATASETS = ("digits", "fashion-mnist", "mnist")


class DefaultsShown(argparse.HelpFormatter):
    """Help that shows each option's default, where it has a meaningful one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, [], argparse.SUPPRESS) or "%(default)" in text:
            return text
        return f"{text} (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser that tells which options it has and which exclude each other
    (what a ``--config`` recipe may set, and which recipe keys a flag replaces)."""

    def options(self) -> dict[str, argparse.Action]:
        return {a.dest: a for a in self._actions if a.dest not in ("help", "config", "func")}

    def exclusive_groups(self) -> list[list[argparse.Action]]:
        return [list(group._group_actions) for group in self._mutually_exclusive_groups]


def add_command(
    commands: Any,
    name: str,
    help_text: str,
    run: Run,
    model: bool = True,
    recipe: Optional[bool] = None,
) -> CommandParser:
    """Add subcommand ``name`` that runs ``run(args)``; with ``recipe`` (by default with
    ``model``) the --config (--recipe) YAML of its options; with ``model``, also the shared
    MODEL, --input-shape and --trust-pickle arguments."""
    sub = commands.add_parser(
        name,
        help=help_text,
        description=help_text,
        formatter_class=DefaultsShown,
    )
    sub.set_defaults(func=run)
    if model if recipe is None else recipe:
        sub.add_argument(
            "--config",
            "--recipe",
            dest="config",
            type=Path,
            help="YAML recipe with any of these options",
        )
    if not model:
        return sub
    sub.add_argument(
        "model",
        nargs="?",
        help="torchvision or timm name, package.module:factory or .pt, optionally followed "
        "by @pruned.safetensors (a checkpoint from `torchslim prune`)",
    )
    sub.add_argument(
        "--input-shape",
        help="example input shape (default: 1,16 token ids for a Hugging Face language model, "
        "its image size for a vision one, else 1,3,224,224)",
    )
    sub.add_argument(
        "--input-dtype",
        choices=("float", "long"),
        help="example input values: random floats, or random token ids below the vocabulary "
        "of the model's first embedding (default: token ids for a Hugging Face language model "
        "or a model whose first layer is an nn.Embedding)",
    )
    sub.add_argument("--trust-pickle", action="store_true", help="allow loading a pickled .pt")
    return sub


def add_importance_argument(sub: argparse.ArgumentParser) -> None:
    """``--importance NAME``: a criterion of :mod:`torchslim.importance`'s registry."""
    names = ", ".join(tp.importance.importance_names())
    sub.add_argument("--importance", default="l2", help=f"criterion: {names}")


def importance_of(args: argparse.Namespace) -> object:
    """The criterion ``--importance`` names."""
    try:
        return tp.importance.make_importance(args.importance)
    except ValueError as error:
        raise ValueError(f"--importance: {error}") from None


def model_of(args: argparse.Namespace) -> nn.Module:
    """The model MODEL names."""
    if not args.model:
        raise ValueError("give a MODEL (or `model:` in --config)")
    return load_model(args.model, args.trust_pickle)


def example_of(args: argparse.Namespace, model: nn.Module) -> torch.Tensor:
    """The example input: seeded random floats or token ids of ``--input-shape``, inferred for
    the model where they are not given."""
    tokens = takes_token_ids(model) if args.input_dtype is None else args.input_dtype == "long"
    shape = parse_shape(args.input_shape) if args.input_shape else default_shape(model, tokens)
    return random_inputs(model, shape, tokens)


def random_inputs(model: nn.Module, shape: tuple[int, ...], tokens: bool) -> torch.Tensor:
    """Seeded random floats, or token ids below the model's vocabulary, of ``shape``."""
    generator = torch.Generator().manual_seed(0)
    if tokens:
        return torch.randint(0, vocabulary(model), shape, generator=generator)
    return torch.randn(shape, generator=generator)


def add_ignore_argument(sub: argparse.ArgumentParser) -> None:
    """``--ignore NAME[,NAME...]`` (repeatable): modules to leave unpruned."""
    sub.add_argument(
        "--ignore",
        action="append",
        default=[],
        help="module names to keep whole, comma-separated or repeated",
    )


def ignored_modules(model: nn.Module, names: list[str]) -> list[nn.Module]:
    """The modules ``--ignore`` names, or a clear error naming those that do not exist."""
    modules = dict(model.named_modules())
    names = [name.strip() for entry in names for name in entry.split(",") if name.strip()]
    missing = [name for name in names if name not in modules]
    if missing:
        raise ValueError(f"--ignore names no module of this model: {', '.join(missing)}")
    return [modules[name] for name in names]


def check_writable(folder: Path) -> None:
    """Fail before any work if ``folder`` cannot be created or written to."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".torchslim-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(f"--out {folder} is not writable ({error.strerror or error})") from None


def table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [header, tuple("-" * w for w in widths), *rows]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines
    )


def aligned(markdown: str) -> str:
    """``markdown`` for the terminal: its tables as aligned columns, like the other commands'."""
    out: list[str] = []
    rows: list[tuple[str, ...]] = []
    for line in [*markdown.splitlines(), ""]:
        if line.startswith("|"):
            cells = tuple(cell.strip() for cell in line.strip().strip("|").split("|"))
            if not all(set(cell) <= set("-: ") for cell in cells):
                rows.append(cells)
            continue
        if rows:
            out.append(table(rows[1:], rows[0]))
            rows = []
        out.append(line)
    return "\n".join(out[:-1])


def output_name(spec: str) -> str:
    """``resnet18`` -> resnet18, ``pkg.mod:Net`` -> Net, ``path/to/model.pt`` -> model,
    a Hugging Face folder -> its name."""
    folder = hf_folder_of(spec)
    if folder is not None:
        return folder.resolve().name
    spec = spec.partition("@")[0]
    if ":" in spec:
        return spec.partition(":")[2]
    return Path(spec).stem if spec.endswith((".pt", ".pth")) else spec.replace("/", "_")


def write_recipe(args: argparse.Namespace, path: Path) -> None:
    """The effective options of this run, for ``--config`` to repeat it."""
    import yaml

    skip = {"command", "config", "out", "trust_pickle", "func"}
    recipe = {
        k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k not in skip
    }
    tp.persistence.atomic_write(
        path, lambda tmp: tmp.write_text(yaml.safe_dump(recipe, sort_keys=True))
    )
