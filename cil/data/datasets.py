"""Datasets as in-memory uint8 image tensors plus int64 labels.

Every loader returns an :class:`ImageDataset` whose images are ``uint8 [N, C, H, W]`` CPU tensors, so
normalisation and augmentation can happen in batch on the device later. Files are read once; nothing is
ever written into the data root (it may be a read-only shared copy). Image trees (``imagefolder``,
``cifar10_jpeg``, ``tinyimagenet``) are decoded once and the tensors cached under :func:`cache_dir`.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import pickle
import socket
import struct
import tempfile
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torchvision
from torchvision.io import ImageReadMode, decode_image, decode_jpeg
from torchvision.transforms.v2.functional import resize, to_dtype

from cil.errors import ConfigError, DataError

__all__ = ["ImageDataset", "data_root", "cache_dir", "DATASET_NAMES", "load_dataset"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_CACHE_FORMAT = 1  # bump when the cached dict changes shape, so old caches are not reused
_DECODE_CHUNK = 512  # files per decode call: big enough to amortise overhead, small enough to balance threads
_DOWNLOAD_TIMEOUT_S = 30.0  # offline machines may silently drop packets; do not hang forever


@dataclass
class ImageDataset:
    name: str
    train_x: torch.Tensor  # uint8 [N, C, H, W], contiguous, CPU
    train_y: torch.Tensor  # int64 [N]
    test_x: torch.Tensor
    test_y: torch.Tensor
    class_names: list[str]  # index = label

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
            raise DataError(f"{self.name}: train images {list(self.train_x.shape[1:])} "
                            f"and test images {list(self.test_x.shape[1:])} differ in shape")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: the explicit argument, else ``$CIL_DATA_ROOT``, else ``./data``."""
    if root is None or str(root) == "":
        root = os.environ.get("CIL_DATA_ROOT") or "data"
    return Path(root).expanduser().resolve()


def cache_dir() -> Path:
    """Where decoded tensors are cached: ``$CIL_CACHE_DIR``, else ``~/.cache/cil``. Never the data root."""
    return Path(os.environ.get("CIL_CACHE_DIR") or Path.home() / ".cache" / "cil").expanduser()


# --------------------------------------------------------------------------------------------- helpers

def _where_hint() -> str:
    return "copy the files there, or point CIL_DATA_ROOT (or dataset.root) at a folder that has them"


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _check_md5(path: Path, expected: str) -> None:
    actual = _md5(path)
    if actual != expected:
        raise DataError(f"checksum mismatch for {path}: md5 {actual}, expected {expected}. The file is corrupt "
                        f"or a different version; replace it, or set dataset.verify=false to load it anyway")


@contextlib.contextmanager
def _network_timeout(seconds: float):
    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(old)


def _torchvision_download(tv_cls: type, root: Path) -> Exception | None:
    """Let torchvision fetch a dataset into ``root``; returns the error instead of raising it."""
    try:
        with _network_timeout(_DOWNLOAD_TIMEOUT_S):
            tv_cls(str(root), download=True)
    except Exception as e:  # noqa: BLE001 - any network/IO failure becomes one clear DataError below
        return e
    return None


def _missing_error(what: str, missing: list[str], directory: Path, tried: Exception | None) -> DataError:
    why = f" (download failed: {type(tried).__name__}: {tried})" if tried else " (download=False)"
    return DataError(f"{what}: missing {', '.join(missing)} in {directory}{why}; {_where_hint()}")


# ------------------------------------------------------------------------------- MNIST, Fashion-MNIST

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
        raise DataError(f"{path} is truncated: header promises {list(dims)} but the file has "
                        f"{len(raw) - offset} data bytes; replace it")
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8, offset=offset).reshape(dims)


