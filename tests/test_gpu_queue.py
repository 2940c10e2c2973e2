"""`cil gpu-queue`: a queue stopped midway (by its budget, or by SIGTERM) leaves complete runs, pre-empted runs
with a checkpoint and runs not started, each reported as such; the next call skips the complete ones, resumes the
pre-empted one (ending bit for bit where an uninterrupted run ends) and finishes the rest. A bad entry is one error
naming it before anything runs. And the repository's queue: every run composes on the JPEG copy of CIFAR-10 with
its protocol's own settings, into its table's sweep folder."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml

from cil.run import gpu_queue
from cil.run.gpu_plan import finish_times, fits

REPO = Path(__file__).resolve().parents[1]
A = "buffer.size=100,method=er,seed=0"
B = "buffer.size=100,dataset=digits,method=gsa,model=reduced_resnet18,seed=0,stream.samples_per_class=140"
C = "buffer.size=100,method=er_ace,seed=0"
TOY = {
    "common": ["log.progress=false"],
    "runs": [
        {"label": "A", "table": "toy", "overrides": ["method=er", "buffer.size=100", "seed=0"]},
        {
            "label": "B",
            "table": "toy",
            "overrides": [
                "dataset=digits",
                "method=gsa",
                "model=reduced_resnet18",
                "stream.samples_per_class=140",
                "checkpoint.every=10",
                "buffer.size=100",
                "seed=0",
            ],
        },
        {"label": "C", "table": "toy", "overrides": ["method=er_ace", "buffer.size=100", "seed=0"]},
    ],
}


def queue_file(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "queue.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def command(queue: Path, out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "cil", "gpu-queue", "--dry-run", "--queue", str(queue), "--out", str(out), *args]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def rows(out: Path) -> dict[str, dict]:
    report = json.loads((out / "report.json").read_text())
    return {r["run"]: r for r in report["sections"]["runs"]["in priority order"]}


def status(run_dir: Path) -> str | None:
    try:
        return json.loads((run_dir / "results.json").read_text()).get("status")
    except (OSError, ValueError):
        return None


def test_the_planner_shares_the_gpu():
    """k runs at once each go at min(1, 2.5 / k) of their speed alone; a run starts only if all still end in time."""
    assert finish_times([10.0, 10.0]) == [10.0, 10.0]  # two runs: each at full speed
    assert finish_times([30.0, 30.0, 30.0, 30.0, 30.0]) == pytest.approx([60.0] * 5)  # five at half speed
    # the short one ends first, then the other two go faster
    assert finish_times([5.0, 20.0, 20.0]) == pytest.approx([6.0, 21.0, 21.0])
    assert fits([100.0], 50.0, 101.0) and not fits([100.0, 100.0, 100.0], 50.0, 101.0)


@pytest.mark.parametrize(
    "entry, data_root, expected",
    [
        ({"label": "B", "table": "toy", "overides": ["method=er"]}, None, "unknown key(s) ['overides']"),
        ({"label": "B", "table": "toy", "overrides": ["method.bogus=1"]}, None, "bogus"),
        ({"label": "B", "table": "toy", "overrides": ["dataset.root=/data"]}, None, "the data root is the machine's"),
        ({"label": "B", "table": "toy", "overrides": ["dataset=mnist"]}, "empty", "dataset mnist"),
    ],
)
def test_a_bad_entry_is_one_error_naming_it_before_anything_runs(tmp_path, capsys, entry, data_root, expected):
    first = {**TOY["runs"][1], "label": "A"}  # on the bundled digits: only the bad entry needs a data root
    queue = queue_file(tmp_path, {"runs": [first, entry]})
    args = ["--dry-run", "--queue", str(queue), "--out", str(tmp_path / "out")]
    if data_root:
        (tmp_path / data_root).mkdir()
        args += ["--data-root", str(tmp_path / data_root)]
    saved = os.environ.get("CIL_DATA_ROOT")
    try:
        assert gpu_queue.main(args) == 2
    finally:  # --data-root sets it for the runs to come
        os.environ.pop("CIL_DATA_ROOT", None) if saved is None else os.environ.update(CIL_DATA_ROOT=saved)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ") and "run 2 ('B')" in err and expected in err, err
    assert not (tmp_path / "out").exists()  # nothing ran, not even the first run


@pytest.mark.slow
def test_stopped_midway_then_resumed_skipped_and_finished(tmp_path):
    """SIGTERM to the queue stops it as its budget's end does: the runs going checkpoint and stop."""
    queue, out = queue_file(tmp_path, TOY), tmp_path / "out"
    runs = out / "runs" / "toy"
    first = subprocess.Popen(
        command(queue, out, "--budget", "300", "--max-parallel", "2", "--pack", str(out / "first.tar.gz")),
        cwd=REPO,
        env=env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    end = time.time() + 120
    while time.time() < end and first.poll() is None:
        if status(runs / A) == "complete" and (runs / B / "checkpoint.pt").exists():
            break
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=60)  # and closes the pipe
    assert first.returncode == 75, stderr.decode()[-3000:]
    one = rows(out)
    assert one["A"]["status"] == "complete" and one["A"]["folder"] == str(runs / A)
    assert one["B"]["status"] == "pre-empted" and one["B"]["stream batch"] >= 10 and one["B"]["of"] == 140
    assert "checkpoint" in one["B"]["why"] and (runs / B / "checkpoint.pt").exists()
    assert one["C"]["status"] in ("not started", "pre-empted"), one["C"]  # the stop came when A ended
    with tarfile.open(out / "first.tar.gz") as tar:  # what comes back from a lent machine: the complete run
        assert sorted(tar.getnames()) == [f"toy/{A}/{f}" for f in (".hydra/config.yaml", ".hydra/overrides.yaml")] + [
            f"toy/{A}/{f}" for f in ("metrics.csv", "results.json")
        ]

    second = subprocess.run(command(queue, out, "--budget", "300"), cwd=REPO, env=env(), capture_output=True, text=True)
    assert second.returncode == 0, second.stderr[-3000:]
    two = rows(out)
    assert two["A"]["status"] == "complete (before this call)"
    assert two["B"]["status"] == "complete" and two["B"]["resumes from stream batch"] == one["B"]["stream batch"]
    assert two["C"]["status"] == "complete"
    assert "## runs" in (out / "report.md").read_text()

    # the resumed run ends where an uninterrupted one does, bit for bit
    from cil import api

    overrides = yaml.safe_load((runs / B / ".hydra" / "overrides.yaml").read_text())
    reference = api.run([*overrides, "threads=1"], out_dir=tmp_path / "reference")
    resumed = json.loads((runs / B / "results.json").read_text())
    for key in ("acc_matrix", "final_avg_acc", "avg_forgetting", "anytime_acc", "anytime_curve"):
        assert resumed[key] == reference[key], key


