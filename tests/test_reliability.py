"""The faults of a hostile user or a cluster, each reproduced: a run folder never looks complete when it is not,
it has one writer at a time, a resume refuses other data, nothing the run did not create is deleted, and every
failure ends in one line naming the value or the path (and a results.json status that says what happened)."""

import dataclasses
import errno
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torchvision.io import encode_png

from cil.errors import ConfigError, DataError, StorageError
from cil.run.folder import RunFolder

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
INTERRUPT = TESTS / "_interrupt_cli.py"
FAST = ["dataset=digits", "log.progress=false", "buffer.size=100", "eval.anytime_every=0", "threads=1"]


def cli(run_dir: Path, *args, interrupt=None, wait=True, preexec=None, env=None):
    entry = [str(INTERRUPT), interrupt] if interrupt else ["-m", "cil"]
    cmd = [sys.executable, *entry, f"hydra.run.dir={run_dir}", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    if not wait:
        return subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=preexec
        )
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env, preexec_fn=preexec)


def status(run_dir: Path):
    path = run_dir / "results.json"
    return json.loads(path.read_text())["status"] if path.exists() else None


def one_error_line(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return lines[0]


def image_folder(root: Path, classes: dict[str, tuple[int, int]]) -> Path:
    """train/<c>/ and test/<c>/ with (train, test) random 8x8 PNGs per class."""
    g = torch.Generator().manual_seed(0)
    for c, counts in classes.items():
        for split, n in zip(("train", "test"), counts, strict=True):
            if n == 0:
                continue
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = torch.randint(0, 256, (3, 8, 8), generator=g, dtype=torch.uint8)
                (root / split / c / f"{i}.png").write_bytes(bytes(encode_png(img).tolist()))
    return root


# 1. -------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_restart_invalidates_the_old_results_before_touching_anything(tmp_path, cli_in_process):
    run = tmp_path / "run"
    assert cli_in_process(f"hydra.run.dir={run}", *FAST).returncode == 0 and status(run) == "complete"
    killed = cli(run, *FAST, "checkpoint.resume=false", interrupt="observe:5:KILL")
    assert killed.returncode == -signal.SIGKILL
    assert status(run) == "running"  # not the old "complete" beside a cut-back metrics.csv
    again = cli_in_process(f"hydra.run.dir={run}", *FAST)
    assert again.returncode == 0 and "nothing to do" not in again.stderr + again.stdout
    assert status(run) == "complete"


# 2. -------------------------------------------------------------------------------------------------------------
def test_a_task_without_test_images_is_refused_not_scored_zero(tmp_path, cli_in_process):
    folder = image_folder(tmp_path / "imgs", {"a": (6, 2), "b": (6, 2), "c": (6, 0), "d": (6, 0)})
    proc = cli_in_process(
        f"hydra.run.dir={tmp_path / 'run'}",
        "dataset=imagefolder",
        f"dataset.path={folder}",
        "stream.n_tasks=2",
        "stream.class_order=natural",
        "buffer.size=20",
        "log.progress=false",
        env={"CIL_CACHE_DIR": str(tmp_path / "cache")},
    )
    line = one_error_line(proc)
    assert "task 1" in line and "'c', 'd'" in line and "no test samples" in line
    assert not (tmp_path / "run").exists()


# 3. -------------------------------------------------------------------------------------------------------------
def test_one_writer_per_folder_and_a_crashed_holder_leaves_no_lock(tmp_path):
    with (
        RunFolder(tmp_path / "run"),
        pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()}\)"),
    ):
        RunFolder(tmp_path / "run").__enter__()
    # a holder killed with SIGKILL: the operating system drops its lock
    code = (
        f"import os, signal; from cil.run.folder import RunFolder; RunFolder({str(tmp_path / 'run2')!r})"
        ".__enter__(); os.kill(os.getpid(), signal.SIGKILL)"
    )
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO).returncode == -signal.SIGKILL
    with RunFolder(tmp_path / "run2"):
        pass


