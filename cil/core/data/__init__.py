"""Datasets (uint8 tensors in memory) and the class-incremental stream over them. Every loader module of this
package registers its dataset names (cil.core.data.dataset.register_loader): a new dataset is one module here."""

import importlib
import pkgutil

from cil.core.data.dataset import LOADERS, ImageDataset, cache_dir, data_root, holdout_validation, load_dataset
from cil.core.data.stream import Batch, ClassIncrementalStream, Task

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

DATASET_NAMES: tuple[str, ...] = tuple(LOADERS)

__all__ = [
    "DATASET_NAMES",
    "LOADERS",
    "Batch",
    "ClassIncrementalStream",
    "ImageDataset",
    "Task",
    "cache_dir",
    "data_root",
    "holdout_validation",
    "load_dataset",
]
