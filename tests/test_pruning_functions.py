"""Layer pruning functions: each pruned layer computes the original on the kept channels."""

import copy
import mmap
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import torchslim as tp

torch.manual_seed(0)
REMOVED = [1, 4, 5]


def keep(total: int, removed=REMOVED) -> list[int]:
    return [i for i in range(total) if i not in removed]


def zeroed(x: torch.Tensor, removed=REMOVED, dim: int = 1) -> torch.Tensor:
    x = x.clone()
    x.index_fill_(dim, torch.tensor(removed), 0.0)
    return x


def random_stats(layer: nn.Module) -> nn.Module:
    with torch.no_grad():
        for name in ("running_mean", "running_var", "weight", "bias"):
            tensor = getattr(layer, name, None)
            if tensor is not None:
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    return layer.eval()


CONVS = [
    (nn.Conv1d(8, 9, 3), (2, 8, 10)),
    (nn.Conv2d(8, 9, 3, bias=False), (2, 8, 6, 6)),
    (nn.Conv3d(8, 9, 2), (1, 8, 4, 4, 4)),
    (nn.ConvTranspose2d(8, 9, 3, stride=2), (2, 8, 5, 5)),
    (nn.Linear(8, 9), (3, 8)),
]


@pytest.mark.parametrize(("layer", "shape"), CONVS)
def test_out_channel_pruning_keeps_the_other_outputs(layer, shape):
    x = torch.randn(shape)
    expected = layer(x)[:, keep(9)]
    fn = tp.prune_linear_out_channels if isinstance(layer, nn.Linear) else tp.prune_conv
    fn(layer, REMOVED)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    width = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    assert width == 6


@pytest.mark.parametrize(("layer", "shape"), CONVS)
def test_in_channel_pruning_equals_zeroed_inputs(layer, shape):
    x = torch.randn(shape)
    dim = -1 if isinstance(layer, nn.Linear) else 1
    expected = layer(zeroed(x, dim=dim))
    fn = tp.prune_linear_in_channels if isinstance(layer, nn.Linear) else tp.prune_conv_in_channels
    fn(layer, REMOVED)
    assert torch.allclose(layer(x.index_select(dim, torch.tensor(keep(8)))), expected, atol=1e-6)
    width = layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels
    assert width == 5


@pytest.mark.parametrize("transposed", [False, True])
def test_grouped_conv_same_offsets_in_every_group(transposed):
    kind = nn.ConvTranspose2d if transposed else nn.Conv2d
    layer = kind(8, 12, 3, groups=4)
    x = torch.randn(2, 8, 5, 5)
    removed_out = [0, 3, 6, 9]  # offset 0 of each group of 3 outputs
    expected = layer(x)[:, keep(12, removed_out)]
    tp.prune_conv_out_channels(layer, removed_out)
    assert (layer.groups, layer.out_channels) == (4, 8)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    removed_in = [1, 3, 5, 7]  # offset 1 of each group of 2 inputs
    expected = layer(zeroed(x, removed_in))
    tp.prune_conv_in_channels(layer, removed_in)
    assert (layer.groups, layer.in_channels) == (4, 4)
    assert torch.allclose(layer(x[:, keep(8, removed_in)]), expected, atol=1e-6)


def test_depthwise_conv_loses_whole_groups():
    layer = nn.Conv2d(8, 8, 3, groups=8, padding=1)
    x = torch.randn(1, 8, 4, 4)
    expected = layer(x)[:, keep(8)]
    tp.prune_depthwise_conv_out_channels(layer, REMOVED)
    assert (layer.groups, layer.in_channels, layer.out_channels) == (5, 5, 5)
    assert layer.weight.shape == (5, 1, 3, 3)
    assert torch.allclose(layer(x[:, keep(8)]), expected, atol=1e-6)


def test_grouped_conv_refuses_a_ragged_selection():
    layer = nn.Conv2d(8, 8, 1, groups=2)
    with pytest.raises(ValueError, match="whole groups of 4 channels, or the same offsets"):
        tp.prune_conv_out_channels(layer, [0, 5, 6])


