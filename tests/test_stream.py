"""Pruning a checkpoint folder shard by shard: the same tensors as pruning in memory, a folder
transformers loads, and nothing written when the input is refused or the run fails."""

from __future__ import annotations

import contextlib
import copy
import json
import re
import sys
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
import yaml
from helpers import TINY_LM, WORDS, tiny_llama, tiny_llama_folder, tiny_step3p7
from torch import nn

import torchslim as tp
from torchslim.hf import output, refit, replay, stream
from torchslim.hf.shards import ShardWriter
from torchslim.pruner.reconstruct import Reconstruction

transformers = pytest.importorskip("transformers")
IDS = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))


def _saved(path: Path, model_class: type, config: Any) -> tuple[nn.Module, Path]:
    """A ``model_class(config)`` with seeded weights, saved in shards of 20 KB into ``path``."""
    torch.manual_seed(0)
    model = model_class(config).eval()
    model.save_pretrained(path, max_shard_size="20KB")
    return model, path


def _checkpoint(path: Path, **extra: Any) -> tuple[nn.Module, Path]:
    model = tiny_llama(3, **extra)
    model.save_pretrained(path, max_shard_size="20KB")
    return model, path


def _in_memory(
    model: nn.Module,
    recipe: dict,
    calibration: Any = None,
    criterion: str = "wanda",
    reconstruct: Optional[Reconstruction] = None,
) -> nn.Module:
    """``model`` pruned in memory by L2 magnitude, or by ``criterion`` recorded on
    ``calibration``; ``reconstruct``: refit as it says."""
    model = copy.deepcopy(model)
    arguments = recipe if "pruning_ratio_dict" in recipe else {"pruning_ratio_dict": recipe}
    if calibration is None:
        importance = tp.importance.MagnitudeImportance(p=2)
        expected_warning = pytest.warns(UserWarning, match="without calibration data")
    else:
        importance = tp.importance.make_importance(criterion)
        with importance.record(model), torch.no_grad():
            model(calibration)
        expected_warning = contextlib.nullcontext()
    with expected_warning:
        tp.pruner.MetaPruner(
            model, IDS[:1], importance=importance, **{"pruning_ratio": 0.0, **arguments}
        ).step(reconstruct=reconstruct)
    return model


def _same_model(loaded: nn.Module, expected: nn.Module) -> None:
    """The same tensors, and ``generate`` gives the same tokens."""
    mine, theirs = loaded.state_dict(), expected.state_dict()
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    with torch.no_grad():
        kwargs = dict(attention_mask=torch.ones_like(IDS), max_new_tokens=5, do_sample=False)
        assert torch.equal(loaded.generate(IDS, **kwargs), expected.generate(IDS, **kwargs))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize(
    "recipe",
    [{"neurons": 0.25}, {"heads": 0.5, "neurons": 0.25, "width": 0.25}],
    ids=["neurons", "heads-neurons-width"],
)
def test_streamed_pruning_writes_the_tensors_pruning_in_memory_gives(
    tied, recipe, tmp_path, monkeypatch
):
    dense, src = _checkpoint(tmp_path / "src", tie_word_embeddings=tied)
    assert len(list(src.glob("*.safetensors"))) > 3
    monkeypatch.setattr(output, "PIECE_BYTES", 4000)  # the embeddings: 31 rows at a time
    blocks = []
    add = ShardWriter.add
    monkeypatch.setattr(ShardWriter, "add", lambda self, *a: blocks.append(a[2:]) or add(self, *a))
    report = tp.hf.prune_checkpoint(src, tmp_path / "out", recipe, max_shard_bytes=30_000)
    assert {31, 62, 93} <= {start for (start,) in blocks}
    expected = _in_memory(dense, recipe)
    assert report.plain_config and report.params_after == sum(
        p.numel() for p in expected.parameters()
    )
    assert report.bytes_read > 0 and report.bytes_written > 0
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    _same_model(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval(), expected
    )
    assert (tmp_path / "out" / "generation_config.json").is_file()


def _counting_reads(monkeypatch: pytest.MonkeyPatch) -> Counter:
    reads: Counter = Counter()
    get = stream.ShardReader.get
    monkeypatch.setattr(
        stream.ShardReader,
        "get",
        lambda self, name, *a: reads.update([name]) or get(self, name, *a),
    )
    return reads


