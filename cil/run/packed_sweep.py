"""Sweep jobs trained together in one process (`hydra/launcher=packed`, hydra_plugins/cil_packed_launcher).

The launcher sets up each job of a pack as any sweep job is set up (its folder, its checks, its config record, a
checkpoint resumed: cil.run.sweep.sweep_job_stages) up to the learner it would train; `Pack.run` then trains the
pack's learners, those that can share a step packed together (cil.core.packed: seeds, memory sizes, optimizer
settings, any settings that keep the method's and the model's kind), the others one after another, and each job's
stages write its folder as a lone run's would: results.json, failed.json, or a checkpoint and `preempted` when
SIGTERM stopped the pack (every run in it checkpoints; the same command resumes them, packed again).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from cil.core.learner import Learner
from cil.core.packed import PackedRuns, pack_key
from cil.errors import Preempted
from cil.run.experiment import RunStages, finish_stages

log = logging.getLogger("cil")

_COLLECTING: list[Pack] = []  # the pack whose jobs the launcher is setting up now


def current_pack() -> Pack | None:
    """The pack a sweep job being set up joins, or None (an ordinary job: it trains at once)."""
    return _COLLECTING[-1] if _COLLECTING else None


@dataclass
class _Job:
    name: str
    stages: RunStages
    learner: Learner


class Pack:
    """Sweep jobs set up one by one (`add`, while `collecting`), then trained together (`run`)."""

    def __init__(self) -> None:
        self.jobs: list[_Job] = []
        self.results: list[dict | None] = []

    @contextlib.contextmanager
    def collecting(self) -> Iterator[Pack]:
        _COLLECTING.append(self)
        try:
            yield self
        finally:
            _COLLECTING.remove(self)

    def add(self, stages: RunStages, name: str, run_dir: str) -> dict:
        """Sets a job up to its learner; returns what the job returns now: its final result when there is nothing
        to train (complete, refused, failed while setting up), else a placeholder that `run` replaces."""
        try:
            learner = next(stages)
        except StopIteration as done:
            return done.value
        self.jobs.append(_Job(name, stages, learner))
        self.results.append(None)
        return {"status": "packed", "pack_index": len(self.jobs) - 1, "run_dir": run_dir}

    def groups(self) -> list[list[int]]:
        """The jobs (indices) trained together: those with equal pack keys, in order; a job that cannot be packed
        is a group of one."""
        groups: dict[object, list[int]] = {}
        for i, job in enumerate(self.jobs):
            key = pack_key(job.learner)
            groups.setdefault(("alone", i) if key is None else key, []).append(i)
        return list(groups.values())

    def run(self) -> list[dict]:
        """Trains every job; each job's stages record its outcome in its folder. After pre-emption (SIGTERM: every
        run of the group in training checkpoints) the groups not yet trained are recorded as pre-empted too, and
        Preempted is raised once all are."""
        stop: BaseException | None = None
        for group in self.groups():
            learners = [self.jobs[i].learner for i in group]
            outcomes: list[dict[str, Any] | BaseException]
            if stop is not None:  # set up, not trained: they stay resumable from where they were
                outcomes = [stop] * len(group)
            elif len(group) == 1:
                outcomes = [_train_alone(learners[0])]
            else:
                log.info("training %d runs packed: %s", len(group), "; ".join(self.jobs[i].name for i in group))
                outcomes = PackedRuns(learners).run_each()
            for i, outcome in zip(group, outcomes, strict=True):
                try:
                    self.results[i] = finish_stages(self.jobs[i].stages, outcome)
                except (Preempted, KeyboardInterrupt) as err:  # recorded in the folder; the others are recorded next
                    stop = stop or err
        if stop is not None:
            raise stop
        return [r for r in self.results if r is not None]


def _train_alone(learner: Learner) -> dict[str, Any] | BaseException:
    try:
        return learner.run()
    except BaseException as err:  # noqa: BLE001 - the job's stages record it
        return err
