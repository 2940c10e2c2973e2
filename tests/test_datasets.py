"""Tests for the loaders of cil.core.data: real MNIST from the shared folder, everything else on small synthetic
files."""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torchvision.io import encode_jpeg, encode_png

from cil.core.data import DATASET_NAMES, ImageDataset, cache_dir, data_root, folders, load_dataset
from cil.errors import ConfigError, DataError

SHARED_DATA = Path(os.environ.get("CIL_TEST_DATA_ROOT", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
# torchvision 0.29 deprecates its image codecs (in favour of torchcodec); they still work and are what we use.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")

MNIST_FILES = [
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
]


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    """Caches go to a temporary folder; the developer's CIL_DATA_ROOT must not leak into tests."""
    monkeypatch.setenv("CIL_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("CIL_DATA_ROOT", raising=False)


def _snapshot(folder: Path, stat_files_under: tuple[str, ...] = ("",)) -> set[tuple]:
    """Every folder with its mtime (catches any file created, deleted or renamed), every file name, and the size
    and mtime of the files under `stat_files_under` (catches a rewrite; stat-ing 60k JPEGs would be slow)."""
    out: set[tuple] = set()
    for dirpath, _, filenames in os.walk(folder):
        rel = os.path.relpath(dirpath, folder)
        out.add((rel, os.stat(dirpath).st_mtime_ns))
        deep = any(p == "" or (rel + os.sep).startswith(p + os.sep) for p in stat_files_under)
        for name in filenames:
            st = os.stat(os.path.join(dirpath, name)) if deep else None
            out.add((os.path.join(rel, name), st and st.st_size, st and st.st_mtime_ns))
    return out


def _solid(value, channels: int = 3, size: int | tuple[int, int] = 8) -> torch.Tensor:
    h, w = (size, size) if isinstance(size, int) else size
    img = torch.empty(channels, h, w, dtype=torch.uint8)
    img[:] = torch.as_tensor(value, dtype=torch.uint8).reshape(-1, 1, 1)
    return img


def _write_image(path: Path, img: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = encode_jpeg(img, quality=95) if path.suffix.lower() in (".jpg", ".jpeg") else encode_png(img)
    path.write_bytes(data.numpy().tobytes())


# ------------------------------------------------------------------------------------------ general


def test_unknown_name_raises_config_error_listing_valid_names():
    with pytest.raises(ConfigError) as e:
        load_dataset("imagenet21k")
    assert "imagenet21k" in str(e.value)
    for name in DATASET_NAMES:
        assert name in str(e.value)


def test_dataset_names_are_the_documented_ones():
    assert set(DATASET_NAMES) == {
        "mnist",
        "fashion_mnist",
        "cifar10",
        "cifar100",
        "tinyimagenet",
        "imagefolder",
        "cifar10_jpeg",
        "digits",
    }


def test_data_root_and_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert data_root() == tmp_path.resolve() / "data"
    monkeypatch.setenv("CIL_DATA_ROOT", str(tmp_path / "env"))
    assert data_root() == (tmp_path / "env").resolve()
    assert data_root(tmp_path / "explicit") == (tmp_path / "explicit").resolve()  # the argument wins
    assert cache_dir() == tmp_path / "cache"
    monkeypatch.delenv("CIL_CACHE_DIR")
    assert cache_dir() == Path.home() / ".cache" / "cil"


def test_image_dataset_rejects_malformed_tensors():
    x, y = torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(2, dtype=torch.int64)
    ds = ImageDataset("ok", x, y, x, y, ["a"])
    assert ds.num_classes == 1 and ds.input_shape == (1, 4, 4)
    with pytest.raises(DataError, match="uint8"):
        ImageDataset("bad", x.float(), y, x, y, ["a"])
    with pytest.raises(DataError, match="labels outside"):
        ImageDataset("bad", x, y + 1, x, y, ["a"])


# ------------------------------------------------------------------------------ MNIST (real copy)

needs_shared_mnist = pytest.mark.skipif(
    not (SHARED_DATA / "MNIST" / "raw" / MNIST_FILES[0]).is_file(),
    reason=f"no MNIST copy at {SHARED_DATA} (set CIL_TEST_DATA_ROOT to the shared data folder)",
)


@needs_shared_mnist
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_real_mnist_family_loads_verified_without_writing_to_root(name):
    folder = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[name]
    before = _snapshot(SHARED_DATA, stat_files_under=(folder,))
    ds = load_dataset(name, SHARED_DATA, verify=True, download=False)
    assert _snapshot(SHARED_DATA, stat_files_under=(folder,)) == before
    assert ds.name == name
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.train_x.is_contiguous() and ds.test_x.is_contiguous()
    assert ds.num_classes == 10 and ds.input_shape == (1, 28, 28)
    assert torch.bincount(ds.train_y).tolist() == torch.bincount(ds.train_y, minlength=10).tolist()
    assert (torch.bincount(ds.train_y) > 5000).all() and (torch.bincount(ds.test_y) > 800).all()
    assert int(ds.train_x.max()) == 255 and int(ds.train_x.min()) == 0


@needs_shared_mnist
def test_real_mnist_tampered_file_fails_md5(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    shutil.copytree(SHARED_DATA / "MNIST" / "raw", raw)
    bad = raw / "t10k-labels-idx1-ubyte.gz"
    blob = bytearray(bad.read_bytes())
    blob[-20] ^= 0xFF
    bad.chmod(0o644)
    bad.write_bytes(bytes(blob))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz") as e:
        load_dataset("mnist", tmp_path, verify=True, download=False)
    assert "checksum" in str(e.value)


@needs_shared_mnist
def test_real_mnist_extracted_idx_files_are_accepted(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        plain = gzip.decompress((SHARED_DATA / "MNIST" / "raw" / name).read_bytes())
        (raw / name.removesuffix(".gz")).write_bytes(plain)
    extracted = load_dataset("mnist", tmp_path, download=False)
    original = load_dataset("mnist", SHARED_DATA, download=False)
    assert torch.equal(extracted.train_x, original.train_x) and torch.equal(extracted.test_y, original.test_y)


# ------------------------------------------------------------------------------ MNIST (synthetic)


def _idx_bytes(arr: np.ndarray) -> bytes:
    return bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def _write_synthetic_mnist(root: Path, n_train: int = 6, n_test: int = 4) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(n_train) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": (np.arange(n_test) + 3) % 10,
    }
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name, arr in arrays.items():
        (raw / name).write_bytes(gzip.compress(_idx_bytes(arr)))
    return arrays


def test_synthetic_mnist_idx_parsing(tmp_path):
    arrays = _write_synthetic_mnist(tmp_path)
    ds = load_dataset("mnist", tmp_path, verify=False, download=False)
    assert ds.train_x.shape == (6, 1, 28, 28) and ds.test_x.shape == (4, 1, 28, 28)
    assert torch.equal(ds.train_x[:, 0], torch.from_numpy(arrays["train-images-idx3-ubyte.gz"].astype(np.uint8)))
    assert ds.test_y.tolist() == arrays["t10k-labels-idx1-ubyte.gz"].tolist()


def test_synthetic_mnist_fails_md5_and_truncation_is_named(tmp_path):
    _write_synthetic_mnist(tmp_path)
    with pytest.raises(DataError, match="checksum mismatch.*train-images-idx3-ubyte.gz"):
        load_dataset("mnist", tmp_path, verify=True, download=False)
    bad = tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:-30])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("mnist", tmp_path, verify=False, download=False)


def test_missing_mnist_without_download_names_files_and_directory(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("mnist", tmp_path, download=False)
    msg = str(e.value)
    assert "train-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg
    assert str(tmp_path.resolve() / "MNIST" / "raw") in msg
    assert "CIL_DATA_ROOT" in msg
    assert list(tmp_path.iterdir()) == []  # looking did not create anything


def test_failed_download_becomes_one_clear_error(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision

    def offline(*args, **kwargs):
        raise URLError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", tmp_path, download=True)
    msg = str(e.value)
    assert "download failed" in msg and "network is unreachable" in msg
    assert "train-labels-idx1-ubyte.gz" in msg and str(tmp_path.resolve() / "FashionMNIST" / "raw") in msg


# ----------------------------------------------------------------------------------------- CIFAR

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _dump(path: Path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _write_cifar10(root: Path, n: int = 4) -> dict[str, np.ndarray]:
    base = root / "cifar-10-batches-py"
    base.mkdir(parents=True)
    rng = np.random.default_rng(1)
    data = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        data[name] = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        _dump(
            base / name,
            {
                b"batch_label": name.encode(),
                b"data": data[name],
                b"labels": [(i + j) % 10 for j in range(n)],
                b"filenames": [f"{name}_{j}.png".encode() for j in range(n)],
            },
        )
    _dump(
        base / "batches.meta",
        {b"label_names": [s.encode() for s in CIFAR10_NAMES], b"num_cases_per_batch": n, b"num_vis": 3072},
    )
    return data


def _write_cifar100(root: Path, n_train: int = 10, n_test: int = 5) -> None:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(2)
    for name, n in (("train", n_train), ("test", n_test)):
        _dump(
            base / name,
            {
                b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                b"fine_labels": [(7 * j) % 100 for j in range(n)],
                b"coarse_labels": [j % 20 for j in range(n)],
            },
        )
    _dump(
        base / "meta",
        {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    )


def test_synthetic_cifar10_layout_labels_and_names(tmp_path):
    data = _write_cifar10(tmp_path)
    ds = load_dataset("cifar10", tmp_path, verify=False, download=False)
    assert ds.train_x.shape == (20, 3, 32, 32) and ds.test_x.shape == (4, 3, 32, 32)
    assert ds.class_names == CIFAR10_NAMES
    assert ds.train_y.tolist()[:8] == [0, 1, 2, 3, 1, 2, 3, 4]  # batches in order, labels per batch
    assert ds.test_y.tolist() == [5, 6, 7, 8]
    row = data["data_batch_1"][0]  # 1024 red values, then green, then blue, each row-major 32x32
    assert int(ds.train_x[0, 0, 0, 1]) == row[1]
    assert int(ds.train_x[0, 0, 1, 0]) == row[32]
    assert int(ds.train_x[0, 1, 0, 0]) == row[1024]
    assert int(ds.train_x[0, 2, 31, 31]) == row[3071]
    assert torch.equal(ds.test_x[3].flatten(), torch.from_numpy(data["test_batch"][3]))


def test_synthetic_cifar_fails_md5_naming_the_file(tmp_path):
    _write_cifar10(tmp_path)
    with pytest.raises(DataError, match=r"checksum mismatch for .*data_batch_1"):
        load_dataset("cifar10", tmp_path, verify=True, download=False)


def test_truncated_cifar_pickle_is_named(tmp_path):
    _write_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    with pytest.raises(DataError, match="data_batch_3"):
        load_dataset("cifar10", tmp_path, verify=False, download=False)


def test_synthetic_cifar100_uses_fine_labels(tmp_path):
    _write_cifar100(tmp_path)
    ds = load_dataset("cifar100", tmp_path, verify=False, download=False)
    assert ds.train_x.shape == (10, 3, 32, 32) and ds.test_x.shape == (5, 3, 32, 32)
    assert ds.num_classes == 100 and ds.class_names[7] == "fine7"
    assert ds.train_y.tolist() == [(7 * j) % 100 for j in range(10)]
    with pytest.raises(DataError, match=r"checksum mismatch for .*cifar-100-python.train"):
        load_dataset("cifar100", tmp_path, verify=True, download=False)


def test_missing_cifar_without_download_names_directory(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("cifar100", tmp_path, download=False)
    assert str(tmp_path.resolve() / "cifar-100-python") in str(e.value) and "meta" in str(e.value)


# ------------------------------------------------------------------------------------ TinyImageNet


def test_synthetic_tinyimagenet(tmp_path):
    base = tmp_path / "tiny-imagenet-200"
    wnids = ["n0300", "n0100", "n0200"]  # deliberately unsorted: labels follow wnids.txt
    colours = {0: (200, 30, 30), 1: (30, 200, 30), 2: (30, 30, 200)}
    base.mkdir()
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text(
        "n0100\tgoldfish, Carassius auratus\nn0200\ttabby cat\nn0300\tschool bus\nn9999\tnot in this subset\n"
    )
    for label, wnid in enumerate(wnids):
        imgs = base / "train" / wnid / "images"
        for i in range(2):
            _write_image(imgs / f"{wnid}_{i}.JPEG", _solid(colours[label], size=64))
        (base / "train" / wnid / f"{wnid}_boxes.txt").write_text(f"{wnid}_0.JPEG\t0\t0\t63\t63\n")
    _write_image(base / "train" / "n0200" / "images" / "n0200_2.JPEG", _solid(90, channels=1, size=64))
    annotations = [("val_0.JPEG", "n0100"), ("val_1.JPEG", "n0200"), ("val_2.JPEG", "n0300")]
    for fname, wnid in annotations:
        _write_image(base / "val" / "images" / fname, _solid(colours[wnids.index(wnid)], size=64))
    (base / "val" / "val_annotations.txt").write_text("".join(f"{f}\t{w}\t0\t0\t63\t63\n" for f, w in annotations))

    ds = load_dataset("tinyimagenet", tmp_path)
    assert ds.train_x.shape == (7, 3, 64, 64) and ds.test_x.shape == (3, 3, 64, 64)
    assert ds.class_names == ["school bus", "goldfish, Carassius auratus", "tabby cat"]
    assert ds.train_y.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert ds.test_y.tolist() == [1, 2, 0]
    for x, y in zip(ds.test_x, ds.test_y, strict=True):  # pixels travel with their labels
        assert (x.float().mean((1, 2)) - torch.tensor(colours[int(y)]).float()).abs().max() < 4
    gray = ds.train_x[6].float()
    assert torch.equal(gray[0], gray[1]) and torch.equal(gray[1], gray[2]) and abs(gray.mean() - 90) < 3


def test_missing_tinyimagenet_explains_where_to_get_it(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset("tinyimagenet", tmp_path)
    assert str(tmp_path.resolve() / "tiny-imagenet-200") in str(e.value) and "tiny-imagenet-200.zip" in str(e.value)


# ------------------------------------------------------------------------------------- image folder


def _tree(base: Path, spec: dict[str, dict[str, list[torch.Tensor]]], ext: str = ".png") -> Path:
    for split, classes in spec.items():
        for cls, imgs in classes.items():
            (base / split / cls).mkdir(parents=True, exist_ok=True)
            for i, img in enumerate(imgs):
                _write_image(base / split / cls / f"{i:03d}{ext}", img)
    return base


def test_imagefolder_classes_labels_and_pixels(tmp_path):
    _tree(
        tmp_path / "tree",
        {
            "train": {"cat": [_solid(10, 1), _solid(11, 1)], "ant": [_solid(20, 1)], "bee": [_solid(30, 1)]},
            "test": {"bee": [_solid(31, 1)]},
        },
    )
    (tmp_path / "tree" / "train" / "cat" / "notes.txt").write_text("not an image: ignored")
    ds = load_dataset("imagefolder", tmp_path, path="tree")  # relative path: taken from the data root
    assert ds.name == "imagefolder"
    assert ds.class_names == ["ant", "bee", "cat"]
    assert ds.input_shape == (1, 8, 8)  # all grayscale: stays one channel
    assert ds.train_y.tolist() == [0, 1, 2, 2]
    assert ds.train_x[:, 0, 0, 0].tolist() == [20, 30, 10, 11]
    assert ds.test_y.tolist() == [1] and int(ds.test_x[0, 0, 3, 3]) == 31


def test_imagefolder_mixed_channels_become_rgb(tmp_path):
    _tree(
        tmp_path, {"train": {"a": [_solid(50, 1)], "b": [_solid((1, 2, 3), 3)]}, "test": {"a": [_solid((9, 8, 7), 3)]}}
    )
    from PIL import Image  # torchvision cannot encode RGBA PNGs; only the test needs to write one

    Image.new("RGBA", (8, 8), (4, 5, 6, 128)).save(tmp_path / "train" / "b" / "rgba.png")
    ds = load_dataset("imagefolder", path=str(tmp_path))
    assert ds.input_shape == (3, 8, 8)
    assert ds.train_x[0, :, 0, 0].tolist() == [50, 50, 50]
    assert ds.train_x[2, :, 0, 0].tolist() == [4, 5, 6]  # alpha dropped


def test_imagefolder_second_load_uses_cache_until_files_change(tmp_path, monkeypatch):
    tree = _tree(
        tmp_path / "tree", {"train": {"a": [_solid(1)], "b": [_solid(2)]}, "test": {"a": [_solid(3)]}}, ext=".jpg"
    )
    calls = []
    real_decode = folders.decode_images
    monkeypatch.setattr(folders, "decode_images", lambda *a, **k: calls.append(1) or real_decode(*a, **k))
    before = _snapshot(tree)

    first = load_dataset("imagefolder", path=str(tree))
    assert len(calls) == 1 and len(list((tmp_path / "cache").glob("imagefolder-*.pt"))) == 1
    second = load_dataset("imagefolder", path=str(tree))
    assert len(calls) == 1  # served from the cache
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.test_y, second.test_y)
    assert second.class_names == ["a", "b"]
    assert _snapshot(tree) == before  # nothing written next to the images

    _write_image(tree / "train" / "b" / "000.jpg", _solid(200))  # a changed file invalidates the cache
    third = load_dataset("imagefolder", path=str(tree))
    assert len(calls) == 2 and int(third.train_x[1, 0, 0, 0]) > 150
    load_dataset("imagefolder", path=str(tree), image_size=4)  # and so does another image size
    assert len(calls) == 3


def test_imagefolder_corrupt_cache_is_rebuilt(tmp_path):
    tree = _tree(tmp_path / "tree", {"train": {"a": [_solid(7)]}, "test": {"a": [_solid(8)]}})
    load_dataset("imagefolder", path=str(tree))
    (cached,) = (tmp_path / "cache").glob("imagefolder-*.pt")
    cached.write_bytes(b"garbage, not a torch file")
    with pytest.warns(UserWarning, match="unreadable dataset cache"):
        ds = load_dataset("imagefolder", path=str(tree))
    assert int(ds.train_x[0, 0, 0, 0]) == 7
    assert torch.load(cached, weights_only=True)["train_x"].shape == (1, 3, 8, 8)  # rewritten, valid again
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_imagefolder_mismatched_sizes_name_the_file_and_suggest_image_size(tmp_path):
    tree = _tree(
        tmp_path,
        {"train": {"a": [_solid(1, size=8)], "b": [_solid(2, size=(8, 12))]}, "test": {"a": [_solid(3, size=8)]}},
    )
    with pytest.raises(DataError, match=r"train/b/000\.png is 12x8.*image_size"):
        load_dataset("imagefolder", path=str(tree))
    ds = load_dataset("imagefolder", path=str(tree), image_size=16)
    assert ds.train_x.shape == (2, 3, 16, 16) and ds.test_x.shape == (1, 3, 16, 16)
    assert ds.train_x[1].unique().tolist() == [2]  # a solid image stays solid after resizing


def test_imagefolder_empty_class_folder_is_named(tmp_path):
    tree = _tree(tmp_path, {"train": {"a": [_solid(1)]}, "test": {"a": [_solid(1)]}})
    (tree / "train" / "empty").mkdir()
    with pytest.raises(DataError, match=r"train/empty has no images"):
        load_dataset("imagefolder", path=str(tree))


@pytest.mark.parametrize("content", [b"\xff\xd8\xff\xe0 truncated jpeg body", b"plain text, not an image"])
def test_imagefolder_corrupt_image_is_named(tmp_path, content):
    tree = _tree(tmp_path, {"train": {"a": [_solid(1), _solid(2)]}, "test": {"a": [_solid(3)]}}, ext=".jpg")
    (tree / "train" / "a" / "broken.jpg").write_bytes(content)
    with pytest.raises(DataError, match=r"train/a/broken\.jpg"):
        load_dataset("imagefolder", path=str(tree))


def test_imagefolder_test_class_not_in_train(tmp_path):
    tree = _tree(tmp_path, {"train": {"a": [_solid(1)]}, "test": {"a": [_solid(1)], "zebra": [_solid(2)]}})
    with pytest.raises(DataError, match="zebra"):
        load_dataset("imagefolder", path=str(tree))


def test_imagefolder_missing_dirs_and_path(tmp_path):
    with pytest.raises(DataError, match=r"nowhere.*train.*<class>"):
        load_dataset("imagefolder", tmp_path, path="nowhere")
    _tree(tmp_path / "half", {"train": {"a": [_solid(1)]}})
    with pytest.raises(DataError, match=r"half/test"):
        load_dataset("imagefolder", path=str(tmp_path / "half"))
    with pytest.raises(ConfigError, match="path"):
        load_dataset("imagefolder", tmp_path)


def test_cifar10_jpeg_reads_the_tree_under_the_root(tmp_path):
    _tree(
        tmp_path / "cifar10-jpeg",
        {"train": {"cat": [_solid(5, size=32)], "dog": [_solid(6, size=32)]}, "test": {"dog": [_solid(7, size=32)]}},
        ext=".jpg",
    )
    ds = load_dataset("cifar10_jpeg", tmp_path)
    assert ds.name == "cifar10_jpeg" and ds.class_names == ["cat", "dog"] and ds.input_shape == (3, 32, 32)
    assert list((tmp_path / "cache").glob("cifar10_jpeg-*.pt"))
    with pytest.raises(DataError, match="cifar10-jpeg"):
        load_dataset("cifar10_jpeg", tmp_path / "elsewhere")


# ------------------------------------------------------------------------------------------ digits


def test_digits_shapes_scale_and_stratified_split():
    ds = load_dataset("digits")
    assert ds.train_x.shape == (1437, 1, 8, 8) and ds.test_x.shape == (360, 1, 8, 8)
    assert ds.train_x.dtype == torch.uint8 and int(ds.train_x.max()) == 255 and int(ds.train_x.min()) == 0
    assert ds.class_names == [str(d) for d in range(10)]
    share = (
        torch.bincount(ds.test_y, minlength=10).float()
        / (torch.bincount(ds.test_y, minlength=10) + torch.bincount(ds.train_y, minlength=10)).float()
    )
    assert ((share > 0.18) & (share < 0.22)).all()


def test_digits_split_is_deterministic_whatever_the_global_rng():
    torch.manual_seed(1)
    np.random.seed(1)  # noqa: NPY002 - the global legacy RNG is what this test shows is ignored
    a = load_dataset("digits")
    torch.manual_seed(2)
    np.random.seed(2)  # noqa: NPY002 - as above
    b = load_dataset("digits")
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)


def test_image_size_resizes_in_memory_datasets():
    ds = load_dataset("digits", image_size=16)
    assert ds.train_x.shape == (1437, 1, 16, 16) and ds.train_x.dtype == torch.uint8
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset("digits", image_size=0)