def test_a_layer_is_written_from_the_copy_its_scores_were_read_into(tmp_path, monkeypatch):
    dense, src = _checkpoint(tmp_path / "src")
    mlp = dense.model.layers[0].mlp
    one_mlp = sum(layer.weight.numel() * 4 for layer in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    recipe = {"heads": 0.5, "neurons": 0.25, "width": 0.25}
    size = sum(p.numel() * 4 for p in dense.parameters())
    plan_ahead, budgets, read = stream.plan_ahead, [], {}
    for label, keep in [("none", False), ("largest group", True)]:

        def planned(*args, keep=keep):
            ahead = plan_ahead(*args)
            budgets.append(ahead.largest_group)
            ahead.largest_group *= keep
            return ahead

        monkeypatch.setattr(replay, "KEEP_BYTES", 0)  # the budget: the largest group alone
        monkeypatch.setattr(stream, "plan_ahead", planned)
        reads = _counting_reads(monkeypatch)
        out = tmp_path / label
        read[label] = tp.hf.prune_checkpoint(src, out, recipe).bytes_read / size
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        _same_model(loaded, _in_memory(dense, recipe))
        monkeypatch.undo()
    assert budgets == [one_mlp] * 2  # a layer's MLP, not the hidden width spanning all layers
    # kept: a layer's tensors are read for the width's scores, then for their own group's, and
    # written from that copy (none kept: read a third time to be written)
    assert reads["model.layers.2.mlp.up_proj.weight"] == 2
    assert read["none"] > 2.7 and read["largest group"] < 2.0


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("importance", ["magnitude", "wanda", "fluctuation"])
def test_a_tensor_the_kept_copies_cannot_hold_is_scored_a_block_of_rows_at_a_time(
    importance, tied, tmp_path, monkeypatch
):
    dense, src = _checkpoint(tmp_path / "src", tie_word_embeddings=tied)
    calibration = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    calibrated = importance != "magnitude"
    recipe = {"heads": 0.5, "neurons": 0.25, "width": 0.25}
    monkeypatch.setattr(replay, "KEEP_BYTES", 0)
    monkeypatch.setattr(replay.CheckpointTensors, "keep_at_least", lambda self, size: None)
    monkeypatch.setattr(stream, "PIECE_BYTES", 4000)  # the embeddings: 31 rows at a time
    monkeypatch.setattr(output, "PIECE_BYTES", 4000)
    reads = []
    get = stream.ShardReader.get
    monkeypatch.setattr(
        stream.ShardReader,
        "get",
        lambda self, name, rows=slice(None): reads.append((name, rows)) or get(self, name, rows),
    )
    arguments = {"importance": importance, "calibration": calibration} if calibrated else {}
    tp.hf.prune_checkpoint(src, tmp_path / "out", recipe, **arguments)
    embeddings = [r for r in reads if r[0] in ("model.embed_tokens.weight", "lm_head.weight")]
    if calibrated:  # the calibration forward looks rows up in the whole table
        assert embeddings[0] == ("model.embed_tokens.weight", slice(None))
        embeddings = embeddings[1:]
    stored = {"model.embed_tokens.weight"} | (set() if tied else {"lm_head.weight"})
    assert {name for name, _ in embeddings} == stored
    assert all(rows.stop - rows.start <= 31 for _, rows in embeddings)
    expected = _in_memory(dense, recipe, calibration if calibrated else None, importance)
    _same_model(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval(), expected
    )


def test_a_step_that_departs_from_the_plan_made_ahead_is_written_after_it(tmp_path, monkeypatch):
    dense, src = _checkpoint(tmp_path / "src")
    recipe = {"heads": 0.5, "neurons": 0.25}
    plan_ahead = stream.plan_ahead
    other = {"pruning_ratio_dict": {"heads": 0.5, "neurons": 0.5}}  # as many operations
    monkeypatch.setattr(
        stream, "plan_ahead", lambda p, layers, ids, a: plan_ahead(p, layers, ids, {**a, **other})
    )
    tp.hf.prune_checkpoint(src, tmp_path / "planned", recipe)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "planned").eval()
    _same_model(loaded, _in_memory(dense, recipe))
    monkeypatch.undo()

    finish = output.StreamedOutput.finish
    rewritten = []

    def undone_after_writing(self, stored):  # as if the safety net undid a written group
        ref = next(iter(self.written))
        self.written[ref] = [[{"module": ref[0], "role": "out", "idxs": [0]}]]
        rewritten.append(self.layers.keys[ref])
        return finish(self, stored)

    monkeypatch.setattr(output.StreamedOutput, "finish", undone_after_writing)
    writes = []
    add = ShardWriter.add
    monkeypatch.setattr(ShardWriter, "add", lambda self, *a: writes.append(a[0]) or add(self, *a))
    tp.hf.prune_checkpoint(src, tmp_path / "undone", recipe)
    assert writes.count(rewritten[0]) == 2
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "undone").eval()
    _same_model(loaded, _in_memory(dense, recipe))


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_wanda_records_one_module_at_a_time_and_chooses_what_wanda_in_memory_chooses(
    tied, tmp_path, monkeypatch
):
    dense, src = _checkpoint(tmp_path / "src", tie_word_embeddings=tied)
    calibration = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    recipe = {"heads": 0.5, "neurons": 0.25, "width": 0.25}
    reads = []
    get = stream.ShardReader.get
    monkeypatch.setattr(
        stream.ShardReader, "get", lambda self, name, *a: reads.append(name) or get(self, name, *a)
    )
    tp.hf.prune_checkpoint(
        src, tmp_path / "out", recipe, importance="wanda", calibration=calibration
    )
    recorded = reads[: next(k for k, name in enumerate(reads) if name in reads[:k])]
    assert "model.norm.weight" in recorded and "model.layers.2.mlp.down_proj.weight" in recorded
    if not tied:  # read only once all modules ran: no logits were computed
        assert "lm_head.weight" in reads and "lm_head.weight" not in recorded
    expected = _in_memory(dense, recipe, calibration)
    magnitude = _in_memory(dense, recipe)
    widths = [layer.mlp.down_proj.in_features for layer in expected.model.layers]
    assert (
        not torch.equal(  # the statistics change the choice
            expected.model.layers[0].mlp.down_proj.weight,
            magnitude.model.layers[0].mlp.down_proj.weight,
        )
        and widths == [48] * 3
    )
    _same_model(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval(), expected
    )
    for bad, match in [
        ({"importance": "wanda"}, "needs calibration token ids"),
        ({"importance": "taylor"}, "cannot be streamed: choose one of magnitude, wanda, fluc"),
        ({"calibration": calibration}, "magnitude needs no calibration"),
        ({"importance": "wanda", "calibration": calibration.float()}, r"token ids \[sequences"),
        ({"importance": "wanda", "calibration": []}, "needs calibration token ids, got none"),
        ({"importance": "wanda", "calibration": calibration[:0]}, "an empty batch"),
        ({"calibration_dtype": torch.float32}, "forward of a calibrated criterion"),
        ({"reconstruct": True}, "reconstruct=True refits on the calibration token ids"),
        ({"reconstruct": "yes"}, "reconstruct: True, False or a Reconstruction, got 'yes'"),
        ({"reconstruct": Reconstruction([calibration], add_bias=True)}, "adds no bias"),
        ({"reconstruct": Reconstruction([calibration.float()])}, r"token ids \[sequences"),
        (
            {"importance": "wanda", "calibration": calibration, "calibration_dtype": torch.int8},
            "calibration_dtype=torch.int8: a floating-point dtype",
        ),
    ]:
        with pytest.raises(ValueError, match=match):
            tp.hf.prune_checkpoint(src, tmp_path / "never", recipe, **bad)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize(
    "recipe, criterion, max_memory, layer_runs",
    [  # Wanda's calibration, then the one statistics run over all layers
        ({"neurons": 0.25}, "wanda", 2 << 30, 2),
        # four statistics runs in each layer (the budget holds two of its seven inputs' moments
        # at a time), then one carrying the refit layer's outputs on
        ({"heads": 0.5, "neurons": 0.25, "width": 0.25}, "magnitude", 20_000, 5),
    ],
    ids=["one-run", "runs-within-layers"],
)
def test_reconstruction_streams_a_decoder_layer_at_a_time_and_refits_as_in_memory(
    recipe, criterion, max_memory, layer_runs, tmp_path, monkeypatch
):
    dense, src = _checkpoint(tmp_path / "src")
    calibration = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    config = Reconstruction([calibration], max_memory=max_memory)
    calibrated = calibration if criterion != "magnitude" else None
    expected = _in_memory(dense, recipe, calibrated, criterion, config)
    unrefit = _in_memory(dense, recipe, calibrated, criterion)
    layer = transformers.models.llama.modeling_llama.LlamaDecoderLayer
    runs, forward = Counter(), layer.forward

    def counted(self, hidden, *args, **kwargs):
        runs[self.self_attn.layer_idx] += hidden.device.type != "meta"
        return forward(self, hidden, *args, **kwargs)

    monkeypatch.setattr(layer, "forward", counted)
    report = tp.hf.prune_checkpoint(
        src,
        tmp_path / "out",
        recipe,
        importance=criterion,
        calibration=calibrated,  # magnitude: the batches are the refit's own
        reconstruct=config,
    )
    monkeypatch.undo()
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    _same_model(loaded, expected)
    assert not torch.equal(
        expected.model.layers[2].mlp.down_proj.weight, unrefit.model.layers[2].mlp.down_proj.weight
    )
    refit = report.reconstruction.layers
    assert len(refit) == (22 if "width" in recipe else 3)  # 7 a layer and the LM head
    assert refit[0].after < refit[0].before
    assert "reconstruction (deliberate weight change)" in str(report)
    assert runs == {0: layer_runs, 1: layer_runs, 2: layer_runs}  # not more for early layers


