"""`cil gpu-queue` (`make gpu-queue`): the paper-scale runs of experiments/queue.yaml on one GPU, one budget at a time.

Each call reads the queue (runs in priority order; each a label, a table and the overrides of one job of that
table's sweep) and checks every run before anything starts: its keys, its config (composed from conf/ exactly as the
command line composes it) and, for the runs it may start, its data; a bad run is one error naming it (exit 2).
Then, within `--budget` seconds:

- a run whose folder holds the complete run of this very config is skipped (the command line's own check,
  cil.run.experiment.completed_results); one holding a complete run of other settings is reported and left alone;
- a run whose folder holds a checkpoint is resumed from it (the command line does this by itself);
- the step time of each kind of run is measured in this process (gpu_plan.measure_step_time, as gpu-check's speed
  section), in priority order and only as far as the budget can reach;
- runs start in priority order, several at once on the one GPU (`--max-parallel`), each only when the planner
  (gpu_plan: k runs at once each go at 2.5 / k of one run's speed) expects it and every run going to end before
  the budget. A run that cannot end in the budget even alone waits for a longer budget; with `--partial` it starts
  anyway, for machines whose run folders (and so checkpoints) persist until the next call;
- 30 s (Timing.stop_margin) before the budget ends every run still going gets SIGTERM: it checkpoints after the batch
  in flight and exits 75 (pre-empted; the next call resumes it). What has not exited END_MARGIN seconds before the
  end is killed (its last task-end checkpoint stays). The command returns at most END_MARGIN + EXIT_MARGIN seconds
  after that, so within the budget plus EXIT_MARGIN; SIGTERM or Ctrl-C to the queue itself stops it the same way.

report.json and report.md in `--out` are rewritten after every change: each run's outcome in this call (complete,
complete before this call, pre-empted at a stream batch, not started and why, failed and why), the step times and
the plan. `--pack FILE` writes the run folders this call completed, with what experiments/runs keeps in git, as one
tar.gz (what comes back from a lent machine). `--list` prints each run's state and runs nothing. `--dry-run`
rehearses it all on the CPU at toy size (digits instead of the CIFAR-sized datasets, a ResNet of width 4, a few
samples per class), into `<out>/runs`. docs/gpu-check.md, "The paper-scale queue", has the command for a lent GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import io
import json
import os
import re
import signal
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, cast

import torch
import yaml

from cil.errors import EXIT_PREEMPTED, CilError, ConfigError
from cil.run.checkpoint import config_differences
from cil.run.gpu_plan import (
    GPU_SHARE,
    STARTUP_S,
    Ended,
    Launched,
    Report,
    RunPool,
    environment,
    finish_times,
    fits,
    last_step,
    measure_step_time,
    task_end_accuracies,
)
from cil.runfolder import CHECKPOINT, FAILED, RESULTS, read_json, run_status
from cil.schema import RunConfig

REPO = Path(__file__).resolve().parents[2]
QUEUE = REPO / "experiments" / "queue.yaml"
RUNS = REPO / "experiments" / "runs"
RUN_KEYS = ("label", "table", "overrides")
TOP_KEYS = ("common", "runs")
SAFETY = 1.2  # estimates are measured step times times this
EXIT_MARGIN = 5.0  # seconds the report and the archive may take after the last run has ended
# The dry run: datasets that stand in for the GPU-sized ones, and the toy sizes.
SMALL_DATASETS = ("digits", "mnist", "fashion_mnist")
TOY_PER_CLASS = 6
# The report's columns, in this order.
COLUMNS = [
    "#",
    "run",
    "table",
    "status",
    "stream batch",
    "of",
    "final avg acc %",
    "why",
    "resumes from stream batch",
    "estimate s alone",
    "expected to end in this call",
    "wall s",
    "avg acc after each task %",
    "note",
    "folder",
]
# What experiments/runs keeps in git (experiments/runs/.gitignore): the archive leaves the rest out.
LEFT_OUT = re.compile(r"(^|/)(\.cil\.lock|.*\.pt|.*\.log|.*\.tmp|tensorboard|wandb|\.submitit|summary\.(md|csv))(/|$)")


@dataclasses.dataclass
class Timing:
    """The call's margins: the real ones, or short ones for the dry run's toy runs."""

    stop_margin: float  # SIGTERM this long before the budget ends
    end_margin: float  # kill what is still going this long before it ends
    startup: float  # a run's start-up (Python, torch, CUDA, the data)
    measure_batches: int  # batches per task of a step-time measurement
    measure_max: float  # no measurement starts with less than this left before the stop

    @classmethod
    def for_run(cls, dry_run: bool) -> Timing:
        return cls(4.0, 1.0, 6.0, 1, 5.0) if dry_run else cls(30.0, 5.0, STARTUP_S, 6, 60.0)


@dataclasses.dataclass
class Entry:
    """One run of the queue, with what this call knows and did about it."""

    index: int  # 1-based position in the queue
    label: str
    table: str
    overrides: list[str]  # common + the run's (the dry run: with the toy sizes)
    kind: str = ""  # the overrides without seed and memory: runs of one kind share a step-time measurement
    run_dir: Path = Path()
    cfg: Any = None  # the typed RunConfig
    resolved: dict = dataclasses.field(default_factory=dict)
    state: str = "new"  # complete | blocked | resume | retry | new (what the folder held at the start)
    steps: int = 0  # stream batches of the whole run
    start_step: int = 0  # the batch it resumes from
    row: dict = dataclasses.field(default_factory=dict)

    def where(self, queue: Path) -> str:
        return f"{queue}, run {self.index} ({self.label!r})"


# -- reading and checking the queue ----------------------------------------------------------------------------
def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def read_queue(path: Path, only: set[str] | None = None) -> list[Entry]:
    """The queue's runs in order (those of the tables in `only`, when given); ConfigError naming the file and the
    run for anything that is not a run."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the queue {path}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ConfigError(f"{path}: expected a mapping with a list `runs` (and optionally `common`)")
    if extra := sorted(set(data) - set(TOP_KEYS)):
        raise ConfigError(f"{path}: unknown key(s) {extra}; a queue has {', '.join(TOP_KEYS)}")
    common = data.get("common") or []
    if not isinstance(common, list) or not all(isinstance(o, str) for o in common):
        raise ConfigError(f"{path}: `common` must be a list of overrides (strings)")
    entries, labels = [], set()
    for i, run in enumerate(data["runs"], 1):
        name = f"{path}, run {i}" + (f" ({run.get('label')!r})" if isinstance(run, dict) and run.get("label") else "")
        if not isinstance(run, dict):
            raise ConfigError(f"{name}: expected a mapping with {', '.join(RUN_KEYS)}, got {run!r}")
        if extra := sorted(set(run) - set(RUN_KEYS)):
            raise ConfigError(f"{name}: unknown key(s) {extra}; a run has {', '.join(RUN_KEYS)}")
        if missing := [k for k in RUN_KEYS if k not in run]:
            raise ConfigError(f"{name}: missing {', '.join(missing)}")
        label, table, overrides = str(run["label"]), run["table"], run["overrides"]
        if label in labels:
            raise ConfigError(f"{name}: the label is used twice; labels name runs in the report")
        labels.add(label)
        if not isinstance(table, str) or not re.fullmatch(r"[A-Za-z0-9_.-]+", table) or table.startswith("."):
            raise ConfigError(f"{name}: table {table!r} must be a folder name (the table of experiments/tables.yaml)")
        if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
            raise ConfigError(f"{name}: overrides must be a list of strings (Hydra overrides)")
        for o in [*common, *overrides]:
            if _key(o).startswith(("hydra.", "hydra/")):
                raise ConfigError(f"{name}: {o!r}: the queue sets hydra's run folder itself (experiments/runs/<table>)")
            if _key(o) == "dataset.root":
                raise ConfigError(
                    f"{name}: {o!r}: the data root is the machine's (--data-root or CIL_DATA_ROOT), not a run's, so a "
                    "recorded config is the same wherever it ran"
                )
        if only is None or table in only:
            entries.append(Entry(i, label, table, [*common, *overrides]))
    if only and (unknown := only - {e.table for e in entries}):
        raise ConfigError(f"{path}: --only names table(s) without runs in the queue: {', '.join(sorted(unknown))}")
    return entries


