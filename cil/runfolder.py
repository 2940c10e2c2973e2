"""A run folder's files: their names, atomic writes, and what state a folder is in.

The bottom layer: the runner writes run folders with these helpers, the analysis reads them, and neither needs
the other (nor torch) for it.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

RESULTS = "results.json"
FAILED = "failed.json"
CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.csv"
SKIP_DIRS = {".hydra", ".submitit", ".cil-refused", "tensorboard", "wandb", "__pycache__"}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """`write(file)` into a temporary file in the same folder, fsync, then rename over `path`: a reader, or a
    run killed at any moment, sees the old file or the new one, never half of one."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; give it the permissions of a normal file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable (not possible on every file system)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """JSON through `atomic_write`: readers never see a half-written file."""
    atomic_write(Path(path), lambda f: f.write(json.dumps(data, indent=2).encode()))


def read_json(path: Path) -> dict[str, Any] | None:
    """The parsed file, or None when it is absent, unreadable (half-written by a killed job: not complete) or not
    a JSON object (a list, a number: not a file cil wrote)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def run_status(run_dir: Path) -> str:
    """`complete` (results.json with status complete), `failed` (failed.json from a sweep, or a results.json
    whose status says the run stopped on an error, e.g. a diverged loss), else `incomplete`."""
    res = read_json(Path(run_dir) / RESULTS)
    if res is not None and res.get("status") == "complete":
        return "complete"
    if (Path(run_dir) / FAILED).exists() or (res is not None and res.get("status") == "failed"):
        return "failed"
    return "incomplete"


def is_run_dir(path: Path) -> bool:
    path = Path(path)
    return (path / RESULTS).exists() or (path / FAILED).exists() or (path / ".hydra" / "config.yaml").exists()


def find_run_dirs(root: Path) -> list[Path]:
    """Every run folder at or below `root` (a run folder or a sweep folder), sorted."""
    found = []
    for dirpath, dirnames, _ in os.walk(Path(root)):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        if is_run_dir(Path(dirpath)):
            found.append(Path(dirpath))
    return found
