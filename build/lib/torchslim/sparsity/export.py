"""CPU sparse storage for sparse weights: CSR Linear weights (``F.linear`` accepts them)."""

from __future__ import annotations

import warnings

import torch
from torch import nn


def to_sparse_csr(model: nn.Module, min_sparsity: float = 0.5) -> list[str]:
    """Store the weight of every ``nn.Linear`` at least ``min_sparsity`` zero as a CSR tensor
    (inference only: the weight no longer requires grad). Returns the converted layer names.

    Whether this is faster depends on sparsity, shapes and the CPU: measure it (see
    ``benchmarks/sparsity_mnist.py``) before shipping."""
    if not 0.0 <= min_sparsity <= 1.0:
        raise ValueError(f"min_sparsity must be in [0, 1], got {min_sparsity}")
    converted = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or module.weight.layout != torch.strided:
                continue
            weight = module.weight.detach()
            zeros = 1.0 - int(torch.count_nonzero(weight)) / weight.numel()
            if zeros >= min_sparsity:
                module.weight = nn.Parameter(weight.to_sparse_csr(), requires_grad=False)
                converted.append(name)
    return converted
