"""Gradient-imbalance diagnostics: ER vs ER-ACE vs GSA on Split MNIST (experiments/diagnostics.md).

    python experiments/diagnostics.py run        # the three runs with diagnostics on, into outputs/diagnostics/
    python experiments/diagnostics.py plots      # comparison figures into experiments/diagnostics/ + a table
    python experiments/diagnostics.py overhead er 2   # off / accounting only / on, interleaved, 2 rounds
    python experiments/diagnostics.py overhead gsa 1 short   # off / on only
    python experiments/diagnostics.py micro er 6      # per-batch cost in one process, variants interleaved

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
    rounds = int(argv[1]) if len(argv) > 1 and argv[1].isdigit() else 2
    extra = [a for a in argv if "=" in a]
    variants = [VARIANTS[0], VARIANTS[2]] if "short" in argv else VARIANTS  # short: off and on only
    rows = []
    for r in range(rounds):
        for i, (label, args) in enumerate(variants):
            res = cil(RUNS / "overhead" / f"{method}_{i}_{r}", f"method={method}", *args, *extra)
            rows.append((label, r, res["train_time_s"], res["final_avg_acc"], res["acc_matrix"]))
    print("| method | diagnostics | round | train time (s) | final avg acc (%) |\n|---|---|---|---|---|")
    for label, r, t, acc, _ in rows:
        print(f"| {LABELS[method]} | {label} | {r} | {t:.1f} | {acc:.2f} |")
    mats = {json.dumps(x[4]) for x in rows}
    print(f"{LABELS[method]}: accuracy matrices identical across all runs: {len(mats) == 1}")


def micro(argv: list[str]) -> None:
    """Per-batch CPU time in one process, variants interleaved in blocks of consecutive stream batches:
    off / accounting only / accounting + a gradient measurement on every batch. argv: [method [blocks]]."""
    import time

    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cil.core.diagnostics import Diagnostics
    from cil.core.learner import MetricsLog
    from cil.run.config import default_config
    from cil.run.experiment import build_learner

    method = argv[0] if argv else "er"
    blocks = int(argv[1]) if len(argv) > 1 else 6
    torch.set_num_threads(1)
    cfg = default_config(method)  # the split_mnist protocol: MNIST, MLP, SGD 0.1, batch 10, M = 500
    cfg.log.progress = False
    learner = build_learner(cfg, RUNS / "micro")
    m, stream = learner.method, learner.stream
    diag = Diagnostics.for_stream(1, stream, m.model)
    batches = stream.batches()

    learner.logger = MetricsLog()  # measured, not logged: the CSV is not what is timed

    def observe(n: int, variant: str) -> float:
        learner.diagnostics = m.diagnostics = None if variant == "off" else diag
        diag.every = 1 if variant == "measure every batch" else 10**9
        start = time.process_time()  # CPU time of this single-threaded process: robust to other jobs' load
        for _ in range(n):
            learner.train_batch(next(batches))
        if m.diagnostics is not None:
            diag.flush()  # the statistics' update, once per block (in a run: once per `every` batches)
        return (time.process_time() - start) / n * 1e3

    observe(stream.batches_per_task[0] + 20, "off")  # into task 1: replay and two tasks present
    variants = ("off", "accounting only", "measure every batch")
    times = {v: [] for v in variants}
    for _ in range(blocks):
        for v in variants:
            times[v].append(observe(40, v))
    med = {v: sorted(t)[len(t) // 2] for v, t in times.items()}
    print(f"{LABELS[method]}, CPU ms per batch (median of {blocks} interleaved blocks of 40 batches, task 1-2):")
    for v in variants:
        print(f"  {v:20s} {med[v]:.3f}   blocks: {' '.join(f'{t:.2f}' for t in times[v])}")
    measure = med["measure every batch"] - med["accounting only"]
    on50 = med["accounting only"] + measure / 50
    print(f"  -> accounting {100 * (med['accounting only'] / med['off'] - 1):+.1f}%, one measurement "
          f"{measure:.2f} ms, diagnostics.every=50 estimated {100 * (on50 / med['off'] - 1):+.1f}%")


def plots() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import matplotlib.pyplot as plt

    from cil.analysis.diagnostics_plots import (plot_class_ratios, plot_gain, plot_grad_norms, plot_group_ratios,
                                       plot_old_class_pushes)

    FIGS.mkdir(parents=True, exist_ok=True)
    series = {m: json.loads((RUNS / m / "diagnostics.json").read_text()) for m in METHODS}
    results = {m: json.loads((RUNS / m / "results.json").read_text()) for m in METHODS}

    fig, axes = plt.subplots(3, 3, figsize=(14, 9.5), sharey="row")
    for i, m in enumerate(METHODS):
        plot_class_ratios(axes[0, i], series[m], title=f"{LABELS[m]}: cumulative G+/G- per class (mass)")
        plot_group_ratios(axes[1, i], series[m], title=f"{LABELS[m]}: old vs new classes, last 50 batches")
        plot_old_class_pushes(axes[2, i], series[m], title=f"{LABELS[m]}: pushes on the old classes, last 50 batches")
    save(fig, FIGS / "ratio.png")

    fig, axes = plt.subplots(2, 3, figsize=(14, 6.0), sharey="row")
    for i, m in enumerate(METHODS):
        plot_grad_norms(axes[0, i], series[m], title=f"{LABELS[m]}: gradient norms (all parameters)",
                        cos_ax=axes[1, i])
    save(fig, FIGS / "grad_norms.png")

    fig, axes = plt.subplots(2, 3, figsize=(14, 6.5), sharey="row", sharex="row")
    for i, m in enumerate(METHODS):
        plot_gain(axes[0, i], series[m], title=f"{LABELS[m]}: old tasks, gain vs gradient norm per task interval")
        plot_gain(axes[1, i], series[m], title=f"{LABELS[m]}: the task being learned", current=True)
    save(fig, FIGS / "gain.png")

    print("| method | final avg acc % | forgetting % | share of old-class G- from new data | old-class G+/G- "
          "(mass / effective) | new-class G+/G- (mass / effective) | grad norm new / replay | cos(new, replay) |")
    print("|---|---|---|---|---|---|---|---|")
    for m in METHODS:
        per_task = [e for e in results[m]["diagnostics"]["per_task"] if e["task"] >= 1]  # tasks with old classes

        def mean(values):
            values = [v for v in values if v is not None]
            return sum(values) / len(values) if values else float("nan")

        def ratios(group):
            return "/".join(f"{mean(e[f'{k}/all/{group}']['ratio'] for e in per_task):.3f}"
                            for k in ("mass", "effective"))

        share = mean(e["mass/new/old"]["neg"] / e["mass/all/old"]["neg"] for e in per_task)
        r = results[m]
        print(f"| {LABELS[m]} | {r['final_avg_acc']:.2f} | {r['avg_forgetting']:.2f} | {share:.2f} "
              f"| {ratios('old')} | {ratios('new')} | {mean(e['grad_norm/new'] for e in per_task):.3f} / "
              f"{mean(e['grad_norm/replay'] for e in per_task):.3f} | {mean(e['grad_cos'] for e in per_task):.3f} |")


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    print(f"wrote {path}")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "plots", "overhead", "micro"):
        print(__doc__)
        return 2
    {"run": lambda: run(argv[1:]), "plots": plots, "overhead": lambda: overhead(argv[1:]),
     "micro": lambda: micro(argv[1:])}[argv[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
