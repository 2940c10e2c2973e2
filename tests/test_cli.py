"""The command line end to end: a short run writes a sane results.json; bad input fails early and clearly."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FAST = ["dataset=digits", "log.progress=false", "eval.anytime_every=20"]


def cli(tmp_path, *args, env=None):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "cil", f"hydra.run.dir={run_dir}", *args]
    proc = subprocess.run(
        cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})}
    )
    return proc, run_dir


# ER through the real entry point (`python -m cil` in a new process), GSA in this one: the same code after start-up
@pytest.mark.slow
@pytest.mark.parametrize("method, in_process", [("er", False), ("gsa", True)])
def test_short_run_writes_sane_results(tmp_path, cli_in_process, method, in_process):
    args = [*FAST, f"method={method}", "buffer.size=100", "method.replay_batch_size=10"]
    if in_process:
        run_dir = tmp_path / "run"
        proc = cli_in_process(f"hydra.run.dir={run_dir}", *args)
    else:
        proc, run_dir = cli(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "complete"
    assert res["config"]["method"]["name"] == method
    acc = res["acc_matrix"]
    assert len(acc) == 5 and all(len(row) == 5 for row in acc)
    assert all(0 <= a <= 100 for row in acc for a in row)
    # a 5-task digits stream with replay learns something well above chance (20% on 2-class tasks is 50%)
    assert 40 < res["final_avg_acc"] <= 100
    assert res["avg_forgetting"] is not None and -100 <= res["avg_forgetting"] <= 100
    assert 0 < res["anytime_acc"] <= 100 and len(res["anytime_curve"]) >= 5
    assert res["train_time_s"] > 0 and res["samples_per_s"] > 0 and res["peak_rss_mb"] > 0
    assert sorted(res["class_order"]) == list(range(10))
    # The confusion matrix agrees with the accuracy matrix: per task, its diagonal over its rows.
    conf, order = res["confusion"], res["class_order"]
    for t in range(5):
        cls = order[2 * t : 2 * t + 2]
        hits, total = sum(conf[c][c] for c in cls), sum(sum(conf[c]) for c in cls)
        assert 100 * hits / total == pytest.approx(acc[-1][t], abs=1e-3)
    assert sum(res["errors"].values()) == pytest.approx(100.0)
    assert (run_dir / "metrics.csv").read_text().startswith("step,task,key,value")
    assert "run folder" in proc.stdout


def test_experiment_protocol_composes(cli_in_process):
    proc = cli_in_process("experiment=gsa_cifar100", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr
    assert "name: resnet18" in proc.stdout and "n_tasks: 10" in proc.stdout and "replay_batch_size: 64" in proc.stdout


@pytest.mark.parametrize(
    "args, needle",
    [
        (["dataset=nope"], "nope"),
        (["method=nope"], "nope"),
        (["buffer.size=5", "method.replay_batch_size=10"], "buffer.size=5"),
        (["stream.n_tasks=3"], "stream.n_tasks=3"),
        (["device=cuda:7"], "cuda:7"),
        (["device=tpu"], "tpu"),
        (["buffer.size=-1"], "buffer.size=-1"),
        (["buffer.policy=fifo"], "fifo"),
        (["buffer.size=abc"], "buffer.size"),
        (["stream.bogus_key=1"], "bogus_key"),
        (["addon=null"], "addon=null is not an option"),
        (["addon=bogus"], "bogus"),
        (["addon=mkd", "addon.mkd.kd_lambda=-1"], "addon.mkd.kd_lambda"),
    ],
)
def test_bad_input_fails_before_training_and_leaves_nothing(tmp_path, cli_in_process, args, needle):
    run_dir = tmp_path / "run"
    proc = cli_in_process(f"hydra.run.dir={run_dir}", *FAST, *args)
    assert proc.returncode == 2
    assert needle in proc.stderr + proc.stdout
    assert not (run_dir / "results.json").exists()
    assert not run_dir.exists() or not any(run_dir.iterdir()), list(run_dir.iterdir())


def test_missing_data_file_is_named(tmp_path, cli_in_process):
    empty, run_dir = tmp_path / "empty_root", tmp_path / "run"
    empty.mkdir()
    proc = cli_in_process(
        f"hydra.run.dir={run_dir}",
        "dataset=mnist",
        "dataset.download=false",
        f"dataset.root={empty}",
        "log.progress=false",
    )
    assert proc.returncode == 2
    assert "train-images-idx3-ubyte" in proc.stderr and str(empty) in proc.stderr
    assert not run_dir.exists()
