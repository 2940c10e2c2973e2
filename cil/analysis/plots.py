"""Plots of runs and sweeps (PNG, matplotlib's Agg canvas: no display, no pyplot state).

    python -m cil plots experiments/runs/split_mnist_fmnist [more sweep or run folders] [-o plots/]

writes, for each sweep folder: the accuracy matrix (mean over seeds) of every method and memory as a heatmap,
accuracy through the stream (anytime curve, mean and std over seeds) per method at each memory, final accuracy
against memory per method (error bars: std over seeds), and for GSA runs the per-class weights and
positive/negative gradient ratios through the stream (from metrics.csv, first seed).
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import sys
import textwrap
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter, ScalarFormatter

if TYPE_CHECKING:
    from cil.analysis.report import Run


def _figure(width: float = 6.0, height: float = 4.0) -> Figure:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """[H, W, 3] uint8 pixels of a figure (for TensorBoard images)."""
    canvas = fig.canvas
    assert isinstance(canvas, FigureCanvasAgg)  # every figure here has one (_figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


# -- single figures ----------------------------------------------------------------------------------------------
def accuracy_matrix_figure(acc: Sequence[Sequence[float]], title: str = "") -> Figure:
    """Heatmap of acc[i][j]: accuracy (%) on task j after training on tasks 0..i; unseen tasks (j > i) blank."""
    a = np.asarray(acc, dtype=float)
    shown = np.where(np.tril(np.ones_like(a, dtype=bool)), a, np.nan)
    n_rows, n_cols = a.shape
    fig = _figure(max(4.5, 1.2 + 0.55 * n_cols), max(3.5, 1.0 + 0.5 * n_rows))
    ax = fig.add_subplot()
    im = ax.imshow(shown, vmin=0, vmax=100, cmap="viridis", aspect="auto")
    if n_cols <= 20:
        for i in range(n_rows):
            for j in range(min(i + 1, n_cols)):
                ax.text(
                    j,
                    i,
                    f"{a[i, j]:.0f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if a[i, j] < 60 else "black",
                )
    ax.set_xlabel("test task j")
    ax.set_ylabel("after training task i")
    ax.set_xticks(range(n_cols))
    ax.set_yticks(range(n_rows))
    fig.colorbar(im, ax=ax, label="accuracy %")
    if title:
        ax.set_title(textwrap.fill(title, 50), fontsize=8)
    return fig


def plot_accuracy_matrix(acc, path: Path, title: str = "") -> Path:
    return _save(accuracy_matrix_figure(acc, title), path)


def _mean_std_curves(curves: list[list[dict]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Anytime curves of several seeds on the x grid of the first (points are at the same steps by design)."""
    x = np.array([p["samples"] for p in curves[0]], dtype=float)
    ys = np.stack([np.interp(x, [p["samples"] for p in c], [p["acc"] for p in c]) for c in curves if c])
    return x, ys.mean(0), ys.std(0, ddof=1) if len(ys) > 1 else np.zeros_like(x)


def plot_anytime(
    curves_by_label: dict[str, list[list[dict]]], path: Path, title: str = "", ylabel: str = "accuracy on seen tasks %"
) -> Path:
    """Average accuracy on the seen tasks through the stream, one line per label (mean; band: std over seeds).
    Also the A_AUC curves of blurry streams (results.json `auc_curve`: accuracy on the seen classes)."""
    fig = _figure()
    ax = fig.add_subplot()
    for label, curves in curves_by_label.items():
        curves = [c for c in curves if c]
        if not curves:
            continue
        x, mean, std = _mean_std_curves(curves)
        (line,) = ax.plot(x, mean, label=f"{label} (n={len(curves)})")
        ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.set_xlabel("stream samples seen")
    ax.set_ylabel(ylabel)
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_accuracy_vs_memory(
    points: dict[str, list[tuple[int, float, float, int]]],
    path: Path,
    title: str = "",
    paper: dict[str, list[tuple[int, float]]] | None = None,
) -> Path:
    """Final average accuracy against memory size; points[label] = [(memory, mean, std, n_seeds)]."""
    fig = _figure()
    ax = fig.add_subplot()
    for label, pts in points.items():
        pts = sorted(pts)
        m = [p[0] for p in pts]
        ax.errorbar(
            m,
            [p[1] for p in pts],
            yerr=[p[2] for p in pts],
            marker="o",
            capsize=3,
            label=f"{label} (n={min(p[3] for p in pts)}-{max(p[3] for p in pts)})"
            if len({p[3] for p in pts}) > 1
            else f"{label} (n={pts[0][3]})",
        )
    for label, paper_pts in (paper or {}).items():
        paper_pts = sorted(paper_pts)
        ax.plot(
            [p[0] for p in paper_pts], [p[1] for p in paper_pts], linestyle="--", marker="x", label=f"{label} (paper)"
        )
    memories = sorted({p[0] for pts in points.values() for p in pts})
    if memories:
        ax.set_xscale("log")
        ax.set_xticks(memories)
        ax.set_xticklabels([str(m) for m in memories])
        ax.minorticks_off()
    ax.set_xlabel("memory size M")
    ax.set_ylabel("final average accuracy %")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)
    return _save(fig, path)


