"""CIFAR-10 and CIFAR-100 from the official python pickles (md5-checked)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cil.core.data.dataset import ImageDataset, register_loader
from cil.core.data.sources import check_md5, missing_error, torchvision_download
from cil.errors import DataError

if TYPE_CHECKING:
    from torchvision.datasets import CIFAR10

# The per-channel mean and std that the CIFAR code bases (GSA's official code among them) normalise with, for both
# CIFAR-10 and CIFAR-100.
CIFAR_NORMALIZATION = (tuple(v / 255 for v in (125.3, 123.0, 113.9)), tuple(v / 255 for v in (63.0, 62.1, 66.7)))


def _unpickle(path: Path) -> dict[Any, Any]:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")  # the batches were pickled by Python 2
    except Exception as e:
        raise DataError(
            f"cannot read {path}: {type(e).__name__}: {e}; the file is corrupt or truncated, replace it"
        ) from e
    if not isinstance(obj, dict):
        raise DataError(f"{path} is not a CIFAR python pickle (got {type(obj).__name__}); replace it")
    return obj


def _read_cifar_batch(path: Path, label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    batch = _unpickle(path)
    try:
        data = np.asarray(batch[b"data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (KeyError, ValueError, TypeError) as e:
        raise DataError(f"{path} lacks b'data' / {label_key!r} in the CIFAR format: {e}; replace it") from e
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.shape != (len(data),):
        raise DataError(
            f"{path}: expected data [N, 3072] and {label_key!r} [N], "
            f"got {list(data.shape)} and {list(labels.shape)}; replace it"
        )
    # Each row is 1024 red, then 1024 green, then 1024 blue values, row-major: exactly [3, 32, 32].
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def _load_cifar(
    name: str, tv_cls: type[CIFAR10], root: Path, download: bool, verify: bool, label_key: bytes
) -> ImageDataset:
    base = root / tv_cls.base_folder
    entries = [*tv_cls.train_list, *tv_cls.test_list, [tv_cls.meta["filename"], tv_cls.meta["md5"]]]
    missing = [name for name, _ in entries if not (base / name).is_file()]
    if missing:
        # torchvision fetches and unpacks the whole archive: only when none of its files are there yet.
        whole = len(missing) == len(entries)
        error = torchvision_download(tv_cls, root) if download and whole else None
        missing = [name for name, _ in entries if not (base / name).is_file()]
        if missing:
            reason = error if whole else "the other files are there, so nothing was downloaded over them"
            raise missing_error(tv_cls.__name__, missing, base, reason if download else None)
    if verify:
        for name, md5 in entries:
            check_md5(base / name, md5)

    def split(file_list: list[list[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [_read_cifar_batch(base / name, label_key) for name, _ in file_list]
        return torch.cat([x for x, _ in parts]), torch.cat([y for _, y in parts])

    meta_path = base / tv_cls.meta["filename"]
    names_key = tv_cls.meta["key"].encode()
    meta = _unpickle(meta_path)
    if names_key not in meta:
        raise DataError(f"{meta_path} lacks {names_key!r}; replace it")
    class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[names_key]]
    train_x, train_y = split(tv_cls.train_list)
    test_x, test_y = split(tv_cls.test_list)
    return ImageDataset(name, train_x, train_y, test_x, test_y, class_names, *CIFAR_NORMALIZATION)


@register_loader("cifar10")
def load_cifar10(root: Path, download: bool, verify: bool, **_: Any) -> ImageDataset:
    from torchvision.datasets import CIFAR10  # where used: importing torchvision pulls in torch._dynamo

    return _load_cifar("cifar10", CIFAR10, root, download, verify, b"labels")


@register_loader("cifar100")
def load_cifar100(root: Path, download: bool, verify: bool, **_: Any) -> ImageDataset:
    from torchvision.datasets import CIFAR100

    return _load_cifar("cifar100", CIFAR100, root, download, verify, b"fine_labels")