VARIES = ("seed", "buffer.size")  # runs that differ only in these share one composition (Composer)


class Composer:
    """Configs composed from conf/ exactly as the command line composes them, checked the same way, and the folder
    name a sweep gives each (Hydra's override_dirname, through cil.run.sweep.run_dirname). Hydra takes about 0.2 s a
    composition, so runs that differ only in their seed and memory (plain `seed=N`, `buffer.size=N`) are composed
    once: the others take that config with their own two values (no config in conf/ refers to either) and their
    folder name by Hydra's rule (sorted overrides, its excluded keys), which the first composition checks."""

    def __init__(self, queue: Path):
        from hydra.core.override_parser.overrides_parser import OverridesParser

        self.queue = queue
        self.parser = OverridesParser.create()
        self.done: dict[tuple, tuple[RunConfig, dict]] = {}
        self.rule: tuple[list[str], str, str] | None = None  # exclude_keys, item_sep, kv_sep
        self.shortcut = True  # off if Hydra's name ever differs from ours

    def __call__(self, e: Entry, overrides: list[str]) -> tuple[RunConfig, dict, str]:
        from hydra.errors import HydraException

        from cil.run.config import validate
        from cil.run.config_errors import describe
        from cil.run.sweep import run_dirname

        try:
            parsed = self.parser.parse_overrides(overrides)
            values: dict[str, int] = {
                o.key_or_group: cast(int, o.value())
                for o in parsed
                if o.key_or_group in VARIES and o.type.name == "CHANGE" and type(o.value()) is int
            }
            base = tuple(o for o, p in zip(overrides, parsed, strict=True) if p.key_or_group not in values)
            key = (base, tuple(sorted(values)))
            if self.shortcut and self.rule is not None and key in self.done:
                cfg0, resolved0 = self.done[key]
                cfg = dataclasses.replace(cfg0, seed=values.get("seed", cfg0.seed))
                cfg.buffer = dataclasses.replace(cfg0.buffer, size=values.get("buffer.size", cfg0.buffer.size))
                validate(cfg)
                resolved = copy.deepcopy(resolved0)
                resolved["seed"], resolved["buffer"]["size"] = cfg.seed, cfg.buffer.size
                return cfg, resolved, run_dirname(self.dirname(parsed))
            cfg, resolved, name = self.compose(overrides)
            if self.rule is not None and run_dirname(self.dirname(parsed)) != name:
                self.shortcut = False  # Hydra names folders otherwise than we thought: compose every run
            self.done[key] = (cfg, resolved)
            return cfg, resolved, name
        except HydraException as err:  # an override that does not parse
            raise ConfigError(f"{e.where(self.queue)}: {describe(err)}") from None
        except CilError as err:
            raise ConfigError(f"{e.where(self.queue)}: {err}") from None

    def dirname(self, parsed: list) -> str:
        assert self.rule is not None
        exclude, item_sep, kv_sep = self.rule
        lines = sorted(o.input_line for o in parsed if o.key_or_group not in exclude)
        return re.sub("[=]", kv_sep, item_sep.join(lines))

    def compose(self, overrides: list[str]) -> tuple[RunConfig, dict, str]:
        from hydra import compose
        from hydra.errors import HydraException
        from omegaconf import OmegaConf, open_dict
        from omegaconf.errors import OmegaConfBaseException

        from cil.run.config import validate
        from cil.run.config_errors import describe, unknown_keys
        from cil.run.sweep import run_dirname

        try:
            dcfg = compose(config_name="config", overrides=overrides, return_hydra_config=True)
        except (HydraException, OmegaConfBaseException) as err:
            raise ConfigError(describe(err)) from None
        rule = dcfg.hydra.job.config.override_dirname
        self.rule = (list(rule.exclude_keys), str(rule.item_sep), str(rule.kv_sep))
        name = run_dirname(str(dcfg.hydra.job.override_dirname))
        with open_dict(dcfg):
            del dcfg["hydra"]
        try:
            unknown_keys(dcfg)
            cfg = cast(RunConfig, OmegaConf.to_object(dcfg))  # typed as any container; the schema makes it one
        except OmegaConfBaseException as err:
            raise ConfigError(describe(err)) from None
        validate(cfg)
        return cfg, cast(dict, OmegaConf.to_container(dcfg, resolve=True)), name


