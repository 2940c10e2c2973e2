"""A sweep on a real SLURM cluster through Hydra's submitit launcher (`hydra/launcher=slurm`, cil's preset of
`submitit_slurm`): the jobs run on the controller, a job pre-empted mid-run (`scontrol requeue`: SLURM's SIGTERM,
then the job back in the queue) writes its checkpoint and ends on an uninterrupted run's numbers, a job that
fails is recorded as failed and the sweep's summary says so.

Skipped unless asked for: `CIL_SLURM_TEST=1` starts a private one-node cluster (tests/slurm_cluster.py;
slurm-wlm and munge are installed with apt when missing) and removes it afterwards, whatever the outcome;
`CIL_SLURM_TEST=running` uses the cluster that `SLURM_CONF` (or the machine's config) names, on partition
`$CIL_SLURM_PARTITION` (the test's folders must then be on a file system the nodes share: `--basetemp`).
`make slurm-test` runs it with `CIL_SLURM_TEST=1`."""

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from slurm_cluster import PARTITION, Cluster, install

MODE = os.environ.get("CIL_SLURM_TEST", "")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        MODE not in ("1", "running"),
        reason="a SLURM cluster test: CIL_SLURM_TEST=1 (a private one-node cluster) or =running (`make slurm-test`)",
    ),
]

# digits (5 tasks of ~29 batches of 10): a checkpoint every 10 batches; 15 updates per batch make a run last long
# enough (several seconds of training) to be pre-empted in the middle.
RUN = [
    "dataset=digits",
    "log.progress=false",
    "threads=1",
    "method=er",
    "method.iters=15",
    "method.replay_batch_size=10",
    "buffer.size=100",
    "eval.anytime_every=20",
    "checkpoint.every=10",
]
TIMINGS = {"train_time_s", "task_train_time_s", "eval_time_s", "samples_per_s", "wall_time_s", "peak_rss_mb"}


