"""The in-memory dataset (uint8 image tensors plus int64 labels), where data live, and the loader registry.

Every loader returns an :class:`ImageDataset` whose images are ``uint8 [N, C, H, W]`` CPU tensors, so
normalisation and augmentation can happen in batch on the device later. Files are read once; nothing is
ever written into the data root (it may be a read-only shared copy). A loader family is one module of this
package that registers its names with :func:`register_loader`; image trees are decoded once and cached
(cil.core.data.decode).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from cil.errors import ConfigError, DataError

__all__ = ["ImageDataset", "data_root", "cache_dir", "register_loader", "load_dataset", "LOADERS", "holdout_validation"]


@dataclass
class ImageDataset:
    name: str
    train_x: torch.Tensor  # uint8 [N, C, H, W], contiguous, CPU
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: list[str]  # index = label
    # Per-channel mean and std of the [0, 1] images for input normalisation; None: computed from the training set
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        # Catch a malformed dataset here rather than as a shape error deep inside training.
        for split in ("train", "test"):
            x, y = getattr(self, f"{split}_x"), getattr(self, f"{split}_y")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise DataError(f"{self.name}: {split}_x must be uint8 [N, C, H, W], got {x.dtype} {list(x.shape)}")
            if y.dtype != torch.int64 or y.dim() != 1 or len(y) != len(x):
                raise DataError(f"{self.name}: {split}_y must be int64 [{len(x)}], got {y.dtype} {list(y.shape)}")
            if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(self.class_names)):
                raise DataError(f"{self.name}: {split} labels outside [0, {len(self.class_names)})")
        if self.train_x.shape[1:] != self.test_x.shape[1:]:
            raise DataError(
                f"{self.name}: train images {list(self.train_x.shape[1:])} "
                f"and test images {list(self.test_x.shape[1:])} differ in shape"
            )

    def fingerprint(self) -> str:
        """A digest of the images, the labels and the class names: a resumed run refuses other data."""
        h = hashlib.blake2b(digest_size=16)
        for t in (self.train_x, self.train_y, self.test_x, self.test_y):
            h.update(t.contiguous().numpy())  # type: ignore[arg-type]  # numpy stubs: ndarray.__buffer__ on 3.12+ only
        h.update("\0".join(self.class_names).encode())
        return h.hexdigest()

    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """(mean, std) per channel of the [0, 1] images: the loader's published values, else the training set's."""
        if self.mean is not None and self.std is not None:
            return tuple(self.mean), tuple(self.std)
        x = self.train_x.transpose(0, 1).reshape(self.train_x.shape[1], -1).double() / 255.0
        return tuple(x.mean(1).tolist()), tuple(x.std(1).clamp(min=1e-8).tolist())

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))


def data_root(root: str | os.PathLike[str] | None = None) -> Path:
    """The data root: the explicit argument, else ``$CIL_DATA_ROOT``, else ``./data``."""
    if root is None or str(root) == "":
        root = os.environ.get("CIL_DATA_ROOT") or "data"
    return Path(root).expanduser().resolve()


def cache_dir() -> Path:
    """Where decoded tensors are cached: ``$CIL_CACHE_DIR``, else ``~/.cache/cil``. Never the data root."""
    return Path(os.environ.get("CIL_CACHE_DIR") or Path.home() / ".cache" / "cil").expanduser()


def resize_tensor(x: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 [N, C, H, W] images resized to size x size (antialiased), in chunks that bound the float scratch."""
    # torchvision is imported where used: it pulls in torch._dynamo, a cost only runs that resize pay
    from torchvision.transforms.v2.functional import resize

    if tuple(x.shape[2:]) == (size, size):
        return x
    return torch.cat([resize(x[i : i + 4096], [size, size], antialias=True) for i in range(0, len(x), 4096)])


LOADERS: dict[str, Callable[..., ImageDataset]] = {}
_RESIZES_ITSELF: set[str] = set()  # loaders that resize while decoding (and cache the resized tensors)
_Loader = TypeVar("_Loader", bound=Callable[..., ImageDataset])


def register_loader(name: str, resizes: bool = False) -> Callable[[_Loader], _Loader]:
    """Decorator: make `loader(root, download, verify, image_size, path)` available as dataset `name`."""

    def deco(fn: _Loader) -> _Loader:
        LOADERS[name] = fn
        if resizes:
            _RESIZES_ITSELF.add(name)
        return fn

    return deco


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    download: bool = True,
    verify: bool = True,
    image_size: int | None = None,
    path: str | None = None,
) -> ImageDataset:
    """Load a dataset by name into memory as uint8 tensors.

    root: data root (see :func:`data_root`). download: let torchvision fetch missing MNIST/CIFAR files.
    verify: check md5s of MNIST/CIFAR files. image_size: resize all images to image_size x image_size.
    path: the folder for ``imagefolder`` (relative paths are taken from the data root).
    """
    key = str(name).strip().lower()
    if key not in LOADERS:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(LOADERS)}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int) or image_size <= 0):
        raise ConfigError(f"dataset.image_size must be a positive integer or null, got {image_size!r}")
    ds = LOADERS[key](root=data_root(root), download=download, verify=verify, image_size=image_size, path=path)
    ds.name = key
    if image_size is not None and key not in _RESIZES_ITSELF:
        ds.train_x = resize_tensor(ds.train_x, image_size)
        ds.test_x = resize_tensor(ds.test_x, image_size)
    return ds


def holdout_validation(dataset: ImageDataset, fraction: float, seed: int = 0) -> ImageDataset:
    """The validation protocol of a hyperparameter search: the same classes, trained on the training set minus a
    seeded share `fraction` of every class's samples, evaluated on that share. The test set is not carried over,
    so nothing downstream can evaluate on it. The split depends on `seed` only (not on the run's seed), so every
    trial of a search and every seed of it are scored on the same samples."""
    g = torch.Generator().manual_seed(seed)
    held_out = torch.zeros(len(dataset.train_y), dtype=torch.bool)
    for c in dataset.train_y.unique():
        idx = torch.nonzero(dataset.train_y == c).squeeze(1)
        if len(idx) < 2:
            raise DataError(
                f"{dataset.name}: class {dataset.class_names[int(c)]!r} has {len(idx)} training sample(s), "
                "too few to hold one out for validation; use eval.split=test"
            )
        n = min(max(1, round(fraction * len(idx))), len(idx) - 1)  # every class keeps training and validation rows
        held_out[idx[torch.randperm(len(idx), generator=g)[:n]]] = True
    keep = ~held_out
    return ImageDataset(
        dataset.name,
        dataset.train_x[keep].contiguous(),
        dataset.train_y[keep],
        dataset.train_x[held_out].contiguous(),
        dataset.train_y[held_out],
        list(dataset.class_names),
        mean=dataset.mean,
        std=dataset.std,
    )
