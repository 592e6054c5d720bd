"""Transformers without hand-holding: Hugging Face, timm and torchvision attention models.

Every model gets the same recipe, stated by kind of channel (a quarter of the heads, half of the
MLP neurons, a quarter of the hidden size), with no per-model configuration. Each pruned group
must be exact against the zero-masked original unless it crosses a normalisation, the pruned
model must run with the original output shapes, and a Hugging Face model must come back from
``save_pretrained`` with the same outputs. Tiny random configs only: nothing is downloaded.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any, Callable

import pytest
import torch
from helpers import tiny_llama, tiny_step3p7
from torch import nn

import torchslim as tp
from torchslim.graph.kinds import group_kind

transformers = pytest.importorskip("transformers")
timm = pytest.importorskip("timm")
T = transformers
RECIPE = {"heads": 0.25, "neurons": 0.5, "width": 0.25}
TOKENS = {"input_ids": torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(0))}
PIXELS = {"pixel_values": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))}
COMMON = dict(
    vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=8
)


def _gqa_lm(name: str, plain: bool = True, **extra: Any) -> tuple[Callable, dict, bool]:
    """A tiny causal LM of ``transformers.<name>ForCausalLM`` with 8 query and 4 KV heads."""
    model_class, config_class = getattr(T, f"{name}ForCausalLM"), getattr(T, f"{name}Config")
    return (
        lambda: model_class(config_class(**COMMON, num_key_value_heads=4, **extra)),
        TOKENS,
        plain,
    )


#: name -> (factory, inputs, whether a plain config describes the pruned model)
HF_MODELS: dict[str, tuple[Callable[[], nn.Module], dict, bool]] = {
    "llama-gqa": _gqa_lm("Llama"),
    "qwen2": _gqa_lm("Qwen2"),
    "mistral": _gqa_lm("Mistral"),
    "phi3-fused": _gqa_lm("Phi3", pad_token_id=0),
    # Gemma scales embeddings by sqrt(hidden_size), a value a smaller config would change
    "gemma": _gqa_lm("Gemma", plain=False, head_dim=8),
    "gpt2-conv1d": (
        lambda: T.GPT2LMHeadModel(T.GPT2Config(vocab_size=97, n_embd=64, n_layer=2, n_head=8)),
        TOKENS,
        True,
    ),
    # BERT's pooler is as wide as the hidden size in any config; its neurons are pruned apart
    "bert": (lambda: T.BertForSequenceClassification(T.BertConfig(**COMMON)), TOKENS, False),
    "opt": (
        lambda: T.OPTForCausalLM(
            T.OPTConfig(
                vocab_size=97,
                hidden_size=64,
                ffn_dim=128,
                num_hidden_layers=2,
                num_attention_heads=8,
                word_embed_proj_dim=64,
            )
        ),
        TOKENS,
        True,
    ),
    "vit": (
        lambda: T.ViTForImageClassification(
            T.ViTConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=8,
                image_size=32,
                patch_size=8,
            )
        ),
        PIXELS,
        True,
    ),
    # Swin ties each stage's attention width to its hidden size
    "swin": (
        lambda: T.SwinForImageClassification(
            T.SwinConfig(
                image_size=32,
                patch_size=4,
                embed_dim=16,
                depths=[1, 1],
                num_heads=[2, 4],
                window_size=4,
            )
        ),
        PIXELS,
        False,
    ),
}


def _outputs(model: nn.Module, inputs: Any) -> list[torch.Tensor]:
    from torchslim.capture.modules import call_forward
    from torchslim.spaces.trace import iter_tensors

    with torch.no_grad():
        out = call_forward(model, inputs)
    if hasattr(out, "logits"):
        return [out.logits]
    return list(iter_tensors(out))


def prune_with_recipe(model: nn.Module, inputs: Any) -> tuple[tp.VerifyReport, set[str]]:
    """Prune ``model`` in place with :data:`RECIPE`; each group is verified on its own."""
    torch.manual_seed(0)
    pruner = tp.pruner.MagnitudePruner(model, inputs, pruning_ratio=0.0, pruning_ratio_dict=RECIPE)
    reference = copy.deepcopy(pruner.DG)
    selections = []
    kinds = set()
    with pruner.DG.deferred():
        for group in pruner.step(interactive=True):
            kinds.add(group_kind(group))
            selections.append((reference.group_like(group), list(group.idxs)))
            group.prune()
    return tp.verify(reference, inputs, selections, per_group=True), kinds


@pytest.mark.parametrize("name", list(HF_MODELS))
def test_hugging_face_model_prunes_exactly_and_round_trips(name, tmp_path):
    factory, inputs, plain = HF_MODELS[name]
    model = factory().eval()
    shapes = [t.shape for t in _outputs(model, inputs)]
    dense_params = sum(p.numel() for p in model.parameters())
    report, kinds = prune_with_recipe(model, inputs)
    assert report.ok, f"{name}\n{report}"
    assert {"heads", "neurons", "width"} <= kinds, kinds
    assert any(c.exact_expected for c in report.checks), "some groups cross no norm"
    assert sum(p.numel() for p in model.parameters()) < 0.8 * dense_params
    pruned = _outputs(model, inputs)
    assert [t.shape for t in pruned] == shapes
    model.save_pretrained(tmp_path)
    reloaded = tp.hf.from_pretrained(tmp_path)
    assert torch.allclose(_outputs(reloaded, inputs)[0], pruned[0], atol=1e-6)
    assert (not hasattr(model.config, tp.hf.RECORD_KEY)) == plain
    if plain:
        vanilla = type(model).from_pretrained(tmp_path).eval()
        assert torch.allclose(_outputs(vanilla, inputs)[0], pruned[0], atol=1e-6)
    else:
        with pytest.raises(RuntimeError, match="mismatched_sizes|size mismatch"):
            type(model).from_pretrained(tmp_path)


@pytest.mark.parametrize("name", ["llama-gqa", "phi3-fused", "gpt2-conv1d"])
def test_pruned_language_models_generate_with_the_kv_cache(name):
    factory, inputs, _ = HF_MODELS[name]
    model = factory().eval()
    prune_with_recipe(model, inputs)
    ids = inputs["input_ids"][:1]
    cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True)
    uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached) and cached.shape[1] == ids.shape[1] + 6


def test_grouped_query_attention_keeps_the_query_to_kv_ratio():
    factory, inputs, _ = HF_MODELS["llama-gqa"]
    model = factory().eval()
    prune_with_recipe(model, inputs)
    attention = model.model.layers[0].self_attn
    assert model.config.num_attention_heads == 6 and model.config.num_key_value_heads == 3
    assert attention.q_proj.out_features == 6 * 8 and attention.k_proj.out_features == 3 * 8
    assert model.config.hidden_size == 48 and model.config.intermediate_size == 64


def _timm_and_torchvision() -> dict[str, Callable[[], nn.Module]]:
    from timm.models.beit import Beit
    from timm.models.convnext import ConvNeXt
    from timm.models.eva import Eva
    from timm.models.metaformer import MetaFormer
    from timm.models.mlp_mixer import MlpMixer
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.vision_transformer import VisionTransformer
    from torchvision.models import maxvit, swin_transformer, vision_transformer
    from torchvision.models.video import mvit

    vit = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
    return {
        "timm-vit": lambda: VisionTransformer(**vit),
        "timm-deit-distilled": lambda: timm.models.deit.VisionTransformerDistilled(**vit),
        "timm-eva-rope": lambda: Eva(**vit, use_rot_pos_emb=True),
        "timm-beit": lambda: Beit(**vit, use_rel_pos_bias=True),
        "timm-swin": lambda: SwinTransformer(
            img_size=32,
            patch_size=2,
            window_size=4,
            embed_dim=16,
            depths=(2, 2),
            num_heads=(2, 4),
            num_classes=10,
        ),
        "timm-convnext": lambda: ConvNeXt(
            depths=(1, 1, 1, 1), dims=(8, 16, 24, 32), num_classes=10
        ),
        "timm-mixer": lambda: MlpMixer(
            img_size=32, patch_size=8, num_blocks=2, embed_dim=64, num_classes=10
        ),
        "timm-poolformer": lambda: MetaFormer(
            depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_classes=10
        ),
        "torchvision-vit": lambda: vision_transformer.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128
        ),
        "torchvision-swin": lambda: swin_transformer.SwinTransformer(
            patch_size=[4, 4],
            embed_dim=16,
            depths=[2, 2],
            num_heads=[2, 4],
            window_size=[4, 4],
            num_classes=10,
        ),
        "torchvision-mvit": lambda: mvit.MViT(
            spatial_size=(32, 32),
            temporal_size=4,
            block_setting=[
                mvit.MSBlockConfig(2, 16, 16, [3, 3, 3], [3, 3, 3], [1, 1, 1], [1, 2, 2]),
                mvit.MSBlockConfig(4, 16, 32, [3, 3, 3], [3, 3, 3], [1, 2, 2], [1, 1, 1]),
            ],
            residual_pool=True,
            residual_with_cls_embed=False,
            rel_pos_embed=True,
            proj_after_attn=True,
            num_classes=10,
        ),
        "torchvision-maxvit": lambda: maxvit.MaxVit(
            input_size=(32, 32),
            stem_channels=16,
            partition_size=4,
            block_channels=[16, 32],
            block_layers=[1, 1],
            head_dim=8,
            stochastic_depth_prob=0.0,
            num_classes=10,
        ),
    }


VISION = _timm_and_torchvision()


@pytest.mark.parametrize("name", list(VISION))
def test_vision_transformer_prunes_exactly_and_keeps_running(name):
    model = VISION[name]().eval()
    shape = (1, 3, 4, 32, 32) if "mvit" in name else (1, 3, 32, 32)
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(1))
    shapes = [t.shape for t in _outputs(model, images)]
    dense_params = sum(p.numel() for p in model.parameters())
    report, kinds = prune_with_recipe(model, images)
    assert report.ok, f"{name}\n{report}"
    assert kinds & {"heads", "neurons", "width"}, kinds
    assert [t.shape for t in _outputs(model, images)] == shapes
    assert sum(p.numel() for p in model.parameters()) < 0.9 * dense_params


def test_timm_attention_attributes_follow_the_heads():
    model = VISION["timm-vit"]().eval()
    prune_with_recipe(model, torch.rand(1, 3, 32, 32))
    attention = model.blocks[0].attn
    assert attention.num_heads == 3 and attention.qkv.out_features == 3 * 3 * attention.head_dim
    assert model.blocks[0].mlp.fc1.out_features == 128 and model.embed_dim == 64


def test_a_graph_traced_on_meta_prunes_the_real_weights_alike():
    factory, inputs, _ = HF_MODELS["llama-gqa"]
    torch.manual_seed(0)
    model = factory().eval()
    twin_traced = copy.deepcopy(model)
    for target, on_meta in ((model, False), (twin_traced, True)):
        pruner = tp.pruner.MagnitudePruner(
            target, inputs, pruning_ratio=0.0, pruning_ratio_dict=RECIPE, trace_on_meta=on_meta
        )
        pruner.step()
    assert all(p.device.type == "cpu" for p in twin_traced.parameters())
    assert torch.equal(_outputs(model, inputs)[0], _outputs(twin_traced, inputs)[0])
    assert model.config.to_dict() == twin_traced.config.to_dict()


def test_pruned_weights_are_freed_not_kept_by_the_graph():
    import gc
    import weakref

    factory, inputs, _ = HF_MODELS["llama-gqa"]
    model = factory().eval()
    graph = tp.DependencyGraph().build_dependency(model, inputs, trace_on_meta=True)
    old = weakref.ref(model.model.layers[0].mlp.gate_proj.weight)
    group = graph.get_pruning_group(
        model.model.layers[0].mlp.gate_proj, tp.prune_linear_out_channels, [0, 1]
    )
    group.prune()
    gc.collect()
    assert old() is None and model.model.layers[0].mlp.gate_proj.out_features == 126


def _calibrated(
    kind: str, model: nn.Module, batches: list[torch.Tensor]
) -> tp.importance.Importance:
    if kind == "wanda":
        importance = tp.importance.WandaImportance()
        with importance.record(model), torch.no_grad():
            for ids in batches:
                model(ids)
        return importance
    for ids in batches:
        model(ids, labels=ids).loss.backward()
    return tp.importance.TaylorImportance()


@pytest.mark.parametrize("kind", ["wanda", "taylor"])
def test_calibrated_importance_chooses_the_heads_and_neurons_of_lowest_score(kind):
    factory, inputs, _ = HF_MODELS["llama-gqa"]
    torch.manual_seed(0)
    model = factory().eval()
    batches = [
        torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(s)) for s in (1, 2)
    ]
    importance = _calibrated(kind, model, batches)
    pruner = tp.pruner.MetaPruner(
        model, inputs, importance=importance, pruning_ratio=0.0, pruning_ratio_dict=RECIPE
    )
    chosen = {}
    for group in pruner.step(interactive=True):
        scores = importance(group)
        assert scores is not None, f"{kind} scores {group_kind(group)} groups"
        lowest = sorted(scores.argsort()[: len(group.idxs)].tolist())
        chosen[group_kind(group)] = group.idxs == lowest
        group.prune()
    assert chosen == {"heads": True, "neurons": True, "width": True}
    assert torch.isfinite(_outputs(model, inputs)[0]).all()


def test_a_checkpoint_whose_weights_do_not_fit_its_plan_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    factory, inputs, _ = HF_MODELS["bert"]
    model = factory().eval()
    prune_with_recipe(model, inputs)
    model.save_pretrained(tmp_path)
    weights = load_file(str(tmp_path / "model.safetensors"))
    name = next(k for k in weights if k.endswith("intermediate.dense.weight"))
    weights[name] = weights[name][:-1]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(tp.CheckpointError, match="do not fit the replayed plan"):
        tp.hf.from_pretrained(tmp_path)


def test_multi_query_attention_prunes_query_heads_around_the_single_kv_head():
    model = T.LlamaForCausalLM(T.LlamaConfig(**COMMON, num_key_value_heads=1)).eval()
    report, kinds = prune_with_recipe(model, TOKENS)
    assert report.ok and "heads" in kinds
    assert model.config.num_key_value_heads == 1 and model.config.num_attention_heads == 6
    assert model.model.layers[1].self_attn.k_proj.out_features == 8


def test_load_pruned_leaves_a_hugging_face_config_true_to_the_weights(tmp_path):
    model = tiny_llama()
    x = torch.randint(0, 97, (1, 8))
    recipe = {"heads": 0.5, "neurons": 0.5}
    tp.pruner.MagnitudePruner(model, x, pruning_ratio=0.0, pruning_ratio_dict=recipe).step()
    path = tp.save_pruned(model, tmp_path / "llama.safetensors")
    fresh = tp.load_pruned(tiny_llama(), path)
    assert fresh.config.to_dict() == model.config.to_dict()
    fresh.save_pretrained(tmp_path / "hf")
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    torch.testing.assert_close(reloaded(x).logits, model(x).logits)


def test_a_width_the_config_class_refuses_is_kept_as_a_plan_and_saves(tmp_path):
    """transformers refuses to save a hidden size that is not a multiple of the heads, even
    with ``head_dim`` set: such a width is recorded as a plan, never a config that cannot save."""
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 8))
    with pytest.warns(UserWarning):
        tp.pruner.MagnitudePruner(
            model, ids, pruning_ratio=0.0, pruning_ratio_dict={"width": 0.1}
        ).step()
    assert model.model.embed_tokens.embedding_dim == 29 and model.config.hidden_size == 32
    _reloads_from_its_plan(model, {"input_ids": ids}, tmp_path)


def _reloads_from_its_plan(model: nn.Module, inputs: dict, path) -> nn.Module:
    """``model`` records its widths as a plan, and ``tp.hf.from_pretrained`` rebuilds it (the
    rebuilt model is returned)."""
    assert hasattr(model.config, tp.hf.RECORD_KEY)
    model.save_pretrained(path)
    reloaded = tp.hf.from_pretrained(path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**inputs).logits, model(**inputs).logits)
    return reloaded


def _resnet_stages() -> nn.Module:
    config = T.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 48, 64], depths=[1, 1, 1, 1])
    return T.ResNetForImageClassification(config)


@pytest.mark.parametrize(
    "factory, recipe, fitted",
    [
        # Swin's MLP width is mlp_ratio (a float) times the stage width
        (HF_MODELS["swin"][0], {"neurons": 0.25}, {"mlp_ratio": 3.0}),
        # a ResNet's stage widths are a list of ints
        (_resnet_stages, {"width": 0.25}, {"hidden_sizes": [12, 24, 36, 48]}),
    ],
    ids=["float", "list"],
)
def test_every_fitted_field_is_written_into_the_config_plain_transformers_loads(
    factory, recipe, fitted, tmp_path
):
    """The fitted config's fields reach ``model.config`` whatever their type, not only ints."""
    torch.manual_seed(0)
    model = factory().eval()
    tp.pruner.MagnitudePruner(model, PIXELS, pruning_ratio=0.0, pruning_ratio_dict=recipe).step()
    assert {name: getattr(model.config, name) for name in fitted} == fitted
    assert not hasattr(model.config, tp.hf.RECORD_KEY)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**PIXELS).logits, model(**PIXELS).logits)


