"""torchslim vs torch-pruning speed: graph build, groups, and one 50% magnitude step.

For each model both libraries work on copies of the same random-init model and inputs, in
turns (torchslim, torch-pruning, torchslim, ...), ``--repeats`` times, and the median seconds
are reported for: building the dependency graph, listing its groups (``get_all_groups``), and
a 50% ``MagnitudePruner`` (L2) step from scratch (constructor, which builds the graph, plus
``step()``), with the model's output layers ignored in both. Whether each pruned model still
runs is checked after its step (a failure is a result, not a crash of the benchmark). Each
model runs in a fresh worker process under the address-space cap, so what one model leaves
behind in the allocator (or a crash) cannot fail the next.

    python benchmarks/speed.py                            # the default model list
    python benchmarks/speed.py resnet50 vit_s16 llama     # a few
    python benchmarks/speed.py --markdown out.md          # also write the README table

Images are 224x224 (inception_v3: 299x299), token sequences 32 long.
Models: torchvision classification models up to 60M parameters (``--list`` prints them), timm
ViT-S/16 and ConvNeXt-T (``vit_s16``, ``timm_convnext_t``) and a tiny Hugging Face Llama
(``llama``). torch-pruning is a benchmark-only dependency: ``pip install torch-pruning==1.6.1``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib
import json
import resource
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torchvision
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchslim as ts  # noqa: E402
from benchmarks.report import publish  # noqa: E402
from torchslim.zoo import build_torchvision, torchvision_names  # noqa: E402

MAX_PARAMS = 60_000_000
PHASES = ("build", "groups", "step")


@dataclass
class Case:
    name: str
    model: nn.Module
    inputs: Any
    outputs: Callable[[nn.Module], list[nn.Module]]


@dataclass
class Timing:
    seconds: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    runs: Optional[bool] = None
    note: str = ""

    def median(self, phase: str) -> float:
        values = self.seconds[phase]
        return statistics.median(values) if values else float("nan")


def classifier_heads(model: nn.Module) -> list[nn.Module]:
    """The last Linear (or 1x1 conv) layer: the class scores, which no one prunes."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return layers[-1:]


def torchvision_cases() -> list[str]:
    """Classification models of torchvision with at most 60M parameters (the count torchvision
    publishes with the model's weights)."""
    return [
        name
        for _, name in torchvision_names("classification")
        if torchvision.models.get_model_weights(name).DEFAULT.meta["num_params"] <= MAX_PARAMS
    ]


def build_case(name: str) -> Case:
    torch.manual_seed(0)
    if name == "vit_s16" or name == "timm_convnext_t":
        import timm

        timm_name = "vit_small_patch16_224" if name == "vit_s16" else "convnext_tiny"
        model = timm.create_model(timm_name, pretrained=False).eval()
        return Case(name, model, torch.randn(1, 3, 224, 224), classifier_heads)
    if name == "llama":
        import transformers

        config = transformers.LlamaConfig(
            vocab_size=1000,
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=4,
        )
        model = transformers.LlamaForCausalLM(config).eval()
        return Case(name, model, torch.randint(0, 1000, (1, 32)), lambda m: [m.lm_head])
    zoo = build_torchvision(name, "classification")
    size = 299 if name == "inception_v3" else 224  # the resolution the model was made for
    return Case(name, zoo.model, torch.randn(1, 3, size, size), classifier_heads)


def _run(model: nn.Module, inputs: Any) -> None:
    with torch.no_grad():
        model(inputs)


def time_torchslim(case: Case, timing: Timing) -> None:
    model = copy.deepcopy(case.model)
    start = time.perf_counter()
    graph = ts.DependencyGraph().build_dependency(model, case.inputs)
    timing.seconds["build"].append(time.perf_counter() - start)
    start = time.perf_counter()
    list(graph.get_all_groups(ignored_layers=case.outputs(model)))
    timing.seconds["groups"].append(time.perf_counter() - start)
    timing.runs = _step(case, timing, ts, model=copy.deepcopy(case.model))


def time_torch_pruning(case: Case, timing: Timing) -> None:
    import torch_pruning as tp

    model = copy.deepcopy(case.model)
    start = time.perf_counter()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=case.inputs)
    timing.seconds["build"].append(time.perf_counter() - start)
    start = time.perf_counter()
    list(graph.get_all_groups(ignored_layers=case.outputs(model)))
    timing.seconds["groups"].append(time.perf_counter() - start)
    timing.runs = _step(case, timing, tp, model=copy.deepcopy(case.model))