def _load_mnist_family(name: str, tv_cls: type, root: Path, download: bool, verify: bool) -> ImageDataset:
    raw_dir = root / tv_cls.__name__ / "raw"  # torchvision's layout: root/MNIST/raw, root/FashionMNIST/raw

    def locate() -> dict[str, Path | None]:
        # Prefer the original .gz (md5-verifiable); accept an already extracted idx file too.
        found = {}
        for gz_name, _ in tv_cls.resources:
            gz, plain = raw_dir / gz_name, raw_dir / gz_name.removesuffix(".gz")
            found[gz_name] = gz if gz.is_file() else plain if plain.is_file() else None
        return found

    files = locate()
    missing = [n for n, p in files.items() if p is None]
    if missing:
        error = _torchvision_download(tv_cls, root) if download else None
        files = locate()
        missing = [n for n, p in files.items() if p is None]
        if missing:
            raise _missing_error(tv_cls.__name__, missing, raw_dir, error if download else None)
    if verify:
        # torchvision's md5s are of the .gz files; an extracted file is checked only by its idx header.
        for gz_name, md5 in tv_cls.resources:
            if files[gz_name].suffix == ".gz":
                _check_md5(files[gz_name], md5)

    def split(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        x = _read_idx(files[f"{prefix}-images-idx3-ubyte.gz"])
        y = _read_idx(files[f"{prefix}-labels-idx1-ubyte.gz"])
        if x.dim() != 3 or y.dim() != 1 or len(x) != len(y):
            raise DataError(f"{raw_dir}: {prefix} images {list(x.shape)} and labels {list(y.shape)} do not match")
        return x.unsqueeze(1).contiguous(), y.long()

    train_x, train_y = split("train")
    test_x, test_y = split("t10k")
    return ImageDataset(name, train_x, train_y, test_x, test_y, list(tv_cls.classes))


def _load_mnist(root: Path, download: bool, verify: bool, **_: Any) -> ImageDataset:
    return _load_mnist_family("mnist", torchvision.datasets.MNIST, root, download, verify)


def _load_fashion_mnist(root: Path, download: bool, verify: bool, **_: Any) -> ImageDataset:
    return _load_mnist_family("fashion_mnist", torchvision.datasets.FashionMNIST, root, download, verify)


# -------------------------------------------------------------------------------- CIFAR-10, CIFAR-100

def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = pickle.load(f, encoding="bytes")  # the batches were pickled by Python 2
    except Exception as e:  # noqa: BLE001 - truncated or garbage pickles raise many different types
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}; the file is corrupt or truncated, "
                        f"replace it") from e
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
        raise DataError(f"{path}: expected data [N, 3072] and {label_key!r} [N], "
                        f"got {list(data.shape)} and {list(labels.shape)}; replace it")
    # Each row is 1024 red, then 1024 green, then 1024 blue values, row-major: exactly [3, 32, 32].
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)


def _load_cifar(name: str, tv_cls: type, root: Path, download: bool, verify: bool,
                label_key: bytes) -> ImageDataset:
    base = root / tv_cls.base_folder
    entries = [*tv_cls.train_list, *tv_cls.test_list, [tv_cls.meta["filename"], tv_cls.meta["md5"]]]
    missing = [name for name, _ in entries if not (base / name).is_file()]
    if missing:
        error = _torchvision_download(tv_cls, root) if download else None
        missing = [name for name, _ in entries if not (base / name).is_file()]
        if missing:
            raise _missing_error(tv_cls.__name__, missing, base, error if download else None)
    if verify:
        for name, md5 in entries:
            _check_md5(base / name, md5)

    def split(file_list: list) -> tuple[torch.Tensor, torch.Tensor]:
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
    return ImageDataset(name, train_x, train_y, test_x, test_y, class_names)


def _load_cifar10(root: Path, download: bool, verify: bool, **_: Any) -> ImageDataset:
    return _load_cifar("cifar10", torchvision.datasets.CIFAR10, root, download, verify, b"labels")


def _load_cifar100(root: Path, download: bool, verify: bool, **_: Any) -> ImageDataset:
    return _load_cifar("cifar100", torchvision.datasets.CIFAR100, root, download, verify, b"fine_labels")


# ----------------------------------------------------------------------------------- image decoding

def _decode_one(path: str, data: torch.Tensor, mode: ImageReadMode) -> torch.Tensor:
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
    except Exception as e:  # noqa: BLE001
        raise DataError(f"cannot decode image {path}: {type(e).__name__}: {e}; replace or remove the file") from e


