"""`GSAPlugin`: GSA (../shared/gsa.md) inside any Avalanche supervised strategy, e.g. `Naive`.

The plugin runs the very step our own learner runs (`cil.methods.gsa.GSA.loss`: current-task replay, the
task-only new-data loss, the balanced mixed replay batch, the gradient statistics and the weighted replay loss)
and replaces the strategy's loss with it in `before_backward`; the strategy then does its usual backward and
optimizer step. Replay comes from our tensor `cil.buffer.ReplayBuffer` (reservoir, raw mini-batches as the
strategy's data loader gives them), not from Avalanche's dataset-concatenating replay.

Where the task comes from (a training-time boundary; nothing at test time):
- a classic experience: `experience.current_experience` and `experience.classes_in_this_experience`;
- an online sub-experience (`split_online_stream(..., access_task_boundaries=True)`): the same two attributes of
  `experience.origin_experience`.
Labels are used as they are (statistics are keyed by the label itself), so Avalanche's random class order and
non-contiguous labels need no remapping. The head may be fixed or an `IncrementalClassifier`: logits narrower
than the label range are padded with columns that the seen-class mask removes from every softmax.

The strategy's own forward pass on the raw mini-batch still runs (Avalanche's template does it before the loss);
its output is only used by Avalanche's metrics. With batch-norm models that pass also updates running statistics.
"""
from __future__ import annotations

from dataclasses import fields
from typing import Any, Optional

import torch
import torch.nn.functional as F
from avalanche.core import SupervisedPlugin

from cil.buffer import ReplayBuffer
from cil.config import MethodConfig
from cil.errors import ConfigError
from cil.methods.gsa import GSA

GSA_OPTIONS = {f.name for f in fields(MethodConfig)} - {"name", "params"}


def task_of(experience) -> tuple[int, list[int]]:
    """(task index, task classes) of a classic experience or of an online sub-experience's origin.

    GSA is boundary-aware (warm-up per task, current-task replay, task-only new loss): an online stream must grant
    the boundaries (Avalanche 0.6 leaves origin_experience readable even when it does not, so we check the flag).
    """
    if getattr(experience, "access_task_boundaries", True) is False:
        raise ConfigError(
            "GSAPlugin needs task boundaries: make the online stream with split_online_stream(..., "
            "access_task_boundaries=True) so that experience.origin_experience names the current task")
    origin = getattr(experience, "origin_experience", experience)
    classes = getattr(origin, "classes_in_this_experience", None)
    if classes is None:
        raise ConfigError(
            "GSAPlugin needs the current task's classes: the (origin) experience has no classes_in_this_experience; "
            "use Avalanche's class-incremental benchmarks (e.g. SplitMNIST) or decorate the benchmark with "
            "avalanche.benchmarks.scenarios.supervised.with_classes_timeline")
    return int(origin.current_experience), sorted(int(c) for c in classes)


class _PaddedModel:
    """Calls the strategy's model and pads its logits to the plugin's class range (IncrementalClassifier heads
    are narrower than the largest label until they grow). Padded columns are unseen classes: always masked."""

    def __init__(self, plugin: "GSAPlugin", model: torch.nn.Module):
        self.plugin, self.model = plugin, model

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.model(x)
        width = self.plugin._grow(logits.shape[1])
        return logits if logits.shape[1] == width else F.pad(logits, (0, width - logits.shape[1]))


