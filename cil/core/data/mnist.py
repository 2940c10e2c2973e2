"""MNIST and Fashion-MNIST from their idx files (torchvision's layout), parsed in place: nothing is extracted into
the data root."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from cil.core.data.dataset import ImageDataset, register_loader
from cil.core.data.sources import check_md5, download_files, missing_error
from cil.errors import DataError

if TYPE_CHECKING:
    from torchvision.datasets import MNIST


def _read_idx(path: Path) -> torch.Tensor:
    """Parse an idx file (optionally gzipped) ourselves, so nothing is extracted into the data root."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"cannot read {path}: {e}; the file is corrupt or truncated, replace it") from e
    # Header: two zero bytes, type code (0x08 = uint8), number of dims, then each dim as big-endian int32.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not a uint8 idx file (bad header); replace it")
    ndim = raw[3]
    offset = 4 + 4 * ndim
    dims = struct.unpack(f">{ndim}I", raw[4:offset]) if len(raw) >= offset else ()
    if len(dims) != ndim or len(raw) - offset != int(np.prod(dims)):
        raise DataError(
            f"{path} is truncated: header promises {list(dims)} but the file has "
            f"{len(raw) - offset} data bytes; replace it"
        )
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=offset).reshape(dims)


def _load_mnist_family(name: str, tv_cls: type[MNIST], root: Path, download: bool, verify: bool) -> ImageDataset:
    raw_dir = root / tv_cls.__name__ / "raw"  # torchvision's layout: root/MNIST/raw, root/FashionMNIST/raw

    def locate() -> dict[str, Path | None]:
        # Prefer the original .gz (md5-verifiable); accept an already extracted idx file too.
        found: dict[str, Path | None] = {}
        for gz_name, _ in tv_cls.resources:
            gz, plain = raw_dir / gz_name, raw_dir / gz_name.removesuffix(".gz")
            found[gz_name] = gz if gz.is_file() else plain if plain.is_file() else None
        return found

    files = locate()
    missing = [n for n, p in files.items() if p is None]
    if missing:
        # Only the missing archives, left packed (they are read as they are): torchvision's own download would
        # unpack every archive already there into the data root.
        error = download_files(tv_cls.mirrors, missing, dict(tv_cls.resources), raw_dir) if download else None
        files = locate()
        missing = [n for n, p in files.items() if p is None]
        if missing:
            raise missing_error(tv_cls.__name__, missing, raw_dir, error if download else None)
    paths = {n: p for n, p in files.items() if p is not None}  # every file, none being missing
    if verify:
        # torchvision's md5s are of the .gz files; an extracted file is checked only by its idx header.
        for gz_name, md5 in tv_cls.resources:
            if paths[gz_name].suffix == ".gz":
                check_md5(paths[gz_name], md5)

    def split(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = _read_idx(paths[f"{prefix}-images-idx3-ubyte.gz"])
        y = _read_idx(paths[f"{prefix}-labels-idx1-ubyte.gz"])
        if x.dim() != 3 or y.dim() != 1 or len(x) != len(y):
            raise DataError(f"{raw_dir}: {prefix} images {list(x.shape)} and labels {list(y.shape)} do not match")
        return x.unsqueeze(1).contiguous(), y.long()

    train_x, train_y = split("train")
    test_x, test_y = split("t10k")
    return ImageDataset(name, train_x, train_y, test_x, test_y, list(tv_cls.classes))


@register_loader("mnist")
def load_mnist(root: Path, download: bool, verify: bool, **_: Any) -> ImageDataset:
    from torchvision.datasets import MNIST  # where used: importing torchvision pulls in torch._dynamo

    return _load_mnist_family("mnist", MNIST, root, download, verify)


@register_loader("fashion_mnist")
def load_fashion_mnist(root: Path, download: bool, verify: bool, **_: Any) -> ImageDataset:
    from torchvision.datasets import FashionMNIST

    return _load_mnist_family("fashion_mnist", FashionMNIST, root, download, verify)
