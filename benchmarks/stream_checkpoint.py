"""Pruning Hugging Face checkpoints shard by shard: time, peak memory, bytes read and written.

Checkpoints are generated here (random bf16 weights, written one tensor at a time into 5 GB
shards, kept under ``.cache/stream/`` for reruns): a Llama-3-8B-shaped model (32 layers, about
16 GB) and Llama-3-70B-shaped models with a few of their 80 layers (hidden 8192, MLP 28672, 64
heads / 8 KV), whose per-layer cost is extrapolated to 80 layers. Each is pruned by
``tp.hf.prune_checkpoint`` in its own process (peak RSS from ``wait4``): 20% of the heads, MLP
neurons and hidden size by L2 magnitude, and the 8B by Wanda too (recorded on 32 x 128 random
tokens, one module's weights in memory at a time), and, when asked, by Wanda with
reconstruction (the layers reading removed channels refit on the same tokens, a decoder layer
at a time: float64 least squares over each layer's inputs, tens of minutes for the 8B shape).
``cat`` of the shards to ``/dev/null`` is timed in the same run, just before each prune: with
``--cold`` (root) the page cache is emptied before each, so both read from the disk, as they
must for a checkpoint larger than memory; without it they find whatever the cache holds. The output is reloaded with ``from_pretrained`` in another
process, which generates a few tokens.

    .venv/bin/python benchmarks/stream_checkpoint.py --markdown benchmarks/results/stream_checkpoint.md
    .venv/bin/python benchmarks/stream_checkpoint.py --sizes --wanda --reconstruct 8b --cold \
        --timeout 7200 --markdown benchmarks/results/stream_reconstruct.md   # over an hour
    .venv/bin/python benchmarks/stream_checkpoint.py --sizes 8b --wanda --cold   # from the disk
    .venv/bin/python benchmarks/stream_checkpoint.py --sizes tiny --wanda tiny --reconstruct tiny
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.llm_scale import SIZES  # noqa: E402
from benchmarks.report import publish, run_measured  # noqa: E402
from torchslim.utils.hardware import native_bfloat16  # noqa: E402

CACHE = Path(__file__).resolve().parent.parent / ".cache" / "stream"
SHARD = 5 * 10**9
CALIBRATION = (32, 128)  # sequences x tokens that calibrate Wanda and reconstruction
RECONSTRUCTED = "wanda + reconstruction"
LLAMA_70B = dict(
    vocab_size=128256,
    hidden_size=8192,
    intermediate_size=28672,
    num_attention_heads=64,
    num_key_value_heads=8,
    tie_word_embeddings=False,
)
SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {**SIZES["tiny"]},
    "8b": {**SIZES["8b"]},
    "70b-2": {**LLAMA_70B, "num_hidden_layers": 2},
    "70b-4": {**LLAMA_70B, "num_hidden_layers": 4},
}


def generate(name: str) -> Path:
    """The checkpoint folder of shape ``name``, written once (one tensor in memory at a time)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from torchslim.hf.shards import ShardWriter

    folder = CACHE / name
    if (folder / "config.json").is_file():
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    config = LlamaConfig(**SHAPES[name], dtype="bfloat16", architectures=["LlamaForCausalLM"])
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    state = model.state_dict()
    layout = [
        (k, tuple(t.shape), torch.bfloat16)
        for k, t in state.items()
        if k != "lm_head.weight" or not config.tie_word_embeddings
    ]
    writer = ShardWriter(folder, SHARD, layout)
    generator = torch.Generator().manual_seed(0)
    for key, shape, dtype in layout:
        if key.endswith("norm.weight"):
            tensor = torch.ones(shape, dtype=dtype)
        else:
            tensor = (torch.randn(shape, generator=generator, dtype=torch.float32) * 0.02).to(dtype)
        writer.add(key, tensor)
        del tensor
    writer.close()
    config.save_pretrained(folder)
    return folder


