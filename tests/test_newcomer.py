"""A newcomer's path, from an empty folder: install torchslim into their own virtual
environment (one that already has torch and the rest, as the user's would), then inspect, prune
with the exactness check, bench and reload a torchvision model, and the same for a local
Hugging Face folder — all through the installed console script and the installed package."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import tiny_llama_folder

REPO = Path(__file__).resolve().parent.parent
SMALL = ["--input-shape", "1,3,64,64"]


def run(command: list[str], cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"{command}\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}"
    return done.stdout


def install(tmp_path: Path) -> Path:
    """A fresh venv seeing this environment's packages (torch, transformers, ...) but not its
    torchslim, with torchslim installed from a copy of the repository by pip."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path)
    site = next((venv / "lib").glob("python*/site-packages"))
    theirs = [p for p in sys.path if p.endswith("site-packages")]
    (site / "their_packages.pth").write_text("\n".join(theirs) + "\n")
    source = tmp_path / "source"
    files = run(["git", "ls-files"], REPO).splitlines()
    for name in files:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    pip = [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install"]
    run([*pip, "--quiet", "--no-deps", "--no-build-isolation", "--no-index", str(source)], tmp_path)
    return venv / "bin"


def test_install_then_inspect_prune_bench_and_reload_from_an_empty_folder(tmp_path):
    pytest.importorskip("transformers")
    bin_dir = install(tmp_path)
    home = tmp_path / "home"
    home.mkdir()
    torchslim, python = str(bin_dir / "torchslim"), str(bin_dir / "python")
    where = run([python, "-c", "import torchslim; print(torchslim.__file__)"], home)
    assert where.startswith(str(tmp_path / "venv"))

    assert "14 groups, 12 prunable" in run([torchslim, "inspect", "resnet18", *SMALL], home)
    out = run(
        [torchslim, "prune", "resnet18", *SMALL, "--ratio", "0.5", "--verify", "--out", "out"], home
    )
    assert "exactness check: ok: 12 pruned groups exact" in out
    out = run(
        [torchslim, "bench", "resnet18", "out/resnet18.safetensors", *SMALL, "--repeats", "3"], home
    )
    assert re.search(r"ONNX Runtime\s+[\d.]+ ms\s+[\d.]+ ms\s+[\d.]+x", out)
    reload = (
        "import torchslim as tp, torchvision; "
        "m = tp.load_pruned(torchvision.models.resnet18(), 'out/resnet18.safetensors'); "
        "print(m.conv1.out_channels, m.fc.in_features)"
    )
    assert run([python, "-c", reload], home).split() == ["32", "256"]

    tiny_llama_folder(home / "my-llama")
    assert "9 groups, 8 prunable" in run([torchslim, "inspect", "my-llama"], home)
    out = run(
        [torchslim, "prune", "my-llama", "--kinds", "neurons=0.25", "--verify", "--out", "out"],
        home,
    )
    assert "exactness check: ok: 2 pruned groups exact" in out
    out = run([torchslim, "bench", "my-llama", "out/my-llama", "--repeats", "2"], home)
    assert re.search(r"PyTorch CPU\s+[\d.]+ ms\s+[\d.]+ ms\s+[\d.]+x", out)
    reload = (
        "import transformers; "
        "m = transformers.AutoModelForCausalLM.from_pretrained('out/my-llama'); "
        "print(m.config.intermediate_size, m.model.layers[1].mlp.up_proj.out_features)"
    )
    assert run([python, "-c", reload], home).split() == ["48", "48"]