def _tiny_segformer(hidden_sizes: Any) -> nn.Module:
    """A seeded Segformer classifier of four one-block stages of ``hidden_sizes`` channels."""
    config = T.SegformerConfig(
        num_labels=3,
        hidden_sizes=hidden_sizes,
        num_attention_heads=[1, 2, 2, 4],
        depths=[1, 1, 1, 1],
        decoder_hidden_size=16,
    )
    torch.manual_seed(0)
    return T.SegformerForImageClassification(config).eval()


@pytest.mark.parametrize("sequence", [list, tuple])
def test_a_config_field_the_models_own_forward_reads_stays_pruned_and_the_plan_reloads(
    sequence, tmp_path
):
    """Segformer's classifier reshapes by ``self.config.hidden_sizes[-1]``: pruning sets it on
    ``model.config`` itself, so the model runs; the stages' widths differ from any config, so
    the plan is recorded and must be replayed from the dense widths, not the saved ones."""
    model = _tiny_segformer(sequence([8, 16, 24, 32]))
    pixels = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    recipe = {"heads": 0.25, "neurons": 0.25, "width": 0.25}
    tp.pruner.MagnitudePruner(
        model, {"pixel_values": pixels}, pruning_ratio=0.0, pruning_ratio_dict=recipe
    ).step()
    assert model.classifier.in_features == model.config.hidden_sizes[-1] == 24
    reloaded = _reloads_from_its_plan(model, {"pixel_values": pixels}, tmp_path)
    assert list(reloaded.config.hidden_sizes) == [8, 16, 24, 24]


