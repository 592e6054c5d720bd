"""``torchslim inspect``: a model's coupled groups, what is prunable and what is not."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

import torchslim as tp
from torchslim.cli.common import add_command, example_of, model_of, table
from torchslim.graph.dependency import Group
from torchslim.graph.kinds import group_kind
from torchslim.utils.ops_counter import count, own_counts


def register(commands: Any) -> None:
    sub = add_command(
        commands, "inspect", "List coupled groups, what is prunable and what is not.", run
    )
    sub.add_argument("--layers", action="store_true", help="also print per-layer MACs/params")
    sub.add_argument(
        "--draw", type=Path, help="also write a PNG of which layers each group couples"
    )


def run(args: argparse.Namespace) -> int:
    model = model_of(args)
    example = example_of(args, model)
    graph = tp.DependencyGraph().build_dependency(model, example)
    rows = []
    for group in graph.all_groups():
        status = group_status(group)
        prunable = len(group.prunable_idxs) if status.startswith("prunable") else 0
        layers = len({m.ref.module_name for m in group.coupling.members})
        kind = group_kind(group)
        rows.append(
            (group.root.label, kind, group.size, positions_per_channel(group), prunable, layers)
            + (status,)
        )
    header = ("group (root)", "kind", "channels", "rows each", "prunable", "layers", "status")
    print(table(rows, header))
    macs, params, layer_macs, layer_params = tp.utils.count_ops_and_params(
        model, example, layer_wise=True
    )
    usable = sum(1 for r in rows if r[4])
    print(f"\n{len(rows)} groups, {usable} prunable; {count(params)} params, {count(macs)} MACs")
    for entry in graph.unsupported():
        print(f"unsupported op {entry.op} in module {entry.module}")
    if args.draw:
        print(f"wrote {tp.utils.draw_groups(graph, args.draw, title=f'Groups of {args.model}')}")
    if args.layers:
        layer_rows = [
            (name, count(macs), count(params))
            for name, macs, params in own_counts(model, layer_macs, layer_params)
        ]
        print("\n" + table(layer_rows, ("layer", "MACs", "params")))
    return 0


def group_status(group: Group) -> str:
    """Prunable (exactly or not, with the first channel-mixing op) or why not."""
    if group.size <= 1:
        return "one channel: nothing to prune"
    if not len(group.prunable_idxs):
        return "refused: " + (group.refusal([0]) or "no prunable channel")
    if not group.mixing:
        return "prunable"
    first, *others = sorted(group.mixing)
    return f"prunable, not exact: {first}" + (f" and {len(others)} more" if others else "")


def positions_per_channel(group: Group) -> str:
    """How one channel lies along the root's dim: ``64`` consecutive positions, or ``3x64``
    (three runs, as a head's rows in a fused q/k/v projection)."""
    for member, index in group.index_maps():
        if member.label != group.root.label:
            continue
        rows = np.nonzero(index == index[index >= 0][0])[0]
        runs = np.split(rows, np.nonzero(np.diff(rows) != 1)[0] + 1)
        if len(runs) > 1 and len({run.size for run in runs}) == 1:
            return f"{len(runs)}x{runs[0].size}"
        return str(rows.size)
    return "-"
