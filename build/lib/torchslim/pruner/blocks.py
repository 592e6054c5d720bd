"""Removing whole residual blocks (depth pruning: ShortGPT / SLEB-style).

:func:`prune_blocks` traces the model, takes the blocks the graph finds removable (children of
a ``ModuleList`` / ``Sequential`` on the residual stream, see :mod:`torchslim.graph.blocks`),
scores them on calibration data and deletes the lowest. Scores are the cost of removing a
block:

- ``"influence"`` (default): ShortGPT's block influence, the mean over positions of
  ``1 - cos(input, output)`` across the channels, on the calibration batches: a block whose
  output is nearly its input changes little;
- ``"random"``: a seeded random order (the baseline);
- a callable ``loss(model) -> float`` (e.g. perplexity on held-out text): measured with each
  block skipped in turn, the model otherwise whole.

The removal is recorded in the model's pruning history (``tp.save_pruned`` / ``load_pruned`` /
``apply_plan`` replay it), and a Hugging Face config follows (``num_hidden_layers``, per-layer
lists such as ``layer_types``; each layer's ``layer_idx``, its KV-cache slot, is renumbered).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from torchslim.capture.modules import call_forward, forwards_replaced, untouched
from torchslim.graph.blocks import Block
from torchslim.graph.dependency import DependencyGraph
from torchslim.graph.hooks import run_prune_hooks
from torchslim.graph.record import model_history
from torchslim.pruning.blocks import remove_blocks
from torchslim.pruning.roles import Role
from torchslim.spaces.trace import first_tensor

Loss = Callable[[nn.Module], float]
CRITERIA = ("influence", "random")


@dataclass
class BlockPruning:
    """What :func:`prune_blocks` did: the blocks removed (their names before removal), the
    score of every removable block (the cost of removing it), and why the others stay."""

    removed: list[str]
    scores: dict[str, float]
    kept_whole: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"removed {len(self.removed)} of {len(self.scores)} removable blocks"]
        lines += [
            f"  {name}: {score:.4g}{'  (removed)' if name in self.removed else ''}"
            for name, score in self.scores.items()
        ]
        lines += [f"  {name}: kept ({why})" for name, why in self.kept_whole.items()]
        return "\n".join(lines)


def prune_blocks(
    model: nn.Module,
    example_inputs: Any,
    n: Optional[int] = None,
    ratio: Optional[float] = None,
    importance: Union[str, Loss] = "influence",
    calibration: Optional[Iterable[Any]] = None,
    forward_fn: Optional[Callable[[nn.Module, Any], Any]] = None,
    ignored_blocks: Iterable[nn.Module] = (),
    seed: int = 0,
) -> BlockPruning:
    """Remove ``n`` whole residual blocks (or ``ratio`` of the removable ones), those whose
    removal costs least by ``importance`` on ``calibration`` batches (inputs in the form
    ``example_inputs`` takes; ``example_inputs`` itself when ``None``).

    Raises ``ValueError`` naming the reasons when fewer blocks can be removed than asked; the
    model is left untouched then."""
    if (n is None) == (ratio is None):
        raise ValueError("give exactly one of n (a number of blocks) or ratio")
    if isinstance(importance, str) and importance not in CRITERIA:
        raise ValueError(f"importance must be one of {CRITERIA} or a callable, got {importance!r}")
    graph = DependencyGraph().build_dependency(
        model, example_inputs, forward_fn=forward_fn, verbose=False
    )
    ignored = {id(m) for m in ignored_blocks}
    candidates = [b for b in graph.blocks if b.removable and id(b.module) not in ignored]
    chosen_ids = {id(b) for b in candidates}
    kept_whole = {b.name: b.reason or "ignored" for b in graph.blocks if id(b) not in chosen_ids}
    count = n if n is not None else math.floor(_ratio(ratio) * len(candidates))
    if count < 0:
        raise ValueError(f"n must be at least 0, got {n}")
    if count > len(candidates):
        reasons = "; ".join(f"{name}: {why}" for name, why in list(kept_whole.items())[:4])
        raise ValueError(
            f"asked to remove {count} blocks, but only {len(candidates)} can be removed"
            + (f" (the others: {reasons})" if reasons else "")
        )
    batches = list(calibration) if calibration is not None else [example_inputs]
    if not batches:
        raise ValueError("calibration holds no batch")
    scores = _scores(model, candidates, importance, batches, forward_fn, seed)
    order = sorted(candidates, key=lambda b: (scores[b.name], b.name))
    chosen = order[:count]
    _remove(model, graph, chosen)
    return BlockPruning([b.name for b in chosen], scores, kept_whole)


def _ratio(ratio: Optional[float]) -> float:
    if ratio is None or not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    return ratio


def _scores(
    model: nn.Module,
    blocks: Sequence[Block],
    importance: Union[str, Loss],
    batches: list[Any],
    forward_fn: Optional[Callable[[nn.Module, Any], Any]],
    seed: int,
) -> dict[str, float]:
    if importance == "random":
        generator = torch.Generator().manual_seed(seed)
        values = torch.rand(len(blocks), generator=generator).tolist()
        return {b.name: v for b, v in zip(blocks, values)}
    if callable(importance):
        scores = {}
        for block in blocks:
            with _skipped(block.module):
                scores[block.name] = float(importance(model))
        return scores
    return _influence(model, blocks, batches, forward_fn)


@torch.no_grad()
def _influence(
    model: nn.Module,
    blocks: Sequence[Block],
    batches: list[Any],
    forward_fn: Optional[Callable[[nn.Module, Any], Any]],
) -> dict[str, float]:
    """Mean ``1 - cos(input, output)`` of each block over the positions of the batches."""
    totals = {b.name: [0.0, 0] for b in blocks}

    def hook(block: Block):
        def record(_module, args, kwargs, output):
            x, y = first_tensor((args, kwargs)), first_tensor(output)
            dims = block.channel_dims or [x.dim() - 1]
            x, y = (t.double().movedim(dims, list(range(-len(dims), 0))) for t in (x, y))
            x, y = (t.reshape(-1, math.prod(t.shape[-len(dims) :])) for t in (x, y))
            cosine = nn.functional.cosine_similarity(x, y, dim=-1)
            totals[block.name][0] += float((1 - cosine).sum())
            totals[block.name][1] += cosine.numel()

        return record

    handles = [b.module.register_forward_hook(hook(b), with_kwargs=True) for b in blocks]
    try:
        with untouched(model):
            for batch in batches:
                call_forward(model, batch, forward_fn)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / max(count, 1) for name, (total, count) in totals.items()}


def _skipped(module: nn.Module) -> Any:
    """Inside the block, ``module`` returns its first tensor input unchanged (its own output
    was a tensor: see :mod:`torchslim.graph.blocks`)."""
    return forwards_replaced({module: lambda *args, **kwargs: first_tensor((args, kwargs))})


def _remove(model: nn.Module, graph: DependencyGraph, blocks: Sequence[Block]) -> None:
    """Remove the blocks, record them in the pruning history and tell the prune hooks (a
    Hugging Face config follows); if the model's forward then fails, put everything back and
    raise naming the failure."""
    by_container: dict[str, list[int]] = {}
    for block in blocks:
        by_container.setdefault(block.container, []).append(block.index)
    history = model_history(model)
    recorded = len(history)
    undo = []
    # inner containers first: removing an outer block renames what is inside later ones
    for name, idxs in sorted(by_container.items(), key=lambda item: -item[0].count(".")):
        container, idxs = model.get_submodule(name), sorted(idxs)
        label = name or "<model>"
        op = {"module": label, "role": Role.BLOCKS.value, "idxs": idxs, "of": len(container)}
        undo.append(remove_blocks(container, idxs))
        history.append({"group": f"blocks of {name}", "idxs": idxs, "ops": [op]})
    if not blocks:
        return
    run_prune_hooks(model)
    failure = graph.forward_check.failure() if graph.forward_check is not None else None
    if failure is not None:
        for restore in reversed(undo):
            restore()
        del history[recorded:]
        run_prune_hooks(model)
        removed = ", ".join(b.name for b in blocks)
        raise ValueError(f"removing {removed} breaks the model ({failure}); it is left whole")
