"""Importance criteria (``tp.importance.MagnitudeImportance(p=2)`` ...): lower scores go first."""

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
    FPGMImportance,
    GroupHessianImportance,
    GroupMagnitudeImportance,
    GroupNormImportance,
    GroupTaylorImportance,
    HessianImportance,
    LAMPImportance,
    MagnitudeImportance,
    OBDImportance,
    RandomImportance,
    TaylorImportance,
)

__all__ = [
    "NORMALIZERS",
    "REDUCTIONS",
    "ActivationImportance",
    "BNScaleImportance",
    "FPGMImportance",
    "GroupHessianImportance",
    "GroupImportance",
    "GroupMagnitudeImportance",
    "GroupNormImportance",
    "GroupTaylorImportance",
    "HessianImportance",
    "Importance",
    "LAMPImportance",
    "MagnitudeImportance",
    "OBDImportance",
    "RandomImportance",
    "TaylorImportance",
    "lamp",
    "normalize",
    "reduce_layers",
]