def read_metrics(path: Path) -> list[tuple[int, int | None, str, float]]:
    """metrics.csv (long format step,task,key,value) as tuples."""
    rows = []
    with open(path, newline="") as f:
        for r in csv.DictReader(f):
            rows.append(
                (int(r["step"]), int(r["task"]) if r["task"] not in ("", None) else None, r["key"], float(r["value"]))
            )
    return rows


def plot_gsa_stats(metrics_csv: Path, path: Path, title: str = "") -> Path:
    """GSA's per-class weight w_c and ratio G+_c/G-_c through the stream (keys gsa/weight/<c>, gsa/ratio/<c>)."""
    series: dict[str, dict[int, list[tuple[int, float]]]] = {"weight": defaultdict(list), "ratio": defaultdict(list)}
    task_last_step: dict[int, int] = {}  # the learner logs at every task's last batch: its step is the boundary
    for step, task, key, value in read_metrics(metrics_csv):
        if task is not None:
            task_last_step[task] = max(step, task_last_step.get(task, step))
        m = re.fullmatch(r"gsa/(weight|ratio)/(\d+)", key)
        if m and math.isfinite(value):
            series[m.group(1)][int(m.group(2))].append((step, value))
    if not series["weight"]:
        raise ValueError(f"{metrics_csv} holds no gsa/weight/<class> values: is it a GSA run?")
    boundaries = sorted(task_last_step.values())[:-1]
    fig = _figure(7.0, 5.5)
    axes = fig.subplots(2, 1, sharex=True)
    cmap = matplotlib.colormaps["tab20"]
    for ax, kind, ylabel in (
        (axes[0], "weight", "weight w_c = 2 sigmoid(r_c - 1)"),
        (axes[1], "ratio", "ratio r_c = G+_c / G-_c"),
    ):
        for c in sorted(series[kind]):
            pts = series[kind][c]
            ax.plot(
                [p[0] for p in pts],
                [p[1] for p in pts],
                color=cmap(c % 20),
                label=f"class {c}",
                linewidth=1.2,
                marker="." if len(pts) < 40 else None,
                markersize=4,
            )
        ax.axhline(1.0, color="grey", linewidth=0.8, linestyle=":")
        for b in boundaries:
            ax.axvline(b, color="black", linewidth=0.8, linestyle="--", alpha=0.5)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    ratios = [v for pts in series["ratio"].values() for _, v in pts if v > 0]
    if ratios and max(ratios) / min(ratios) > 10:  # a wide range reads better on a log axis
        axes[1].set_yscale("log")
        axes[1].yaxis.set_major_formatter(ScalarFormatter())
        axes[1].yaxis.set_minor_formatter(NullFormatter())
    axes[1].set_xlabel("stream batches (dashed: task boundaries)")
    n_classes = len(series["weight"])
    axes[0].legend(fontsize=7, ncol=max(1, math.ceil(n_classes / 10)), loc="center left", bbox_to_anchor=(1.0, 0.5))
    if title:
        axes[0].set_title(title, fontsize=9)
    return _save(fig, path)


