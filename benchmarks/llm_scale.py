"""Width-pruning an LLM-sized model on one CPU box: torchslim and torch-pruning side by side.

A Llama-3-8B-shaped ``LlamaForCausalLM`` (random bf16 weights, about 16 GB) is built in a fresh
process for each library, which then prunes 20% of the attention heads, MLP neurons and hidden
size with L2 magnitude. Each run reports wall time (graph, pruning, total), the process's peak
resident memory, the parameters left, whether the pruned model still runs a forward pass and
whether its config describes it. A crash, an out-of-memory kill or a timeout is that library's
result. torchslim traces a weightless ``meta`` copy; torch-pruning traces the real model with
autograd, as its LLM example does (``num_heads`` per projection, ``prune_num_heads``, the
attributes patched by hand afterwards, and the KV cache turned off, which its tracing needs).

    .venv/bin/python benchmarks/llm_scale.py --markdown benchmarks/results/llm_scale.md
    .venv/bin/python benchmarks/llm_scale.py --size tiny      # seconds, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.report import publish, run_measured  # noqa: E402

SIZES: dict[str, dict[str, Any]] = {
    "8b": dict(
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
    ),
    "1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=True,
    ),
    "tiny": dict(
        vocab_size=1000,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=4,
    ),
}
LIBRARIES = ("torchslim", "torch-pruning")


def random_llama(size: str, requires_grad: bool) -> nn.Module:
    """A ``LlamaForCausalLM`` of the given shape with N(0, 0.02) bf16 weights, built without
    ever holding a float32 copy (parameters start on ``meta``)."""
    import transformers

    from torchslim.hf.config import parameters_on_meta

    config = transformers.LlamaConfig(**SIZES[size])
    with parameters_on_meta():
        model = transformers.LlamaForCausalLM(config)
    generator = torch.Generator().manual_seed(0)
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            data = torch.empty(param.shape, dtype=torch.bfloat16).normal_(
                0, 0.02, generator=generator
            )
            setattr(module, name, nn.Parameter(data, requires_grad=requires_grad))
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval()


def _prune_torchslim(model: nn.Module, inputs: torch.Tensor, ratio: float) -> dict[str, float]:
    import torchslim as tp

    start = time.perf_counter()
    graph = tp.DependencyGraph().build_dependency(model, inputs, trace_on_meta=True)
    built = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(
        model,
        inputs,
        graph=graph,
        pruning_ratio=0.0,
        pruning_ratio_dict={"heads": ratio, "neurons": ratio, "width": ratio},
    )
    pruner.step()
    return {"graph_s": built - start, "prune_s": time.perf_counter() - built}


def _prune_torch_pruning(model: nn.Module, inputs: torch.Tensor, ratio: float) -> dict[str, float]:
    import torch_pruning as peer

    config = model.config
    config.use_cache = False  # its users' workaround: the KV cache breaks its output tracing
    num_heads = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            num_heads[module.q_proj] = config.num_attention_heads
            num_heads[module.k_proj] = config.num_key_value_heads
            num_heads[module.v_proj] = config.num_key_value_heads
    start = time.perf_counter()
    pruner = peer.pruner.MetaPruner(
        model,
        example_inputs=inputs,
        importance=peer.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
        pruning_ratio=ratio,
        ignored_layers=[model.lm_head],
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=ratio,
    )
    built = time.perf_counter()
    for group in pruner.step(interactive=True):
        group.prune()
    config.hidden_size = model.lm_head.in_features
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            heads = module.q_proj.out_features // module.head_dim
            config.num_attention_heads = heads
            config.num_key_value_heads = module.k_proj.out_features // module.head_dim
            module.num_key_value_groups = heads // config.num_key_value_heads
        elif name.endswith("mlp"):
            config.intermediate_size = module.gate_proj.out_features
    return {"graph_s": built - start, "prune_s": time.perf_counter() - built}


def _config_describes(model: nn.Module) -> str:
    """``"plain"`` when ``model.config`` alone builds the pruned shapes, ``"plan"`` when it
    records the plan ``tp.hf.from_pretrained`` replays (transformers refuses a plain one, as a
    hidden size that is not a multiple of the heads), ``""`` when neither describes it."""
    from torchslim.hf.config import build_shapes, model_shapes
    from torchslim.hf.sync import RECORD_KEY

    built = build_shapes(type(model), model.config)
    shapes = {k: v for k, v in model_shapes(model).items() if ":" not in k}
    if built is not None and all(built.get(k) == v for k, v in shapes.items()):
        return "plain"
    record = getattr(model.config, RECORD_KEY, None)
    recorded = (record or {}).get("shapes", {})
    return "plan" if recorded and all(recorded.get(k) == list(v) for k, v in shapes.items()) else ""


def worker(library: str, size: str, ratio: float) -> dict[str, Any]:
    """One library on one freshly built model, in this process."""
    start = time.perf_counter()
    model = random_llama(size, requires_grad=library == "torch-pruning")
    inputs = torch.randint(0, SIZES[size]["vocab_size"], (1, 16), generator=torch.Generator())
    dense = sum(p.numel() for p in model.parameters())
    result: dict[str, Any] = {"library": library, "dense_params": dense}
    result["build_model_s"] = time.perf_counter() - start
    prune = _prune_torchslim if library == "torchslim" else _prune_torch_pruning
    timings = prune(model, inputs, ratio)
    result.update(timings, total_s=timings["graph_s"] + timings["prune_s"])
    result["params"] = sum(p.numel() for p in model.parameters())
    forward = time.perf_counter()
    with torch.no_grad():
        logits = model(inputs).logits
    result["forward_ok"] = bool(torch.isfinite(logits.float()).all())
    result["forward_s"] = time.perf_counter() - forward
    result["config"] = _config_describes(model)
    return result


def run(library: str, size: str, ratio: float, timeout: float) -> dict[str, Any]:
    """The worker in a child process: its result, peak RSS, or how it failed."""
    command = [sys.executable, __file__, "--worker", library, "--size", size]
    command += ["--ratio", str(ratio)]
    status, stdout, stderr, peak_gb = run_measured(command, timeout)
    if status is None:
        return {"library": library, "error": f"timeout after {timeout:.0f} s"}
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    if status < 0 or not lines:
        why = stderr.strip().splitlines()[-1] if stderr.strip() else "killed"
        if status == -9:
            why = "killed (out of memory)"
        return {"library": library, "error": why[:200], "peak_gb": peak_gb}
    result = json.loads(lines[-1])
    result["peak_gb"] = peak_gb
    return result


DESCRIBED = {"plain": "yes", "plan": "plan recorded", "": "**no**"}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def markdown(size: str, ratio: float, results: list[dict[str, Any]]) -> tuple[list[str], str]:
    """The table's lines and its footer."""
    shape = SIZES[size]
    lines = [
        "| library | graph s | prune s | total s | peak RSS GB | params | forward after | "
        "config describes it | failure |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            peak = f"{r['peak_gb']:.1f}" if "peak_gb" in r else "-"
            lines.append(f"| {r['library']} | - | - | - | {peak} | - | - | - | {r['error']} |")
            continue
        params = f"{_count(r['dense_params'])} -> {_count(r['params'])}"
        lines.append(
            f"| {r['library']} | {r['graph_s']:.1f} | {r['prune_s']:.1f} | {r['total_s']:.1f} | "
            f"{r['peak_gb']:.1f} | {params} | {'yes' if r['forward_ok'] else '**no**'} | "
            f"{DESCRIBED[r['config']]} |  |"
        )
    footer = (
        f"Llama shape {shape['hidden_size']} hidden, {shape['intermediate_size']} MLP, "
        f"{shape['num_hidden_layers']} layers, {shape['num_attention_heads']} heads / "
        f"{shape['num_key_value_heads']} KV heads, vocabulary {shape['vocab_size']}; bf16 random "
        f"weights; {ratio:.0%} of heads, MLP neurons and hidden size pruned by L2 magnitude; "
        f"each library in its own process on this {os.cpu_count()}-core machine."
    )
    return lines, footer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="8b")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--libraries", nargs="+", choices=LIBRARIES, default=list(LIBRARIES))
    parser.add_argument("--timeout", type=float, default=1200)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument("--worker", choices=LIBRARIES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.size, args.ratio)))
        return
    results = []
    for library in args.libraries:
        result = run(library, args.size, args.ratio, args.timeout)
        print(json.dumps(result), flush=True)
        results.append(result)
    publish(*markdown(args.size, args.ratio, results), args.markdown)


if __name__ == "__main__":
    main()
