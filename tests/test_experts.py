"""Mixture-of-experts layers: experts as a kind, expert neurons and the hidden width through
the fused expert weights, routing kept valid, configs that follow, calibrated expert criteria."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

import torchslim as tp
from torchslim.graph.kinds import group_kind

transformers = pytest.importorskip("transformers")

TOKENS = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
COMMON = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4)
COMMON.update(num_key_value_heads=2, head_dim=8)
FAMILIES = {
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(moe_intermediate_size=16)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=16)),
    "qwen2_moe": (  # shared expert beside the routed ones
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(moe_intermediate_size=16, shared_expert_intermediate_size=24),
    ),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", dict(intermediate_size=16)),  # biases,
    # transposed weights, interleaved gate/up, top-k before the softmax
}
EXPERT_FIELDS = ("num_experts", "num_local_experts")


def _model(family: str, experts: int = 8, top_k: int = 2, **extra: Any) -> nn.Module:
    config_name, model_name, own = FAMILIES[family]
    config_class = getattr(transformers, config_name)
    field = next(f for f in EXPERT_FIELDS if f in config_class().to_dict())
    config = config_class(**COMMON, **own, **{field: experts, "num_experts_per_tok": top_k})
    for name, value in extra.items():
        setattr(config, name, value)
    torch.manual_seed(0)
    return getattr(transformers, model_name)(config).eval()


def _experts(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Experts")]


def _routers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if type(m).__name__.endswith("Router")]


class _NeverSelect(TorchFunctionMode):
    """The dense model whose routers never select the removed experts: their logits -inf."""

    def __init__(self, removed: dict[int, list[int]]) -> None:
        super().__init__()
        self.removed = removed

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func is F.linear and id(args[1]) in self.removed:
            out = out.clone()
            out[..., self.removed[id(args[1])]] = float("-inf")
        return out


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_moe_models_trace_whole_with_experts_as_a_kind(family):
    model = _model(family)
    graph = tp.DependencyGraph().build_dependency(model, TOKENS)
    assert graph.unsupported() == []
    assert graph.traced_on_meta
    kinds: dict[str, list[int]] = {}
    for group in graph.get_all_groups(ignored_layers=[model.lm_head]):
        kinds.setdefault(group_kind(group), []).append(len(group.prunable_idxs))
    assert kinds["experts"] == [8, 8]
    assert 16 in kinds["neurons"]  # the neurons inside the experts, one group per layer
    assert tp.verify(graph, TOKENS).ok


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_half_the_experts_go_the_config_follows_and_reloads_identically(family, tmp_path):
    model = _model(family)
    dense = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(
        model,
        TOKENS,
        importance=tp.importance.MagnitudeImportance(),
        pruning_ratio=0.0,
        pruning_ratio_dict={"experts": 0.5},
        ignored_layers=[model.lm_head],
    )
    removed = {}
    before = [r.weight.detach().clone() for r in _routers(dense)]
    pruner.step()
    for router, dense_router, rows in zip(_routers(model), _routers(dense), before):
        kept = [i for i in range(8) if any(torch.equal(rows[i], w) for w in router.weight)]
        assert len(kept) == 4
        removed[id(dense_router.weight)] = [i for i in range(8) if i not in kept]
    assert [e.num_experts for e in _experts(model)] == [4, 4]
    assert [tuple(e.down_proj.shape)[0] for e in _experts(model)] == [4, 4]
    field = next(f for f in EXPERT_FIELDS if hasattr(model.config, f))
    assert getattr(model.config, field) == 4
    with torch.no_grad(), _NeverSelect(removed):
        expected = dense(TOKENS).logits
    with torch.no_grad():
        got = model(TOKENS).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, got)
        generated = reloaded.generate(TOKENS, max_new_tokens=4, do_sample=False)
        assert torch.equal(generated, model.generate(TOKENS, max_new_tokens=4, do_sample=False))


def test_experts_and_their_neurons_prune_exactly_under_verify():
    """verify compares removed experts with the model whose router never selects them."""
    model = _model("gpt_oss")  # top-k on the logits: a zeroed router row would not be exact
    graph = tp.DependencyGraph().build_dependency(model, TOKENS)
    groups = [g for g in graph.get_all_groups() if group_kind(g) == "experts"]
    report = tp.verify(graph, TOKENS, [(g, [1, 5]) for g in groups])
    assert report.ok and all(c.exact_expected for c in report.checks), str(report)
    neurons = [
        g
        for g in graph.get_all_groups()
        if any(m.ref.name == "down_proj" and m.dim == 1 for m in g.coupling.members)
    ]
    assert len(neurons) == 2
    report = tp.verify(graph, TOKENS, [(g, [0, 3, 5, 6, 7, 10, 12, 15]) for g in neurons])
    assert report.ok and all(c.exact_expected for c in report.checks), str(report)


@pytest.mark.parametrize("kind, ratio", [("neurons", 0.6), ("width", 0.3)])
def test_widths_the_grouped_kernel_reads_stay_multiples_of_16_bytes(kind, ratio):
    """torch._grouped_mm refuses rows that are not a multiple of 16 bytes: 16 expert neurons
    or 32 hidden channels keep a multiple of 8 (bfloat16), the count asked rounded down."""
    model = _model("qwen3_moe")
    graph = tp.DependencyGraph().build_dependency(model, TOKENS)
    neurons = next(g for g in graph.get_all_groups() if "gate_up_proj[dim 1]" in g.root.label)
    assert "% 8) == 0" in neurons.refusal([0, 1, 2]) and neurons.refusal(range(8)) is None
    pruner = tp.pruner.MetaPruner(
        model,
        TOKENS,
        importance=tp.importance.RandomImportance(),
        pruning_ratio=0.0,
        pruning_ratio_dict={kind: ratio},
    )
    with pytest.warns(UserWarning, match=r"8 of the 9 channels asked removed \(.*% 8\) == 0"):
        pruner.step()
    experts = _experts(model)[0]
    assert tuple(experts.down_proj.shape[1:]) == ((32, 8) if kind == "neurons" else (24, 16))
    assert model.config._experts_implementation == "grouped_mm"
    with torch.no_grad():
        assert model(TOKENS).logits.shape == (2, 12, 64)


def test_routing_keeps_top_k_experts():
    model = _model("qwen3_moe", top_k=3)
    pruner = tp.pruner.MetaPruner(
        model, TOKENS, pruning_ratio=0.0, pruning_ratio_dict={"experts": 0.9}
    )
    with pytest.warns(UserWarning, match=r"5 of the 7 channels asked removed \(.*topk"):
        pruner.step()
    assert [e.num_experts for e in _experts(model)] == [3, 3]
    graph = tp.DependencyGraph().build_dependency(model, TOKENS)
    group = next(g for g in graph.get_all_groups() if group_kind(g) == "experts")
    assert "topk" in group.refusal([0])
    with torch.no_grad():
        model(TOKENS)


def test_eager_expert_loops_trace_like_the_fused_kernels():
    model = _model("mixtral")
    model.config._experts_implementation = "eager"
    graph = tp.DependencyGraph().build_dependency(model, TOKENS)
    assert graph.unsupported() == []
    assert sorted(len(g.prunable_idxs) for g in graph.get_all_groups() if g.routes_experts) == [
        8,
        8,
    ]


def _step3p7_moe() -> nn.Module:
    """Step3p7 with a dense layer and a layer of 8 routed experts (and a shared expert)."""
    from transformers.models.step3p7 import configuration_step3p7, modeling_step3p7

    config = configuration_step3p7.Step3p7TextConfig(
        **COMMON,
        intermediate_size=24,
        moe_intermediate_size=16,
        share_expert_dim=16,
        n_routed_experts=8,  # its config copies it into num_local_experts
        num_experts_per_tok=2,
        mlp_layer_types=["dense", "sparse"],
        sliding_window=4,
    )
    torch.manual_seed(0)
    return modeling_step3p7.Step3p7TextModel(config).eval()


def test_experts_without_transformers_flags_and_a_router_that_gathers_its_weights(tmp_path):
    """Step3p7's experts layer follows transformers' fused convention without
    ``use_experts_implementation`` (its layout is read from its weights), and its router reads
    its top-k weights back from its sigmoid scores with ``gather``: the model traces on meta,
    experts are a kind, removing two is exact under verify, and half of them, with a quarter of
    their neurons, prune into a model whose config transformers reloads."""
    model = _step3p7_moe()
    graph = tp.DependencyGraph().build_dependency(model, TOKENS)
    assert graph.unsupported() == [] and graph.traced_on_meta
    groups = [g for g in graph.get_all_groups() if group_kind(g) == "experts"]
    assert [len(g.prunable_idxs) for g in groups] == [8]
    report = tp.verify(graph, TOKENS, [(g, [1, 5]) for g in groups])
    assert report.ok and all(c.exact_expected for c in report.checks), str(report)

    model = _step3p7_moe()
    recipe = {"experts": 0.5, "neurons": 0.25}
    with pytest.warns(UserWarning, match="without calibration data"):
        tp.pruner.MagnitudePruner(
            model, TOKENS, pruning_ratio=0.0, pruning_ratio_dict=recipe
        ).step()
    moe = model.layers[1].mlp
    assert tuple(moe.experts.gate_up_proj.shape) == (4, 24, 32)
    assert tuple(moe.experts.down_proj.shape) == (4, 32, 12)
    assert tuple(moe.gate.e_score_correction_bias.shape) == (4,)
    assert model.config.num_local_experts == 4 and model.config.moe_intermediate_size == 12
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).last_hidden_state, model(TOKENS).last_hidden_state)


class _Experts(nn.Module):
    """A user's experts layer in transformers' fused convention."""

    def __init__(self, experts: int = 4, hidden: int = 8, inner: int = 6) -> None:
        super().__init__()
        self.num_experts, self.has_gate, self.has_bias, self.is_transposed = (
            experts,
            True,
            False,
            False,
        )
        self.gate_up_proj = nn.Parameter(torch.randn(experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.randn(experts, hidden, inner))
        self.act_fn = nn.SiLU()

    def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.act_fn(gate) * up

    def forward(self, hidden, index, weights):
        out = torch.zeros_like(hidden)
        for expert in range(self.num_experts):
            token, slot = torch.where(index == expert)
            h = self._apply_gate(F.linear(hidden[token], self.gate_up_proj[expert]))
            out.index_add_(
                0, token, F.linear(h, self.down_proj[expert]) * weights[token, slot, None]
            )
        return out


class _Moe(nn.Module):
    def __init__(self, count_load: bool) -> None:
        super().__init__()
        self.router = nn.Linear(8, 4)
        self.experts = _Experts()
        self.head = nn.Linear(8, 3)
        self.count_load = count_load

    def forward(self, x):
        weights, index = torch.topk(self.router(x).softmax(-1), 2, dim=-1)
        if self.count_load:  # the indices also read by an op that does not know they select
            self.load = F.one_hot(index, 4).sum((0, 1))
        return self.head(self.experts(x, index, weights))


def test_experts_chosen_by_indices_read_elsewhere_stay_whole():
    x = torch.randn(5, 8)
    graph = tp.DependencyGraph().build_dependency(_Moe(count_load=False), x)
    group = next(g for g in graph.all_groups() if g.routes_experts)
    assert group.prunable_idxs == [0, 1, 2, 3]
    graph = tp.DependencyGraph().build_dependency(_Moe(count_load=True), x)
    group = next(g for g in graph.all_groups() if g.routes_experts)
    assert group.prunable_idxs == []
    assert "positions chosen by value (torch.topk in <model>)" in group.refusal([0])


def test_routing_criteria_rank_by_selections_or_by_what_the_experts_add():
    """Expert 3 is never selected; expert 1 always is, but adds almost nothing; 0 and 2 share
    the other choice. REAP removes 1 and 3, routing frequency 3 and the rarer of 0 and 2."""
    torch.manual_seed(0)
    x = torch.rand(64, 8)
    moe = _Moe(count_load=False)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = moe.router.weight[2, 1] = 1.0
        moe.router.bias.copy_(torch.tensor([0.0, 2.0, 0.0, -1.0]))
        moe.experts.down_proj[1] *= 1e-3
        chosen = torch.topk(moe.router(x), 2, dim=-1).indices.flatten()
    selections = torch.bincount(chosen, minlength=4)
    assert selections[3] == 0 and selections[1] == 64 and selections[0] != selections[2]
    expected = {
        "reap": [0, 2],
        "frequency": sorted(torch.argsort(selections, descending=True)[:2].tolist()),
    }
    for method, kept in expected.items():
        model = copy.deepcopy(moe)
        importance = tp.importance.RoutingImportance(method)
        with importance.record(model), torch.no_grad():
            model(x)
        tp.pruner.MetaPruner(
            model, x, importance=importance, pruning_ratio=0.0, pruning_ratio_dict={"experts": 0.5}
        ).step()
        kept_rows = torch.cat([model.router.weight, model.router.bias[:, None]], 1)
        dense_rows = torch.cat([moe.router.weight, moe.router.bias[:, None]], 1)
        rows = [i for i in range(4) if any(torch.equal(dense_rows[i], r) for r in kept_rows)]
        assert rows == kept, method
        assert model.experts.num_experts == 2


def test_routing_criteria_pass_other_groups_to_their_companion_and_compose_with_refits():
    model = _model("qwen3_moe")
    importance = tp.importance.RoutingImportance("reap", others=tp.importance.WandaImportance())
    with importance.record(model), torch.no_grad():
        model(TOKENS)
    pruner = tp.pruner.MetaPruner(
        model,
        TOKENS,
        importance=importance,
        pruning_ratio=0.0,
        pruning_ratio_dict={"experts": 0.5, "heads": 0.5},
        ignored_layers=[model.lm_head],
    )
    pruner.step(reconstruct=[TOKENS, TOKENS.flip(1)])  # o_proj refit for the removed heads
    assert [r.name for r in pruner.reconstruction.layers] == [
        f"model.layers.{i}.self_attn.o_proj" for i in range(2)
    ]
    assert [e.num_experts for e in _experts(model)] == [4, 4]
    assert [layer.self_attn.o_proj.in_features for layer in model.model.layers] == [16, 16]
    with pytest.raises(ValueError, match="method must be one of"):
        tp.importance.RoutingImportance("popularity")
    assert {"reap", "routing_frequency"} <= set(tp.importance.importance_names())


def test_a_different_expert_count_per_layer_reloads_through_the_plan(tmp_path):
    model = _model("qwen3_moe")
    graph = tp.DependencyGraph().build_dependency(model, TOKENS)
    first, second = [g for g in graph.get_all_groups() if g.routes_experts]
    first.prune([0, 1, 2])
    second.prune([5])
    with torch.no_grad():
        got = model(TOKENS).logits
    model.save_pretrained(tmp_path)
    reloaded = tp.hf.from_pretrained(tmp_path).eval()
    assert [e.num_experts for e in _experts(reloaded)] == [5, 7]
    with torch.no_grad():
        assert torch.equal(reloaded(TOKENS).logits, got)


def test_the_command_line_removes_experts_by_reap_on_a_text(tmp_path, capsys):
    from helpers import WORDS
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from torchslim.cli.main import main

    folder = tmp_path / "moe"
    _model("qwen3_moe").save_pretrained(folder)
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([WORDS], trainers.WordLevelTrainer(special_tokens=["<unk>"]))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer).save_pretrained(folder)
    (tmp_path / "notes.txt").write_text(WORDS)
    argv = ["prune", str(folder), "--kinds", "experts=0.5", "--importance", "reap"]
    argv += ["--calibration", str(tmp_path / "notes.txt"), "--calibration-size", "64"]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 0
    assert re.search(r"experts\s+50%\s+2/2\s+16 -> 8", capsys.readouterr().out)
    pruned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out" / "moe")
    assert pruned.config.num_experts == 4 and [e.num_experts for e in _experts(pruned)] == [4, 4]