@pytest.mark.slow
def test_the_budget_stops_a_run_midway_and_the_call_ends_in_time(tmp_path):
    """A run too long for the budget, started with --partial, is pre-empted at its end; the run behind it is not
    started (one run at a time); the call ends within the budget plus the stated margin."""
    long_run = {**TOY["runs"][1], "label": "long"}
    long_run["overrides"] = [*long_run["overrides"], "stream.batch_size=2"]
    queue, out = queue_file(tmp_path, {"runs": [long_run, TOY["runs"][0]]}), tmp_path / "out"
    # the dry run's step-time measurement needs 5 s before the stop (budget - 4 s): 16 s leaves the set-up (3.5 s
    # on a 2-core Xeon, 2026-12-07) room to spare; the long run then gets about 100 of its 700 batches
    budget = 16.0
    started = time.time()
    proc = subprocess.run(
        command(queue, out, "--budget", str(budget), "--max-parallel", "1", "--partial"),
        cwd=REPO,
        env=env(),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the budget counts from the command's start (after Python and torch have loaded, which a loaded machine
    # stretches): the call's own clock, and a loose bound on the whole process for a call that never stops
    assert (
        json.loads((out / "report.json").read_text())["sections"]["queue"]["wall s"] <= budget + gpu_queue.EXIT_MARGIN
    )
    assert time.time() - started <= 3 * budget
    got = rows(out)
    assert got["long"]["status"] == "pre-empted" and "end of the budget" in got["long"]["why"]
    assert got["long"]["expected to end in this call"] is False and got["long"]["stream batch"] < got["long"]["of"]
    assert got["A"]["status"] == "not started" and got["A"]["why"] == "out of time"


PACKABLE = {
    "common": ["log.progress=false", "method.replay_batch_size=10"],
    "runs": [
        {
            "label": f"{method}{m}s{seed}",
            "table": "toy",
            "overrides": [f"method={method}", f"buffer.size={m}", f"seed={seed}"],
        }
        for method, m, seed in [("gsa", 50, 0), ("er_ace", 50, 0), ("gsa", 100, 0), ("gsa", 50, 1)]
    ],
}


@pytest.mark.slow
def test_runs_of_one_kind_train_as_one_pack_with_the_ordinary_runs_results(tmp_path):
    """--runs-per-pack: the GSA runs (seeds, memories) train in one process as one pack (cil.run.queue_pack); the
    ER-ACE run, the only one of its kind, alone. Each packed folder holds the command line's record of its run and
    the results of the same run made by the command line's own path."""
    from cil import api

    queue, out = queue_file(tmp_path, PACKABLE), tmp_path / "packed"
    proc = subprocess.run(
        command(queue, out, "--budget", "300", "--runs-per-pack", "4", "--max-parallel", "4"),
        cwd=REPO,
        env=env(),
        capture_output=True,
    )
    assert proc.returncode == 0, proc.stderr.decode()[-3000:]
    got = rows(out)
    assert {r["status"] for r in got.values()} == {"complete"}
    assert got["gsa50s0"]["note"] == "packed with runs 3, 4 (pack-1.json)"
    assert not got["er_ace50s0"].get("note")  # alone
    times = next(iter(json.loads((out / "report.json").read_text())["sections"]["step times"].values()))
    assert any(r["runs"] == "3 packed" and "ms/step" in r for r in times)
    for label in ("gsa50s1",):  # the pack's last run: another seed and memory than its first
        folder = Path(got[label]["folder"])
        overrides = yaml.safe_load((folder / ".hydra" / "overrides.yaml").read_text())
        expected = api.run([*overrides, "threads=1"], out_dir=tmp_path / "reference" / label)
        packed = json.loads((folder / "results.json").read_text())
        assert packed["acc_matrix"] == expected["acc_matrix"], label
        assert {**packed["config"], "threads": 1} == expected["config"], label  # the queue's env: OMP_NUM_THREADS=1


def test_a_kind_that_cannot_be_packed_is_measured_as_such():
    """The planner's packed measurement of a method without a packable step is the reason (its runs go alone)."""
    from cil.run.config import default_config
    from cil.run.experiment import load_run_dataset
    from cil.schema import DatasetConfig

    cfg = default_config("derpp", dataset=DatasetConfig(name="digits"))
    cfg.stream.samples_per_class = 6
    derpp = gpu_queue.Entry(1, "derpp", "toy", [], kind="derpp", cfg=cfg)
    planner = gpu_queue.Planner(gpu_queue.Timing.for_run(True), {gpu_queue.dataset_key(cfg): load_run_dataset(cfg)})
    m = planner.measure_pack(derpp, 2, beside=0)
    assert m == {
        "error": "ConfigError: run 0 cannot be packed: method derpp has no packable step (ER, ER-ACE and GSA have one)"
    }


def test_a_pack_that_fails_as_a_whole_sends_its_runs_alone(tmp_path):
    """When every run of a pack failed with its process (packing itself broke: a device's vmap, a spec), the kind
    goes alone from then on and its runs are queued again."""
    from cil.run.gpu_plan import Ended, Report

    args = dataclasses.make_dataclass("Args", ["budget", "runs_per_pack", "out", "dry_run"])(100.0, 4, tmp_path, True)
    entries = [gpu_queue.Entry(i, f"r{i}", "toy", [], kind="k", run_dir=tmp_path / f"r{i}") for i in (1, 2)]
    queue = gpu_queue.Queue(args, entries, Report(tmp_path), gpu_queue.Timing.for_run(True), time.time())
    for e in entries:
        e.run_dir.mkdir()
        (e.run_dir / "failed.json").write_text(json.dumps({"error": "vmap: no batching rule"}))
    assert queue.pack_group(entries[0], entries) == entries
    queue.ended(
        Ended("pack 1, 2", entries[0].run_dir, 1, 3.0, "Traceback...\nRuntimeError: vmap", {"entries": entries})
    )
    assert queue.requeue == entries and "k" in queue.unpackable
    assert [e.row["status"] for e in entries] == ["queued", "queued"]
    assert entries[0].row["note"] == "its pack failed (exit 1: RuntimeError: vmap): it runs alone"
    assert queue.pack_group(entries[0], entries) == [entries[0]]
    # --max-parallel bounds runs: a pack going counts each of its runs
    from types import SimpleNamespace

    queue.pool.running = {"pack": SimpleNamespace(info={"entries": entries}), "one": SimpleNamespace(info={})}
    assert queue.runs_going() == 3


@pytest.mark.slow
def test_the_repository_queue_runs_its_protocols_on_the_jpeg_copy(tmp_path):
    """Every run of experiments/queue.yaml composes; each CIFAR-10 protocol runs on the JPEG copy with its own
    precision and normalisation, into its table's sweep folder under the name the sweep gives it."""
    tables = yaml.safe_load((REPO / "experiments" / "tables.yaml").read_text())
    entries = gpu_queue.read_queue(gpu_queue.QUEUE)
    gpu_queue.compose_entries(entries, gpu_queue.QUEUE, tmp_path, dry_run=False)
    assert len(entries) == len({e.run_dir for e in entries}) == 117
    protocols = {}
    for e in entries:
        assert e.table in tables and f"sweep={e.table}" in e.overrides
        sweep = yaml.safe_load((REPO / "conf" / "sweep" / f"{e.table}.yaml").read_text())
        assert sweep["hydra"]["sweep"]["dir"] == f"experiments/runs/{e.table}"
        assert e.run_dir.parent == tmp_path / e.table and "dataset.root" not in str(e.run_dir)
        assert e.cfg.dataset.name == "cifar10_jpeg" and e.cfg.device == "cuda"
        protocols.setdefault(e.resolved["experiment"], e)
    composer = gpu_queue.Composer(gpu_queue.QUEUE)
    from hydra import initialize_config_dir

    from cil.run.hydra_conf import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        for name, e in protocols.items():  # the protocol alone: its own precision, normalisation and class order
            own, _, _ = composer.compose([f"experiment={name}"])
            assert (e.cfg.precision, e.cfg.dataset.normalize, e.cfg.stream.class_order) == (
                own.precision,
                own.dataset.normalize,
                own.stream.class_order,
            ), name
        # runs differing only in seed and memory share a composition: the same config as composing each
        first = [e for e in entries if e.kind == entries[0].kind][:3]
        for e in first:
            cfg, resolved, name = composer.compose(e.overrides)
            assert (dataclasses.asdict(cfg), resolved, name) == (dataclasses.asdict(e.cfg), e.resolved, e.run_dir.name)
    assert {e.cfg.precision for e in entries if e.resolved["experiment"] == "gsa_cifar10"} == {"fp16"}


def test_the_jpeg_copy_has_cifar10s_labels_and_normalisation(tmp_path):
    """cifar10_jpeg's class folders sort into CIFAR-10's label order (so `natural` and numpy's seeded shuffle give
    the official class orders) and it is standardised with the constants of the CIFAR-10 loader."""
    import torch
    from torchvision.io import write_jpeg

    from cil.core.data import cifar, load_dataset

    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]  # batches.meta
    for split in ("train", "test"):
        for c in names:
            (tmp_path / "cifar10-jpeg" / split / c).mkdir(parents=True)
            write_jpeg(torch.zeros(3, 4, 4, dtype=torch.uint8), str(tmp_path / "cifar10-jpeg" / split / c / "0.jpg"))
    dataset = load_dataset("cifar10_jpeg", str(tmp_path), download=False)
    assert dataset.class_names == names and dataset.train_y.tolist() == list(range(10))
    assert dataset.normalization() == cifar.CIFAR_NORMALIZATION
    shared = REPO.parent / "shared" / "data" / "cifar10-jpeg" / "train"
    if shared.is_dir():  # the copy itself
        assert sorted(p.name for p in shared.iterdir() if p.is_dir()) == names
