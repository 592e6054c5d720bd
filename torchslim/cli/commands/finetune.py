"""``torchslim finetune``: fine-tune a pruned model, on one process or many.

Two kinds of model: an image classifier (MODEL builds the architecture, PRUNED is the
``.safetensors`` that ``torchslim prune`` wrote) trained on a dataset, with optional BN-scale L1
regularisation (``pruner.regularize`` on the DDP model) for a further round of sparse training;
or a pruned Hugging Face causal language model (MODEL is its folder) healed on a text file by
:func:`torchslim.hf.heal`, optionally distilling from the dense model.

Under ``torchrun --nproc_per_node=N`` it joins the process group (gloo on CPU, NCCL on GPU),
wraps the model in ``DistributedDataParallel`` and gives each rank its shard of the training
data; rank 0 evaluates and writes the result.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch.distributed as dist
from torch import nn

import torchslim as tp
from torchslim.cli.commands.prune import hf_loader, save_hf_folder, text_blocks
from torchslim.cli.common import DATASETS, add_command, model_of, output_name
from torchslim.cli.datasets import accuracy, load_dataset
from torchslim.cli.models import hf_folder_of, load_model
from torchslim.cli.training import train_epoch

#: defaults of the options both kinds of model take, which differ between them
IMAGES = {"lr": 0.01, "batch_size": 64}
TEXT = {"lr": 5e-5, "batch_size": 2}
#: defaults of the options only an image classifier takes (``None``: not given)
IMAGE_ONLY = {"dataset": "digits", "data_dir": None, "epochs": 3, "bn_l1": 0.0}
#: token blocks per forward when the perplexity on --eval-text is measured
EVAL_BATCH = 8
#: the options only a language model takes
TEXT_ONLY = (
    "text",
    "teacher",
    "steps",
    "minutes",
    "autocast",
    "eval_text",
    "loss_plot",
    "checkpoint",
)


def register(commands: Any) -> None:
    sub = add_command(
        commands,
        "finetune",
        "Fine-tune a pruned checkpoint (MODEL builds the architecture) on a dataset, or heal a "
        "pruned Hugging Face language model (MODEL is its folder) on a text file; runs under "
        "torchrun.",
        run,
    )
    sub.add_argument(
        "pruned",
        type=Path,
        nargs="?",
        help="a .safetensors written by `torchslim prune` (not with a Hugging Face folder, which "
        "holds its own pruned weights)",
    )
    sub.add_argument(
        "--lr",
        type=float,
        help=f"learning rate (default: {IMAGES['lr']} on images, {TEXT['lr']} on text)",
    )
    sub.add_argument(
        "--batch-size",
        type=int,
        help=f"images or token blocks per step and process (default: {IMAGES['batch_size']} "
        f"on images, {TEXT['batch_size']} on text)",
    )
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument(
        "--out",
        type=Path,
        help="where to write the result: a .safetensors (images), or a directory that gets "
        "<model>/ by save_pretrained (a Hugging Face model)",
    )
    images = sub.add_argument_group("an image classifier")
    images.add_argument("--dataset", choices=DATASETS, help="training images (default: digits)")
    images.add_argument("--data-dir", type=Path, help="folder with the IDX files")
    images.add_argument("--epochs", type=int, help="passes over the training set (default: 3)")
    images.add_argument("--bn-l1", type=float, help="BN-scale L1 strength (default: 0, off)")
    text = sub.add_argument_group("a Hugging Face causal language model")
    text.add_argument("--text", type=Path, help="UTF-8 text to train on (the folder's tokenizer)")
    text.add_argument(
        "--teacher",
        help="the dense model's folder: distil from it (KL divergence of the next-token "
        "distributions) instead of training on the next-token loss",
    )
    text.add_argument("--steps", type=int, help="optimizer steps (with or instead of --minutes)")
    text.add_argument("--minutes", type=float, help="wall time to train for, at most")
    text.add_argument("--block-size", type=int, default=128, help="tokens per block")
    text.add_argument("--temperature", type=float, default=1.0, help="distillation temperature")
    text.add_argument(
        "--autocast",
        choices=("bf16",),
        help="forwards in bfloat16 mixed precision (fast on CPUs with AMX, slow without)",
    )
    text.add_argument(
        "--eval-text", type=Path, help="text whose perplexity is printed before/after"
    )
    text.add_argument("--loss-plot", type=Path, help="write the loss curve here (PNG)")
    text.add_argument(
        "--checkpoint",
        type=Path,
        help="a .safetensors (weights + pruning plan) written every --checkpoint-every steps; "
        "MODEL@CHECKPOINT resumes from it",
    )
    text.add_argument("--checkpoint-every", type=int, default=50)


def run(args: argparse.Namespace) -> int:
    model = model_of(args)
    language = tp.hf.is_hf_model(model)
    _check_arguments(args, model, language)
    defaults = TEXT if language else {**IMAGES, **IMAGE_ONLY}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    try:
        torch.manual_seed(args.seed)
        if language:
            _heal(args, model, rank, world)
        else:
            _train_images(args, model, rank, world)
        if distributed:
            # Ranks leave together: one that tears gloo down while rank 0 still evaluates and
            # writes can abort in gloo's shutdown.
            dist.barrier()
        return 0
    finally:
        if distributed:
            dist.destroy_process_group()


def _check_arguments(args: argparse.Namespace, model: nn.Module, language: bool) -> None:
    """What each kind of model needs, and what it does not take, as errors naming the flag."""
    if language:
        _refuse_given(
            args, IMAGE_ONLY, "for an image classifier; a language model trains on --text"
        )
        if args.pruned is not None:
            raise ValueError(
                f"MODEL is a Hugging Face folder, which holds its own pruned weights: drop "
                f"{args.pruned} (or start from it as MODEL@{args.pruned})"
            )
        if args.text is None:
            raise ValueError("give --text FILE: the UTF-8 text to heal the language model on")
        if args.steps is None and args.minutes is None:
            raise ValueError("give --steps N or --minutes M (or both): how long to train")
        if not callable(getattr(model, "can_generate", None)) or not model.can_generate():
            raise ValueError(
                f"healing on text needs a causal language model (a ...ForCausalLM); MODEL is a "
                f"{type(model).__name__}"
            )
        return
    _refuse_given(
        args,
        TEXT_ONLY,
        "for a Hugging Face language model (MODEL a folder); an image classifier trains on "
        "--dataset",
    )
    if args.pruned is None:
        raise ValueError("give PRUNED: the .safetensors that `torchslim prune` wrote for MODEL")


def _refuse_given(args: argparse.Namespace, names: Iterable[str], why: str) -> None:
    """An error naming those of the options ``names`` that were given, and ``why`` not."""
    given = [f"--{name.replace('_', '-')}" for name in names if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: {why}")


def _train_images(args: argparse.Namespace, model: nn.Module, rank: int, world: int) -> None:
    tp.load_pruned(model, args.pruned)
    (x, y), test = load_dataset(args.dataset, args.data_dir, args.seed)
    shard = torch.arange(rank, len(x), world)
    x, y = x[shard], y[shard]
    before = accuracy(model, test)
    pruner = tp.pruner.BNScalePruner(model, x[:1], reg=args.bn_l1) if args.bn_l1 else None
    trained = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    optimizer = torch.optim.SGD(trained.parameters(), lr=args.lr, momentum=0.9)
    regularize = (lambda: pruner.regularize(trained)) if pruner is not None else None
    for epoch in range(args.epochs):
        loss_sum, count = train_epoch(
            trained, (x, y), optimizer, epoch, args.batch_size, regularize
        )
        total = torch.tensor([loss_sum, float(count)])
        if world > 1:
            dist.all_reduce(total)
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}: loss {total[0] / total[1]:.4f}", flush=True)
    if rank == 0:
        after = accuracy(model, test)
        print(f"world size {world}; test accuracy {before:.4f} -> {after:.4f}")
        if args.out:
            tp.save_pruned(model, args.out)
            print(f"wrote {args.out}")
        else:
            print("nothing written: give --out FILE.safetensors to save the fine-tuned weights")


def _heal(args: argparse.Namespace, model: nn.Module, rank: int, world: int) -> None:
    spec = args.model.rpartition("@")[0] if "@" in args.model else args.model
    folder = hf_folder_of(spec)
    blocks = text_blocks(folder, str(args.text), None, args.block_size, option="--text")
    evaluation: Optional[torch.Tensor] = None
    if args.eval_text is not None:
        evaluation = text_blocks(folder, str(args.eval_text), None, args.block_size, "--eval-text")
    teacher = load_model(args.teacher) if args.teacher else None
    if teacher is not None and _vocabulary(teacher) != _vocabulary(model):
        raise ValueError(
            f"--teacher {args.teacher} predicts {_vocabulary(teacher)} tokens, MODEL "
            f"{_vocabulary(model)}: distillation needs the dense model MODEL was pruned from"
        )
    before = None
    if rank == 0:
        if evaluation is not None:
            before = tp.hf.perplexity(model, evaluation.split(EVAL_BATCH))
        source = f"distilling from {args.teacher}" if teacher is not None else "next-token loss"
        print(
            f"world size {world}; {len(blocks)} blocks of {args.block_size} tokens from "
            f"{args.text}, {source}",
            flush=True,
        )
    log = tp.hf.heal(
        model,
        blocks,
        teacher=teacher,
        steps=args.steps,
        minutes=args.minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        temperature=args.temperature,
        seed=args.seed,
        checkpoint=args.checkpoint,
        checkpoint_every=args.checkpoint_every,
        autocast=torch.bfloat16 if args.autocast == "bf16" else None,
    )
    if rank != 0:
        return
    losses = f"; loss {log.losses[0]:.4f} -> {log.losses[-1]:.4f}" if log.losses else ""
    print(
        f"{len(log.losses)} steps in {log.seconds:.0f} s (stopped by {log.stopped_by}), "
        f"{log.tokens} tokens{losses}"
    )
    if evaluation is not None:
        after = tp.hf.perplexity(model, evaluation.split(EVAL_BATCH))
        print(f"perplexity on {args.eval_text}: {before:.2f} -> {after:.2f}")
    if args.loss_plot is not None:
        log.plot(args.loss_plot)
        print(f"wrote {args.loss_plot}")
    if args.checkpoint is not None:
        print(f"wrote {args.checkpoint}")
    if args.out:
        written = save_hf_folder(model, args.out / output_name(spec), folder)
        print(f"wrote {written}/ (save_pretrained; {hf_loader(model)} loads it)")
    else:
        print("nothing written: give --out DIR to save the healed model")


def _vocabulary(model: nn.Module) -> int:
    """How many tokens a causal language model's head scores."""
    return model.get_output_embeddings().weight.shape[0]
