"""Fisher information of channel masks: the loss a removal costs, from calibration gradients.

Removing channel ``c`` of a group is multiplying it by a mask ``m_c = 0`` wherever it is read.
Around ``m = 1`` the loss changes by about ``1/2 * F_cc``, ``F_cc = E[(dL/dm_c)^2]`` over
calibration samples (the empirical Fisher of the mask; Kwon et al., "A Fast Post-Training
Pruning Framework for Transformers", 2022). For one sample, ``dL/dm_c`` is the sum of
``x * dL/dx`` over every position where the channel is read: each consumer's input channel
(every token of a sequence, every pixel of a feature map), and for a head all its offsets.

Scores are in the units of the loss, so they compare across layers and kinds: with
``global_pruning=True`` the removals go where they cost the least loss, not the same fraction
everywhere (the default normaliser is ``None`` to keep that).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from torchslim.graph.dependency import Group
from torchslim.importance.base import normalize
from torchslim.importance.criteria import _Recorder
from torchslim.importance.registry import register_importance
from torchslim.pruning.layers import layer_kind
from torchslim.pruning.roles import Role


def sampled_label_loss(
    logits: torch.Tensor, generator: Optional[torch.Generator] = None
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (``[..., classes]``) against labels drawn from their own
    softmax, one per row. Backpropagated inside :meth:`FisherImportance.record` it records the
    true Fisher (in expectation the curvature of the divergence from the model as it is)
    rather than the empirical Fisher of the data's labels. On SmolLM2-135M (20% of the MLP
    neurons, adaptive widths, reconstruction) the pruned model's perplexity was 34.30 with one
    draw per token and 34.04 with four, against 35.02 with the text's next tokens."""
    flat = logits.reshape(-1, logits.shape[-1]).float()
    labels = torch.multinomial(flat.detach().softmax(-1), 1, generator=generator).reshape(-1)
    return nn.functional.cross_entropy(flat, labels)


class FisherRecordingError(RuntimeError):
    """The calibration pass gave no gradient to record."""


