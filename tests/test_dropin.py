"""torch-pruning 1.6.1 scripts run with ``import torchslim as tp``: every public callable of the
peer's ``torch_pruning``, ``.pruner``, ``.importance``, ``.utils`` and ``.function`` exists here
with its parameters, apart from the lists below (each entry says why)."""

import inspect
import warnings

import pytest
import torch
import torchvision
from helpers import tiny_llama

import torchslim as tp

peer = pytest.importorskip("torch_pruning", reason="pip install -c constraints.txt torch-pruning")

MODULES = ("", "pruner", "importance", "utils", "function")
#: Peer names that make no sense here.
NO_SENSE = {
    "utils.module2type": "maps a module to the peer's OPTYPE enum of its autograd graph; "
    "torchslim has no op-type enum (tp.pruning.layer_kind answers what a layer is)",
    ".Node:grad_fn": "a node of the peer's autograd graph; torchslim traces torch calls",
}


def _gaps() -> set[str]:
    """Peer names missing here (``module.name``) and parameters missing (``module.name:param``)."""
    gaps = set()
    for where in MODULES:
        theirs = getattr(peer, where) if where else peer
        ours = getattr(tp, where, None) if where else tp
        for name in dir(theirs):
            obj = getattr(theirs, name)
            own = (getattr(obj, "__module__", "") or "").startswith("torch_pruning")
            if name.startswith("_") or inspect.ismodule(obj) or not callable(obj) or not own:
                continue  # helpers the peer imports (deepcopy, OrderedDict, typing) are not API
            mine = getattr(ours, name, None)
            if mine is None:
                gaps.add(f"{where}.{name}")
                continue
            try:
                wanted, have = inspect.signature(obj).parameters, inspect.signature(mine).parameters
            except (TypeError, ValueError):
                continue
            if any(p.kind == p.VAR_KEYWORD for p in have.values()):
                continue
            variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            gaps.update(
                f"{where}.{name}:{p}"
                for p in wanted
                if p not in have and wanted[p].kind not in variadic
            )
    return gaps


def test_every_public_name_and_parameter_of_torch_pruning_exists():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gaps = _gaps()
    assert gaps - set(NO_SENSE) == set()


def test_group_items_are_dep_idxs_named_tuples_with_root_idxs():
    model = torchvision.models.resnet18()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 32, 32))
    group = graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, [2, 6, 9])
    dep, idxs = group[0]
    assert group[0][0] is dep is group[0].dep and idxs == [2, 6, 9]
    assert group[0].root_idxs == [2, 6, 9]  # the root layer's index of each position
    assert all(len(item) == 2 for item in group)


def test_a_pruning_history_replays_on_a_fresh_model_and_through_state_dicts(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    fresh = torchvision.models.resnet18().eval()
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(1, 3, 32, 32)
    pruner = tp.MetaPruner(model, x, pruning_ratio=0.3)
    pruner.step()
    history = pruner.pruning_history()
    assert history[0] == ("conv1", True, history[0][2]) and len(history) == len(pruner.DG.history)
    tp.DependencyGraph().build_dependency(fresh, x).load_pruning_history(history)
    with torch.no_grad():
        assert torch.equal(model(x), fresh(x))
    tp.save(tp.state_dict(model), tmp_path / "pruned.pth")
    rebuilt = tp.load_state_dict(
        torchvision.models.resnet18().eval(), tp.load(tmp_path / "pruned.pth")
    )
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def test_state_dicts_saved_by_torch_pruning_load_here():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 32, 32)
    imp = peer.importance.MagnitudeImportance(p=2)
    pruner = peer.pruner.MagnitudePruner(
        model, x, importance=imp, pruning_ratio=0.3, ignored_layers=[model.fc]
    )
    pruner.step()
    rebuilt = tp.load_state_dict(torchvision.models.resnet18().eval(), peer.state_dict(model))
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    assert rebuilt.conv1.out_channels == model.conv1.out_channels < 64


def test_a_file_that_needs_pickled_code_is_refused_by_default(tmp_path):
    torch.save({"net": torchvision.models.resnet18()}, tmp_path / "model.pt")
    with pytest.raises(tp.CheckpointError, match="does not run pickled code"):
        tp.load(tmp_path / "model.pt")


