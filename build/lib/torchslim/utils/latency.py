"""Latency measurements shared by the demo, ``torchslim bench`` and the searches: PyTorch CPU and
ONNX Runtime, median of repeated runs after warm-up."""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

Run = Callable[[], object]


def median_ms(run: Run, repeats: int = 30, warmup: int = 3) -> float:
    return interleaved_ms([run], repeats, warmup)[0]


def interleaved_ms(runs: Sequence[Run], repeats: int = 30, warmup: int = 3) -> list[float]:
    """Median milliseconds of each run, timed in turns (one call of each per round) so that a
    slow spell of a shared machine hits every run alike instead of whichever ran then."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    times: list[list[float]] = [[] for _ in runs]
    for k in range(repeats + warmup):
        for run, spent in zip(runs, times):
            start = time.perf_counter()
            run()
            if k >= warmup:
                spent.append(time.perf_counter() - start)
    return [statistics.median(spent) * 1e3 for spent in times]


def latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 30) -> float:
    """Median milliseconds of a PyTorch forward without autograd."""
    with torch.no_grad():
        return median_ms(lambda: model(example), repeats)


def onnx_session(
    model: nn.Module, inputs: Sequence[torch.Tensor], path: Path, threads: Optional[int] = None
) -> tuple[Any, dict[str, Any]]:
    """Export ``model`` to ``path`` and open it in ONNX Runtime: the session and its feed."""
    import onnxruntime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, tuple(inputs), str(path), dynamo=False, opset_version=17)
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options)
    feed = {spec.name: x.numpy() for spec, x in zip(session.get_inputs(), inputs)}
    return session, feed


def export_onnx(
    model: nn.Module, example: torch.Tensor, path: Path, repeats: int = 30
) -> dict[str, float]:
    """Export, then run ONNX Runtime on the same input: max abs difference and latency."""
    session, feed = onnx_session(model, [example], path)
    (out, *_) = session.run(None, feed)
    with torch.no_grad():
        reference = model(example)
    reference = reference[0] if isinstance(reference, (tuple, list)) else reference
    diff = float((torch.from_numpy(out) - reference).abs().max())
    return {"max_abs_diff": diff, "onnx_ms": median_ms(lambda: session.run(None, feed), repeats)}
