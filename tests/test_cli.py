"""The torchslim command: inspect and prune, their outputs, files and errors."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import torchvision

import torchslim as tp
from torchslim.cli.common import ignored_modules
from torchslim.cli.main import main

SMALL = ["--input-shape", "1,3,64,64"]


def test_help_reads_well():
    done = subprocess.run(
        [sys.executable, "-m", "torchslim", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0
    assert "inspect" in done.stdout and "prune" in done.stdout


def test_inspect_lists_groups_and_refusals(capsys):
    assert main(["inspect", "resnet18", *SMALL, "--layers"]) == 0
    out = capsys.readouterr().out
    assert "14 groups, 12 prunable; 11.69 M params" in out
    assert "fc.weight[dim 0]" in out and "refused: a model output" in out
    assert "layer1.0.conv1" in out  # the per-layer table


def test_inspect_draws_the_groups(tmp_path, capsys):
    picture = tmp_path / "groups.png"
    assert main(["inspect", "resnet18", *SMALL, "--draw", str(picture)]) == 0
    assert f"wrote {picture}" in capsys.readouterr().out
    assert picture.read_bytes()[:4] == b"\x89PNG"


def test_prune_writes_a_plan_that_loads_into_a_fresh_model(tmp_path, capsys):
    code = main(
        [
            "prune",
            "resnet18",
            *SMALL,
            "--ratio",
            "0.5",
            "--round-to",
            "8",
            "--ignore",
            "fc",
            "--verify",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "exactness check: ok" in out and "3.83x" in out
    plan = json.loads((tmp_path / "resnet18.plan.json").read_text())
    assert plan["shapes"]["conv1.weight"][0] == 32
    fresh = tp.load_pruned(torchvision.models.resnet18(), tmp_path / "resnet18.safetensors")
    assert fresh.conv1.out_channels == 32 and fresh.layer4[0].conv1.out_channels == 256


def test_prune_to_a_macs_target(capsys):
    assert main(["prune", "resnet18", *SMALL, "--target-macs", "0.5"]) == 0
    lines = capsys.readouterr().out.splitlines()
    line = next(text for text in lines if text.startswith("MACs"))
    assert float(line.split()[-1].rstrip("x")) >= 2.0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune", "nosuchnet", "--ratio", "0.5"], "unknown model 'nosuchnet'"),
        (["prune", "resnet18", "--ratio", "1.5"], r"--ratio must be in \[0, 1\), got 1.5"),
        (["prune", "resnet18", "--target-macs", "2"], r"--target-macs must be in \(0, 1\]"),
        (["inspect", "os:getcwd"], "os:getcwd returned a str, not a torch.nn.Module"),
        (
            ["inspect", "torchvision.models:get_model"],
            r"torchvision.models:get_model needs arguments \(name\): MODEL must be a factory",
        ),
        (["inspect", "missing/model.pt"], "no such file: missing/model.pt"),
        (
            ["prune", "resnet18", "--ratio", "0.5", "--out", "/proc/forbidden"],
            "--out /proc/forbidden is not writable",
        ),
        (["prune", "resnet18", "--ratio", "0.5", "--ignore", "head"], "--ignore names no module"),
        (["inspect", "resnet18", "--input-shape", "1,3,a"], "--input-shape must be integers"),
        (["inspect", "torchvision.models:nothing"], "has no attribute 'nothing'"),
        (
            ["prune", "resnet18", "--ratio", "0.5", "--importance", "wanda"],
            "need calibration data: give --calibration",
        ),
        (
            [
                "prune",
                "resnet18",
                *SMALL,
                "--ratio",
                "0.5",
                "--reconstruct",
                "--calibration",
                "digits",
            ],
            "calibration batch 0 failed in the model's forward",
        ),
    ],
)
def test_errors_are_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("torchslim: error:") and len(err.strip().splitlines()) == 1
    assert re.search(message, err)


@pytest.mark.parametrize("criterion", ["wanda", "fluctuation"])
def test_prune_calibrates_and_reconstructs_on_real_images(criterion, capsys):
    factory = "torchslim.cli.demo:DigitsNet"
    argv = ["prune", factory, "--input-shape", "1,1,8,8", "--ratio", "0.5", "--verify"]
    calibrated = ["--importance", criterion, "--calibration", "digits", "--calibration-size", "256"]
    assert main([*argv, *calibrated, "--reconstruct"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"reconstruction \(deliberate weight change\): [1-9]\d* layers refit", out)
    assert "exactness check: ok" in out


@pytest.mark.parametrize("criterion", ["fisher", "obdc"])
def test_prune_records_gradient_criteria_on_labelled_images(criterion, capsys):
    factory = "torchslim.cli.demo:DigitsNet"
    argv = ["prune", factory, "--input-shape", "1,1,8,8", "--ratio", "0.5", "--verify"]
    calibrated = ["--importance", criterion, "--calibration", "digits", "--calibration-size", "256"]
    assert main([*argv, *calibrated]) == 0
    out = capsys.readouterr().out
    assert "exactness check: ok" in out
    assert float(re.search(r"^params\s.*\s(\d+\.\d+)x$", out, re.M).group(1)) > 3


def test_a_timm_name_without_timm_says_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm now raises ImportError
    assert main(["inspect", "vit_tiny_patch16_224"]) == 2
    assert "timm is not installed to look it up there (pip install timm)" in capsys.readouterr().err


def test_version_and_help_with_defaults_from_the_console_script():
    run = [sys.executable, "-m", "torchslim"]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.strip() == f"torchslim {tp.__version__}"
    usage = subprocess.run([*run, "prune", "--help"], capture_output=True, text=True).stdout
    words = " ".join(usage.split())
    assert "(default: l2)" in words and "else 1,3,224,224)" in words
    assert "(default: None)" not in usage and "(default: False)" not in usage


def test_prune_takes_comma_separated_ignores_and_says_when_nothing_is_written(capsys):
    argv = ["prune", "resnet18", *SMALL, "--ratio", "0.5", "--ignore", "fc,layer4"]
    assert main(argv) == 0
    assert "nothing written: give --out DIR" in capsys.readouterr().out
    model = torchvision.models.resnet18()
    assert ignored_modules(model, ["fc,layer4", "conv1"]) == [model.fc, model.layer4, model.conv1]


def test_written_files_follow_the_umask_and_the_recipe_is_named(tmp_path, capsys):
    previous = os.umask(0o022)
    try:
        assert main(["prune", "resnet18", *SMALL, "--ratio", "0.3", "--out", str(tmp_path)]) == 0
    finally:
        os.umask(previous)
    out = capsys.readouterr().out
    assert f"{tmp_path / 'resnet18.recipe.yaml'}" in out and "resnet18.plan.json" in out
    for name in ("resnet18.safetensors", "resnet18.plan.json", "resnet18.recipe.yaml"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_pickled_models_need_explicit_trust(tmp_path, capsys):
    path = tmp_path / "whole.pt"
    torch.save(torchvision.models.resnet18(), path)
    assert main(["inspect", str(path), *SMALL]) == 2
    assert "--trust-pickle" in capsys.readouterr().err
    assert main(["inspect", str(path), *SMALL, "--trust-pickle"]) == 0


def test_demo_runs_the_whole_workflow_and_writes_a_report(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path), "--epochs", "6", "--target-macs", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "ONNX vs torch max abs diff" in out
    report = (tmp_path / "report.md").read_text()
    for name in ("channels.png", "steps.png", "loss.png"):
        assert (tmp_path / name).stat().st_size > 1000 and name in report
    macs = next(line for line in out.splitlines() if line.startswith("MACs"))
    assert float(macs.split("(")[1].split("x")[0]) >= 2.0
    diff = next(line for line in out.splitlines() if line.startswith("ONNX vs torch"))
    assert float(diff.split()[-1]) < 1e-4
    accuracy = next(line for line in out.splitlines() if line.startswith("test accuracy"))
    dense, pruned = (float(v) for v in accuracy.split()[-2:])
    assert dense > 0.8 and pruned > 0.8
    assert (tmp_path / "pruned.onnx").exists() and (tmp_path / "pruned.safetensors").exists()
    latency = next(line for line in out.splitlines() if line.startswith("CPU latency"))
    slower = "not faster: see note" in latency
    assert slower == ("Note: the pruned model is not faster in PyTorch" in report)


def test_bench_times_dense_and_pruned_and_advises_rounding(tmp_path, capsys):
    assert main(["prune", "resnet18", *SMALL, "--ratio", "0.3", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    pruned = str(tmp_path / "resnet18.safetensors")
    assert main(["bench", "resnet18", pruned, *SMALL, "--repeats", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "median of 3, 1 thread(s)" in out
    for runtime in ("PyTorch CPU", "ONNX Runtime"):
        dense, pruned_ms, speedup = re.search(
            rf"{runtime}\s+([\d.]+) ms\s+([\d.]+) ms\s+([\d.]+)x", out
        ).groups()
        assert float(speedup) == pytest.approx(float(dense) / float(pruned_ms), abs=0.01)
    assert "advice: 4 conv widths are not multiples of 8 (e.g. [45, 90, 180, 359])" in out


def test_demo_dataset_errors_say_how_to_get_the_data(tmp_path, capsys):
    assert main(["demo", "--dataset", "mnist", "--out", str(tmp_path)]) == 2
    assert "--dataset mnist needs --data-dir" in capsys.readouterr().err
    assert main(["demo", "--dataset", "fashion-mnist", "--data-dir", str(tmp_path)]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err


def test_idx_files_load_raw_or_gzipped(tmp_path):
    import gzip

    import numpy as np

    from torchslim.cli.datasets import load_dataset

    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    for prefix in ("train", "t10k"):
        (tmp_path / f"{prefix}-images-idx3-ubyte").write_bytes(b"\0" * 16 + images.tobytes())
        with gzip.open(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", "wb") as stream:
            stream.write(b"\0" * 8 + bytes([3, 7]))
    (train_x, train_y), (test_x, _) = load_dataset("mnist", tmp_path)
    assert train_x.shape == (2, 1, 28, 28) and train_y.tolist() == [3, 7]
    assert torch.allclose(test_x[0, 0, 0, 1], torch.tensor((1 / 255 - 0.1307) / 0.3081))


def test_a_recipe_file_repeats_a_run_and_flags_override_it(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        "model: resnet18\ninput-shape: 1,3,64,64\nratio: 0.5\nround_to: 8\nignore: [fc]\n"
    )
    assert main(["prune", "--config", str(recipe), "--out", str(tmp_path / "a")]) == 0
    written = (tmp_path / "a" / "resnet18.recipe.yaml").read_text()
    assert "ratio: 0.5" in written and "round_to: 8" in written
    capsys.readouterr()
    again = ["prune", "--config", str(tmp_path / "a" / "resnet18.recipe.yaml"), "--ratio", "0.25"]
    assert main([*again, "--out", str(tmp_path / "b")]) == 0
    first = json.loads((tmp_path / "a" / "resnet18.plan.json").read_text())
    second = json.loads((tmp_path / "b" / "resnet18.plan.json").read_text())
    assert first["shapes"]["conv1.weight"][0] == 32 and second["shapes"]["conv1.weight"][0] == 48
    recipe.write_text("model: resnet18\nratios: 0.5\n")
    assert main(["prune", "--config", str(recipe)]) == 2
    assert "unknown options ratios" in capsys.readouterr().err


def test_finetune_runs_under_torchrun_with_two_processes(tmp_path):
    from torchslim.cli.demo import DigitsNet

    factory = "torchslim.cli.demo:DigitsNet"
    assert (
        main(
            ["prune", factory, "--input-shape", "1,1,8,8", "--ratio", "0.5", "--out", str(tmp_path)]
        )
        == 0
    )
    tuned = tmp_path / "tuned.safetensors"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "torchslim",
        "finetune",
        factory,
        str(tmp_path / "DigitsNet.safetensors"),
        "--epochs",
        "2",
        "--bn-l1",
        "1e-4",
        "--out",
        str(tuned),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    assert "world size 2; test accuracy" in done.stdout
    before, after = (float(v) for v in re.findall(r"(\d\.\d+)", done.stdout.splitlines()[-2])[-2:])
    assert after > before
    model = tp.load_pruned(DigitsNet(), tuned)
    assert [m.out_channels for m in model.features if isinstance(m, torch.nn.Conv2d)] == [
        16,
        32,
        64,
    ]


def test_a_pruned_checkpoint_can_be_pruned_further(tmp_path, capsys):
    assert main(["prune", "resnet18", *SMALL, "--ratio", "0.5", "--out", str(tmp_path / "a")]) == 0
    again = f"resnet18@{tmp_path / 'a' / 'resnet18.safetensors'}"
    assert main(["prune", again, *SMALL, "--ratio", "0.5", "--out", str(tmp_path / "b")]) == 0
    plan = json.loads((tmp_path / "b" / "resnet18.plan.json").read_text())
    assert plan["shapes"]["conv1.weight"][0] == 16  # 64 -> 32 -> 16
    fresh = tp.load_pruned(torchvision.models.resnet18(), tmp_path / "b" / "resnet18.safetensors")
    assert fresh.layer4[0].conv1.out_channels == 128


def test_prune_reports_mixing_groups_and_exact_only_leaves_them_alone(capsys):
    argv = ["prune", "test_never_broken:Normed", "--input-shape", "3,6", "--ratio", "0.5"]
    assert main([*argv, "--verify"]) == 0
    out = capsys.readouterr().out
    assert "1 pruned groups pass through channel-mixing ops" in out
    assert re.search(
        r"exactness check: ok: 1 pruned groups exact \(relative error .*\); 1 through "
        r"channel-mixing ops, not exact by design \(not checked\); 0 refused",
        out,
    )
    assert main([*argv, "--verify", "--exact-only"]) == 0
    out = capsys.readouterr().out
    assert "pass through channel-mixing" not in out
    assert "exactness check: ok: 1 pruned groups exact" in out and "; 0 through" in out
    assert re.search(r"width\s+50%\s+0/1\s+16 -> 16\s+1 left alone by exact_only", out)


def test_a_flag_replaces_the_recipe_options_it_conflicts_with(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model: resnet18\ninput-shape: 1,3,64,64\ntarget-macs: 0.5\n")
    assert main(["prune", "--config", str(recipe), "--ratio", "0.5", "--out", str(tmp_path)]) == 0
    written = (tmp_path / "resnet18.recipe.yaml").read_text()
    assert "ratio: 0.5" in written and "target_macs: null" in written
    recipe.write_text("model: resnet18\ninput-shape: 1,3,64,64\nratio: 0.5\n")
    assert main(["prune", "--config", str(recipe), "--target-macs=0.6"]) == 0


class Attention(torch.nn.Module):
    """A residual width feeding ``nn.MultiheadAttention``: heads x offsets."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(8, 64)
        self.attn = torch.nn.MultiheadAttention(64, 4, batch_first=True)
        self.mlp = torch.nn.Linear(64, 32)
        self.head = torch.nn.Linear(32, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(torch.relu(self.mlp(h)))


def test_inspect_names_the_kind_of_every_group(capsys):
    assert main(["inspect", "test_cli:Attention", "--input-shape", "2,5,8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    kinds = {tuple(re.split(r"\s{2,}", line)[:2]) for line in lines if "[dim" in line}
    assert {("embed.weight[dim 0]", "heads"), ("embed.weight[dim 0]", "head_dim")} <= kinds
    assert ("mlp.weight[dim 0]", "neurons") in kinds