def test_the_peer_spellings_of_options_work():
    scores = torch.tensor([1.0, 3.0, 5.0])
    assert torch.equal(
        tp.importance.normalize(scores, "standarization"),
        tp.importance.normalize(scores, "standardization"),
    )
    layer = torch.nn.Parameter(torch.randn(4, 3))
    assert tp.function.ParameterPruner(pruning_dim=1).prune_out_channels(layer, [0]).shape == (4, 2)
    assert tp.utils.count_params(torch.nn.Linear(3, 4)) == 16
    assert [
        t.shape for t in tp.utils.flatten_as_list({"a": [torch.ones(2)], "b": torch.ones(3)})
    ] == [
        (2,),
        (3,),
    ]


def _vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=64).eval(), torch.randn(1, 3, 64, 64)


def test_the_peer_vit_recipe_with_num_heads_prunes_heads_not_head_sizes():
    model, x = _vit()
    num_heads = {block.attn.qkv: block.attn.num_heads for block in model.blocks}
    pruner = tp.MetaPruner(
        model,
        x,
        pruning_ratio=0.5,
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=0.5,
        ignored_layers=[model.head],
    )
    pruner.step()
    block = model.blocks[0]
    assert (block.attn.num_heads, block.attn.head_dim) == (2, 64)  # 3 heads, half rounded down
    assert block.mlp.fc1.out_features == 384 and model.pos_embed.shape[-1] == 96
    assert model(x).shape == (1, 1000)


def test_declared_heads_stay_unless_prune_num_heads():
    model, x = _vit()
    num_heads = {block.attn.qkv: block.attn.num_heads for block in model.blocks}
    tp.MetaPruner(model, x, pruning_ratio=0.5, num_heads=num_heads).step()
    assert model.blocks[0].attn.num_heads == 3 and model.blocks[0].attn.head_dim < 64


def test_num_heads_that_disagree_with_the_graph_name_the_layer():
    model, x = _vit()
    with pytest.raises(
        ValueError, match=r"num_heads\[blocks.0.attn.qkv\] = 4, but the graph finds 3"
    ):
        tp.MetaPruner(model, x, num_heads={model.blocks[0].attn.qkv: 4})
    with pytest.raises(ValueError, match="finds no heads"):
        tp.MetaPruner(model, x, num_heads={model.blocks[0].mlp.fc1: 4})
    with pytest.raises(ValueError, match=r"out_channel_groups\[blocks.0.mlp.fc1\] = 5"):
        tp.MetaPruner(model, x, out_channel_groups={model.blocks[0].mlp.fc1: 5})


def test_the_peer_llm_recipe_removes_whole_kv_groups():
    model = tiny_llama()
    ids = torch.randint(0, 97, (1, 16))
    num_heads = {}
    for layer in model.model.layers:
        attention = layer.self_attn
        num_heads[attention.q_proj] = model.config.num_attention_heads
        num_heads[attention.k_proj] = num_heads[attention.v_proj] = model.config.num_key_value_heads
    pruner = tp.MetaPruner(
        model,
        ids,
        pruning_ratio=0.25,
        num_heads=num_heads,
        prune_num_heads=True,
        prune_head_dims=False,
        head_pruning_ratio=0.5,
        ignored_layers=[model.lm_head],
    )
    pruner.step()
    config = model.config
    assert (config.num_attention_heads, config.num_key_value_heads) == (2, 1)
    assert (config.intermediate_size, config.hidden_size) == (48, 24)
    assert model(ids).logits.shape == (1, 16, 97)


def test_isomorphic_ranking_prunes_each_structure_by_the_ratio():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 32, 32)
    spread, isomorphic = torchvision.models.resnet18().eval(), torchvision.models.resnet18().eval()
    tp.MetaPruner(spread, x, pruning_ratio=0.5, global_pruning=True).step()
    tp.MetaPruner(isomorphic, x, pruning_ratio=0.5, global_pruning=True, isomorphic=True).step()
    widths = [
        (m.layer4[0].conv1.out_channels, m.layer4[1].conv1.out_channels)
        for m in (spread, isomorphic)
    ]
    assert widths[0] != (256, 256) and widths[1] == (256, 256)  # half of each structure