def _read_bytes(path: str) -> torch.Tensor:
    try:
        with open(path, "rb") as f:
            return torch.frombuffer(bytearray(f.read()), dtype=torch.uint8)
    except OSError as e:
        raise DataError(f"cannot read image {path}: {e}") from e


def _decode_chunk(paths: list[str]) -> list[torch.Tensor]:
    datas = [_read_bytes(p) for p in paths]
    out: list[torch.Tensor | None] = [None] * len(paths)
    jpeg = [i for i, d in enumerate(datas) if len(d) > 3 and bytes(d[:3].tolist()) == b"\xff\xd8\xff"]
    if jpeg:
        try:  # one call for the whole list is markedly faster than one call per image
            for i, img in zip(jpeg, decode_jpeg([datas[i] for i in jpeg])):
                out[i] = img
        except RuntimeError:
            pass  # a bad file in the list: decode one by one below to name it
    for i, img in enumerate(out):
        if img is None:
            out[i] = _decode_one(paths[i], datas[i], ImageReadMode.UNCHANGED)
    return out


def _decode_images(files: list[str], channels: int | None, image_size: int | None, desc: str) -> torch.Tensor:
    """Decode image files to one uint8 [N, C, H, W] tensor.

    channels: 3 forces RGB; None keeps 1 channel if every image is grayscale, else converts all to RGB.
    image_size: resize every image to image_size x image_size; None requires all images to share a size.
    """
    from tqdm import tqdm

    if not files:
        return torch.empty(0, channels or 3, image_size or 0, image_size or 0, dtype=torch.uint8)
    chunks = [files[i:i + _DECODE_CHUNK] for i in range(0, len(files), _DECODE_CHUNK)]
    images: list[torch.Tensor] = []
    # The C++ decoders release the GIL, so threads use both cores without pickling tensors across processes.
    with ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool, \
            tqdm(total=len(files), desc=desc, unit="img", delay=2.0, leave=False) as bar:
        for decoded in pool.map(_decode_chunk, chunks):
            images.extend(decoded)
            bar.update(len(decoded))

    # Grey+alpha counts as grey; anything else (RGB, RGBA, CMYK) makes the whole dataset RGB.
    if channels is None:
        channels = 1 if all(img.shape[0] in (1, 2) for img in images) else 3
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    for i, img in enumerate(images):
        if img.shape[0] != channels:  # rare: re-decode just these with the decoder's own colour conversion
            images[i] = _decode_one(files[i], _read_bytes(files[i]), mode)

    if image_size is None:
        h, w = images[0].shape[1:]
        for path, img in zip(files, images):
            if img.shape[1:] != (h, w):
                raise DataError(f"{path} is {img.shape[2]}x{img.shape[1]} pixels but {files[0]} is {w}x{h}; "
                                f"all images must share one size: set dataset.image_size (image_size=N) "
                                f"to resize them all to NxN")
        return torch.stack(images)
    return _resize_list(images, image_size)


def _resize_list(images: list[torch.Tensor], size: int) -> torch.Tensor:
    """Resize images of possibly different sizes to size x size, batching those that share a size."""
    out = torch.empty(len(images), images[0].shape[0], size, size, dtype=torch.uint8)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, img in enumerate(images):
        groups.setdefault(tuple(img.shape[1:]), []).append(i)
    for (h, w), idx in groups.items():
        for start in range(0, len(idx), 4096):  # bound the float scratch memory of the resize
            part = idx[start:start + 4096]
            batch = torch.stack([images[i] for i in part])
            out[part] = batch if (h, w) == (size, size) else resize(batch, [size, size], antialias=True)
    return out


def _resize_tensor(x: torch.Tensor, size: int) -> torch.Tensor:
    if tuple(x.shape[2:]) == (size, size):
        return x
    return torch.cat([resize(x[i:i + 4096], [size, size], antialias=True) for i in range(0, len(x), 4096)])


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


