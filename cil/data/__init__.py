"""Datasets (uint8 tensors in memory) and the class-incremental stream over them."""
from cil.data.datasets import DATASET_NAMES, ImageDataset, data_root, load_dataset
from cil.data.stream import Batch, ClassIncrementalStream, Task

__all__ = ["DATASET_NAMES", "Batch", "ClassIncrementalStream", "ImageDataset", "Task", "data_root", "load_dataset"]