@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["in-bf16", "in-float32"])
def test_a_bfloat16_checkpoint_refits_as_it_does_loaded_in_the_calibration_dtype(
    dtype, tmp_path, monkeypatch
):
    tiny_llama(3).to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    calibration = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    recipe = {"heads": 0.5, "neurons": 0.25}
    monkeypatch.setattr(stream, "native_bfloat16", lambda: True)  # no warning: it is tiny
    tp.hf.prune_checkpoint(
        tmp_path / "bf16",
        tmp_path / "out",
        recipe,
        importance="wanda",
        calibration=calibration,
        reconstruct=True,
        calibration_dtype=dtype,
    )
    loaded = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "bf16", dtype=dtype or torch.bfloat16
    ).eval()
    expected = _in_memory(loaded, recipe, calibration, "wanda", Reconstruction([calibration]))
    streamed = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
    expected_state = expected.to(torch.bfloat16).state_dict()
    assert streamed.keys() == expected_state.keys()
    assert all(torch.equal(streamed[k], expected_state[k]) for k in expected_state)


def test_a_streamed_reconstruction_refits_layers_in_or_after_the_decoder_layers():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 4)
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))
            self.heads = nn.ModuleList([nn.Linear(4, 4), nn.Conv1d(4, 4, 1)])

    net = Net()
    assert refit.decoder_layers(net, [net.layers[1], net.heads[0]]) is net.layers
    with pytest.raises(tp.CheckpointError, match="proj is refit but comes before the decoder"):
        refit.decoder_layers(net, [net.proj, net.layers[1]])
    with pytest.raises(tp.CheckpointError, match="no list of decoder layers holding the layers"):
        refit.decoder_layers(net, [net.proj])