@pytest.mark.slow
def test_a_second_cli_run_into_a_busy_folder_is_refused_and_the_first_finishes(tmp_path, cli_in_process):
    run, release = tmp_path / "run", tmp_path / "release"
    # the first run holds the folder from its third batch until `release` exists
    with cli(run, *FAST, interrupt="batch:3:SLEEP", wait=False, env={"CIL_TEST_RELEASE": str(release)}) as first:
        deadline = time.time() + 120
        while status(run) != "running" and time.time() < deadline:
            time.sleep(0.1)
        second = cli_in_process(f"hydra.run.dir={run}", *FAST)  # the lock is the operating system's, per process
        release.touch()
        assert "is in use by another run" in one_error_line(second)
        assert first.wait(timeout=600) == 0 and status(run) == "complete"


# 4. -------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_resume_refuses_a_dataset_that_changed_since_the_checkpoint(tmp_path, cli_in_process):
    folder = image_folder(tmp_path / "imgs", dict.fromkeys("abcd", (20, 3)))
    args = [
        "dataset=imagefolder",
        f"dataset.path={folder}",
        "stream.n_tasks=2",
        "buffer.size=20",
        "log.progress=false",
        "checkpoint.every=2",
    ]
    env = {"CIL_CACHE_DIR": str(tmp_path / "cache")}
    run = tmp_path / "run"
    assert cli(run, *args, interrupt="observe:5:KILL", env=env).returncode == -signal.SIGKILL
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.suffix not in (".lock", ".log")}
    image_folder(tmp_path / "more", {"a": (3, 0)})
    for i, png in enumerate(sorted((tmp_path / "more" / "train" / "a").iterdir())):
        shutil.copy(png, folder / "train" / "a" / f"new{i}.png")
    line = one_error_line(cli_in_process(f"hydra.run.dir={run}", *args, env=env))
    assert "other data" in line and "checkpoint.resume=false" in line
    assert {
        p.name: p.read_bytes() for p in run.iterdir() if p.is_file() and p.suffix not in (".lock", ".log")
    } == before


# 5. -------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_avalanche_peers_stop_on_sigterm_as_preempted(tmp_path):
    pytest.importorskip("avalanche")
    run = tmp_path / "run"
    proc = cli(run, *FAST, "method=avalanche_naive", interrupt="batch:5:TERM")
    assert proc.returncode == 75, proc.stderr[-2000:]
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "preempted" and res["step"] == 5 and res["checkpoint"] is None
    assert "starts it over" in res["error"]


# 6. and 8: config errors ---------------------------------------------------------------------------------------
def test_a_config_error_never_deletes_files_it_did_not_create(tmp_path, cli_in_process):
    run = tmp_path / "mine"
    (run / ".hydra" / "notes").mkdir(parents=True)
    (run / "metrics.csv").write_text("precious\n")
    (run / "main.log").write_text("also precious\n")
    line = one_error_line(cli_in_process(f"hydra.run.dir={run}", "dataset=digits", "stream.batch_size=0"))
    assert "stream.batch_size=0" in line
    assert (run / "metrics.csv").read_text() == "precious\n" and (run / "main.log").read_text() == "also precious\n"
    assert (run / ".hydra" / "notes").is_dir()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("stream.class_order=5", "stream.class_order=5 is not allowed"),
        ("stream.class_order=abc", "stream.class_order='abc'"),
        ("stream.class_order=[0.9,1,2,3,4,5,6,7,8,9]", "label 0.9 is a float, not an integer"),
        ("stream.class_order=[true,1,2,3,4,5,6,7,8,0]", "label True is a bool, not an integer"),
        ("stream.class_order=['0',1,2,3,4,5,6,7,8,9]", "label '0' is a str, not an integer"),
        ("seed=100000000000000000000", "seed=100000000000000000000 is not allowed"),
        ("buffer.size=1000000000000", "buffer.size=1000000000000 needs"),
        ("method=gsa", "method.current_task_replay=22"),
    ],
)
def test_impossible_settings_end_in_one_line_and_no_stray_folder(tmp_path, cli_in_process, override, needle):
    extra = ["buffer.size=16", "method.replay_batch_size=16"] if override == "method=gsa" else []
    run = tmp_path / "run"
    line = one_error_line(
        cli_in_process(f"hydra.run.dir={run}", "dataset=digits", "log.progress=false", override, *extra)
    )
    assert needle in line
    assert not (tmp_path / "run").exists()