@register_importance("fisher")
class FisherImportance(_Recorder):
    """Empirical Fisher of channel masks (see the module docstring), recorded where channels
    are consumed: the inputs of linear layers and ungrouped convolutions.

    Record with a loss and its backward pass::

        imp = tp.importance.FisherImportance()
        with imp.record(model):
            for batch, labels in calibration:
                loss_fn(model(batch), labels).backward()

    A sample is one entry along the input's first dim (a sequence, an image). The model's
    parameters need not require gradients: an input that carries none is replaced by a leaf
    that does, so the weights can stay frozen (their gradients uncomputed) while recording.
    ``x * dL/dx`` is taken once per tensor read (q, k and v reading one hidden state share
    it), and a group's score sums it per sample over all its reads and positions before
    squaring, so a head or a channel read by several layers counts as one mask."""

    #: Recorded with a loss and its backward pass (the CLI does that on labelled images).
    needs_loss = True

    def __init__(self, normalizer: Any = None, **kwargs: Any) -> None:
        super().__init__(normalizer=normalizer, **kwargs)
        self._rows: dict[tuple[int, int], list[tuple[int, torch.Tensor]]] = {}
        self._sites: dict[int, set[tuple[int, int]]] = {}
        #: each input read in this forward by ``id``: the tensor read in its place, its site,
        #: and the input itself, held so that no new tensor takes its ``id`` while it is listed
        self._seen: dict[int, tuple[torch.Tensor, tuple[int, int], torch.Tensor]] = {}
        self._calls: dict[int, int] = {}
        self._samples = 0
        self._pending = 0

    def wants(self, module: nn.Module) -> bool:
        return layer_kind(module).input_dim(module) is not None

    def hooks(self, model: nn.Module) -> list[Any]:
        return [
            model.register_forward_pre_hook(self._next_forward),
            model.register_forward_hook(self._forward_done),
            *super().hooks(model),
        ]

    def attach(self, module: nn.Module) -> Any:
        return module.register_forward_pre_hook(self._observe)

    def _next_forward(self, _model: nn.Module, _inputs: Any) -> None:
        self._samples += self._pending
        self._pending = 0
        self._seen.clear()
        self._calls.clear()

    def _forward_done(self, _model: nn.Module, _inputs: Any, _output: Any) -> None:
        self._seen.clear()

    def _observe(self, module: nn.Module, inputs: Any) -> Optional[tuple]:
        x = inputs[0] if inputs and isinstance(inputs[0], torch.Tensor) else None
        if x is None or x.device.type == "meta" or not x.is_floating_point() or x.dim() < 2:
            return None
        if not torch.is_grad_enabled():
            return None
        seen = self._seen.get(id(x))
        if seen is None:
            read = x if x.requires_grad else x.detach().requires_grad_()
            call = self._calls.get(id(module), 0)
            self._calls[id(module)] = call + 1
            site = (id(module), call)
            self._seen[id(x)] = self._seen[id(read)] = (read, site, x)
            self._hook(module, read, site)
        else:
            read, site, _ = seen
        self._sites.setdefault(id(module), set()).add(site)
        return None if read is x else (read, *inputs[1:])

    def _hook(self, module: nn.Module, x: torch.Tensor, site: tuple[int, int]) -> None:
        channel = 1 if isinstance(module, nn.modules.conv._ConvNd) else x.dim() - 1
        offset = self._samples
        self._pending = max(self._pending, x.shape[0])
        rows = self._rows.setdefault(site, [])
        value = x.detach()  # not x itself: a hook holding its own tensor would be a cycle

        def on_gradient(grad: torch.Tensor) -> None:
            product = (grad.detach().double() * value.double()).movedim(channel, -1)
            rows.append((offset, product.reshape(value.shape[0], -1, product.shape[-1]).sum(1)))

        x.register_hook(on_gradient)

    def _derivatives(self, site: tuple[int, int]) -> Optional[torch.Tensor]:
        """``[samples, channels]``: ``dL/dm`` of each channel read at ``site`` per sample."""
        rows = self._rows.get(site)
        if not rows or len({row.shape[1] for _, row in rows}) != 1:
            return None
        out = torch.zeros(self._samples + self._pending, rows[0][1].shape[1], dtype=torch.float64)
        for offset, row in rows:
            out[offset : offset + row.shape[0]] += row
        return out

    def accepts(self, group: Group, member: Any) -> bool:
        module = member.ref.module
        return (
            id(module) in self._sites
            and member.ref.name == "weight"
            and group.handler_role(member) == Role.IN
            and member.dim == layer_kind(module).input_dim(module)
        )

    @torch.no_grad()
    def __call__(self, group: Group) -> Optional[torch.Tensor]:
        if not any(self._rows.values()):
            raise FisherRecordingError(
                "FisherImportance recorded no gradient: call loss.backward() inside "
                "`with imp.record(model):` (not under torch.no_grad())"
            )
        masks = torch.zeros(self._samples + self._pending, group.size, dtype=torch.float64)
        counted: set[tuple[int, int]] = set()
        for member, index in group.index_maps():
            if not self.accepts(group, member):
                continue
            size = getattr(member.ref.module, member.ref.name).shape[member.dim]
            for site in sorted(self._sites[id(member.ref.module)] - counted):
                recorded = self._derivatives(site)
                if recorded is None:
                    continue
                if recorded.shape[1] != size:
                    alive = self.surviving(member.ref.module_name, Role.IN, recorded.shape[1])
                    if len(alive) != size:
                        continue
                    recorded = recorded[:, alive]
                counted.add(site)
                keep = torch.as_tensor(index >= 0)
                target = torch.as_tensor(index, dtype=torch.long)[keep]
                masks.index_add_(1, target, recorded[:, keep])
        if not counted:
            return None
        return normalize(masks.pow(2).mean(0) / 2, self.normalizer)
