"""Random but valid networks for the architecture fuzzer.

A net is a list of *blocks* drawn by hypothesis, applied to a ``[batch, channels, 6, 6]``
feature map. Every block maps ``(x, C)`` to ``(y, C')`` and is built from what real models
use: conv/BN stacks, residual adds, concatenations (including the same tensor twice), chunk
and split, grouped and depthwise conv, reshape-to-heads attention, channel shuffle, bare
parameters, modules used twice and unused branches, sizes compared with attributes, split
sizes kept in an attribute, weight norm and spectral norm, ``nn.MultiheadAttention`` on a
residual width, and recurrent layers over the pixels (LSTM, GRU, RNN; stacked, bidirectional,
projected). A linear head ends the net.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

BLOCKS = (
    "conv",
    "residual",
    "concat",
    "concat_twice",
    "chunk",
    "grouped",
    "depthwise",
    "attention",
    "shuffle",
    "scale",
    "shared",
    "unused",
    "layernorm",
    "asserts",
    "split_sizes",
    "normed",
    "mha",
    "recurrent",
)

RECURRENT = (
    lambda c, w: nn.LSTM(c, w, num_layers=2, bidirectional=True, batch_first=True),
    lambda c, w: nn.GRU(c, w, batch_first=True),
    lambda c, w: nn.LSTM(c, w + 1, proj_size=w, batch_first=True),
    lambda c, w: nn.RNN(c, w, nonlinearity="relu", batch_first=True),
)


class Block(nn.Module):
    def __init__(self, kind: str, channels: int, width: int) -> None:
        super().__init__()
        self.kind = kind
        c, w = channels, width
        if kind == "conv":
            self.body = nn.Sequential(nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU())
            self.out = w
        elif kind == "residual":
            self.body = nn.Sequential(nn.Conv2d(c, w, 1), nn.ReLU(), nn.Conv2d(w, c, 3, padding=1))
            self.out = c
        elif kind in ("concat", "concat_twice"):
            self.left, self.right = nn.Conv2d(c, w, 1), nn.Conv2d(c, w + 2, 3, padding=1)
            self.out = 2 * w + 2 if kind == "concat" else 3 * w + 2
        elif kind == "chunk":
            self.stem = nn.Conv2d(c, 2 * w, 1)
            self.mid = nn.Conv2d(w, w, 3, padding=1)
            self.out = 3 * w
        elif kind == "grouped":
            self.body = nn.Sequential(
                nn.Conv2d(c, 4 * w, 1), nn.Conv2d(4 * w, 4 * w, 3, padding=1, groups=4)
            )
            self.out = 4 * w
        elif kind == "depthwise":
            self.body = nn.Sequential(
                nn.Conv2d(c, w, 1), nn.BatchNorm2d(w), nn.Conv2d(w, w, 3, padding=1, groups=w)
            )
            self.out = w
        elif kind == "attention":
            self.heads = 2
            self.qkv = nn.Linear(c, 3 * 2 * w)
            self.proj = nn.Linear(2 * w, c)
            self.out = c
        elif kind == "shuffle":
            self.a, self.b = nn.Conv2d(c, w, 1), nn.Conv2d(c, w, 1)
            self.out = 2 * w
        elif kind == "scale":
            self.conv = nn.Conv2d(c, w, 1)
            self.gamma = nn.Parameter(torch.rand(1, w, 1, 1) + 0.5)
            self.out = w
        elif kind == "shared":
            self.inner = nn.Conv2d(c, c, 3, padding=1)
            self.out = c
        elif kind == "unused":
            self.used = nn.Conv2d(c, w, 1)
            self.spare = nn.Conv2d(c, w, 1)
            self.out = w
        elif kind == "layernorm":
            self.norm = nn.LayerNorm(c)
            self.fc = nn.Linear(c, w)
            self.out = w
        elif kind == "asserts":
            self.conv = nn.Conv2d(c, w, 1)
            self.channels = w
            self.out = w
        elif kind == "split_sizes":
            self.conv = nn.Conv2d(c, 3 * w, 1)
            self.sizes = (w, 2 * w) if w % 2 else (w, w, w)
            self.mid = nn.Conv2d(w, w, 3, padding=1)
            self.out = 3 * w
        elif kind == "normed":
            param = nn.utils.parametrizations
            self.first = param.weight_norm(nn.Conv2d(c, w, 3, padding=1))
            self.second = param.spectral_norm(nn.Conv2d(w, w, 1))
            self.out = w
        elif kind == "mha":
            self.embed = nn.Conv2d(c, 2 * w, 1)
            self.attn = nn.MultiheadAttention(2 * w, 2, batch_first=True)
            self.out = 2 * w
        elif kind == "recurrent":
            self.rnn = RECURRENT[w % len(RECURRENT)](c, w)
            self.out = w * (2 if self.rnn.bidirectional else 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = self.kind
        if kind in ("conv", "grouped", "depthwise"):
            return self.body(x)
        if kind == "residual":
            return F.relu(x + self.body(x))
        if kind == "concat":
            return torch.cat([self.left(x), self.right(x)], 1)
        if kind == "concat_twice":
            left = self.left(x)
            return torch.cat([left, self.right(x), left], 1)
        if kind == "chunk":
            a, b = self.stem(x).chunk(2, 1)
            return torch.cat([a, b, F.relu(self.mid(b))], 1)
        if kind == "attention":
            n, c, h, w = x.shape
            tokens = x.flatten(2).transpose(1, 2)
            q, k, v = (
                self.qkv(tokens).view(n, h * w, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
            )
            mixed = F.scaled_dot_product_attention(q, k, v, scale=0.5)
            out = self.proj(mixed.transpose(1, 2).reshape(n, h * w, -1))
            return x + out.transpose(1, 2).reshape(n, c, h, w)
        if kind == "shuffle":
            y = torch.cat([self.a(x), self.b(x)], 1)
            n, c, h, w = y.shape
            return y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        if kind == "scale":
            return self.conv(x) * self.gamma
        if kind == "shared":
            return self.inner(F.relu(self.inner(x)))
        if kind == "unused":
            return self.used(x)
        if kind == "asserts":
            y = self.conv(x)
            assert y.shape[1] == self.channels
            return y
        if kind == "split_sizes":
            first, *rest = torch.split(self.conv(x), self.sizes, dim=1)
            return torch.cat([F.relu(self.mid(first)), *rest], 1)
        if kind == "normed":
            return self.second(F.relu(self.first(x)))
        if kind == "mha":
            y = self.embed(x)
            n, c, h, w = y.shape
            tokens = y.flatten(2).transpose(1, 2)
            tokens = tokens + self.attn(tokens, tokens, tokens, need_weights=False)[0]
            return tokens.transpose(1, 2).reshape(n, c, h, w)
        if kind == "recurrent":
            n, _, h, w = x.shape
            tokens = self.rnn(x.flatten(2).transpose(1, 2))[0]
            return tokens.transpose(1, 2).reshape(n, -1, h, w)
        tokens = x.permute(0, 2, 3, 1)
        return self.fc(self.norm(tokens)).permute(0, 3, 1, 2)


class FuzzNet(nn.Module):
    def __init__(self, blocks: list[tuple[str, int]], stem: int = 6, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, stem, 3, padding=1)
        layers, channels = [], stem
        for kind, width in blocks:
            layer = Block(kind, channels, width)
            layers.append(layer)
            channels = layer.out
        self.blocks = nn.Sequential(*layers)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def architectures() -> st.SearchStrategy[list[tuple[str, int]]]:
    """1 to 5 blocks, each with a width of 2 to 6 channels."""
    block = st.tuples(st.sampled_from(BLOCKS), st.integers(2, 6))
    return st.lists(block, min_size=1, max_size=5)
