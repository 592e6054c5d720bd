"""Healing: a short fine-tune of a pruned causal language model on text, optionally distilling
from the dense model (KL divergence between their next-token distributions).

Runs as it is on one process, and under ``torchrun`` with ``torch.distributed`` initialised
(gloo on CPU, NCCL on GPU): the model is wrapped in ``DistributedDataParallel`` and each rank
trains on its own share of the blocks. Checkpoints are written atomically.
"""

from __future__ import annotations

import math
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
import torch.distributed as dist
from torch import nn
from torch.autograd.function import once_differentiable

from torchslim.persistence import save_pruned
from torchslim.utils.hardware import native_bfloat16


@dataclass
class HealingLog:
    """Loss per optimizer step, and how the run ended."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    stopped_by: str = "steps"

    def plot(self, path: Union[str, Path]) -> None:
        """The loss curve as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 3.5))
        axis.plot(range(1, len(self.losses) + 1), self.losses)
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.set_title("healing")
        figure.tight_layout()
        figure.savefig(path, dpi=120)
        plt.close(figure)


def distillation_loss(
    logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """``KL(teacher || student)`` per token, on softened distributions, times ``T^2``; the
    teacher's logits are a target (no gradient reaches them).

    Computed in float32 over chunks of tokens small enough to stay in cache, with the gradient
    (``T * (softmax(student / T) - softmax(teacher / T)) / tokens``) written in the same pass:
    a vocabulary-wide softmax of every token done as whole-tensor operations reads and writes
    the ``[tokens, vocabulary]`` logits a dozen times (a SmolLM2-135M healing step in bfloat16
    took 1.2-1.3x as long). Where the two models agree to about ``1e-6`` the float32 value is
    dominated by rounding; the gradient is not. Differentiable once."""
    if logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {list(logits.shape)} and teacher logits "
            f"{list(teacher_logits.shape)} differ in shape"
        )
    wanted = torch.is_grad_enabled() and logits.requires_grad
    return _ChunkedKL.apply(logits, teacher_logits.detach(), float(temperature), wanted)


class _ChunkedKL(torch.autograd.Function):
    """The distillation loss with its gradient computed in the forward, chunk by chunk: one
    exponential per logit of each model, ``KL = sum p_t (t - s) - lse(t) + lse(s)`` on the
    softened logits ``s``, ``t``. The gradient is kept in the logits' dtype, but in float32
    for float16 logits, whose range a loss scale (``GradScaler``'s 65536) would overflow."""

    @staticmethod
    def forward(
        ctx: Any, logits: torch.Tensor, teacher: torch.Tensor, t: float, wanted: bool
    ) -> torch.Tensor:
        width = logits.shape[-1]
        student_rows, teacher_rows = logits.reshape(-1, width), teacher.reshape(-1, width)
        rows = max(len(student_rows), 1)
        kept = torch.float32 if logits.dtype == torch.float16 else logits.dtype
        gradient = torch.empty_like(student_rows, dtype=kept) if wanted else None
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        step = 16 if logits.device.type == "cpu" else 4096  # fewer launches on accelerators
        for start in range(0, len(student_rows), step):
            chunk = slice(start, start + step)
            student, student_probs, student_lse = _softmax(student_rows[chunk], t)
            teacher_soft, teacher_probs, teacher_lse = _softmax(teacher_rows[chunk], t)
            kl = (teacher_probs * (teacher_soft - student)).sum(-1) - teacher_lse + student_lse
            total += kl.sum()
            if gradient is not None:
                gradient[chunk] = student_probs.sub_(teacher_probs).mul_(t / rows)
        ctx.save_for_backward(gradient)
        ctx.shape, ctx.dtype = logits.shape, logits.dtype
        return total * (t * t / rows)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        (gradient,) = ctx.saved_tensors
        scaled = gradient * grad_output.to(gradient.dtype)
        return scaled.to(ctx.dtype).view(ctx.shape), None, None, None


