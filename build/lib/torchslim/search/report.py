"""Reports of sensitivity analyses and searches: markdown tables, one PNG curve per unit, and
JSON next to the saved plan (``net.safetensors`` + ``net.plan.json`` + ``net.search.json``)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Union

from torchslim.persistence import atomic_write, save_pruned
from torchslim.search.pipeline import SearchResult
from torchslim.search.sensitivity import Sensitivity
from torchslim.utils.ops_counter import count


def sensitivity_markdown(table: Sensitivity) -> str:
    """One row per unit: its channels and the metric at each ratio (dense metric in the title)."""
    header = "| unit | channels | " + " | ".join(f"{r:g}" for r in table.ratios) + " |"
    lines = [
        f"Metric with one unit pruned alone (dense: {table.baseline:.4f}).",
        "",
        header,
        "|---|---|" + "---|" * len(table.ratios),
    ]
    for unit in table.units:
        metrics = " | ".join(f"{t.metric:.4f}" for t in table.curve(unit)[1:])
        lines.append(f"| {unit} | {table.channels[unit]} | {metrics} |")
    return "\n".join(lines) + "\n"


def plot_sensitivity(table: Sensitivity, folder: Union[str, Path]) -> list[Path]:
    """``<unit>.png`` per unit (metric and MACs against ratio) and ``all.png`` with every
    curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    overview, everything = plt.subplots(figsize=(7, 4))
    for unit in table.units:
        curve = table.curve(unit)
        ratios = [t.ratio for t in curve]
        figure, axis = plt.subplots(figsize=(5, 3))
        axis.plot(ratios, [t.metric for t in curve], "o-")
        axis.set_xlabel("ratio of channels removed")
        axis.set_ylabel("metric")
        axis.set_title(f"{unit} ({table.channels[unit]} channels)")
        right = axis.twinx()
        right.plot(ratios, [t.macs / table.dense_macs for t in curve], "s--", color="tab:red")
        right.set_ylabel("MACs / dense", color="tab:red")
        figure.tight_layout()
        paths.append(folder / f"{_file_name(unit)}.png")
        figure.savefig(paths[-1], dpi=100)
        plt.close(figure)
        everything.plot(ratios, [t.metric for t in curve], label=unit)
    everything.set_xlabel("ratio of channels removed")
    everything.set_ylabel("metric")
    if len(table.units) <= 12:
        everything.legend(fontsize=7)
    overview.tight_layout()
    paths.append(folder / "all.png")
    overview.savefig(paths[-1], dpi=100)
    plt.close(overview)
    return paths


def search_markdown(result: SearchResult) -> str:
    """The dense vs pruned summary, the guard's verdict and the chosen ratios."""
    dense = result.dense
    lines = [f"Target: {result.target}; seed {result.seed}.", ""]
    if result.accepted:
        lines += [
            "| | dense | pruned |",
            "|---|---|---|",
            f"| metric | {dense['metric']:.4f} | {result.metric:.4f} |",
            f"| MACs | {count(dense['macs'])} | {count(result.macs)} "
            f"({result.macs / dense['macs']:.3f}) |",
            f"| params | {count(dense['params'])} | {count(result.params)} "
            f"({result.params / dense['params']:.3f}) |",
            "",
        ]
    if result.verdict is not None:
        lines += [result.verdict.message, ""]
    if result.refusal.startswith("quality"):
        lines += [result.refusal, ""]
    lines += ["| unit | searched ratio |", "|---|---|"]
    lines += [f"| {unit} | {ratio:g} |" for unit, ratio in result.ratios.items()]
    if result.accepted:
        dense_channels = result.applied["dense_channels"]
        lines += ["", f"Shipped: {result.applied['candidate']}.", "", "| group root | channels |"]
        lines.append("|---|---|")
        lines += [
            f"| {root} | {kept} / {dense_channels.get(root, '?')} |"
            for root, kept in result.applied["channels"].items()
        ]
    return "\n".join(lines) + "\n"


def save_result(result: SearchResult, path: Union[str, Path]) -> Path:
    """Write the shipped model and its plan (``tp.save_pruned``), ``<stem>.search.json`` (every
    number and every step) and ``<stem>.search.md``. A refused result writes no model."""
    path = Path(path)
    if result.accepted:
        save_pruned(result.model, path)
    write_json(path.with_name(path.stem + ".search.json"), result.to_dict())
    text = search_markdown(result)
    atomic_write(path.with_name(path.stem + ".search.md"), lambda tmp: tmp.write_text(text))
    return path


def write_json(path: Path, data: Any) -> None:
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text))


def _file_name(unit: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", unit) or "model"