def test_groups_and_dependencies_are_drawn_as_png(tmp_path):
    model = torchvision.models.resnet18()
    graph = tp.DependencyGraph().build_dependency(model, torch.randn(1, 3, 32, 32))
    drawings = (
        tp.utils.draw_dependency_graph,
        tp.utils.draw_groups,
        tp.utils.draw_computational_graph,
    )
    for draw in drawings:
        path = draw(graph, tmp_path / f"{draw.__name__}.png", figsize=(4, 4), dpi=50)
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    layers, groups = tp.utils.drawing.coupled_layers(graph)
    assert layers[0] == "conv1" and len(groups) == len(list(graph.get_all_groups()))
    residual = next(g for g in groups if layers.index("layer1.0.conv2") in g)
    assert layers.index("layer1.1.conv2") in residual  # the stage's residual stream is one group
    layers, flow = tp.utils.drawing.channel_flow(graph)
    conv1, bn1 = layers.index("layer1.0.conv1"), layers.index("layer1.0.bn1")
    assert flow[conv1, bn1] == 1 and flow[bn1, conv1] == 0  # conv1 makes what bn1 reads
    assert flow[layers.index("layer4.1.conv2"), layers.index("fc")] == 1


def test_growing_regularisation_grows_fastest_on_the_least_important_channels():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 4, 1))
    with torch.no_grad():
        model[0].weight.mul_(torch.arange(1.0, 9.0).view(8, 1, 1, 1))  # channel 0 matters least
    pruner = tp.GrowingRegPruner(model, torch.randn(1, 3, 8, 8), reg=1e-3, delta_reg=1e-2)
    for _ in range(3):
        pruner.update_reg()
    (gamma,) = [g for g in pruner.group_reg.values() if len(g) == 8]
    assert float(gamma[0]) == pytest.approx(1e-3 + 3e-2, rel=1e-6)  # the least important
    assert float(gamma.min()) == pytest.approx(1e-3, rel=1e-6)  # the most important: still reg
    for param in model.parameters():
        param.grad = torch.zeros_like(param)
    pruner.regularize(model)
    expected = gamma.float().view(8, 1, 1, 1) * model[0].weight
    assert torch.allclose(model[0].weight.grad, expected)
    assert torch.allclose(model[2].weight.grad, gamma.float().view(1, 8, 1, 1) * model[2].weight)
    assert torch.equal(model[0].bias.grad, torch.zeros(8))  # biases only with bias=True


def test_obdc_scores_are_obd_with_per_sample_gradients_and_run_the_peer_workflow():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(64, 3)
    ).double()
    batches = [(torch.randn(5, 2, 6, 6).double(), torch.randint(0, 3, (5,))) for _ in range(2)]
    loss_fn = torch.nn.functional.cross_entropy
    fisher = torch.zeros_like(model[0].weight)
    for images, labels in batches:
        for image, label in zip(images, labels):
            (grad,) = torch.autograd.grad(loss_fn(model(image[None]), label[None]), model[0].weight)
            fisher += grad.pow(2)
    expected = (model[0].weight.detach().pow(2) * fisher / len(batches)).flatten(1).sum(1)
    imp = tp.importance.OBDCImportance(normalizer=None, num_classes=3)
    pruner = tp.pruner.MetaPruner(model, batches[0][0], importance=imp, pruning_ratio=0.5)
    imp._prepare_model(model, pruner)
    for images, labels in batches:
        model.zero_grad()
        loss_fn(model(images), labels).backward()
        imp.step()
    group = pruner.DG.get_pruning_group(model[0], tp.prune_conv_out_channels, [0])
    assert torch.allclose(imp(group), expected, rtol=1e-10)
    assert imp(pruner.DG.get_pruning_group(model[3], tp.prune_linear_out_channels, [0])) is None
    original = model[0].weight.detach().clone()
    pruner.step()
    imp._rm_hooks(model)
    imp._clear_buffer()
    kept = sorted(expected.argsort()[2:].tolist())  # the two filters with the highest scores
    assert torch.equal(model[0].weight, original[kept]) and imp.steps == 0
    assert not model[0]._forward_hooks
    layer = torch.nn.Conv2d(2, 4, 3)
    per_sample = tp.importance.ComputeMatGrad()(
        torch.randn(3, 2, 6, 6), torch.randn(3, 4, 4, 4), layer
    )
    assert per_sample.shape == (3, 4, 2 * 9 + 1)  # the bias column last
