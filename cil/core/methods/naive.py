"""Fine-tuning on the stream with no replay: the lower bound."""

import torch

from cil.core.data.stream import Batch
from cil.core.methods.base import Method, MethodConfig, register
from cil.core.objectives.er import er_loss


@register
class Naive(Method):
    name = "naive"
    Config = MethodConfig
    uses_buffer = False

    def update(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.forward(batch.x)
        loss = er_loss(logits, batch.y, self.seen)
        self.report("new", logits, batch.y, self.seen)
        self.step(loss)
        return loss, logits