def test_a_config_field_the_model_reads_stays_pruned_without_a_recorded_history():
    """The fields the model's own forward reads are known from the pruning itself, not from
    the history a standalone ``Group.prune(record_history=False)`` does not write."""
    model = _tiny_segformer([8, 16, 24, 32])
    pixels = torch.rand(1, 3, 64, 64)
    graph = tp.DependencyGraph().build_dependency(model, {"pixel_values": pixels})
    group = graph.get_pruning_group(model.classifier, tp.prune_linear_in_channels, [0, 1])
    group.prune(record_history=False)
    assert model.config.hidden_sizes == [8, 16, 24, 30]
    with torch.no_grad():
        assert model(pixel_values=pixels).logits.shape == (1, 3)


def test_removing_blocks_keeps_a_plain_config_whatever_the_drop_path_rates():
    """A shallower config spreads drop-path rates over fewer blocks than the remaining ones
    were built with; rates used only in training do not stop a plain config from fitting."""
    config = T.BeitConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        drop_path_rate=0.1,
        num_labels=3,
    )
    torch.manual_seed(0)
    model = T.BeitForImageClassification(config).eval()
    tp.prune_blocks(model, PIXELS, n=1)
    assert model.config.num_hidden_layers == 2
    assert not hasattr(model.config, tp.hf.RECORD_KEY)


