"""`hydra/launcher=packed` (hydra_plugins/cil_packed_launcher, cil/run/packed_sweep.py): a sweep's ER jobs and its
ER-ACE jobs trained as two packs in one process end as the basic launcher's separate runs end; a job that cannot be
packed (DER++) runs alone in the same launch; SIGTERM makes every run of the pack in training write its checkpoint,
and the same command resumes the packs (optimizer state included) to the same results."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Adam: each resumed run must get back its own optimizer state
RUN = [
    "dataset=digits",
    "stream.samples_per_class=60",  # 60 batches a run: short, still checkpointed and stopped midway
    "log.progress=false",
    "eval.anytime_every=20",
    "checkpoint.every=10",
    "optimizer=adam",
    "optimizer.lr=0.001",
    "method=er,er_ace,derpp",
    "seed=0,1",
]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def sweep_cmd(sweep: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cil", "-m", f"hydra.sweep.dir={sweep}", *RUN, *extra]


def sweep_here(sweep: Path, *extra: str) -> subprocess.CompletedProcess:
    """The same command inside the test process (cil.run.cli.run_hydra): for the launches whose subject is not the
    process (the basic launcher's reference, the resumed pack); the SIGTERM'd launch has a process of its own."""
    from cil.run.cli import run_hydra

    out, err, sigterm = io.StringIO(), io.StringIO(), signal.getsignal(signal.SIGTERM)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = run_hydra(["-m", f"hydra.sweep.dir={sweep}", *RUN, *extra])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    return subprocess.CompletedProcess(extra, code, out.getvalue(), err.getvalue())


def results(sweep: Path) -> dict[str, dict]:
    return {d.name: json.loads(r.read_text()) for d in sweep.glob("*=*") if (r := d / "results.json").exists()}


@pytest.mark.slow
def test_packed_sweep_equals_the_basic_launcher_and_resumes_after_sigterm(tmp_path):
    basic = sweep_here(tmp_path / "basic")
    assert basic.returncode == 0, basic.stderr[-3000:]

    # The packed sweep, stopped by SIGTERM once the ER pack has written its first checkpoints.
    sweep = tmp_path / "packed"
    log = tmp_path / "packed.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            sweep_cmd(sweep, "hydra/launcher=packed"), cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT, env=ENV
        )
    deadline = time.monotonic() + 120
    while not list(sweep.glob("*method=er,*/checkpoint.pt")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 75, log.read_text()[-3000:]
    text = log.read_text()
    assert "training 2 runs packed" in text  # the two ER jobs share the pack's step
    stopped = results(sweep)
    assert len(stopped) == 6 and {r["status"] for r in stopped.values()} == {"preempted"}
    er = {name: r for name, r in stopped.items() if "method=er," in name}
    assert len(er) == 2 and len({r["step"] for r in er.values()}) == 1  # one signal, one batch: both stopped there
    for r in er.values():
        assert 0 < r["step"] < r["stream_batches"] and Path(r["checkpoint"]).exists()
    for name, r in stopped.items():  # set up for the launch, never trained: nothing lost, nothing to resume from
        if "method=er," not in name:
            assert r["step"] == 0 and r["checkpoint"] is None, name

    resumed = sweep_here(sweep, "hydra/launcher=packed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the ER pack resumed, the ER-ACE pack trained (ER-ACE's own step under vmap), DER++ alone (no packable step)
    assert resumed.stdout.count("resumed from") == 2 and resumed.stdout.count("training 2 runs packed") == 2
    assert "method=derpp" not in "".join(ln for ln in resumed.stdout.splitlines() if "runs packed" in ln)
    done, expected = results(sweep), results(tmp_path / "basic")
    assert sorted(done) == sorted(expected)
    for name, r in done.items():
        assert r["status"] == "complete" and len(r["acc_matrix"]) == 5
        assert r["acc_matrix"] == expected[name]["acc_matrix"], name
        assert r["anytime_acc"] == expected[name]["anytime_acc"], name
        assert not (sweep / name / "checkpoint.pt").exists()
    assert len({json.dumps(r["acc_matrix"]) for r in done.values()}) == 6  # six different runs


def test_runs_per_pack_below_one_is_refused():
    from cil.errors import ConfigError
    from hydra_plugins.cil_packed_launcher.packed_launcher import CilPackedLauncher

    with pytest.raises(ConfigError, match="runs_per_pack"):
        CilPackedLauncher(runs_per_pack=0)


def test_a_job_refused_while_set_up_is_recorded_and_the_pack_trains_the_others(tmp_path):
    """A job whose config cannot run (3 tasks of 10 classes) fails while the pack is set up: failed.json, the
    summary names it and the command exits 1; the two other jobs train as a pack and complete."""
    sweep = tmp_path / "sweep"
    from cil.run.cli import run_hydra

    out, sigterm = io.StringIO(), signal.getsignal(signal.SIGTERM)
    args = ["dataset=digits", "stream.samples_per_class=20", "log.progress=false", "eval.anytime_every=0"]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            code = run_hydra(["-m", f"hydra.sweep.dir={sweep}", *args, "stream.n_tasks=5,3,2", "hydra/launcher=packed"])
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    text = out.getvalue()
    assert code == 1, text[-3000:]
    assert "3 run folder(s): 2 complete" in text and "1 failed" in text and "training 2 runs packed" in text
    done = results(sweep)
    assert {name.split("stream.n_tasks=")[1].split(",")[0]: r["status"] for name, r in done.items()} == {
        "5": "complete",
        "2": "complete",
    }
    (failed,) = list(sweep.glob("*stream.n_tasks=3*"))
    record = json.loads((failed / "failed.json").read_text())
    assert record["error_type"] == "ConfigError" and "stream.n_tasks=3" in record["error"]
