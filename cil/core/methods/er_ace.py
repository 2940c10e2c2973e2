"""ER-ACE (Caccia et al., ICLR 2022): asymmetric cross-entropy. The incoming batch is trained only against the
classes present in it, so new data never push old-class logits down; the replay batch against all seen classes.
One forward pass over the concatenation, or (`separate_passes`, as the official code does) one pass for the
incoming rows and one for the replayed rows, so batch norm normalises each on its own statistics.

Two switches of ours, off by default (the method is then exactly the paper's): `balance` re-weights the replay
term (docs/methods.md, "Balancing rules": GSA's per-class weights from gradient statistics on the replayed rows,
or the magnitude rule's scales of the two terms), and `augment` trains on GSA's two augmented views of both the
incoming and the replayed rows ([A(x), hflip(A(x))], GSA's random resized crop + grayscale), so ER-ACE can be
compared with GSA at an equal replay budget and augmentation."""

from dataclasses import dataclass
from typing import Any

import torch

from cil.core.augment import CROPS, two_views
from cil.core.data.stream import Batch
from cil.core.methods.base import BalancedReplayConfig, Method, register
from cil.core.objectives.balance import Magnitude, class_log_values, logit_grad_norm, make_rule
from cil.core.objectives.common import classes_mask, cross_entropy_masked
from cil.core.objectives.er_ace import er_ace_loss, er_ace_loss_joint
from cil.core.objectives.gsa import gsa_replay_loss


@dataclass
class ERACEConfig(BalancedReplayConfig):
    name: str = "er_ace"
    separate_passes: bool = False  # True: incoming and replay rows in two forward passes (the official code)
    balance: str = "constant"  # replay balancing rule; constant = the paper's plain replay cross-entropy
    augment: bool = False  # True: GSA's two augmented views [A(x), hflip(A(x))] of incoming and replayed rows


