"""Where latency is measured: PyTorch on CPU, ONNX Runtime on CPU, or PyTorch on CUDA.

Models (or single layers, for rounding) are timed in turns, one call of each per round, and the
median is kept: on a shared machine a slow spell then hits every candidate alike.
"""

from __future__ import annotations

import copy
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from torchslim.search.timings import TimingTable, job_key
from torchslim.utils.latency import interleaved_ms, onnx_session

RUNTIMES = ("torch", "onnxruntime", "cuda")
Job = tuple[nn.Module, tuple[torch.Tensor, ...]]


class Runtime:
    """Times modules on one runtime. ``threads`` pins the CPU threads (``None``: the runtime's
    default); ``repeats`` timed calls per module after ``warmup`` calls. With ``timings`` (a
    :class:`TimingTable` or its file), what was timed before is not timed again: its stored
    time is used, so reruns decide from the same numbers."""

    def __init__(
        self,
        name: str = "torch",
        threads: Optional[int] = None,
        repeats: int = 20,
        warmup: int = 3,
        timings: Union[None, str, Path, TimingTable] = None,
    ) -> None:
        if name not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {name!r}")
        if name == "cuda" and not torch.cuda.is_available():
            raise ValueError("runtime 'cuda' needs a CUDA device; this machine has none")
        if name == "onnxruntime":
            import onnxruntime  # noqa: F401  (a clear ImportError now, not mid-search)
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        if repeats < 1 or warmup < 0:
            raise ValueError("repeats must be >= 1 and warmup >= 0")
        self.name, self.threads, self.repeats, self.warmup = name, threads, repeats, warmup
        self.timings = TimingTable(timings) if isinstance(timings, (str, Path)) else timings

    def __str__(self) -> str:
        device = "CUDA" if self.name == "cuda" else "CPU"
        threads = f", {self.threads} thread(s)" if self.threads else ""
        return f"{'PyTorch' if self.name != 'onnxruntime' else 'ONNX Runtime'} {device}{threads}"

    def time(self, jobs: Sequence[Job]) -> list[float]:
        """Median milliseconds of each ``module(*inputs)``, timed in turns (only the jobs the
        timing table does not hold yet)."""
        if self.timings is None:
            return self._measure(jobs)
        threads = self.threads or torch.get_num_threads()
        keys = [job_key(f"{self}; {threads}", m, x, self.repeats, self.warmup) for m, x in jobs]
        missing = {key: job for key, job in zip(keys, jobs) if key not in self.timings}
        self.timings.update(dict(zip(missing, self._measure(list(missing.values())))))
        return [self.timings[key] for key in keys]

    def _measure(self, jobs: Sequence[Job]) -> list[float]:
        if not jobs:
            return []
        with self._threads(), self._runners(jobs) as runs:
            return interleaved_ms(runs, self.repeats, self.warmup)

    def time_models(self, models: Sequence[nn.Module], example_inputs: Any) -> list[float]:
        inputs = as_tensors(example_inputs)
        return self.time([(model.eval(), inputs) for model in models])

    @contextmanager
    def _threads(self) -> Iterator[None]:
        before = torch.get_num_threads()
        if self.threads is not None and self.name != "onnxruntime":
            torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    @contextmanager
    def _runners(self, jobs: Sequence[Job]) -> Iterator[list[Callable[[], object]]]:
        with ExitStack() as stack:
            stack.enter_context(torch.no_grad())
            if self.name == "onnxruntime":
                folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
                yield [self._onnx(job, folder / f"m{k}.onnx") for k, job in enumerate(jobs)]
            elif self.name == "cuda":
                yield [_cuda(job) for job in jobs]
            else:
                yield [_bind(module, inputs) for module, inputs in jobs]

    def _onnx(self, job: Job, path: Path) -> Callable[[], object]:
        module, inputs = job
        session, feed = onnx_session(module, inputs, path, self.threads)
        return lambda: session.run(None, feed)


def _bind(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> Callable[[], object]:
    return lambda: module(*inputs)


def _cuda(job: Job) -> Callable[[], object]:
    module, inputs = job
    module = copy.deepcopy(module).cuda()
    inputs = tuple(x.cuda() for x in inputs)

    def run() -> None:
        module(*inputs)
        torch.cuda.synchronize()

    return run


def as_tensors(example_inputs: Any) -> tuple[torch.Tensor, ...]:
    """Example inputs as a tuple of tensors (latency is measured on positional tensors)."""
    inputs = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise ValueError("latency is measured on a tensor or a tuple of tensors as example inputs")
    return tuple(inputs)
