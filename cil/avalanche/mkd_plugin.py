"""`MKDPlugin`: MKD's EMA teachers (cil.core.addons.mkd; docs/methods.md "MKD add-on") inside any Avalanche
supervised strategy, e.g. `Naive` with a `ReplayPlugin`, or after `GSAPlugin` in the plugin list.

The plugin reuses the core's pieces: `MKDConfig` (knobs and defaults), `make_teacher` / `ema_update` /
`ema_factor` (the official bias-corrected EMA) and `kd_loss` (temperature-scaled distillation). What it does:

- teachers: built from `strategy.model` at the first training experience (theta_j = a_j / (1 - a_j) theta);
- `before_backward`: adds `weight * kd_lambda * mean_j KD_T(strategy.mb_output | T_j(strategy.mb_x))` to
  `strategy.loss`, i.e. the distillation on the strategy's own forward pass (the official er_ema.py form, our
  `mode=main_pass`); softmaxes over the classes seen so far (marked from `mb_y`) unless `seen_only=False`;
- `after_update`: the EMA step, k = training iterations // correction_step in a / (1 - a^k);
- evaluation (`strategy.eval`): `eval_head` (average, teacher or student) is swapped in as `strategy.model` for
  each evaluation experience, after Avalanche's own model adaptation of the student, and swapped back after it.

Not options here (they need our learner's replay buffer and raw batches): mode, replay_batch_size, augment,
crop_scale (the block form) and raw_pass (an Avalanche strategy's loader applies its augmentation before the
plugin sees `mb_x`, so there is no un-augmented copy to distil on).

A head that grows (`IncrementalClassifier`): at every experience start the teachers take the student's new
structure. Units the teacher did not have start at the student's values / (1 - a^k) - the fixed point of the
EMA step for a parameter that never changed - and the teacher's existing values are kept. Integer and bool
buffers (IncrementalClassifier's `active_units`) follow the student; floating buffers (batch-norm statistics) and
batch-norm's `num_batches_tracked` are the teacher's own, as in the core add-on.
"""

from __future__ import annotations

import copy
from dataclasses import fields
from typing import Any, cast

import torch
from avalanche.core import SupervisedPlugin
from avalanche.models.utils import avalanche_forward
from torch import Tensor, nn

from cil.avalanche.eval_swap import EvalHeadSwap
from cil.avalanche.mkd_options import MKD_NOT_OPTIONS as NOT_OPTIONS  # the block form's knobs and raw_pass, with why
from cil.core.addons.mkd import EXTRA_HEADS, MKDConfig, average_parameters, ema_update, make_teacher
from cil.core.objectives.distill import kd_loss
from cil.errors import ConfigError

MKD_OPTIONS = {f.name for f in fields(MKDConfig)} - {"name"} - set(NOT_OPTIONS)


