"""One run's folder while a run writes it: one writer at a time, and a results.json that never looks complete
unless it is.

- The lock is an exclusive `flock` on `.cil.lock` in the folder, held for the whole run. The operating system
  drops it when the process ends, however it ends (SIGKILL, a crashed node's process table), so a crashed run
  never leaves a folder locked; a second run into the same folder is refused at once, naming the holder.
- Before a run changes anything in the folder (cuts metrics.csv back, starts it over, writes a checkpoint), its
  results.json is replaced by one with status `running`, so a run killed at any later moment leaves a folder
  whose status says so, never an older `complete` next to newer, partial files.
"""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from cil.errors import ConfigError, StorageError
from cil.runfolder import RESULTS, write_json_atomic

LOCK = ".cil.lock"


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock: int | None = None

    def __enter__(self) -> RunFolder:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"run folder {self.path} is in use by another run (pid {holder}); wait for it to end, "
                "or choose another hydra.run.dir (a sweep: another hydra.sweep.dir)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._lock is not None:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            os.close(self._lock)
            self._lock = None

    def mark_running(self, config: dict) -> None:
        """results.json says `running` from here until the run writes its outcome."""
        self.write_results(
            {"status": "running", "config": config, "pid": os.getpid(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        )

    def write_results(self, results: dict) -> None:
        write(self.path / RESULTS, lambda p: write_json_atomic(p, results))


def write(path: Path, writer) -> None:
    """`writer(path)`; a full disk or a file-size limit becomes one StorageError naming the path."""
    try:
        writer(path)
    except OSError as err:
        raise StorageError(path, err) from None
