"""Unstructured and N:M sparsity: masks that hold through training, then baked in."""

from torchslim.sparsity.export import to_sparse_csr
from torchslim.sparsity.masks import MaskSet, sparsity
from torchslim.sparsity.nm import (
    NMSparsifier,
    check_nm,
    nm_mask,
    satisfies_nm,
    to_semi_structured,
)
from torchslim.sparsity.unstructured import (
    GMPUnstructuredPruner,
    UnstructuredPruner,
    default_skip_params,
)

__all__ = [
    "GMPUnstructuredPruner",
    "MaskSet",
    "NMSparsifier",
    "UnstructuredPruner",
    "check_nm",
    "default_skip_params",
    "nm_mask",
    "satisfies_nm",
    "sparsity",
    "to_semi_structured",
    "to_sparse_csr",
]
