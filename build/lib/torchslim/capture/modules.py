"""The model around a traced forward: which module runs, the module inside wrappers, calling it
the way users pass inputs, and leaving it as it was found."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn


def module_stack_hooks(
    model: nn.Module, stack: list[str], ran: Optional[set[int]] = None
) -> list[Any]:
    """Hooks that keep ``stack`` equal to the names of the modules currently running (and add
    the ``id`` of every module that runs to ``ran``)."""
    handles = []
    ran = set() if ran is None else ran
    for name, module in model.named_modules():

        def pre(module, _args, name=name):
            stack.append(name or "<model>")
            ran.add(id(module))

        def post(_module, _args, _out):
            stack.pop()

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post, always_call=True))
    return handles


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DataParallel`` / ``DistributedDataParallel`` / ``torch.compile``
    wrappers: its layers are the ones to trace and prune (the wrappers share them)."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def call_forward(
    model: nn.Module, example_inputs: Any, forward_fn: Optional[Callable] = None
) -> Any:
    """Run the model the way users pass inputs: ``forward_fn``, a dict, a tuple/list or a tensor."""
    if forward_fn is not None:
        return forward_fn(model, example_inputs)
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return model(*example_inputs)
    return model(example_inputs)


_MODULE_INTERNALS = frozenset(vars(nn.Module()))
Snapshot = list[tuple[dict, dict[str, tuple[Any, Any]]]]


def _cache_snapshot(model: nn.Module) -> Snapshot:
    """Each module's plain attributes, with the contents of its dicts and lists: what a
    forward may fill as a cache (timm's ``attention_bias_cache``, torchvision's ``scales``)."""
    snapshot = []
    for module in model.modules():
        state = vars(module)
        entries = {
            name: (value, type(value)(value) if isinstance(value, (dict, list)) else None)
            for name, value in state.items()
            if name not in _MODULE_INTERNALS
        }
        snapshot.append((state, entries))
    return snapshot


def _restore_caches(snapshot: Snapshot) -> None:
    """Undo what the traced forward stored on modules: a tensor cached from dense weights
    would not fit the pruned model, and an attribute it added (ultralytics' Detect stores the
    input shape it built its anchors for) would stand for a cache that is no longer there."""
    for state, entries in snapshot:
        added = [name for name in state if name not in entries and name not in _MODULE_INTERNALS]
        for name in added:
            del state[name]
        for name, (value, contents) in entries.items():
            if isinstance(value, dict):
                value.clear()
                value.update(contents)
            elif isinstance(value, list):
                value[:] = contents
            state[name] = value


@contextmanager
def forwards_replaced(replacements: dict[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Inside the block each module runs its replacement as its forward; a forward set on the
    instance before (by wrappers such as accelerate's hooks) is put back afterwards."""
    before = {module: vars(module).get("forward") for module in replacements}
    for module, forward in replacements.items():
        vars(module)["forward"] = forward
    try:
        yield
    finally:
        for module, forward in before.items():
            if forward is None:
                vars(module).pop("forward", None)
            else:
                vars(module)["forward"] = forward


@contextmanager
def untouched(model: nn.Module, training: bool = False) -> Iterator[None]:
    """Run a forward inside the block in the given mode, without autograd, and put back the
    model's train/eval flags, its buffers (BatchNorm statistics move in train mode), what the
    forward cached on modules and the global RNG state afterwards."""
    modes = {m: m.training for m in model.modules()}
    saved = {
        name: buffer.clone()
        for name, buffer in (model.named_buffers() if training else ())
        if buffer is not None and buffer.device.type != "meta"
    }
    rng = torch.random.get_rng_state()
    caches = _cache_snapshot(model)
    try:
        if any(mode != training for mode in modes.values()):
            model.train(training)
        with torch.no_grad():
            yield
    finally:
        for module, mode in modes.items():
            if module.training != mode:
                module.training = mode
        with torch.no_grad():
            for name, buffer in model.named_buffers() if saved else ():
                if name in saved:
                    buffer.copy_(saved[name])
        torch.random.set_rng_state(rng)
        _restore_caches(caches)


@contextmanager
def watched(
    model: nn.Module, stack: list[str], ran: Optional[set[int]] = None, training: bool = False
) -> Iterator[None]:
    """Run a forward inside the block as tracing and counting do: :func:`untouched`, with
    ``stack`` kept equal to the names of the modules running (see :func:`module_stack_hooks`)."""
    handles = module_stack_hooks(model, stack, ran)
    try:
        with untouched(model, training):
            yield
    finally:
        for handle in handles:
            handle.remove()
        stack.clear()
