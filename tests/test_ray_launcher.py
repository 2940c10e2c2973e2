"""Sweeps through cil's Ray launcher (hydra/launcher=ray, hydra_plugins/cil_ray_launcher) on a local Ray instance:
the same results as the in-process launcher, complete runs skipped on re-launch, a failed job recorded while
the other finishes, no Ray process left behind, and one clear error without Ray."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "dataset=digits",
    "log.progress=false",
    "eval.anytime_every=20",
    "buffer.size=100",
    "method.replay_batch_size=10",
    "stream.batch_size=50",
    "method=er",
]
RAY = ["hydra/launcher=ray", "hydra.launcher.num_cpus=2"]


@pytest.fixture
def env():
    # Ray's sockets live under RAY_TMPDIR (a short path: unix socket names are limited to 107 bytes); the
    # subprocesses and Ray's workers import this checkout's cil and hydra_plugins.
    ray_tmp = tempfile.mkdtemp(prefix="cilray", dir="/tmp")
    yield {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(REPO),
        "RAY_TMPDIR": ray_tmp,
        "RAY_AUTH_MODE": "disabled",
    }
    left = subprocess.run(["pgrep", "-f", ray_tmp], capture_output=True, text=True).stdout.split()
    assert not left, f"Ray processes left behind: {left}"  # ray.shutdown() stops the local instance


def multirun(tmp_path, env, sweep_dir, *args):
    cmd = [sys.executable, "-m", "cil", "-m", f"hydra.sweep.dir={sweep_dir}", *TINY, *args]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    return proc, proc.stdout + proc.stderr


def run_dirs(sweep_dir: Path) -> dict[str, Path]:
    return {d.name: d for d in sweep_dir.iterdir() if d.is_dir() and not d.name.startswith(".")}


def results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
def test_sweep_on_ray_equals_in_process_runs_records_failure_and_relaunch_skips(tmp_path, env):
    # Four jobs on a 2-CPU local instance; stream.n_tasks=3 cannot split digits' 10 classes, which is found
    # inside the job once the data are loaded: those two fail, the other two must finish.
    args = ("seed=0,1", "stream.n_tasks=5,3")
    sweep = tmp_path / "ray"
    proc, out = multirun(tmp_path, env, sweep, *args, *RAY)
    assert proc.returncode == 1, out[-3000:]
    assert "Started a local Ray instance" in out and "(_run_one pid=" in out  # the jobs ran as Ray tasks
    assert "4 run folder(s): 2 complete" in proc.stdout and "2 failed" in proc.stdout
    dirs = run_dirs(sweep)
    ok = {n: d for n, d in dirs.items() if n.endswith("stream.n_tasks=5")}
    bad = {n: d for n, d in dirs.items() if n.endswith("stream.n_tasks=3")}
    assert len(ok) == len(bad) == 2  # one folder per job
    for d in bad.values():
        failure = json.loads((d / "failed.json").read_text())
        assert failure["error_type"] == "ConfigError" and "stream.n_tasks=3" in failure["error"]
        assert not (d / "results.json").exists() and f"FAILED {d.name}" in proc.stdout

    # The same runs in process (the default launcher): deterministic on CPU with one thread, so the same numbers
    proc, out = multirun(tmp_path, env, tmp_path / "basic", "seed=0,1", "stream.n_tasks=5")
    assert proc.returncode == 0, out[-3000:]
    in_process = run_dirs(tmp_path / "basic")
    assert sorted(in_process) == sorted(ok)
    for name, d in ok.items():
        ray_res, basic_res = results(d), results(in_process[name])
        assert ray_res["status"] == "complete" and (d / ".hydra" / "config.yaml").is_file()
        assert ray_res["acc_matrix"] == basic_res["acc_matrix"]
        assert ray_res["final_avg_acc"] == basic_res["final_avg_acc"]
        assert ray_res["class_order"] == basic_res["class_order"]

    # Re-launched on Ray: the complete runs are skipped untouched, the failed ones run (and fail) again.
    mtimes = {n: (d / "results.json").stat().st_mtime_ns for n, d in ok.items()}
    failed_mtimes = {n: (d / "failed.json").stat().st_mtime_ns for n, d in bad.items()}
    proc, out = multirun(tmp_path, env, sweep, *args, *RAY)
    assert proc.returncode == 1, out[-3000:]
    assert "2 of them already complete before this launch, skipped" in proc.stdout
    for n, d in ok.items():  # (each job's own "skipped" line comes through Ray's log relay, which may drop it)
        assert (d / "results.json").stat().st_mtime_ns == mtimes[n]
    for n, d in bad.items():
        assert (d / "failed.json").stat().st_mtime_ns > failed_mtimes[n]


@pytest.mark.slow
def test_without_ray_one_clear_error(tmp_path, env):
    code = (
        "import sys; sys.modules['ray'] = None; from cil.run.cli import cli; "
        f"sys.argv = ['cil', '-m', 'hydra.sweep.dir={tmp_path / 'sweep'}', 'seed=0', *{TINY!r}, *{RAY!r}]; cli()"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "pip install 'cil[ray]'" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(p.is_dir() for p in (tmp_path / "sweep").glob("*"))  # no job started
