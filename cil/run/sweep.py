"""Sweeps (`python -m cil -m ...`): one job per run folder, skip what is finished, record what failed.

A run folder is complete when its `results.json` says `"status": "complete"`; a job whose folder is complete is
skipped, so re-launching a sweep into the same `hydra.sweep.dir` runs only what is missing or failed (the run
folder name is `hydra.job.override_dirname`, a function of the job's overrides alone: see conf/config.yaml).
A job that raises writes `failed.json` (error, traceback, config) and returns instead of raising, so one failed
run never stops the others; `SweepSummary` (a Hydra callback) prints what the sweep folder holds at the end and
makes the command exit 1 when a run failed.

Nothing here imports hydra (`cil.run.cli` is the only module that does); the callback is duck-typed.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import traceback
from collections.abc import Generator
from pathlib import Path
from typing import Any

from cil.errors import CilError
from cil.runfolder import FAILED, RESULTS, find_run_dirs, read_json, run_status, write_json_atomic

log = logging.getLogger("cil")


NAME_LIMIT = 255  # bytes in one file name on ext4, xfs, btrfs, tmpfs, Lustre, GPFS


def run_dirname(override_dirname: str, limit: int = NAME_LIMIT) -> str:
    """A sweep job's folder name: its `override_dirname` when that fits one file name, else its head cut at an
    override boundary and a hash of the whole name (stable, so a re-launch finds the same folder; the full
    overrides stay in the folder's .hydra/overrides.yaml and results.json). Names that fit are unchanged, so
    folders recorded before this rule keep their names."""
    if len(override_dirname.encode()) <= limit:
        return override_dirname
    digest = "hash=" + hashlib.sha1(override_dirname.encode()).hexdigest()[:12]
    head = override_dirname.encode()[: limit - len(digest) - 1].decode(errors="ignore")
    head = head[: head.rfind(",")] if "," in head else head  # whole overrides only
    return f"{head},{digest}"


def write_failure(run_dir: Path, err: BaseException, config: dict | None, overrides: list[str]) -> Path:
    path = Path(run_dir) / FAILED
    write_json_atomic(
        path,
        {
            "status": "failed",
            "error_type": type(err).__name__,
            "error": str(err),
            "traceback": "".join(traceback.format_exception(err)),
            "overrides": overrides,
            "config": config,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    return path


REFUSED_DIR = ".cil-refused"  # in a sweep folder: the jobs of a launch refused without touching their folders


def run_sweep_job(
    cfg: Any,
    out_dir: Path,
    resolved: dict,
    overrides: list[str],
    on_start: Any | None = None,
    sweep_dir: Path | None = None,
) -> dict:
    """One job of a sweep: skip a folder that holds the complete run of this very config, else run; any exception
    becomes failed.json and a return. A job refused before it may write its folder (another job holds it, or it
    holds a complete run of other settings) writes nothing there: the refusal goes to the sweep folder's
    `.cil-refused/`, which the sweep's summary reports (and counts as a failure). Inside a pack
    (cil.run.packed_sweep, `hydra/launcher=packed`) the job is set up here and trained later with the pack's
    other jobs."""
    from cil.run.experiment import drive
    from cil.run.packed_sweep import current_pack

    stages = sweep_job_stages(cfg, out_dir, resolved, overrides, on_start, sweep_dir)
    pack = current_pack()
    return drive(stages) if pack is None else pack.add(stages, ",".join(overrides) or str(out_dir), str(out_dir))


def sweep_job_stages(
    cfg: Any,
    out_dir: Path,
    resolved: dict,
    overrides: list[str],
    on_start: Any | None = None,
    sweep_dir: Path | None = None,
) -> Generator[Any, dict, dict]:
    """`run_sweep_job` as a run's stages (cil.run.experiment.experiment_stages): yields the learner to train."""
    out_dir = Path(out_dir)
    name = ",".join(overrides) or str(out_dir)
    from cil.run.checkpoint import config_differences
    from cil.run.experiment import experiment_stages
    from cil.run.folder import RunFolder

    try:
        folder = RunFolder(out_dir).__enter__()
    except CilError as err:  # another job of this or another launch holds it, or the path cannot be a folder
        return refuse(out_dir, sweep_dir, name, err)
    try:
        if run_status(out_dir) == "complete":
            previous = read_json(out_dir / RESULTS) or {}
            diff = config_differences(previous.get("config") or {}, resolved)
            if diff:
                return refuse(
                    out_dir,
                    sweep_dir,
                    name,
                    CilError(
                        f"{out_dir} holds a complete run of other settings ({'; '.join(diff[:5])}"
                        f"{'; ...' if len(diff) > 5 else ''}), which this job would report as its own; it was left "
                        "as it is: choose another hydra.sweep.dir, or move that folder away"
                    ),
                )
            log.info("skipping %s: %s is complete", name, out_dir / RESULTS)
            print(f"skipped (already complete): {out_dir}")
            return {"status": "skipped", "run_dir": str(out_dir)}
        (out_dir / FAILED).unlink(missing_ok=True)  # a previous attempt's failure no longer describes this folder
        try:
            # with log.wandb each job is its own W&B run, grouped by its sweep folder
            return (
                yield from experiment_stages(
                    cfg,
                    out_dir,
                    resolved_config=resolved,
                    on_start=on_start,
                    wandb_group="/".join(out_dir.resolve().parent.parts[-2:]),
                    folder=folder,
                )
            )
        except Exception as err:  # noqa: BLE001 - every failure is recorded; the sweep goes on
            try:
                path = write_failure(out_dir, err, resolved, overrides)
            except OSError as write_err:  # the folder cannot take it either: the sweep folder's record says it
                return refuse(out_dir, sweep_dir, name, err, f" (and failed.json could not be written: {write_err})")
            log.error("run %s failed: %s: %s (details in %s)", name, type(err).__name__, err, path)
            print(f"error in {name}: {type(err).__name__}: {err}\n  details: {path}", file=sys.stderr)
            return {"status": "failed", "run_dir": str(out_dir), "error": f"{type(err).__name__}: {err}"}
    finally:
        folder.__exit__(None, None, None)


def refuse(out_dir: Path, sweep_dir: Path | None, name: str, err: BaseException, note: str = "") -> dict:
    """A job that must not write its run folder: its error on stderr and in `<sweep dir>/.cil-refused/`."""
    log.error("run %s refused: %s%s", name, err, note)
    print(f"error in {name}: {err}{note}", file=sys.stderr)
    record = {
        "run_dir": str(out_dir),
        "overrides": name,
        "error": f"{err}{note}",
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if sweep_dir is not None:
        folder = Path(sweep_dir) / REFUSED_DIR
        key = hashlib.sha1(str(out_dir).encode()).hexdigest()[:16]
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(folder / f"{key}-{os.getpid()}.json", record)
        except OSError:
            pass  # the message above is the record
    return {"status": "failed", "run_dir": str(out_dir), "error": record["error"]}


def refusals(sweep_dir: Path, started: float, pid: int) -> list[tuple[Path, dict]]:
    """The refusals of the launch run by process `pid` (its own jobs, or its workers') since `started`."""
    found = []
    for path in sorted((Path(sweep_dir) / REFUSED_DIR).glob("*.json")):
        record = read_json(path)
        try:
            recent = path.stat().st_mtime >= started
        except OSError:
            continue
        if record is not None and recent and pid in (record.get("pid"), record.get("ppid")):
            found.append((path, record))
    return found


SEARCH_METRIC = "final_avg_acc"  # what a hyperparameter search maximises (on the validation split)


def search_score(result: dict, run_dir: Path) -> Any:
    """A search trial's score for the sweeper (Optuna & co.): the run's final average accuracy on the validation
    split, also for a trial already complete from an earlier launch. A failed trial returns its result dict,
    which the sweeper records as a failed trial."""
    if result.get("status") == "skipped":
        result = read_json(Path(run_dir) / RESULTS) or result
    if result.get("status") != "complete":
        return result
    return float(result[SEARCH_METRIC])


def sweep_report(sweep_dir: Path, started: float = 0.0, refused: list[dict] | None = None) -> tuple[str, int]:
    """The end-of-sweep summary of everything in `sweep_dir`: (text, number of failed runs, the jobs of this launch
    that were `refused` included)."""
    sweep_dir = Path(sweep_dir)
    runs = find_run_dirs(sweep_dir) if sweep_dir.is_dir() else []
    by_status: dict[str, list[Path]] = {"complete": [], "failed": [], "incomplete": []}
    for d in runs:
        by_status[run_status(d)].append(d)
    skipped = [d for d in by_status["complete"] if (d / RESULTS).stat().st_mtime < started]
    lines = [
        f"sweep {sweep_dir}: {len(runs)} run folder(s): {len(by_status['complete'])} complete "
        f"({len(skipped)} of them already complete before this launch, skipped), "
        f"{len(by_status['failed'])} failed, {len(by_status['incomplete'])} incomplete"
    ]
    for d in by_status["failed"]:
        info = read_json(d / FAILED) or {}
        lines.append(
            f"  FAILED {d.relative_to(sweep_dir)}: {info.get('error_type', '?')}: {info.get('error', '?')}"
            f"  (see {d / FAILED})"
        )
    for d in by_status["incomplete"]:
        lines.append(f"  INCOMPLETE {d.relative_to(sweep_dir)} (killed, still running, or from another launch)")
    for r in refused or []:
        lines.append(f"  REFUSED {r.get('overrides') or r.get('run_dir')}: {r.get('error')} (its folder untouched)")
    if by_status["failed"] or by_status["incomplete"] or refused:
        lines.append(f"  re-launch the same command with hydra.sweep.dir={sweep_dir} to run only these again")
    lines.append(f"  summary table: python -m cil report {sweep_dir}")
    return "\n".join(lines), len(by_status["failed"]) + len(refused or [])


class SweepSummary:
    """Hydra callback (conf/config.yaml `hydra.callbacks`): the sweep summary, exit status 1 on a failed run."""

    def __init__(self, fail_exit: bool = True):
        self.fail_exit = fail_exit
        self.started = 0.0

    def on_multirun_start(self, config, **kwargs) -> None:
        self.started = time.time()

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        refused = refusals(sweep_dir, self.started, os.getpid())
        text, n_failed = sweep_report(sweep_dir, self.started, [r for _, r in refused])
        for path, _ in refused:  # reported: the next launch starts without them
            path.unlink(missing_ok=True)
        print(text, flush=True)
        if n_failed and self.fail_exit:
            sys.exit(1)  # SystemExit passes Hydra's callback guard: the command itself reports the failure

    # Hydra calls every hook of a callback; the rest are no-ops.
    def on_run_start(self, config, **kwargs) -> None:
        pass

    def on_run_end(self, config, **kwargs) -> None:
        pass

    def on_job_start(self, config, **kwargs) -> None:
        pass

    def on_job_end(self, config, job_return=None, **kwargs) -> None:
        pass
