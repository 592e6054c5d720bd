"""Run by tests/test_heal.py under ``torchrun --nproc_per_node=2``: heal a tiny pruned Llama
with DistributedDataParallel over gloo and write what each rank ends with."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torchslim as tp  # noqa: E402
from tests.helpers import tiny_llama  # noqa: E402
from torchslim.hf.heal import heal  # noqa: E402


def main(out: str) -> None:
    dist.init_process_group("gloo")
    model = tiny_llama(layers=2)
    blocks = torch.randint(0, 97, (8, 16), generator=torch.Generator().manual_seed(0))
    tp.pruner.MetaPruner(
        model,
        blocks[:1],
        importance=tp.importance.RandomImportance(),
        pruning_ratio=0.0,
        pruning_ratio_dict={"neurons": 0.25},
    ).step()
    log = heal(model, blocks, steps=4, lr=1e-3, checkpoint=f"{out}/healed.safetensors")
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.save({"params": flat, "tokens": log.tokens}, f"{out}/rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
