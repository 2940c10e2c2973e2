"""ER-ACE (Caccia et al., ICLR 2022): asymmetric cross-entropy. The incoming batch is trained only against the
classes present in it, so new data never push old-class logits down; the replay batch against all seen classes.
One forward pass over the concatenation, or (`separate_passes`, as the official code does) one pass for the
incoming rows and one for the replayed rows, so batch norm normalises each on its own statistics."""
from dataclasses import dataclass

import torch

from cil.core.methods.base import Method, ReplayConfig, register
from cil.core.objectives.er_ace import er_ace_loss, er_ace_loss_joint


@dataclass
class ERACEConfig(ReplayConfig):
    name: str = "er_ace"
    separate_passes: bool = False  # True: incoming and replay rows in two forward passes (the official code)


@register
class ERACE(Method):
    name = "er_ace"
    Config = ERACEConfig
    declares_main_pass = True
    _unseen_of = (None, None)  # (seen mask, its complement): the seen mask is replaced, never changed in place

    def _unseen(self) -> torch.Tensor:
        seen = self.seen
        if self._unseen_of[0] is not seen:
            self._unseen_of = (seen, ~seen)
        return self._unseen_of[1]

    def update(self, batch):
        n = len(batch.y)
        mem = self.replay(self.cfg.replay_batch_size)
        y_buf = batch.y[:0] if mem is None else mem[1]
        inputs = self.to_input(batch.x if mem is None else torch.cat([batch.x, mem[0]]))
        if self.cfg.separate_passes:
            logits_new = self.forward_float(inputs[:n])
            logits_buf = logits_new[:0] if mem is None else self.forward_float(inputs[n:])
            logits = torch.cat([logits_new, logits_buf]) if self.addons else None  # only add-ons read it
        else:
            logits = self.forward_float(inputs)
            logits_new, logits_buf = logits[:n], logits[n:]
        if mem is not None and not self.cfg.separate_passes:  # the same loss in fewer ops (cil.core.objectives)
            loss = er_ace_loss_joint(logits, batch.y, y_buf, self._unseen())
        else:
            loss = er_ace_loss(logits_new, batch.y, logits_buf, y_buf, self.seen)
        self.distill_pass(inputs, logits)
        self.report("new", logits_new, batch.y, "present")
        self.report("replay", logits_buf, y_buf, self.seen)
        self.step(loss)
        return loss, logits_new
