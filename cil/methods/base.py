"""What every online method shares: the seen-class mask, the forward pass in the chosen precision, one update.

A method's `observe(batch)` does its `iters` updates on one incoming batch and returns the last loss and the
incoming batch's logits from before the first update (for online accuracy), both detached and left on the
device: nothing here reads a value back to the host.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from cil.buffer import ReplayBuffer
from cil.config import MethodConfig
from cil.data.stream import Batch


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, detached
    logits: torch.Tensor  # [B, num_classes] logits of the incoming batch before the update, detached


def to_float(x: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """uint8 images -> float in [0, 1] (the online-CL code bases feed unnormalised [0, 1] inputs)."""
    x = x.float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


class Method:
    name = "base"
    uses_buffer = True  # the learner adds each incoming batch to the buffer after `observe`

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, buffer: Optional[ReplayBuffer],
                 cfg: MethodConfig, num_classes: int, device: torch.device, precision: str = "fp32",
                 channels_last: bool = False, seed: int = 0, input_shape: Optional[tuple] = None):
        self.model = model
        self.optimizer = optimizer
        self.buffer = buffer
        self.cfg = cfg
        self.num_classes = num_classes
        self.device = torch.device(device)
        self.precision = precision
        self.channels_last = channels_last
        self.input_shape = input_shape
        # Seen classes are the labels observed so far; task classes the current task's announced labels. Each is
        # a bool mask over the head on the device (for the losses) and a set of labels on the host (for counting
        # without a device read-back). `mark_seen` replaces the seen mask rather than changing it in place.
        self.seen = torch.zeros(num_classes, dtype=torch.bool, device=self.device)
        self.seen_labels: set[int] = set()
        self.task_classes = torch.zeros(num_classes, dtype=torch.bool, device=self.device)
        self.task_labels: set[int] = set()
        self.task = -1
        # Random choices of the method itself (augmentation), on the device so no copy happens per step.
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.diagnostics = None  # a cil.diagnostics.Diagnostics when diagnostics.enabled (set by the run builder)

    # -- task boundaries -------------------------------------------------------------------------------------
    def on_task_start(self, task: int, classes: torch.Tensor) -> None:
        """Called before the first batch of each task with the task's class labels (a training-time boundary;
        no task id is used at test time)."""
        self.task = task
        self.task_classes.zero_()
        self.task_classes[classes] = True
        self.task_labels = set(classes.tolist())

    def on_task_end(self, task: int) -> None:
        pass

    # -- one incoming batch ----------------------------------------------------------------------------------
    def mark_seen(self, y: torch.Tensor, y_host: torch.Tensor) -> None:
        """Add labels (the same on the device and on the host) to the seen classes. Only a batch with a new
        class costs tensor work; the mask is then replaced, not changed in place, so a mask handed out earlier
        (the learner keeps each step's until it counts online accuracy) stays as it was."""
        labels = y_host.tolist()
        if self.seen_labels.issuperset(labels):
            return
        self.seen_labels.update(labels)
        self.seen = self.seen.index_fill(0, y, True)

    def observe(self, batch: Batch) -> StepOutput:
        self.mark_seen(batch.y, batch.y_host)
        first = None
        for _ in range(self.cfg.iters):
            loss, logits = self.update(batch)
            first = logits if first is None else first
        return StepOutput(loss.detach(), first.detach())

    def update(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step. Returns (loss, logits of the incoming batch)."""
        raise NotImplementedError

    # -- helpers ---------------------------------------------------------------------------------------------
    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return nullcontext()

    def forward(self, x_uint8: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(to_float(x_uint8, self.channels_last)).float()

    def forward_float(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(x).float()

    def report(self, source: str, logits: torch.Tensor, targets: torch.Tensor, mask, scale: float = 1.0,
               class_weights: Optional[torch.Tensor] = None, rows: Optional[slice] = None) -> None:
        """Describe one term of the loss to the diagnostics (a no-op when they are off): the term is
        scale * mean_i(class_weights[y_i] * CE of row i, softmax over `mask`); source is 'new' or 'replay'.
        `rows`: the term covers only these rows of `logits` and `targets` (sliced here, only when needed)."""
        if self.diagnostics is not None:
            if rows is not None:
                logits, targets = logits[rows], targets[rows]
            self.diagnostics.report(source, logits, targets, mask, scale, class_weights)

    def step(self, loss: torch.Tensor) -> None:
        if self.diagnostics is not None:
            self.diagnostics.before_backward(loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()

    def replay(self, n: int, **filters: Any):
        """Up to n buffer samples (x, y, task), empty when the buffer is missing or empty."""
        if self.buffer is None or n <= 0:
            return None
        x, y, t = self.buffer.sample(n, **filters)
        return (x, y, t) if len(y) else None

    def extra_results(self) -> dict:
        """Method-specific summaries for results.json."""
        return {}

    def log_values(self) -> dict[str, float]:
        """Method-specific scalars for metrics.csv / TensorBoard; called only at log intervals (may sync)."""
        return {}

    def state_dict(self) -> dict:
        return {"seen": self.seen.cpu(), "task_classes": self.task_classes.cpu(), "task": self.task,
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.seen = state["seen"].to(self.device, copy=True)
        self.seen_labels = set(state["seen"].nonzero().squeeze(1).tolist())
        self.task_classes.copy_(state["task_classes"])
        self.task_labels = set(state["task_classes"].nonzero().squeeze(1).tolist())
        self.task = state["task"]
        self.generator.set_state(state["generator"])
