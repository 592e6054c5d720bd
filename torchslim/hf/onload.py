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

#: the real tensor of ``(module name, attribute)``, or ``None`` where the checkpoint has none
Reader = Callable[[str, str], Optional[torch.Tensor]]


@contextmanager
def computed_buffers(model: nn.Module) -> Iterator[None]:
    """Inside the block the buffers a model computes rather than loads (RoPE frequencies) hold
    real values, computed as transformers computes them when it loads a model built on
    ``meta`` (``_init_weights`` of their module); back on ``meta`` afterwards."""
    swapped = []
    for module in model.modules():
        for attr in module._non_persistent_buffers_set:
            buffer = module._buffers.get(attr)
            if buffer is not None and buffer.is_meta:
                swapped.append((module, attr, buffer))
                module._buffers[attr] = torch.empty_like(buffer, device="cpu")
    try:
        for module in {id(m): m for m, _, _ in swapped}.values():
            model._init_weights(module)
        yield
    finally:
        for module, attr, buffer in swapped:
            module._buffers[attr] = buffer


@contextmanager
def onloaded(model: nn.Module, read: Reader, skipped: Optional[nn.Module] = None) -> Iterator[None]:
    """Inside the block each module of ``model`` holds its real tensors (from ``read``) while
    its forward runs, and its ``meta`` ones again afterwards. ``skipped`` (the output
    embeddings: the logits of every calibration token would be the largest tensor of the
    pass) runs its forward hooks but computes nothing: it returns zeros of its output's
    shape, without memory."""
    handles, loaded = [], []
    for name, module in model.named_modules():
        attrs = [
            attr
            for attr, tensor in [*module._parameters.items(), *module._buffers.items()]
            if tensor is not None and tensor.is_meta
        ]
        if attrs and module is not skipped:
            handles.append(module.register_forward_pre_hook(_loader(name, attrs, read, loaded)))
            handles.append(module.register_forward_hook(lambda *_: _unload(loaded)))
    with ExitStack() as stack:
        if skipped is not None:
            stack.enter_context(forwards_replaced({skipped: _nothing(skipped)}))
        try:
            yield
        finally:
            _unload(loaded)
            for handle in handles:
                handle.remove()


def _loader(name: str, attrs: list[str], read: Reader, loaded: list) -> Callable[..., None]:
    def load(module: nn.Module, _inputs: Any) -> None:
        for attr in attrs:
            real = read(name, attr)
            if real is None:
                continue
            table = module._parameters if attr in module._parameters else module._buffers
            loaded.append((table, attr, table[attr]))
            table[attr] = (
                nn.Parameter(real, requires_grad=False) if table is module._parameters else real
            )

    return load


def _unload(loaded: list) -> None:
    while loaded:
        table, attr, meta = loaded.pop()
        table[attr] = meta


def _nothing(module: nn.Module) -> Callable[..., torch.Tensor]:
    width = module.weight.shape[0]

    def forward(hidden: torch.Tensor, *_: Any, **__: Any) -> torch.Tensor:
        return hidden.new_zeros(()).expand(*hidden.shape[:-1], width)

    return forward
