"""The ``torchslim`` command: ``inspect`` a model's groups, ``prune`` it, ``search`` for per-layer
ratios, ``demo`` the library.

torchslim inspect resnet18 --input-shape 1,3,224,224
torchslim prune resnet18 --ratio 0.5 --round-to 8 --ignore fc --out pruned/
torchslim search resnet18 --target-macs 0.5 --eval agreement --out pruned/

Each command is a module of :mod:`torchslim.cli.commands` that registers itself.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
import warnings
from typing import Optional

from torchslim import __version__
from torchslim.cli import commands as command_modules
from torchslim.cli.common import CommandParser
from torchslim.cli.models import ModelNotFound


class ToolParser(argparse.ArgumentParser):
    """The top-level parser; ``commands`` holds each command's parser by name."""

    commands: dict[str, CommandParser]


def build_parser() -> ToolParser:
    parser = ToolParser(
        prog="torchslim",
        description="Structural pruning of PyTorch models on an exact dependency graph.",
    )
    parser.add_argument("--version", action="version", version=f"torchslim {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=CommandParser
    )
    for found in pkgutil.iter_modules(command_modules.__path__):
        importlib.import_module(f"{command_modules.__name__}.{found.name}").register(commands)
    parser.commands = commands.choices
    return parser


def parse(argv: Optional[list[str]]) -> argparse.Namespace:
    """Parse, with a ``--config`` recipe's values as defaults: flags given on the command
    line win, so a recipe can be rerun as is or tweaked."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is None:
        return args
    import yaml

    subparser = parser.commands[args.command]
    actions = subparser.options()
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


def _replaced_by_flags(subparser: CommandParser, argv: list[str]) -> set[str]:
    """Recipe keys that a flag on the command line replaces: the other options of its
    mutually exclusive group (``--ratio`` replaces a recipe's ``target_macs``)."""
    given = {token.split("=", 1)[0] for token in argv if token.startswith("--")}
    replaced = set()
    for group in subparser.exclusive_groups():
        chosen = [a for a in group if given & set(a.option_strings)]
        if chosen:
            replaced.update(a.dest for a in group if a not in chosen)
    return replaced


def _one_line(message: Warning | str, *_: object, **__: object) -> None:
    """Warnings as the CLI's other messages: one line on standard error, no source line."""
    print(f"torchslim: warning: {message}", file=sys.stderr)


def main(argv: Optional[list[str]] = None) -> int:
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _one_line
            args = parse(argv)
            return args.func(args)
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


if __name__ == "__main__":
    sys.exit(main())