def test_a_scale_a_narrower_config_would_change_keeps_the_plan(tmp_path):
    """BioGPT scales its embeddings by ``sqrt(hidden_size)``, a float attribute: a config with
    the pruned hidden size builds every shape but another scale, so it is no fit."""
    config = T.BioGptConfig(**COMMON)
    torch.manual_seed(0)
    model = T.BioGptForCausalLM(config).eval()
    ids = TOKENS["input_ids"]
    with pytest.warns(UserWarning, match="without calibration data"):
        tp.pruner.MagnitudePruner(
            model, ids, pruning_ratio=0.0, pruning_ratio_dict={"heads": 0.25, "width": 0.25}
        ).step()
    assert model.biogpt.embed_tokens.embedding_dim == 48 and model.config.hidden_size == 64
    _reloads_from_its_plan(model, {"input_ids": ids}, tmp_path)


def test_a_config_that_loads_a_fitted_field_back_differently_keeps_the_plan(monkeypatch, tmp_path):
    """A config class may derive a field from others when it loads: a fit whose saved config
    would load back to other widths is not a fit, so the plan is recorded instead."""
    original = T.LlamaConfig.from_dict.__func__

    def from_dict(cls, config_dict, **kwargs):  # the MLP width always follows the hidden size
        derived = {**config_dict, "intermediate_size": 2 * config_dict["hidden_size"]}
        return original(cls, derived, **kwargs)

    monkeypatch.setattr(T.LlamaConfig, "from_dict", classmethod(from_dict))
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 8))
    recipe = {"neurons": 0.5}
    with pytest.warns(UserWarning, match="without calibration data"):
        tp.pruner.MagnitudePruner(model, ids, pruning_ratio=0.0, pruning_ratio_dict=recipe).step()
    assert model.model.layers[0].mlp.down_proj.in_features == 32
    assert model.config.intermediate_size == 64
    _reloads_from_its_plan(model, {"input_ids": ids}, tmp_path)