def test_a_bfloat16_checkpoint_calibrates_in_float32_as_its_float32_copy_does(
    tmp_path, monkeypatch
):
    dense = tiny_llama(3).to(torch.bfloat16)
    dense.save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    dense.float().save_pretrained(tmp_path / "fp32", max_shard_size="20KB")  # exact copies
    calibration = torch.randint(0, 97, (4, 12), generator=torch.Generator().manual_seed(1))
    recipe = {"heads": 0.5, "neurons": 0.25, "width": 0.25}
    seen: list[torch.dtype] = []
    forward = nn.Linear.forward

    def spied(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if not x.is_meta:  # the calibration forward, not the trace
            seen.append(x.dtype)
        return forward(self, x)

    tables: list[torch.dtype] = []
    lookup = nn.Embedding.forward

    def spied_lookup(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
        if not self.weight.is_meta:
            tables.append(self.weight.dtype)
        return lookup(self, ids)

    monkeypatch.setattr(nn.Linear, "forward", spied)
    monkeypatch.setattr(nn.Embedding, "forward", spied_lookup)
    monkeypatch.setattr(stream, "native_bfloat16", lambda: False)
    wanda = {"importance": "wanda", "calibration": calibration}
    with pytest.warns(UserWarning, match="calibration_dtype=torch.float32"):
        tp.hf.prune_checkpoint(tmp_path / "bf16", tmp_path / "slow", recipe, **wanda)
    assert seen and set(seen) == {torch.bfloat16}
    seen.clear()
    tables.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tp.hf.prune_checkpoint(
            tmp_path / "bf16", tmp_path / "out", recipe, calibration_dtype=torch.float32, **wanda
        )
    assert not [w for w in caught if "calibration_dtype" in str(w.message)]
    assert seen and set(seen) == {torch.float32}
    assert tables and set(tables) == {torch.bfloat16}  # rows cast, never a float32 table
    tp.hf.prune_checkpoint(tmp_path / "fp32", tmp_path / "out32", recipe, **wanda)
    mine, theirs = _tensors(tmp_path / "out"), _tensors(tmp_path / "out32")
    assert set(mine) == set(theirs)
    assert all(t.dtype == torch.bfloat16 for t in mine.values())
    assert all(torch.equal(mine[k], theirs[k].to(torch.bfloat16)) for k in theirs)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for file in folder.glob("*.safetensors") for k, v in load_file(file).items()}


def test_per_layer_widths_stream_into_a_plan_and_bfloat16_stays(tmp_path):
    dense = tiny_llama(3).to(torch.bfloat16)
    with torch.no_grad():
        dense.model.layers[0].mlp.down_proj.weight.mul_(4)  # layer 0's neurons score higher
    dense.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    recipe = {"pruning_ratio_dict": {"neurons": 0.3}, "global_pruning": True}
    report = tp.hf.prune_checkpoint(tmp_path / "src", tmp_path / "out", recipe)
    assert not report.plain_config
    loaded = tp.hf.from_pretrained(tmp_path / "out").eval()
    source = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "src").eval()
    expected = _in_memory(source, recipe)  # as loaded: rotary frequencies in float32
    widths = [layer.mlp.down_proj.in_features for layer in loaded.model.layers]
    assert widths == [layer.mlp.down_proj.in_features for layer in expected.model.layers]
    assert len(set(widths)) > 1
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    mine, theirs = loaded.state_dict(), expected.state_dict()
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected(IDS).logits)


