"""scikit-learn's 8x8 digits: shipped inside scikit-learn, so always available offline (tests, quick runs)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cil.core.data.dataset import ImageDataset, register_loader
from cil.core.data.decode import cached
from cil.errors import DataError


@register_loader("digits")
def load_digits(**_: Any) -> ImageDataset:
    """sklearn's 8x8 digits (shipped inside the package, so always available offline), cached as tensors: a run
    that finds the cache does not import scikit-learn (about a second at every start of a short run)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DataError("dataset=digits needs scikit-learn: pip install scikit-learn")
    source = Path(spec.origin).parent / "datasets" / "data"
    return cached("digits", source, [str(source / "digits.csv.gz")], None, _split_digits)


def _split_digits() -> ImageDataset:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    y = digits.target.astype(np.int64)
    # A fixed random_state makes the split independent of any global RNG; stratified keeps 80/20 per class.
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return ImageDataset(
        "digits",
        torch.from_numpy(x[train_idx]),
        torch.from_numpy(y[train_idx]),
        torch.from_numpy(x[test_idx]),
        torch.from_numpy(y[test_idx]),
        [str(d) for d in digits.target_names],
    )