def _step(case: Case, timing: Timing, library: Any, model: nn.Module) -> bool:
    start = time.perf_counter()
    pruner = library.pruner.MagnitudePruner(
        model,
        case.inputs,
        importance=library.importance.MagnitudeImportance(p=2),
        pruning_ratio=0.5,
        ignored_layers=case.outputs(model),
    )
    pruner.step()
    timing.seconds["step"].append(time.perf_counter() - start)
    try:
        _run(model, case.inputs)
    except Exception as error:  # a broken pruned model is a result
        timing.note = f"pruned model fails: {type(error).__name__}: {str(error)[:50]}"
        return False
    return True


LIBRARIES = {"torchslim": time_torchslim, "torch-pruning": time_torch_pruning}


def bench(name: str, repeats: int) -> dict[str, Timing]:
    case = build_case(name)
    timings = {library: Timing() for library in LIBRARIES}
    for _ in range(repeats):
        for library, run in LIBRARIES.items():
            if timings[library].note.startswith("fails"):
                continue
            try:
                run(case, timings[library])
            except Exception as error:
                timings[library].note = f"fails: {type(error).__name__}: {str(error)[:60]}"
                gc.collect()
    return timings


def in_worker(name: str, args: argparse.Namespace) -> dict[str, Timing]:
    """``bench(name)`` in a fresh process (see the module docstring); a worker that dies is
    a failure of both libraries on that model."""
    command = [sys.executable, __file__, "--worker", name, "--repeats", str(args.repeats)]
    command += ["--threads", str(args.threads), "--memory-gb", str(args.memory_gb)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        timings = {library: Timing() for library in LIBRARIES}
        for timing in timings.values():
            timing.note = f"fails: worker exit {done.returncode}: {done.stderr.strip()[-60:]}"
        return timings
    found = json.loads(done.stdout.strip().splitlines()[-1])
    return {library: Timing(**fields) for library, fields in found.items()}


def _seconds(value: float) -> str:
    return "n/a" if value != value else f"{value:.3f}"


def _ratio(peer: float, ours: float) -> str:
    return "n/a" if peer != peer or ours != ours else f"{peer / ours:.2f}x"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("models", nargs="*", help="model names (default: the list in the doc)")
    parser.add_argument("--repeats", type=int, default=3, help="alternated runs per library")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--list", action="store_true", help="print the default models and exit")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # one model, timings as JSON
    parser.add_argument(
        "--memory-gb",
        type=float,
        default=12,
        help="address-space cap: a library that needs more fails on that model (not the machine)",
    )
    args = parser.parse_args(argv)
    if args.worker:
        for optional in ("timm", "transformers", "torch_pruning"):
            importlib.import_module(optional)  # imported before the cap: their imports map a lot
        limit = int(args.memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        torch.set_num_threads(args.threads)
        warnings.filterwarnings("ignore")
        timings = bench(args.worker, args.repeats)
        print(json.dumps({library: vars(t) for library, t in timings.items()}))
        return
    names = args.models or [*torchvision_cases(), "vit_s16", "timm_convnext_t", "llama"]
    if args.list:
        print(" ".join(names))
        return
    header = (
        "| model | build torchslim / torch-pruning (s) | get_all_groups (s) | 50% step from scratch "
        "(s) | step speed-up | notes |"
    )
    lines = [header, "|---|---|---|---|---|---|"]
    ratios, slower = [], []
    for name in names:
        timings = in_worker(name, args)
        ours, peer = timings["torchslim"], timings["torch-pruning"]
        cells = [f"{_seconds(ours.median(p))} / {_seconds(peer.median(p))}" for p in PHASES]
        speedup = peer.median("step") / ours.median("step")
        if speedup == speedup:
            ratios.append(speedup)
            if speedup < 1:
                slower.append(name)
        notes = "; ".join(f"{library}: {t.note}" for library, t in timings.items() if t.note)
        lines.append(
            f"| {name} | {' | '.join(cells)} | "
            f"{_ratio(peer.median('step'), ours.median('step'))} | {notes} |"
        )
        print(lines[-1], flush=True)
    footer = (
        f"{len(names)} models, median of {args.repeats} alternated runs, {args.threads} threads. "
        f"Median step speed-up (torch-pruning / torchslim, build + 50% step): "
        f"{statistics.median(ratios) if ratios else float('nan'):.2f}x; slower than "
        f"torch-pruning: {', '.join(slower) or 'none'}."
    )
    publish(lines, footer, args.markdown)


if __name__ == "__main__":
    main()
