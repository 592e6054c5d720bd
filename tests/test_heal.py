"""Healing a pruned causal LM: distillation from the dense model, stopping rules, checkpoints,
bad input, and DistributedDataParallel under torchrun."""

from __future__ import annotations

import copy
import importlib
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import torchslim as tp
from tests.helpers import tiny_llama
from torchslim.hf.heal import distillation_loss, heal
from torchslim.hf.text import perplexity, token_blocks

transformers = pytest.importorskip("transformers")


def _pruned_llama() -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    # peaked outputs (a larger init), so that pruning half the MLP changes them
    dense = tiny_llama(layers=2, initializer_range=0.2)
    blocks = torch.randint(0, 97, (16, 24), generator=torch.Generator().manual_seed(0))
    model = copy.deepcopy(dense)
    tp.pruner.MetaPruner(
        model,
        blocks[:1],
        importance=tp.importance.RandomImportance(),
        pruning_ratio=0.0,
        pruning_ratio_dict={"neurons": 0.5},
    ).step()
    return dense, model, blocks


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_the_distillation_loss_and_its_gradient_are_the_kl_divergence(dtype, temperature):
    draws = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(3, 37, 500, generator=draws)).to(dtype).requires_grad_()
    teacher = (3 * torch.randn(3, 37, 500, generator=draws)).to(dtype)
    reference = logits.detach().double().requires_grad_()
    student_log = torch.log_softmax(reference / temperature, -1)
    teacher_log = torch.log_softmax(teacher.double() / temperature, -1)
    expected = (teacher_log.exp() * (teacher_log - student_log)).sum(-1).mean() * temperature**2
    expected.backward()
    loss = distillation_loss(logits, teacher, temperature)  # 111 tokens: a partial last chunk
    scale = 65536.0  # GradScaler's first loss scale, past float16's largest value
    (loss * scale).backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == dtype
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    tolerance = 1e-6 if dtype == torch.float32 else 1e-4
    gradient = logits.grad.double() / scale
    assert torch.allclose(gradient, reference.grad, atol=tolerance, rtol=1e-2)
    with pytest.raises(ValueError, match=r"student logits \[3, 37, 500\] and teacher logits"):
        distillation_loss(logits, teacher[:, :-1])


def test_distillation_brings_the_pruned_model_towards_the_dense_one(tmp_path):
    dense, model, blocks = _pruned_llama()

    def gap() -> float:
        with torch.no_grad():
            return float(distillation_loss(model(blocks).logits, dense(blocks).logits))

    before = gap()
    log = heal(model, blocks, teacher=dense, steps=30, lr=1e-3, show_progress=False)
    assert len(log.losses) == 30 and log.tokens == 30 * 2 * 24 and log.stopped_by == "steps"
    assert gap() < 0.7 * before
    assert sum(log.losses[-5:]) < sum(log.losses[:5])
    log.plot(tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_mixed_precision_runs_both_models_in_bfloat16_and_keeps_float32_weights():
    dense, model, blocks = _pruned_llama()
    seen = []
    for net in (model, dense):
        net.lm_head.register_forward_hook(lambda m, args, out: seen.append(out.dtype))

    def gap() -> float:
        with torch.no_grad():
            return float(distillation_loss(model(blocks).logits, dense(blocks).logits))

    before, seen[:] = gap(), []
    log = heal(
        model,
        blocks,
        teacher=dense,
        steps=30,
        lr=1e-3,
        show_progress=False,
        autocast=torch.bfloat16,
    )
    assert seen == [torch.bfloat16] * 60 and len(log.losses) == 30
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert gap() < 0.7 * before


@pytest.mark.parametrize("native", [True, False])
def test_mixed_precision_warns_on_a_cpu_without_bfloat16_units(monkeypatch, native):
    healing = importlib.import_module("torchslim.hf.heal")  # the module, not tp.hf.heal
    monkeypatch.setattr(healing, "native_bfloat16", lambda: native)
    _, model, blocks = _pruned_llama()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        heal(model, blocks, steps=1, show_progress=False, autocast=torch.bfloat16)
    slower = [w for w in caught if "without bfloat16 matrix units" in str(w.message)]
    assert len(slower) == (0 if native else 1)


def test_healing_is_deterministic_for_a_seed_and_checkpoints_reload(tmp_path):
    results = []
    for run in range(2):
        dense, model, blocks = _pruned_llama()
        path = tmp_path / f"run{run}.safetensors"
        heal(model, blocks, steps=3, lr=1e-3, seed=1, checkpoint=path, show_progress=False)
        results.append(model)
    first, second = results
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), second.parameters()))
    loaded = tp.load_pruned(tiny_llama(layers=2), tmp_path / "run0.safetensors")
    with torch.no_grad():
        assert torch.equal(loaded(blocks).logits, first(blocks).logits)


