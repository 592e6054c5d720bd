"""How a tensor dim takes part in pruning: the roles of graph members and plan steps."""

from __future__ import annotations

from enum import Enum


class Role(str, Enum):
    """A role is stored in plans as its string value (``"out"``), so plans stay plain JSON."""

    #: the layer's output channels (a convolution's filters, a linear layer's rows)
    OUT = "out"
    #: the layer's input channels
    IN = "in"
    #: a dim of a parameter no layer pruning function knows (a layer scale, a cls token)
    PARAM = "param"
    #: an int attribute that follows the channels it counts (``num_heads``)
    ATTR = "attr"
    #: a zero bias given to a layer by reconstruction
    BIAS = "bias"
    #: whole children of a ``ModuleList`` / ``Sequential`` (blocks removed)
    BLOCKS = "blocks"
    #: a tensor a weight norm / spectral norm computes the pruned weight from: it is sliced
    #: by the weight's own pruning
    COVERED = "covered"

    def __str__(self) -> str:
        return self.value
