"""Weights & Biases logging (log.wandb=true), offline: what a run writes under its folder, read back from W&B's own
run file (`wandb.proto` records); a resumed run continuing the same W&B run; a sweep's jobs as W&B runs of one
group; bad settings refused before anything is written."""

import json
import os
import signal
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest

pytest.importorskip("wandb")

from cil.run.wandb_log import RUN_ID_FILE, read_records

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
INTERRUPT = TESTS / "_interrupt_cli.py"
# checkpoints at task ends (~every 29 batches) and every 25 batches; diagnostics on: their PNGs are the run's plots
ARGS = [
    "dataset=digits",
    "log.progress=false",
    "threads=1",
    "buffer.size=100",
    "method=er",
    "method.replay_batch_size=10",
    "eval.anytime_every=20",
    "log.every=15",
    "checkpoint.every=25",
    "diagnostics.enabled=true",
    "diagnostics.every=20",
    "log.wandb=true",
    "log.wandb_mode=offline",
    "log.wandb_project=cil-test",
    "log.wandb_tags=[a,b]",
]
EXIT_PREEMPTED = 75


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    home = tmp_path_factory.mktemp("wandb-home")
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # this checkout's cil
    return {
        **os.environ,
        "PYTHONPATH": path,
        "OMP_NUM_THREADS": "1",
        "WANDB_SILENT": "true",
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(home / "dir"),
        "WANDB_CACHE_DIR": str(home / "cache"),
        "WANDB_CONFIG_DIR": str(home / "config"),
        "WANDB_DATA_DIR": str(home / "data"),
    }


def cli(run_dir: Path, env: dict, *args, interrupt=None):
    entry = [str(INTERRUPT), interrupt] if interrupt else ["-m", "cil"]
    cmd = [sys.executable, *entry, f"hydra.run.dir={run_dir}", *args]
    return subprocess.run(cmd, cwd=run_dir.parent, capture_output=True, text=True, timeout=300, env=env)


def attempts(run_dir: Path) -> list[dict]:
    """Each offline W&B run of the folder, in order: its id, history rows by step, merged summary, config,
    exit code (None: killed)."""
    out = []
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        rec = {"id": None, "rows": {}, "summary": {}, "config": {}, "exit": None, "tags": [], "group": None}
        for r in read_records(path):
            kind = r.WhichOneof("record_type")
            if kind == "run":
                rec.update(id=r.run.run_id, project=r.run.project, tags=list(r.run.tags), group=r.run.run_group)
                rec["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
            elif kind == "history":
                rec["rows"][r.history.step.num] = {
                    i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item
                }
            elif kind == "summary":
                rec["summary"].update(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.summary.update}
                )
            elif kind == "exit":
                rec["exit"] = r.exit.exit_code
        out.append(rec)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, wandb_env):
    run_dir = tmp_path_factory.mktemp("wandb_ref") / "run"
    proc = cli(run_dir, wandb_env, *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


@pytest.mark.slow
def test_offline_run_records_scalars_matrix_config_summary_and_plots(uninterrupted):
    run_dir = uninterrupted
    results = json.loads((run_dir / "results.json").read_text())
    (run,) = attempts(run_dir)
    assert run["id"] == (run_dir / RUN_ID_FILE).read_text().strip() and run["exit"] == 0
    assert run["project"] == "cil-test" and run["tags"] == ["a", "b"] and run["group"] == ""
    assert run["config"]["method"]["name"] == "er" and run["config"]["buffer"]["size"] == 100
    # the same scalars as metrics.csv, at the same (stream) steps and values
    csv_rows = [line.split(",") for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]]
    for step, _, key, value in csv_rows:
        assert run["rows"][int(step)][key] == pytest.approx(float(value), rel=1e-5), (step, key)
    keys = set().union(*run["rows"].values())
    for key in (
        "loss",
        "online_acc",
        "anytime_acc",
        "avg_acc_seen",
        "acc/task_0",
        "errors/correct",
        "diag/grad_norm/new",
        "plots/diag_ratio/path",
        "plots/digits_er_m100_acc_matrix/path",
    ):
        assert key in keys, key
    # the accuracy matrix after each task: a table of as many rows as tasks done, and its heatmap
    tables = {s: r for s, r in run["rows"].items() if "acc_matrix/_type" in r}
    assert len(tables) == 5 and all(r["acc_matrix/_type"] == "table-file" for r in tables.values())
    assert [r["acc_matrix/nrows"] for _, r in sorted(tables.items())] == [1, 2, 3, 4, 5]
    assert all(r["acc_matrix_heatmap/_type"] == "image-file" for r in tables.values())
    last = run_dir / "wandb" / next((run_dir / "wandb").glob("offline-run-*")).name / "files"
    table = json.loads((last / tables[max(tables)]["acc_matrix/path"]).read_text())
    assert [row[1:] for row in table["data"]] == results["acc_matrix"]
    # results.json's numbers are the run's summary
    for key in ("final_avg_acc", "avg_forgetting", "anytime_acc", "online_acc", "stream_batches"):
        assert run["summary"][key] == pytest.approx(results[key]), key
    assert run["summary"]["status"] == "complete"