def test_minutes_stop_the_run():
    _, model, blocks = _pruned_llama()
    log = heal(model, blocks, minutes=1e-9, show_progress=False)
    assert log.stopped_by == "minutes" and log.losses == []


def test_the_learning_rate_decays_over_the_minutes(monkeypatch):
    clock = iter(range(0, 10_000, 15))  # every reading of the clock is 15 s later
    module = importlib.import_module("torchslim.hf.heal")
    monkeypatch.setattr(module, "time", SimpleNamespace(monotonic=lambda: float(next(clock))))
    rates = []

    class Recording(torch.optim.AdamW):
        def step(self, closure=None):
            rates.append(self.param_groups[0]["lr"])
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", Recording)
    _, model, blocks = _pruned_llama()
    log = heal(model, blocks, minutes=1.0, lr=1e-3, show_progress=False)
    assert log.stopped_by == "minutes"
    assert rates == pytest.approx([1e-3 * (1 - s / 60) for s in (15, 30, 45)])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({}, "needs steps= or minutes="),
        ({"steps": 0}, "steps must be a positive int"),
        ({"steps": 1, "blocks": torch.rand(2, 8)}, "tensor of token ids"),
        ({"steps": 1, "autocast": torch.float16}, r"autocast must be torch.bfloat16 \(mixed"),
        ({"steps": 1, "autocast": "bf16"}, r"autocast must be torch.bfloat16 \(mixed"),
    ],
)
def test_bad_healing_input_gets_a_clear_error(kwargs, message):
    _, model, blocks = _pruned_llama()
    kwargs.setdefault("blocks", blocks)
    with pytest.raises(ValueError, match=message):
        heal(model, **kwargs)


def test_text_blocks_and_perplexity():
    class Chars:
        def __call__(self, text, return_tensors, add_special_tokens):
            return {"input_ids": torch.tensor([[ord(c) % 97 for c in text]])}

    blocks = token_blocks(Chars(), "abcdefghij" * 5, block_size=8, skip_blocks=1, max_blocks=3)
    assert blocks.shape == (3, 8) and blocks[0, 0] == ord("i") % 97
    with pytest.raises(ValueError, match="not enough for one block"):
        token_blocks(Chars(), "abc", block_size=8)
    dense, _, ids = _pruned_llama()
    with torch.no_grad():
        logits = dense(ids[:2]).logits[:, :-1]
        expected = torch.nn.functional.cross_entropy(
            logits.reshape(-1, 97), ids[:2, 1:].reshape(-1)
        ).exp()
    assert perplexity(dense, [ids[:1], ids[1:2]]) == pytest.approx(float(expected), rel=1e-5)


def test_healing_runs_data_parallel_under_torchrun(tmp_path):
    worker = Path(__file__).with_name("heal_worker.py")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(worker),
        str(tmp_path),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-6000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert torch.equal(ranks[0]["params"], ranks[1]["params"])
    assert ranks[0]["tokens"] == 4 * 2 * 16 * 2
    assert (tmp_path / "healed.safetensors").is_file()
