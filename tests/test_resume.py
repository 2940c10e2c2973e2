"""Killed, pre-empted and resumed CLI runs end exactly where an uninterrupted run ends (results.json and
metrics.csv, timings aside), bit for bit on CPU; two runs of one seed agree."""

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
INTERRUPT = TESTS / "_interrupt_cli.py"
# digits: 5 tasks of ~29 batches; checkpoints every 25 batches and at task ends, losses read back every 15
# batches (so checkpoints fall between read-backs and carry accumulated loss), anytime evaluation every 20.
FAST = [
    "dataset=digits",
    "log.progress=false",
    "log.every=15",
    "eval.anytime_every=20",
    "checkpoint.every=25",
    "buffer.size=100",
]
METHODS = {
    "er": ["method=er", "method.replay_batch_size=10"],
    "gsa": ["method=gsa", "method.replay_batch_size=32", "method.current_task_replay=8"],
}
TIMINGS = {
    "train_time_s",
    "task_train_time_s",
    "eval_time_s",
    "samples_per_s",
    "wall_time_s",
    "peak_rss_mb",
    "peak_cuda_mb",
}
EXIT_PREEMPTED = 75


def cli(run_dir: Path, args, interrupt=None, wait=True):
    entry = [str(INTERRUPT), interrupt] if interrupt else ["-m", "cil"]
    cmd = [sys.executable, *entry, f"hydra.run.dir={run_dir}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if not wait:
        return subprocess.Popen(
            cmd, cwd=run_dir.parent, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(cmd, cwd=run_dir.parent, capture_output=True, text=True, timeout=600, env=env)


def run_here(run_dir: Path, args) -> subprocess.CompletedProcess:
    """`python -m cil` as `cli` runs it, but inside the test process (cil.run.cli.run_hydra): for the uninterrupted
    and the resumed runs, whose subject is not the process (the kill between them needs one). Compared bit for bit
    with a fresh process's run, so it also shows an in-process run computes as a new process does."""
    from cil.run.cli import run_hydra

    out, err, sigterm = io.StringIO(), io.StringIO(), signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_hydra([f"hydra.run.dir={run_dir}", *args])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def comparable(run_dir: Path) -> dict:
    res = json.loads((run_dir / "results.json").read_text())
    return {k: v for k, v in res.items() if k not in TIMINGS}


def checkpoint_step(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["learner"]["step"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs (checkpoints written along the way, as in the interrupted runs), in this process: the
    killed and resumed runs below, in processes of their own, must end on them bit for bit."""
    runs = {}
    threads = torch.get_num_threads()
    for name, args in METHODS.items():
        run_dir = tmp_path_factory.mktemp(f"ref_{name}") / "run"
        proc = run_here(run_dir, [*FAST, *args])
        torch.set_num_threads(threads)  # (a module fixture: the per-test restore does not cover it)
        assert proc.returncode == 0, proc.stderr
        runs[name] = run_dir
    return runs


@pytest.mark.slow
def test_er_resumes_bit_for_bit_after_kills_at_many_points(tmp_path, reference):
    run_dir, args = tmp_path / "run", [*FAST, *METHODS["er"]]
    # 1. SIGKILL in the middle of a step (batch 37, task 1): the last checkpoint is the end of task 0 (batch ~29).
    proc = cli(run_dir, args, "observe:37:KILL")
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((run_dir / "results.json").read_text())["status"] == "running"  # never "complete"
    first = checkpoint_step(run_dir)
    assert 25 <= first < 37
    # 2. resumed, then SIGKILL right after its second checkpoint
    proc = cli(run_dir, args, "saved:2:KILL")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    second = checkpoint_step(run_dir)
    assert second > first
    # 3. resumed, then SIGKILL during its second evaluation
    proc = cli(run_dir, args, "eval:2:KILL")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    third = checkpoint_step(run_dir)
    assert third >= second
    # 4. resumed, then SIGKILL while its first checkpoint is being written (temporary file done, not renamed)
    proc = cli(run_dir, args, "writing:1:KILL")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert list(run_dir.glob(".checkpoint.pt.*.tmp")), "the kill should have left the temporary file"
    assert checkpoint_step(run_dir) == third  # the previous checkpoint is intact
    # 5. resumed, then SIGTERM mid-step: checkpoint after the batch in flight, exit "pre-empted, resumable"
    proc = cli(run_dir, args, "observe:5:TERM")
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr
    assert "pre-empted" in proc.stderr and "resume" in proc.stderr
    assert checkpoint_step(run_dir) == third + 5
    status = json.loads((run_dir / "results.json").read_text())
    assert status["status"] == "preempted" and status["step"] == third + 5
    # 6. resumed to the end
    proc = cli(run_dir, args)
    assert proc.returncode == 0, proc.stderr
    assert not list(run_dir.glob(".checkpoint.pt.*.tmp"))
    assert not (run_dir / "checkpoint.pt").exists()  # checkpoint.keep=false: removed once results.json is written
    assert comparable(run_dir) == comparable(reference["er"])
    assert (run_dir / "metrics.csv").read_bytes() == (reference["er"] / "metrics.csv").read_bytes()


@pytest.mark.slow
def test_gsa_resumes_bit_for_bit_after_sigkill_and_external_sigterm(tmp_path, reference):
    run_dir, args = tmp_path / "run", [*FAST, *METHODS["gsa"]]
    # SIGKILL mid-step in task 1 (GSA's gradient statistics, buffer and augmentation generator all in flight)
    proc = cli(run_dir, args, "observe:40:KILL")
    assert proc.returncode == -signal.SIGKILL
    killed_at = checkpoint_step(run_dir)
    # resumed, then SIGTERM from outside (as SLURM sends it) once the resumed run has written a checkpoint
    proc = cli(run_dir, args, wait=False)
    deadline = time.time() + 300
    while checkpoint_step(run_dir) == killed_at and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_PREEMPTED, err
    assert json.loads((run_dir / "results.json").read_text())["status"] == "preempted"
    proc = cli(run_dir, args)
    assert proc.returncode == 0, proc.stderr
    assert comparable(run_dir) == comparable(reference["gsa"])
    assert (run_dir / "metrics.csv").read_bytes() == (reference["gsa"] / "metrics.csv").read_bytes()


@pytest.mark.slow
def test_same_seed_same_results_and_checkpoints_change_nothing(tmp_path, reference):
    """A second GSA run of the same seed without any checkpoint equals the reference bit for bit (the config's
    checkpoint keys aside), so neither run-to-run noise nor writing checkpoints changes a result."""
    run_dir = tmp_path / "run"
    proc = cli(run_dir, [*FAST, *METHODS["gsa"], "checkpoint.every=0", "checkpoint.at_task_end=false"])
    assert proc.returncode == 0, proc.stderr
    mine, ref = comparable(run_dir), comparable(reference["gsa"])
    assert mine.pop("config").pop("checkpoint") != ref.pop("config").pop("checkpoint")
    assert mine == ref
    assert (run_dir / "metrics.csv").read_bytes() == (reference["gsa"] / "metrics.csv").read_bytes()


@pytest.mark.slow
def test_crash_and_resume_in_process_with_diagnostics_and_class_balanced_buffer(tmp_path, monkeypatch):
    """The same guarantee for the parts the CLI tests leave out (diagnostics state, the class-balanced buffer,
    Adam's moments), with the crash simulated in process: an exception in the middle of batch 40."""
    from cil.core.methods.base import Method
    from cil.run.config import default_config
    from cil.run.experiment import run_experiment

    def cfg():
        c = default_config("gsa")
        c.dataset.name, c.log.progress, c.log.every, c.buffer.size, c.buffer.policy = (
            "digits",
            False,
            15,
            60,
            "class_balanced",
        )
        c.method.replay_batch_size, c.method.current_task_replay = 16, 4
        c.optimizer.name, c.optimizer.lr = "adam", 1e-3
        c.diagnostics.enabled, c.diagnostics.every, c.diagnostics.plots = True, 10, False
        c.checkpoint.every = 25
        return c

    ref = run_experiment(cfg(), tmp_path / "ref")
    observe, calls = Method.observe, []

    def crashing_observe(self, batch):
        calls.append(1)
        if len(calls) == 40:
            raise RuntimeError("simulated crash")
        return observe(self, batch)

    monkeypatch.setattr(Method, "observe", crashing_observe)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(cfg(), tmp_path / "run")
    monkeypatch.setattr(Method, "observe", observe)
    assert 25 <= checkpoint_step(tmp_path / "run") < 40
    resumed = run_experiment(cfg(), tmp_path / "run")
    assert {k: v for k, v in resumed.items() if k not in TIMINGS} == {k: v for k, v in ref.items() if k not in TIMINGS}
    assert "diagnostics" in ref
    for name in ("metrics.csv", "diagnostics.json"):
        assert (tmp_path / "run" / name).read_bytes() == (tmp_path / "ref" / name).read_bytes(), name


def test_a_recorded_config_lacking_newer_keys_is_the_same_run():
    """Keys added after a run was recorded default to what the code did before: the old folder stays valid."""
    import dataclasses

    from cil.run.checkpoint import config_differences
    from cil.run.config import default_config

    for method in ("er", "er_ace", "gsa"):
        current = dataclasses.asdict(default_config(method))
        recorded = dataclasses.asdict(default_config(method))
        del recorded["compute"], recorded["realtime"], recorded["eval"]["split"], recorded["stream"]["kind"]
        del recorded["method"]["balance"]
        assert config_differences(recorded, current) == []
        recorded["method"]["replay_batch_size"] = 7  # a real difference is still one
        assert config_differences(recorded, current) == [
            f"method.replay_batch_size: 7 -> {current['method']['replay_batch_size']}"
        ]
        current["eval"]["split"] = "validation"  # and so is a newer key set away from its default
        assert "eval.split: 'test' -> 'validation'" in config_differences(recorded, current)


def test_a_recorded_onpro_config_without_the_row_gate_ran_the_batch_only_gate():
    """OnPro's per-row mixup gate became the default after runs were recorded without the key: such a config ran
    the batch-only gate, so it differs from today's default and equals method.mixup_row_gate=false."""
    import dataclasses

    from cil.run.checkpoint import config_differences
    from cil.run.config import default_config

    current = dataclasses.asdict(default_config("onpro"))
    recorded = dataclasses.asdict(default_config("onpro"))
    del recorded["method"]["mixup_row_gate"]
    assert config_differences(recorded, current) == ["method.mixup_row_gate: False -> True"]
    current["method"]["mixup_row_gate"] = False
    assert config_differences(recorded, current) == []


def test_a_slurm_requeue_that_kills_its_own_scontrol_stops_the_run_as_preempted(tmp_path, monkeypatch):
    """submitit's time-limit handler runs `scontrol requeue` inside the job; the requeue's SIGTERM reaches every
    process of the job and can end that very command first, so its CalledProcessError surfaces in the training
    loop (seen on the test cluster under load). The run stops as pre-empted from its last checkpoint, in a sweep
    too (no failed.json, no result a launcher would take as the job's end), and the requeued job resumes it."""
    from cil.core.methods.base import Method
    from cil.errors import Preempted
    from cil.run.config import default_config
    from cil.run.experiment import run_experiment
    from cil.run.sweep import run_sweep_job

    def cfg():
        c = default_config("er")
        c.dataset.name, c.log.progress, c.checkpoint.every = "digits", False, 10
        return c

    ref = run_experiment(cfg(), tmp_path / "ref")
    observe, calls = Method.observe, []

    def requeued_observe(self, batch):
        calls.append(1)
        if len(calls) == 25:  # in the middle of the batch, as a signal handler raises
            raise subprocess.CalledProcessError(-15, ["scontrol", "requeue", "7_1"])
        return observe(self, batch)

    run_dir = tmp_path / "sweep" / "seed=0"
    monkeypatch.setattr(Method, "observe", requeued_observe)
    with pytest.raises(Preempted) as stop:
        run_sweep_job(cfg(), run_dir, dataclasses.asdict(cfg()), ["seed=0"])
    assert stop.value.exit_code == EXIT_PREEMPTED and stop.value.step == 20 and stop.value.path is not None
    stopped = json.loads((run_dir / "results.json").read_text())
    assert stopped["status"] == "preempted" and stopped["checkpoint"] == str(run_dir / "checkpoint.pt")
    assert not (run_dir / "failed.json").exists() and checkpoint_step(run_dir) == 20

    calls.clear()  # another scontrol failure is an error like any other
    monkeypatch.setattr(
        Method,
        "observe",
        lambda self, batch: (_ for _ in ()).throw(subprocess.CalledProcessError(1, ["scontrol", "show", "job"])),
    )
    failed = run_sweep_job(cfg(), tmp_path / "other", dataclasses.asdict(cfg()), ["seed=0"])
    assert failed["status"] == "failed" and "CalledProcessError" in failed["error"]

    monkeypatch.setattr(Method, "observe", observe)
    resumed = run_sweep_job(cfg(), run_dir, dataclasses.asdict(cfg()), ["seed=0"])
    assert {k: v for k, v in resumed.items() if k not in TIMINGS} == {k: v for k, v in ref.items() if k not in TIMINGS}
