"""The real YOLO models of seed 002, built offline from ultralytics' packaged yaml (random init):
BN-scale pruning by 50% without rewriting C2f / C3k2, exact, exported to ONNX."""

import os

import numpy as np
import pytest
import torch

import torchslim as tp

os.environ.setdefault("YOLO_OFFLINE", "1")
ultralytics = pytest.importorskip("ultralytics")


@pytest.mark.parametrize(("config", "block"), [("yolov8n.yaml", "C2f"), ("yolo11n.yaml", "C3k2")])
def test_yolo_prunes_by_half_exactly_and_exports_to_onnx(tmp_path, config, block):
    import onnxruntime

    torch.manual_seed(0)
    model = ultralytics.YOLO(config).model.eval()
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        dense = model(x)[0]
    blocks_before = sum(type(m).__name__ == block for m in model.modules())
    base_macs, base_params = tp.utils.count_ops_and_params(model, x)

    report = tp.pruner.BNScalePruner(model, x, pruning_ratio=0.5).step_and_verify()
    assert report.ok and report.worst < 1e-10, str(report)

    macs, params = tp.utils.count_ops_and_params(model, x)
    assert params < 0.6 * base_params and macs < 0.6 * base_macs
    assert sum(type(m).__name__ == block for m in model.modules()) == blocks_before
    with torch.no_grad():
        pruned = model(x)[0]
    assert pruned.shape == dense.shape  # Detect keeps its 4 box + 80 class outputs per anchor

    path = tmp_path / "pruned.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17)
    session = onnxruntime.InferenceSession(str(path))
    (onnx_out, *_) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert np.abs(onnx_out - pruned.numpy()).max() < 1e-4 * float(pruned.abs().max())
