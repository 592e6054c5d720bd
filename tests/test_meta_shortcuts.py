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
#: N x C x 1 x 1 with channels-last strides: ``is_contiguous`` yet the kernels keep the format
SQUARE_LAST = torch.empty_strided((2, 4, 1, 1), (4, 1, 4, 4), device="meta")
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
    (torch.add, (X, meta(4, 1, 1)), {}),  # broadcasting, contiguous operands
    (torch.Tensor.__mul__, (meta(2, 4, 1, 1), X), {}),  # the second operand has the shape
    (torch.Tensor.mul_, (X, meta(2, 4, 1, 1)), {}),
    (F.linear, (meta(2, 3, 8), meta(5, 8), meta(5)), {}),
    (F.linear, (meta(8), meta(5, 8)), {}),
    (F.linear, (meta(2, 8, 5, 6).permute(0, 2, 3, 1), meta(5, 8)), {"bias": None}),
    (F.linear, (meta(3, 2, 8).transpose(0, 1), meta(5, 8, dtype=torch.float32)), {}),
    (F.adaptive_avg_pool2d, (X, 1), {}),
    (F.conv2d, (X, meta(6, 4, 3, 3), meta(6)), {}),
    (F.conv2d, (X, meta(8, 2, 3, 3), None, 2, 1, 1, 2), {}),
    (F.conv2d, (X, meta(4, 1, 3, 3)), {"padding": "same", "dilation": 2, "groups": 4}),
    (F.conv2d, (X, meta(6, 4, 2, 3)), {"stride": (2, 1), "padding": (0, 1)}),
    (F.conv2d, (X, meta(6, 4, 5, 5)), {"padding": "valid"}),
    (F.adaptive_avg_pool2d, (meta(4, 5, 6), (2, None)), {}),
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


# calls the ops' own kernels refuse on ``meta``: a shortcut must not answer them
REFUSED = [
    (F.batch_norm, (X, V8, V8), {}),  # statistics of another size
    (F.batch_norm, (meta(1, 4, 1, 1), None, None), {"training": True}),  # 1 value per channel
    (F.batch_norm, (X, None, None), {"training": True, "eps": 0.0}),  # eps must be > 0
    (F.batch_norm, (X, V4, V4), {"eps": -1.0}),  # eps must be >= 0
    (F.batch_norm, (X, None, None), {}),  # eval mode needs running statistics
    (F.linear, (meta(2, 3, 8), meta(5, 7)), {}),
    (F.conv2d, (X, meta(6, 3, 3, 3)), {}),  # channels
    (F.conv2d, (X, meta(6, 2, 3, 3)), {"groups": 3}),  # 6 channels in 3 groups of 2, not 4
    (F.conv2d, (X, meta(6, 4, 7, 7)), {}),  # a kernel larger than the input
    (F.conv2d, (X, meta(6, 4, 3, 3)), {"stride": 0}),
    (F.conv2d, (X, meta(6, 4, 3, 3)), {"padding": "same", "stride": 2}),
    (torch.add, (meta(2, 3, dtype=torch.long), meta(3, dtype=torch.long)), {"alpha": 0.5}),
]
LEFT_TO_THE_KERNEL = REFUSED + [
    (F.layer_norm, (meta(2, 3, 8), (4,)), {}),
    (F.group_norm, (X, 3), {}),
    (torch.add, (X, LAST), {}),  # other strides
    (torch.Tensor.mul_, (meta(4, 1, 1), X), {}),  # the result would not fit in place
    (torch.sub, (meta(3, dtype=torch.bool), meta(3, dtype=torch.bool)), {}),  # refused
    (torch.mul, (meta(4, 1), meta(1, 5)), {}),  # neither operand has the broadcast shape
    (torch.Tensor.__mul__, (meta(3, dtype=torch.long), 0.5), {}),  # promotes to float
    (torch.relu, (torch.zeros(3),), {}),  # a real tensor
    (F.relu, (X,), {"out": X}),
    (F.linear, (meta(2, 3, 8), meta(5, 8), meta(4)), {}),  # a bias of another size
    (F.linear, (meta(2, 8, dtype=torch.float16), meta(5, 8)), {}),  # mixed dtypes
    (F.adaptive_avg_pool2d, (LAST, 1), {}),  # channels last
    (F.adaptive_avg_pool2d, (SQUARE_LAST, 2), {}),  # contiguous, but channels-last strides
    (torch.mul, (SQUARE_LAST, meta(4, 1, 1)), {}),
    (F.adaptive_avg_pool2d, (X, 2.5), {}),  # the kernel's own error
    (F.adaptive_avg_pool2d, (meta(2, 0, 5, 5), 1), {}),  # an empty channel dim
    (F.conv2d, (LAST, meta(6, 4, 3, 3)), {}),
    (F.conv2d, (X, meta(6, 4, 3, 3), meta(5)), {}),  # a bias of another size
]


@pytest.mark.parametrize(("func", "args", "kwargs"), LEFT_TO_THE_KERNEL)
def test_calls_the_table_cannot_answer_run_their_kernel(func, args, kwargs):
    assert shortcut(func, args, kwargs) is None


@pytest.mark.parametrize(("func", "args", "kwargs"), REFUSED)
def test_the_calls_left_to_the_kernel_for_their_errors_are_refused_by_it(func, args, kwargs):
    with pytest.raises((ValueError, RuntimeError, ZeroDivisionError)):
        func(*args, **kwargs)