def test_per_layer_head_counts_stream_into_the_per_layer_config_transformers_loads(tmp_path):
    """A class that builds each layer from ``config.per_layer_config[i]`` (Step3p7) gets its
    per-layer head counts as overrides in the written config: plain ``from_pretrained`` loads
    the streamed checkpoint, equal to the model pruned in memory."""
    dense = tiny_step3p7()
    with torch.no_grad():
        for weight in dense.layers[0].self_attn.parameters():
            weight.mul_(10)
    dense.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    recipe = {"pruning_ratio_dict": {"heads": 0.4}, "global_pruning": True}
    report = tp.hf.prune_checkpoint(tmp_path / "src", tmp_path / "out", recipe)
    assert report.plain_config
    assert report.changed == {
        "per_layer_config[0].num_attention_heads": (4, 2),
        "per_layer_config[0].num_key_value_heads": (2, 1),
        "per_layer_config[1].num_key_value_heads": (2, 1),
        "per_layer_config[1].num_attention_heads": (2, 1),
    }
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "torchslim_plan" not in written and set(written["per_layer_config"]) == {"0", "1"}
    loaded = type(dense).from_pretrained(tmp_path / "out").eval()
    expected = _in_memory(dense, recipe)
    mine, theirs = loaded.state_dict(), expected.state_dict()
    assert set(mine) == set(theirs) and all(torch.equal(mine[k], theirs[k]) for k in theirs)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).last_hidden_state, expected(IDS).last_hidden_state)


@pytest.mark.parametrize(
    "recipe, wanda",
    [({"neurons": 0.25}, False), ({"heads": 0.5, "width": 0.25}, False), ({"neurons": 0.25}, True)],
)
def test_a_checkpoint_pruned_to_per_layer_widths_streams_further(tmp_path, recipe, wanda):
    dense = tiny_llama(3)
    with torch.no_grad():
        dense.model.layers[0].mlp.down_proj.weight.mul_(4)
    dense.save_pretrained(tmp_path / "src", max_shard_size="20KB")
    first = {"pruning_ratio_dict": {"neurons": 0.3}, "global_pruning": True}
    assert not tp.hf.prune_checkpoint(tmp_path / "src", tmp_path / "once", first).plain_config
    calibration = IDS if wanda else None
    options = {"importance": "wanda", "calibration": calibration} if wanda else {}
    tp.hf.prune_checkpoint(tmp_path / "once", tmp_path / "twice", recipe, **options)
    source = tp.hf.from_pretrained(tmp_path / "once").eval()
    expected = _in_memory(source, recipe, calibration)
    loaded = tp.hf.from_pretrained(tmp_path / "twice").eval()
    widths = [layer.mlp.down_proj.in_features for layer in loaded.model.layers]
    assert widths == [layer.mlp.down_proj.in_features for layer in expected.model.layers]
    mine, theirs = loaded.state_dict(), expected.state_dict()
    assert set(mine) == set(theirs)
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, expected(IDS).logits)


