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

import errno
import fcntl
import logging
import os
import sys
import time
from pathlib import Path

from cil.errors import ConfigError, StorageError, os_error_text
from cil.runfolder import CHECKPOINT, METRICS, RESULTS, write_json_atomic

LOCK = ".cil.lock"
# What a run writes in its folder, and the kind each must be: a folder where a file belongs (or the reverse) is
# refused before the run changes anything.
FILES = (RESULTS, METRICS, CHECKPOINT, LOCK, "diagnostics.json")
FOLDERS = (".hydra", "tensorboard")


class UnwritableFolder(ConfigError):
    """The run folder exists but cannot be written (read-only): a complete run in it can still be returned."""


def folder_error(path: Path, err: OSError) -> ConfigError:
    """A run folder that cannot be made or locked (an existing file, under a file, read-only): the run never
    started, so this is a refused setting, named with its fix."""
    kind = UnwritableFolder if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ConfigError
    return kind(
        f"run folder {path} cannot be used: {os_error_text(err)} (hydra.run.dir; a sweep: hydra.sweep.dir; the "
        "API: out_dir)"
    )


class RunFolder:
    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock: int | None = None

    def __enter__(self) -> RunFolder:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise folder_error(self.path, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(
                f"run folder {self.path} is in use by another run (pid {holder}); wait for it to end, "
                "or choose another hydra.run.dir (a sweep: another hydra.sweep.dir)"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as err:  # a full disk: the lock holds, only the holder's pid is not recorded
            if err.errno not in (errno.ENOSPC, errno.EDQUOT):
                os.close(fd)
                raise folder_error(self.path, err) from None
        self._lock = fd
        return self

    def check_kinds(self) -> None:
        """Refuse a folder where a run's file is a folder (metrics.csv, checkpoint.pt, results.json) or its
        folder a file (.hydra), before the run changes anything: the run would fail half-way through."""
        for name, want_dir in [(n, False) for n in FILES] + [(n, True) for n in FOLDERS]:
            path = self.path / name
            if path.exists() and path.is_dir() != want_dir:
                what = "a folder" if path.is_dir() else "a file"
                raise ConfigError(
                    f"{path} is {what}, but a run keeps {'a folder' if want_dir else 'a file'} there; move it "
                    f"away (or choose another run folder), then run the same command again"
                )

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


class RunLogFile(logging.FileHandler):
    """The run's log file (Hydra's job log, conf/config.yaml): opened at the first record, and a record that
    cannot be written (a full disk, a read-only folder) is one warning line, once, instead of the logging
    module's traceback per record. The run goes on; its outcome is in results.json and on the terminal."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None, delay: bool = True) -> None:
        super().__init__(filename, mode, encoding, delay=True)
        self.warned = False

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:  # the first record opens the file (logging's own emit lets that error through)
            try:
                self.stream = self._open()
            except OSError:
                self.handleError(record)
                return
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if self.warned:
            return
        self.warned = True
        err = sys.exc_info()[1]
        why = os_error_text(err, Path(self.baseFilename)) if isinstance(err, OSError) else f"{self.baseFilename}: {err}"
        print(f"warning: cannot write the log file {why}; the log goes on to the terminal only", file=sys.stderr)
