"""The two benchmark workloads and the shortened stream every contestant of a workload shares.

- ``mnist``: Split MNIST (5 tasks), MLP 784-400-400-10, SGD lr 0.1, M = 500, batch 10 (overhead-bound).
- ``cifar``: Split CIFAR-10 on the JPEG copy (5 tasks), reduced ResNet-18, Adam 1e-3 (0.9, 0.99) wd 1e-4,
  M = 500, batch 10 (compute-bound).
- ``synth<K>`` (e.g. ``synth200``): K classes of random 28x28 images (6000 training samples in all), the mnist
  workload's MLP and optimizer: how the loop scales with the number of classes.
- ``digits``: scikit-learn's 8x8 digits with the MLP, for tests.

A benchmark rarely needs the whole stream: ``batches_per_task`` keeps the first N batches of each task (the
stream's own seeded order), so every task switch and every replay path still runs. Every contestant trains on
exactly the same samples in the same order.
"""

from __future__ import annotations

import dataclasses

import torch

from cil.core.data import ImageDataset
from cil.core.data.stream import ClassIncrementalStream
from cil.errors import ConfigError
from cil.run.config import default_config
from cil.run.experiment import load_run_dataset
from cil.schema import RunConfig

WORKLOADS = ("mnist", "cifar", "synth<K>", "digits")


def workload_config(name: str, method: str = "er", seed: int = 0, device: str = "cpu") -> RunConfig:
    """The run configuration of a workload (the repo's protocols), with evaluation off during training."""
    cfg = default_config(method)
    cfg.seed, cfg.device = seed, device
    if name in ("mnist", "digits") or _synth_classes(name):
        cfg.dataset.name, cfg.model.name = ("mnist" if name.startswith("synth") else name), "mlp"
    elif name == "cifar":
        cfg.dataset.name, cfg.model.name = "cifar10_jpeg", "reduced_resnet18"
        cfg.optimizer.name, cfg.optimizer.lr = "adam", 0.001
        cfg.optimizer.betas, cfg.optimizer.weight_decay = [0.9, 0.99], 0.0001
    else:
        raise ConfigError(f"benchmark workload {name!r} is unknown; choose one of {WORKLOADS}")
    cfg.dataset.download = False
    cfg.eval.anytime_every = 0  # training time only; task-end evaluation is timed apart by the learner
    cfg.log.progress = False
    cfg.checkpoint.at_task_end = False
    return cfg


def _synth_classes(name: str) -> int:
    return int(name[5:]) if name.startswith("synth") and name[5:].isdigit() and int(name[5:]) >= 1 else 0


def workload_dataset(name: str, cfg: RunConfig, train_samples: int = 6000) -> ImageDataset:
    """The workload's dataset: loaded from the data root, or made up for ``synth<K>``."""
    k = _synth_classes(name)
    if not k:
        return load_run_dataset(cfg)
    g = torch.Generator().manual_seed(cfg.seed)
    per_class = max(train_samples // k, cfg.stream.batch_size)

    def split(n):
        return (
            torch.randint(0, 256, (n * k, 1, 28, 28), generator=g, dtype=torch.uint8),
            torch.arange(k).repeat_interleave(n),
        )

    (train_x, train_y), (test_x, test_y) = split(per_class), split(10)
    return ImageDataset(name, train_x, train_y, test_x, test_y, [str(c) for c in range(k)])


def subsample_test(dataset: ImageDataset, per_class: int | None) -> ImageDataset:
    """Keep the first `per_class` test images of every class (None or 0: all). Training is unaffected; the
    evaluations the benchmark does not time (task ends, final accuracy) get cheaper."""
    if not per_class:
        return dataset
    keep = torch.cat([torch.nonzero(dataset.test_y == c).squeeze(1)[:per_class] for c in range(dataset.num_classes)])
    keep = keep.sort().values
    return dataclasses.replace(dataset, test_x=dataset.test_x[keep], test_y=dataset.test_y[keep])


def shorten_stream(stream: ClassIncrementalStream, batches_per_task: int | None) -> ClassIncrementalStream:
    """Keep the first `batches_per_task` batches of every task (None or 0: the whole stream), in place."""
    if not batches_per_task:
        return stream
    keep = batches_per_task * stream.batch_size
    stream.tasks = [
        dataclasses.replace(t, train_idx=t.train_idx[:keep], train_idx_host=t.train_idx_host[:keep])
        for t in stream.tasks
    ]
    stream.batches_per_task = [-(-len(t.train_idx) // stream.batch_size) for t in stream.tasks]
    stream.n_batches = sum(stream.batches_per_task)
    stream.n_samples = sum(len(t.train_idx) for t in stream.tasks)
    return stream
