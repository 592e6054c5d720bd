"""Latency measurements shared by the demo and ``torchslim bench``: PyTorch CPU and ONNX
Runtime, median of repeated runs after warm-up."""

from __future__ import annotations

import statistics
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn


def median_ms(run: Callable[[], object], repeats: int = 30, warmup: int = 3) -> float:
    runs = []
    for k in range(repeats + warmup):
        start = time.perf_counter()
        run()
        if k >= warmup:
            runs.append(time.perf_counter() - start)
    return statistics.median(runs) * 1e3


def latency_ms(model: nn.Module, example: torch.Tensor, repeats: int = 30) -> float:
    """Median milliseconds of a PyTorch forward without autograd."""
    with torch.no_grad():
        return median_ms(lambda: model(example), repeats)


def export_onnx(
    model: nn.Module, example: torch.Tensor, path: Path, repeats: int = 30
) -> dict[str, float]:
    """Export, then run ONNX Runtime on the same input: max abs difference and latency."""
    import onnxruntime

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(path), dynamo=False, opset_version=17)
    session = onnxruntime.InferenceSession(str(path))
    feed = {session.get_inputs()[0].name: example.numpy()}
    (out, *_) = session.run(None, feed)
    with torch.no_grad():
        reference = model(example)
    reference = reference[0] if isinstance(reference, (tuple, list)) else reference
    diff = float((torch.from_numpy(out) - reference).abs().max())
    return {"max_abs_diff": diff, "onnx_ms": median_ms(lambda: session.run(None, feed), repeats)}
