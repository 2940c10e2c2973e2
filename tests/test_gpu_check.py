"""`cil gpu-check`: without CUDA it says so in one line and exits 1; `--dry-run` runs its whole plan at toy size on
the CPU and writes a report with every section filled in."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_one_line_and_exit_1(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cil", "gpu-check", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_dry_run_runs_the_whole_plan_and_reports_every_section(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [
            *[sys.executable, "-m", "cil", "gpu-check", "--dry-run", "--budget", "180", "--out", str(out)],
            *["--only", "correctness,sync,speed,graphs,fidelity"],  # graphs: only when named
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())["sections"]
    assert set(report) >= {"environment", "correctness", "sync", "speed", "fidelity", "timing"}
    assert report["correctness"]["same seed twice, deterministic=true: same accuracy matrix"] == "yes"
    assert report["correctness"]["SIGKILL + resume: same accuracy matrix as uninterrupted"].startswith("yes")
    assert [r["method"] for r in report["sync"]["host/device syncs inside training steps"]] == [
        "er",
        "er_ace (separate passes)",
        "gsa",
        "gsa (official)",
        "gsa (task-free)",
        "gsa (balance=window)",
        "er_ace (balance=magnitude)",
        "derpp",
        "pcr",
        "ocm",
        "onpro",
    ]
    speed = report["speed"]["training samples/s (CIFAR-10 JPEG copy, batch 10, M = 500, one process)"]
    assert len(speed) == 14 and all(isinstance(r["samples/s"], float) for r in speed)
    # issue 31: eager vs graphed ms per step (the dry run captures with aot_eager), packed runs' samples/s
    graphed = report["speed"]["ms per step, eager vs compile_step=reduce-overhead (fp32, batch 10, M = 500)"]
    assert [(r["method"], r["captured"]) for r in graphed] == [("er", "yes"), ("gsa", "yes")]
    assert all(isinstance(r["eager ms/step"], float) and isinstance(r["graphed ms/step"], float) for r in graphed)
    packed = report["speed"]["runs packed on one device (cil.core.packed): aggregate samples/s"]
    assert [(r["method"], r["runs"], r["packed"]) for r in packed] == [
        (method, k, k_packed) for method in ("er", "gsa") for k, k_packed in ((1, False), (1, True), (2, True))
    ]
    assert all(isinstance(r["samples/s"], float) for r in packed)
    equal = [r["seed's accuracy matrix as the ordinary run's"] for r in packed if r["packed"]]
    assert equal == ["yes"] * 4  # the MLP over the toy streams: equal
    runs = report["fidelity"]["Split CIFAR-10 (JPEG copy), full ResNet-18, whole stream, fp32"]
    # the dry run's toy plan: one memory of each kind (the real plan: M = 500, 200, 1000 of each)
    assert [r["run"] for r in runs] == ["gsa M=500", "gsa official M=500", "er_ace M=500"]
    # every run ended in a state the report explains, and the budget let the first ones finish
    assert all(r["status"] in ("complete", "preempted") or r["status"].startswith("not started") for r in runs), runs
    assert runs[0]["status"] == "complete" and len(runs[0]["acc_matrix"]) == 5
    assert "## fidelity" in (out / "report.md").read_text()
