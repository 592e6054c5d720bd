"""Every command in the README's bash blocks is checked: the command-line block runs whole
(test_readme_cli), the rest cannot run in a test (hour-long benchmarks, network installs), so
each is checked as far as it can be without running it: a make target exists, a benchmark's
own argument parser accepts the flags as written, an install names extras the package has, a
commit named exists. A new kind of command fails here until a check is written for it."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="Python >= 3.11 reads pyproject.toml")
ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def commands() -> list[str]:
    """Each bash block's commands outside the command-line section, continuations joined and
    comments dropped."""
    text = README.read_text()
    before, after = text.split("## Command line", 1)
    after = after.split("\n## ", 1)[1]  # the CLI section runs whole in test_readme_cli
    found = []
    for block in re.findall(r"```bash\n(.*?)```", before + after, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()
            if line and not line.startswith("#"):
                found.extend(part.strip() for part in line.split("&&"))
    return found


class ArgumentsOnly(Exception):
    """Raised once a benchmark's parser accepted its arguments, so nothing runs."""


def parses(script: str, args: list[str], monkeypatch) -> argparse.Namespace:
    parsed = {}
    original = argparse.ArgumentParser.parse_args

    def parse_then_stop(parser, argv=None, namespace=None):
        parsed["args"] = original(parser, argv, namespace)
        raise ArgumentsOnly

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    monkeypatch.setattr(sys, "argv", [script, *args])
    module = importlib.import_module(script.removesuffix(".py").replace("/", "."))
    with pytest.raises(ArgumentsOnly):
        module.main()
    return parsed["args"]


def check(command: str, monkeypatch) -> None:
    words = shlex.split(command)
    while words and "=" in words[0] and not words[0].startswith("-"):
        words = words[1:]  # VAR=value prefixes
    if words[0] == "make":
        done = subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, capture_output=True)
        assert done.returncode == 0, f"{command}: {done.stderr.decode()[-500:]}"
    elif words[:2] == [".venv/bin/python", "-m"] and words[2:4] == ["pip", "install"]:
        check_install(words[4:])
    elif words[0] == "pip" and words[1] == "install":
        check_install(words[2:])
    elif words[0] == ".venv/bin/python" and words[1].startswith("benchmarks/"):
        assert (ROOT / words[1]).is_file(), command
        parses(words[1], words[2:], monkeypatch)
    elif words[:2] == ["git", "worktree"]:
        commit = words[-1]
        shallow = subprocess.run(
            ["git", "rev-parse", "--is-shallow-repository"], cwd=ROOT, capture_output=True
        )
        if shallow.stdout.strip() == b"true":
            return  # a shallow clone lacks old commits
        done = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=ROOT)
        assert done.returncode == 0, f"{command}: no commit {commit} in this clone"
    elif words[:2] == ["apt-get", "install"]:
        assert words[2:] == ["dataset-fashion-mnist"], command  # the one system package used
    else:
        pytest.fail(f"no check for README command {command!r}: add one to {__file__}")


def check_install(words: list[str]) -> None:
    pinned = (ROOT / "constraints.txt").read_text()
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = extras["optional-dependencies"]
    for word in words:
        if word == "-c":
            continue
        if word.startswith(".["):
            assert set(word[2:-1].split(",")) <= set(extras), word
        elif word not in (".", "constraints.txt"):
            assert importlib.util.find_spec(word.replace("-", "_")), word
            if word == "torch-pruning":
                assert re.search(r"^torch-pruning==", pinned, re.M), "pin torch-pruning"


def test_every_readme_command_outside_the_cli_block_is_checked(monkeypatch):
    found = commands()
    assert any(c.startswith("make test") for c in found) and len(found) > 15
    for command in found:
        with monkeypatch.context() as patch:
            check(command, patch)
