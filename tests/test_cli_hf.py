"""Hugging Face models through the command line: a local folder in, token ids as the example,
text calibration through the folder's tokenizer, a ``save_pretrained`` folder out that
transformers loads, and ``bench`` on the two folders. Tiny random Llama, nothing downloaded."""

from __future__ import annotations

import importlib
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_LM, WORDS, tiny_llama_folder
from torch import nn

from torchslim.cli.main import main
from torchslim.cli.models import load_model

transformers = pytest.importorskip("transformers")


def torchslim(*argv: str) -> str:
    """Run the console script; its standard output (failing the test on an error)."""
    script = Path(sys.executable).with_name("torchslim")
    done = subprocess.run([str(script), *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return tiny_llama_folder(tmp_path_factory.mktemp("hf") / "tiny-llama")


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    """A UTF-8 text the tiny folder's tokenizer reads (its words, 720 tokens)."""
    path = tmp_path_factory.mktemp("text") / "notes.txt"
    path.write_text(WORDS)
    return path


def test_inspect_a_folder_traces_token_ids_and_names_each_kind(folder):
    out = torchslim("inspect", str(folder))
    kinds = set(re.findall(r"\]\s+(\w+)\s+\d+", out))
    assert {"width", "heads", "query_heads", "head_dim", "neurons"} <= kinds
    assert "9 groups, 8 prunable" in out


def test_prune_writes_a_folder_plain_transformers_loads(folder, tmp_path):
    out = torchslim(
        "prune", str(folder), "--kinds", "neurons=0.25", "--verify", "--out", str(tmp_path)
    )
    assert re.search(r"exactness check: ok: 2 pruned groups exact", out)
    assert re.search(r"neurons\s+25%\s+2/3\s+225 -> 193\s+1 refused \(a model output\)", out)
    assert "plain from_pretrained loads it" in out
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama")
    assert [layer.mlp.down_proj.in_features for layer in pruned.model.layers] == [48, 48]
    assert pruned.config.intermediate_size == 48
    assert (tmp_path / "tiny-llama" / "tokenizer.json").is_file()
    umask = os.umask(0)
    os.umask(umask)
    for file in (tmp_path / "tiny-llama").iterdir():
        assert file.stat().st_mode & 0o777 == 0o666 & ~umask, file.name

    # the saved model is the dense one with the removed neurons zeroed
    dense = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for kept, whole in zip(pruned.model.layers, dense.model.layers):
            rows = whole.mlp.gate_proj.weight
            idxs = [int((rows == row).all(1).nonzero()) for row in kept.mlp.gate_proj.weight]
            removed = sorted(set(range(64)) - set(idxs))
            whole.mlp.down_proj.weight[:, removed] = 0
        ids = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(pruned(ids).logits, dense(ids).logits, rtol=1e-5, atol=1e-5)


def test_calibrated_global_prune_of_a_folder_and_bench_of_the_two(folder, tmp_path, text):
    argv = ["--kinds", "neurons=0.3", "--global", "--importance", "fisher"]
    out = torchslim("prune", str(folder), *argv, "--calibration", str(text), "--out", str(tmp_path))
    saved = tmp_path / "tiny-llama"
    config = json.loads((saved / "config.json").read_text())
    per_layer = "torchslim_plan" in config
    assert ("tp.hf.from_pretrained (per-layer widths)" in out) == per_layer
    out = torchslim("bench", str(folder), str(saved), "--repeats", "2", "--threads", "1")
    for runtime in ("PyTorch CPU", "ONNX Runtime"):
        assert re.search(rf"{runtime}\s+[\d.]+ ms\s+[\d.]+ ms\s+[\d.]+x", out)

    import torchslim as tp

    pruned = tp.hf.from_pretrained(saved)
    widths = [layer.mlp.down_proj.in_features for layer in pruned.model.layers]
    assert sum(widths) == 128 - int(128 * 0.3)


def test_a_model_class_can_be_named_for_the_folder(folder, capsys):
    assert main(["inspect", f"LlamaModel:{folder}"]) == 0
    out = capsys.readouterr().out
    assert "lm_head" not in out and "model.embed_tokens" not in out
    assert main(["inspect", f"NoSuchModel:{folder}"]) == 2
    assert "transformers has no model class 'NoSuchModel'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--kinds", "tails=0.2"], "--kinds: unknown kind 'tails'"),
        (["--kinds", "neurons"], "--kinds: 'neurons' is not KIND=RATIO"),
        (["--kinds", "neurons=1.5"], r"the ratio of neurons must be in \[0, 1\)"),
        (["--kinds", "neurons=0.2", "--target-macs", "0.5"], "not with --target-macs"),
        (["--importance", "wanda", "--kinds", "neurons=0.2"], "give --calibration a text file"),
        (
            ["--importance", "wanda", "--kinds", "neurons=0.2", "--calibration", "missing.txt"],
            "--calibration missing.txt: no such text file",
        ),
    ],
)
def test_prune_errors_for_language_models(folder, argv, message, capsys):
    assert main(["prune", str(folder), *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


class Tagger(nn.Module):
    """Token ids in, a class per token out: a custom net that needs integer inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.hidden = nn.Linear(16, 32)
        self.out = nn.Linear(32, 5)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.hidden(self.embed(ids))))


def test_a_custom_net_starting_with_an_embedding_gets_token_ids(capsys):
    argv = ["prune", "test_cli_hf:Tagger", "--input-shape", "2,7", "--ratio", "0.5", "--verify"]
    assert main(argv) == 0
    assert "exactness check: ok: 1 pruned groups exact" in capsys.readouterr().out
    assert main([*argv, "--input-dtype", "long"]) == 0
    assert main([*argv, "--input-dtype", "float"]) == 2
    assert "torchslim: error:" in capsys.readouterr().err


def test_a_request_that_removes_nothing_is_said(folder, capsys):
    assert main(["prune", str(folder), "--kinds", "heads=0.25,neurons=0.25"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"heads\s+25%\s+0/2\s+4 -> 4\s+2 where 25% of 2 rounds to 0", out)
    assert "warning: asked for 25% of the heads, none were removed" in out


def test_warnings_are_one_line_on_standard_error(folder):
    script = Path(sys.executable).with_name("torchslim")
    done = subprocess.run(
        [str(script), "prune", str(folder), "--kinds", "neurons=0.25"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    warned = [line for line in done.stderr.splitlines() if "MagnitudeImportance" in line]
    assert len(warned) == 1 and warned[0].startswith("torchslim: warning: MagnitudeImportance")
    assert "UserWarning" not in done.stderr and "pruner = " not in done.stderr


def test_prune_removes_whole_decoder_layers_calibrated_on_a_text(folder, tmp_path, text):
    out = torchslim(
        "prune",
        str(folder),
        "--blocks",
        "1",
        "--calibration",
        str(text),
        "--calibration-size",
        "64",
        "--out",
        str(tmp_path),
    )
    removed = re.search(r"removed 1 blocks \(least block influence\): model\.layers\.(\d)", out)
    assert removed and "plain from_pretrained loads it" in out
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama")
    dense = transformers.AutoModelForCausalLM.from_pretrained(folder)
    assert pruned.config.num_hidden_layers == len(pruned.model.layers) == 1
    kept = 1 - int(removed.group(1))
    assert torch.equal(
        pruned.model.layers[0].mlp.up_proj.weight, dense.model.layers[kept].mlp.up_proj.weight
    )
    assert main(["prune", str(folder), "--blocks", "3"]) == 2


@pytest.fixture(scope="module")
def pruned_folder(folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pruned")
    assert main(["prune", str(folder), "--kinds", "neurons=0.25", "--out", str(out)]) == 0
    return out / "tiny-llama"


def test_finetune_heals_a_pruned_folder_on_a_text(pruned_folder, tmp_path, capsys, text):
    argv = ["finetune", str(pruned_folder), "--text", str(text), "--steps", "20", "--lr", "1e-2"]
    argv += ["--block-size", "16", "--eval-text", str(text), "--loss-plot", str(tmp_path / "l.png")]
    argv += ["--checkpoint", str(tmp_path / "ck.safetensors"), "--out", str(tmp_path / "tuned")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "45 blocks of 16 tokens" in out and "next-token loss" in out
    assert "(save_pretrained; plain from_pretrained loads it)" in out
    first, last = (float(v) for v in re.search(r"loss (\S+) -> (\S+)", out).groups())
    before, after = (float(v) for v in re.search(r"perplexity on .*: (\S+) -> (\S+)", out).groups())
    assert last < first / 2 and after < before / 4
    assert (tmp_path / "l.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned" / "tiny-llama")
    start = transformers.AutoModelForCausalLM.from_pretrained(pruned_folder)
    assert [layer.mlp.down_proj.in_features for layer in tuned.model.layers] == [48, 48]
    assert not torch.equal(
        tuned.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight
    )
    assert (tmp_path / "tuned" / "tiny-llama" / "tokenizer.json").is_file()
    assert main(["finetune", str(pruned_folder), "--text", str(text), "--steps", "1"]) == 0
    assert "nothing written: give --out DIR" in capsys.readouterr().out
    resumed = load_model(f"{pruned_folder}@{tmp_path / 'ck.safetensors'}")
    assert torch.equal(
        resumed.model.layers[1].mlp.down_proj.weight, tuned.model.layers[1].mlp.down_proj.weight
    )


def test_finetune_whose_minutes_end_before_a_step_says_so(pruned_folder, text, monkeypatch, capsys):
    healing = importlib.import_module("torchslim.hf.heal")  # the module, not tp.hf.heal
    clock = itertools.count()  # a second passes between any two readings
    monkeypatch.setattr(healing.time, "monotonic", lambda: float(next(clock)))
    assert main(["finetune", str(pruned_folder), "--text", str(text), "--minutes", "0.01"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^0 steps in \d+ s \(stopped by minutes\), 0 tokens$", out, re.M)


def test_finetune_distils_from_the_dense_folder_under_torchrun(
    folder, pruned_folder, tmp_path, text
):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command += ["-m", "torchslim", "finetune", str(pruned_folder), "--text", str(text)]
    command += ["--teacher", str(folder), "--steps", "4", "--block-size", "16", "--lr", "1e-3"]
    command += ["--out", str(tmp_path)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    assert (
        f"world size 2; 45 blocks of 16 tokens from {text}, distilling from {folder}" in done.stdout
    )
    assert "4 steps in" in done.stdout and "nothing written" not in done.stdout
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama")
    start = transformers.AutoModelForCausalLM.from_pretrained(pruned_folder)
    assert not torch.equal(
        tuned.model.layers[0].mlp.up_proj.weight, start.model.layers[0].mlp.up_proj.weight
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "give --text FILE"),
        (["--text", "notes.txt"], "give --steps N or --minutes M"),
        (["x.safetensors", "--text", "notes.txt", "--steps", "1"], "drop x.safetensors"),
        (["--text", "missing.txt", "--steps", "1"], "--text missing.txt: no such text file"),
        (
            ["--text", "t.txt", "--epochs", "2", "--bn-l1", "1e-4"],
            "--epochs, --bn-l1: for an image classifier",
        ),
    ],
)
def test_finetune_errors_for_language_models(pruned_folder, argv, message, capsys):
    assert main(["finetune", str(pruned_folder), *argv]) == 2
    assert message in capsys.readouterr().err


def test_finetune_refuses_a_teacher_of_another_vocabulary(pruned_folder, tmp_path, capsys, text):
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_LM, "vocab_size": 50}))
    other.save_pretrained(tmp_path / "other")
    argv = ["finetune", str(pruned_folder), "--text", str(text), "--steps", "1"]
    assert main([*argv, "--teacher", str(tmp_path / "other")]) == 2
    assert "predicts 50 tokens, MODEL 97: distillation needs the dense model" in (
        capsys.readouterr().err
    )


def test_finetune_of_an_image_model_refuses_text_options(capsys):
    argv = ["finetune", "torchslim.cli.demo:DigitsNet", "--text", "notes.txt", "--steps", "3"]
    assert main(argv) == 2
    assert "--text, --steps: for a Hugging Face language model" in capsys.readouterr().err
    assert main(["finetune", "torchslim.cli.demo:DigitsNet"]) == 2
    assert "give PRUNED" in capsys.readouterr().err
