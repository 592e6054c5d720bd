"""Sweep the torchvision zoo with torchslim and with torch-pruning, in the same run.

For each model both libraries build their dependency graph from the same random-init model and
inputs, then remove a random 30% of the channels of every group they offer (the same seed).
Reported per model and library: pruned OK (forward runs, output shapes kept), exact (the pruned
model matches the original with the removed channels zeroed, float64, relative error < 1e-6,
over the groups without channel-mixing normalisation), graph-build seconds and prune seconds.

    python benchmarks/zoo.py                      # every torchvision model
    python benchmarks/zoo.py resnet18 swin_t      # a few
    python benchmarks/zoo.py --markdown out.md    # also write the README table

torch-pruning is a benchmark-only dependency: ``pip install torch-pruning==1.6.1``.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchslim as ts  # noqa: E402
from torchslim.spaces.trace import iter_tensors  # noqa: E402
from torchslim.verify import random_selections, relative_error, run_float64  # noqa: E402
from torchslim.zoo import (  # noqa: E402
    ZooModel,
    build_torchvision,
    randomize_constant_parameters,
    torchvision_names,
)

RATIO = 0.3
SEED = 0


@dataclass
class Result:
    ok: Optional[bool] = None
    exact: Optional[bool] = None
    build: float = float("nan")
    prune: float = float("nan")
    note: str = ""


def _run(zoo: ZooModel, model: nn.Module, dense: bool) -> list[torch.Tensor]:
    with torch.no_grad():
        if dense and zoo.dense_forward is not None:
            out = zoo.dense_forward(model, zoo.inputs)
        elif isinstance(zoo.inputs, tuple):
            out = model(*zoo.inputs)
        else:
            out = model(zoo.inputs)
    return [t.detach() for t in iter_tensors(out)]


def bench_torchslim(zoo: ZooModel) -> Result:
    result = Result()
    model = copy.deepcopy(zoo.model)
    trace_forward = zoo.dense_forward if zoo.kind == "optical_flow" else None
    start = time.perf_counter()
    graph = ts.DependencyGraph().build_dependency(model, zoo.inputs, forward_fn=trace_forward)
    result.build = time.perf_counter() - start
    selections = random_selections(graph, RATIO, SEED)
    report = ts.verify(graph, zoo.inputs, selections, per_group=False, forward_fn=zoo.dense_forward)
    result.exact = report.ok
    shapes = [t.shape for t in _run(zoo, model, dense=False)]
    start = time.perf_counter()
    for group, idxs in selections:
        group.prune(idxs)
    result.prune = time.perf_counter() - start
    result.ok = [t.shape for t in _run(zoo, model, dense=False)] == shapes
    result.note = f"{len(selections)} groups"
    return result


def _output_layers(zoo: ZooModel) -> list[nn.Module]:
    """Layers whose outputs are model outputs: torch-pruning users must ignore them by hand."""
    graph = ts.DependencyGraph().build_dependency(
        copy.deepcopy(zoo.model), zoo.inputs, trace_train_mode=False
    )
    names = set()
    for coupling in graph.analysis.couplings.values():
        if any(reason == "a model output" for reason in coupling.frozen.values()):
            names.update(m.ref.module_name for m in coupling.members)
    modules = dict(zoo.model.named_modules())
    return [modules[n] for n in names if isinstance(modules.get(n), (nn.Linear, nn.Conv2d))]


def _zero_like_tp(
    tp: Any, graph: Any, model: nn.Module, items: list[tuple[Any, list[int]]]
) -> bool:
    """Zero what torch-pruning removes in a copy; False if a handler is not understood."""
    modules = {id(m): name for name, m in graph.model.named_modules()}
    targets = dict(model.named_modules())
    with torch.no_grad():
        for dep, idxs in items:
            name = modules.get(id(dep.target.module))
            if name is None:  # a parameter-free op node of the peer's graph, or a bare parameter
                if isinstance(dep.target.module, nn.Parameter):
                    return False
                continue
            layer = targets[name]
            index = torch.as_tensor(idxs, dtype=torch.long)
            out = graph.is_out_channel_pruning_fn(dep.handler)
            if isinstance(layer, (nn.Conv2d, nn.Conv1d, nn.Conv3d, nn.Linear)):
                dim = 0 if out else 1
                if isinstance(layer, nn.modules.conv._ConvNd) and layer.groups > 1 and not out:
                    continue
                layer.weight.index_fill_(dim, index, 0)
                if out and layer.bias is not None:
                    layer.bias.index_fill_(0, index, 0)
            elif isinstance(layer, nn.modules.conv._ConvTransposeNd):
                layer.weight.index_fill_(1 if out else 0, index, 0)
                if out and layer.bias is not None:
                    layer.bias.index_fill_(0, index, 0)
            elif hasattr(layer, "weight") or hasattr(layer, "running_mean"):
                for name in ("weight", "bias", "running_mean", "running_var"):
                    tensor = getattr(layer, name, None)
                    if isinstance(tensor, torch.Tensor) and tensor.dim() >= 1:
                        tensor.index_fill_(tensor.dim() - 1 if tensor.dim() == 1 else 0, index, 0)
            elif dep.target.module is not None and list(dep.target.module.parameters(False)):
                return False
    return True


def bench_torch_pruning(zoo: ZooModel) -> Result:
    import torch_pruning as tp

    result = Result()
    model = copy.deepcopy(zoo.model)
    ignored = _output_layers(zoo)
    ignored = [dict(model.named_modules())[n] for n, m in zoo.model.named_modules() if m in ignored]
    forward = (lambda m, x: zoo.dense_forward(m, x)) if zoo.kind == "optical_flow" else None
    try:
        start = time.perf_counter()
        graph = tp.DependencyGraph().build_dependency(
            model, example_inputs=zoo.inputs, forward_fn=forward or (lambda m, x: _call(m, x))
        )
        result.build = time.perf_counter() - start
    except Exception as error:  # the peer failing is a result, not a crash of the benchmark
        result.note = f"build: {type(error).__name__}: {str(error)[:60]}"
        return result
    rng = random.Random(SEED)
    reference = copy.deepcopy(model)
    shapes = [t.shape for t in _run(zoo, model, dense=False)]
    exact_possible = True
    pruned_groups = 0
    try:
        start = time.perf_counter()
        for group in graph.get_all_groups(ignored_layers=ignored):
            root_dep, root_idxs = group[0].dep, list(group[0].idxs)
            if len(root_idxs) < 2:
                continue
            count = max(1, int(round(len(root_idxs) * RATIO)))
            chosen = sorted(rng.sample(range(len(root_idxs)), count))
            sub = graph.get_pruning_group(root_dep.target.module, root_dep.handler, chosen)
            if not graph.check_pruning_group(sub):
                continue
            items = [(item.dep, list(item.idxs)) for item in sub]
            exact_possible &= _zero_like_tp(tp, graph, reference, items)
            sub.prune()
            pruned_groups += 1
        result.prune = time.perf_counter() - start
        result.ok = [t.shape for t in _run(zoo, model, dense=False)] == shapes
    except Exception as error:
        result.ok = False
        result.note = f"prune: {type(error).__name__}: {str(error)[:60]}"
        return result
    if exact_possible:
        try:
            forward = zoo.dense_forward
            error = relative_error(
                run_float64(reference, zoo.inputs, forward), run_float64(model, zoo.inputs, forward)
            )
            result.exact = error < 1e-6
        except Exception as failure:
            result.exact = False
            result.note = f"run: {type(failure).__name__}"
    result.note = result.note or f"{pruned_groups} groups"
    return result


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(*inputs) if isinstance(inputs, tuple) else model(inputs)


def _cell(value: Optional[bool]) -> str:
    return {True: "yes", False: "**no**", None: "n/a"}[value]


BENCHES = {"torchslim": "bench_torchslim", "torch-pruning": "bench_torch_pruning"}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", help="torchvision model names (default: all)")
    parser.add_argument("--markdown", type=Path, help="write the results table here")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per model and library")
    parser.add_argument("--memory-gb", type=float, default=10, help="address-space cap per run")
    parser.add_argument("--one", nargs=2, metavar=("LIBRARY", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        library, name = args.one
        kind = next(k for k, n in torchvision_names() if n == name)
        torch.manual_seed(0)
        zoo = build_torchvision(name, kind)
        randomize_constant_parameters(zoo.model)
        print(json.dumps(asdict(_guarded(globals()[BENCHES[library]], zoo))))
        return
    entries = [(k, n) for k, n in torchvision_names() if not args.models or n in args.models]
    header = (
        "| model | torchslim OK | torchslim exact | torch-pruning OK | torch-pruning exact "
        "| build s (ts / tp) | prune s (ts / tp) | torch-pruning failure |"
    )
    lines = [header, "|" + "---|" * 8]
    ratios = []
    for _, name in entries:
        ours, peer = (_isolated(lib, name, args.timeout, args.memory_gb) for lib in BENCHES)
        if ours.build == ours.build and peer.build == peer.build:
            ratios.append(peer.build / ours.build)
        line = (
            f"| {name} | {_cell(ours.ok)} | {_cell(ours.exact)} | {_cell(peer.ok)} | "
            f"{_cell(peer.exact)} | {ours.build:.2f} / {peer.build:.2f} | "
            f"{ours.prune:.2f} / {peer.prune:.2f} | {'' if peer.ok else peer.note} |"
        )
        lines.append(line)
        print(line, ours.note, "|", peer.note, flush=True)
    summary = _summary(lines[2:], ratios)
    print(summary)
    if args.markdown:
        args.markdown.write_text("\n".join(lines + ["", summary]) + "\n")


def _isolated(library: str, name: str, timeout: float, memory_gb: float) -> Result:
    """Run one library on one model in a child process: a crash, an out-of-memory or a timeout
    is that library's result for that model, not the end of the sweep."""
    limit = int(memory_gb * 2**30)

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    command = [sys.executable, __file__, "--one", library, name]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout, preexec_fn=cap
        )
    except subprocess.TimeoutExpired:
        return Result(ok=False, note=f"timeout after {timeout:.0f} s")
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return Result(ok=False, note=f"crashed: {tail[:70]}")
    return Result(**json.loads(lines[-1]))


def _guarded(fn: Callable[[ZooModel], Result], zoo: ZooModel) -> Result:
    try:
        return fn(zoo)
    except MemoryError:
        return Result(ok=False, note="out of memory")
    except Exception as error:
        return Result(ok=False, note=f"{type(error).__name__}: {str(error)[:80]}")


def _summary(rows: list[str], ratios: list[float]) -> str:
    cols = [r.split("|")[2:6] for r in rows]
    count = [sum(1 for c in cols if c[i].strip() == "yes") for i in range(4)]
    median = statistics.median(ratios) if ratios else float("nan")
    return (
        f"{len(rows)} models. torchslim: pruned OK {count[0]}, exact {count[1]}. "
        f"torch-pruning: pruned OK {count[2]}, exact {count[3]}. "
        f"Median graph-build time ratio torch-pruning / torchslim: {median:.2f}x."
    )


if __name__ == "__main__":
    main()
