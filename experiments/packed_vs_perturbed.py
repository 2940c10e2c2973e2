"""Packed runs against separate runs, and against separate runs whose weights start scaled by 1 + 1e-7: how far
float order alone moves a run (docs/performance.md, "Packed runs").

    python experiments/packed_vs_perturbed.py --method gsa --memories 50,100,200 --replay 20

Whole Split digits streams (MLP, SGD), one seed, one run per memory size: each packed run's accuracy matrix and
final average accuracy beside its separate run's and beside the perturbed separate run's. Prints one JSON line per
memory size.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from cil.core.packed import PackedRuns
from cil.run.config import default_config
from cil.run.experiment import build_learner, load_run_dataset
from cil.schema import DatasetConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", default="gsa")
    p.add_argument("--memories", default="50,100,200")
    p.add_argument("--replay", type=int, default=20, help="method.replay_batch_size")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    memories = [int(m) for m in args.memories.split(",")]
    configs = []
    for m in memories:
        cfg = default_config(args.method, dataset=DatasetConfig(name="digits"))
        cfg.log.progress, cfg.eval.anytime_every, cfg.seed = False, 0, args.seed
        cfg.buffer.size, cfg.method.replay_batch_size = m, args.replay
        configs.append(cfg)
    dataset = load_run_dataset(configs[0])
    with tempfile.TemporaryDirectory() as tmp:
        build = [[build_learner(c, Path(tmp) / f"{kind}{k}", dataset) for k, c in enumerate(configs)] for kind in "sqp"]
        separate, perturbed, packed = build
        for learner in perturbed:
            with torch.no_grad():
                for param in learner.method.model.parameters():
                    param.mul_(1 + 1e-7)
        a = [learner.run() for learner in separate]
        b = [learner.run() for learner in perturbed]
        c = PackedRuns(packed).run()
    for k, m in enumerate(memories):

        def gap(x: dict, y: dict) -> float:
            rows = zip(x["acc_matrix"], y["acc_matrix"], strict=True)
            return max(abs(u - v) for r, s in rows for u, v in zip(r, s, strict=True))

        row = {
            "method": args.method,
            "M": m,
            "final avg acc %: separate": round(a[k]["final_avg_acc"], 2),
            "packed": round(c[k]["final_avg_acc"], 2),
            "separate, weights x (1 + 1e-7)": round(b[k]["final_avg_acc"], 2),
            "max |acc matrix diff|: packed": round(gap(c[k], a[k]), 2),
            "perturbed": round(gap(b[k], a[k]), 2),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
