"""What `cil gpu-check` and `cil gpu-queue` share: the report files, the environment, the step-time measurement,
the planner's model of runs sharing one GPU, and the pool of CLI runs that stop cleanly at a deadline.

The planner's model (measured on an H200, docs/gpu-check.md): k runs at once on one GPU each go at
min(1, GPU_SHARE / k) of one run's speed alone, so a set of runs sharing the GPU ends as `finish_times` computes;
a run is started only when it and every run already going still end before the deadline. At the deadline each
run still going gets SIGTERM: it checkpoints after the batch in flight and exits with EXIT_PREEMPTED (75),
resumable by the same command into the same folder.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from cil import __version__
from cil.runfolder import METRICS, write_json_atomic

GPU_SHARE = 2.5  # concurrent runs that together go as fast as GPU_SHARE runs alone (docs/gpu-check.md)
STARTUP_S = 25.0  # a run's start: Python, torch, CUDA, the cached dataset


# -- the report ---------------------------------------------------------------------------------------------------
class Report:
    """report.json (everything) and report.md (the same, readable), rewritten after every result."""

    def __init__(self, out: Path, title: str = "cil gpu-check"):
        self.out = out
        self.title = title
        self.data: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "sections": {}}

    def put(self, section: str, key: str, value: Any) -> None:
        self.data["sections"].setdefault(section, {})[key] = value
        self.write()

    def write(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        write_json_atomic(self.out / "report.json", self.data)
        (self.out / "report.md").write_text(render_markdown(self.data, self.title))


def render_markdown(data: dict, title: str = "cil gpu-check") -> str:
    lines = [f"# {title} ({data['started']}, last update {data.get('updated', '')})", ""]
    for section, entries in data["sections"].items():
        lines += [f"## {section}", ""]
        for key, value in entries.items():
            if isinstance(value, list) and value and isinstance(value[0], dict):
                cols = list(dict.fromkeys(c for row in value for c in row))  # every row's columns, first seen first
                lines += [f"### {key}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
                lines += ["| " + " | ".join(_cell(row.get(c)) for c in cols) + " |" for row in value]
                lines.append("")
            else:
                lines.append(f"- **{key}**: {_cell(value)}")
        lines.append("")
    return "\n".join(lines)


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        return json.dumps(v)
    return "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")


def environment(dry_run: bool) -> dict:
    import torchvision

    env = {
        "cil": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda (torch build)": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpus": os.cpu_count(),
        "dry run": dry_run,
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(
            {
                "gpu": props.name,
                "gpu memory GiB": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count,
                "gpus": torch.cuda.device_count(),
            }
        )
    for module, dist in (("hydra", "hydra-core"), ("omegaconf", "omegaconf"), ("avalanche", "avalanche-lib")):
        try:  # the installed version, without importing the package (Avalanche takes seconds to import)
            env[module] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            env[module] = "not installed"
    return env


# -- a run's progress, from its folder ------------------------------------------------------------------------------
def last_step(run_dir: Path) -> int:
    """The stream batch of the last row of a run's metrics.csv (0 before the first); reads only the file's end."""
    try:
        with open(run_dir / METRICS, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - 4096))
            lines = f.read().decode(errors="replace").splitlines()
        return int(lines[-1].split(",")[0]) if len(lines) > 1 or (lines and size > 4096) else 0
    except (OSError, ValueError, IndexError):
        return 0


def task_end_accuracies(run_dir: Path) -> list[float]:
    """The average accuracy over the tasks seen, at each task end a run reached (from its metrics.csv)."""
    try:
        rows = [line.split(",") for line in (run_dir / METRICS).read_text().splitlines()[1:]]
    except OSError:
        return []
    return [round(float(r[3]), 2) for r in rows if len(r) == 4 and r[2] == "avg_acc_seen"]


# -- step times -----------------------------------------------------------------------------------------------------
def seconds_per_step(res: dict, batch_size: int) -> float:
    """Training seconds per stream batch of a cil.run.bench.contestants.run_ours result."""
    return float(res["train_time_s"]) / (res["samples"] / batch_size)


def measure_step_time(cfg, dataset, batches_per_task: int) -> dict[str, float]:
    """One process alone: seconds per training step of `cfg` (its first `batches_per_task` batches of every task)
    and the seconds its task-end evaluations took (the whole test set of the classes seen, as in a whole run)."""
    from cil.run.bench.contestants import run_ours

    res = run_ours(cfg, dataset, batches_per_task)
    return {"s/step": seconds_per_step(res, cfg.stream.batch_size), "eval s": float(res["eval_time_s"])}


# -- the planner ----------------------------------------------------------------------------------------------------
def finish_times(work: list[float], share: float = GPU_SHARE) -> list[float]:
    """Seconds from now until each run ends, when runs needing `work` seconds alone share the GPU from now on and
    k runs at once each go at min(1, share / k) of their speed alone."""
    order = sorted(range(len(work)), key=lambda i: work[i])
    out = [0.0] * len(work)
    t, done, k = 0.0, 0.0, len(work)
    for i in order:
        t += (max(work[i], done) - done) / min(1.0, share / k)
        done = max(work[i], done)
        out[i] = t
        k -= 1
    return out


def fits(running: list[float], candidate: float, time_left: float, share: float = GPU_SHARE) -> bool:
    """Whether a run needing `candidate` seconds alone, started beside runs needing `running` seconds alone, ends
    in `time_left` seconds with all of them."""
    return max(finish_times([*running, candidate], share), default=0.0) <= time_left


# -- runs through the command line ----------------------------------------------------------------------------------
def cli_command(overrides: list[str], run_dir: Path) -> list[str]:
    """`python -m cil <overrides>` into `run_dir` (quoted: a sweep's folder names hold `,` and `=`)."""
    quoted = str(run_dir).replace("\\", "\\\\").replace("'", "\\'")
    return [sys.executable, "-m", "cil", *overrides, f"hydra.run.dir='{quoted}'"]


@dataclass
class Launched:
    key: str
    run_dir: Path
    proc: subprocess.Popen
    started: float
    stderr: IO[bytes]
    info: dict = field(default_factory=dict)  # the caller's: estimates, the step it resumed from


@dataclass
class Ended:
    key: str
    run_dir: Path
    code: int
    seconds: float
    stderr_tail: str
    info: dict


class RunPool:
    """CLI runs as child processes sharing this machine. `stop` asks every run still going to checkpoint and exit
    (SIGTERM), then kills what has not exited in the grace time (its last checkpoint stays)."""

    def __init__(self, env: dict[str, str] | None = None):
        self.env = env
        self.running: dict[str, Launched] = {}

    def start(
        self, key: str, overrides: list[str], run_dir: Path, info: dict | None = None, command: list[str] | None = None
    ) -> Launched:
        """`python -m cil <overrides>` into `run_dir`, or `command` (whose progress `run_dir` shows)."""
        stderr = tempfile.TemporaryFile()  # noqa: SIM115 - the run writes it; closed when it ends
        argv = command or cli_command(overrides, run_dir)
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=stderr, env=self.env)
        launched = Launched(key, run_dir, proc, time.time(), stderr, info or {})
        self.running[key] = launched
        return launched

    def reap(self) -> list[Ended]:
        """The runs that have ended since the last call."""
        ended = []
        for key, run in list(self.running.items()):
            code = run.proc.poll()
            if code is None:
                continue
            del self.running[key]
            run.stderr.seek(0)
            tail = run.stderr.read()[-4000:].decode(errors="replace")
            run.stderr.close()
            ended.append(Ended(key, run.run_dir, code, time.time() - run.started, tail, run.info))
        return ended

    def stop(self, grace: float) -> None:
        for run in self.running.values():
            if run.proc.poll() is None:
                run.proc.send_signal(signal.SIGTERM)
        end = time.time() + grace
        for run in self.running.values():
            try:
                run.proc.wait(timeout=max(0.0, end - time.time()))
            except subprocess.TimeoutExpired:
                run.proc.kill()
                run.proc.wait()
