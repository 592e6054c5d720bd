"""Element-wise ops: outputs share positions with every input dim they broadcast against."""

from __future__ import annotations

import torch

from torchslim.ops.registry import OpContext, register_rule, rule_for

UNARY = [
    "abs",
    "neg",
    "relu",
    "relu_",
    "relu6",
    "sigmoid",
    "sigmoid_",
    "tanh",
    "tanh_",
    "exp",
    "exp_",
    "log",
    "log_",
    "log1p",
    "log2",
    "sqrt",
    "rsqrt",
    "sin",
    "cos",
    "erf",
    "gelu",
    "silu",
    "silu_",
    "mish",
    "hardswish",
    "hardsigmoid",
    "hardtanh",
    "hardtanh_",
    "elu",
    "elu_",
    "selu",
    "celu",
    "leaky_relu",
    "leaky_relu_",
    "softplus",
    "softsign",
    "tanhshrink",
    "logsigmoid",
    "threshold",
    "threshold_",
    "sign",
    "floor",
    "ceil",
    "round",
    "trunc",
    "frac",
    "reciprocal",
    "square",
    "pow_",
    "dropout",
    "dropout_",
    "dropout1d",
    "dropout2d",
    "dropout3d",
    "alpha_dropout",
    "feature_alpha_dropout",
    "nan_to_num",
    "isnan",
    "isinf",
    "isfinite",
    "logical_not",
    "bitwise_not",
    "sigmoid",
    "exp2",
    "expm1",
    "sinh",
    "cosh",
    "asin",
    "acos",
    "atan",
]
SAME_LAYOUT = [
    "contiguous",
    "clone",
    "detach",
    "detach_",
    "to",
    "float",
    "double",
    "half",
    "bfloat16",
    "int",
    "long",
    "bool",
    "cpu",
    "cuda",
    "type",
    "type_as",
    "requires_grad_",
    "zero_",
    "fill_",
    "normal_",
    "uniform_",
    "clamp_",
    "zeros_like",
    "ones_like",
    "empty_like",
    "rand_like",
    "randn_like",
    "full_like",
    "__deepcopy__",
    "pin_memory",
    "bernoulli",
    "bernoulli_",
    "exponential_",
    "geometric_",
    "log_normal_",
    "cauchy_",
    "random_",
]
BINARY = [
    "add",
    "add_",
    "__add__",
    "__radd__",
    "__iadd__",
    "sub",
    "sub_",
    "__sub__",
    "__rsub__",
    "__isub__",
    "rsub",
    "mul",
    "mul_",
    "__mul__",
    "__rmul__",
    "__imul__",
    "div",
    "div_",
    "__truediv__",
    "__rtruediv__",
    "__itruediv__",
    "true_divide",
    "floor_divide",
    "__floordiv__",
    "__rfloordiv__",
    "remainder",
    "__mod__",
    "pow",
    "__pow__",
    "__rpow__",
    "maximum",
    "minimum",
    "fmax",
    "fmin",
    "atan2",
    "hypot",
    "eq",
    "ne",
    "lt",
    "le",
    "gt",
    "ge",
    "__eq__",
    "__ne__",
    "__lt__",
    "__le__",
    "__gt__",
    "__ge__",
    "logical_and",
    "logical_or",
    "logical_xor",
    "__and__",
    "__or__",
    "__xor__",
    "__iand__",
    "__ior__",
    "bitwise_and",
    "bitwise_or",
    "where",
    "masked_fill",
    "masked_fill_",
    "clamp",
    "clip",
    "clamp_min",
    "clamp_max",
    "lerp",
    "addcmul",
    "addcdiv",
    "copy_",
    "xlogy",
    "mul_",
    "copysign",
    "isclose",
    "heaviside",
]


def same_layout(ctx: OpContext) -> None:
    """Unary ops and conversions: the output has the first input's layout."""
    ctx.sizes_used_as_values((ctx.args[1:], ctx.kwargs))
    source = ctx.args[0]
    out = ctx.out
    if isinstance(out, torch.Tensor) and out.shape == source.shape:
        ctx.set_out(out, list(ctx.layout(source)))
    else:
        raise ValueError("output shape differs from input shape")


def broadcast(ctx: OpContext) -> None:
    """Broadcasting: dims of equal size (aligned from the right) hold the same positions; a
    size-1 dim stretched over a larger one keeps its position (removing it would leave 0)."""
    out = ctx.out
    if not isinstance(out, torch.Tensor):
        raise ValueError("element-wise op without a tensor output")
    ctx.sizes_used_as_values((ctx.args, ctx.kwargs))
    operands = [t for t in ctx.input_tensors() if t.dim() > 0]
    ndim = out.dim()
    result = []
    for j in range(ndim):
        size = out.shape[j]
        candidates = []
        for tensor in operands:
            k = j - (ndim - tensor.dim())
            if k >= 0 and tensor.shape[k] == size:
                candidates.append(ctx.layout(tensor)[k])
            elif k >= 0 and tensor.shape[k] != 1:
                raise ValueError(f"cannot broadcast size {tensor.shape[k]} to {size}")
            elif k >= 0:  # a single position stretched over the others: it must stay
                ctx.freeze(ctx.layout(tensor)[k], f"a size-1 dim broadcast to {size}")
        for other in candidates[1:]:
            ctx.unify(candidates[0], other)
        result.append(candidates[0] if candidates else ctx.opaque(size))
    ctx.set_out(out, result)


def data_dependent(ctx: OpContext) -> None:
    """Ops whose output size depends on values (nonzero, unique, nms): inputs stay whole."""
    for tensor in ctx.input_tensors():
        for dim in ctx.layout(tensor):
            ctx.freeze(dim, "values select positions")
    for tensor in ctx.output_tensors():
        ctx.set_out(tensor, [ctx.opaque(s, "a data-dependent size") for s in tensor.shape])


@rule_for("tolist", "__array__", "data_ptr", "untyped_storage")
def values_leave_torch(ctx: OpContext) -> None:
    """Values handed to Python or numpy can come back as anything: their channels stay."""
    for tensor in ctx.input_tensors():
        for dim in ctx.layout(tensor):
            ctx.freeze(dim, f"values leave torch through {ctx.name}")


def where_rule(ctx: OpContext) -> None:
    if len(ctx.args) + len(ctx.kwargs) == 1:
        data_dependent(ctx)
    else:
        broadcast(ctx)


rule_for(*UNARY, *SAME_LAYOUT)(same_layout)
rule_for(*BINARY)(broadcast)
rule_for("where")(where_rule)
rule_for(
    "nonzero",
    "argwhere",
    "unique",
    "unique_consecutive",
    "masked_select",
    "bincount",
    "searchsorted",
    "bucketize",
    "histc",
    "multinomial",
)(data_dependent)
register_rule(["torchvision::nms", "torchvision::batched_nms"], data_dependent)
