"""Running a model built on ``meta`` with its real weights, one module at a time (sequential
onloading): a module's tensors are read just before its forward and dropped after it, so a
forward pass over a checkpoint larger than memory holds one layer's weights at a time, plus
the activations. Calibrated criteria record their statistics this way in
:func:`torchslim.hf.prune_checkpoint`."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

from torchslim.capture.modules import forwards_replaced
from torchslim.persistence import CheckpointError
from torchslim.utils import heap

#: the real tensor of ``(module name, attribute)``, or ``None`` where the checkpoint has none
Reader = Callable[[str, str], Optional[torch.Tensor]]


def own_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The module's own parameters and buffers (not its children's), by attribute."""
    tensors = [*module._parameters.items(), *module._buffers.items()]
    return [(attr, tensor) for attr, tensor in tensors if tensor is not None]


@contextmanager
def computed_buffers(model: nn.Module) -> Iterator[None]:
    """Inside the block the buffers a model computes rather than loads (RoPE frequencies) hold
    real values, computed as transformers computes them when it loads a model built on
    ``meta`` (``_init_weights`` of their module); back on ``meta`` afterwards. A buffer that
    initialisation leaves unset is refused rather than used uninitialised."""
    swapped = []
    for module in model.modules():
        for attr in module._non_persistent_buffers_set:
            buffer = module._buffers.get(attr)
            if buffer is not None and buffer.is_meta:
                swapped.append((module, attr, buffer))
                module._buffers[attr] = _unset(buffer)
    try:
        for module in {id(m): m for m, _, _ in swapped}.values():
            model._init_weights(module)
        unset = [
            f"{type(module).__name__}.{attr}"
            for module, attr, _ in swapped
            if _still_unset(module._buffers[attr])
        ]
        if unset:
            raise CheckpointError(
                f"transformers' initialisation leaves the computed buffers {unset[:3]} unset: "
                "calibrate this model in memory"
            )
        yield
    finally:
        for module, attr, buffer in swapped:
            module._buffers[attr] = buffer


def _unset(buffer: torch.Tensor) -> torch.Tensor:
    """A CPU buffer of ``buffer``'s shape holding a value no initialisation writes (NaN, or
    the lowest integer)."""
    if buffer.is_floating_point() or buffer.is_complex():
        fill: Any = float("nan")
    elif buffer.dtype == torch.bool:
        fill = False
    else:
        fill = torch.iinfo(buffer.dtype).min
    return torch.full(buffer.shape, fill, dtype=buffer.dtype)


def _still_unset(buffer: torch.Tensor) -> bool:
    if buffer.is_floating_point() or buffer.is_complex():
        return bool(buffer.isnan().any())
    if buffer.dtype == torch.bool:
        return False
    return bool(buffer.numel()) and bool((buffer == torch.iinfo(buffer.dtype).min).all())


@contextmanager
def onloaded(
    model: nn.Module,
    read: Reader,
    skipped: Optional[nn.Module] = None,
    dtype: Optional[torch.dtype] = None,
) -> Iterator[None]:
    """Inside the block each module of ``model`` holds its real tensors (from ``read``; its
    floating-point ones cast to ``dtype`` when given) while its forward runs (its children's
    forwards included), and its ``meta`` ones again afterwards. A plain embedding casts the
    rows it looks up instead of its whole table (the same values: a lookup commutes with the
    cast), so a float32 calibration of a bf16 checkpoint never holds a float32 copy of a
    vocabulary's embeddings (2.1 GB at Llama-3-8B's size). ``skipped`` (the output
    embeddings: the logits of every calibration token would be the largest tensor of the
    pass) runs its forward hooks but computes nothing: it returns zeros of its output's
    shape, expanded from one element."""
    loaded: dict[nn.Module, list[tuple[dict, str, torch.Tensor]]] = {}
    with ExitStack() as stack:
        stack.callback(lambda: [_unload(entries) for entries in loaded.values()])
        for name, module in model.named_modules():
            attrs = [attr for attr, tensor in own_tensors(module) if tensor.is_meta]
            if attrs and module is not skipped:
                lookup = dtype is not None and _lookup(module)
                load = _loader(
                    name, attrs, read, loaded.setdefault(module, []), None if lookup else dtype
                )
                stack.callback(module.register_forward_pre_hook(load).remove)
                if lookup:
                    cast = module.register_forward_hook(lambda m, _, out, d=dtype: out.to(d))
                    stack.callback(cast.remove)
                unload = module.register_forward_hook(lambda m, *_: _unload(loaded[m]))
                stack.callback(unload.remove)
        if skipped is not None:
            stack.enter_context(forwards_replaced({skipped: _nothing(skipped)}))
        yield


def _lookup(module: nn.Module) -> bool:
    """An ``nn.Embedding`` whose forward only looks rows up (no ``max_norm`` renormalisation, no
    subclass scaling them)."""
    return type(module) is nn.Embedding and module.max_norm is None


def _loader(
    name: str, attrs: list[str], read: Reader, loaded: list, dtype: Optional[torch.dtype]
) -> Callable[..., None]:
    def load(module: nn.Module, _inputs: Any) -> None:
        for attr in attrs:
            real = read(name, attr)
            if real is None:
                continue
            if dtype is not None and real.is_floating_point():
                real = real.to(dtype)
            table = module._parameters if attr in module._parameters else module._buffers
            loaded.append((table, attr, table[attr]))
            table[attr] = (
                nn.Parameter(real, requires_grad=False) if table is module._parameters else real
            )

    return load


def _unload(loaded: list) -> None:
    """Put a module's ``meta`` tensors back, and return the C heap's free memory to the system
    (:func:`~torchslim.utils.heap.trim`): the activations freed since the last module stay
    resident in glibc's heap otherwise, and a streamed 8B calibration's heap grew by 40 MB a
    layer, to 1.3 GB of free memory by its end (more with more layers)."""
    if not loaded:
        return
    while loaded:
        table, attr, meta = loaded.pop()
        table[attr] = meta
    heap.trim()


def _nothing(module: nn.Module) -> Callable[..., torch.Tensor]:
    width = module.weight.shape[0]

    def forward(hidden: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], width)

    return forward
