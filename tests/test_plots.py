"""Each plot is written as a non-blank PNG: from synthetic results, from GSA's logged statistics, and the whole
set for a sweep folder through `cil plots`."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from cil.analysis import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path):
    path = Path(path)
    assert path.read_bytes()[:8] == PNG_MAGIC
    img = imread(path)
    assert img.shape[0] > 100 and img.shape[1] > 100
    assert img[..., :3].std() > 0.05  # something was drawn (a blank canvas has std 0)


def curve(final):
    return [{"step": s, "samples": 10 * s, "acc": a} for s, a in ((10, 95.0), (20, 80.0), (30, final))]


def test_accuracy_matrix_heatmap(tmp_path):
    assert_png(
        plots.plot_accuracy_matrix([[98.0, 0, 0], [90.0, 97.0, 0], [70.0, 80.0, 99.0]], tmp_path / "m.png", "a title")
    )


def test_anytime_curves_and_accuracy_vs_memory(tmp_path):
    assert_png(plots.plot_anytime({"er": [curve(60), curve(64)], "gsa": [curve(75)]}, tmp_path / "a.png", "t"))
    assert_png(
        plots.plot_accuracy_vs_memory(
            {"er": [(200, 60.0, 2.0, 5), (500, 70.0, 1.5, 5)], "gsa": [(200, 72.0, 1.0, 5), (500, 78.0, 0.5, 4)]},
            tmp_path / "mem.png",
            "t",
            paper={"gsa": [(200, 70.0), (500, 76.0)]},
        )
    )


def write_gsa_metrics(path: Path):
    rows = [("step", "task", "key", "value")]
    for step in range(10, 110, 10):
        task = 0 if step <= 50 else 1
        for c in [0, 1] if task == 0 else [0, 1, 2, 3]:
            r = 1.0 + 0.1 * c * np.sin(step / 20)
            rows += [
                (step, task, "loss", 1.0),
                (step, task, f"gsa/weight/{c}", 2 / (1 + np.exp(1 - r))),
                (step, task, f"gsa/ratio/{c}", r),
            ]
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(rows)


def test_gsa_weights_and_ratios(tmp_path):
    write_gsa_metrics(tmp_path / "metrics.csv")
    assert_png(plots.plot_gsa_stats(tmp_path / "metrics.csv", tmp_path / "gsa.png", "t"))
    (tmp_path / "other.csv").write_text("step,task,key,value\n10,0,loss,1.0\n")
    with pytest.raises(ValueError, match="gsa/weight"):
        plots.plot_gsa_stats(tmp_path / "other.csv", tmp_path / "none.png")


@pytest.mark.slow
def test_plots_cli_writes_every_plot_of_a_sweep(tmp_path, capsys):
    sweep = tmp_path / "tiny_sweep"
    for method in ("er", "gsa"):
        for memory in (200, 500):
            for seed in (0, 1):
                d = sweep / f"method={method},buffer.size={memory},seed={seed}"
                d.mkdir(parents=True)
                acc = 60.0 + memory / 50 + (5 if method == "gsa" else 0) + seed
                cfg = {
                    "experiment": "split_mnist",
                    "dataset": {"name": "mnist"},
                    "method": {"name": method},
                    "buffer": {"size": memory},
                    "seed": seed,
                }
                (d / "results.json").write_text(
                    json.dumps(
                        {
                            "status": "complete",
                            "config": cfg,
                            "final_avg_acc": acc,
                            "avg_forgetting": 5.0,
                            "anytime_acc": 80.0,
                            "anytime_curve": curve(acc),
                            "acc_matrix": [[99.0, 0.0], [acc, acc]],
                        }
                    )
                )
                if method == "gsa":
                    write_gsa_metrics(d / "metrics.csv")
    out = tmp_path / "plots"
    assert plots.main([str(sweep), "-o", str(out)]) == 0
    written = sorted(p.name for p in (out / "tiny_sweep").iterdir())
    assert written == sorted(
        [
            "split_mnist_acc_vs_memory.png",
            "split_mnist_m200_anytime.png",
            "split_mnist_m500_anytime.png",
            "split_mnist_er_m200_acc_matrix.png",
            "split_mnist_er_m500_acc_matrix.png",
            "split_mnist_gsa_m200_acc_matrix.png",
            "split_mnist_gsa_m500_acc_matrix.png",
            "split_mnist_gsa_m200_s0_gsa_stats.png",
            "split_mnist_gsa_m500_s0_gsa_stats.png",
        ]
    )
    for p in (out / "tiny_sweep").iterdir():
        assert_png(p)
    assert str(out / "tiny_sweep" / "split_mnist_acc_vs_memory.png") in capsys.readouterr().out
    assert plots.main([str(tmp_path / "empty_dir_that_does_not_exist")]) == 2