class MKDPlugin(EvalHeadSwap, SupervisedPlugin):
    """MKD as an Avalanche plugin. Keywords: the knobs of `cil.core.addons.mkd.MKDConfig` with its defaults
    (weight=1, kd_lambda=5.5, temperature=4, n_teachers=1, alpha_min=alpha_max=0.01, correction_step=10,
    eval_head='average', seen_only=True, report_heads=True)."""

    def __init__(self, **mkd_options: Any):
        super().__init__()
        refused = sorted(set(mkd_options) & set(NOT_OPTIONS))
        unknown = sorted(set(mkd_options) - MKD_OPTIONS - set(NOT_OPTIONS))
        if refused or unknown:
            why = "; ".join(f"{k}: {NOT_OPTIONS[k]}" for k in refused)
            raise ConfigError(
                f"MKDPlugin got option(s) {refused + unknown} it does not take"
                f"{' (' + why + ')' if why else ''}; its options are {sorted(MKD_OPTIONS)}"
            )
        self.cfg = MKDConfig(mode="main_pass", **mkd_options)
        self.cfg.validate()
        self.alphas = self.cfg.alphas()
        self.teachers: list[nn.Module] = []
        self.batches = 0  # training iterations seen (k of the bias correction counts these)
        self.updates = 0  # optimizer steps the teachers followed
        self.seen: Tensor | None = None  # bool [width]: labels seen in mb_y so far
        self.last: dict[str, Tensor] = {}  # the last KD term (detached)
        self._average: tuple[tuple, nn.Module] | None = None  # ((updates, shapes), model) for eval_head=average

    @property
    def active(self) -> bool:
        return self.cfg.weight > 0

    # -- teachers --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _follow_structure(self, student: nn.Module) -> None:
        """Give the teachers the student's structure when it changed (a grown head); see the module docstring."""
        s_params, s_buffers = dict(student.named_parameters()), dict(student.named_buffers())
        for j, (alpha, teacher) in enumerate(zip(self.alphas, self.teachers, strict=True)):
            t_params, t_buffers = dict(teacher.named_parameters()), dict(teacher.named_buffers())
            same = {k: v.shape for k, v in t_params.items()} == {k: v.shape for k, v in s_params.items()} and {
                k: v.shape for k, v in t_buffers.items()
            } == {k: v.shape for k, v in s_buffers.items()}
            if not same:
                for k, v in t_params.items():
                    new = s_params.get(k)
                    if (
                        new is None
                        or new.dim() != v.dim()
                        or any(a > b for a, b in zip(v.shape, new.shape, strict=True))
                    ):
                        raise ConfigError(
                            f"MKDPlugin: the model's parameter {k!r} changed from {tuple(v.shape)} to "
                            f"{None if new is None else tuple(new.shape)}; the EMA teachers can follow a head that "
                            "grows (IncrementalClassifier) but not parameters that vanish or shrink"
                        )
                grown = copy.deepcopy(student)
                grown.requires_grad_(False)
                fixed_point = 1 / (1 - alpha ** max(1, self.batches // self.cfg.correction_step))
                for k, p in grown.named_parameters():
                    p.mul_(fixed_point)
                    if k in t_params:
                        p[tuple(slice(0, n) for n in t_params[k].shape)] = t_params[k]
                for k, b in grown.named_buffers():
                    if k in t_buffers and b.is_floating_point() and b.shape == t_buffers[k].shape:
                        b.copy_(t_buffers[k])
                grown.train(teacher.training)
                self.teachers[j] = teacher = grown
                t_buffers = dict(teacher.named_buffers())
            for k, b in t_buffers.items():  # structural buffers (active_units) follow the student
                if not b.is_floating_point() and not k.endswith("num_batches_tracked"):
                    b.copy_(s_buffers[k])

    def head_module(self, strategy, head: str | None = None) -> nn.Module:
        """The module of evaluation head `head` ('average', 'teacher', 'student'; None: cfg.eval_head). Before the
        first training experience there are no teachers: every head is the student."""
        which = head or self.cfg.eval_head
        student = strategy.model
        if which == "student" or not self.teachers:
            return student
        if which == "teacher":
            return self.teachers[0]
        key = (self.updates, tuple(p.shape for p in student.parameters()))  # a grown head changes the shapes
        if self._average is None or self._average[0] != key:
            average = copy.deepcopy(student)  # the student's buffers
            average.requires_grad_(False)
            values = average_parameters(student, self.teachers)
            with torch.no_grad():
                for name, p in average.named_parameters():
                    p.copy_(values[name])
            self._average = (key, average)
        return self._average[1]

    @torch.no_grad()
    def head_logits(self, strategy, x: Tensor, head: str | None = None) -> Tensor:
        """Logits of head `head` on model inputs `x`, the head in eval mode (its mode restored)."""
        module = self.head_module(strategy, head)
        was = module.training
        module.eval()
        try:
            return module(x)
        finally:
            module.train(was)

    def eval_heads(self) -> list[str]:
        """The extra heads a `method=avalanche_<name> addon=mkd` run evaluates (results.json `heads`)."""
        if not self.cfg.report_heads:
            return []
        return [h for h in EXTRA_HEADS if h != f"mkd_{self.cfg.eval_head}"]

    # -- training --------------------------------------------------------------------------------------------
    def before_training(self, strategy, **kwargs):
        self.restore(strategy)

    def before_training_exp(self, strategy, **kwargs):
        self.restore(strategy)
        if not self.teachers:  # after Avalanche's model adaptation of this experience
            self.teachers = [make_teacher(strategy.model, a, self.cfg.correction_step) for a in self.alphas]
        else:
            self._follow_structure(strategy.model)

    def before_training_iteration(self, strategy, **kwargs):
        self.batches += 1

    def _mark_seen(self, y: Tensor, width: int) -> Tensor:
        if self.seen is None or len(self.seen) < width:  # the head's width is host-side: no sync
            seen = torch.zeros(width, dtype=torch.bool, device=y.device)
            if self.seen is not None:
                seen[: len(self.seen)] = self.seen
            self.seen = seen
        self.seen.index_fill_(0, y, True)
        return self.seen[:width]

    def before_backward(self, strategy, **kwargs):
        if not self.active:  # weight 0: no teacher forward, nothing added (the strategy alone, bit for bit)
            return
        logits = strategy.mb_output
        seen = self._mark_seen(strategy.mb_y, logits.shape[1])
        with torch.no_grad():  # the teachers in their own (train) mode, as the core add-on
            teacher_logits = [avalanche_forward(t, strategy.mb_x, strategy.mb_task_id) for t in self.teachers]
        mask = seen if self.cfg.seen_only else None
        # sum() over Tensors is typed Tensor | Literal[0] (the empty case): one teacher at least here
        kd = cast(Tensor, sum(kd_loss(logits.float(), t.float(), self.cfg.temperature, mask) for t in teacher_logits))
        kd = kd / len(teacher_logits)
        self.last = {"kd": kd.detach()}
        strategy.loss = strategy.loss + self.cfg.weight * self.cfg.kd_lambda * kd

    def after_update(self, strategy, **kwargs):
        if self.teachers:
            ema_update(
                self.teachers,
                self.alphas,
                [p.detach() for p in strategy.model.parameters()],
                self.batches,
                self.cfg.correction_step,
            )
            self.updates += 1

    # -- evaluation: the eval head is strategy.model while Avalanche evaluates -----------------------------------
    def before_eval_exp(self, strategy, **kwargs):
        # Avalanche has just adapted the student to this experience (_before_eval_exp): swap the head in after it.
        self.restore(strategy)
        if self.teachers:
            self._follow_structure(strategy.model)
        head = self.head_module(strategy)
        if head is not strategy.model:
            self.swap_in(strategy, head)

    # -- what a run reports ----------------------------------------------------------------------------------
    def log_values(self) -> dict[str, float]:
        return {f"mkd/{k}": float(v) for k, v in self.last.items()}

    def extra_results(self) -> dict:
        return {"mkd": {"alphas": self.alphas, "eval_head": self.cfg.eval_head, "form": "main_pass"}}

    # -- Avalanche checkpointing (save_checkpoint pickles the strategy with dill) -----------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_average"] = None  # rebuilt from the teachers on demand
        return state
