"""Image folders: a user's `train/<class>/<image>` and `test/<class>/<image>` tree, and the CIFAR-10 JPEG copy in
the same layout. Decoded once and cached (cil.core.data.decode)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cil.core.data.cifar import CIFAR_NORMALIZATION
from cil.core.data.dataset import ImageDataset, register_loader
from cil.core.data.decode import IMAGE_EXTENSIONS, cached, decode_images, images_under
from cil.errors import ConfigError, DataError


def _scan_split(split_dir: Path, classes: list[str] | None) -> tuple[list[str], list[str], list[int]]:
    layout = f"expected {split_dir.parent}/{{train,test}}/<class>/<image>"
    if not split_dir.is_dir():
        raise DataError(f"image folder split {split_dir} not found; {layout}")
    found = sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))
    if not found:
        raise DataError(f"no class folders in {split_dir}; {layout}")
    if classes is None:
        classes = found
    elif extra := [c for c in found if c not in classes]:
        raise DataError(
            f"{split_dir} has class folder(s) {extra} that are not in the train split "
            f"{split_dir.parent / 'train'}; test classes must be a subset of train classes"
        )
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for c in found:
        imgs = images_under(split_dir / c)
        if not imgs:
            raise DataError(f"class folder {split_dir / c} has no images ({', '.join(IMAGE_EXTENSIONS)})")
        files += imgs
        labels += [index[c]] * len(imgs)
    return classes, files, labels


def _load_image_tree(name: str, base: Path, image_size: int | None) -> ImageDataset:
    if not base.is_dir():
        raise DataError(f"{name}: image folder {base} not found; expected {base}/{{train,test}}/<class>/<image>")
    classes, train_files, train_labels = _scan_split(base / "train", None)
    _, test_files, test_labels = _scan_split(base / "test", classes)

    def build() -> ImageDataset:
        x = decode_images(train_files + test_files, None, image_size, f"decoding {name}")
        n = len(train_files)
        return ImageDataset(
            name,
            x[:n].contiguous(),
            torch.tensor(train_labels, dtype=torch.int64),
            x[n:].contiguous(),
            torch.tensor(test_labels, dtype=torch.int64),
            classes,
        )

    return cached(name, base, train_files + test_files, image_size, build)


@register_loader("imagefolder", resizes=True)
def load_imagefolder(root: Path, image_size: int | None, path: str | None, **_: Any) -> ImageDataset:
    if not path:
        raise ConfigError(
            "dataset 'imagefolder' needs a path (dataset.path=...) to a folder with "
            "train/<class>/<image> and test/<class>/<image>"
        )
    base = Path(path).expanduser()
    return _load_image_tree("imagefolder", base if base.is_absolute() else root / base, image_size)


@register_loader("cifar10_jpeg", resizes=True)
def load_cifar10_jpeg(root: Path, image_size: int | None, path: str | None, **_: Any) -> ImageDataset:
    base = Path(path).expanduser() if path else Path("cifar10-jpeg")
    base = base if base.is_absolute() else root / base
    if not base.is_dir():
        raise DataError(
            f"cifar10_jpeg: {base} not found. It is the JPEG copy of CIFAR-10 kept in the shared "
            f"offline data folder (../shared/data/cifar10-jpeg); point CIL_DATA_ROOT (or "
            f"dataset.root) at that folder, or use dataset 'cifar10' to download the original"
        )
    dataset = _load_image_tree("cifar10_jpeg", base, image_size)
    dataset.mean, dataset.std = CIFAR_NORMALIZATION
    return dataset
