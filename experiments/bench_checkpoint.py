"""What a checkpoint costs: size, write time and load+restore time, next to the time of one training batch.

    CIL_DATA_ROOT=../shared/data OMP_NUM_THREADS=1 python experiments/bench_checkpoint.py

GSA with a full 500-sample buffer (60 batches observed first), MLP on MNIST and reduced ResNet-18 on cifar10_jpeg.
"""

import dataclasses
import functools
import os
import statistics
import tempfile
import time
from pathlib import Path

from cil.run.checkpoint import Checkpointer
from cil.run.config import default_config
from cil.run.experiment import build_learner


def timed(fn, n):
    out = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return 1e3 * statistics.median(out)


def main():
    for model, dataset in [("mlp", "mnist"), ("reduced_resnet18", "cifar10_jpeg")]:
        cfg = default_config("gsa")
        cfg.dataset.name, cfg.model.name = dataset, model
        cfg.log.progress = False
        out = Path(tempfile.mkdtemp())
        learner = build_learner(cfg, out)
        ckpt = Checkpointer(out, cfg, dataclasses.asdict(cfg))
        method, batches = learner.method, iter(learner.stream.batches())

        def train_batch(learner=learner, batches=batches):
            learner.train_batch(next(batches))

        for _ in range(60):
            train_batch()
        save = timed(functools.partial(ckpt.save, learner), 5)
        restore = timed(lambda ckpt=ckpt, learner=learner: ckpt.restore(learner, ckpt.load()), 3)
        batch = timed(train_batch, 20)
        print(
            f"{model} on {dataset}, GSA, buffer {len(method.buffer)}: checkpoint "
            f"{os.path.getsize(ckpt.path) / 2**20:.2f} MB, write {save:.0f} ms, load+restore {restore:.0f} ms, "
            f"one training batch {batch:.1f} ms (medians)"
        )


if __name__ == "__main__":
    main()
