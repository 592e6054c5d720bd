"""Reports: a markdown summary and PNG plots (channels per layer, accuracy and MACs per step,
training loss), written next to the pruned model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torchslim.utils.ops_counter import count


def summary_rows(results: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(quantity, dense, pruned)`` rows shared by the terminal table and report.md."""
    (macs0, macs1), (params0, params1) = results["macs"], results["params"]
    (lat0, lat1) = results["latency_ms"]
    return [
        ("test accuracy", f"{results['dense_accuracy']:.4f}", f"{results['pruned_accuracy']:.4f}"),
        ("MACs", count(macs0), f"{count(macs1)} ({macs0 / macs1:.2f}x fewer)"),
        ("params", count(params0), f"{count(params1)} ({params0 / params1:.2f}x fewer)"),
        (
            "CPU latency (batch 1)",
            f"{lat0:.3f} ms",
            f"{lat1:.3f} ms ({lat0 / lat1:.2f}x{'' if lat1 < lat0 else ', not faster: see note'})",
        ),
        ("ONNX Runtime latency", "", f"{results['onnx']['onnx_ms']:.3f} ms"),
        ("ONNX vs torch max abs diff", "", f"{results['onnx']['max_abs_diff']:.1e}"),
    ]


def write_report(out: Path, results: dict[str, Any], history: dict[str, Any]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    before, after = results["widths"]
    figure, axis = plt.subplots(figsize=(6, 3))
    positions = range(len(before))
    axis.bar([p - 0.2 for p in positions], before, width=0.4, label="before")
    axis.bar([p + 0.2 for p in positions], after, width=0.4, label="after")
    axis.set_xticks(list(positions), [f"conv{i + 1}" for i in positions])
    axis.set_ylabel("output channels")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "channels.png", dpi=120)
    plt.close(figure)

    steps = results["steps"]
    figure, left = plt.subplots(figsize=(6, 3))
    xs = [0] + [s["step"] for s in steps]
    left.plot(
        xs, [results["sparse_accuracy"]] + [s["accuracy"] for s in steps], "o-", label="accuracy"
    )
    left.set_xlabel("pruning step")
    left.set_ylabel("test accuracy (before fine-tune)")
    left.set_xticks(xs)
    right = left.twinx()
    base = results["macs"][0]
    right.plot(xs, [1.0] + [s["macs"] / base for s in steps], "s--", color="tab:red", label="MACs")
    right.set_ylabel("MACs / dense")
    curves = left.get_lines() + right.get_lines()
    left.legend(curves, [curve.get_label() for curve in curves], loc="lower left")
    figure.tight_layout()
    figure.savefig(out / "steps.png", dpi=120)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6, 3))
    offset = 0
    for phase, losses in history["loss"].items():
        axis.plot(range(offset, offset + len(losses)), losses, label=phase)
        offset += len(losses)
    axis.set_xlabel("epoch")
    axis.set_ylabel("training loss (log scale)")
    axis.set_yscale("log")
    axis.legend()
    figure.tight_layout()
    figure.savefig(out / "loss.png", dpi=120)
    plt.close(figure)

    lat0, lat1 = results["latency_ms"]
    lines = ["# torchslim demo report", "", "| | dense | pruned |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in summary_rows(results)]
    lines += [
        "",
        f"Accuracy after sparse training {results['sparse_accuracy']:.4f}, right after pruning "
        f"{results['pruned_one_shot_accuracy']:.4f}, after fine-tuning {results['pruned_accuracy']:.4f}.",
        "",
        *(
            [
                "Note: the pruned model is not faster in PyTorch here. At batch 1 a net this "
                "small costs Python and kernel-launch overhead, not FLOPs; compare the ONNX "
                "Runtime latency, or time larger batches with `torchslim bench`.",
                "",
            ]
            if lat1 >= lat0
            else []
        ),
        "![channels per layer](channels.png)",
        "",
        "![accuracy and MACs per pruning step](steps.png)",
        "",
        "![training loss](loss.png)",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