def test_a_zero_byte_image_is_named(tmp_path):
    from cil.core.data import load_dataset

    folder = image_folder(tmp_path / "imgs", {"a": (2, 1), "b": (2, 1)})
    (folder / "train" / "a" / "empty.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"empty\.png is empty \(0 bytes\)"):
        load_dataset("imagefolder", path=str(folder))


# 7. -------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_refused_resume_leaves_the_folders_record_of_its_config(tmp_path, cli_in_process):
    run = tmp_path / "run"
    assert cli(run, *FAST, "checkpoint.every=10", interrupt="observe:15:KILL").returncode == -signal.SIGKILL
    recorded = (run / ".hydra" / "config.yaml").read_text(), (run / ".hydra" / "overrides.yaml").read_text()
    assert "seed: 0" in recorded[0]
    line = one_error_line(cli_in_process(f"hydra.run.dir={run}", *FAST, "checkpoint.every=10", "seed=1"))
    assert "other settings" in line and "seed: 0 -> 1" in line
    assert ((run / ".hydra" / "config.yaml").read_text(), (run / ".hydra" / "overrides.yaml").read_text()) == recorded


# 8. a full disk or a file-size limit -------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_file_size_limit_during_a_checkpoint_is_one_line_and_a_failed_status(tmp_path):
    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (300_000, 300_000))  # metrics and results fit, a checkpoint not

    run = tmp_path / "run"
    proc = cli(run, *FAST, preexec=limit)
    line = one_error_line(proc)
    assert f"cannot write {run / 'checkpoint.pt'}" in line and "File too large" in line
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "failed" and "File too large" in res["error"]
    assert not list(run.glob(".checkpoint.pt.*.tmp"))


def test_results_that_cannot_be_written_are_printed_and_the_run_says_so(tmp_path, monkeypatch, capsys):
    from cil.run import folder
    from cil.run.config import default_config
    from cil.run.experiment import run_experiment

    cfg = default_config("er")
    cfg.dataset.name, cfg.log.progress, cfg.buffer.size, cfg.checkpoint.at_task_end = "digits", False, 50, False
    real = folder.write_json_atomic

    def full_disk(path, data):
        if data.get("status") == "complete":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    monkeypatch.setattr(folder, "write_json_atomic", full_disk)
    with pytest.raises(StorageError, match="No space left on device"):
        run_experiment(cfg, tmp_path / "run")
    printed = json.loads(capsys.readouterr().err.strip().splitlines()[-1])
    assert printed["status"] == "complete" and len(printed["acc_matrix"]) == 5  # the numbers survive


# 9. --------------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_several_sigterms_in_a_row_still_exit_75(tmp_path):
    run = tmp_path / "run"
    with cli(run, *FAST, "method=gsa", "method.replay_batch_size=32", wait=False) as proc:
        deadline = time.time() + 120
        while status(run) != "running" and time.time() < deadline:
            time.sleep(0.05)
        for _ in range(30):  # during the batch in flight, the checkpoint, and the way out
            if proc.poll() is not None:
                break
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.03)
        assert proc.wait(timeout=300) == 75, proc.stderr.read()[-2000:]
    assert status(run) == "preempted"


def test_a_finite_but_exploded_loss_is_flagged(tmp_path, cli_in_process):
    run = tmp_path / "run"
    proc = cli_in_process(f"hydra.run.dir={run}", *FAST, "optimizer=adam", "optimizer.lr=1000000", "log.every=10")
    assert proc.returncode == 0
    res = json.loads((run / "results.json").read_text())
    assert res["warnings"] and "diverged" in res["warnings"][0] and "optimizer.lr" in res["warnings"][0]
    assert "diverged" in proc.stdout + proc.stderr  # logged as the run goes