def test_a_source_whose_plan_changed_computed_buffers_is_refused(tmp_path):
    model = tiny_llama(3)
    recipe = {"pruning_ratio_dict": {"head_dim": 0.25, "neurons": 0.3}, "global_pruning": True}
    pruned = _in_memory(model, recipe)
    tp.hf.save_pretrained(pruned, tmp_path / "src")
    with pytest.raises(tp.CheckpointError, match=r"change computed buffers \(model.rotary_emb"):
        tp.hf.prune_checkpoint(tmp_path / "src", tmp_path / "out", {"neurons": 0.1})
    assert not (tmp_path / "out").exists()


def test_refused_inputs_and_failed_runs_write_nothing(tmp_path, monkeypatch):
    dense, src = _checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("an earlier result")

    def refused(match: str) -> None:
        with pytest.raises(tp.CheckpointError, match=match):
            tp.hf.prune_checkpoint(src, out, {"neurons": 0.25})
        assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
        assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]

    shard = sorted(src.glob("model-*.safetensors"))[1]
    shard.rename(tmp_path / "aside")
    refused(r"shards listed in model.safetensors.index.json are missing: \['model-00002")
    (tmp_path / "aside").rename(shard)

    index = src / "model.safetensors.index.json"
    listed = json.loads(index.read_text())
    from safetensors.torch import save_file

    save_file({"extra.weight": torch.zeros(3)}, str(src / "extra.safetensors"))
    index.write_text(
        json.dumps(
            {**listed, "weight_map": {**listed["weight_map"], "extra.weight": "extra.safetensors"}}
        )
    )
    refused(r"tensors the config does not explain: \['extra.weight'\]")
    index.write_text(json.dumps(listed))

    calls = []
    write = ShardWriter.add

    def failing(self, name, tensor, start=0):
        calls.append(name)
        if len(calls) == 3:
            raise OSError("disk full")
        write(self, name, tensor, start)

    monkeypatch.setattr(ShardWriter, "add", failing)
    with pytest.raises(OSError, match="disk full"):
        tp.hf.prune_checkpoint(src, out, {"neurons": 0.25})
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    monkeypatch.undo()

    with pytest.raises(tp.CheckpointError, match=r"changes computed buffers \(model.rotary_emb"):
        tp.hf.prune_checkpoint(src, out, {"head_dim": 0.25})
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((src / "config.json").read_text())
    torch.save(dense.state_dict(), pickled / "pytorch_model.bin")
    with pytest.raises(tp.CheckpointError, match=r"pickle \(.bin\) weights"):
        tp.hf.prune_checkpoint(pickled, tmp_path / "never", {"neurons": 0.25})
    assert not (tmp_path / "never").exists()


def test_the_command_line_streams_a_folder_and_prints_what_changed(tmp_path, capsys):
    from torchslim.cli.main import main

    _, src = _checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["prune-hf", str(src), "--out", str(out), "--kinds", "neurons=0.25"]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"intermediate_size\s+64\s+48", printed)
    assert "plain from_pretrained loads it" in printed and "peak memory" in printed
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert [layer.mlp.down_proj.in_features for layer in loaded.model.layers] == [48] * 3
    assert main(["prune-hf", str(src), "--out", str(out)]) == 2
    assert "give --kinds, --ratio or both" in capsys.readouterr().err
    recipe = tmp_path / "out.recipe.yaml"  # the run's options, beside its output
    assert yaml.safe_load(recipe.read_text())["kinds"] == "neurons=0.25"
    again = tmp_path / "again"
    assert main(["prune-hf", str(src), "--out", str(again), "--recipe", str(recipe)]) == 0
    assert re.search(r"intermediate_size\s+64\s+48", capsys.readouterr().out)
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            loaded.state_dict().values(),
            transformers.AutoModelForCausalLM.from_pretrained(again).state_dict().values(),
        )
    )
    recipe.write_text("kinds: neurons=0.25\ninput_shape: 1,16\n")  # an option of `prune`
    assert main(["prune-hf", str(src), "--out", str(again), "--config", str(recipe)]) == 2
    assert "unknown options input_shape" in capsys.readouterr().err


