"""`make demo`: GSA against ER and ER-ACE on Split MNIST through the CLI, then a small comparison table.

Each method is one ordinary `python -m cil` run (so the demo exercises what users run), in outputs/demo/<method>.
Extra command-line arguments are passed to every run, e.g. `cil demo seed=1 buffer.size=200`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

METHODS = ("er", "er_ace", "gsa")


def main(argv: list[str]) -> int:
    root = Path("outputs/demo")
    rows = []
    for method in METHODS:
        out = root / method
        cmd = [sys.executable, "-m", "cil", "experiment=split_mnist", f"method={method}", f"hydra.run.dir={out}", *argv]
        print(f"\n$ {' '.join(cmd[1:])}", flush=True)
        if subprocess.call(cmd) != 0:
            print(f"demo: the {method} run failed (see above)", file=sys.stderr)
            return 1
        res = json.loads((out / "results.json").read_text())
        print("accuracy matrix (row: after task i, column: task j, %):")
        for i, row in enumerate(res["acc_matrix"]):
            print(f"  {i}: " + " ".join(f"{a:5.1f}" for a in row[: i + 1]))
        rows.append((method, res))

    print("\nSplit MNIST, MLP, M = 500, one pass, seed 0" + (f", {' '.join(argv)}" if argv else ""))
    print(f"| {'method':7} | final avg acc % | forgetting % | anytime acc % | samples/s | run folder |")
    print("|---|---|---|---|---|---|")
    for method, r in rows:
        print(
            f"| {method:7} | {r['final_avg_acc']:15.2f} | {r['avg_forgetting']:12.2f} | {r['anytime_acc']:13.2f} "
            f"| {r['samples_per_s']:9.0f} | {root / method} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
