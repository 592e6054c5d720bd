"""Shape-only answers on ``meta`` match what the ops' own meta kernels give, and leave to the
kernels every call whose arguments they would reject."""

import pytest
import torch
import torch.nn.functional as F

from torchslim.capture.shortcuts import shortcut


def meta(*shape, **kwargs):
    return torch.empty(*shape, device="meta", **kwargs)


X = meta(2, 4, 5, 5)
LAST = meta(2, 4, 5, 5).to(memory_format=torch.channels_last)
V4, V8 = meta(4), meta(8)
ANSWERED = [
    (F.batch_norm, (X, V4, V4, V4, V4), {}),
    (F.batch_norm, (LAST, V4, V4), {"training": False}),
    (F.batch_norm, (X, None, None), {"training": True}),
    (F.layer_norm, (meta(2, 3, 8), (8,), V8, V8), {}),
    (F.group_norm, (X, 2, V4, V4), {}),
    (F.relu, (X,), {}),
    (F.relu, (X,), {"inplace": True}),
    (F.hardtanh, (LAST, -1.0, 1.0, True), {}),
    (F.leaky_relu, (X, 0.1), {}),
    (F.gelu, (X,), {"approximate": "tanh"}),
    (torch.sigmoid, (meta(3, 2, dtype=torch.bfloat16),), {}),
    (torch.add, (X, X), {"alpha": 2}),
    (torch.Tensor.__mul__, (X, 0.5), {}),
    (torch.Tensor.__add__, (meta(3, dtype=torch.long), 2), {}),
    (torch.Tensor.add_, (LAST, LAST), {}),
]


@pytest.mark.parametrize(("func", "args", "kwargs"), ANSWERED)
def test_a_shape_only_answer_is_what_the_meta_kernel_gives(func, args, kwargs):
    answer = shortcut(func, args, kwargs)
    kernel = func(*args, **kwargs)
    assert answer is not None
    assert (answer.shape, answer.dtype, answer.stride()) == (
        kernel.shape,
        kernel.dtype,
        kernel.stride(),
    )
    assert answer.is_meta and (answer is args[0]) == (kernel is args[0])


LEFT_TO_THE_KERNEL = [
    (F.batch_norm, (X, V8, V8), {}),  # statistics of another size: the kernel raises
    (F.batch_norm, (meta(1, 4, 1, 1), None, None), {"training": True}),  # 1 value per channel
    (F.batch_norm, (X, None, None), {"training": True, "eps": 0.0}),  # eps must be > 0
    (F.batch_norm, (X, V4, V4), {"eps": -1.0}),  # eps must be >= 0
    (F.batch_norm, (X, None, None), {}),  # eval mode needs running statistics
    (F.layer_norm, (meta(2, 3, 8), (4,)), {}),
    (F.group_norm, (X, 3), {}),
    (torch.add, (X, meta(4, 1, 1)), {}),  # broadcasting
    (torch.add, (X, LAST), {}),  # other strides
    (torch.Tensor.__mul__, (meta(3, dtype=torch.long), 0.5), {}),  # promotes to float
    (torch.relu, (torch.zeros(3),), {}),  # a real tensor
    (F.relu, (X,), {"out": X}),
]


@pytest.mark.parametrize(("func", "args", "kwargs"), LEFT_TO_THE_KERNEL)
def test_calls_the_table_cannot_answer_run_their_kernel(func, args, kwargs):
    assert shortcut(func, args, kwargs) is None


@pytest.mark.parametrize(
    ("func", "args", "kwargs"), [case for case in LEFT_TO_THE_KERNEL if case[0] is F.batch_norm]
)
def test_the_batch_norms_left_to_the_kernel_are_those_it_refuses(func, args, kwargs):
    with pytest.raises((ValueError, RuntimeError)):
        func(*args, **kwargs)