def test_a_missing_file_is_fetched_alone_and_nothing_else_is_unpacked(tmp_path, monkeypatch):
    from urllib.error import URLError

    import torchvision

    from cil.core.data import load_dataset

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    shared = REPO.parent / "shared" / "data" / "MNIST" / "raw"
    if not shared.is_dir():
        pytest.skip("offline MNIST copy not found")
    for name in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz"):
        shutil.copy(shared / name, raw / name)
    asked = []

    def offline(url, root, filename=None, md5=None):
        asked.append(filename)
        raise URLError("network is unreachable")

    monkeypatch.setattr(torchvision.datasets.utils, "download_url", offline)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        load_dataset("mnist", tmp_path, download=True)
    assert set(asked) == {"t10k-labels-idx1-ubyte.gz"}
    assert sorted(p.name for p in raw.iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]  # nothing unpacked


# -- third round (issue 34) ------------------------------------------------------------------------------------------
SHORT = [*FAST, "stream.samples_per_class=20"]  # 20 batches: in-process runs of a fraction of a second


def stop_at_batch(monkeypatch, n, signum=signal.SIGTERM):
    """The in-process run's n-th batch ends with `signum` sent to this process (as a scheduler's would)."""
    from cil.core.learner import Learner

    real, count = Learner.train_batch, [0]

    def train_batch(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(Learner, "train_batch", train_batch)


def read_only(monkeypatch, folder: Path):
    """Writes at or under `folder` fail with EACCES, as in a folder without write permission (which chmod cannot
    give a test run as root): open for writing, os.open with write flags, mkdir, replace, unlink, rename."""
    import builtins
    import io

    top = str(folder.absolute())

    def under(path) -> bool:
        try:
            return os.path.abspath(os.fspath(path)).startswith(top)
        except TypeError:  # a file descriptor
            return False

    def deny(path):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))

    real_open, real_os_open = builtins.open, os.open

    def open_(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+") and under(file):
            deny(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path):
            deny(path)
        return real_os_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    for name in ("mkdir", "replace", "unlink", "rename", "rmdir"):
        real = getattr(os, name)

        def guarded(path, *args, _real=real, **kwargs):
            if under(path) or (args and under(args[0])):
                deny(path)
            return _real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, guarded)


