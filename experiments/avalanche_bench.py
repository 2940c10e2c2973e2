"""Our methods vs Avalanche's on the same stream, interleaved (so machine load hits both alike).

    PYTHONPATH=. OMP_NUM_THREADS=1 CIL_DATA_ROOT=/work/shared/data \
        python experiments/avalanche_bench.py [--seeds 0 1 2] [--methods er avalanche_replay ...] [--out DIR]

Each run is the CLI (`python -m cil experiment=split_mnist method=<m> seed=<s>`: Split MNIST, 5 tasks, MLP
784-400-400-10, SGD lr 0.1, batch 10, M = 500, replay 10 (GSA: R = 64)); runs go seed by seed, methods in turn.
Prints a table of final average accuracy (mean ± std over seeds) and training samples per second, and writes
it to DIR/summary.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
p = argparse.ArgumentParser()
p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
p.add_argument(
    "--methods", nargs="+", default=["er", "avalanche_replay", "er_ace", "avalanche_er_ace", "gsa", "avalanche_gsa"]
)
p.add_argument("--out", default=str(ROOT / "outputs" / "avalanche_bench"))
p.add_argument("overrides", nargs="*", help="extra Hydra overrides for every run")
args = p.parse_args()
out = Path(args.out)
env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "PYTHONPATH": str(ROOT)}

rows = {m: [] for m in args.methods}
for seed in args.seeds:
    for m in args.methods:
        run_dir = out / f"{m}_s{seed}"
        if not (run_dir / "results.json").exists():
            load = os.getloadavg()[0]
            cmd = [
                sys.executable,
                "-m",
                "cil",
                "experiment=split_mnist",
                f"method={m}",
                f"seed={seed}",
                "log.progress=false",
                f"hydra.run.dir={run_dir}",
                *args.overrides,
            ]
            t = time.time()
            subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            (run_dir / "load.json").write_text(
                json.dumps(
                    {"loadavg_1min_before": load, "wall_s": time.time() - t, "loadavg_1min_after": os.getloadavg()[0]}
                )
            )
        r = json.loads((run_dir / "results.json").read_text())
        ld = json.loads((run_dir / "load.json").read_text()) if (run_dir / "load.json").exists() else {}
        rows[m].append((r["final_avg_acc"], r["samples_per_s"], ld.get("loadavg_1min_before")))
        print(
            f"seed {seed} {m:18s} acc {r['final_avg_acc']:6.2f}  {r['samples_per_s']:7.0f} samples/s  "
            f"load {ld.get('loadavg_1min_before', float('nan')):.1f}",
            flush=True,
        )


def fmt(xs):
    return f"{statistics.mean(xs):.2f} ± {statistics.stdev(xs):.2f}" if len(xs) > 1 else f"{xs[0]:.2f}"


lines = [
    "| method | final avg acc (%) | samples/s (median) | seeds | per-seed acc |",
    "| --- | --- | --- | --- | --- |",
]
for m, rs in rows.items():
    if rs:
        lines.append(
            f"| {m} | {fmt([a for a, _, _ in rs])} | {statistics.median([s for _, s, _ in rs]):.0f} | "
            f"{len(rs)} | {', '.join(f'{a:.2f}' for a, _, _ in rs)} |"
        )
loads = [load for rs in rows.values() for *_, load in rs if load is not None]
if loads:
    lines.append(f"\n1-minute load average before runs: {min(loads):.1f} to {max(loads):.1f} (2 cores)")
print("\n".join(lines))
out.mkdir(parents=True, exist_ok=True)
(out / "summary.md").write_text("\n".join(lines) + "\n")
