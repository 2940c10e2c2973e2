"""The faults of a hostile user or a cluster, each reproduced: a run folder never looks complete when it is not,
it has one writer at a time, a resume refuses other data, nothing the run did not create is deleted, and every
failure ends in one line naming the value or the path (and a results.json status that says what happened)."""

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
