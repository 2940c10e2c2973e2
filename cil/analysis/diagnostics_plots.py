"""PNG plots of a run's diagnostics (the ``series`` that cil.core.diagnostics writes to diagnostics.json).

Each ``plot_*`` draws into given axes, so experiment scripts can put several runs side by side; ``plot_run``
writes the three standard figures of one run. matplotlib runs with the Agg backend (no display needed).
"""

from __future__ import annotations

from itertools import pairwise
from pathlib import Path
from typing import cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

SOURCES = ("new", "replay")


def class_ratios(series: dict, kind: str = "mass", sources=SOURCES, recent: bool = False):
    """(steps [S], ratios [S, C]) of G+/G- per class over the stream, summed over ``sources``; NaN where a class
    has no statistics yet (or G- = 0). ``recent``: of the increments between snapshots instead of cumulative."""
    snaps = series["snapshots"]
    steps = np.array([s["step"] for s in snaps])
    pos = sum(np.array([s["stats"][f"{kind}/{src}"]["pos"] for s in snaps]) for src in sources)
    neg = sum(np.array([s["stats"][f"{kind}/{src}"]["neg"] for s in snaps]) for src in sources)
    if recent:
        pos = np.diff(pos, axis=0, prepend=0.0)
        neg = np.diff(neg, axis=0, prepend=0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(neg > 0, pos / np.where(neg > 0, neg, 1.0), np.nan)
    return steps, r


def group_ratios(series: dict, kind: str = "mass", sources=SOURCES, recent: bool = True):
    """(steps, old [S], new [S]): sum G+ / sum G- over the old and the new classes of the snapshot's task."""
    snaps = series["snapshots"]
    task_of = np.array(series["class_task"])
    steps: list[int] = []
    old: list[float] = []
    new: list[float] = []
    # sum() is typed ndarray | Literal[0] (the empty case): there is a source at least
    pos = cast(np.ndarray, sum(np.array([s["stats"][f"{kind}/{src}"]["pos"] for s in snaps]) for src in sources))
    neg = cast(np.ndarray, sum(np.array([s["stats"][f"{kind}/{src}"]["neg"] for s in snaps]) for src in sources))
    if recent:
        pos = np.diff(pos, axis=0, prepend=0.0)
        neg = np.diff(neg, axis=0, prepend=0.0)
    keep = long_windows(series) if recent else np.ones(len(snaps), dtype=bool)
    for i, s in enumerate(snaps):
        if not keep[i]:
            continue
        t = s["task"]
        steps.append(s["step"])
        for out, sel in ((old, task_of < t), (new, task_of == t)):
            p, n = pos[i, sel].sum(), neg[i, sel].sum()
            out.append(p / n if sel.any() and n > 0 else np.nan)
    return np.array(steps), np.array(old), np.array(new)


def long_windows(series: dict) -> np.ndarray:
    """Bool per snapshot: its window since the previous snapshot spans at least half of ``every`` batches (the
    short windows cut by task ends give noisy ratios; the 'recent' plots leave them out)."""
    steps = np.array([s["step"] for s in series["snapshots"]])
    return np.diff(steps, prepend=0) >= series["every"] / 2


def task_ends(series: dict) -> list[int]:
    """Stream steps at which a task ended (each task end has a snapshot)."""
    snaps = series["snapshots"]
    return [a["step"] for a, b in pairwise(snaps) if b["task"] != a["task"]]


def _boundaries(ax, series):
    for step in task_ends(series):
        ax.axvline(step, color="0.8", lw=0.8, zorder=0)


def smooth(values: np.ndarray, n: int) -> np.ndarray:
    """Trailing mean over the last n points (fewer at the start)."""
    c = np.cumsum(np.insert(np.asarray(values, dtype=float), 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    return (c[idx] - c[np.maximum(idx - n, 0)]) / np.minimum(idx, n)


def old_class_pushes(series: dict, kind: str = "mass"):
    """(steps, G- on old classes from new-data rows, G- from replay rows, G+ from replay rows), per snapshot
    interval: where the downward and upward pushes on the old classes come from."""
    snaps = series["snapshots"]
    task_of = np.array(series["class_task"])
    arr = {
        (src, key): np.diff(np.array([s["stats"][f"{kind}/{src}"][key] for s in snaps]), axis=0, prepend=0.0)
        for src in SOURCES
        for key in ("pos", "neg")
    }
    steps, neg_new, neg_rep, pos_rep = [], [], [], []
    keep = long_windows(series)
    for i, s in enumerate(snaps):
        sel = task_of < s["task"]
        if not sel.any() or not keep[i]:
            continue
        steps.append(s["step"])
        neg_new.append(arr["new", "neg"][i, sel].sum())
        neg_rep.append(arr["replay", "neg"][i, sel].sum())
        pos_rep.append(arr["replay", "pos"][i, sel].sum() + arr["new", "pos"][i, sel].sum())
    return tuple(np.array(a) for a in (steps, neg_new, neg_rep, pos_rep))


def plot_old_class_pushes(ax, series: dict, kind: str = "mass", title: str | None = None):
    """Downward pushes on the old classes from new data and from replay, and their upward push."""
    steps, neg_new, neg_rep, pos = old_class_pushes(series, kind)
    for values, color, label in (
        (neg_new, "tab:red", "G- from new-data rows"),
        (neg_rep, "tab:orange", "G- from replay rows"),
        (pos, "tab:blue", "G+"),
    ):
        zero = not np.any(values > 0)  # a log axis cannot show 0: say it in the legend
        ax.plot(
            steps,
            np.where(values > 0, values, np.nan),
            color=color,
            lw=1.0,
            label=label + (" (always 0)" if zero else ""),
        )
    _boundaries(ax, series)
    ax.set_yscale("log")
    ax.set_xlabel("stream batch")
    ax.set_ylabel(f"old classes, {kind} per snapshot interval")
    ax.legend(fontsize=7, loc="best")
    if title:
        ax.set_title(title, fontsize=9)


def plot_class_ratios(ax, series: dict, kind: str = "mass", recent: bool = False, title: str | None = None):
    """G+/G- per class over the stream (log scale), one line per class coloured by its task."""
    steps, r = class_ratios(series, kind, recent=recent)
    task_of = series["class_task"]
    cmap = plt.get_cmap("tab10")
    for c in range(r.shape[1]):
        ax.plot(steps, r[:, c], color=cmap(task_of[c] % 10), lw=1.0, label=f"task {task_of[c]}")
    _boundaries(ax, series)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("stream batch")
    ax.set_ylabel(("recent " if recent else "") + "G+/G- per class")
    handles, labels = ax.get_legend_handles_labels()
    uniq = dict(sorted(zip(labels, handles, strict=True), key=lambda kv: int(kv[0].split()[-1])))
    ax.legend(uniq.values(), uniq.keys(), fontsize=7, loc="best")
    if title:
        ax.set_title(title, fontsize=9)


def plot_group_ratios(ax, series: dict, title: str | None = None):
    """Recent G+/G- of the old and the new classes, logit-gradient mass and effective (loss-weighted)."""
    for kind, ls in (("mass", "-"), ("effective", ":")):
        steps, old, new = group_ratios(series, kind)
        ax.plot(steps, old, color="tab:blue", ls=ls, lw=1.2, label=f"old classes ({kind})")
        ax.plot(steps, new, color="tab:red", ls=ls, lw=1.2, label=f"new classes ({kind})")
    _boundaries(ax, series)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("stream batch")
    ax.set_ylabel("recent G+/G- (all sources)")
    ax.legend(fontsize=7, loc="best")
    if title:
        ax.set_title(title, fontsize=9)


def plot_grad_norms(ax, series: dict, head: bool = False, title: str | None = None, cos_ax=None, smooth_over: int = 5):
    """Norms of the parameter gradient from the new-data and the replay terms; cosine on ``cos_ax``."""
    g = series["grads"]
    if not g:
        return
    i = 1 if head else 0
    steps = [r["step"] for r in g]
    for src, color, label in (("new", "tab:red", "new-data term"), ("replay", "tab:blue", "replay term")):
        values = np.array([r[src][i] for r in g])
        ax.plot(steps, values, color=color, lw=0.6, alpha=0.3)
        ax.plot(steps, smooth(values, smooth_over), color=color, lw=1.4, label=f"{label} ({smooth_over}-pt mean)")
    _boundaries(ax, series)
    ax.set_yscale("log")
    ax.set_xlabel("stream batch")
    ax.set_ylabel(("head" if head else "all-parameter") + " gradient norm")
    ax.legend(fontsize=7, loc="best")
    if cos_ax is not None:
        key = "head_cos" if head else "cos"
        pts = [(r["step"], r[key]) for r in g if r[key] is not None]
        if pts:
            steps_c, cos = map(np.array, zip(*pts, strict=True))
            cos_ax.plot(steps_c, cos, color="tab:purple", lw=0.6, alpha=0.3)
            cos_ax.plot(steps_c, smooth(cos, smooth_over), color="tab:purple", lw=1.4)
        cos_ax.axhline(0.0, color="k", lw=0.8, ls="--")
        _boundaries(cos_ax, series)
        cos_ax.set_xlabel("stream batch")
        cos_ax.set_ylabel("cos(new, replay)")
        cos_ax.set_ylim(-1, 1)
    if title:
        ax.set_title(title, fontsize=9)


def plot_gain(ax, series: dict, title: str | None = None, current: bool = False):
    """Accuracy change of each task over each task interval against the mean gradient norm its rows contributed.
    Old tasks by default (the question: does the gradient a task gets buy it accuracy?); ``current`` draws the
    task being learned instead (its gain is from 0, an order of magnitude larger, so it gets its own axes)."""
    pts = [r for r in series["gains"] if r["grad_norm"] is not None and (r["task"] == r["after_task"]) == current]
    cmap = plt.get_cmap("tab10")
    for r in pts:
        ax.scatter(r["grad_norm"], r["gain"], color=cmap(r["task"] % 10), s=20)
        ax.annotate(
            f"T{r['task']}@{r['after_task']}",
            (r["grad_norm"], r["gain"]),
            fontsize=6,
            xytext=(2, 2),
            textcoords="offset points",
        )
    ax.axhline(0.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("mean gradient norm of the task's rows")
    ax.set_ylabel(("current" if current else "old") + "-task accuracy change (points)")
    if title:
        ax.set_title(title, fontsize=9)


def plot_run(series: dict, out_dir: str | Path) -> list[Path]:
    """diag_ratio.png, diag_grad_norms.png, diag_gain.png in ``out_dir``."""
    out_dir = Path(out_dir)
    written = []
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.6))
    plot_class_ratios(axes[0], series, title="cumulative logit-gradient G+/G- per class (mass, all sources)")
    plot_group_ratios(axes[1], series, title="old vs new classes, since the previous snapshot")
    plot_old_class_pushes(axes[2], series, title="pushes on the old classes, since the previous snapshot")
    written.append(_save(fig, out_dir / "diag_ratio.png"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
    plot_grad_norms(axes[0], series, cos_ax=axes[2], title="all parameters")
    plot_grad_norms(axes[1], series, head=True, title="head only")
    written.append(_save(fig, out_dir / "diag_grad_norms.png"))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    plot_gain(axes[0], series, title="old tasks: gain over each task interval (T<task>@<interval>)")
    plot_gain(axes[1], series, title="the task being learned", current=True)
    written.append(_save(fig, out_dir / "diag_gain.png"))
    return written


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