def _cached(name: str, base: Path, files: list[str], image_size: int | None,
            build: Callable[[], ImageDataset]) -> ImageDataset:
    path = cache_dir() / f"{name}-{_cache_key(name, base, files, image_size)}.pt"
    if path.is_file():
        try:
            d = torch.load(path, map_location="cpu", weights_only=True)
            return ImageDataset(name, d["train_x"], d["train_y"], d["test_x"], d["test_y"], list(d["class_names"]))
        except Exception as e:  # noqa: BLE001 - a corrupt or foreign cache is simply rebuilt
            warnings.warn(f"ignoring unreadable dataset cache {path} ({type(e).__name__}: {e}); rebuilding it")
    ds = build()
    try:  # atomic: a crash mid-write never leaves a half-written cache under the real name
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save({"train_x": ds.train_x, "train_y": ds.train_y, "test_x": ds.test_x,
                            "test_y": ds.test_y, "class_names": ds.class_names}, f)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError as e:
        warnings.warn(f"could not write dataset cache {path} ({e}); set CIL_CACHE_DIR to a writable folder")
    return ds


# ------------------------------------------------------------------------ image folders, TinyImageNet

def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_under(folder: Path) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))  # deterministic order
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
    return files


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
        raise DataError(f"{split_dir} has class folder(s) {extra} that are not in the train split "
                        f"{split_dir.parent / 'train'}; test classes must be a subset of train classes")
    index = {c: i for i, c in enumerate(classes)}
    files, labels = [], []
    for c in found:
        imgs = _images_under(split_dir / c)
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
        x = _decode_images(train_files + test_files, None, image_size, f"decoding {name}")
        n = len(train_files)
        return ImageDataset(name, x[:n].contiguous(), torch.tensor(train_labels, dtype=torch.int64),
                            x[n:].contiguous(), torch.tensor(test_labels, dtype=torch.int64), classes)

    return _cached(name, base, train_files + test_files, image_size, build)


def _load_imagefolder(root: Path, image_size: int | None, path: str | None, **_: Any) -> ImageDataset:
    if not path:
        raise ConfigError("dataset 'imagefolder' needs a path (dataset.path=...) to a folder with "
                          "train/<class>/<image> and test/<class>/<image>")
    base = Path(path).expanduser()
    return _load_image_tree("imagefolder", base if base.is_absolute() else root / base, image_size)


def _load_cifar10_jpeg(root: Path, image_size: int | None, path: str | None, **_: Any) -> ImageDataset:
    base = Path(path).expanduser() if path else Path("cifar10-jpeg")
    base = base if base.is_absolute() else root / base
    if not base.is_dir():
        raise DataError(f"cifar10_jpeg: {base} not found. It is the JPEG copy of CIFAR-10 kept in the shared "
                        f"offline data folder (../shared/data/cifar10-jpeg); point CIL_DATA_ROOT (or "
                        f"dataset.root) at that folder, or use dataset 'cifar10' to download the original")
    return _load_image_tree("cifar10_jpeg", base, image_size)


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        return [line.rstrip("\n\r") for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise DataError(f"tinyimagenet: cannot read {what} {path}: {e}") from e


def _load_tinyimagenet(root: Path, image_size: int | None, **_: Any) -> ImageDataset:
    base = root / "tiny-imagenet-200"
    layout = ("expected tiny-imagenet-200/{wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
              "val/val_annotations.txt}. It is not downloaded automatically: get "
              "http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into the data root "
              f"{root}, or point CIL_DATA_ROOT (or dataset.root) at the folder that holds tiny-imagenet-200")
    if not base.is_dir():
        raise DataError(f"tinyimagenet: {base} not found; {layout}")
    wnids = [line.strip() for line in _read_lines(base / "wnids.txt", "class list")]
    words: dict[str, str] = {}
    if (base / "words.txt").is_file():
        for line in _read_lines(base / "words.txt", "class names"):
            wnid, _, text = line.partition("\t")
            words[wnid.strip()] = text.strip()
    label_of = {w: i for i, w in enumerate(wnids)}

    train_files, train_labels = [], []
    for wnid in wnids:  # labels follow the order of wnids.txt
        folder = base / "train" / wnid / "images"
        imgs = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if _is_image(f)] if folder.is_dir() else []
        if not imgs:
            raise DataError(f"tinyimagenet: no images in {folder}; {layout}")
        train_files += imgs
        train_labels += [label_of[wnid]] * len(imgs)

    annotations = base / "val" / "val_annotations.txt"
    test_files, test_labels = [], []
    for n, line in enumerate(_read_lines(annotations, "validation labels"), 1):
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in label_of:
            raise DataError(f"tinyimagenet: {annotations} line {n} ({line!r}) does not name a wnid from wnids.txt")
        img = base / "val" / "images" / fields[0]
        if not img.is_file():
            raise DataError(f"tinyimagenet: {img} (listed in {annotations} line {n}) not found")
        test_files.append(str(img))
        test_labels.append(label_of[fields[1]])

    def build() -> ImageDataset:
        x = _decode_images(train_files + test_files, 3, image_size, "decoding tinyimagenet")
        n = len(train_files)
        return ImageDataset("tinyimagenet", x[:n].contiguous(), torch.tensor(train_labels, dtype=torch.int64),
                            x[n:].contiguous(), torch.tensor(test_labels, dtype=torch.int64),
                            [words.get(w, w) for w in wnids])

    # The text files decide labels and names, so they belong in the cache key too.
    key_files = train_files + test_files + [str(base / "wnids.txt"), str(annotations)]
    key_files += [str(base / "words.txt")] if (base / "words.txt").is_file() else []
    return _cached("tinyimagenet", base, key_files, image_size, build)