def test_the_ratios_per_kind_follow_the_folder_on_the_command_line_too(tmp_path, capsys):
    from torchslim.cli.main import main

    _, src = _checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    assert main(["prune-hf", str(src), "neurons=0.25", "heads=0.5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"intermediate_size\s+64\s+48", printed)
    assert re.search(r"num_attention_heads\s+4\s+2", printed)
    twice = ["prune-hf", str(src), "neurons=0.25", "--kinds", "neurons=0.5", "--out", str(out)]
    assert main(twice) == 2
    assert "the ratio of neurons is given twice" in capsys.readouterr().err


@pytest.mark.parametrize("criterion", ["wanda", "fluctuation"])
def test_the_command_line_streams_a_criterion_calibrated_on_a_text_file(
    criterion, tmp_path, capsys, monkeypatch
):
    from torchslim.cli.main import main

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # progress bars, as on a terminal
    src = tiny_llama_folder(tmp_path / "src")
    text = tmp_path / "calibration.txt"
    text.write_text(WORDS)
    out = tmp_path / "out"
    calibrated = ["--importance", criterion, "--calibration", str(text)]
    sizes = ["--calibration-size", "64", "--calibration-length", "16"]
    recipe = {"neurons": 0.25, "heads": 0.5}
    kinds = ",".join(f"{kind}={ratio}" for kind, ratio in recipe.items())
    command = ["prune-hf", str(src), "--out", str(out), "--kinds", kinds]
    assert main([*command, *calibrated, *sizes]) == 0
    tokenizer = transformers.AutoTokenizer.from_pretrained(src)
    blocks = tp.hf.token_blocks(tokenizer, WORDS, 16, 4)
    dense = transformers.AutoModelForCausalLM.from_pretrained(src).eval()
    expected = _in_memory(dense, recipe, blocks, criterion)
    other = _in_memory(dense, recipe, blocks, {"wanda": "fluctuation"}.get(criterion, "wanda"))
    assert not torch.equal(  # the two criteria choose differently here
        expected.model.layers[0].mlp.down_proj.weight, other.model.layers[0].mlp.down_proj.weight
    )
    _same_model(transformers.AutoModelForCausalLM.from_pretrained(out).eval(), expected)
    bars = capsys.readouterr().err
    for bar in ("calibrating (read)", "scoring (read)", "writing"):
        assert re.search(rf"{re.escape(bar)}: .*B/s", bars), bar
    assert main([*command, "--importance", criterion]) == 2
    assert f"--importance {criterion} needs --calibration TEXT_FILE" in capsys.readouterr().err
    assert main([*command, "--calibration", str(text)]) == 2
    assert "magnitude needs no data" in capsys.readouterr().err
    assert main([*command, "--calibration-dtype", "float32"]) == 2
    assert "of --importance wanda or fluctuation" in capsys.readouterr().err
    assert main([*command, "--reconstruct"]) == 2
    assert "--reconstruct needs --calibration TEXT_FILE" in capsys.readouterr().err
    refitting = ["prune-hf", str(src), "--out", str(tmp_path / "refit"), "--kinds", kinds]
    assert main([*refitting, *calibrated, *sizes, "--reconstruct"]) == 0
    printed, bars = capsys.readouterr()
    assert re.search(r"reconstruction \(deliberate weight change\): \d+ layers refit", printed)
    assert re.search(r"refitting: .*layer/s", bars)
    expected = _in_memory(dense, recipe, blocks, criterion, Reconstruction([blocks]))
    _same_model(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "refit").eval(), expected
    )


def test_fused_projections_stream_as_they_prune_in_memory(tmp_path):
    """Phi-3: query, key and value in one ``qkv_proj``, gate and up in one ``gate_up_proj``."""
    config = transformers.Phi3Config(**TINY_LM, num_hidden_layers=2, pad_token_id=0)
    dense, _ = _saved(tmp_path / "src", transformers.Phi3ForCausalLM, config)
    recipe = {"heads": 0.5, "neurons": 0.25, "width": 0.25}
    report = tp.hf.prune_checkpoint(tmp_path / "src", tmp_path / "out", recipe)
    assert report.changed["intermediate_size"] == (64, 48)
    expected = _in_memory(dense, recipe)
    assert expected.model.layers[0].mlp.gate_up_proj.out_features == 96
    _same_model(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval(), expected
    )


def test_experts_saved_one_by_one_stream_through_transformers_conversions(tmp_path):
    """Qwen3-MoE: transformers saves the fused experts one expert at a time and merges them
    when it loads; streaming reads them merged and writes the remaining experts back apart."""
    config = transformers.Qwen3MoeConfig(
        **TINY_LM,
        num_hidden_layers=2,
        moe_intermediate_size=32,  # a quarter off leaves 24: a multiple of 8 (grouped_mm)
        num_experts=8,
        num_experts_per_tok=2,
    )
    dense, _ = _saved(tmp_path / "src", transformers.Qwen3MoeForCausalLM, config)
    saved = json.loads((tmp_path / "src" / "model.safetensors.index.json").read_text())
    assert "model.layers.0.mlp.experts.7.gate_proj.weight" in saved["weight_map"]
    recipe = {"experts": 0.25, "neurons": 0.25, "width": 0.25}
    report = tp.hf.prune_checkpoint(
        tmp_path / "src", tmp_path / "out", recipe, max_shard_bytes=30_000
    )
    assert report.changed["num_local_experts"] == (8, 6)
    written = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    experts = {k for k in written["weight_map"] if ".mlp.experts." in k}
    assert "model.layers.1.mlp.experts.5.down_proj.weight" in experts and len(experts) == 36
    expected = _in_memory(dense, recipe)
    assert expected.model.layers[0].mlp.experts.gate_up_proj.shape == (6, 48, 24)
    _same_model(
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval(), expected
    )


def test_onloading_keeps_a_module_s_weights_while_its_children_run(monkeypatch):
    """A module that uses its own parameter after calling a child (GPT-OSS attention's sinks
    after its projections) still holds it then; everything is back on meta afterwards, also
    after a failing forward; the C heap is trimmed as each module's tensors are dropped."""
    from torchslim.hf import onload
    from torchslim.hf.onload import onloaded

    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.Linear(4, 4)
            self.scale = nn.Parameter(torch.ones(4))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) * self.scale

    real = Scaled()
    with torch.no_grad():
        real.scale.mul_(3)
    with torch.device("meta"):
        shell = Scaled()
    state = real.state_dict()

    def read(name: str, attr: str) -> torch.Tensor:
        return state[f"{name}.{attr}" if name else attr]

    x = torch.randn(2, 4)
    trims = []
    on_meta = lambda: (shell.inner.weight.is_meta, shell.scale.is_meta)  # noqa: E731
    monkeypatch.setattr(onload.heap, "trim", lambda: trims.append(on_meta()))
    with onloaded(shell, read), torch.no_grad():
        assert torch.equal(shell(x), real(x))
    assert all(p.is_meta for p in shell.parameters())
    assert trims == [(True, False), (True, True)]  # after the child's forward, then its own
    with pytest.raises(RuntimeError, match="shape"), onloaded(shell, read):
        shell(torch.randn(2, 5))
    assert all(p.is_meta for p in shell.parameters())
    assert not shell._forward_pre_hooks and not shell.inner._forward_hooks


