"""Errors a user can cause (each message names the bad value and says what to do), and the pre-emption stop."""

import signal
from pathlib import Path

# sysexits.h EX_TEMPFAIL, "temporary failure, the user is invited to retry": the run was stopped by SIGTERM,
# wrote a checkpoint, and continues when started again with the same command and run folder.
EXIT_PREEMPTED = 75


class CilError(Exception):
    """Base class: anything the user can fix by changing input, config or files."""


class ConfigError(CilError, ValueError):
    """A config value is unknown, out of range, or impossible in combination with another."""


class DataError(CilError, RuntimeError):
    """A dataset file is missing, corrupt or unreadable."""


class TrainingError(CilError, RuntimeError):
    """Training cannot go on (for example the loss became NaN or infinite)."""


class Preempted(BaseException):
    """The run stopped on a signal after writing a checkpoint; starting it again continues it. A BaseException
    (like KeyboardInterrupt): it is a request to stop, so `except Exception` handlers (a sweep recording failed
    jobs and going on) must not catch it."""

    def __init__(self, step: int, path: Path | None, signum: int):
        self.step, self.path, self.signum = step, path, signum
        name = signal.Signals(signum).name
        if path is None:
            super().__init__(
                f"{name} received at stream batch {step}; this run cannot write a checkpoint "
                "(Avalanche's strategies keep state we cannot save): the same command starts it over "
                f"(exit code {EXIT_PREEMPTED}: pre-empted)"
            )
            return
        super().__init__(
            f"{name} received: checkpoint written at stream batch {step} to {path}; to resume, run "
            f"the same command again with hydra.run.dir={path.parent} (a sweep: with the same "
            f"hydra.sweep.dir) (exit code {EXIT_PREEMPTED}: pre-empted, resumable)"
        )


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """Raise ConfigError `key=value is not allowed: allowed` unless `ok` (config checks in one line each)."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


class StorageError(CilError, OSError):
    """A run's file could not be written (a full disk, a file-size limit, a read-only folder)."""

    def __init__(self, path: Path, err: OSError):
        self.path = path
        super().__init__(
            f"cannot write {path}: {err.strerror or err}; free space (or raise the file-size limit), "
            "then run the same command again: the last checkpoint written, if any, is kept"
        )
