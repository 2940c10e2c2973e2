"""Gradient-imbalance diagnostics: ER vs ER-ACE vs GSA on Split MNIST (experiments/diagnostics.md).

    python experiments/diagnostics.py run        # the three runs with diagnostics on, into outputs/diagnostics/
    python experiments/diagnostics.py plots      # comparison figures into experiments/diagnostics/ + a table
    python experiments/diagnostics.py overhead er 2   # off / accounting only / on, interleaved, 2 rounds
    python experiments/diagnostics.py overhead gsa 1 short   # off / on only
    python experiments/diagnostics.py micro er 6      # per-batch cost in one process, variants interleaved
    python experiments/diagnostics.py rules-run [key=value ...]   # GSA under each balancing rule, diagnostics on
    python experiments/diagnostics.py rules-plots [key=value ...]  # their weights and G+/G- (figure + table)
    python experiments/diagnostics.py rules-plots SWEEP_DIR seed=0 buffer.size=1000   # the same from a sweep's
                                                 # runs with diagnostics on (e.g. split_cifar10_jpeg_balance)

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
    cmd = [sys.executable, "-m", "cil", *base_args(list(args)), f"hydra.run.dir={out}", *args]
    print("$ python -m cil " + " ".join(cmd[3:]), flush=True)
    subprocess.run(cmd, check=True)
    return json.loads((out / "results.json").read_text())


def base_args(extra: list[str]) -> list[str]:
    """BASE with an `experiment=` of `extra` in place of its own (Hydra refuses a key given twice)."""
    return [a for a in BASE if not (a.startswith("experiment=") and any(e.startswith("experiment=") for e in extra))]


def run(extra: list[str]) -> None:
    for m in METHODS:
        cil(RUNS / m, f"method={m}", "diagnostics.enabled=true", "diagnostics.every=50", *extra)


VARIANTS = (
    ("off", ["diagnostics.enabled=false"]),
    ("accounting only", ["diagnostics.enabled=true", "diagnostics.every=1000000", "diagnostics.plots=false"]),
    ("on, every=50", ["diagnostics.enabled=true", "diagnostics.every=50", "diagnostics.plots=false"]),
)


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
    print(
        f"  -> accounting {100 * (med['accounting only'] / med['off'] - 1):+.1f}%, one measurement "
        f"{measure:.2f} ms, diagnostics.every=50 estimated {100 * (on50 / med['off'] - 1):+.1f}%"
    )


def plots() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import matplotlib.pyplot as plt

    from cil.analysis.diagnostics_plots import (
        plot_class_ratios,
        plot_gain,
        plot_grad_norms,
        plot_group_ratios,
        plot_old_class_pushes,
    )

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
        plot_grad_norms(axes[0, i], series[m], title=f"{LABELS[m]}: gradient norms (all parameters)", cos_ax=axes[1, i])
    save(fig, FIGS / "grad_norms.png")

    fig, axes = plt.subplots(2, 3, figsize=(14, 6.5), sharey="row", sharex="row")
    for i, m in enumerate(METHODS):
        plot_gain(axes[0, i], series[m], title=f"{LABELS[m]}: old tasks, gain vs gradient norm per task interval")
        plot_gain(axes[1, i], series[m], title=f"{LABELS[m]}: the task being learned", current=True)
    save(fig, FIGS / "gain.png")

    print(
        "| method | final avg acc % | forgetting % | share of old-class G- from new data | old-class G+/G- "
        "(mass / effective) | new-class G+/G- (mass / effective) | grad norm new / replay | cos(new, replay) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for m in METHODS:
        per_task = [e for e in results[m]["diagnostics"]["per_task"] if e["task"] >= 1]  # tasks with old classes

        share = mean(e["mass/new/old"]["neg"] / e["mass/all/old"]["neg"] for e in per_task)
        r = results[m]
        print(
            f"| {LABELS[m]} | {r['final_avg_acc']:.2f} | {r['avg_forgetting']:.2f} | {share:.2f} "
            f"| {ratios(per_task, 'old')} | {ratios(per_task, 'new')} "
            f"| {mean(e['grad_norm/new'] for e in per_task):.3f} / "
            f"{mean(e['grad_norm/replay'] for e in per_task):.3f} | {mean(e['grad_cos'] for e in per_task):.3f} |"
        )


RULES = ("cumulative", "constant", "ema", "task_reset", "window", "magnitude")


RULES_DEFAULT = ["experiment=split_mnist", "buffer.size=500"]


def rules_dir(extra: list[str]) -> Path:
    """outputs/diagnostics/rules/<the overrides>/: one folder per protocol, so MNIST and CIFAR runs coexist."""
    return RUNS / "rules" / "_".join(a.replace("=", "-") for a in (extra or RULES_DEFAULT))


def rules_run(extra: list[str]) -> None:
    """GSA under each balancing rule (issue 18's evidence), diagnostics on; `extra` goes to every run
    (default: Split MNIST, M = 500, seed 0)."""
    for rule in RULES:
        cil(
            rules_dir(extra) / rule,
            "method=gsa",
            f"method.balance={rule}",
            "diagnostics.enabled=true",
            "diagnostics.every=50",
            "diagnostics.plots=false",
            *(extra or RULES_DEFAULT),
        )


def _weights_by_group(rows: list, class_task: list[int]) -> dict[str, list[tuple[int, int, float]]]:
    """Mean logged weight (gsa/weight/<c>) of the old and of the current task's classes at every logging step,
    from metrics.csv rows (cil.analysis.plots.read_metrics)."""
    import re
    from collections import defaultdict

    groups: dict[tuple[int, int, str], list[float]] = defaultdict(list)
    for step, task, key, value in rows:
        m = re.fullmatch(r"gsa/weight/(\d+)", key)
        if m and task is not None:
            group = "new" if class_task[int(m.group(1))] == task else "old"
            groups[(step, task, group)].append(value)
    out: dict[str, list[tuple[int, int, float]]] = {"old": [], "new": []}  # (step, task, mean weight)
    for (step, task, group), values in sorted(groups.items()):
        out[group].append((step, task, sum(values) / len(values)))
    return out


def sweep_runs_by_rule(sweep: Path, filters: list[str]) -> dict[str, Path]:
    """{rule: the complete GSA run of `sweep` with that method.balance and every key=value of `filters`}."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from cil.analysis.report import flatten

    wanted = dict(f.split("=", 1) for f in filters)
    found: dict[str, Path] = {}
    for res in sorted(sweep.glob("*/results.json")):
        r = json.loads(res.read_text())
        flat = {k: str(v) for k, v in flatten(r.get("config") or {}).items()}
        if (
            r.get("status") == "complete"
            and flat.get("method.name") == "gsa"
            and all(flat.get(k) == v for k, v in wanted.items())
            and (res.parent / "diagnostics.json").exists()
        ):
            found.setdefault(flat.get("method.balance", "cumulative"), res.parent)
    if not found:
        raise SystemExit(f"{sweep}: no complete GSA run with diagnostics matching {filters}")
    return {r: found[r] for r in RULES if r in found}  # the rules run so far, in RULES order


def rules_plots(extra: list[str]) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import matplotlib.pyplot as plt

    from cil.analysis.diagnostics_plots import plot_group_ratios
    from cil.analysis.plots import read_metrics

    if extra and Path(extra[0]).is_dir():  # a sweep folder: one GSA run per rule matching the key=value filters
        runs = sweep_runs_by_rule(Path(extra[0]), extra[1:])
        tag = "_".join([Path(extra[0]).name] + [a.replace("=", "-") for a in extra[1:]])
    else:
        runs = {r: rules_dir(extra) / r for r in RULES}
        tag = rules_dir(extra).name
    rules = list(runs)
    series = {r: json.loads((runs[r] / "diagnostics.json").read_text()) for r in rules}
    results = {r: json.loads((runs[r] / "results.json").read_text()) for r in rules}
    metrics = {r: read_metrics(runs[r] / "metrics.csv") for r in rules}
    FIGS.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(
        2, len(rules), figsize=(3.2 * max(len(rules), 2), 6.0), sharey="row", sharex=True, squeeze=False
    )
    weights = {}
    for i, rule in enumerate(rules):
        weights[rule] = _weights_by_group(metrics[rule], series[rule]["class_task"])
        for group, colour in (("old", "tab:blue"), ("new", "tab:red")):
            pts = weights[rule][group]
            axes[0, i].plot([p[0] for p in pts], [p[2] for p in pts], color=colour, lw=1.0, label=f"{group} classes")
        axes[0, i].axhline(1.0, color="k", lw=0.8, ls="--")
        axes[0, i].set_title(f"{rule}: mean replay weight", fontsize=9)
        axes[0, i].legend(fontsize=7)
        plot_group_ratios(axes[1, i], series[rule], title=f"{rule}: recent G+/G-")
    name = f"rules_{tag}.png"
    save(fig, FIGS / name)

    print(
        "| rule | final avg acc % | forgetting % | old-class weight | new-class weight | new / replay term scale "
        "| old-class G+/G- (mass / effective) | new-class G+/G- (mass / effective) | errors to a newer / older task % |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for rule in rules:
        per_task = [e for e in results[rule]["diagnostics"]["per_task"] if e["task"] >= 1]

        def weight(group, rule=rule):  # over tasks 1.., where old classes exist
            return mean(v for _, task, v in weights[rule][group] if task >= 1)

        def scale(key, rule=rule):  # magnitude's term scales (1 under the other rules), over tasks 1..
            return mean(
                v for _, task, k, v in metrics[rule] if k == f"balance/{key}" and task is not None and task >= 1
            )

        r = results[rule]
        err = r.get("errors") or {}
        scales = "1 / 1" if rule != "magnitude" else f"{scale('new_scale'):.3f} / {scale('replay_scale'):.3f}"
        print(
            f"| {rule} | {r['final_avg_acc']:.2f} | {r['avg_forgetting']:.2f} | {weight('old'):.3f} | "
            f"{weight('new'):.3f} | {scales} | {ratios(per_task, 'old')} | {ratios(per_task, 'new')} | "
            f"{err.get('to_newer_task', float('nan')):.2f} / {err.get('to_older_task', float('nan')):.2f} |"
        )


def mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def ratios(per_task: list[dict], group: str) -> str:
    """ "mass/effective" G+/G- of a class group, averaged over the given task intervals."""
    return "/".join(f"{mean(e[f'{k}/all/{group}']['ratio'] for e in per_task):.3f}" for k in ("mass", "effective"))


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=72)
    print(f"wrote {path}")


def main(argv: list[str]) -> int:
    modes = {
        "run": lambda: run(argv[1:]),
        "plots": plots,
        "overhead": lambda: overhead(argv[1:]),
        "micro": lambda: micro(argv[1:]),
        "rules-run": lambda: rules_run(argv[1:]),
        "rules-plots": lambda: rules_plots(argv[1:]),
    }
    if not argv or argv[0] not in modes:
        print(__doc__)
        return 2
    modes[argv[0]]()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
