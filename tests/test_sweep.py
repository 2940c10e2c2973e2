"""Sweeps end to end through `python -m cil -m` on tiny digits streams: the joblib and submitit-local launchers,
skipping complete runs on re-launch, and one failed run not stopping the others."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TINY = [
    "dataset=digits",
    "log.progress=false",
    "eval.anytime_every=20",
    "buffer.size=100",
    "method.replay_batch_size=10",
    "stream.batch_size=50",
]


def multirun(tmp_path, *args, sweep_dir=None):
    sweep_dir = sweep_dir or tmp_path / "sweep"
    cmd = [sys.executable, "-m", "cil", "-m", f"hydra.sweep.dir={sweep_dir}", *TINY, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    return proc, sweep_dir


def run_dirs(sweep_dir: Path) -> dict[str, Path]:
    return {d.name: d for d in sweep_dir.iterdir() if d.is_dir() and not d.name.startswith(".")}


def assert_complete(run_dir: Path, seed: int):
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "complete" and res["config"]["seed"] == seed
    assert len(res["acc_matrix"]) == 5
    return res


@pytest.mark.slow
def test_joblib_two_jobs_then_relaunch_skips_them(tmp_path):
    args = ("method=er", "seed=0,1")
    proc, sweep = multirun(tmp_path, *args, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr  # the joblib launcher ran the jobs
    dirs = run_dirs(sweep)
    # run folders are named by the job's overrides only: the same sweep maps to the same folders every time
    names = [
        f"buffer.size=100,dataset=digits,eval.anytime_every=20,method.replay_batch_size=10,method=er,seed={s},"
        "stream.batch_size=50"
        for s in (0, 1)
    ]
    assert sorted(dirs) == names
    r0, r1 = (assert_complete(dirs[n], s) for n, s in zip(names, (0, 1), strict=True))
    assert r0["class_order"] != r1["class_order"]  # two different seeds really ran
    assert "2 complete" in proc.stdout and "0 failed" in proc.stdout

    # The same sweep again (here with the default, in-process launcher): both runs are found and skipped.
    before = {n: (d / "results.json").read_bytes() for n, d in dirs.items()}
    mtimes = {n: (d / "results.json").stat().st_mtime_ns for n, d in dirs.items()}
    proc2, _ = multirun(tmp_path, *args, sweep_dir=sweep)
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    for n, d in dirs.items():
        assert f"skipped (already complete): {d}" in proc2.stdout
        assert (d / "results.json").stat().st_mtime_ns == mtimes[n] and (d / "results.json").read_bytes() == before[n]
    assert "2 of them already complete before this launch, skipped" in proc2.stdout
    assert sorted(run_dirs(sweep)) == names  # same folders, nothing new


@pytest.mark.slow
def test_submitit_local_two_jobs_one_fails_and_the_other_finishes(tmp_path):
    # stream.n_tasks=3 cannot split 10 classes: that job fails once the data are loaded; its sibling must finish
    args = ("method=er", "seed=0", "stream.n_tasks=5,3")
    proc, sweep = multirun(tmp_path, *args, "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10")
    assert proc.returncode == 1, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (sweep / ".submitit").is_dir()  # submitit's executor ran the jobs (its logs and pickles live here)
    dirs = run_dirs(sweep)
    assert len(dirs) == 2
    ok = next(d for n, d in dirs.items() if n.endswith("stream.n_tasks=5"))
    bad = next(d for n, d in dirs.items() if n.endswith("stream.n_tasks=3"))
    assert_complete(ok, 0)
    failure = json.loads((bad / "failed.json").read_text())
    assert failure["status"] == "failed" and failure["error_type"] == "ConfigError"
    assert "stream.n_tasks=3" in failure["error"] and "Traceback" in failure["traceback"]
    assert failure["config"]["stream"]["n_tasks"] == 3
    assert not (bad / "results.json").exists()
    assert "1 complete" in proc.stdout and "1 failed" in proc.stdout and f"FAILED {bad.name}" in proc.stdout

    # Re-launched: the complete run is skipped, the failed one is tried again (and fails again).
    mtime = (ok / "results.json").stat().st_mtime_ns
    failed_mtime = (bad / "failed.json").stat().st_mtime_ns
    proc2, _ = multirun(tmp_path, *args, sweep_dir=sweep)
    assert proc2.returncode == 1
    assert f"skipped (already complete): {ok}" in proc2.stdout
    assert (ok / "results.json").stat().st_mtime_ns == mtime
    assert (bad / "failed.json").stat().st_mtime_ns > failed_mtime


@pytest.mark.slow
def test_slurm_launcher_config_composes(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "cil", "hydra/launcher=slurm", "hydra.launcher.partition=gpu", "--cfg", "hydra"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "submitit_launcher.SlurmLauncher" in proc.stdout and "partition: gpu" in proc.stdout
    assert "timeout_min: 240" in proc.stdout and "submitit_folder: ${hydra.sweep.dir}/.submitit/%j" in proc.stdout


@pytest.mark.slow
def test_a_folder_name_past_the_file_name_limit_is_shortened_stably(tmp_path):
    """A job whose overrides make a folder name longer than one file name may be (255 bytes) gets its head and a
    hash of the whole name, the same on every launch, so the run completes and a re-launch skips it (before, the
    job's folder could not be created and the joblib launcher stopped the whole sweep)."""
    sep = "_is_set_to_the_value_" * 2  # Hydra's key/value separator, long enough to push the name past 255 bytes
    args = ("method=er", "seed=0", f"hydra.job.config.override_dirname.kv_sep={sep}")
    proc, sweep = multirun(tmp_path, *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [(name, run)] = run_dirs(sweep).items()
    full = sep.join(["buffer.size", "100"])  # the name Hydra composes starts so; ours keeps whole overrides of it
    assert name.startswith(full) and ",hash=" in name and len(name.encode()) <= 255
    assert_complete(run, 0)
    proc2, _ = multirun(tmp_path, *args, sweep_dir=sweep)
    assert proc2.returncode == 0 and f"skipped (already complete): {run}" in proc2.stdout
    assert list(run_dirs(sweep)) == [name]


def test_run_dirname_keeps_names_that_fit_and_cuts_at_an_override():
    from cil.run.sweep import run_dirname

    fits = "a=1,b=2"
    assert run_dirname(fits) is fits and run_dirname("x" * 255) == "x" * 255
    long = ",".join(f"key{i}=value{i}" for i in range(40))
    short = run_dirname(long)
    assert len(short.encode()) <= 255 and short == run_dirname(long)
    head, digest = short.rsplit(",hash=", 1)
    assert long.startswith(head + ",") and len(digest) == 12  # whole overrides, then the hash
    assert run_dirname(long.replace("value39", "other")) != short  # a different tail, a different folder
