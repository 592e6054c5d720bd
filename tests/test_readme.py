"""The README's Python examples run as written, in order, and do what they say."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_examples_run_and_prune_exactly(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) == 9
    namespace: dict = {}
    exec(compile(blocks[0], "README quick start", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "Conv2d(3, 61" in printed
    assert re.search(r"\d+ groups together\s+\d+\s+\S+\s+ok", printed)
    assert namespace["macs"] < 0.5e9 and namespace["params"] < 4e6

    exec(compile(blocks[1], "README pruners", "exec"), namespace)
    model = namespace["model"]
    assert model.conv1.out_channels == 32 and model.layer4[0].conv1.out_channels == 256
    assert model.fc.in_features == 256

    exec(compile(blocks[2], "README save/load", "exec"), namespace)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        assert torch.equal(namespace["fresh"].eval()(x), model.eval()(x))
    assert (tmp_path / "resnet18_pruned.plan.json").is_file()

    exec(compile(blocks[3], "README transformers", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "6 3 192 256" in printed and "deliberate weight change" in printed
    llama = namespace["model"]
    assert (tmp_path / "pruned-llama" / "config.json").is_file()
    exec(compile(blocks[4], "README adaptive widths and healing", "exec"), namespace)
    widths = [layer.mlp.down_proj.in_features for layer in llama.model.layers]
    assert sum(widths) == 2 * 256 - int(2 * 256 * 0.2) and min(widths) >= 128
    assert len(namespace["log"].losses) == 10 and (tmp_path / "healing.png").is_file()

    exec(compile(blocks[5], "README checkpoints larger than memory", "exec"), namespace)
    assert "intermediate_size" in namespace["report"].changed
    assert (tmp_path / "streamed-llama" / "config.json").is_file()
    exec(compile(blocks[6], "README experts", "exec"), namespace)
    assert namespace["moe"].config.num_experts == 4
    assert [layer.mlp.experts.gate_up_proj.shape[0] for layer in namespace["moe"].model.layers] == [
        4,
        4,
    ]
    capsys.readouterr()
    exec(compile(blocks[7], "README blocks", "exec"), namespace)
    assert "removed 1 of 2 removable blocks" in capsys.readouterr().out
    assert llama.config.num_hidden_layers == len(llama.model.layers) == 1

    exec(compile(blocks[8], "README search", "exec"), namespace)
    result = namespace["result"]
    assert sorted(result.ratios) == ["layer1", "layer2", "layer3", "layer4"]
    assert (tmp_path / "curves" / "all.png").is_file()
    assert (tmp_path / "resnet18_searched.search.json").is_file()
    assert "guard:" in capsys.readouterr().out
    if result.accepted:
        assert result.macs <= 0.5 * result.dense["macs"]
        assert (tmp_path / "resnet18_searched.plan.json").is_file()