@pytest.mark.parametrize(
    "layer",
    [
        nn.BatchNorm2d(8),
        nn.InstanceNorm2d(8, affine=True, track_running_stats=True),
        FrozenBatchNorm2d(8),
    ],
)
def test_batchnorm_keeps_running_statistics_aligned(layer):
    random_stats(layer)
    x = torch.randn(2, 8, 3, 3)
    expected = layer(x)[:, keep(8)]
    tp.prune_batchnorm_out_channels(layer, REMOVED)
    assert torch.allclose(layer(x[:, keep(8)]), expected, atol=1e-6)
    assert getattr(layer, "num_features", 5) == 5
    assert layer.running_mean.shape == (5,)
    assert "running_var" in dict(layer.named_buffers())


def test_instance_norm_without_parameters_updates_num_features():
    layer = nn.InstanceNorm1d(8)
    tp.prune_instancenorm_out_channels(layer, REMOVED)
    assert layer.num_features == 5


def test_layer_norm_rms_norm_and_group_norm_update_their_shapes():
    norm = random_stats(nn.LayerNorm(8))
    original = norm.weight.detach().clone()
    tp.prune_layernorm_out_channels(norm, REMOVED)
    assert norm.normalized_shape == (5,)
    assert torch.equal(norm.weight, original[keep(8)])
    rms = random_stats(nn.RMSNorm(8))
    tp.prune_rmsnorm_out_channels(rms, REMOVED)
    assert rms.normalized_shape == (5,) and rms(torch.randn(2, 5)).shape == (2, 5)
    group = random_stats(nn.GroupNorm(2, 8))
    tp.prune_groupnorm_out_channels(group, [0, 1, 2, 3])
    assert group.num_channels == 4 and group(torch.randn(1, 4, 2)).shape == (1, 4, 2)
    with pytest.raises(ValueError, match="not divisible by num_groups=2"):
        tp.prune_groupnorm_out_channels(nn.GroupNorm(2, 8), [0])


def test_norms_can_shrink_to_one_channel():
    """Regression (fuzzer): a 2-channel LayerNorm pruned to 1 kept normalized_shape (2,)."""
    norm = nn.LayerNorm(2)
    tp.prune_layernorm_out_channels(norm, [0])
    assert norm.normalized_shape == (1,) and norm(torch.randn(3, 1)).shape == (3, 1)
    bn = nn.BatchNorm1d(2)
    tp.prune_batchnorm_out_channels(bn, [1])
    assert bn.num_features == 1 and bn.running_var.shape == (1,)


def test_an_rms_norm_like_module_is_recognised():
    class MyRMSNorm(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(width))
            self.hidden_size = width

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True)) * self.weight

    layer = MyRMSNorm(8)
    pruner = tp.pruning.get_pruner(layer)
    assert pruner is not None
    pruner.prune_out_channels(layer, REMOVED)
    assert layer.weight.shape == (5,) and layer.hidden_size == 5


def test_prelu_embedding_and_bare_parameters():
    prelu = nn.PReLU(8)
    with torch.no_grad():
        prelu.weight.copy_(torch.rand(8))
    x = torch.randn(3, 8)
    expected = prelu(x)[:, keep(8)]
    tp.prune_prelu_out_channels(prelu, REMOVED)
    assert prelu.num_parameters == 5 and torch.equal(prelu(x[:, keep(8)]), expected)
    shared = nn.PReLU()
    tp.prune_prelu_out_channels(shared, REMOVED)
    assert shared.weight.shape == (1,)

    embedding = nn.Embedding(10, 8)
    ids = torch.tensor([[1, 2, 9]])
    expected = embedding(ids)[..., keep(8)]
    tp.prune_embedding_out_channels(embedding, REMOVED)
    assert embedding.embedding_dim == 5 and torch.equal(embedding(ids), expected)

    token = nn.Parameter(torch.randn(1, 2, 8), requires_grad=False)
    pruned = tp.prune_parameter_out_channels(token, REMOVED, dim=2)
    assert isinstance(pruned, nn.Parameter) and not pruned.requires_grad
    assert torch.equal(pruned, token[..., keep(8)])


