"""config.json with the recorded plan on one line: the same values as ``save_pretrained``'s,
smaller, and a config left as it was."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import tiny_llama

import torchslim as tp


def _planned_model():
    """A tiny Llama whose pruned width no plain config describes (the plan is recorded)."""
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 8))
    with pytest.warns(UserWarning):
        tp.pruner.MagnitudePruner(
            model, ids, pruning_ratio=0.0, pruning_ratio_dict={"width": 0.1, "neurons": 0.3}
        ).step()
    assert hasattr(model.config, tp.hf.RECORD_KEY)
    return model, ids


def test_the_plan_is_written_on_one_line_with_the_values_save_pretrained_writes(tmp_path):
    model, ids = _planned_model()
    plan = getattr(model.config, tp.hf.RECORD_KEY)
    model.save_pretrained(tmp_path / "plain")
    tp.hf.save_pretrained(model, tmp_path / "compact")
    plain = (tmp_path / "plain" / "config.json").read_text()
    compact = (tmp_path / "compact" / "config.json").read_text()
    assert json.loads(compact) == json.loads(plain)
    assert len(compact) < len(plain) / 2
    plan_lines = [line for line in compact.splitlines() if tp.hf.RECORD_KEY in line]
    assert len(plan_lines) == 1 and json.loads("{" + plan_lines[0].rstrip(",") + "}") == {
        tp.hf.RECORD_KEY: json.loads(plain)[tp.hf.RECORD_KEY]
    }
    assert getattr(model.config, tp.hf.RECORD_KEY) is plan  # the config is left as it was
    reloaded = tp.hf.from_pretrained(tmp_path / "compact").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_a_reloaded_model_saves_again_with_its_plan_and_prunes_further(tmp_path):
    model, ids = _planned_model()
    tp.hf.save_pretrained(model, tmp_path / "first")
    reloaded = tp.hf.from_pretrained(tmp_path / "first").eval()
    with torch.no_grad():  # as a fine-tune would change them: the plan must travel anyway
        reloaded.model.layers[0].mlp.down_proj.weight.mul_(2)
    tp.hf.save_pretrained(reloaded, tmp_path / "second")
    again = tp.hf.from_pretrained(tmp_path / "second").eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, reloaded(ids).logits)
    with pytest.warns(UserWarning):
        tp.pruner.MagnitudePruner(
            again, ids, pruning_ratio=0.0, pruning_ratio_dict={"neurons": 0.25}
        ).step()
    tp.hf.save_pretrained(again, tmp_path / "third")
    third = tp.hf.from_pretrained(tmp_path / "third").eval()
    widths = [layer.mlp.down_proj.in_features for layer in third.model.layers]
    assert widths == [layer.mlp.down_proj.in_features for layer in again.model.layers]
    assert widths != [layer.mlp.down_proj.in_features for layer in reloaded.model.layers]
    with torch.no_grad():
        assert torch.equal(third(ids).logits, again(ids).logits)


def test_a_config_without_a_plan_is_written_byte_for_byte_as_save_pretrained_writes_it(
    tmp_path,
):
    model = tiny_llama()
    model.save_pretrained(tmp_path / "plain")
    tp.hf.save_pretrained(model.config, tmp_path / "compact")
    plain = (tmp_path / "plain" / "config.json").read_bytes()
    assert (tmp_path / "compact" / "config.json").read_bytes() == plain


def test_a_failed_save_leaves_the_plan_in_the_config(tmp_path):
    model, _ = _planned_model()
    plan = getattr(model.config, tp.hf.RECORD_KEY)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OSError):  # a file is in the way of the folder
        tp.hf.save_pretrained(model, tmp_path / "a-file" / "below")
    assert getattr(model.config, tp.hf.RECORD_KEY) is plan


def test_companion_files_are_copied_unless_the_folder_has_its_own(tmp_path):
    from torchslim.hf.folder import copy_companions

    source, folder = tmp_path / "source", tmp_path / "pruned"
    source.mkdir()
    folder.mkdir()
    names = ("tokenizer.json", "spiece.model", "preprocessor_config.json", "generation_config.json")
    for name in (*names, "model.safetensors", "config.json"):
        (source / name).write_text(f"source {name}")
    (folder / "generation_config.json").write_text("saved")
    copy_companions(source, folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
    assert (folder / "tokenizer.json").read_text() == "source tokenizer.json"
    assert (folder / "generation_config.json").read_text() == "saved"


class _SavesConfigThenFails:
    """A model whose save writes its config, then fails (the weights' disk is full)."""

    def __init__(self, config, write_config: bool = True) -> None:
        self.config = config
        self.write_config = write_config

    def save_pretrained(self, folder, **_) -> None:
        if self.write_config:
            self.config.save_pretrained(folder)
        raise OSError("no space left for the weights")


def test_a_save_that_fails_after_its_config_leaves_the_plan_in_the_file(tmp_path):
    model, _ = _planned_model()
    plan = getattr(model.config, tp.hf.RECORD_KEY)
    model.config.save_pretrained(tmp_path / "plain")
    with pytest.raises(OSError, match="no space"):
        tp.hf.save_pretrained(_SavesConfigThenFails(model.config), tmp_path / "failed")
    written = json.loads((tmp_path / "failed" / "config.json").read_text())
    assert written == json.loads((tmp_path / "plain" / "config.json").read_text())
    assert getattr(model.config, tp.hf.RECORD_KEY) is plan
    with pytest.raises(OSError, match="no space"):  # no config written: none is touched
        tp.hf.save_pretrained(_SavesConfigThenFails(model.config, False), tmp_path / "none")
    assert not (tmp_path / "none" / "config.json").exists()


def test_special_floats_in_a_plan_are_written_as_transformers_writes_them(tmp_path):
    model, _ = _planned_model()
    plan = getattr(model.config, tp.hf.RECORD_KEY)
    setattr(model.config, tp.hf.RECORD_KEY, {**plan, "buffers": {"x": [float("nan"), 1.5]}})
    model.config.save_pretrained(tmp_path / "plain")
    tp.hf.save_pretrained(model.config, tmp_path / "compact")
    compact = (tmp_path / "compact" / "config.json").read_text()
    assert json.loads(compact) == json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "NaN" in compact and json.loads(compact, parse_constant=pytest.fail)


def test_pushing_to_the_hub_is_refused_before_anything_is_written(tmp_path):
    model, _ = _planned_model()
    with pytest.raises(ValueError, match="upload_folder"):
        tp.hf.save_pretrained(model, tmp_path / "out", push_to_hub=True)
    assert not (tmp_path / "out").exists()


def test_a_config_whose_plan_is_not_a_plan_is_refused_by_name(tmp_path):
    model, _ = _planned_model()
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config[tp.hf.RECORD_KEY] = "<torchslim_plan written separately>"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(tp.persistence.CheckpointError, match="not a pruning plan"):
        tp.hf.from_pretrained(tmp_path)
