"""Errors a user can cause (each message names the bad value and says what to do), and the pre-emption stop."""

import errno
import signal
from pathlib import Path

# sysexits.h EX_TEMPFAIL, "temporary failure, the user is invited to retry": the run was stopped by SIGTERM,
# wrote a checkpoint, and continues when started again with the same command and run folder.
EXIT_PREEMPTED = 75
# 128 + SIGINT, what a shell reports for a command stopped by Ctrl-C: the run stopped as on SIGTERM (checkpoint
# written, resumable) but on the user's request.
EXIT_INTERRUPTED = 130


def stop_exit_code(signum: int) -> int:
    """The exit code of a run stopped by signal `signum`: 130 for Ctrl-C (SIGINT), else 75 (pre-empted)."""
    return EXIT_INTERRUPTED if signum == signal.SIGINT else EXIT_PREEMPTED


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

    def __init__(
        self,
        step: int,
        path: Path | None,
        signum: int,
        no_checkpoint: str = "this run cannot write a checkpoint (Avalanche's strategies keep state we cannot save)",
    ):
        self.step, self.path, self.signum = step, path, signum
        self.exit_code = stop_exit_code(signum)
        name = signal.Signals(signum).name
        why = "interrupted" if self.exit_code == EXIT_INTERRUPTED else "pre-empted"
        if path is None:
            super().__init__(
                f"{name} received at stream batch {step}; {no_checkpoint}: the same command starts it over "
                f"(exit code {self.exit_code}: {why})"
            )
            return
        super().__init__(
            f"{name} received: checkpoint written at stream batch {step} to {path}; to resume, run "
            f"the same command again with hydra.run.dir={path.parent} (a sweep: with the same "
            f"hydra.sweep.dir) (exit code {self.exit_code}: {why}, resumable)"
        )


def require(ok: bool, key: str, value: object, allowed: str) -> None:
    """Raise ConfigError `key=value is not allowed: allowed` unless `ok` (config checks in one line each)."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def path_fix(path: Path, err: OSError) -> str:
    """What to do about `err`, an operating-system error on `path` (a file or folder the user named or a run
    writes), in a few words."""
    code = err.errno
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free space (or raise the quota)"
    if code == errno.EFBIG:
        return "raise the file-size limit (ulimit -f)"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"make {Path(path).parent} writable (chmod u+w), or choose another folder"
    if code == errno.EISDIR:
        return f"{path} is a folder where a file belongs: move it away, or choose another folder"
    if code in (errno.ENOTDIR, errno.EEXIST):
        return f"{path} or a folder above it is a file where a folder belongs: move it away, or choose another path"
    if code == errno.ENOENT:
        return "check that the path (and the working directory) exists"
    return "check the path and the file system"


def os_error_text(err: OSError, path: Path | None = None) -> str:
    """One line for an operating-system error: the path, what went wrong, the fix."""
    path = Path(path if path is not None else err.filename or ".")
    return f"{path}: {err.strerror or err}; {path_fix(path, err)}"


class StorageError(CilError, OSError):
    """A run's file could not be written (a full disk, a file-size limit, a read-only folder)."""

    def __init__(self, path: Path, err: OSError):
        self.path = path
        super().__init__(
            f"cannot write {path}: {err.strerror or err}; {path_fix(path, err)}, then run the same command again: "
            "the last checkpoint written, if any, is kept"
        )
