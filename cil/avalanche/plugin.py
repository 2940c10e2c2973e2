"""`GSAPlugin`: GSA (docs/gsa.md) inside any Avalanche supervised strategy, e.g. `Naive`.

The plugin drives the very step our own learner drives (`cil.core.methods.gsa.GSAStep`: current-task replay, the
task-only new-data loss, the balanced mixed replay batch, the gradient statistics and the weighted replay loss)
and replaces the strategy's loss with it in `before_backward`; the strategy then does its usual backward and
optimizer step. The plugin owns the step's inputs: the class sets, a tensor `ReplayBuffer` (reservoir, the
mini-batches as the strategy's data loader gives them, so already model input) and the forward function (the
strategy's current model, its logits padded to the label range).

Where the task comes from (a training-time boundary; nothing at test time):
- a classic experience: `experience.current_experience` and `experience.classes_in_this_experience`;
- an online sub-experience (`split_online_stream(..., access_task_boundaries=True)`): the same two attributes of
  `experience.origin_experience`.
- no boundaries (`split_online_stream`'s default, `access_task_boundaries=False`): the plugin falls back to the
  task-free GSA (`task_free=True`, docs/methods.md "Task-free GSA": pseudo-tasks and current classes from the
  labels), with one warning per plugin; `GSAPlugin(task_free=True)` uses it on any stream.
Labels are used as they are (statistics are keyed by the label itself), so Avalanche's random class order and
non-contiguous labels need no remapping. The head may be fixed or an `IncrementalClassifier`: logits narrower
than the label range are padded with columns that the seen-class mask removes from every softmax.

The strategy's own forward pass on the raw mini-batch still runs (Avalanche's template does it before the loss);
its output is only used by Avalanche's metrics. With batch-norm models that pass also updates running statistics.
"""

from __future__ import annotations

import warnings
from dataclasses import fields
from typing import Any

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from cil.core.buffer import ReplayBuffer
from cil.core.methods.base import ClassSets
from cil.core.methods.gsa import GSAConfig, GSAStep
from cil.errors import ConfigError

# The head switches act on our learner's model and optimizer, which the plugin does not own; skipping a whole step
# (train_without_replay=false) is the strategy's training loop, which the plugin does not own either.
GSA_OPTIONS = {f.name for f in fields(GSAConfig)} - {
    "name",
    "fresh_head_rows",
    "freeze_head_after_first_task",
    "train_without_replay",
}


def has_boundaries(experience) -> bool:
    """Whether the experience grants its task (Avalanche 0.6 leaves origin_experience readable even when an online
    stream does not, so the flag decides)."""
    return getattr(experience, "access_task_boundaries", True) is not False


def task_of(experience) -> tuple[int, list[int]]:
    """(task index, task classes) of a classic experience or of an online sub-experience's origin.

    GSA is boundary-aware (warm-up per task, current-task replay, task-only new loss): an online stream must grant
    the boundaries (Avalanche 0.6 leaves origin_experience readable even when it does not, so we check the flag).
    """
    if not has_boundaries(experience):
        raise ConfigError(
            "GSAPlugin needs task boundaries: make the online stream with split_online_stream(..., "
            "access_task_boundaries=True) so that experience.origin_experience names the current task"
        )
    origin = getattr(experience, "origin_experience", experience)
    classes = getattr(origin, "classes_in_this_experience", None)
    if classes is None:
        raise ConfigError(
            "GSAPlugin needs the current task's classes: the (origin) experience has no classes_in_this_experience; "
            "use Avalanche's class-incremental benchmarks (e.g. SplitMNIST) or decorate the benchmark with "
            "avalanche.benchmarks.scenarios.supervised.with_classes_timeline"
        )
    return int(origin.current_experience), sorted(int(c) for c in classes)


