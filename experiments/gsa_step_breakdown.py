"""Where one GSA step's CPU time goes, piece by piece (docs/performance.md, "Where GSA's time goes").

    OMP_NUM_THREADS=1 python experiments/gsa_step_breakdown.py [--workload mnist] [--batches-per-task 100]

Runs GSA through the real learner on the benchmark workload (cil.run.bench.workloads) with `time.thread_time` around
each piece and prints CPU microseconds per step. Pieces nest (e.g. `views` holds two `grid_sample` calls; `loss`
holds everything up to the optimizer step), and the timers themselves add to the total, so read the pieces
against each other, not as a sum.
"""

from __future__ import annotations

import argparse
import time

import cil.core.augment as augment
import cil.core.methods.gsa as gsa_method
import cil.core.objectives.gsa as gsa_objective
from cil.run.bench.contestants import run_ours
from cil.run.bench.workloads import workload_config, workload_dataset

PIECES = [
    (gsa_method.GSAStep, "loss", "GSAStep.loss (steps 1-7, forward passes included)"),
    (gsa_method.GSA, "step", "zero_grad + backward + optimizer step"),
    (gsa_method.GSA, "forward_float", "model forward passes"),
    (gsa_method.GSAStep, "views", "two views of Xc and of the replay batch"),
    (augment, "resample", "augmentation: grid_sample"),
    (augment.GSAAugment, "draw", "augmentation: random draws and crop boxes"),
    (augment, "crop_grid", "augmentation: sampling grids"),
    (gsa_objective.GradientStats, "update", "statistics update (step 5)"),
    (gsa_objective.GradientStats, "weights", "weights (step 6)"),
    (gsa_method, "gsa_new_loss", "new-data loss (step 2)"),
    (gsa_method, "gsa_replay_loss", "replay loss (step 7)"),
    (gsa_method.GSAStep, "_sample", "buffer sampling (Xc and old tasks)"),
    (gsa_method.GSAStep, "mixed_replay_batch", "mixed replay batch (step 3)"),
    (gsa_method.GSA, "to_input", "uint8 -> float"),
]


def instrument(totals: dict) -> None:
    for owner, name, label in PIECES:
        fn = getattr(owner, name)

        def timed(*args, _fn=fn, _label=label, **kwargs):
            start = time.thread_time()
            try:
                return _fn(*args, **kwargs)
            finally:
                totals[_label] = totals.get(_label, 0.0) + time.thread_time() - start

        setattr(owner, name, timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workload", default="mnist")
    p.add_argument("--batches-per-task", type=int, default=100)
    args = p.parse_args()
    cfg = workload_config(args.workload, "gsa")
    dataset = workload_dataset(args.workload, cfg)
    totals: dict = {}
    instrument(totals)
    res = run_ours(cfg, dataset, args.batches_per_task)
    steps = res["samples"] / cfg.stream.batch_size
    print(f"GSA on {args.workload}, {steps:.0f} steps: {1e6 * res['train_cpu_s'] / steps:.0f} CPU us per step")
    for label, seconds in sorted(totals.items(), key=lambda kv: -kv[1]):
        print(f"  {1e6 * seconds / steps:8.0f} us  {label}")


if __name__ == "__main__":
    main()
