"""Gradient-imbalance diagnostics: ER vs ER-ACE vs GSA on Split MNIST (experiments/diagnostics.md).

    python experiments/diagnostics.py run        # the three runs with diagnostics on, into outputs/diagnostics/
    python experiments/diagnostics.py plots      # comparison figures into experiments/diagnostics/ + a table
    python experiments/diagnostics.py overhead er 2   # off / accounting only / on, interleaved, 2 rounds

Each run is an ordinary `python -m cil` call; extra `key=value` arguments go to every run (e.g. seed=1).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

METHODS = ("er", "er_ace", "gsa")
LABELS = {"er": "ER", "er_ace": "ER-ACE", "gsa": "GSA"}
RUNS = Path("outputs/diagnostics")
FIGS = Path(__file__).resolve().parent / "diagnostics"
BASE = ["experiment=split_mnist", "log.progress=false"]


def cil(out: Path, *args: str) -> dict:
    cmd = [sys.executable, "-m", "cil", *BASE, f"hydra.run.dir={out}", *args]
    print("$ python -m cil " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / "results.json").read_text())


def run(extra: list[str]) -> None:
    for m in METHODS:
        cil(RUNS / m, f"method={m}", "diagnostics.enabled=true", "diagnostics.every=50", *extra)


VARIANTS = (("off", ["diagnostics.enabled=false"]),
            ("accounting only", ["diagnostics.enabled=true", "diagnostics.every=1000000", "diagnostics.plots=false"]),
            ("on, every=50", ["diagnostics.enabled=true", "diagnostics.every=50", "diagnostics.plots=false"]))


def overhead(argv: list[str]) -> None:
    """Interleaved runs per variant (the machine is shared: compare neighbours, not a single pair).
    argv: [method [rounds]] then key=value overrides."""
    method = argv[0] if argv and "=" not in argv[0] else "er"
    rounds = int(argv[1]) if len(argv) > 1 and "=" not in argv[1] else 2
    extra = [a for a in argv if "=" in a]
    rows = []
    for r in range(rounds):
        for i, (label, args) in enumerate(VARIANTS):
            res = cil(RUNS / "overhead" / f"{method}_{i}_{r}", f"method={method}", *args, *extra)
            rows.append((label, r, res["train_time_s"], res["final_avg_acc"], res["acc_matrix"]))
    print(f"| method | diagnostics | round | train time (s) | final avg acc (%) |\n|---|---|---|---|---|")
    for label, r, t, acc, _ in rows:
        print(f"| {LABELS[method]} | {label} | {r} | {t:.1f} | {acc:.2f} |")
    mats = {json.dumps(x[4]) for x in rows}
    print(f"{LABELS[method]}: accuracy matrices identical across all runs: {len(mats) == 1}")


def plots() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import matplotlib.pyplot as plt

    from cil.diagnostics_plots import plot_class_ratios, plot_gain, plot_grad_norms, plot_group_ratios

    FIGS.mkdir(parents=True, exist_ok=True)
    series = {m: json.loads((RUNS / m / "diagnostics.json").read_text()) for m in METHODS}
    results = {m: json.loads((RUNS / m / "results.json").read_text()) for m in METHODS}

    fig, axes = plt.subplots(2, 3, figsize=(14, 6.5), sharey="row")
    for i, m in enumerate(METHODS):
        plot_class_ratios(axes[0, i], series[m], title=f"{LABELS[m]}: cumulative G+/G- per class (mass)")
        plot_group_ratios(axes[1, i], series[m], title=f"{LABELS[m]}: old vs new classes, last 50 batches")
    save(fig, FIGS / "ratio.png")

    fig, axes = plt.subplots(2, 3, figsize=(14, 6.0), sharey="row")
    for i, m in enumerate(METHODS):
        plot_grad_norms(axes[0, i], series[m], title=f"{LABELS[m]}: gradient norms (all parameters)",
                        cos_ax=axes[1, i])
    save(fig, FIGS / "grad_norms.png")

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), sharey=True)
    for i, m in enumerate(METHODS):
        plot_gain(axes[i], series[m], title=f"{LABELS[m]}: accuracy change vs gradient norm per task interval")
    save(fig, FIGS / "gain.png")

    print("| method | final avg acc % | forgetting % | old-class G+/G- (mass) | old (effective) | new (mass) "
          "| new (effective) | grad norm new | grad norm replay | cos(new, replay) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for m in METHODS:
        per_task = [e for e in results[m]["diagnostics"]["per_task"] if e["task"] >= 1]

        def mean(key, field="ratio"):
            vals = [e[key][field] if field else e[key] for e in per_task if e.get(key) is not None]
            vals = [v for v in vals if v is not None]
            return sum(vals) / len(vals) if vals else float("nan")

        r = results[m]
        print(f"| {LABELS[m]} | {r['final_avg_acc']:.2f} | {r['avg_forgetting']:.2f} "
              f"| {mean('mass/all/old'):.3f} | {mean('effective/all/old'):.3f} | {mean('mass/all/new'):.3f} "
              f"| {mean('effective/all/new'):.3f} | {mean('grad_norm/new', None):.3f} "
              f"| {mean('grad_norm/replay', None):.3f} | {mean('grad_cos', None):.3f} |")


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    print(f"wrote {path}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "plots", "overhead"):
        print(__doc__)
        return 2
    {"run": lambda: run(argv[1:]), "plots": plots, "overhead": lambda: overhead(argv[1:])}[argv[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
