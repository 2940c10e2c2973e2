"""The class-incremental stream: a dataset split into tasks of disjoint classes, fed once, batch by batch.

The whole training set is moved to the device once, as uint8; a batch is an index slice of a precomputed,
seeded order, so iterating costs one gather per batch and no Python per sample. Labels stay the dataset's own
labels (the head covers every class of the benchmark), so any class order works downstream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cil.core.data.dataset import ImageDataset
from cil.errors import ConfigError, DataError, require


@dataclass(frozen=True)
class Batch:
    x: torch.Tensor  # uint8 [B, C, H, W] on the device
    y: torch.Tensor  # int64 [B] on the device
    y_host: torch.Tensor  # the same labels on the CPU, so bookkeeping needs no device read-back
    task: int | None  # index of the task the batch belongs to (None: hidden from a method on a blurry stream)
    step: int  # index of the batch in the whole stream (0-based)
    step_in_task: int | None  # index of the batch within its task (0-based; None when the task is hidden)


@dataclass(frozen=True)
class Task:
    index: int
    classes: torch.Tensor  # int64 labels of the task, in class-order order
    train_idx: torch.Tensor  # indices into the training set, already shuffled (on the device)
    train_idx_host: torch.Tensor  # the same indices on the CPU
    test_idx: torch.Tensor  # indices into the test set (on the device)


CLASS_ORDERS = ("natural", "random", "numpy_shuffle")  # stream.class_order's named orders (else a list of labels)
NUMPY_SEEDS = 2**32  # numpy's legacy generator takes seeds below this
NUMPY_SEED_FIX = (
    "stream.class_order=numpy_shuffle seeds numpy's legacy generator, which takes seeds below 2**32; use a smaller "
    "seed or stream.class_order=random"
)


def integer_labels(order: object) -> list[int]:
    """stream.class_order given as a list: its labels, integers only (int(0.9) would silently be class 0, "1" a
    label given as text, True class 1); anything else is refused, naming the label."""
    if isinstance(order, (str, bytes)) or not isinstance(order, Iterable):
        raise ConfigError(
            f"stream.class_order={order!r} is not allowed: use 'natural', 'random', 'numpy_shuffle' or a list of "
            "class labels"
        )
    labels = list(order)
    bad = [c for c in labels if isinstance(c, bool) or not isinstance(c, (int, np.integer))]
    if bad:
        raise ConfigError(
            f"stream.class_order={labels!r} is not allowed: label {bad[0]!r} is a {type(bad[0]).__name__}, not an "
            "integer; use a list of integer class labels, e.g. [0, 1, 2]"
        )
    return [int(c) for c in labels]


def class_order(num_classes: int, order: str | Sequence[int], seed: int) -> list[int]:
    """'natural' -> 0..K-1, 'random' -> a torch permutation seeded by `seed`, 'numpy_shuffle' -> the order
    mkd_ocl, CCL-DC and PCR draw (numpy's legacy generator seeded by `seed` shuffles 0..K-1), or an explicit
    list (checked)."""
    if isinstance(order, str):
        if order == "natural":
            return list(range(num_classes))
        if order == "random":
            g = torch.Generator().manual_seed(seed)
            return torch.randperm(num_classes, generator=g).tolist()
        if order == "numpy_shuffle":
            require(0 <= seed < NUMPY_SEEDS, "seed", seed, NUMPY_SEED_FIX)
            labels = np.arange(num_classes)
            # the same draw as `np.random.seed(seed); np.random.shuffle(labels)`, without numpy's global state
            np.random.RandomState(seed).shuffle(labels)
            return [int(c) for c in labels]
        raise ConfigError(
            f"stream.class_order={order!r} is unknown: use 'natural', 'random', 'numpy_shuffle' or a list of labels"
        )
    order = integer_labels(order)
    if sorted(order) != list(range(num_classes)):
        raise ConfigError(
            f"stream.class_order={order} must be a permutation of the dataset's labels 0..{num_classes - 1}"
        )
    return order


def check_test_samples(dataset: ImageDataset, task: int, classes: torch.Tensor) -> None:
    """Refuse a task with a class that has no test sample: the task's accuracy would be measured on its other
    classes only (or read 0 % for a task without any), and no number would say so."""
    present = set(dataset.test_y[torch.isin(dataset.test_y, classes)].unique().tolist())
    missing = [c for c in classes.tolist() if c not in present]
    if not missing:
        return
    names = [dataset.class_names[c] for c in classes.tolist()]
    fix = "give those classes test images (an image folder: test/<class>/<image>)"
    if len(missing) == len(names):  # its accuracy would read 0 % and pull every average down
        raise DataError(
            f"task {task} (classes {names}) has no test samples in {dataset.name!r}, so its accuracy cannot be "
            f"measured; {fix}"
        )
    raise DataError(
        f"task {task} (classes {names}): class(es) {[dataset.class_names[c] for c in missing]} have no test "
        f"samples in {dataset.name!r}, so the task's accuracy would be measured without them; {fix}"
    )


class ClassIncrementalStream:
    """Tasks of `num_classes / n_tasks` classes each; batches of `batch_size` yielded once, in a seeded order."""

    kind = "disjoint"  # stream.kind (cil.core.data.blurry.BlurryStream: iblurry, siblurry)
    hides_boundaries = False  # True: the learner hands methods batches without their task (blurry streams)

    def __init__(
        self,
        dataset: ImageDataset,
        n_tasks: int,
        batch_size: int = 10,
        order: str | Sequence[int] = "random",
        seed: int = 0,
        device: str | torch.device = "cpu",
        samples_per_class: int | None = None,
    ):
        k = dataset.num_classes
        if n_tasks < 1 or k % n_tasks != 0:
            divisors = [d for d in range(1, k + 1) if k % d == 0]
            raise ConfigError(
                f"stream.n_tasks={n_tasks} does not divide the {k} classes of dataset {dataset.name!r} "
                f"evenly; choose one of {divisors}"
            )
        self._setup(dataset, n_tasks, batch_size, order, seed, device)
        self.classes_per_task = k // n_tasks

        # Shuffle within each task with its own generator so the order does not depend on anything else.
        g = torch.Generator().manual_seed(seed + 1)
        keep = self._subsample(dataset.train_y, samples_per_class, seed) if samples_per_class is not None else None
        self.tasks: list[Task] = []
        for t in range(n_tasks):
            classes = torch.tensor(self.class_order[t * self.classes_per_task : (t + 1) * self.classes_per_task])
            in_task = torch.isin(dataset.train_y, classes)
            train_idx = torch.nonzero(in_task if keep is None else in_task & keep).squeeze(1)
            train_idx = train_idx[torch.randperm(len(train_idx), generator=g)]
            test_idx = torch.nonzero(torch.isin(dataset.test_y, classes)).squeeze(1)
            if len(train_idx) == 0:
                raise ConfigError(f"task {t} (classes {classes.tolist()}) has no training samples in {dataset.name!r}")
            check_test_samples(dataset, t, classes)
            self.tasks.append(
                Task(t, classes.to(self.device), train_idx.to(self.device), train_idx, test_idx.to(self.device))
            )
        self._finish(dataset)

    def _finish(self, dataset: ImageDataset) -> None:
        """The data on the device and the bookkeeping every stream derives from its tasks."""
        self.train_x = dataset.train_x.to(self.device)
        self.train_y = dataset.train_y.to(self.device)
        self.test_x = dataset.test_x.to(self.device)
        self.test_y = dataset.test_y.to(self.device)
        self.class_task = [-1] * self.num_classes  # task of every head class (-1: in no task)
        for task in self.tasks:
            for c in task.classes.tolist():
                self.class_task[c] = task.index
        self.batches_per_task = [-(-len(task.train_idx) // self.batch_size) for task in self.tasks]
        self.n_batches = sum(self.batches_per_task)
        self.n_samples = sum(len(task.train_idx) for task in self.tasks)

    def _setup(
        self,
        dataset: ImageDataset,
        n_tasks: int,
        batch_size: int,
        order: str | Sequence[int],
        seed: int,
        device: str | torch.device,
    ) -> None:
        """What every stream kind checks and keeps first: the batch size, the data, the class order, the device."""
        if batch_size < 1:
            raise ConfigError(f"stream.batch_size={batch_size} must be >= 1")
        self.dataset = dataset
        self.n_tasks = n_tasks
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.class_order = class_order(dataset.num_classes, order, seed)
        self.num_classes = dataset.num_classes

    def __len__(self) -> int:
        return self.n_batches

    @staticmethod
    def _subsample(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
        """A seeded choice of at most `per_class` training samples of every class (a shorter stream, same classes)."""
        if per_class < 1:
            raise ConfigError(f"stream.samples_per_class={per_class} must be >= 1 (or null for all samples)")
        g = torch.Generator().manual_seed(seed + 7)
        keep = torch.zeros(len(labels), dtype=torch.bool)
        for c in labels.unique():
            idx = torch.nonzero(labels == c).squeeze(1)
            keep[idx[torch.randperm(len(idx), generator=g)[:per_class]]] = True
        return keep

    def batches(self, start: int = 0) -> Iterator[Batch]:
        """Yield every batch once, from stream position `start` on (a resumed run continues where it stopped)."""
        step = 0
        for task, n in zip(self.tasks, self.batches_per_task, strict=True):
            if step + n <= start:
                step += n
                continue
            # The task's labels in stream order, gathered once: a batch's labels are then slices (views).
            y_task, y_task_host = self.train_y[task.train_idx], self.dataset.train_y[task.train_idx_host]
            for i in range(max(0, start - step), n):
                lo, hi = i * self.batch_size, (i + 1) * self.batch_size
                x = self.train_x.index_select(0, task.train_idx[lo:hi])  # ~4x cheaper than x[idx] for 10 rows
                yield Batch(x, y_task[lo:hi], y_task_host[lo:hi], task.index, step + i, i)
            step += n

    def __iter__(self) -> Iterator[Batch]:
        return self.batches()

    def task_of_step(self, step: int) -> int:
        for t, n in enumerate(self.batches_per_task):
            if step < n:
                return t
            step -= n
        return self.n_tasks

    def test_task_ids(self) -> torch.Tensor:
        """Task index of every test sample (-1 for test samples of classes outside the stream)."""
        ids = torch.full((len(self.test_y),), -1, dtype=torch.long, device=self.device)
        for task in self.tasks:
            ids[task.test_idx] = task.index
        return ids