def _zero_mha_channels(layer: nn.MultiheadAttention, removed: list[int]) -> None:
    width = layer.embed_dim
    rows = removed + [width + i for i in removed] + [2 * width + i for i in removed]
    with torch.no_grad():
        layer.in_proj_weight[rows] = 0
        layer.in_proj_weight[:, removed] = 0
        layer.in_proj_bias[rows] = 0
        layer.out_proj.weight[removed] = 0
        layer.out_proj.weight[:, removed] = 0
        layer.out_proj.bias[removed] = 0


@pytest.mark.parametrize(
    ("removed", "heads", "head_dim"),
    [([4, 5, 6, 7], 3, 4), ([1, 5, 9, 13], 4, 3)],  # a whole head / offset 1 in every head
)
def test_multihead_attention_heads_and_head_dim(removed, heads, head_dim):
    layer = nn.MultiheadAttention(16, 4, batch_first=True).double().eval()
    x = torch.randn(2, 5, 16, dtype=torch.double)
    reference = nn.MultiheadAttention(16, 4, batch_first=True).double().eval()
    reference.load_state_dict(layer.state_dict())
    _zero_mha_channels(reference, removed)
    kept = keep(16, removed)
    expected = reference(x, x, x)[0][..., kept]
    tp.prune_multihead_attention_out_channels(layer, removed)
    assert (layer.num_heads, layer.head_dim, layer.embed_dim) == (heads, head_dim, 12)
    out = layer(x[..., kept], x[..., kept], x[..., kept])[0]
    assert torch.allclose(out, expected, atol=1e-10)


@pytest.mark.parametrize(
    ("idxs", "message"),
    [
        ([8], r"index 8 out of range \[0, 8\)"),
        ([-1], r"index -1 out of range"),
        (list(range(8)), "would remove all 8 channels"),
    ],
)
def test_bad_indices_are_refused_before_anything_changes(idxs, message):
    layer = nn.Conv2d(3, 8, 1)
    before = layer.weight.detach().clone()
    with pytest.raises(ValueError, match=message):
        tp.prune_conv_out_channels(layer, idxs)
    assert torch.equal(layer.weight, before) and layer.out_channels == 8


def test_duplicates_are_removed_once_and_parameters_stay_trainable():
    layer = nn.Linear(4, 8)
    layer.weight.requires_grad_(False)
    tp.prune_linear_out_channels(layer, torch.tensor([2, 2, 3]))
    assert layer.out_features == 6 and not layer.weight.requires_grad
    assert layer.bias.requires_grad and isinstance(layer.bias, nn.Parameter)


def test_custom_layers_register_their_own_pruner():
    class Scale(nn.Module):
        def __init__(self, width):
            super().__init__()
            self.gain = nn.Parameter(torch.rand(width))

        def forward(self, x):
            return x * self.gain[:, None]

    class ScalePruner(tp.BasePruningFunc):
        def param_roles(self, layer):
            return {("gain", 0): "out"}

    layer = Scale(8)
    tp.register_pruner(Scale, ScalePruner())
    assert isinstance(tp.pruning.get_pruner(layer), ScalePruner)
    original = layer.gain.detach().clone()
    tp.pruning.get_pruner(layer).prune_out_channels(layer, REMOVED)
    assert torch.equal(layer.gain, original[keep(8)])


def test_gradients_are_sliced_with_their_parameters():
    layer = nn.Linear(3, 4)
    layer(torch.randn(2, 3)).sum().backward()
    grad = layer.weight.grad.clone()
    tp.prune_linear_out_channels(layer, [1, 2])
    assert torch.equal(layer.weight.grad, grad[[0, 3]])
    assert layer.bias.grad.shape == (2,)


