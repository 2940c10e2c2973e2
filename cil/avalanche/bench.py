"""Avalanche's own strategies in its own online loop (`cil bench`'s Avalanche contestants): only the training pass,
timed, with the time of every task (experience) recorded apart so a slow-down over the stream shows.

Two ways of feeding Avalanche:

- `train_classic` (contestants ``avalanche_er``, ``avalanche_er_ace``, ``avalanche_naive``): the way Avalanche's
  users drive it, through its public benchmark API. mnist: ``avalanche.benchmarks.classic.SplitMNIST`` on the
  offline MNIST files; cifar: the JPEG copy as two torchvision ``ImageFolder`` datasets (train/, test/) turned into
  Split CIFAR-10 by ``nc_benchmark`` (how ``SplitCIFAR10`` itself is built, and how Avalanche's docs load a
  folder dataset); images are decoded by the DataLoader as training goes, as they are for those users. Each
  experience is split by ``split_online_stream(experience_size=batch, shuffle=True, seed=seed)``.
- `train_online` (contestants ``avalanche_*_tensors``, the bench's original Avalanche rows): our stream's samples
  in our order as float tensor datasets (a private Avalanche helper), ``benchmark_from_datasets``. Kept as a
  labelled extra row: its memory slows down over the stream, Avalanche's own datasets do not.
"""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_strategy(which: str, model, optimizer, device, batch_size: int, mem_size: int, replay_batch_size: int):
    """`which` without any ``_tensors`` suffix: avalanche_er (Naive + ReplayPlugin with a reservoir buffer),
    avalanche_er_ace (ER_ACE), avalanche_naive (Naive). No metrics, no loggers."""
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
    from avalanche.training.storage_policy import ReservoirSamplingBuffer
    from avalanche.training.supervised import ER_ACE, Naive

    b, m, r = batch_size, mem_size, replay_batch_size
    common = dict(
        model=model,
        optimizer=optimizer,
        criterion=torch.nn.CrossEntropyLoss(),
        train_mb_size=b,
        train_epochs=1,
        eval_mb_size=1000,
        device=device,
        evaluator=EvaluationPlugin(loggers=[]),
    )
    if which == "avalanche_er":
        plugin = ReplayPlugin(mem_size=m, batch_size=b, batch_size_mem=r, storage_policy=ReservoirSamplingBuffer(m))
        return Naive(plugins=[plugin], **common)
    if which == "avalanche_er_ace":
        return ER_ACE(mem_size=m, batch_size_mem=r, **common)
    if which == "avalanche_naive":
        return Naive(**common)
    raise ValueError(f"unknown Avalanche contestant {which!r}")


def _train_experiences(strategy, experiences, split, device: torch.device) -> dict:
    """Train on every experience's online split; per-task wall and CPU seconds, and the samples seen."""
    task_wall, task_cpu, task_samples = [], [], []
    _sync(device)
    for exp in experiences:
        t0, c0, n = time.perf_counter(), time.process_time(), 0
        # The online stream is lazy: splitting into experiences is part of Avalanche's online loop (timed).
        for sub in split(exp):
            strategy.train(sub)
            n += len(sub.dataset)
        _sync(device)
        task_wall.append(time.perf_counter() - t0)
        task_cpu.append(time.process_time() - c0)
        task_samples.append(n)
    return {
        "train_time_s": sum(task_wall),
        "train_cpu_s": sum(task_cpu),
        "task_train_time_s": task_wall,
        "task_train_cpu_s": task_cpu,
        "task_samples": task_samples,
        "samples": sum(task_samples),
    }


