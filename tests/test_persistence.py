"""save_pruned / load_pruned: bit-exact round trips, readable plans, clear errors, safe writes."""

import json

import pytest
import torch
import torchvision
from torch import nn

import torchslim as tp
from torchslim.zoo import randomize_constant_parameters


def small_vit() -> nn.Module:
    return torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64
    )


MODELS = {
    "resnet18": (torchvision.models.resnet18, (1, 3, 64, 64)),
    "densenet121": (torchvision.models.densenet121, (1, 3, 32, 32)),
    "vit": (small_vit, (1, 3, 32, 32)),
}


def pruned(name: str, seed: int = 0):
    build, shape = MODELS[name]
    torch.manual_seed(seed)
    model = randomize_constant_parameters(build().eval())
    x = torch.randn(shape)
    tp.pruner.MagnitudePruner(model, x, pruning_ratio=0.3).step()
    return model, x, build


@pytest.mark.parametrize("name", sorted(MODELS))
def test_round_trip_is_bit_exact(tmp_path, name):
    model, x, build = pruned(name)
    path = tp.save_pruned(model, tmp_path / f"{name}.safetensors")
    fresh = build().eval()
    assert sum(p.numel() for p in fresh.parameters()) > sum(p.numel() for p in model.parameters())
    tp.load_pruned(fresh, path)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_plan_is_readable_and_deterministic(tmp_path):
    model, _, _ = pruned("resnet18")
    tp.save_pruned(model, tmp_path / "a.safetensors")
    again, _, _ = pruned("resnet18")
    tp.save_pruned(again, tmp_path / "b.safetensors")
    text = (tmp_path / "a.plan.json").read_text()
    assert text == (tmp_path / "b.plan.json").read_text()
    plan = json.loads(text)
    first = plan["steps"][0]
    assert first["group"] == "conv1.weight[dim 0]" and len(first["idxs"]) == 19
    ops = {(op["module"], op["role"]) for op in first["ops"]}
    assert {("conv1", "out"), ("bn1", "out"), ("layer1.0.conv1", "in")} <= ops
    assert plan["shapes"]["conv1.weight"] == [45, 3, 7, 7]


def test_plain_torch_save_still_works(tmp_path):
    model, x, _ = pruned("resnet18")
    torch.save(model, tmp_path / "whole.pt")
    loaded = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert torch.equal(loaded(x), model(x))


def test_truncated_and_tampered_files_are_refused(tmp_path):
    model, _, build = pruned("resnet18")
    path = tp.save_pruned(model, tmp_path / "m.safetensors")
    data = path.read_bytes()
    (tmp_path / "short.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(tp.CheckpointError, match="not a readable safetensors file"):
        tp.load_pruned(build(), tmp_path / "short.safetensors")
    tampered = bytearray(data)
    tampered[-100] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(bytes(tampered))
    with pytest.raises(tp.CheckpointError, match="checksum mismatch"):
        tp.load_pruned(build(), tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        tp.load_pruned(build(), tmp_path / "missing.safetensors")


def test_a_plan_for_another_model_is_refused(tmp_path):
    model, _, build = pruned("resnet18")
    path = tp.save_pruned(model, tmp_path / "m.safetensors")
    with pytest.raises(tp.CheckpointError, match="prunes 'conv1', which this model does not have"):
        tp.load_pruned(small_vit(), path)
    once = tp.load_pruned(build(), path)
    with pytest.raises(tp.CheckpointError, match="does not fit module"):
        tp.load_pruned(once, path)


def test_a_failed_save_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    model, x, build = pruned("resnet18")
    path = tp.save_pruned(model, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as stream:
            stream.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        tp.save_pruned(build(), path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.plan.json", "m.safetensors"]


def test_a_failed_folder_save_leaves_the_previous_folder_intact(tmp_path):
    folder = tmp_path / "model"

    def write(content: str):
        def into(tmp):
            (tmp / "weights").write_text(content)
            if content == "broken":
                raise OSError("disk full")

        return into

    tp.persistence.atomic_folder(folder, write("first"))
    with pytest.raises(OSError, match="disk full"):
        tp.persistence.atomic_folder(folder, write("broken"))
    assert (folder / "weights").read_text() == "first"
    tp.persistence.atomic_folder(folder, write("second"))
    assert (folder / "weights").read_text() == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["model"]
