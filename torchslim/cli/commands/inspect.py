"""``torchslim inspect``: a model's coupled groups, what is prunable and what is not."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torchslim as tp
from torchslim.cli.common import add_command, example_of, model_of, table
from torchslim.graph.kinds import group_kind
from torchslim.utils.ops_counter import own_counts


def register(commands: Any) -> None:
    sub = add_command(
        commands, "inspect", "List coupled groups, what is prunable and what is not.", run
    )
    sub.add_argument("--layers", action="store_true", help="also print per-layer MACs/params")
    sub.add_argument(
        "--draw", type=Path, help="also write a PNG of which layers each group couples"
    )


def run(args: argparse.Namespace) -> int:
    model, example = model_of(args), example_of(args)
    graph = tp.DependencyGraph().build_dependency(model, example)
    rows = []
    for group in graph.all_groups():
        prunable = len(group.prunable_idxs)
        if not prunable:
            status = "refused: " + (group.refusal([0]) or "no prunable channel")
        elif group.mixing:
            status = "prunable, not exact: " + "; ".join(sorted(group.mixing))
        else:
            status = "prunable"
        layers = len({m.ref.module_name for m in group.coupling.members})
        kind = group_kind(group)
        rows.append((group.root.label, kind, group.size, prunable, layers, status[:100]))
    header = ("group (root)", "kind", "channels", "prunable", "layers", "status")
    print(table(rows, header))
    macs, params, layer_macs, layer_params = tp.utils.count_ops_and_params(
        model, example, layer_wise=True
    )
    usable = sum(1 for r in rows if r[3])
    print(
        f"\n{len(rows)} groups, {usable} prunable; {params / 1e6:.3f} M params, "
        f"{macs / 1e9:.4f} G MACs"
    )
    for entry in graph.unsupported():
        print(f"unsupported op {entry.op} in module {entry.module}")
    if args.draw:
        print(f"wrote {tp.utils.draw_groups(graph, args.draw, title=f'Groups of {args.model}')}")
    if args.layers:
        layer_rows = own_counts(model, layer_macs, layer_params)
        print("\n" + table(layer_rows, ("layer", "MACs", "params")))
    return 0
