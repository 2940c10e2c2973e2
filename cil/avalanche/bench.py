"""Avalanche's own strategies trained on our stream's samples, in its own online loop (`cil bench`'s Avalanche
contestants): only the training pass, timed."""
from __future__ import annotations

import time

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_online(which: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer, stream, mem_size: int,
                 replay_batch_size: int) -> tuple[float, float]:
    """Train `which` (avalanche_er, avalanche_er_ace, avalanche_naive) on `stream`'s tasks, in the stream's order,
    split online into experiences of the stream's batch size. Returns (wall seconds, CPU seconds)."""
    from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
    from avalanche.benchmarks.scenarios.online import split_online_stream
    from avalanche.benchmarks.utils.classification_dataset import _make_taskaware_tensor_classification_dataset
    from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin
    from avalanche.training.storage_policy import ReservoirSamplingBuffer
    from avalanche.training.supervised import ER_ACE, Naive

    dev, b, m, r = stream.device, stream.batch_size, mem_size, replay_batch_size
    # Avalanche datasets hold float images on the host (its DataLoader collates there and moves to the device).
    train_sets = []
    for task in stream.tasks:
        idx = task.train_idx_host
        x = stream.dataset.train_x[idx].float().div_(255.0)
        y = stream.dataset.train_y[idx].long()
        train_sets.append(_make_taskaware_tensor_classification_dataset(x, y, task_labels=0, targets=y.tolist()))
    bench = benchmark_from_datasets(train=train_sets)
    common = dict(model=model, optimizer=optimizer, criterion=torch.nn.CrossEntropyLoss(), train_mb_size=b,
                  train_epochs=1, eval_mb_size=1000, device=dev, evaluator=EvaluationPlugin(loggers=[]))
    if which == "avalanche_er":
        plugin = ReplayPlugin(mem_size=m, batch_size=b, batch_size_mem=r, storage_policy=ReservoirSamplingBuffer(m))
        strategy = Naive(plugins=[plugin], **common)
    elif which == "avalanche_er_ace":
        strategy = ER_ACE(mem_size=m, batch_size_mem=r, **common)
    elif which == "avalanche_naive":
        strategy = Naive(**common)
    else:
        raise ValueError(f"unknown Avalanche contestant {which!r}")
    _sync(dev)
    start, cpu0 = time.perf_counter(), time.process_time()
    # The online stream is lazy: splitting into experiences of `b` samples is part of Avalanche's online loop.
    for exp in split_online_stream(bench.train_stream, experience_size=b, shuffle=False):
        strategy.train(exp)
    _sync(dev)
    return time.perf_counter() - start, time.process_time() - cpu0
