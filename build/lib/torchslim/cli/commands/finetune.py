"""``torchslim finetune``: fine-tune a pruned checkpoint, on one process or many.

Under ``torchrun --nproc_per_node=N`` it joins the process group (gloo on CPU, NCCL on GPU),
wraps the model in ``DistributedDataParallel`` and gives each rank its shard of the training
set; rank 0 evaluates and writes the result. ``--bn-l1`` adds BN-scale L1 regularisation
(``pruner.regularize`` on the DDP model) for a further round of sparse training.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import torchslim as tp
from torchslim.cli.common import DATASETS, add_command, model_of
from torchslim.cli.datasets import accuracy, load_dataset
from torchslim.cli.training import train_epoch


def register(commands: Any) -> None:
    sub = add_command(
        commands,
        "finetune",
        "Fine-tune a pruned checkpoint (MODEL builds the architecture); runs under torchrun.",
        run,
    )
    sub.add_argument("pruned", type=Path, help="a .safetensors written by `torchslim prune`")
    sub.add_argument("--dataset", choices=DATASETS, default="digits")
    sub.add_argument("--data-dir", type=Path, help="folder with the IDX files")
    sub.add_argument("--epochs", type=int, default=3)
    sub.add_argument("--lr", type=float, default=0.01)
    sub.add_argument("--batch-size", type=int, default=64)
    sub.add_argument("--bn-l1", type=float, default=0.0, help="BN-scale L1 strength (0: off)")
    sub.add_argument("--seed", type=int, default=0)
    sub.add_argument("--out", type=Path, help="where to write the fine-tuned .safetensors")


def run(args: argparse.Namespace) -> int:
    model = model_of(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    distributed = world > 1
    if distributed:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank = dist.get_rank() if distributed else 0
    trained: nn.Module = model
    try:
        torch.manual_seed(args.seed)
        tp.load_pruned(model, args.pruned)
        (x, y), test = load_dataset(args.dataset, args.data_dir, args.seed)
        shard = torch.arange(rank, len(x), world)
        x, y = x[shard], y[shard]
        before = accuracy(model, test)
        pruner = tp.pruner.BNScalePruner(model, x[:1], reg=args.bn_l1) if args.bn_l1 else None
        trained = nn.parallel.DistributedDataParallel(model) if distributed else model
        optimizer = torch.optim.SGD(trained.parameters(), lr=args.lr, momentum=0.9)
        regularize = (lambda: pruner.regularize(trained)) if pruner is not None else None
        for epoch in range(args.epochs):
            loss_sum, count = train_epoch(
                trained, (x, y), optimizer, epoch, args.batch_size, regularize
            )
            total = torch.tensor([loss_sum, float(count)])
            if distributed:
                dist.all_reduce(total)
            if rank == 0:
                print(
                    f"epoch {epoch + 1}/{args.epochs}: loss {total[0] / total[1]:.4f}", flush=True
                )
        if rank == 0:
            after = accuracy(model, test)
            print(f"world size {world}; test accuracy {before:.4f} -> {after:.4f}")
            if args.out:
                tp.save_pruned(model, args.out)
                print(f"wrote {args.out}")
        if distributed:
            # Ranks leave together: one that tears gloo down while rank 0 still evaluates and
            # writes can abort in gloo's shutdown.
            dist.barrier()
        return 0
    finally:
        if distributed:
            del trained  # our reference to the DDP wrapper, which uses the process group
            dist.destroy_process_group()