class GSAPlugin(SupervisedPlugin):
    """GSA as an Avalanche plugin. Use it with `Naive` (it replaces the loss; other strategies' losses are lost).

    mem_size: reservoir buffer size (M). num_classes: the label range, or None to grow it with the labels and
    the head. seed: the buffer's and the augmentation's random streams. Every other keyword is a GSA knob of
    `cil.config.MethodConfig` (replay_batch_size=64, current_task_replay=22, warmup_batches=5, augment, ...),
    with the same defaults as `method=gsa`.
    """

    def __init__(self, mem_size: int = 500, num_classes: Optional[int] = None, seed: int = 0, **gsa_options: Any):
        super().__init__()
        unknown = sorted(set(gsa_options) - GSA_OPTIONS)
        if unknown:
            raise ConfigError(f"GSAPlugin got unknown option(s) {unknown}; GSA options are {sorted(GSA_OPTIONS)}")
        defaults = {"replay_batch_size": 64}  # conf/method/gsa.yaml's R, not ER's 10
        self.cfg = MethodConfig(name="gsa", **{**defaults, **gsa_options})
        self.mem_size = int(mem_size)
        self.num_classes = num_classes
        self.seed = int(seed)
        self.gsa: Optional[GSA] = None
        self.buffer: Optional[ReplayBuffer] = None
        self.task = -1
        self.step_in_task = 0
        self._saved: Optional[dict] = None  # state restored from a checkpoint, applied when rebuilt

    # -- what users and tests read ---------------------------------------------------------------------------
    @property
    def stats(self):
        """The GradientStats (G+ and G- per label), or None before the first mini-batch."""
        return None if self.gsa is None else self.gsa.stats

    @property
    def weights(self) -> Optional[torch.Tensor]:
        """The replay weights used on the last mini-batch (1 during warm-up), indexed by label."""
        return None if self.gsa is None else self.gsa.last_weights

    def summary(self) -> dict:
        """Seen classes with their G+, G- and current weights (as in a `method=gsa` results.json)."""
        return {} if self.gsa is None else self.gsa.extra_results()["gsa"]

    # -- construction ----------------------------------------------------------------------------------------
    def _build(self, sample: torch.Tensor, device: torch.device, width: int) -> None:
        shape = tuple(sample.shape)
        saved, self._saved = self._saved, None
        self.buffer = ReplayBuffer(self.mem_size, shape, device=device, seed=self.seed + 1, dtype=sample.dtype)
        # GSA's model is set per mini-batch; no optimizer: the strategy steps.
        self.gsa = GSA(None, None, self.buffer, self.cfg, saved["num_classes"] if saved else 1, device,
                       seed=self.seed + 2, input_shape=shape)
        if saved is not None:
            self.buffer.load_state_dict(saved["buffer"])
            self.gsa.load_state_dict(saved["gsa"])
        self._grow(max(width, self.num_classes or 0))

    def _grow(self, width: int) -> int:
        """Widen every per-class tensor to `width` classes (new classes unseen, weight 1). Returns the width."""
        g = self.gsa
        if width <= g.num_classes:
            return g.num_classes
        pad = width - g.num_classes

        def grow(t: torch.Tensor, value=0) -> torch.Tensor:
            return torch.cat([t, torch.full((pad,), value, dtype=t.dtype, device=t.device)])

        g.seen, g.task_classes = grow(g.seen, False), grow(g.task_classes, False)
        g.last_weights = grow(g.last_weights, 1.0)
        g.stats._fit(width, g.stats.device)
        g.num_classes = width
        return width

    # -- Avalanche callbacks ---------------------------------------------------------------------------------
    def before_training_exp(self, strategy, **kwargs):
        task, classes = task_of(strategy.experience)
        if self.gsa is None:
            x0 = strategy.experience.dataset[0][0]
            self._build(torch.as_tensor(x0), torch.device(strategy.device), max(classes) + 1)
        self._grow(max(classes) + 1)
        if task != self.task:  # a new task (an online stream calls this once per sub-experience)
            self.task, self.step_in_task = task, 0
            self.gsa.on_task_start(task, torch.tensor(classes, device=self.gsa.device))

    def before_backward(self, strategy, **kwargs):
        g = self.gsa
        x, y = strategy.mb_x, strategy.mb_y
        y_host = y.cpu()
        self._grow(int(y_host.max()) + 1)
        g.mark_seen(y, y_host)
        g.model = _PaddedModel(self, strategy.model)
        strategy.loss, _ = g.loss(x, y, self.task, self.step_in_task)

    def after_training_iteration(self, strategy, **kwargs):
        # Step 9: the raw mini-batch enters the reservoir once (only in the first epoch of a multi-epoch run).
        if strategy.clock.train_exp_epochs == 0:
            self.buffer.add(strategy.mb_x.detach(), strategy.mb_y, self.task)
        self.step_in_task += 1

    # -- Avalanche checkpointing (save_checkpoint / maybe_load_checkpoint pickle the strategy with dill) -------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        if self.gsa is not None:  # the buffer shares numpy views with tensors: store state dicts, not objects
            state["_saved"] = {"buffer": self.buffer.state_dict(), "gsa": self.gsa.state_dict(),
                               "num_classes": self.gsa.num_classes}
        state["gsa"] = state["buffer"] = None
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