def compose_entries(entries: list[Entry], queue: Path, runs_root: Path, dry_run: bool) -> None:
    """Each run's config (Composer), its folder (named as its table's sweep names it) and, for the dry run, its
    toy-sized config in the same folder."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from cil.run.hydra_conf import CONF_DIR, register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    folders: dict[Path, Entry] = {}
    composer = Composer(queue)
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            for e in entries:
                e.cfg, e.resolved, name = composer(e, e.overrides)
                e.run_dir = runs_root / e.table / name
                if e.run_dir in folders:
                    raise ConfigError(
                        f"{e.where(queue)}: the same run folder as run {folders[e.run_dir].index} "
                        f"({folders[e.run_dir].label!r}): {e.run_dir}"
                    )
                folders[e.run_dir] = e
                if dry_run:
                    e.overrides = toy_overrides(e.overrides, e.cfg)
                    e.cfg, e.resolved, _ = composer(e, e.overrides)
                e.kind = " ".join(o for o in e.overrides if _key(o) not in VARIES)
    finally:
        GlobalHydra.instance().clear()


def toy_overrides(overrides: list[str], cfg: Any) -> list[str]:
    """The dry run's version of a run: on the CPU in fp32, digits instead of a GPU-sized dataset, a few samples
    per class (unless a small dataset's run sets its own), ResNets of width 4 (with projection heads to match)."""
    toy = {"device": "cpu", "precision": "fp32"}
    small = cfg.dataset.name in SMALL_DATASETS
    if not small:
        toy["dataset"] = "digits"
    if not small or cfg.stream.samples_per_class is None:
        toy["stream.samples_per_class"] = str(TOY_PER_CLASS)
    if "resnet" in cfg.model.name:
        toy["model.nf"] = "4"
    if hasattr(cfg.method, "proj_dim"):  # OCM, OnPro: the toy ResNet has 32 features
        toy["method.proj_dim"] = "16"
    return [o for o in overrides if _key(o) not in toy] + [f"{k}={v}" for k, v in toy.items()]


def folder_state(e: Entry) -> None:
    """What the run's folder holds: the complete run of this config (the command line's own check), a complete run
    or a checkpoint of other settings (blocked), a checkpoint to resume, a failed attempt, or nothing yet."""
    from cil.run.experiment import completed_results

    try:
        done = completed_results(e.run_dir, e.cfg, e.resolved)
    except ConfigError as err:
        e.state, e.row["note"] = "blocked", str(err)
        return
    if done is not None:
        e.state = "complete"
        e.row |= {"final avg acc %": round(done["final_avg_acc"], 2)}
        return
    res = read_json(e.run_dir / RESULTS) or {}
    if (e.run_dir / CHECKPOINT).exists():
        diff = config_differences(res["config"], e.resolved) if isinstance(res.get("config"), dict) else []
        if diff:
            e.state, e.row["note"] = "blocked", f"its checkpoint is of other settings ({'; '.join(diff[:3])})"
            return
        e.state, e.start_step = "resume", int(res.get("step") or 0)
    elif run_status(e.run_dir) == "failed":
        error = res.get("error") or (read_json(e.run_dir / FAILED) or {}).get("error", "")
        e.state, e.row["note"] = "retry", f"failed before: {str(error)[:200]}"


# -- the plan -------------------------------------------------------------------------------------------------------
class Planner:
    """Step times per kind of run, and how long each run needs alone (gpu_plan's model of a shared GPU)."""

    def __init__(self, timing: Timing, datasets: dict[tuple, Any]):
        self.timing = timing
        self.datasets = datasets
        self.times: dict[str, dict[str, Any]] = {}  # kind -> {"s/step", "eval s", "runs beside"} or {"error"}
        # (kind, runs): one step of that many runs packed, and one run's task-end evaluations; or {"error"}
        self.pack_times: dict[tuple[str, int], dict[str, Any]] = {}
        self.warm = False

    def dataset(self, e: Entry) -> Any:
        return self.datasets[dataset_key(e.cfg)]

    def measure(self, e: Entry, beside: int) -> None:
        if e.kind in self.times:
            return
        cfg = dataclasses.replace(e.cfg, log=dataclasses.replace(e.cfg.log, progress=False))
        try:
            if not self.warm and cfg.device != "cpu":  # the CUDA context and kernels: untimed
                with contextlib.redirect_stdout(io.StringIO()):
                    measure_step_time(cfg, self.dataset(e), 1)
            self.warm = True
            with contextlib.redirect_stdout(io.StringIO()):  # the learner prints its task ends
                m: dict[str, Any] = measure_step_time(cfg, self.dataset(e), self.timing.measure_batches)
            m["runs beside"] = beside
        except Exception as err:  # noqa: BLE001 - the run would fail the same way: reported, the others go on
            m = {"error": f"{type(err).__name__}: {err}"}
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.times[e.kind] = m

    def measure_pack(self, e: Entry, runs: int, beside: int) -> dict[str, Any]:
        """The step time of `runs` runs of e's kind packed (cil.run.bench.contestants.run_packed: seeds seed..,
        the first batches of every task), or {"error"}: what stops them from being packed."""
        key = (e.kind, runs)
        if key in self.pack_times:
            return self.pack_times[key]
        from cil.run.bench.contestants import run_packed

        cfg = dataclasses.replace(e.cfg, log=dataclasses.replace(e.cfg.log, progress=False))
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                if cfg.device != "cpu":  # this pack's shapes: compiled kernels and the allocator's blocks, untimed
                    run_packed(cfg, self.dataset(e), 1, runs)
                res = run_packed(cfg, self.dataset(e), self.timing.measure_batches, runs)
            steps = res["samples"] / runs / cfg.stream.batch_size
            m: dict[str, Any] = {"s/step": res["train_time_s"] / steps, "eval s": res["eval_time_s"] / runs}
            m["runs beside"] = beside
        except Exception as err:  # noqa: BLE001 - not packable (or failing): the runs go alone, as before
            m = {"error": f"{type(err).__name__}: {err}"}
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self.pack_times[key] = m
        return m

    def pack_alone(self, group: list[Entry], from_step: int | None = None, started: float | None = None) -> float:
        """Seconds a pack of `group` needs on the GPU alone from stream batch `from_step`: its runs step together,
        so the longest of them sets the training; each run does its own evaluations."""
        m = self.pack_times[(group[0].kind, len(group))]
        startup = self.timing.startup
        if started is not None:
            startup = max(0.0, startup - (time.time() - started)) if from_step is None else 0.0
        train = evals = 0.0
        for e in group:
            step = e.start_step if from_step is None else max(from_step, e.start_step)
            left = max(0, e.steps - step) / max(1, e.steps)
            train = max(train, e.steps * left * m["s/step"])
            evals += left * eval_seconds(e.cfg, e.steps, self.dataset(e), m["eval s"])
        return startup + SAFETY * (train + evals)

    def alone(self, e: Entry, from_step: int | None = None, started: float | None = None) -> float:
        """Seconds the run needs alone from stream batch `from_step` (default: where it starts), start-up
        included (what is left of it when it started at time `started`)."""
        m = self.times[e.kind]
        step = e.start_step if from_step is None else max(from_step, e.start_step)
        left = max(0, e.steps - step) / max(1, e.steps)
        startup = self.timing.startup
        if started is not None:
            startup = max(0.0, startup - (time.time() - started)) if step <= e.start_step else 0.0
        train = (e.steps * left) * m["s/step"]
        return startup + SAFETY * (train + left * eval_seconds(e.cfg, e.steps, self.dataset(e), m["eval s"]))


def dataset_key(cfg: Any) -> tuple:
    d = cfg.dataset
    return (d.name, d.root, d.path, d.image_size, cfg.eval.split, cfg.eval.validation_fraction)


def eval_seconds(cfg: Any, steps: int, dataset: Any, task_ends_s: float) -> float:
    """A whole run's evaluations from what its five (n_tasks) task-end evaluations took: the anytime subsamples
    every eval.anytime_every batches and, on a blurry stream, the seen classes' test images every
    anytime_every_samples samples, at the same cost per image."""
    from cil.run.experiment import anytime_every_samples

    n_test, n_tasks = len(dataset.test_y), cfg.stream.n_tasks
    task_end_images = n_test * (n_tasks + 1) / 2  # the classes seen grow task by task
    images = task_end_images
    if cfg.eval.anytime_every > 0:
        images += steps // cfg.eval.anytime_every * min(cfg.eval.anytime_samples, n_test)
    every = anytime_every_samples(cfg)
    if every > 0:
        images += steps * cfg.stream.batch_size // every * 0.6 * n_test
    return task_ends_s * images / max(1.0, task_end_images)


# -- the call -------------------------------------------------------------------------------------------------------
class Queue:
    def __init__(self, args: argparse.Namespace, entries: list[Entry], report: Report, timing: Timing, start: float):
        self.args, self.entries, self.report, self.timing = args, entries, report, timing
        self.start = start
        self.deadline = start + args.budget  # the budget counts from the command's start
        self.stop_at = self.deadline - timing.stop_margin
        self.stop_signal: int | None = None  # SIGTERM or SIGINT to the queue itself
        self.completed: list[Entry] = []
        self.planner: Planner | None = None
        self.unpackable: dict[str, str] = {}  # kind -> why its runs go alone
        self.requeue: list[Entry] = []  # runs of a pack that failed as a whole: they go again, alone
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", "1")  # each run one intra-op thread: many runs share the host's cores
        if not args.dry_run:  # fewer cached-but-unused blocks per process: more runs fit beside each other
            env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        self.pool = RunPool(env)

    def publish(self) -> None:
        rows = [
            {"#": e.index, "run": e.label, "table": e.table, **e.row, "folder": str(e.run_dir)} for e in self.entries
        ]
        cols = sorted({k for row in rows for k in row}, key=lambda k: (COLUMNS.index(k) if k in COLUMNS else 99, k))
        self.report.put("runs", "in priority order", [{k: row.get(k) for k in cols} for row in rows])

    def set(self, e: Entry, **values: Any) -> None:
        e.row |= values
        self.publish()

    def stopping(self) -> bool:
        return self.stop_signal is not None or time.time() >= self.stop_at

    def run(self, datasets: dict[tuple, Any]) -> int:
        self.planner = Planner(self.timing, datasets)
        for e in self.entries:
            status = {"complete": "complete (before this call)", "blocked": "blocked"}.get(e.state, "queued")
            resumes = {"resumes from stream batch": e.start_step} if e.state == "resume" else {}
            e.row = {"status": status, **resumes, **e.row}
        pending = [e for e in self.entries if e.state not in ("complete", "blocked")]
        self.publish()
        self.measure_ahead(pending)
        checked = 0.0
        while (pending or self.pool.running) and not self.stopping():
            ended = self.pool.reap()
            for run in ended:
                self.ended(run)
            if self.requeue:
                pending = sorted([*pending, *self.requeue], key=lambda e: e.index)
                self.requeue.clear()
            # what fits changes when a run ends, and slowly as runs go faster or slower than estimated
            if ended or time.time() - checked > 5.0:
                checked = time.time()
                if not self.admit(pending) and not self.pool.running:
                    break  # nothing going and nothing that fits: the rest waits for another call
            time.sleep(0.2 if self.args.dry_run else 0.5)
        grace = min(self.deadline - self.timing.end_margin, time.time() + self.timing.stop_margin) - time.time()
        self.pool.stop(grace=max(0.0, grace))
        for run in self.pool.reap():
            self.ended(run)
        why = (
            f"the queue was stopped ({signal.Signals(self.stop_signal).name})"
            if self.stop_signal is not None
            else "out of time"
        )
        for e in pending:
            if e.row["status"] == "queued":
                self.set(e, status="not started", why=why)
        return self.finish()

    def measure_ahead(self, pending: list[Entry]) -> None:
        """Step times of the kinds the budget can reach, in priority order, before any run shares the GPU."""
        assert self.planner is not None
        capacity = (self.stop_at - time.time()) * GPU_SHARE
        for e in pending:
            if capacity <= 0 or self.stopping() or self.stop_at - time.time() < self.timing.measure_max:
                break
            self.planner.measure(e, beside=0)
            self.report_times()
            if "error" not in self.planner.times[e.kind]:
                capacity -= self.planner.alone(e)

    def report_times(self) -> None:
        assert self.planner is not None
        measured: list[tuple[str, object, dict[str, Any]]] = [
            (kind, sum(e.kind == kind for e in self.entries), m) for kind, m in self.planner.times.items()
        ]
        measured += [(kind, f"{k} packed", m) for (kind, k), m in self.planner.pack_times.items()]
        rows = []
        for kind, runs, m in measured:
            if "error" in m:
                rows.append({"kind": kind, "runs": runs, "error": m["error"]})
            else:
                rows.append(
                    {
                        "kind": kind,
                        "runs": runs,
                        "ms/step": round(1e3 * m["s/step"], 2),
                        "task-end evaluations s": round(m["eval s"], 2),
                        "measured beside": f"{m['runs beside']} run(s)" if m["runs beside"] else "alone",
                    }
                )
        self.report.put("step times", "one process, this call's measurements (gpu_plan.measure_step_time)", rows)

    def still_needs(self, run: Launched) -> float:
        assert self.planner is not None
        if "entries" in run.info:
            return self.planner.pack_alone(run.info["entries"], last_step(run.run_dir), started=run.started)
        e: Entry = run.info["entry"]
        return self.planner.alone(e, from_step=last_step(run.run_dir), started=run.started)

    def runs_going(self) -> int:
        """Runs in training now: a pack's each count (--max-parallel bounds runs, for the GPU's memory)."""
        return sum(len(r.info.get("entries", [r])) for r in self.pool.running.values())

    def pack_group(self, e: Entry, pending: list[Entry]) -> list[Entry]:
        """e and the next pending runs of its kind (they differ in seed and memory only), up to --runs-per-pack."""
        if self.args.runs_per_pack <= 1 or e.kind in self.unpackable:
            return [e]
        same = [x for x in pending if x is not e and x.kind == e.kind]
        return [e, *same[: self.args.runs_per_pack - 1]]

    def admit_pack(self, group: list[Entry], going: list[float]) -> float | None:
        """Start `group` as one pack if it can be packed and fits; returns what it needs alone, else None."""
        assert self.planner is not None
        m = self.planner.measure_pack(group[0], len(group), beside=len(self.pool.running))
        self.report_times()
        if "error" in m:
            self.unpackable[group[0].kind] = m["error"]
            return None
        need = self.planner.pack_alone(group)
        left = self.stop_at - time.time()
        partial = not fits(going, need, left)
        if partial and not (self.args.partial and not going):
            return None  # its first run is weighed alone instead
        self.start_pack(group, need, partial)
        return need

    def start_pack(self, group: list[Entry], need: float, partial: bool) -> None:
        folder = self.args.out / "packs"
        folder.mkdir(parents=True, exist_ok=True)
        spec = folder / f"pack-{group[0].index}.json"
        runs = [{"overrides": e.overrides, "run_dir": str(e.run_dir)} for e in group]
        spec.write_text(json.dumps({"runs": runs}, indent=1))
        command = [sys.executable, "-m", "cil.run.queue_pack", str(spec)]
        key = "pack " + ", ".join(str(e.index) for e in group)
        self.pool.start(key, [], group[0].run_dir, {"entries": group}, command=command)
        for e in group:
            self.set(
                e,
                status="running",
                why="",
                note=f"packed with runs {', '.join(str(x.index) for x in group if x is not e)} ({spec.name})",
                **{"estimate s alone": round(need), "expected to end in this call": not partial},
            )

    def admit(self, pending: list[Entry]) -> bool:
        """Start what fits, in priority order; True when something started."""
        assert self.planner is not None
        started = False
        going = [self.still_needs(r) for r in self.pool.running.values()]
        for e in list(pending):
            slots = self.args.max_parallel - self.runs_going()  # a pack's runs count one by one (its memory)
            if slots <= 0 or self.stopping():
                break
            if e not in pending:  # started in a pack with an earlier run
                continue
            left = self.stop_at - time.time()
            if e.kind not in self.planner.times:
                if left < self.timing.measure_max:
                    self.set(e, status="not started", why="out of time before its step time could be measured")
                    continue
                self.planner.measure(e, beside=len(self.pool.running))
                self.report_times()
                left = self.stop_at - time.time()
            m = self.planner.times[e.kind]
            if "error" in m:
                pending.remove(e)
                self.set(e, status="failed", why=f"could not be built to measure its step time: {m['error']}")
                continue
            group = self.pack_group(e, pending)[:slots]
            if len(group) > 1:
                packed = self.admit_pack(group, going)
                if packed is not None:
                    for x in group:
                        pending.remove(x)
                    going.append(packed)
                    started = True
                    continue
            need = self.planner.alone(e)
            if fits(going, need, left):
                ok, partial = True, False
            elif self.args.partial and not going:
                ok, partial = True, True  # alone on the GPU: it makes progress and the next call goes on
            elif self.args.partial:
                ends = finish_times([*going, need])  # started only if it delays no run that would end in time
                alone_ends = finish_times(going)
                ok = all(new <= left or old > left for new, old in zip(ends[:-1], alone_ends, strict=True))
                partial = True
            else:
                ok, partial = False, False
            if not ok:
                why = (
                    f"longer than this call's budget: needs ~{need:.0f} s alone, {left:.0f} s were left "
                    "(--partial starts it where run folders persist until the next call)"
                    if need > left
                    else f"out of time: needs ~{need:.0f} s alone, {left:.0f} s left beside {len(going)} run(s)"
                )
                self.set(e, status="not started", why=why)
                continue
            pending.remove(e)
            self.pool.start(e.label, e.overrides, e.run_dir, {"entry": e})
            going.append(need)
            self.set(
                e,
                status="running",
                why="",
                **{"estimate s alone": round(need), "expected to end in this call": not partial},
            )
            started = True
        return started

    def ended(self, ended: Ended) -> None:
        entries: list[Entry] | None = ended.info.get("entries")
        if entries is None:
            self.ended_run(ended.info["entry"], ended)
            return
        for e in entries:
            self.ended_run(e, ended)
        if ended.code not in (0, EXIT_PREEMPTED) and all(e.row["status"] == "failed" for e in entries):
            # the pack itself failed (every run of it): its kind goes alone from now on, these runs again
            tail = [ln for ln in ended.stderr_tail.splitlines() if ln.strip()][-1:]
            why = f"exit {ended.code}: {' / '.join(tail)}"
            self.unpackable[entries[0].kind] = f"a pack of it failed ({why})"
            for e in entries:
                self.set(e, status="queued", why="", note=f"its pack failed ({why}): it runs alone")
            self.requeue.extend(entries)

    def ended_run(self, e: Entry, ended: Ended) -> None:
        res = read_json(e.run_dir / RESULTS) or {}
        status = res.get("status")
        row: dict[str, Any] = {"wall s": round(ended.seconds, 1)}
        if ended.code == 0 and status == "complete":
            self.completed.append(e)
            row |= {"status": "complete", "final avg acc %": round(res["final_avg_acc"], 2)}
        elif status == "preempted" and (e.run_dir / CHECKPOINT).exists():
            row |= {
                "status": "pre-empted",
                "stream batch": res.get("step"),
                "of": res.get("stream_batches"),
                "avg acc after each task %": task_end_accuracies(e.run_dir),
                "why": f"SIGTERM {'to the queue' if self.stop_signal is not None else 'at the end of the budget'} "
                f"(exit {ended.code}); its checkpoint is in its folder: the next call resumes it",
            }
        elif ended.code < 0:  # killed at the end: the last task-end checkpoint, if any, stays
            kept = (e.run_dir / CHECKPOINT).exists()
            row |= {
                "status": "pre-empted" if kept else "not finished",
                "why": f"killed at the end ({signal.Signals(-ended.code).name}); "
                + ("its last task-end checkpoint is kept" if kept else "no checkpoint: it starts over next time"),
            }
        else:
            error = res.get("error") or (read_json(e.run_dir / FAILED) or {}).get("error")
            tail = [ln for ln in ended.stderr_tail.splitlines() if ln.strip()][-3:]
            row |= {"status": "failed", "why": f"exit {ended.code}: {error or ' / '.join(tail)}"}
        self.set(e, **row)

    def finish(self) -> int:
        counts: dict[str, int] = {}
        for e in self.entries:
            status = e.row.get("status", "")
            counts[status] = counts.get(status, 0) + 1
        self.report.put("queue", "outcome", counts)
        if self.args.pack:
            n = pack(self.args.pack, self.args.runs_root, [e.run_dir for e in self.completed])
            self.report.put("queue", "archive", f"{self.args.pack}: {n} run folder(s) completed in this call")
        self.report.put("queue", "wall s", round(time.time() - self.start, 1))
        if self.stop_signal is not None:
            return EXIT_PREEMPTED
        return 1 if counts.get("failed") or counts.get("blocked") else 0


def stream_len(e: Entry, dataset: Any) -> None:
    """The run's stream batches (its stream, built as the run builds it)."""
    from cil.run.experiment import build_stream

    e.steps = len(build_stream(e.cfg, dataset))


def pack(path: Path, runs_root: Path, run_dirs: list[Path]) -> int:
    """The run folders as one tar.gz, paths relative to `runs_root`, with what experiments/runs keeps in git."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for d in run_dirs:
            for f in sorted(d.rglob("*")):
                rel = f.relative_to(d).as_posix()
                if f.is_file() and not LEFT_OUT.search(rel) and rel != ".hydra/hydra.yaml":
                    tar.add(f, arcname=f.relative_to(runs_root).as_posix())
    return len(run_dirs)


def load_datasets(entries: list[Entry], queue: Path) -> dict[tuple, Any]:
    """The data of the runs that may start, each dataset once; a missing one is an error naming the first run that
    needs it."""
    from cil.run.experiment import load_run_dataset

    datasets: dict[tuple, Any] = {}
    for e in entries:
        key = dataset_key(e.cfg)
        if key not in datasets:
            try:
                datasets[key] = load_run_dataset(e.cfg)
            except CilError as err:
                raise ConfigError(f"{e.where(queue)}: dataset {e.cfg.dataset.name}: {err}") from None
        try:
            stream_len(e, datasets[key])
        except CilError as err:
            raise ConfigError(f"{e.where(queue)}: {err}") from None
    return datasets


def default_parallel(dry_run: bool) -> int:
    """Runs at once: 2 on the CPU; on a GPU one per 12 GiB of its memory (a whole-ResNet run peaked at 5.6 GB, its
    process holding about twice that), at most 10 (16 host cores, one busy core per run)."""
    if dry_run or not torch.cuda.is_available():
        return 2
    return max(1, min(10, int(torch.cuda.get_device_properties(0).total_memory / 2**30 // 12)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cil gpu-queue", description=__doc__.split("\n\n")[0])
    p.add_argument("--queue", type=Path, default=QUEUE, help="the queue (default experiments/queue.yaml)")
    p.add_argument("--only", default=None, help="comma-separated tables: only their runs")
    p.add_argument("--budget", type=float, default=540.0, help="seconds for the whole call (default 540)")
    p.add_argument(
        "--max-parallel",
        type=int,
        default=None,
        help="runs at once, a pack's runs each counted (default: 1 per 12 GiB of GPU, <= 10)",
    )
    p.add_argument("--dry-run", action="store_true", help="rehearse on the CPU at toy size, into <out>/runs")
    p.add_argument("--out", type=Path, default=None, help="report folder (default gpu-queue-<date>-<time>)")
    p.add_argument("--runs-root", type=Path, default=None, help="where tables' folders go (default experiments/runs)")
    p.add_argument("--data-root", default=os.environ.get("CIL_DATA_ROOT"), help="folder holding cifar10-jpeg/")
    p.add_argument("--partial", action="store_true", help="start runs that cannot end in this budget too")
    p.add_argument("--pack", type=Path, default=None, help="tar.gz of the run folders completed in this call")
    p.add_argument(
        "--runs-per-pack",
        type=int,
        default=1,
        help="runs of one kind (seeds, memories) trained together in one process (cil.core.packed); default 1",
    )
    p.add_argument("--list", action="store_true", help="print each run's state and folder; run nothing")
    args = p.parse_args(argv)
    if args.budget <= 0:
        p.error("--budget must be positive")
    if args.runs_per_pack < 1:
        p.error(f"--runs-per-pack must be at least 1, got {args.runs_per_pack}")
    if not (args.dry_run or args.list or torch.cuda.is_available()):
        print(
            "gpu-queue: no CUDA device here (torch.cuda.is_available() is False); --dry-run rehearses the queue "
            "on the CPU, --list shows its state",
            file=sys.stderr,
        )
        return 1
    start = time.time()
    args.out = args.out or Path(time.strftime("gpu-queue-%Y%m%d-%H%M%S"))
    args.runs_root = args.runs_root or (args.out / "runs" if args.dry_run else RUNS)
    args.max_parallel = args.max_parallel or default_parallel(args.dry_run)
    if args.data_root:
        os.environ["CIL_DATA_ROOT"] = str(args.data_root)  # this process's data and its runs'
    only = set(args.only.split(",")) if args.only else None
    stop: list[int] = []  # SIGTERM or Ctrl-C while the queue is read: it stops before anything runs
    previous = {
        s: signal.signal(s, lambda signum, _frame: stop.append(signum)) for s in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        return _call(args, only, start, stop)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _call(args: argparse.Namespace, only: set[str] | None, start: float, stop: list[int]) -> int:
    try:
        entries = read_queue(args.queue, only)
        compose_entries(entries, args.queue, args.runs_root, args.dry_run)
        for e in entries:
            folder_state(e)
        if args.list:
            for e in entries:
                extra = f" from stream batch {e.start_step}" if e.state == "resume" else ""
                print(f"{e.index:4d}. {e.label}: {e.state}{extra}  {e.run_dir}")
            return 0
        datasets = load_datasets([e for e in entries if e.state not in ("complete", "blocked")], args.queue)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if stop:
        return EXIT_PREEMPTED
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    report = Report(out, title="cil gpu-queue")
    timing = Timing.for_run(args.dry_run)
    report.put(
        "queue",
        "plan",
        {
            "queue": str(args.queue),
            "tables": sorted(only) if only else "all",
            "runs": len(entries),
            "budget s": args.budget,
            "ends by": f"the budget + {EXIT_MARGIN:.0f} s",
            "SIGTERM to the runs going, s before the end": timing.stop_margin,
            "max parallel": args.max_parallel,
            "GPU share (k runs at once each at share / k)": GPU_SHARE,
            "partial": args.partial,
            "runs per pack": args.runs_per_pack,
            "runs root": str(args.runs_root),
            "setup s (queue, configs, data)": round(time.time() - start, 1),
        },
    )
    report.put("environment", "versions", environment(args.dry_run))
    queue = Queue(args, entries, report, timing, start)

    def on_signal(signum: int, _frame: Any) -> None:
        queue.stop_signal = signum

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    code = queue.run(datasets)
    print(f"gpu-queue: report in {out / 'report.md'}")
    return code


if __name__ == "__main__":
    sys.exit(main())
