"""Pictures of a dependency graph as PNG files, through matplotlib (no Graphviz binary).

All are layer-by-layer matrices, rows and columns in the model's module order:
:func:`draw_dependency_graph` marks every pair of layers that some group couples (pruning one
removes channels of the other), :func:`draw_groups` colours each pair by the group coupling
them, so the blocks along the diagonal show which layers go together, and
:func:`draw_computational_graph` marks where channels flow: from the layer that makes them
(row) to each layer that reads them (column).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from torchslim.pruning.layers import layer_kind
from torchslim.pruning.roles import Role

PathLike = Union[str, Path]


def coupled_layers(graph: Any) -> tuple[list[str], list[list[int]]]:
    """The layers any group couples, in module order, and for each group the positions of
    its layers in that list."""
    order = {name: k for k, (name, _) in enumerate(graph.model.named_modules())}
    groups = [
        sorted({m.ref.module_name for m in g.coupling.members}) for g in graph.get_all_groups()
    ]
    layers = sorted({name for names in groups for name in names}, key=lambda n: order.get(n, 0))
    index = {name: k for k, name in enumerate(layers)}
    return layers, [[index[name] for name in names] for names in groups]


def _coupling_matrix(graph: Any, numbered: bool) -> tuple[list[str], np.ndarray]:
    """Layers and the layer x layer matrix of the pairs each group couples: 1 for every
    coupled pair, or the group's number (from 1)."""
    layers, groups = coupled_layers(graph)
    matrix = np.zeros((len(layers), len(layers)))
    for number, members in enumerate(groups, 1):
        matrix[np.ix_(members, members)] = number if numbered else 1
    return layers, matrix


def channel_flow(graph: Any) -> tuple[list[str], np.ndarray]:
    """Layers and the matrix with 1 where the row layer's output channels are the column
    layer's input channels (every coupling, prunable or not). Layers that keep their channels
    (norms, PReLU, bare parameters) both read and make them."""
    order = {name: k for k, (name, _) in enumerate(graph.model.named_modules())}
    pairs = set()
    for group in graph.all_groups():
        makers, readers = set(), set()
        for member in group.coupling.members:
            kind = layer_kind(member.ref.module)
            role = graph.pruning_function(member)[1]
            keeps = not kind.contracts and not kind.embedding
            if role == Role.OUT or keeps:
                makers.add(member.ref.module_name)
            if role == Role.IN or keeps:
                readers.add(member.ref.module_name)
        pairs |= {(a, b) for a in makers for b in readers if a != b}
    layers = sorted({n for pair in pairs for n in pair}, key=lambda n: order.get(n, 0))
    index = {name: k for k, name in enumerate(layers)}
    matrix = np.zeros((len(layers), len(layers)))
    for a, b in pairs:
        matrix[index[a], index[b]] = 1
    return layers, matrix


def _draw(
    matrix: np.ndarray,
    layers: list[str],
    save_as: PathLike,
    title: str,
    figsize: tuple[float, float],
    dpi: int,
    cmap: Optional[str],
) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=figsize)
    shown = np.ma.masked_equal(matrix, 0)
    axes.imshow(shown, cmap=cmap or "tab20", interpolation="nearest")
    axes.set_title(title)
    ticks = range(len(layers))
    if len(layers) <= 80:
        axes.set_xticks(ticks, layers, rotation=90, fontsize=6)
        axes.set_yticks(ticks, layers, fontsize=6)
    figure.tight_layout()
    path = Path(save_as)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=dpi)
    plt.close(figure)
    return path


def draw_dependency_graph(
    DG: Any,  # noqa: N803 (torch-pruning's argument name)
    save_as: PathLike,
    title: str = "Dependency graph",
    figsize: tuple[float, float] = (16, 16),
    dpi: int = 200,
    cmap: Optional[str] = None,
) -> Path:
    """A layer x layer matrix marking the pairs of layers some group couples; returns the PNG."""
    layers, matrix = _coupling_matrix(DG, numbered=False)
    return _draw(matrix, layers, save_as, title, figsize, dpi, cmap or "Blues")


def draw_groups(
    DG: Any,  # noqa: N803 (torch-pruning's argument name)
    save_as: PathLike,
    title: str = "Groups",
    figsize: tuple[float, float] = (16, 16),
    dpi: int = 200,
    cmap: Optional[str] = None,
) -> Path:
    """A layer x layer matrix coloured by the group coupling each pair (the last one drawn
    where several do); returns the PNG."""
    layers, matrix = _coupling_matrix(DG, numbered=True)
    return _draw(matrix, layers, save_as, title, figsize, dpi, cmap)


def draw_computational_graph(
    DG: Any,  # noqa: N803 (torch-pruning's argument name)
    save_as: PathLike,
    title: str = "Computational graph",
    figsize: tuple[float, float] = (16, 16),
    dpi: int = 200,
    cmap: Optional[str] = None,
) -> Path:
    """A layer x layer matrix marking where channels flow, from the layer making them (row)
    to each layer reading them (column); returns the PNG."""
    layers, matrix = channel_flow(DG)
    return _draw(matrix, layers, save_as, title, figsize, dpi, cmap or "Greens")