# ---------------------------------------------------------------------------------------- digits

def _load_digits(**_: Any) -> ImageDataset:
    """sklearn's 8x8 digits (shipped inside the package, so always available offline)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = np.rint(digits.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    y = digits.target.astype(np.int64)
    # A fixed random_state makes the split independent of any global RNG; stratified keeps 80/20 per class.
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=0)
    train_idx, test_idx = np.sort(train_idx), np.sort(test_idx)
    return ImageDataset("digits", torch.from_numpy(x[train_idx]), torch.from_numpy(y[train_idx]),
                        torch.from_numpy(x[test_idx]), torch.from_numpy(y[test_idx]),
                        [str(d) for d in digits.target_names])


# -------------------------------------------------------------------------------------- registry

_LOADERS: dict[str, Callable[..., ImageDataset]] = {
    "mnist": _load_mnist,
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "tinyimagenet": _load_tinyimagenet,
    "imagefolder": _load_imagefolder,
    "cifar10_jpeg": _load_cifar10_jpeg,
    "digits": _load_digits,
}
DATASET_NAMES: tuple[str, ...] = tuple(_LOADERS)
_DECODES_WITH_SIZE = ("tinyimagenet", "imagefolder", "cifar10_jpeg")  # resize while decoding (and cache)


def load_dataset(name: str, root: str | os.PathLike | None = None, *, download: bool = True, verify: bool = True,
                 image_size: int | None = None, path: str | None = None) -> ImageDataset:
    """Load a dataset by name into memory as uint8 tensors.

    root: data root (see :func:`data_root`). download: let torchvision fetch missing MNIST/CIFAR files.
    verify: check md5s of MNIST/CIFAR files. image_size: resize all images to image_size x image_size.
    path: the folder for ``imagefolder`` (relative paths are taken from the data root).
    """
    key = str(name).strip().lower()
    if key not in _LOADERS:
        raise ConfigError(f"unknown dataset {name!r}; valid names: {', '.join(DATASET_NAMES)}")
    if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                   or image_size <= 0):
        raise ConfigError(f"dataset.image_size must be a positive integer or null, got {image_size!r}")
    ds = _LOADERS[key](root=data_root(root), download=download, verify=verify, image_size=image_size, path=path)
    ds.name = key
    if image_size is not None and key not in _DECODES_WITH_SIZE:
        ds.train_x = _resize_tensor(ds.train_x, image_size)
        ds.test_x = _resize_tensor(ds.test_x, image_size)
    return ds