def _softmax(rows: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``rows / t`` in float32, its softmax and its log-sum-exp, with one exponential."""
    soft = rows.float() if t == 1.0 else rows.float() / t
    peak = soft.amax(-1, keepdim=True)
    probs = (soft - peak).exp_()
    norm = probs.sum(-1, keepdim=True)
    return soft, probs.div_(norm), (peak + norm.log()).squeeze(-1)


def heal(
    model: nn.Module,
    blocks: torch.Tensor,
    teacher: Optional[nn.Module] = None,
    steps: Optional[int] = None,
    minutes: Optional[float] = None,
    batch_size: int = 2,
    lr: float = 5e-5,
    temperature: float = 1.0,
    seed: int = 0,
    checkpoint: Union[None, str, Path] = None,
    checkpoint_every: int = 50,
    show_progress: bool = True,
    autocast: Optional[torch.dtype] = None,
) -> HealingLog:
    """Fine-tune ``model`` (a causal LM) on token ``blocks`` (``[n, block_size]``, see
    :func:`torchslim.hf.text.token_blocks`) for ``steps`` optimizer steps or ``minutes`` of
    wall time, whichever comes first (at least one is required). With ``teacher`` the loss is
    the distillation loss against it, else next-token cross-entropy. AdamW with a linear
    warm-down to zero over the steps or the minutes (whichever is further along); gradients
    clipped to norm 1. ``checkpoint``: a ``.safetensors`` path written
    (atomically, with the pruning plan, see :func:`torchslim.save_pruned`) every
    ``checkpoint_every`` steps and at the end. ``autocast=torch.bfloat16``: run the forwards
    (the teacher's too) under ``torch.autocast`` in bfloat16: mixed precision, the weights and
    optimizer state stay as they are; on CPUs with AMX, bfloat16 matrix products are about 4x
    faster than float32 ones (the loss is computed in float32); on CPUs without bfloat16
    matrix units it is much slower, and a warning says so."""
    if steps is None and minutes is None:
        raise ValueError("heal needs steps= or minutes= (or both) to know when to stop")
    if steps is not None and (not isinstance(steps, int) or steps < 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if minutes is not None and minutes <= 0:
        raise ValueError(f"minutes must be positive, got {minutes!r}")
    if blocks.dim() != 2 or blocks.dtype not in (torch.int64, torch.int32) or len(blocks) < 1:
        raise ValueError(
            f"blocks must be a [n, block_size] tensor of token ids, got {blocks.dtype} "
            f"{list(blocks.shape)}"
        )
    if autocast is not None and autocast is not torch.bfloat16:
        raise ValueError(
            f"autocast must be torch.bfloat16 (mixed precision) or None, got {autocast!r}"
        )
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    shard = blocks[rank::world]
    if not len(shard):
        raise ValueError(f"rank {rank} has no block to train on: give at least {world} blocks")
    trained = model
    if world > 1:
        trained = nn.parallel.DistributedDataParallel(model)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0, fused=_fusable(parameters))
    generator = torch.Generator().manual_seed(seed + rank)
    total = steps if steps is not None else math.inf
    seconds = minutes * 60 if minutes is not None else math.inf
    device = parameters[0].device if parameters else torch.device("cpu")
    if autocast is not None and device.type == "cpu" and not native_bfloat16():
        warnings.warn(
            "autocast=torch.bfloat16 on a CPU without bfloat16 matrix units (AMX or "
            "AVX512-BF16): slower than float32 here (a SmolLM2-135M step took over 6x as long "
            "on an AVX2-only CPU); leave autocast off",
            stacklevel=2,
        )
    log = HealingLog()
    began = time.monotonic()
    bar = _progress(steps, show_progress and rank == 0)
    if teacher is not None:
        teacher.eval()
    model.train()
    step = 0
    try:
        while step < total:
            elapsed = _elapsed(began, world, device, minutes is not None)
            if elapsed >= seconds:
                log.stopped_by = "minutes"
                break
            batch = shard[torch.randint(0, len(shard), (batch_size,), generator=generator)]
            fraction = max(step / total, elapsed / seconds)
            for group in optimizer.param_groups:
                group["lr"] = lr * (1.0 - fraction)
            with _mixed(device, autocast):
                logits = trained(input_ids=batch, use_cache=False).logits
                target = None
                if teacher is not None:
                    with torch.no_grad():
                        target = teacher(input_ids=batch, use_cache=False).logits
            if target is not None:
                loss = distillation_loss(logits, target, temperature)
            else:
                shifted = logits[:, :-1].float()
                loss = nn.functional.cross_entropy(
                    shifted.reshape(-1, shifted.shape[-1]), batch[:, 1:].reshape(-1)
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            step += 1
            value = float(loss.detach())
            log.losses.append(value)
            log.tokens += batch.numel() * world
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3f}")
            if checkpoint is not None and rank == 0 and step % checkpoint_every == 0:
                save_pruned(model, checkpoint)
    finally:
        if bar is not None:
            bar.close()
        optimizer.zero_grad(set_to_none=True)
        model.eval()
    log.seconds = time.monotonic() - began
    if checkpoint is not None and rank == 0:
        save_pruned(model, checkpoint)
    return log


def _mixed(device: torch.device, dtype: Optional[torch.dtype]) -> Any:
    """``torch.autocast`` in ``dtype`` on the device's type, or nothing."""
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def _fusable(parameters: list[nn.Parameter]) -> bool:
    """Whether AdamW's fused kernel takes these parameters (about 4x faster than the loop
    over tensors on CPU; CPU tensors from torch 2.4 on)."""
    devices = ("cpu", "cuda") if torch.__version__ >= "2.4" else ("cuda",)
    return bool(parameters) and all(
        p.is_floating_point() and p.device.type in devices for p in parameters
    )


def _elapsed(began: float, world: int, device: torch.device, timed: bool) -> float:
    """Seconds since ``began``; in a ``timed`` run under ``torch.distributed`` the largest over
    the ranks, so every rank decays its learning rate alike and stops at the same step."""
    elapsed = time.monotonic() - began
    if world == 1 or not timed:
        return elapsed
    value = torch.tensor([elapsed], dtype=torch.float64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return float(value)


def _progress(steps: Optional[int], show: bool) -> Any:
    if not show:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=steps, desc="healing", unit="step")