def train_online(
    which: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, stream, mem_size: int, replay_batch_size: int
) -> dict:
    """Train `which` (avalanche_er, avalanche_er_ace, avalanche_naive) on `stream`'s tasks, in the stream's order,
    split online into experiences of the stream's batch size, from float tensor datasets."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.online import split_online_stream
    from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset

    dev, b = stream.device, stream.batch_size
    # Avalanche datasets hold float images on the host (its DataLoader collates there and moves to the device).
    train_sets = []
    for task in stream.tasks:
        idx = task.train_idx_host
        x = stream.dataset.train_x[idx].float().div_(255.0)
        y = stream.dataset.train_y[idx].long()
        train_sets.append(_make_taskaware_tensor_classification_dataset(x, y, task_labels=0, targets=y.tolist()))
    bench = benchmark_from_datasets(train=train_sets)
    strategy = build_strategy(which, model, optimizer, dev, b, mem_size, replay_batch_size)
    return _train_experiences(
        strategy, bench.train_stream, lambda exp: split_online_stream([exp], experience_size=b, shuffle=False), dev
    )


# ------------------------------------------------------------------------------------------------ classic
def mnist_root(data_root: Path) -> Path:
    """A `dataset_root` where torchvision's MNIST (inside Avalanche's SplitMNIST, which always asks for
    download=True) finds the offline files and never downloads. torchvision wants the *extracted* idx files in
    <root>/MNIST/raw; when the data root has only the original .gz files (the shared offline copy, read-only),
    this returns a folder under the cache dir (``$CIL_CACHE_DIR``, else ``~/.cache/cil``; never the repository)
    whose MNIST/raw links to those .gz files: torchvision checks their md5 and extracts them there, offline."""
    from torchvision.datasets import MNIST

    from cil.core.data.dataset import cache_dir

    raw = data_root / "MNIST" / "raw"
    names = [os.path.basename(url) for url, _ in MNIST.resources]
    if all((raw / n.removesuffix(".gz")).is_file() for n in names):
        return data_root
    missing = [n for n in names if not (raw / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"MNIST files {missing} not found in {raw}: the Avalanche contestants read the same "
            f"offline copy as ours (CIL_DATA_ROOT or dataset.root)"
        )
    root = cache_dir() / "avalanche-mnist"
    (root / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
    for n in names:
        link = root / "MNIST" / "raw" / n
        if not link.exists():
            link.symlink_to((raw / n).resolve())
    return root


def classic_benchmark(
    workload: str, data_root: Path, class_order: list[int], n_tasks: int, seed: int, image_folder: Path | None = None
):
    """Avalanche's own Split MNIST / Split CIFAR-10 (JPEG folder) with our class order, inputs in [0, 1] (the
    [0, 1] scaling ours uses with dataset.normalize=false; no augmentation, as in ours)."""
    if workload in ("mnist",):
        from avalanche.benchmarks.classic import SplitMNIST

        return SplitMNIST(
            n_experiences=n_tasks,
            return_task_id=False,
            seed=seed,
            fixed_class_order=class_order,
            train_transform=None,
            eval_transform=None,
            dataset_root=mnist_root(data_root),
        )
    if workload == "cifar":
        from avalanche.benchmarks import nc_benchmark
        from torchvision.datasets import ImageFolder
        from torchvision.transforms import ToTensor

        base = image_folder or data_root / "cifar10-jpeg"
        train, test = ImageFolder(str(base / "train")), ImageFolder(str(base / "test"))
        return nc_benchmark(
            train,
            test,
            n_experiences=n_tasks,
            task_labels=False,
            seed=seed,
            fixed_class_order=class_order,
            train_transform=ToTensor(),
            eval_transform=ToTensor(),
        )
    raise ValueError(
        f"the Avalanche classic-benchmark contestants run on the mnist and cifar workloads, not "
        f"{workload!r}; use the avalanche_*_tensors contestants there"
    )


def train_classic(
    which: str,
    model,
    optimizer,
    benchmark,
    device: torch.device,
    batch_size: int,
    mem_size: int,
    replay_batch_size: int,
    batches_per_task: int | None,
    seed: int,
) -> dict:
    """Avalanche's online loop on its own benchmark: each experience split by ``split_online_stream``, stopped
    after `batches_per_task` sub-experiences (None or 0: all)."""
    from avalanche.benchmarks.scenarios.online import split_online_stream

    strategy = build_strategy(which, model, optimizer, device, batch_size, mem_size, replay_batch_size)

    def split(exp):
        subs = split_online_stream([exp], experience_size=batch_size, shuffle=True, seed=seed)
        return itertools.islice(subs, batches_per_task) if batches_per_task else subs

    return _train_experiences(strategy, benchmark.train_stream, split, device)