@register
class ERACE(Method):
    name = "er_ace"
    Config = ERACEConfig
    declares_main_pass = True
    cfg: ERACEConfig
    # (seen mask, its complement): the seen mask is replaced, never changed in place
    _unseen_of: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        # constant needs no statistics here: no rule at all, so the default step is the paper's, op for op
        self.rule = (
            None
            if cfg.balance == "constant"
            else make_rule(
                cfg.balance,
                self.num_classes,
                device=self.device,
                momentum=cfg.balance_momentum,
                window=cfg.balance_window,
                ratio=cfg.balance_ratio,
            )
        )
        size = tuple(self.input_shape[1:]) if self.input_shape else None
        self.augment = CROPS["torchvision"](size) if cfg.augment and size else None  # GSA's defaults

    def _unseen(self) -> torch.Tensor:
        seen = self.seen
        if self._unseen_of[0] is not seen:
            self._unseen_of = (seen, ~seen)
        unseen = self._unseen_of[1]
        assert unseen is not None  # set with the seen mask
        return unseen

    def _views(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Model input of stored rows: [A(x), hflip(A(x))] with labels repeated when `augment`, else x as is."""
        x = self.to_input(x)
        if self.augment is None:
            return x, y
        return two_views(x, self.augment, self.generator), torch.cat([y, y])

    def update(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.rule is not None or self.augment is not None:
            return self._update_balanced(batch)
        loss, logits_new, logits_buf, logits, inputs, y_buf = self.run_step(
            self.step_loss, *self.step_args(batch), once=self.first_step()
        )
        if logits is not None:  # None: two passes and no add-on to read them (distill_pass is then a no-op)
            self.distill_pass(inputs, logits)
        self.report("new", logits_new, batch.y, "present")
        self.report("replay", logits_buf, y_buf, self.seen)
        self.step(loss)
        return loss, logits_new

    def step_args(self, batch: Batch) -> tuple[object, ...]:
        """The replay draw and the masks: (x, y, x_mem, y_mem, seen, unseen), `step_loss`'s arguments."""
        mem = self.replay(self.cfg.replay_batch_size)
        x_mem, y_mem = (None, None) if mem is None else (mem[0], mem[1])
        # the complement of the seen mask, only for the joint loss (kept between steps)
        unseen = self._unseen() if mem is not None and not self.cfg.separate_passes else None
        return batch.x, batch.y, x_mem, y_mem, self.seen, unseen

    def packed_outputs(self, args: tuple[object, ...], outputs: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        loss, logits_new = outputs[0], outputs[1]
        assert loss is not None and logits_new is not None
        return loss, logits_new

    def step_loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_mem: torch.Tensor | None,
        y_mem: torch.Tensor | None,
        seen: torch.Tensor,
        unseen: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The step's tensor work (compiled with compile_step): incoming and replayed rows -> (loss, logits of the
        incoming rows, of the replayed rows, of all rows or None, model inputs, replayed labels). `unseen`: the
        complement of `seen` when the one-pass joint loss applies."""
        n = len(y)
        y_buf = y[:0] if y_mem is None else y_mem
        inputs = self.to_input(x if x_mem is None else torch.cat([x, x_mem]))
        logits: torch.Tensor | None
        if self.cfg.separate_passes:
            logits_new = self.forward_float(inputs[:n])
            logits_buf = logits_new[:0] if x_mem is None else self.forward_float(inputs[n:])
            logits = torch.cat([logits_new, logits_buf]) if self.addons else None  # only add-ons read it
        else:
            logits = self.forward_float(inputs)
            logits_new, logits_buf = logits[:n], logits[n:]
        if unseen is not None:  # the same loss in fewer ops (cil.core.objectives)
            assert logits is not None  # the one pass's
            loss = er_ace_loss_joint(logits, y, y_buf, unseen)
        else:
            loss = er_ace_loss(logits_new, y, logits_buf, y_buf, seen)
        return loss, logits_new, logits_buf, logits, inputs, y_buf

    def split_blocker(self) -> str | None:
        if self.rule is not None or self.augment is not None:
            return "ER-ACE with method.balance other than constant or with method.augment has no compiled step"
        return self.hooks_blocker()

    def _update_balanced(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The step with a balancing rule and/or the augmented views: the two terms computed apart."""
        rule, seen = self.rule, self.seen
        x_new, y_new = self._views(batch.x, batch.y)
        n = len(y_new)
        mem = self.replay(self.cfg.replay_batch_size)
        if mem is None:
            inputs, y_buf = x_new, y_new[:0]
        else:
            x_buf, y_buf = self._views(mem[0], mem[1])
            inputs = torch.cat([x_new, x_buf])
        if self.cfg.separate_passes:
            logits_new = self.forward_float(inputs[:n])
            logits_buf = logits_new[:0] if mem is None else self.forward_float(inputs[n:])
            logits = torch.cat([logits_new, logits_buf])
        else:
            logits = self.forward_float(inputs)
            logits_new, logits_buf = logits[:n], logits[n:]
        present = classes_mask(y_new, logits_new.shape[1])
        loss_new = cross_entropy_masked(logits_new, y_new, present)
        if mem is None or rule is None:  # augment alone: the paper's loss on the views
            loss = loss_new if mem is None else loss_new + cross_entropy_masked(logits_buf, y_buf, seen)
            self.report("new", logits_new, y_new, present)
            self.report("replay", logits_buf, y_buf, seen)
        else:
            rule.start(batch.task)
            rule.update(logits_buf, y_buf, seen)
            weights = rule.weights()  # ones for magnitude
            loss_buf = gsa_replay_loss(logits_buf, y_buf, weights, seen)
            a: torch.Tensor | None = None
            if rule.scales_terms:  # magnitude: detached scales from the closed-form logit-gradient norms
                assert isinstance(rule, Magnitude)  # the one rule that scales the terms
                a, b = rule.term_scales(
                    logit_grad_norm(logits_new, y_new, present), logit_grad_norm(logits_buf, y_buf, seen)
                )
                loss = a * loss_new + b * loss_buf
                weights = b * weights
            else:
                loss = loss_new + loss_buf
            self.report("new", logits_new, y_new, present, 1.0, None if a is None else a * torch.ones_like(weights))
            self.report("replay", logits_buf, y_buf, seen, 1.0, weights)
        self.distill_pass(inputs, logits)
        self.step(loss)
        return loss, logits_new[: len(batch.y)]

    def log_values(self) -> dict[str, float]:
        """With a balancing rule: its per-class weights and ratios under GSA's keys (gsa/weight/<c>, gsa/ratio/<c>:
        GSA's weight formula, so `cil plot` draws them), and magnitude's term scales."""
        return {} if self.rule is None else class_log_values(self.rule, self.classes.seen_labels)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.rule is not None:
            state["balance"] = self.rule.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.rule is not None:
            self.rule.load_state_dict(state["balance"])