@pytest.mark.slow
def test_resumed_run_continues_the_same_wandb_run(tmp_path, wandb_env, uninterrupted):
    run_dir = tmp_path / "run"
    # SIGKILL mid-step in task 1: the W&B run is left as the kill left it
    proc = cli(run_dir, wandb_env, *ARGS, interrupt="observe:40:KILL")
    assert proc.returncode == -signal.SIGKILL
    run_id = (run_dir / RUN_ID_FILE).read_text().strip()
    # resumed, then pre-empted (SIGTERM): the W&B run ends marked pre-empted (exit code 75)
    proc = cli(run_dir, wandb_env, *ARGS, interrupt="observe:20:TERM")
    assert proc.returncode == EXIT_PREEMPTED, proc.stderr[-3000:]
    proc = cli(run_dir, wandb_env, *ARGS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = attempts(run_dir)
    assert [p.name.rsplit("-", 1)[1] for p in sorted((run_dir / "wandb").glob("offline-run-*"))] == [run_id] * 3
    # the killed attempt's W&B buffer died with it (W&B writes its file every 15 s), the others ended cleanly
    assert [r["id"] for r in runs[1:]] == [run_id] * 2
    assert [r["exit"] for r in runs] == [None, EXIT_PREEMPTED, 0]
    # no step is sent twice; together the attempts hold every step of an uninterrupted run, with its values
    steps = [sorted(r["rows"]) for r in runs if r["rows"]]
    assert all(max(a) < min(b) for a, b in pairwise(steps)) and len(steps) >= 2
    (ref,) = attempts(uninterrupted)
    merged = {s: row for r in runs for s, row in r["rows"].items()}
    assert sorted(merged) == sorted(ref["rows"])
    for s, row in ref["rows"].items():
        for key in ("loss", "online_acc", "anytime_acc", "avg_acc_seen"):
            if key in row:
                assert merged[s][key] == pytest.approx(row[key], rel=1e-5), (s, key)  # metrics.csv: 6 digits
        assert merged[s].get("acc_matrix/nrows") == row.get("acc_matrix/nrows"), s
    assert runs[-1]["summary"]["final_avg_acc"] == json.loads((run_dir / "results.json").read_text())["final_avg_acc"]


@pytest.mark.slow
def test_sweep_jobs_are_runs_of_one_group(tmp_path, wandb_env):
    sweep = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "cil",
        "-m",
        f"hydra.sweep.dir={sweep}",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
        "dataset=digits",
        "log.progress=false",
        "threads=1",
        "buffer.size=100",
        "method.replay_batch_size=10",
        "stream.n_tasks=2",
        "stream.batch_size=50",
        "eval.anytime_every=0",
        "log.wandb=true",
        "log.wandb_mode=offline",
        "seed=0,1",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=wandb_env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith("."))
    assert len(jobs) == 2 and not any("wandb" in d.name for d in jobs)  # W&B keys stay out of the folder names
    runs = [attempts(d)[0] for d in jobs]
    assert len({r["id"] for r in runs}) == 2 and all(r["exit"] == 0 for r in runs)
    assert {r["group"] for r in runs} == {f"{tmp_path.name}/sweep"}


@pytest.mark.parametrize(
    "setting, value, needle",
    [
        ("wandb_mode", "bogus", "log.wandb_mode='bogus' is not allowed"),
        ("wandb_project", "", "log.wandb_project='' is not allowed"),
        (None, None, "pip install 'cil[wandb]'"),  # the package missing
    ],
)
def test_bad_wandb_settings_are_one_clear_error(monkeypatch, setting, value, needle):
    """validate() runs before the run folder is looked at: nothing is written (tests/test_cli.py checks that for
    every ConfigError of validate)."""
    import importlib.util

    from cil.errors import ConfigError
    from cil.run.config import default_config, validate

    cfg = default_config("er")
    if setting is None:
        find_spec = importlib.util.find_spec
        monkeypatch.setattr(
            importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a)
        )
    else:
        setattr(cfg.log, setting, value)
    validate(cfg)  # W&B off: its settings and package do not matter
    cfg.log.wandb = True
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    assert needle in str(err.value)
