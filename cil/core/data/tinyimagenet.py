"""TinyImageNet (200 classes, 64x64) from its zip's layout: wnids.txt, words.txt, train/<wnid>/images/,
val/images/ with val/val_annotations.txt. Decoded once and cached (cil.core.data.decode)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from cil.core.data.dataset import ImageDataset, register_loader
from cil.core.data.decode import cached, decode_images, is_image
from cil.errors import DataError


def _read_lines(path: Path, what: str) -> list[str]:
    try:
        return [line.rstrip("\n\r") for line in path.read_text().splitlines() if line.strip()]
    except OSError as e:
        raise DataError(f"tinyimagenet: cannot read {what} {path}: {e}") from e


@register_loader("tinyimagenet", resizes=True)
def load_tinyimagenet(root: Path, image_size: int | None, **_: Any) -> ImageDataset:
    base = root / "tiny-imagenet-200"
    layout = (
        "expected tiny-imagenet-200/{wnids.txt, words.txt, train/<wnid>/images/*.JPEG, val/images/*.JPEG, "
        "val/val_annotations.txt}. It is not downloaded automatically: get "
        "http://cs231n.stanford.edu/tiny-imagenet-200.zip and unzip it into the data root "
        f"{root}, or point CIL_DATA_ROOT (or dataset.root) at the folder that holds tiny-imagenet-200"
    )
    if not base.is_dir():
        raise DataError(f"tinyimagenet: {base} not found; {layout}")
    wnids = [line.strip() for line in _read_lines(base / "wnids.txt", "class list")]
    words: dict[str, str] = {}
    if (base / "words.txt").is_file():
        for line in _read_lines(base / "words.txt", "class names"):
            wnid, _tab, text = line.partition("\t")
            words[wnid.strip()] = text.strip()
    label_of = {w: i for i, w in enumerate(wnids)}

    train_files, train_labels = [], []
    for wnid in wnids:  # labels follow the order of wnids.txt
        folder = base / "train" / wnid / "images"
        imgs = [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if is_image(f)] if folder.is_dir() else []
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
        x = decode_images(train_files + test_files, 3, image_size, "decoding tinyimagenet")
        n = len(train_files)
        return ImageDataset(
            "tinyimagenet",
            x[:n].contiguous(),
            torch.tensor(train_labels, dtype=torch.int64),
            x[n:].contiguous(),
            torch.tensor(test_labels, dtype=torch.int64),
            [words.get(w, w) for w in wnids],
        )

    # The text files decide labels and names, so they belong in the cache key too.
    key_files = train_files + test_files + [str(base / "wnids.txt"), str(annotations)]
    key_files += [str(base / "words.txt")] if (base / "words.txt").is_file() else []
    return cached("tinyimagenet", base, key_files, image_size, build)
