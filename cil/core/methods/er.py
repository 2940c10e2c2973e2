"""Experience Replay (Chaudhry et al., 2019): the incoming batch plus `replay_batch_size` buffer samples,
one cross-entropy over all seen classes, in one forward pass. A fresh replay sample is drawn for each of the
`iters` updates."""

from dataclasses import dataclass

import torch

from cil.core.data.stream import Batch
from cil.core.methods.base import Method, ReplayConfig, register
from cil.core.objectives.er import er_loss
from cil.errors import require


@dataclass
class ERConfig(ReplayConfig):
    name: str = "er"
    balance: str = "constant"  # only constant: ER has one joint cross-entropy, no replay term of its own

    def validate(self) -> None:
        super().validate()
        require(
            self.balance == "constant",
            "method.balance",
            self.balance,
            "ER trains one cross-entropy over the incoming and replayed rows together, with no replay term to "
            "re-weight; use method=er_ace (separate new-data and replay terms) with method.balance",
        )


@register
class ER(Method):
    name = "er"
    Config = ERConfig
    declares_main_pass = True
    cfg: ERConfig

    def update(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        x, y, n = batch.x, batch.y, len(batch.y)
        mem = self.replay(self.cfg.replay_batch_size)
        if mem is not None:
            x, y = torch.cat([x, mem[0]]), torch.cat([y, mem[1]])
        inputs = self.to_input(x)
        logits = self.forward_float(inputs)
        loss = er_loss(logits, y, self.seen)
        self.distill_pass(inputs, logits)
        self.report("new", logits, y, self.seen, scale=n / len(y), rows=slice(None, n))
        self.report("replay", logits, y, self.seen, scale=1 - n / len(y), rows=slice(n, None))
        self.step(loss)
        return loss, logits[:n]