def _per_layer_heads(model: nn.Module, layers: nn.ModuleList) -> list[int]:
    """Prunes 40% of the heads ranked across layers (layer 0's weights scaled by 10, so the
    layers keep different head counts); returns the head count of each layer."""
    with torch.no_grad():
        for weight in layers[0].self_attn.parameters():
            weight.mul_(10)
    ids = torch.randint(0, 97, (1, 8), generator=torch.Generator().manual_seed(0))
    recipe = {"heads": 0.4}
    with pytest.warns(UserWarning, match="without calibration data"):
        tp.pruner.MagnitudePruner(
            model, ids, pruning_ratio=0.0, pruning_ratio_dict=recipe, global_pruning=True
        ).step()
    return [layer.self_attn.q_proj.out_features // 8 for layer in layers]


def test_per_layer_head_counts_become_the_per_layer_config_transformers_loads(tmp_path):
    """Step3p7 builds each layer's attention from ``config.per_layer_config[i]`` (its config is
    heterogeneous before pruning): head counts that differ per layer are written as per-layer
    overrides, and plain ``from_pretrained`` loads the pruned model, no plan recorded."""
    model = tiny_step3p7()
    heads = _per_layer_heads(model, model.layers)
    assert heads == [2, 1, 4]
    config = model.config
    assert not hasattr(config, tp.hf.RECORD_KEY)
    assert [c.num_attention_heads for c in config.per_layer_config] == heads
    assert [c.num_key_value_heads for c in config.per_layer_config] == [1, 1, 2]
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).last_hidden_state, model(ids).last_hidden_state)


