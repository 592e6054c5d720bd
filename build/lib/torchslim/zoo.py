"""Well-known models by name, with example inputs and a dense forward for checking.

Used by the CLI (``torchslim prune resnet18``), the zoo tests and the benchmarks. Models are
built with random weights: nothing is downloaded. Detection models end in data-dependent
post-processing (score thresholds, NMS), so :func:`dense_forward` returns the raw head outputs
for exactness checks; the graph itself is still traced through the whole forward.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

KINDS = ("classification", "segmentation", "detection", "video", "optical_flow")


@dataclass
class ZooModel:
    """A model instance, its example inputs and how to get dense outputs from it."""

    name: str
    kind: str
    model: nn.Module
    inputs: Any
    dense_forward: Optional[Callable[[nn.Module, Any], Any]] = None


def torchvision_names(kind: Optional[str] = None) -> list[tuple[str, str]]:
    """``(kind, name)`` of every torchvision model (of one kind)."""
    from torchvision import models

    modules = {
        "classification": models,
        "segmentation": models.segmentation,
        "detection": models.detection,
        "video": models.video,
        "optical_flow": models.optical_flow,
    }
    kinds = [kind] if kind else list(KINDS)
    return [(k, name) for k in kinds for name in models.list_models(modules[k])]


def _image_size(name: str) -> int:
    if name.startswith(("vit_", "swin", "maxvit")):
        return 224
    if name.startswith("inception"):
        return 96
    return 64


def example_inputs(kind: str, name: str, batch: int = 1) -> Any:
    """Small inputs that every torchvision model of that kind accepts."""
    generator = torch.Generator().manual_seed(0)
    if kind == "detection":
        return ([torch.rand(3, 128, 128, generator=generator) for _ in range(batch)],)
    if kind == "optical_flow":
        frames = [torch.rand(batch, 3, 128, 128, generator=generator) for _ in range(2)]
        return tuple(frames)
    if kind == "video":
        long = name.startswith(("mvit", "s3d"))
        frames, size = (16, 224) if long else (4, 112)
        return torch.randn(batch, 3, frames, size, size, generator=generator)
    size = _image_size(name)
    return torch.randn(batch, 3, size, size, generator=generator)


def randomize_constant_parameters(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give zero- or constant-initialised tensors (heads, BN scales, layer scales) random values
    so that a mapping error cannot hide behind a zero (zoo checks and benchmarks)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in list(model.parameters()) + list(model.buffers()):
            if not tensor.is_floating_point() or tensor.numel() < 2:
                continue
            if float(tensor.max() - tensor.min()) == 0.0:
                noise = torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype)
                tensor.copy_(0.5 + noise if float(tensor.max()) > 0 else 0.1 * (noise - 0.5))
            elif float(tensor.abs().max()) < 1e-4:
                tensor.mul_(1e4)
    return model


def build_torchvision(name: str, kind: Optional[str] = None, seed: int = 0) -> ZooModel:
    """A torchvision model with random weights, its example inputs and dense forward."""
    from torchvision import models

    kind = kind or next((k for k, n in torchvision_names() if n == name), None)
    if kind is None:
        raise ValueError(f"unknown torchvision model {name!r}")
    kwargs: dict[str, Any] = {"weights": None}
    if kind in ("segmentation", "detection"):
        kwargs["weights_backbone"] = None
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True
    torch.manual_seed(seed)
    model = models.get_model(name, **kwargs).eval()
    dense = None
    if kind == "detection":
        dense = _detection_dense_forward
    elif kind == "optical_flow":
        dense = _flow_forward
    return ZooModel(name, kind, model, example_inputs(kind, name), dense)


def _flow_forward(model: nn.Module, inputs: Any) -> Any:
    return model(*inputs, num_flow_updates=2)


def _detection_dense_forward(model: nn.Module, inputs: Any) -> dict[str, torch.Tensor]:
    """Backbone, neck and heads of a torchvision detector, without score-dependent steps."""
    (images,) = inputs
    batch, _ = model.transform(images)
    features = model.backbone(batch.tensors)
    if isinstance(features, torch.Tensor):
        features = {"0": features}
    levels = list(features.values())
    out: dict[str, torch.Tensor] = {}
    if hasattr(model, "rpn"):
        objectness, deltas = model.rpn.head(levels)
        out.update({f"objectness{i}": t for i, t in enumerate(objectness)})
        out.update({f"rpn_deltas{i}": t for i, t in enumerate(deltas)})
        heads = model.roi_heads
        height, width = batch.tensors.shape[-2:]
        corners = [[4.0, 4.0, width / 2, height / 2], [8.0, 2.0, width - 4, height - 8]]
        boxes = [torch.tensor(corners, dtype=batch.tensors.dtype, device=batch.tensors.device)]
        sizes = batch.image_sizes[:1]
        pooled = heads.box_roi_pool(features, boxes, sizes)
        scores, regression = heads.box_predictor(heads.box_head(pooled))
        out.update({"box_scores": scores, "box_regression": regression})
        for branch in ("mask", "keypoint"):
            pool = getattr(heads, f"{branch}_roi_pool", None)
            if pool is not None:
                head = getattr(heads, f"{branch}_head")
                predictor = getattr(heads, f"{branch}_predictor")
                out[branch] = predictor(head(pool(features, boxes, sizes)))
    else:
        head_out = model.head(levels)
        out.update({k: v for k, v in head_out.items() if isinstance(v, torch.Tensor)})
    return out
