"""Image trees -> one uint8 tensor: batched decoding on threads, resizing, and a cache of the decoded tensors
under :func:`cache_dir` (never the data root), keyed by the files' names, sizes and times."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from torchvision.io import ImageReadMode

from cil.core.data.dataset import ImageDataset, cache_dir
from cil.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_CACHE_FORMAT = 1  # bump when the cached dict changes shape, so old caches are not reused
_DECODE_CHUNK = 512  # files per decode call: big enough to amortise overhead, small enough to balance threads


def _decode_one(path: str, data: torch.Tensor, mode: ImageReadMode) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms.v2.functional import to_dtype

    try:
        img = decode_image(data, mode=mode)
        img = img[0] if img.dim() == 4 else img  # animated GIF: keep the first frame
        # 16-bit PNGs decode as uint16; scale them down so the whole dataset stays uint8.
        return img if img.dtype == torch.uint8 else to_dtype(img, torch.uint8, scale=True)
    except RuntimeError:
        pass
    try:  # PIL only as a fallback for formats torchvision cannot decode (BMP, TIFF, ...)
        from PIL import Image

        with Image.open(path) as im:
            keep_gray = mode == ImageReadMode.GRAY or (mode == ImageReadMode.UNCHANGED and im.mode in ("1", "L", "LA"))
            arr = np.asarray(im.convert("L" if keep_gray else "RGB"))
        return torch.from_numpy(arr.copy()).reshape(arr.shape[0], arr.shape[1], -1).permute(2, 0, 1).contiguous()
    except Exception as e:
        raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}; replace or remove the file") from e


def _read_bytes(path: str) -> torch.Tensor:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from e
    if not data:
        raise DataError(f"image {path} is empty (0 bytes); replace or remove the file")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _decode_chunk(paths: list[str]) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg  # (see decode_images)

    datas = [_read_bytes(p) for p in paths]
    out: list[torch.Tensor | None] = [None] * len(paths)
    jpeg = [i for i, d in enumerate(datas) if len(d) > 3 and bytes(d[:3].tolist()) == b"\xff\xd8\xff"]
    if jpeg:
        try:  # one call for the whole list is markedly faster than one call per image
            for i, img in zip(jpeg, decode_jpeg([datas[i] for i in jpeg]), strict=True):
                out[i] = img
        except RuntimeError:
            pass  # a bad file in the list: decode one by one below to name it
    # the images that failed in the list (or were not JPEGs), one by one
    return [
        _decode_one(paths[i], datas[i], ImageReadMode.UNCHANGED) if img is None else img for i, img in enumerate(out)
    ]


def decode_images(files: list[str], channels: int | None, image_size: int | None, desc: str) -> torch.Tensor:
    """Decode image files to one uint8 [N, C, H, W] tensor.

    channels: 3 forces RGB; None keeps 1 channel if every image is grayscale, else converts all to RGB.
    image_size: resize every image to image_size x image_size; None requires all images to share a size.
    """
    from tqdm import tqdm

    if not files:
        return torch.empty(0, channels or 3, image_size or 0, image_size or 0, dtype=torch.uint8)
    chunks = [files[i : i + _DECODE_CHUNK] for i in range(0, len(files), _DECODE_CHUNK)]
    images: list[torch.Tensor] = []
    # The C++ decoders release the GIL, so threads use both cores without pickling tensors across processes.
    with (
        ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool,
        tqdm(total=len(files), desc=desc, unit="img", delay=2.0, leave=False) as bar,
    ):
        for decoded in pool.map(_decode_chunk, chunks):
            images.extend(decoded)
            bar.update(len(decoded))

    # Grey+alpha counts as grey; anything else (RGB, RGBA, CMYK) makes the whole dataset RGB.
    if channels is None:
        channels = 1 if all(img.shape[0] in (1, 2) for img in images) else 3
    from torchvision.io import (
        ImageReadMode,
    )  # torchvision is imported where used: it pulls in torch._dynamo, a cost only runs that decode pay

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    for i, img in enumerate(images):
        if img.shape[0] != channels:  # rare: re-decode just these with the decoder's own colour conversion
            images[i] = _decode_one(files[i], _read_bytes(files[i]), mode)

    if image_size is None:
        h, w = images[0].shape[1:]
        for path, img in zip(files, images, strict=True):
            if img.shape[1:] != (h, w):
                raise DataError(
                    f"{path} is {img.shape[2]}x{img.shape[1]} pixels but {files[0]} is {w}x{h}; "
                    f"all images must share one size: set dataset.image_size (image_size=N) "
                    f"to resize them all to NxN"
                )
        return torch.stack(images)
    return _resize_list(images, image_size)


def _resize_list(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """Resize images of possibly different sizes to size x size, batching those that share a size."""
    from torchvision.transforms.v2.functional import resize  # (see decode_images)

    out = torch.empty(len(images), images[0].shape[0], size, size, dtype=torch.uint8)
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[1:]), []).append(i)
    for (h, w), idx in groups.items():
        for start in range(0, len(idx), 4096):  # bound the float scratch memory of the resize
            part = idx[start : start + 4096]
            batch = torch.stack([images[i] for i in part])
            out[part] = batch if (h, w) == (size, size) else resize(batch, [size, size], antialias=True)
    return out


# -------------------------------------------------------------------------------------- decode cache


def _cache_key(name: str, base: Path, files: list[str], image_size: int | None) -> str:
    """Hash of everything the decoded tensors depend on: location, file list with sizes and mtimes, size."""
    h = hashlib.sha256(f"{_CACHE_FORMAT}\0{name}\0{base.resolve()}\0{image_size}\n".encode())
    skip = len(str(base)) + 1
    for path in sorted(files):  # plain strings: pathlib costs seconds on 60k files
        try:
            st = os.stat(path)
        except OSError as e:
            raise DataError(f"{name}: cannot stat {path}: {e}") from e
        h.update(f"{path[skip:]}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cached(
    name: str, base: Path, files: list[str], image_size: int | None, build: Callable[[], ImageDataset]
) -> ImageDataset:
    path = cache_dir() / f"{name}-{_cache_key(name, base, files, image_size)}.pt"
    if path.is_file():
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            return ImageDataset(name, d["train_x"], d["train_y"], d["test_x"], d["test_y"], list(d["class_names"]))
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign cache is simply rebuilt
            warnings.warn(
                f"ignoring unreadable dataset cache {path} ({type(e).__name__}: {e}); rebuilding it", stacklevel=2
            )
    ds = build()
    try:  # atomic: a crash mid-write never leaves a half-written cache under the real name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(
                    {
                        "train_x": ds.train_x,
                        "train_y": ds.train_y,
                        "test_x": ds.test_x,
                        "test_y": ds.test_y,
                        "class_names": ds.class_names,
                    },
                    f,
                )
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        warnings.warn(
            f"could not write dataset cache {path} ({e}); set CIL_CACHE_DIR to a writable folder", stacklevel=2
        )
    return ds


def is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def images_under(folder: Path) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # deterministic order
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if is_image(f)]
    return files