@pytest.mark.parametrize("removed", [[0], [1, 2]], ids=["first", "the-overridden-and-last"])
def test_removing_blocks_renumbers_the_per_layer_config_and_a_plan_reloads(removed, tmp_path):
    """Blocks removed from a heterogeneous config take their overrides with them and the others
    move down (a plain reload equals the model); with widths no config can hold too, the plan
    records the dense overrides and ``tp.hf.from_pretrained`` rebuilds the model."""
    ids = torch.randint(0, 97, (1, 8))
    model = tiny_step3p7(4)
    tp.prune_blocks(
        model,
        ids,
        n=len(removed),
        ignored_blocks=[layer for i, layer in enumerate(model.layers) if i not in removed],
    )
    heads = [layer.self_attn.num_heads for layer in model.layers]
    assert heads == [4 if i != 1 else 2 for i in range(4) if i not in removed]
    assert [c.num_attention_heads for c in model.config.per_layer_config] == heads
    model.save_pretrained(tmp_path / "plain")
    reloaded = type(model).from_pretrained(tmp_path / "plain").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).last_hidden_state, model(ids).last_hidden_state)
    recipe = {model.layers[0].mlp: 0.25}  # Step3p7 reads intermediate_size globally
    tp.pruner.MagnitudePruner(model, ids, pruning_ratio=0.0, pruning_ratio_dict=recipe).step()
    assert model.layers[0].mlp.down_proj.in_features == 48
    assert hasattr(model.config, tp.hf.RECORD_KEY)
    model.save_pretrained(tmp_path / "plan")
    reloaded = tp.hf.from_pretrained(tmp_path / "plan").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).last_hidden_state, model(ids).last_hidden_state)