# -- everything for some sweep folders -------------------------------------------------------------------------
def _slug(*parts) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", "_".join(str(p) for p in parts if p not in (None, ""))).strip("_")


def plot_sections(sections, out_dir: Path) -> list[Path]:
    """All plots for the sections of cil.analysis.report.collect_sections, into out_dir/<section>/."""
    from cil.analysis.report import group_runs

    written = []
    for section in sections:
        groups = group_runs(section.runs)
        if not groups:
            continue
        d = Path(out_dir) / _slug(section.name)
        by_name = defaultdict(list)
        for g in groups:
            by_name[g.name].append(g)
        for name, gs in by_name.items():
            done = [g for g in gs if g.complete]
            if not done:
                continue
            points: dict[str, list[tuple[int, float, float, int]]] = defaultdict(list)
            for g in done:
                mean = g.mean("final_avg_acc")
                assert mean is not None  # its complete runs have a final accuracy
                points[g.label].append((g.memory, mean, g.std("final_avg_acc") or 0.0, g.n))
            written.append(
                plot_accuracy_vs_memory(
                    points, d / f"{_slug(name)}_acc_vs_memory.png", f"{section.name}: {name}, final accuracy vs memory"
                )
            )
            for memory in sorted({g.memory for g in done}):
                curves = {
                    g.label: [_results(r).get("anytime_curve") or [] for r in g.complete]
                    for g in done
                    if g.memory == memory
                }
                written.append(
                    plot_anytime(
                        curves,
                        d / f"{_slug(name)}_m{memory}_anytime.png",
                        f"{section.name}: {name}, M = {memory}, accuracy through the stream",
                    )
                )
                auc = {
                    f"{g.label}, A_AUC {g.mean('a_auc'):.1f}": [_results(r).get("auc_curve") or [] for r in g.complete]
                    for g in done
                    if g.memory == memory and g.mean("a_auc") is not None
                }
                if auc:  # blurry streams: the curve whose area is A_AUC (docs/streams.md)
                    written.append(
                        plot_anytime(
                            auc,
                            d / f"{_slug(name)}_m{memory}_auc.png",
                            f"{section.name}: {name}, M = {memory}, anytime accuracy (A_AUC)",
                            ylabel="accuracy on seen classes %",
                        )
                    )
            for g in done:
                mats = [np.asarray(_results(r)["acc_matrix"], dtype=float) for r in g.complete]
                if len({m.shape for m in mats}) == 1:
                    written.append(
                        plot_accuracy_matrix(
                            np.mean(mats, axis=0),
                            d / f"{_slug(name, g.method, 'm' + str(g.memory), g.variant)}_acc_matrix.png",
                            f"{name}, {g.label}, M = {g.memory}: accuracy matrix (mean of {g.n} seed(s))",
                        )
                    )
                if g.method == "gsa":
                    first = g.complete[0]
                    csv_path = first.path / "metrics.csv"
                    if csv_path.exists() and "gsa/weight/" in csv_path.read_text():
                        written.append(
                            plot_gsa_stats(
                                csv_path,
                                d / f"{_slug(name, 'gsa', 'm' + str(g.memory), g.variant)}_s{first.seed}_gsa_stats.png",
                                f"{name}, {g.label}, M = {g.memory}, seed {first.seed}: GSA statistics",
                            )
                        )
    return written


def _results(run: Run) -> dict[str, Any]:
    """A complete run's results.json (what makes it complete)."""
    assert run.results is not None
    return run.results


def main(argv: list[str] | None = None) -> int:
    from cil.analysis.report import collect_sections

    p = argparse.ArgumentParser(prog="cil plots", description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", type=Path, help="sweep folders (or single run folders)")
    p.add_argument("-o", "--out", type=Path, default=Path("plots"), help="output folder (default: plots/)")
    args = p.parse_args(argv)
    missing = [d for d in args.dirs if not d.is_dir()]
    if missing:
        print(f"error: not a folder: {', '.join(map(str, missing))}", file=sys.stderr)
        return 2
    written = plot_sections(collect_sections(args.dirs), args.out)
    for path in written:
        print(path)
    if not written:
        print("no complete runs found: nothing to plot", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
