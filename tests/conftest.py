"""Test options: ``--zoo-all`` runs the model-zoo sweep over every torchvision model."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def pytest_addoption(parser):
    parser.addoption(
        "--zoo-all", action="store_true", help="sweep every torchvision model, not the slice"
    )