def test_a_class_that_never_reads_per_layer_configs_keeps_the_plan_without_probes(monkeypatch):
    """Llama's code never names ``per_layer_config``: per-layer widths stay a recorded plan, and
    no per-layer probe is built; a class whose code names it (Step3p7) is probed."""
    from torchslim.graph.record import model_record
    from torchslim.hf import config as fitting

    builds = []
    build = fitting.build
    monkeypatch.setattr(fitting, "build", lambda *a, **k: builds.append(a[1]) or build(*a, **k))
    model = tiny_llama(3)
    heads = _per_layer_heads(model, model.model.layers)
    assert len(set(heads)) > 1 and hasattr(model.config, tp.hf.RECORD_KEY)
    assert builds and not any(c.is_heterogeneous for c in builds)
    assert not model_record(model).get("layer_probes")
    step3p7 = tiny_step3p7()
    _per_layer_heads(step3p7, step3p7.layers)
    assert any(model_record(step3p7)["layer_probes"].values())


def test_config_fitting_builds_shapes_without_running_initialisers(monkeypatch):
    """A config fit builds dozens of models on ``meta`` for their shapes alone: their
    initialisers are skipped, and the shapes are those of a model built in full."""
    from torchslim.hf.config import build_shapes, model_shapes

    model = tiny_llama()
    with torch.device("meta"):
        full = model_shapes(type(model)(model.config))
    calls = []
    original = nn.init.kaiming_uniform_
    monkeypatch.setattr(
        nn.init, "kaiming_uniform_", lambda *a, **k: calls.append(1) or original(*a, **k)
    )
    assert build_shapes(type(model), model.config) == full
    assert not calls
    with torch.device("meta"):
        type(model)(model.config)
    assert calls  # the spy sees initialisers where they run


def test_pruning_a_plain_model_loads_nothing_of_transformers_it_had_not_loaded():
    # transformers imports lazily: asking for its PreTrainedModel would load seconds of it
    script = (
        "import sys, torch, transformers, torchslim as tp\n"
        "model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Conv2d(8, 4, 1))\n"
        "tp.pruner.MagnitudePruner(model, torch.randn(1, 3, 8, 8), pruning_ratio=0.5).step()\n"
        "assert model[0].out_channels == 4\n"
        "print('transformers.modeling_utils' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "False"
