"""The README's command-line block runs as written, top to bottom, in an empty folder: each line
through the real console scripts, each later line reading what the earlier ones wrote. Only
the two things a reader brings are provided: ``mypkg.evals:val_accuracy`` and a local Hugging
Face folder ``my-llama/`` with a text ``notes.txt``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import WORDS, tiny_llama_folder

README = Path(__file__).resolve().parent.parent / "README.md"
EVALS = '''
import torch


def val_accuracy(model):
    """Agreement of the model's top class with a fixed guess, on fixed random images."""
    images = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((model(images).argmax(1) == 0).float().mean())
'''


def cli_block() -> list[str]:
    section = README.read_text().split("## Command line", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.replace("\\\n", " ").splitlines() if line.strip()]


def test_the_readme_cli_block_runs_top_to_bottom(tmp_path):
    pytest.importorskip("transformers")
    (tmp_path / "mypkg").mkdir()
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "evals.py").write_text(EVALS)
    tiny_llama_folder(tmp_path / "my-llama")
    (tmp_path / "notes.txt").write_text(WORDS)
    bin_dir = str(Path(sys.executable).parent) + "/"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    lines = cli_block()
    assert len(lines) == 16
    for line in lines:
        command = line.replace(".venv/bin/", bin_dir)
        done = subprocess.run(
            command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True
        )
        assert done.returncode == 0, f"{line}\n{done.stderr[-3000:]}"
    for written in (
        "groups.png",
        "pruned/resnet18.safetensors",
        "pruned/resnet18.recipe.yaml",
        "pruned/DigitsNet.safetensors",
        "sens/resnet18.sensitivity.json",
        "searched/resnet18.search.json",
        "tuned.safetensors",
        "pruned/my-llama/config.json",
        "pruned/my-llama/tokenizer.json",
        "healed/my-llama/model.safetensors",
        "healing.png",
        "shallow/my-llama/config.json",
        "streamed/model.safetensors",
        "streamed/tokenizer.json",
        "streamed-wanda/model.safetensors",
    ):
        assert (tmp_path / written).is_file(), written
