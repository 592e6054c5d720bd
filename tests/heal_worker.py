"""Run by tests/test_heal.py under ``torchrun --nproc_per_node=2``: heal a tiny pruned Llama
with DistributedDataParallel over gloo and write what each rank ends with."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist

import torchslim as tp
from torchslim.hf.heal import heal


def main(out: str) -> None:
    import transformers

    dist.init_process_group("gloo")
    config = transformers.LlamaConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
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
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