def test_a_computed_buffer_initialisation_leaves_unset_is_refused(tmp_path, monkeypatch):
    _, src = _checkpoint(tmp_path / "src")
    monkeypatch.setattr(transformers.LlamaForCausalLM, "_init_weights", lambda self, m: None)
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(tp.CheckpointError, match=r"leaves the computed buffers \['Llama"):
        tp.hf.prune_checkpoint(
            src, tmp_path / "out", {"neurons": 0.25}, importance="wanda", calibration=ids
        )
    assert not (tmp_path / "out").exists()


def test_pickle_shards_stream_only_when_trusted(tmp_path):
    dense, src = _checkpoint(tmp_path / "src")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((src / "config.json").read_text())
    state = dense.state_dict()
    names = sorted(state)
    halves = {"pytorch_model-00001-of-00002.bin": names[::2]}
    halves["pytorch_model-00002-of-00002.bin"] = names[1::2]
    for file, keys in halves.items():
        torch.save({k: state[k] for k in keys}, pickled / file)
    index = {"weight_map": {k: file for file, keys in halves.items() for k in keys}}
    (pickled / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    recipe = {"heads": 0.5, "neurons": 0.25, "width": 0.25}
    with pytest.raises(tp.CheckpointError, match="or pass trust_pickle=True"):
        tp.hf.prune_checkpoint(pickled, tmp_path / "out", recipe)
    from torchslim.cli.main import main

    kinds = "heads=0.5,neurons=0.25,width=0.25"
    command = ["prune-hf", str(pickled), "--out", str(tmp_path / "out"), "--kinds", kinds]
    assert main([*command, "--trust-pickle"]) == 0
    assert not list((tmp_path / "out").glob("*.bin"))
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    _same_model(loaded, _in_memory(dense, recipe))
    (pickled / "pytorch_model-00002-of-00002.bin").write_bytes(b"not a zip file")
    with pytest.raises(tp.CheckpointError, match="not a state dict torch.load can map"):
        tp.hf.prune_checkpoint(pickled, tmp_path / "never", recipe, trust_pickle=True)
    assert not (tmp_path / "never").exists()
