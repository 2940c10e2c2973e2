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
TINY = ["dataset=digits", "log.progress=false", "eval.anytime_every=20", "buffer.size=100",
        "method.replay_batch_size=10", "stream.batch_size=50", "method=er"]
RAY = ["hydra/launcher=ray", "hydra.launcher.num_cpus=2"]


@pytest.fixture
def env():
    # Ray's sockets live under RAY_TMPDIR (a short path: unix socket names are limited to 107 bytes); the
    # subprocesses and Ray's workers import this checkout's cil and hydra_plugins.
    ray_tmp = tempfile.mkdtemp(prefix="cilray", dir="/tmp")
    yield {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RAY_TMPDIR": ray_tmp,
           "RAY_AUTH_MODE": "disabled"}
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


def test_two_jobs_on_ray_equal_the_in_process_runs(tmp_path, env):
    proc, out = multirun(tmp_path, env, tmp_path / "ray", "seed=0,1", *RAY)
    assert proc.returncode == 0, out[-3000:]
    assert "Started a local Ray instance" in out and "(_run_one pid=" in out  # the jobs ran as Ray tasks
    assert "2 complete" in proc.stdout and "0 failed" in proc.stdout
    on_ray = run_dirs(tmp_path / "ray")
    proc, out = multirun(tmp_path, env, tmp_path / "basic", "seed=0,1")
    assert proc.returncode == 0, out[-3000:]
    in_process = run_dirs(tmp_path / "basic")
    assert sorted(on_ray) == sorted(in_process) and len(on_ray) == 2  # one folder per job, the same names
    for name, d in on_ray.items():
        ray_res, basic_res = results(d), results(in_process[name])
        assert ray_res["status"] == "complete" and (d / ".hydra" / "config.yaml").is_file()
        # deterministic on CPU with one thread: the same numbers whichever launcher ran the job
        assert ray_res["acc_matrix"] == basic_res["acc_matrix"]
        assert ray_res["final_avg_acc"] == basic_res["final_avg_acc"]
        assert ray_res["class_order"] == basic_res["class_order"]


def test_failed_job_is_recorded_and_relaunch_skips_the_complete_one(tmp_path, env):
    # stream.n_tasks=3 cannot split digits' 10 classes: found inside the job once the data are loaded
    sweep = tmp_path / "sweep"
    proc, out = multirun(tmp_path, env, sweep, "seed=0", "stream.n_tasks=5,3", *RAY)
    assert proc.returncode == 1, out[-3000:]
    dirs = run_dirs(sweep)
    ok = next(d for n, d in dirs.items() if n.endswith("stream.n_tasks=5"))
    bad = next(d for n, d in dirs.items() if n.endswith("stream.n_tasks=3"))
    assert results(ok)["status"] == "complete"
    failure = json.loads((bad / "failed.json").read_text())
    assert failure["error_type"] == "ConfigError" and "stream.n_tasks=3" in failure["error"]
    assert not (bad / "results.json").exists()
    assert "1 complete" in proc.stdout and "1 failed" in proc.stdout and f"FAILED {bad.name}" in proc.stdout

    # Re-launched on Ray: the complete run is skipped untouched, the failed one runs (and fails) again.
    mtime, failed_mtime = (ok / "results.json").stat().st_mtime_ns, (bad / "failed.json").stat().st_mtime_ns
    proc, out = multirun(tmp_path, env, sweep, "seed=0", "stream.n_tasks=5,3", *RAY)
    assert proc.returncode == 1, out[-3000:]
    assert f"skipped (already complete): {ok}" in out
    assert (ok / "results.json").stat().st_mtime_ns == mtime
    assert (bad / "failed.json").stat().st_mtime_ns > failed_mtime
    assert "1 of them already complete before this launch, skipped" in proc.stdout


def test_without_ray_one_clear_error(tmp_path, env):
    code = ("import sys; sys.modules['ray'] = None; from cil.run.cli import cli; "
            f"sys.argv = ['cil', '-m', 'hydra.sweep.dir={tmp_path / 'sweep'}', 'seed=0', *{TINY!r}, *{RAY!r}]; cli()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "pip install 'cil[ray]'" in proc.stderr and "Traceback" not in proc.stderr
    assert not any(p.is_dir() for p in (tmp_path / "sweep").glob("*"))  # no job started
