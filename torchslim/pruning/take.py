"""``index_select`` at memory speed for the strided case pruning hits most: keeping the input
channels of a weight gathers along a dim other than the first, which PyTorch's CPU kernel
does element by element (about 5 ns each for bfloat16; minutes for an 8B model). NumPy's
``take`` on the same bytes viewed as integers of the item's width copies whole rows of
kept runs and is about 3x faster; the bits are copied unchanged, so the result is identical."""

from __future__ import annotations

import numpy as np
import torch

#: integer dtypes of each item size: the bytes of any tensor of that width, as NumPy takes them
_SAME_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def take(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``tensor.detach().index_select(dim, index)``, contiguous, without autograd history."""
    tensor = tensor.detach()
    width = _SAME_WIDTH.get(tensor.element_size())
    if dim % max(tensor.dim(), 1) == 0 or tensor.device.type != "cpu" or width is None:
        return tensor.index_select(dim, index)
    if tensor.is_complex() or tensor.is_conj() or tensor.is_neg():
        return tensor.index_select(dim, index)
    data = np.take(tensor.view(width).numpy(), index.cpu().numpy(), axis=dim)
    return torch.from_numpy(np.ascontiguousarray(data)).view(tensor.dtype)