@pytest.fixture(scope="module")
def cluster():
    if MODE == "running":  # somebody else's cluster: used as it is, left as it is
        found = Cluster(Path(tempfile.gettempdir()), Path(os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")))
        if found.client("sinfo", "-h").returncode != 0:
            pytest.fail(f"CIL_SLURM_TEST=running, but no SLURM controller answers ({found.conf})", pytrace=False)
        yield found
        return
    why = install()
    if why:
        pytest.fail(why, pytrace=False)
    # a short path: munged's socket lives in it (a Unix socket path holds at most 107 bytes)
    started = Cluster(Path(tempfile.mkdtemp(prefix="cil-slurm-", dir="/tmp")))
    # SIGTERM to pytest (a CI timeout) stops the session as Ctrl-C does, so that the finalizer below still runs
    previous = signal.signal(signal.SIGTERM, stop_session)
    try:  # stopped and removed whatever happens, a failed start included
        t0 = time.monotonic()
        try:
            started.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            pytest.fail(f"the test cluster did not start: {err}", pytrace=False)
        print(f"\nSLURM test cluster up in {time.monotonic() - t0:.1f} s: {started.conf}")
        yield started
    finally:
        started.stop()
        signal.signal(signal.SIGTERM, previous)


def stop_session(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


def wait_for(what, check, timeout: float, launch=None, step: float = 0.2):
    """Polls `check()` until it returns something true; fails after `timeout` seconds or when `launch` (a Popen
    whose output goes to the file `launch.log_path`) ended, with the end of that output."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        found = check()
        if found:
            return found
        if launch is not None and launch.poll() is not None:
            out = Path(launch.log_path).read_text()[-4000:]
            pytest.fail(f"the sweep command ended (exit {launch.returncode}) while waiting for {what}:\n{out}")
        time.sleep(step)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def one(sweep: Path, override: str) -> Path | None:
    """The run folder of the sweep whose name (its overrides, sorted, comma-separated) holds `override`."""
    found = [d for d in sweep.glob("*=*") if d.is_dir() and override in d.name.split(",")]
    return found[0] if len(found) == 1 else None


def slurm_job_id(run_dir: Path) -> str:
    """The SLURM job id (`<array job>_<task>`) that submitit gave the job, as its run folder records it."""
    return str(yaml.safe_load((run_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"])


def job_info(cluster: Cluster, job_id: str) -> dict[str, str]:
    out = cluster.client("scontrol", "show", "job", "-o", job_id).stdout
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def comparable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in TIMINGS}


def started_job(cluster: Cluster, sweep: Path, override: str, launch) -> tuple[Path, str]:
    """The run folder and SLURM job id of the sweep's job `override`, once it has written a checkpoint and is
    still running."""
    run = wait_for(
        f"a checkpoint of the {override} job",
        lambda: (d := one(sweep, override)) is not None and (d / "checkpoint.pt").exists() and d,
        timeout=300,
        launch=launch,
    )
    job_id = slurm_job_id(run)
    state = read_json(run / "results.json") or {}
    assert state.get("status") == "running" and job_info(cluster, job_id)["JobState"] == "RUNNING", (state, job_id)
    return run, job_id


def release(cluster: Cluster, job_id: str) -> None:
    """SLURM holds a requeued batch job for 121 s (its BeginTime) before it may start again: lifted."""
    wait_for(f"job {job_id} back in the queue", lambda: job_info(cluster, job_id)["JobState"] == "PENDING", 60)
    lift = cluster.client("scontrol", "update", f"JobId={job_id}", "StartTime=now")
    assert lift.returncode == 0, lift.stderr


def test_sweep_on_slurm_preempted_jobs_resume_failed_job_is_reported(cluster, tmp_path):
    sweep = tmp_path / "sweep"
    partition = os.environ.get("CIL_SLURM_PARTITION", PARTITION) if MODE == "running" else PARTITION
    env = {**cluster.env, "OMP_NUM_THREADS": "1"}
    # Three jobs, one SLURM array: stream.n_tasks=5 is pre-empted (SIGTERM, requeued by SLURM), =2 gets the time
    # limit's signal (submitit's USR2: it requeues the job itself), =3 cannot split 10 classes and fails.
    launch_cmd = [
        *(sys.executable, "-m", "cil", "-m", f"hydra.sweep.dir={sweep}", *RUN, "stream.n_tasks=5,2,3"),
        "hydra/launcher=slurm",
        f"hydra.launcher.partition={partition}",
        "hydra.launcher.gpus_per_node=null",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        "hydra.launcher.timeout_min=10",
        "hydra.launcher.max_num_timeout=2",  # submitit requeues a job that reaches its time limit, twice at most
        "+hydra.launcher.additional_parameters.requeue=true",  # sbatch --requeue: pre-emption may requeue it
    ]
    launch_log = tmp_path / "launch.log"
    with open(launch_log, "w") as log:
        launch = subprocess.Popen(launch_cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    launch.log_path = launch_log
    # the uninterrupted runs, meanwhile, outside SLURM (CPU, one thread: bit for bit the same computation)
    reference = tmp_path / "reference"
    ref_cmd = [sys.executable, "-m", "cil", "-m", f"hydra.sweep.dir={reference}", *RUN, "stream.n_tasks=5,2"]
    ref_log = tmp_path / "reference.log"
    with open(ref_log, "w") as log:
        ref = subprocess.Popen(ref_cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        # Both interrupted jobs are seen running with a checkpoint before either is signalled: a job signalled after
        # the other's requeue could otherwise have finished its whole stream in the meantime.
        preempted, preempted_id = started_job(cluster, sweep, "stream.n_tasks=5", launch)
        timed_out, timed_out_id = started_job(cluster, sweep, "stream.n_tasks=2", launch)
        assert re.fullmatch(r"\d+_0", preempted_id), preempted_id  # task 0 of the sweep's sbatch array
        # Pre-emption: SLURM sends SIGTERM (the run finishes its batch, writes its checkpoint and stops) and puts
        # the job back in the queue, as `scontrol requeue` does.
        requeue = cluster.client("scontrol", "requeue", preempted_id)
        assert requeue.returncode == 0, requeue.stderr
        # The time limit: SLURM sends USR2 signal_delay_s before it (submitit's --signal); submitit requeues the
        # job (max_num_timeout) and exits it; the run continues from its last checkpoint (checkpoint.every).
        usr2 = cluster.client("scancel", "--signal=USR2", timed_out_id)
        assert usr2.returncode == 0, usr2.stderr
        stopped = wait_for(
            "the pre-empted run's results.json",
            lambda: (r := read_json(preempted / "results.json")) is not None and r["status"] == "preempted" and r,
            timeout=60,
            launch=launch,
        )
        assert 0 < stopped["step"] < stopped["stream_batches"], stopped  # stopped in the middle of the stream
        assert stopped["checkpoint"] == str(preempted / "checkpoint.pt") and (preempted / "checkpoint.pt").exists()
        release(cluster, preempted_id)
        release(cluster, timed_out_id)

        launch.wait(timeout=300)
        ref.wait(timeout=300)
    finally:
        for proc in (launch, ref):
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    out = launch_log.read_text()
    print(out[-6000:])
    assert ref.returncode == 0, ref_log.read_text()[-3000:]

    # The sweep: exit 1 (a run failed), and its summary names the failed run.
    assert launch.returncode == 1, out[-4000:]
    assert "3 run folder(s): 2 complete (0 of them already complete before this launch, skipped), 1 failed" in out
    bad = one(sweep, "stream.n_tasks=3")
    assert bad is not None and f"FAILED {bad.name}: ConfigError" in out
    failure = read_json(bad / "failed.json")
    assert failure is not None and failure["error_type"] == "ConfigError" and "stream.n_tasks=3" in failure["error"]
    assert not (bad / "results.json").exists()

    # The sbatch script submitit wrote: one array of 3 tasks, the requeue flag and the time limit's signal.
    array = preempted_id.split("_")[0]
    script = (sweep / ".submitit" / array / f"{array}_submission.sh").read_text()
    for line in ("#SBATCH --array=0-2%3", "#SBATCH --requeue", "#SBATCH --signal=USR2@120", "#SBATCH --time=10"):
        assert line in script.splitlines(), script

    # Every job ran on the cluster's node as a task of one SLURM array (submitit's logs and the run folders name
    # its id; the controller knows it); the two interrupted ones twice.
    logs = {}
    for n_tasks, index in (("5", 0), ("2", 1), ("3", 2)):
        task = f"{array}_{index}"
        folder = sweep / ".submitit" / task
        logs[n_tasks] = (folder / f"{task}_0_log.out").read_text() + (folder / f"{task}_0_log.err").read_text()
        starts = logs[n_tasks].count(f"Starting with JobEnvironment(job_id={task}, ")
        assert starts == (1 if n_tasks == "3" else 2), logs[n_tasks][-3000:]
        if n_tasks == "3":  # refused before it was accepted: no .hydra/, its error in the job's log
            assert "stream.n_tasks=3: ConfigError" in logs[n_tasks], logs[n_tasks][-3000:]
        else:
            assert slurm_job_id(one(sweep, f"stream.n_tasks={n_tasks}")) == task
        # the launcher may read a job's result before the controller has recorded the job's end
        wait_for(f"job {task} recorded as completed", lambda t=task: job_info(cluster, t)["JobState"] != "RUNNING", 60)
        info = job_info(cluster, task)
        assert info["JobState"] == "COMPLETED" and info["ArrayJobId"] == array, info
        assert info["Restarts"] == ("0" if n_tasks == "3" else "1"), info
        if MODE == "1":
            assert info["NodeList"] == "localhost", info
    assert "Preempted: SIGTERM received: checkpoint written at stream batch" in logs["5"], logs["5"][-3000:]
    # submitit requeues the job itself; its `scontrol requeue` may be ended by the requeue's own SIGTERM before it
    # returns (seen under load), and the run then stops as pre-empted (Checkpointer.requeued): requeued either way
    requeued = (f"Requeued job {timed_out_id}", "SLURM is requeueing this job")
    assert "Caught signal SIGUSR2" in logs["2"] and any(r in logs["2"] for r in requeued), logs["2"][-3000:]
    for n_tasks in ("5", "2"):
        assert "resumed from" in logs[n_tasks], logs[n_tasks][-3000:]
    if MODE == "1":  # the controller's job-completion log: each interrupted task ends once requeued, once done
        records = cluster.jobcomp.read_text().splitlines()
        for index in (0, 1):
            mine = [r for r in records if f" ArrayJobId={array} ArrayTaskId={index} " in r]
            assert [re.search(r"JobState=(\S+)", r).group(1) for r in mine] == ["PENDING", "COMPLETED"], mine

    # The interrupted runs resumed from their checkpoints and end where the uninterrupted runs end, bit for bit.
    for n_tasks, run in (("5", preempted), ("2", timed_out)):
        uninterrupted = one(reference, f"stream.n_tasks={n_tasks}")
        assert uninterrupted is not None
        done, expected = read_json(run / "results.json"), read_json(uninterrupted / "results.json")
        assert done is not None and expected is not None
        assert done["status"] == "complete" and len(done["acc_matrix"]) == int(n_tasks)
        assert done["acc_matrix"] == expected["acc_matrix"]
        assert comparable(done) == comparable(expected)
        assert (run / "metrics.csv").read_bytes() == (uninterrupted / "metrics.csv").read_bytes()
        assert not (run / "checkpoint.pt").exists()  # removed once the run is complete
