"""Checkpoints: everything a run needs to continue exactly where it stopped, written atomically.

A checkpoint (`<run dir>/checkpoint.pt`) holds the model, the optimizer, the buffer, the method's state (seen
classes, GSA's gradient statistics, its augmentation generator, fp16's GradScaler state), the torch global RNG,
the learner's progress (stream position, accuracy matrix, anytime curve, the loss and online accuracy accumulated
since the last log read-back), the length of metrics.csv at that moment, and the run's config. It is written every
`checkpoint.every` stream batches and after each task's evaluation (`checkpoint.at_task_end`), to a temporary
file in the run folder that is then renamed over the old one: a kill at any moment leaves either the old or the
new checkpoint, never a half-written one. A checkpoint is only written when the loss so far and every weight
and optimizer tensor are finite, so the last checkpoint is always a good one.

Resuming rebuilds the run from its config (same seed, same construction order), loads the checkpoint over it,
cuts metrics.csv back to its length at the checkpoint and continues the stream at the saved position. Every
random choice comes from a generator held in the checkpoint, so on CPU the resumed run ends bit for bit where
an uninterrupted one would.

SIGTERM (what SLURM sends before pre-emption or at the time limit) asks the loop to stop after the batch in
flight: a checkpoint is written and the run exits with EXIT_PREEMPTED.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cil.errors import ConfigError, DataError, Preempted, TrainingError
from cil.run.config import default_config
from cil.run.folder import write
from cil.runfolder import CHECKPOINT, atomic_write
from cil.schema import RunConfig

if TYPE_CHECKING:
    from cil.core.learner import Learner

log = logging.getLogger("cil")

FORMAT_VERSION = 1
# Config keys that may change between a run and its resumption: they do not touch what the run computes.
# Signals that arrived before a run's loop took over (cil.run.cli's process-wide handler): the loop stops at its
# first batch. After the loop gives the handler back, further signals only land here and the process ends with
# its own exit code (75 when pre-empted) instead of dying on the default action.
PENDING_STOP: list[int] = []


# What `save` writes and `load` and `restore` read: a torch file without one of them is not a cil checkpoint.
CHECKPOINT_KEYS = (
    "format",
    "config",
    "model",
    "optimizer",
    "method",
    "buffer",
    "learner",
    "rng",
    "metrics_csv_bytes",
    "wall_time_s",
)


def note_stop(signum: int, _frame=None) -> None:
    PENDING_STOP.append(signum)


RESUMABLE_CHANGES = (
    "checkpoint.",
    "log.progress",
    "log.tensorboard",
    "log.wandb",
    "dataset.download",
    "dataset.verify",
)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: list(d) if isinstance(d, tuple) else d}


# Keys whose default is not what the code did before they existed: a recorded config lacking one ran with this value.
LEGACY_DEFAULTS: dict[str, dict[str, Any]] = {
    "onpro": {"method.mixup_row_gate": False},  # the batch-only mixup gate, until the official per-row gate (2026-12)
}


def added_key_defaults(flat: dict) -> dict[str, Any]:
    """The defaults of the run schema and of the config's method: a key added after a run was recorded defaults to
    what the code did before it existed (LEGACY_DEFAULTS where that is not the key's default), so a recorded
    config lacking it ran with that value."""
    method = str(flat.get("method.name", "er"))
    try:
        defaults = _flatten(dataclasses.asdict(default_config(method)))
    except (ConfigError, KeyError, TypeError, ValueError):  # a method this version no longer has
        return {}
    return {**defaults, **LEGACY_DEFAULTS.get(method, {})}


def config_differences(saved: dict, current: dict) -> list[str]:
    """`key: saved -> current` for every setting that differs and would change what the run computes."""
    a, b = _flatten(saved), _flatten(current)
    # a recorded config (not an empty placeholder) lacking a newer key ran with that key's default
    a, b = ({**added_key_defaults(d), **d} if d else d for d in (a, b))
    keys = sorted(k for k in set(a) | set(b) if not k.startswith(RESUMABLE_CHANGES))
    return [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys if a.get(k) != b.get(k)]


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def check_finite(learner: Learner) -> None:
    """Raise TrainingError when the loss so far, a weight or an optimizer tensor is NaN or infinite."""
    method = learner.method
    named = list(method.model.named_parameters()) + list(method.model.named_buffers())
    named += [("optimizer state", t) for t in _tensors(method.optimizer.state_dict()["state"])]
    named = [(name, t) for name, t in named if t.is_floating_point()]
    # One read-back for all: the flags of CPU tensors (Adam's step counts) join the device's before the copy.
    device = named[0][1].device if named else None
    finite = (
        torch.stack([torch.isfinite(t).all().to(device) for _, t in named]).cpu()
        if named
        else torch.ones(0, dtype=torch.bool)
    )
    bad = sorted({name for (name, _), ok in zip(named, finite.tolist(), strict=True) if not ok})
    if bool(learner.nonfinite) or bad:
        where = f" (non-finite values in {', '.join(bad[:3])})" if bad else ""
        raise TrainingError(
            f"training diverged: the loss or the weights became non-finite (nan or inf) by stream batch "
            f"{learner.step}{where}; the run stopped without writing a checkpoint, the last good one (if any) is "
            "kept. Lower optimizer.lr, or use precision=fp32 if precision=bf16 or fp16"
        )


def slurm_requeue(err: BaseException) -> bool:
    """Whether `err` is `scontrol requeue` failing inside this job (see Checkpointer.requeued)."""
    return isinstance(err, subprocess.CalledProcessError) and [str(c) for c in err.cmd[:2]] == ["scontrol", "requeue"]


def _own_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors that are views into a larger one (a packed run's slice of the stacked models) copied out: torch.save
    writes a view's whole storage."""
    return {k: v.clone() if v.untyped_storage().nbytes() > v.nbytes else v for k, v in state.items()}


def _rng_state() -> dict:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Writes and restores one run's checkpoint; turns SIGTERM into "checkpoint, then stop"."""

    def __init__(self, out_dir: Path, cfg: RunConfig, config: dict, can_save: bool = True):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / CHECKPOINT
        self.cfg = cfg.checkpoint
        self.config = config  # the run's resolved config, stored to refuse resuming with different settings
        self.can_save = can_save  # False: a run whose state cannot be saved (Avalanche peers) only stops on signals
        self.data: str | None = None  # the dataset's fingerprint, stored to refuse resuming on other data
        self.stop_signal: int | None = None  # set by the signal handler; the loop checks it after each batch
        self.saved_step: int | None = None  # the stream batch of the checkpoint this attempt last wrote
        self.started = time.time()
        self.wall_time_before = 0.0  # wall time spent in earlier attempts of this run (up to their checkpoint)

    # -- resuming ----------------------------------------------------------------------------------------------
    def load(self) -> dict | None:
        """The checkpoint to resume from, or None (none there, or checkpoint.resume=false)."""
        for name in (CHECKPOINT, "results.json"):  # temporary files of writes that a kill interrupted
            for stale in self.out_dir.glob(f".{name}.*.tmp"):
                stale.unlink(missing_ok=True)
        if not self.path.exists() or not self.cfg.resume:  # resume=false: `discard_stale` removes it later
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise DataError(
                f"cannot read checkpoint {self.path} ({type(e).__name__}): the file is corrupt or not "
                "a cil checkpoint. Delete it or set checkpoint.resume=false to start the run over"
            ) from e
        lacking = [k for k in CHECKPOINT_KEYS if k not in state] if isinstance(state, dict) else ["format"]
        if lacking or state.get("format") != FORMAT_VERSION or not isinstance(state.get("config"), dict):
            what = f" (it has no {lacking[0]!r})" if lacking else ""
            raise DataError(
                f"{self.path} is not a cil checkpoint of format {FORMAT_VERSION}{what}; delete it or set "
                "checkpoint.resume=false to start the run over"
            )
        diff = config_differences(state["config"], self.config)
        if diff:
            raise ConfigError(
                f"{self.path} was written by a run with other settings ({'; '.join(diff[:5])}"
                f"{'; ...' if len(diff) > 5 else ''}). Resume with the original settings, choose another "
                "hydra.run.dir, or set checkpoint.resume=false to start this run folder over"
            )
        return state

    def check_data(self, state: dict | None, fingerprint: str) -> None:
        """Refuse to resume a checkpoint trained on other data (files added, replaced or edited since)."""
        self.data = fingerprint
        saved = None if state is None else state.get("data")
        if saved is not None and saved != fingerprint:
            raise ConfigError(
                f"{self.path} was written by a run on other data: the dataset's files changed since (fingerprint "
                f"{saved} -> {fingerprint}). Restore the original files, choose another hydra.run.dir, or set "
                "checkpoint.resume=false to start this run folder over"
            )

    def discard_stale(self) -> None:
        """checkpoint.resume=false: the old checkpoint must not be resumed by a later attempt (called once the
        folder says the run is running)."""
        if not self.cfg.resume and self.path.exists():
            log.info("checkpoint.resume=false: %s deleted, the run starts over", self.path)
            self.path.unlink()

    def rewind_logs(self, state: dict) -> None:
        """Cut metrics.csv back to its length at the checkpoint: the resumed run rewrites the rows after it."""
        path = self.out_dir / "metrics.csv"
        size = state["metrics_csv_bytes"]
        if not path.exists() or path.stat().st_size < size:
            log.warning(
                "%s is missing or shorter than at the checkpoint; rows before stream batch %d are lost",
                path,
                state["learner"]["step"],
            )
            return
        os.truncate(path, size)

    def restore(self, learner: Learner, state: dict) -> None:
        method = learner.method
        method.model.load_state_dict(state["model"])
        method.optimizer.load_state_dict(state["optimizer"])
        method.load_state_dict(state["method"])
        if method.buffer is not None:
            method.buffer.load_state_dict(state["buffer"])
        learner.load_state_dict(state["learner"])
        if learner.diagnostics is not None:
            learner.diagnostics.load_state_dict(state["diagnostics"])
        _set_rng_state(state["rng"])
        self.wall_time_before = state["wall_time_s"]
        log.info("resumed from %s at stream batch %d of %d", self.path, learner.step, len(learner.stream))

    # -- writing -----------------------------------------------------------------------------------------------
    def due(self, step: int, task_ends: bool) -> bool:
        return self.stop_signal is not None or self.scheduled(step, task_ends)

    def scheduled(self, step: int, task_ends: bool) -> bool:
        """A checkpoint the settings ask for at this batch (checkpoint.every, checkpoint.at_task_end)."""
        return self.can_save and (
            (self.cfg.every > 0 and step % self.cfg.every == 0) or (task_ends and self.cfg.at_task_end)
        )

    def save(self, learner: Learner) -> None:
        check_finite(learner)
        learner.logger.flush()
        method = learner.method
        metrics_csv = self.out_dir / "metrics.csv"
        state = {
            "format": FORMAT_VERSION,
            "config": self.config,
            "model": _own_storage(method.model.state_dict()),
            "optimizer": method.optimizer.state_dict(),
            "method": method.state_dict(),
            "buffer": method.buffer.state_dict() if method.buffer is not None else None,
            "learner": learner.state_dict(),
            "diagnostics": learner.diagnostics.state_dict() if learner.diagnostics is not None else None,
            "rng": _rng_state(),
            "data": self.data,
            "metrics_csv_bytes": metrics_csv.stat().st_size if metrics_csv.exists() else 0,
            "wall_time_s": self.wall_time(),
        }
        data = io.BytesIO()  # serialised first: a failed write is then an OSError, not torch's zip-writer error
        torch.save(state, data)
        write(self.path, lambda p: atomic_write(p, lambda f: f.write(data.getbuffer())))
        self.saved_step = learner.step

    def requeued(self, step: int) -> Preempted:
        """SLURM is requeueing this job while it trains (submitit's time-limit handler ran `scontrol requeue`, and
        the requeue's SIGTERM, which reaches every process of the job, ended that very command before it returned):
        the run stops as pre-empted, from its last checkpoint, instead of failing."""
        log.warning("SLURM is requeueing this job (scontrol requeue ended by the requeue's own SIGTERM): stopping")
        if self.can_save and self.saved_step is not None and self.path.exists():
            return Preempted(self.saved_step, self.path, signal.SIGTERM)
        return Preempted(step, None, signal.SIGTERM, "no checkpoint was written yet")

    def checkpoint(self, learner: Learner) -> None:
        """Called by the learner when `due`: write the checkpoint, then stop if a signal asked for it."""
        if self.can_save:
            self.save(learner)
        if self.stop_signal is not None:
            raise Preempted(learner.step, self.path if self.can_save else None, self.stop_signal)

    def wall_time(self) -> float:
        return self.wall_time_before + time.time() - self.started

    def finish(self) -> None:
        """After results.json is written: the checkpoint is no longer needed unless checkpoint.keep."""
        if not self.cfg.keep:
            self.path.unlink(missing_ok=True)

    # -- signals -----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def stop_on_signals(self, signums: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[None]:
        """While the loop runs, SIGTERM or SIGINT (Ctrl-C) only sets a flag; the loop then checkpoints and raises
        Preempted (exit code 75, or 130 for Ctrl-C). Outside it, Ctrl-C stops at once (KeyboardInterrupt). Runs
        trained together in one process (a pack) are all asked to stop by one signal."""
        if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
            yield
            return
        stopping = [c.stop_signal for c in _STOPPABLE if c.stop_signal is not None]
        if PENDING_STOP or stopping:  # the signal came while the run was being set up
            self.stop_signal = (PENDING_STOP or stopping)[0]
        if not _STOPPABLE:  # the first run in: the process's handlers are kept and given back after the last
            _PREVIOUS_HANDLERS.update({s: signal.signal(s, _request_stop) for s in signums})
        _STOPPABLE.append(self)
        try:
            yield
        finally:
            _STOPPABLE.remove(self)
            if not _STOPPABLE:
                for s, handler in _PREVIOUS_HANDLERS.items():
                    signal.signal(s, handler)
                _PREVIOUS_HANDLERS.clear()


# The runs of this process whose loops are in progress (one, or a pack's), and the handlers they replaced.
_STOPPABLE: list[Checkpointer] = []
_PREVIOUS_HANDLERS: dict[int, Any] = {}


def _request_stop(signum: int, _frame=None) -> None:
    for checkpointer in _STOPPABLE:
        checkpointer.stop_signal = signum
