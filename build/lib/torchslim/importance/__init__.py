"""Importance criteria (``tp.importance.MagnitudeImportance(p=2)`` ...): lower scores go first."""

from torchslim.graph.dependency import Group
from torchslim.importance.base import (
    NORMALIZERS,
    REDUCTIONS,
    GroupImportance,
    Importance,
    lamp,
    normalize,
    reduce_layers,
)
from torchslim.importance.criteria import (
    ActivationImportance,
    BNScaleImportance,
    FluctuationImportance,
    FPGMImportance,
    GroupHessianImportance,
    GroupMagnitudeImportance,
    GroupNormImportance,
    GroupTaylorImportance,
    HessianImportance,
    LAMPImportance,
    MagnitudeImportance,
    OBDImportance,
    OBSImportance,
    RandomImportance,
    TaylorImportance,
    WandaImportance,
)
from torchslim.importance.experts import RoutingImportance
from torchslim.importance.fisher import FisherImportance, sampled_label_loss
from torchslim.importance.obdc import ComputeMatGrad, OBDCImportance
from torchslim.importance.registry import importance_names, make_importance, register_importance

__all__ = [
    "NORMALIZERS",
    "REDUCTIONS",
    "ActivationImportance",
    "BNScaleImportance",
    "ComputeMatGrad",
    "FPGMImportance",
    "FisherImportance",
    "FluctuationImportance",
    "Group",
    "GroupHessianImportance",
    "GroupImportance",
    "GroupMagnitudeImportance",
    "GroupNormImportance",
    "GroupTaylorImportance",
    "HessianImportance",
    "Importance",
    "LAMPImportance",
    "MagnitudeImportance",
    "OBDCImportance",
    "OBDImportance",
    "OBSImportance",
    "RandomImportance",
    "RoutingImportance",
    "TaylorImportance",
    "WandaImportance",
    "importance_names",
    "lamp",
    "make_importance",
    "normalize",
    "reduce_layers",
    "register_importance",
    "sampled_label_loss",
]
