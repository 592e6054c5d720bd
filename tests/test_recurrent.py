"""Recurrent layers: LSTM, GRU and RNN (stacked, bidirectional, batch first, projected, packed,
unbatched) and their cells prune exactly, their size attributes follow, and the peer's
``prune_lstm_*`` functions prune what the graph prunes."""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import torchslim as tp

CONFIGS = [
    (nn.LSTM, {}),
    (nn.GRU, {}),
    (nn.RNN, {"nonlinearity": "relu"}),
    (nn.LSTM, {"num_layers": 2, "bidirectional": True}),
    (nn.LSTM, {"num_layers": 2, "proj_size": 4, "batch_first": True}),
    (nn.GRU, {"num_layers": 3, "bidirectional": True, "batch_first": True}),
    (nn.RNN, {"num_layers": 2, "bias": False}),
]


class Tagger(nn.Module):
    """Embedding -> recurrent layer -> a head on every step, and a head on the final state."""

    def __init__(self, rnn_type: type, **kwargs) -> None:
        super().__init__()
        self.embed = nn.Linear(5, 8)
        self.rnn = rnn_type(8, 6, **kwargs)
        units = (getattr(self.rnn, "proj_size", 0) or 6) * (1 + self.rnn.bidirectional)
        self.head = nn.Linear(units, 3)
        self.state_head = nn.Linear(getattr(self.rnn, "proj_size", 0) or 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rnn.batch_first:
            x = x.transpose(0, 1)
        out, state = self.rnn(self.embed(x))
        h = state[0] if isinstance(state, tuple) else state
        out = out.transpose(0, 1) if self.rnn.batch_first else out
        return self.head(out) + self.state_head(h[-1])[None]


def _attributes_match_weights(rnn: nn.Module) -> None:
    units = getattr(rnn, "proj_size", 0) or rnn.hidden_size
    assert rnn.weight_ih_l0.shape[1] == rnn.input_size
    assert rnn.weight_hh_l0.shape[1] == units
    assert rnn.weight_hh_l0.shape[0] % rnn.hidden_size == 0


@pytest.mark.parametrize(("rnn_type", "kwargs"), CONFIGS)
def test_every_group_of_a_recurrent_net_prunes_exactly(rnn_type, kwargs):
    torch.manual_seed(0)
    model = Tagger(rnn_type, **kwargs).eval()
    x = torch.randn(7, 2, 5)
    graph = tp.DependencyGraph().build_dependency(model, x)
    assert graph.unsupported() == []
    roots = sorted(group.root.label for group in graph.get_all_groups())
    expected = ["embed.weight[dim 0]", "rnn.weight_ih_l0[dim 0]"]
    if kwargs.get("proj_size"):
        expected.append("rnn.weight_hh_l0[dim 1]")
    assert roots == sorted(expected)
    pruner = tp.pruner.MetaPruner(model, x, pruning_ratio=0.5)
    report = pruner.step_and_verify()
    assert report.ok and all(check.exact_expected for check in report.checks), report
    assert model.rnn.hidden_size == 3 and model.rnn.input_size == 4
    if kwargs.get("proj_size"):
        assert model.rnn.proj_size == 2
    _attributes_match_weights(model.rnn)
    assert model(x).shape == (7, 2, 3)


def test_packed_sequences_and_unbatched_inputs_prune_exactly():
    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.GRU(5, 6, num_layers=2, bidirectional=True)
            self.head = nn.Linear(12, 3)
            self.single = nn.LSTM(5, 4)
            self.single_head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            packed = pack_padded_sequence(x, torch.tensor([7, 5]), enforce_sorted=False)
            out, _ = pad_packed_sequence(self.rnn(packed)[0])
            unbatched, _ = self.single(x[:, 0])
            return self.head(out) + self.single_head(unbatched)[:, None]

    torch.manual_seed(0)
    model = Packed().eval()
    x = torch.randn(7, 2, 5)
    graph = tp.DependencyGraph().build_dependency(model, x)
    assert graph.unsupported() == []
    report = tp.verify(graph, x, ratio=0.5)
    assert len(report.checks) == 2  # the GRU's and the LSTM's units (their inputs are x)
    assert report.ok and all(check.exact_expected for check in report.checks)
    tp.pruner.MetaPruner(model, x, pruning_ratio=0.5).step()
    assert model.rnn.hidden_size == 3 and model(x).shape == (7, 2, 3)


def test_cells_in_a_python_loop_prune_exactly():
    class Loop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(5, 8)
            self.lstm = nn.LSTMCell(8, 6)
            self.gru = nn.GRUCell(6, 4)
            self.head = nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = c = x.new_zeros(x.shape[1], self.lstm.hidden_size)
            g = x.new_zeros(x.shape[1], self.gru.hidden_size)
            outs = []
            for step in x:
                h, c = self.lstm(self.embed(step), (h, c))
                g = self.gru(h, g)
                outs.append(self.head(g))
            return torch.stack(outs)

    torch.manual_seed(0)
    model = Loop().eval()
    x = torch.randn(4, 2, 5)
    pruner = tp.pruner.MetaPruner(model, x, pruning_ratio=0.5)
    report = pruner.step_and_verify()
    assert report.ok and all(check.exact_expected for check in report.checks)
    assert (model.lstm.input_size, model.lstm.hidden_size, model.gru.hidden_size) == (4, 3, 2)
    assert model(x).shape == (4, 2, 3)


def test_a_projection_never_grows_to_the_hidden_size():
    """torch tells an LSTM with projections from one without by ``proj_size != hidden_size``:
    a selection leaving them equal is refused, naming the condition."""
    torch.manual_seed(0)
    model = Tagger(nn.LSTM, proj_size=5).eval()
    x = torch.randn(3, 2, 5)
    graph = tp.DependencyGraph().build_dependency(model, x)
    group = graph.get_pruning_group(model.rnn, tp.prune_lstm_out_channels, [0])
    hidden = next(g for g in graph.get_all_groups() if g.root.label == "rnn.weight_ih_l0[dim 0]")
    assert group.root.label == "rnn.weight_hh_l0[dim 1]" and hidden.size == 6
    assert "proj_size < rnn.hidden_size" in hidden.refusal([0])
    assert hidden.refusal([0]) is not None and group.refusal() is None


def test_the_peers_lstm_functions_prune_what_the_graph_prunes():
    torch.manual_seed(0)
    model = Tagger(nn.LSTM, num_layers=2, bidirectional=True, proj_size=4).eval()
    direct = copy.deepcopy(model)
    x = torch.randn(3, 2, 5)
    graph = tp.DependencyGraph().build_dependency(model, x)
    graph.get_pruning_group(model.rnn, tp.prune_lstm_out_channels, [0, 2]).prune()
    tp.function.LSTMPruner().prune_out_channels(direct.rnn, [0, 2])
    tp.prune_linear_in_channels(direct.head, [0, 2, 4, 6])
    tp.prune_linear_in_channels(direct.state_head, [0, 2])
    assert model.rnn.proj_size == direct.rnn.proj_size == 2
    for (name, mine), theirs in zip(model.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(mine, theirs), name
    gru = nn.GRU(8, 6, num_layers=2)
    tp.prune_lstm_out_channels(gru, [1])
    tp.prune_lstm_in_channels(gru, [0, 7])
    assert (gru.input_size, gru.hidden_size, gru.weight_ih_l1.shape) == (6, 5, (15, 5))
    assert gru(torch.randn(3, 1, 6))[0].shape == (3, 1, 5)
