"""``torchslim demo``: the whole workflow on real data in a few minutes on a CPU.

scikit-learn's bundled handwritten digits (1,797 real 8x8 scans, shipped inside the wheel):
train a small CNN, sparse-train it with L1 on the BN scales, prune it to a MACs target by BN
scale, fine-tune, evaluate, export to ONNX (checked against onnxruntime) and write a report with
plots. Progress bars on every training phase; a summary table at the end.
"""

from __future__ import annotations

import copy
from functools import partial
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import torchslim as tp
from torchslim.cli.datasets import accuracy, load_dataset
from torchslim.cli.report import write_report
from torchslim.cli.training import train_epoch
from torchslim.utils.latency import export_onnx, latency_ms


class DigitsNet(nn.Module):
    """Three conv-BN-ReLU blocks and a linear classifier for 8x8 digits."""

    def __init__(self, widths: tuple[int, int, int] = (32, 64, 128)) -> None:
        super().__init__()
        layers, cin = [], 1
        for index, width in enumerate(widths):
            layers += [nn.Conv2d(cin, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)]
            layers += [nn.ReLU()] + ([nn.MaxPool2d(2)] if index < 2 else [])
            cin = width
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).mean((2, 3)))


def train(
    model: nn.Module,
    data: tuple[torch.Tensor, torch.Tensor],
    epochs: int,
    label: str,
    pruner: Any = None,
    reg: float = 0.0,
) -> list[float]:
    """SGD with a cosine schedule; with ``pruner``, its ``regularize`` after each backward."""
    from tqdm import tqdm

    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs)
    losses = []
    for epoch in tqdm(range(epochs), desc=label, unit="epoch", leave=False):
        strength = tp.pruner.decaying_l1(epoch, epochs, base=reg)
        regularize = partial(pruner.regularize, model, reg=strength) if pruner else None
        total, count = train_epoch(model, data, optimizer, epoch, after_backward=regularize)
        schedule.step()
        losses.append(total / count)
    model.eval()
    return losses


def run_demo(
    out: Path,
    epochs: int = 30,
    target_macs: float = 0.5,
    seed: int = 0,
    dataset: str = "digits",
    data_dir: Optional[Path] = None,
) -> dict:
    """The workflow end to end; returns the numbers the report shows."""
    torch.manual_seed(seed)
    train_data, test_data = load_dataset(dataset, data_dir, seed)
    out.mkdir(parents=True, exist_ok=True)
    example = test_data[0][:1]
    model = DigitsNet()
    history: dict[str, Any] = {"loss": {}}
    history["loss"]["dense"] = train(model, train_data, epochs, "dense training")
    dense = copy.deepcopy(model)
    pruner = tp.pruner.BNScalePruner(
        model,
        example,
        target_macs=target_macs,
        iterative_steps=3,
        ignored_layers=[model.classifier],
    )
    history["loss"]["sparse"] = train(
        model, train_data, max(1, epochs // 2), "sparse training (BN L1)", pruner, reg=1e-3
    )
    sparse_acc = accuracy(model, test_data)
    widths_before = _widths(model)
    steps = []
    base_macs, base_params = tp.utils.count_ops_and_params(model, example)
    from tqdm import tqdm

    for step in tqdm(range(3), desc="pruning", unit="step", leave=False):
        pruner.step()
        macs, params = tp.utils.count_ops_and_params(model, example)
        steps.append(
            {
                "step": step + 1,
                "macs": macs,
                "params": params,
                "accuracy": accuracy(model, test_data),
            }
        )
    one_shot = accuracy(model, test_data)
    history["loss"]["fine-tune"] = train(model, train_data, max(1, epochs // 2), "fine-tuning")
    results = {
        "dense_accuracy": accuracy(dense, test_data),
        "sparse_accuracy": sparse_acc,
        "pruned_one_shot_accuracy": one_shot,
        "pruned_accuracy": accuracy(model, test_data),
        "macs": (base_macs, steps[-1]["macs"]),
        "params": (base_params, steps[-1]["params"]),
        "latency_ms": (latency_ms(dense, example), latency_ms(model, example)),
        "widths": (widths_before, _widths(model)),
        "steps": steps,
    }
    results["onnx"] = export_onnx(model, example, out / "pruned.onnx")
    tp.save_pruned(model, out / "pruned.safetensors")
    write_report(out, results, history)
    return results


def _widths(model: DigitsNet) -> list[int]:
    return [m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d)]