@pytest.mark.parametrize("small", [True, False], ids=["index_select", "numpy"])
def test_a_channels_last_model_stays_channels_last_once_pruned(small, monkeypatch):
    from torchslim.pruning import take as module

    if not small:
        monkeypatch.setattr(module, "_SMALL_ELEMENTS", 0)
    model = torchvision.models.resnet18().eval()
    x = torch.randn(1, 3, 64, 64)
    last = copy.deepcopy(model).to(memory_format=torch.channels_last)
    for net in (model, last):
        tp.pruner.MagnitudePruner(net, x, pruning_ratio=0.5, ignored_layers=[net.fc]).step()
    convs = [m.weight for m in last.modules() if isinstance(m, nn.Conv2d)]
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not all(w.is_contiguous() for w in convs)  # the 3x3 kernels are not also plain
    with torch.no_grad():
        torch.testing.assert_close(last(x), model(x))


@pytest.mark.parametrize(
    "dtype",
    [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64, torch.bool],
)
@pytest.mark.parametrize("split", [False, True], ids=["one-thread", "rows-split"])
def test_take_gathers_the_same_bits_as_index_select_along_every_dim(dtype, split, monkeypatch):
    from torchslim.pruning import take as module

    monkeypatch.setattr(module, "_SMALL_ELEMENTS", 0)  # NumPy's gather even on a small tensor
    if split:  # every gather split by rows over the intra-op threads
        monkeypatch.setattr(module, "_SPLIT_ELEMENTS", 0)
        monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    tensor = (torch.randn(6, 7, 5, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    for source in (tensor, tensor.transpose(0, 2)):
        for dim in range(3):
            index = torch.tensor([4, 0, 2])
            taken = module.take(source, dim, index)
            expected = source.index_select(dim, index)
            assert taken.dtype == dtype and taken.is_contiguous()
            assert torch.equal(taken.view(-1), expected.contiguous().view(-1))
        taken = module.take(source, -1, torch.tensor([1]))
        assert torch.equal(taken, source.index_select(-1, torch.tensor([1])))
    with pytest.raises(IndexError, match="index out of range for dim 1 of size 7"):
        module.take(tensor, 1, torch.tensor([7]))
    for dim, index in [(3, torch.tensor([0])), (1, torch.tensor([0.0])), (1, torch.tensor(2))]:
        try:  # where index_select answers or refuses, take does the same
            expected = tensor.index_select(dim, index)
        except (IndexError, RuntimeError) as error:
            with pytest.raises(type(error)):
                module.take(tensor, dim, index)
        else:
            assert torch.equal(module.take(tensor, dim, index), expected)


def test_take_asks_for_huge_pages_only_for_large_results_within_their_memory(monkeypatch):
    from torchslim.pruning import take as module

    calls = []
    monkeypatch.setattr(module, "_madvise", lambda: lambda *args: calls.append(args) or 0)
    monkeypatch.setattr(module, "_HUGE_BYTES", 1 << 20)
    tensor = torch.randn(64, 8192)  # 2 MiB: its gathers are above the threshold
    index = torch.arange(0, 64, 2)  # half the rows: 1 MiB
    small = module.take(tensor, 0, index[:4])
    assert calls == [] and torch.equal(small, tensor[index[:4]])
    taken = module.take(tensor, 0, index)
    assert torch.equal(taken, tensor[index])
    (start, length, advice), page = calls[0], mmap.PAGESIZE
    begin, end = taken.data_ptr(), taken.data_ptr() + taken.numel() * taken.element_size()
    assert advice == mmap.MADV_HUGEPAGE and start.value % page == 0 and length.value % page == 0
    assert begin <= start.value and start.value + length.value <= end
    assert length.value > end - begin - 2 * page  # all the whole pages of its memory


def test_the_kernel_takes_the_huge_page_advice_where_it_has_huge_pages():
    from torchslim.pruning import take as module

    if not Path("/sys/kernel/mm/transparent_hugepage/enabled").exists():
        pytest.skip("a kernel without transparent huge pages: the advice is refused")
    assert module.huge_pages(torch.empty(64 << 20, dtype=torch.uint8))
    assert not module.huge_pages(torch.empty(1 << 20, dtype=torch.uint8))  # too small to ask