class GSAPlugin(SupervisedPlugin):
    """GSA as an Avalanche plugin. Use it with `Naive` (it replaces the loss; other strategies' losses are lost).

    mem_size: reservoir buffer size (M). num_classes: the label range, or None to grow it with the labels and
    the head. seed: the buffer's and the augmentation's random streams. Every other keyword is a GSA knob of
    `cil.core.methods.gsa.GSAConfig` (replay_batch_size=64, current_task_replay=22, warmup_batches=5, augment,
    ...), with the same defaults as `method=gsa`. task_free=True: the task-free GSA on any stream (without it, a
    stream without boundaries switches to it with one warning).
    """

    def __init__(self, mem_size: int = 500, num_classes: int | None = None, seed: int = 0, **gsa_options: Any):
        super().__init__()
        unknown = sorted(set(gsa_options) - GSA_OPTIONS)
        if unknown:
            raise ConfigError(f"GSAPlugin got unknown option(s) {unknown}; GSA options are {sorted(GSA_OPTIONS)}")
        self.cfg = GSAConfig(**gsa_options)
        self.cfg.validate()
        self.mem_size = int(mem_size)
        self.num_classes = num_classes
        self.seed = int(seed)
        self.gsa: GSAStep | None = None
        self.buffer: ReplayBuffer | None = None
        self.classes: ClassSets | None = None
        self.task = -1
        self.step_in_task = 0
        self._saved: dict | None = None  # state restored from a checkpoint, applied when rebuilt

    # -- what users and tests read ---------------------------------------------------------------------------
    @property
    def stats(self):
        """The GradientStats (G+ and G- per label), or None before the first mini-batch."""
        return None if self.gsa is None else self.gsa.stats

    @property
    def weights(self) -> torch.Tensor | None:
        """The replay weights used on the last mini-batch (1 during warm-up), indexed by label."""
        return None if self.gsa is None else self.gsa.last_weights

    def summary(self) -> dict:
        """Seen classes with their G+, G- and current weights (as in a `method=gsa` results.json)."""
        return {} if self.gsa is None else self.gsa.summary()

    # -- construction ----------------------------------------------------------------------------------------
    def _build(self, sample: torch.Tensor, device: torch.device, width: int) -> None:
        shape = tuple(sample.shape)
        saved, self._saved = self._saved, None
        self.buffer = ReplayBuffer(self.mem_size, shape, device=device, seed=self.seed + 1, dtype=sample.dtype)
        self.classes = ClassSets(saved["num_classes"] if saved else 1, device)
        generator = torch.Generator(device=device).manual_seed(self.seed + 2)
        # The buffer holds mini-batches as the strategy feeds them: already model input.
        self.gsa = GSAStep(
            self.cfg, self.buffer, self.classes, generator, shape[1:] if len(shape) == 3 else None, to_input=lambda x: x
        )
        if saved is not None:
            self.buffer.load_state_dict(saved["buffer"])
            self.classes.load_state_dict(saved["classes"])
            generator.set_state(saved["generator"])
            self.gsa.load_state_dict(saved["gsa"])
        self.gsa.grow(max(width, self.num_classes or 0))

    def _forward(self, strategy):
        """The strategy's current model, its logits padded to the label range (an IncrementalClassifier head is
        narrower than the largest label until it grows; padded columns are unseen classes, always masked)."""

        def forward(x: torch.Tensor) -> torch.Tensor:
            assert self.classes is not None and self.gsa is not None  # built by before_training_exp
            logits = strategy.model(x)
            width = max(self.classes.num_classes, logits.shape[1])
            self.gsa.grow(width)
            return logits if logits.shape[1] == width else F.pad(logits, (0, width - logits.shape[1]))

        return forward

    # -- Avalanche callbacks ---------------------------------------------------------------------------------
    def before_training_exp(self, strategy, **kwargs):
        if not self.cfg.task_free and not has_boundaries(strategy.experience):
            if self.gsa is not None:  # the step was built task-aware: switching now would mix the two
                raise ConfigError(
                    "GSAPlugin got an experience without task boundaries after ones with them; "
                    "use one kind of stream, or GSAPlugin(task_free=True) from the start"
                )
            warnings.warn(
                "GSAPlugin: the online stream does not grant task boundaries "
                "(split_online_stream(..., access_task_boundaries=False)): using the task-free GSA "
                "(task_free=True; docs/methods.md, Task-free GSA). Pass task_free=True to silence this, or "
                "access_task_boundaries=True for GSA with tasks",
                UserWarning,
                stacklevel=2,
            )
            self.cfg.task_free = True  # once per plugin: the step is built task-free below
        if self.cfg.task_free:  # pseudo-tasks from the labels (before_backward); no task is read
            if self.gsa is None:
                x0 = strategy.experience.dataset[0][0]
                self._build(torch.as_tensor(x0), torch.device(strategy.device), self.num_classes or 1)
            return
        task, classes = task_of(strategy.experience)
        if self.gsa is None:
            x0 = strategy.experience.dataset[0][0]
            self._build(torch.as_tensor(x0), torch.device(strategy.device), max(classes) + 1)
        assert self.gsa is not None and self.classes is not None  # built above
        self.gsa.grow(max(classes) + 1)
        if task != self.task:  # a new task (an online stream calls this once per sub-experience)
            self.task, self.step_in_task = task, 0
            self.classes.start_task(task, torch.tensor(classes, device=self.classes.seen.device))

    def before_backward(self, strategy, **kwargs):
        x, y = strategy.mb_x, strategy.mb_y
        y_host = y.cpu()
        assert self.gsa is not None and self.classes is not None  # built by before_training_exp
        self.gsa.grow(int(y_host.max()) + 1)
        if self.cfg.task_free:  # before mark_seen: novelty is judged against the classes seen before
            assert self.gsa.pseudo is not None  # made when task_free
            self.task, self.step_in_task = self.gsa.pseudo.observe(y, y_host)
            self._y_host = y_host
        self.classes.mark_seen(y, y_host)
        strategy.loss, _ = self.gsa.loss(self._forward(strategy), x, y, self.task, self.step_in_task)

    def after_training_iteration(self, strategy, **kwargs):
        # Step 9: the raw mini-batch enters the reservoir once (only in the first epoch of a multi-epoch run).
        assert self.buffer is not None  # built by before_training_exp
        if self.cfg.task_free:  # no task stored; the counters live in the pseudo-tasks
            if strategy.clock.train_exp_epochs == 0:
                self.buffer.add(strategy.mb_x.detach(), strategy.mb_y, None, y_host=self._y_host)
            return
        if strategy.clock.train_exp_epochs == 0:
            self.buffer.add(strategy.mb_x.detach(), strategy.mb_y, self.task)
        self.step_in_task += 1

    # -- Avalanche checkpointing (save_checkpoint / maybe_load_checkpoint pickle the strategy with dill) -------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.gsa is not None:  # the buffer shares numpy views with tensors: store state dicts, not objects
            assert self.buffer is not None and self.classes is not None  # built with the step
            state["_saved"] = {
                "buffer": self.buffer.state_dict(),
                "gsa": self.gsa.state_dict(),
                "classes": self.classes.state_dict(),
                "generator": self.gsa.generator.get_state(),
                "num_classes": self.classes.num_classes,
            }
        state["gsa"] = state["buffer"] = state["classes"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