def drop_caches() -> None:
    """Empty the page cache, so that the next read comes from the disk (root only)."""
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as error:
        raise SystemExit(f"--cold drops the page cache, which needs root: {error}") from error


def cat_seconds(folder: Path) -> float:
    start = time.perf_counter()
    shards = sorted(str(p) for p in folder.glob("*.safetensors"))
    subprocess.run(["cat", *shards], stdout=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def calibrated_in() -> dict[str, torch.dtype]:
    """Wanda's calibration forward in float32 where the CPU has no bfloat16 matrix units (in
    bf16 there, the 8B forward took over 20 minutes), else in the checkpoint's bf16."""
    return {} if native_bfloat16() else {"calibration_dtype": torch.float32}


def worker(src: str, dst: str, ratio: float, importance: str) -> None:
    import torchslim as tp

    recipe = {"heads": ratio, "neurons": ratio, "width": ratio}
    calibration = None
    reconstruct = importance == RECONSTRUCTED
    if reconstruct:
        importance = "wanda"
    if importance == "wanda":  # random weights: random tokens calibrate them as well as text
        vocab = json.loads((Path(src) / "config.json").read_text())["vocab_size"]
        calibration = torch.randint(
            0, vocab, CALIBRATION, generator=torch.Generator().manual_seed(0)
        )
    report = tp.hf.prune_checkpoint(
        src,
        dst,
        recipe,
        importance=importance,
        calibration=calibration,
        **(calibrated_in() if importance == "wanda" else {}),
        reconstruct=reconstruct,
    )
    result = {**vars(report), "changed": {k: list(v) for k, v in report.changed.items()}}
    result["reconstruction"] = str(report.reconstruction) if reconstruct else None
    print(json.dumps(result))


def check_reload(dst: str) -> None:
    """Load the output (``tp.hf.from_pretrained``: plain transformers loading, replaying a
    recorded plan where widths need one) and generate a few tokens."""
    import torchslim as tp

    model = tp.hf.from_pretrained(dst, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([[1, 2, 3, 4]]), max_new_tokens=3, do_sample=False)
    print(json.dumps({"generated": out.shape[1] - 4}))


def measure(
    name: str, ratio: float, timeout: float, importance: str, cold: bool = False
) -> dict[str, Any]:
    # generated in a child: a child forked from a big parent starts its peak RSS at the parent's
    subprocess.run([sys.executable, __file__, "--generate", name], check=True)
    src = CACHE / name
    dst = CACHE / f"{name}-pruned"
    if cold:
        drop_caches()
    read_s = cat_seconds(src)
    if cold:
        drop_caches()
    command = [sys.executable, __file__, "--worker", str(src), str(dst), str(ratio), importance]
    status, stdout, stderr, peak = run_measured(command, timeout)
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    head = {"name": name, "importance": importance}
    if status != 0 or not lines:
        return {**head, "error": (stderr.strip().splitlines() or ["killed"])[-1][:200]}
    result = {**head, "read_s": read_s, "peak_gb": peak, **json.loads(lines[-1])}
    status, stdout, _, reload_peak = run_measured(
        [sys.executable, __file__, "--reload", str(dst)], timeout
    )
    result["reloads"] = status == 0 and '"generated": 3' in stdout
    result["reload_peak_gb"] = reload_peak
    shutil.rmtree(dst, ignore_errors=True)
    return result


def markdown(
    results: list[dict[str, Any]], ratio: float, cold: bool = False
) -> tuple[list[str], str]:
    lines = [
        "| checkpoint | criterion | on disk | prune s | `cat` s | ratio | peak RSS GB | read GB | "
        "written GB | read / written GB/s | params | reloads and generates |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['name']} | {r['importance']} |" + " - |" * 9 + f" {r['error']} |")
            continue
        size = sum(p.stat().st_size for p in (CACHE / r["name"]).glob("*.safetensors")) / 1e9
        lines.append(
            f"| {r['name']} | {r['importance']} | {size:.1f} GB | {r['seconds']:.0f} | "
            f"{r['read_s']:.0f} | "
            f"{r['seconds'] / max(r['read_s'], 1e-9):.1f}x | {r['peak_gb']:.2f} | "
            f"{r['bytes_read'] / 1e9:.1f} | {r['bytes_written'] / 1e9:.1f} | "
            f"{r['bytes_read'] / 1e9 / r['seconds']:.2f} / "
            f"{r['bytes_written'] / 1e9 / r['seconds']:.2f} | "
            f"{r['params_before'] / 1e9:.2f} B -> {r['params_after'] / 1e9:.2f} B | "
            f"{'yes' if r['reloads'] else '**no**'} |"
        )
    per_layer = {
        r["name"]: r
        for r in results
        if r["name"].startswith("70b") and r["importance"] == "magnitude" and "error" not in r
    }
    wanda = any(r["importance"] != "magnitude" for r in results)
    refit = any(r["importance"] == RECONSTRUCTED for r in results)
    footer = (
        f"{ratio:.0%} of heads, MLP neurons and hidden size, by L2 magnitude"
        + (
            f" or by Wanda recorded on {CALIBRATION[0]} x {CALIBRATION[1]} random tokens (one "
            "module's weights in memory at a time, "
            + ("in float32" if calibrated_in() else "in bf16")
            + (
                "; with reconstruction, the layers reading removed channels refit on them, a "
                "decoder layer at a time"
                if refit
                else ""
            )
            + ")"
            if wanda
            else ""
        )
        + "; bf16 random weights in 5 GB shards; each prune in its own process on this "
        "machine (2 cores, 24 GB); "
        + (
            "the page cache emptied before each `cat` and before each prune (`--cold`)."
            if cold
            else "each `cat` just before its prune, with whatever the page cache holds."
        )
    )
    if {"70b-2", "70b-4"} <= set(per_layer):
        two, four = per_layer["70b-2"], per_layer["70b-4"]
        layer_s = (four["seconds"] - two["seconds"]) / 2
        total = two["seconds"] + 78 * layer_s
        footer += (
            f" 70B-shaped: {layer_s:.0f} s per layer, peak RSS {two['peak_gb']:.2f} GB with 2 "
            f"layers and {four['peak_gb']:.2f} GB with 4 (independent of depth); extrapolated "
            f"to 80 layers: about {total / 60:.0f} minutes."
        )
    return lines, footer


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="*", default=["8b", "70b-2", "70b-4"], choices=SHAPES)
    parser.add_argument(
        "--wanda", nargs="*", default=["8b"], choices=SHAPES, help="sizes pruned by Wanda too"
    )
    parser.add_argument(
        "--reconstruct",
        nargs="*",
        default=[],
        choices=SHAPES,
        help="sizes pruned by Wanda with reconstruction too",
    )
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--markdown", type=Path)
    parser.add_argument(
        "--cold", action="store_true", help="empty the page cache before each cat and prune (root)"
    )
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    parser.add_argument("--reload", help=argparse.SUPPRESS)
    parser.add_argument("--generate", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker[0], args.worker[1], float(args.worker[2]), args.worker[3])
        return
    if args.reload:
        check_reload(args.reload)
        return
    if args.generate:
        generate(args.generate)
        return
    results = []
    runs = [(name, "magnitude") for name in args.sizes] + [(name, "wanda") for name in args.wanda]
    runs += [(name, RECONSTRUCTED) for name in args.reconstruct]
    for name, importance in runs:
        results.append(measure(name, args.ratio, args.timeout, importance, args.cold))
        print(results[-1], flush=True)
    lines, footer = markdown(results, args.ratio, args.cold)
    publish(lines, footer, args.markdown)


if __name__ == "__main__":
    main()