def snapshot(folder: Path) -> dict:
    """Every file's bytes and every folder under `folder` (the lock's content, its holder's pid, aside)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes() if p.is_file() and p.name != ".cil.lock" else "-")
        for p in sorted(folder.rglob("*"))
    }


# Data lost or wrong numbers --------------------------------------------------------------------------------------
@pytest.mark.parametrize("refusal", [["stream.batch_size=0"], ["dataset=imagefolder", "dataset.path=/nonexistent"]])
def test_a_refused_run_removes_only_what_it_created(tmp_path, cli_in_process, refusal):
    """Refused before (a config value) or after taking the folder's lock (missing data): user files of every kind
    cil writes stay as they were, and nothing the refused run made is left behind."""
    logs_only = tmp_path / "logs_only"  # only the user's *.log files, Hydra's log name included
    logs_only.mkdir()
    (logs_only / "cli.log").write_text("my notes\n")
    (logs_only / "train.log").write_text("more notes\n")
    full = tmp_path / "full"
    (full / ".hydra").mkdir(parents=True)
    (full / ".hydra" / "config.yaml").write_text("mine: 1\n")
    (full / "metrics.csv").write_text("precious\n")
    (full / "notes.log").write_text("notes\n")
    for folder in (logs_only, full):
        before = snapshot(folder)
        line = one_error_line(cli_in_process(f"hydra.run.dir={folder}", "dataset=digits", *refusal))
        assert "batch_size" in line or "nonexistent" in line
        assert snapshot(folder) == before  # nothing deleted, nothing left (cli.log, .cil.lock)
    fresh = tmp_path / "fresh"
    one_error_line(cli_in_process(f"hydra.run.dir={fresh}", "dataset=digits", *refusal))
    assert not fresh.exists()


def test_a_class_without_test_images_is_refused_naming_it(tmp_path, cli_in_process):
    folder = image_folder(tmp_path / "imgs", {"a": (6, 2), "b": (6, 2), "c": (6, 2), "d": (6, 0)})
    run = tmp_path / "run"
    line = one_error_line(
        cli_in_process(
            f"hydra.run.dir={run}",
            "dataset=imagefolder",
            f"dataset.path={folder}",
            "stream.n_tasks=2",
            "stream.class_order=natural",
            "buffer.size=20",
            "log.progress=false",
        )
    )
    assert "task 1 (classes ['c', 'd'])" in line and "class(es) ['d'] have no test samples" in line
    assert not run.exists()


def test_a_resumed_metrics_csv_always_has_its_header(tmp_path, cli_in_process, monkeypatch):
    run = tmp_path / "run"
    args = [f"hydra.run.dir={run}", *SHORT, "checkpoint.every=5"]
    with monkeypatch.context() as patch:
        stop_at_batch(patch, 7)
        assert cli_in_process(*args).returncode == 75 and status(run) == "preempted"
    (run / "metrics.csv").write_text("")  # emptied (a full disk, a user) while the run waited
    again = cli_in_process(*args)
    assert again.returncode == 0 and "shorter than at the checkpoint" in again.stdout + again.stderr
    lines = (run / "metrics.csv").read_text().splitlines()
    assert lines[0] == "step,task,key,value" and len(lines) > 1 and "step,task,key,value" not in lines[1:]


def test_a_sweep_job_skips_only_the_complete_run_of_its_own_config(tmp_path, capsys):
    """A complete folder of other settings under the job's name (another search's trial, a changed default) is
    refused naming the keys, left as it is, and reported by the sweep; the same config is skipped."""
    from omegaconf import OmegaConf

    from cil.run.config import default_config
    from cil.run.sweep import REFUSED_DIR, SweepSummary, run_sweep_job

    sweep = tmp_path / "sweep"
    job = sweep / "optimizer.lr=0.1"
    job.mkdir(parents=True)
    theirs = dataclasses.asdict(default_config("er"))
    (job / "results.json").write_text(json.dumps({"status": "complete", "config": theirs, "final_avg_acc": 50.0}))
    (job / ".cil.lock").write_text("123")  # as every run folder cil made
    before = snapshot(job)
    summary = SweepSummary()
    summary.on_multirun_start(None)
    mine = dataclasses.asdict(default_config("er_ace"))
    out = run_sweep_job(None, job, mine, ["optimizer.lr=0.1"], sweep_dir=sweep)
    assert out["status"] == "failed" and "method.name: 'er' -> 'er_ace'" in out["error"]
    assert "holds a complete run of other settings" in capsys.readouterr().err
    assert snapshot(job) == before  # no failed.json beside the complete results
    assert run_sweep_job(None, job, theirs, ["optimizer.lr=0.1"], sweep_dir=sweep)["status"] == "skipped"
    with pytest.raises(SystemExit) as ended:  # the sweep's summary names the refusal and exits 1
        summary.on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert ended.value.code == 1
    assert "REFUSED optimizer.lr=0.1" in capsys.readouterr().out
    assert not list((sweep / REFUSED_DIR).iterdir())  # reported once


def test_a_search_name_is_part_of_its_trial_folders():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cil.run.hydra_conf import CONF_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=["search=er"], return_hydra_config=True)
    GlobalHydra.instance().clear()
    assert "search" not in cfg.hydra.job.config.override_dirname.exclude_keys


def test_tune_into_the_folder_of_another_search_is_refused(tmp_path, capsys):
    from cil.run.tune import main as tune_main

    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "tune.json").write_text(json.dumps({"search": "er", "best_params": {"optimizer.lr": 0.1}}))
    ran = []
    assert tune_main(["search=er_ace", "--dir", str(tmp_path / "t")], lambda argv: ran.append(argv) or 0) == 2
    assert "holds the tune of search=er" in capsys.readouterr().err and not ran


def test_tune_never_reads_an_earlier_launchs_search_result(tmp_path, capsys):
    """A search that ended without writing its result (here: a search command that failed) leaves the previous
    launch's optimization_results.yaml: it is not taken for this search's, and nothing runs on the test set."""
    from cil.run.tune import main as tune_main

    search = tmp_path / "t" / "search"
    search.mkdir(parents=True)
    (search / "optimization_results.yaml").write_text("best_params:\n  optimizer.lr: 0.5\nbest_value: 99.0\n")
    os.utime(search / "optimization_results.yaml", (1, 1))
    phases = []
    assert tune_main(["search=er", "--dir", str(tmp_path / "t")], lambda argv: phases.append(argv) or 1) == 1
    assert len(phases) == 1 and "the search did not finish" in capsys.readouterr().err
    record = json.loads((tmp_path / "t" / "tune.json").read_text())
    assert record["status"] == "search failed" and "best_params" not in record


@pytest.mark.slow
def test_tune_stopped_during_its_search_runs_no_final_phase(tmp_path, monkeypatch, capsys):
    from cil.run.cli import run_hydra
    from cil.run.tune import main as tune_main

    out = tmp_path / "t"
    (out / "search").mkdir(parents=True)
    stale = "best_params:\n  optimizer.lr: 0.5\nbest_value: 99.0\n"  # an earlier launch's result
    (out / "search" / "optimization_results.yaml").write_text(stale)
    os.utime(out / "search" / "optimization_results.yaml", (1, 1))
    stop_at_batch(monkeypatch, 12)  # in the search's second trial
    phases = []

    def phase(argv):
        phases.append(argv)
        return run_hydra(argv)

    sigterm = signal.getsignal(signal.SIGTERM)
    try:
        args = ["search=er", *SHORT, "stream.samples_per_class=10", "--trials", "3", "--seeds", "0", "--dir", str(out)]
        assert tune_main(args, phase) == 75
    finally:
        signal.signal(signal.SIGTERM, sigterm)
    assert len(phases) == 1  # no final phase
    record = json.loads((out / "tune.json").read_text())
    assert record["status"] == "search stopped" and "best_params" not in record
    assert not (out / "final").exists()
    assert "no final phase" in capsys.readouterr().err


# Tracebacks that become one line -----------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["file", "under_a_file", "sweep_file"])
def test_a_run_folder_that_is_a_file_is_one_line(tmp_path, cli_in_process, where):
    (tmp_path / "taken").write_text("mine\n")
    target = tmp_path / "taken" / "run" if where == "under_a_file" else tmp_path / "taken"
    args = ["-m", f"hydra.sweep.dir={target}", "seed=0,1"] if where == "sweep_file" else [f"hydra.run.dir={target}"]
    line = one_error_line(cli_in_process(*args, *SHORT))
    assert str(target) in line and "is a file where a folder belongs" in line
    assert (tmp_path / "taken").read_text() == "mine\n"


def test_a_read_only_run_folder_is_one_line_and_a_complete_one_is_returned(tmp_path, cli_in_process, monkeypatch):
    done, new = tmp_path / "done", tmp_path / "new"
    assert cli_in_process(f"hydra.run.dir={done}", *SHORT).returncode == 0
    new.mkdir()
    before = snapshot(done)
    with monkeypatch.context() as patch:
        read_only(patch, done)
        read_only(patch, new)
        again = cli_in_process(f"hydra.run.dir={done}", *SHORT)
        refused = cli_in_process(f"hydra.run.dir={new}", *SHORT)
    assert again.returncode == 0 and "Traceback" not in again.stderr and snapshot(done) == before
    line = one_error_line(refused)
    assert f"run folder {new} cannot be used" in line and "Permission denied" in line and "writable" in line
    assert "warning: cannot write the log file" in refused.stderr and not list(new.iterdir())


def test_a_full_disk_while_metrics_csv_is_written_fails_the_run(tmp_path, cli_in_process, monkeypatch):
    import builtins

    real_open, appends = builtins.open, [0]

    def full_disk(file, mode="r", *args, **kwargs):
        if str(file).endswith("metrics.csv") and mode == "a":
            appends[0] += 1
            if appends[0] == 2:
                raise OSError(errno.ENOSPC, "No space left on device", str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_disk)
    run = tmp_path / "run"
    line = one_error_line(cli_in_process(f"hydra.run.dir={run}", *SHORT, "log.every=5"))
    assert f"cannot write {run / 'metrics.csv'}: No space left on device" in line and "free space" in line
    assert status(run) == "failed"


def test_a_full_disk_at_the_end_is_one_line_without_a_logging_traceback(tmp_path, cli_in_process, monkeypatch):
    from cil.run import folder

    real = folder.write_json_atomic

    def full_disk(path, data):
        if data.get("status") == "complete":
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)

    class FullStream:
        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setattr(folder, "write_json_atomic", full_disk)
    monkeypatch.setattr(folder.RunLogFile, "_open", lambda self: FullStream())
    run = tmp_path / "run"
    proc = cli_in_process(f"hydra.run.dir={run}", *SHORT)
    line = one_error_line(proc)
    assert "cannot write" in line and "results.json" in line and "Logging error" not in proc.stderr
    assert proc.stderr.count("warning: cannot write the log file") == 1
    assert status(run) == "failed"  # the short record fitted where the results did not


@pytest.mark.parametrize("kind", ["folder", "not_cil", "tensor"])
def test_a_checkpoint_that_is_not_one_is_one_line(tmp_path, cli_in_process, kind):
    run = tmp_path / "run"
    run.mkdir()
    path = run / "checkpoint.pt"
    if kind == "folder":
        (path / "mine").mkdir(parents=True)
    else:
        torch.save({"format": 1, "weights": torch.zeros(2)} if kind == "not_cil" else torch.zeros(3), path)
    before = snapshot(run)
    for extra in ([], ["checkpoint.resume=false"]) if kind == "folder" else ([],):
        line = one_error_line(cli_in_process(f"hydra.run.dir={run}", *SHORT, *extra))
        assert str(path) in line
        assert ("is a folder" in line) if kind == "folder" else ("is not a cil checkpoint" in line)
        assert snapshot(run) == before


def test_metrics_csv_replaced_by_a_folder_is_refused_before_the_status_changes(tmp_path, cli_in_process, monkeypatch):
    run = tmp_path / "run"
    args = [f"hydra.run.dir={run}", *SHORT, "checkpoint.every=5"]
    with monkeypatch.context() as patch:
        stop_at_batch(patch, 7)
        assert cli_in_process(*args).returncode == 75
    (run / "metrics.csv").unlink()
    (run / "metrics.csv").mkdir()
    results = (run / "results.json").read_text()
    line = one_error_line(cli_in_process(*args))
    assert f"{run / 'metrics.csv'} is a folder" in line
    assert (run / "results.json").read_text() == results  # still `preempted`, resumable once the folder is moved


def test_a_deleted_working_directory_is_one_line(tmp_path):
    gone = tmp_path / "gone"
    gone.mkdir()
    script = f"cd {gone} && rmdir {gone} && exec {sys.executable} -m cil dataset=digits"
    proc = subprocess.run(["sh", "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: the working directory no longer exists")


# Rough edges --------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_checkpoints_and_exits_130_with_one_line(tmp_path):
    run = tmp_path / "run"
    proc = cli(run, *SHORT, interrupt="batch:5:INT")
    assert proc.returncode == 130 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted: SIGINT received: checkpoint written at stream batch 5")
    res = json.loads((run / "results.json").read_text())
    assert res["status"] == "preempted" and res["step"] == 5 and (run / "checkpoint.pt").is_file()


def test_a_refused_concurrent_job_never_writes_into_the_holders_folder(tmp_path, capsys):
    from cil.run.config import default_config
    from cil.run.sweep import REFUSED_DIR, run_sweep_job

    sweep = tmp_path / "sweep"
    job = sweep / "seed=0"
    config = dataclasses.asdict(default_config("er"))
    with RunFolder(job):  # the first sweep's job holds the folder...
        (job / "failed.json").write_text('{"status": "failed"}')  # ...and has just recorded a failure there
        before = snapshot(job)
        out = run_sweep_job(None, job, config, ["seed=0"], sweep_dir=sweep)
        assert snapshot(job) == before
    assert out["status"] == "failed" and "in use by another run" in out["error"]
    assert "in use by another run" in capsys.readouterr().err
    [record] = (sweep / REFUSED_DIR).iterdir()
    assert json.loads(record.read_text())["run_dir"] == str(job)
