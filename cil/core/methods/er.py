"""Experience Replay (Chaudhry et al., 2019): the incoming batch plus `replay_batch_size` buffer samples,
one cross-entropy over all seen classes, in one forward pass. A fresh replay sample is drawn for each of the
`iters` updates."""

from dataclasses import dataclass
from typing import Any

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
        n = len(batch.y)
        loss, logits, inputs, y = self.run_step(self.step_loss, *self.step_args(batch), once=self.first_step())
        self.distill_pass(inputs, logits)
        self.report("new", logits, y, self.seen, scale=n / len(y), rows=slice(None, n))
        self.report("replay", logits, y, self.seen, scale=1 - n / len(y), rows=slice(n, None))
        self.step(loss)
        return loss, logits[:n]

    def step_args(self, batch: Batch) -> tuple[object, ...]:
        """The replay draw: (x, y, x_mem, y_mem, seen), `step_loss`'s arguments."""
        mem = self.replay(self.cfg.replay_batch_size)
        x_mem, y_mem = (None, None) if mem is None else (mem[0], mem[1])
        return batch.x, batch.y, x_mem, y_mem, self.seen

    def packed_outputs(self, args: tuple[object, ...], outputs: tuple[Any, ...]) -> tuple[torch.Tensor, ...]:
        x = args[0]
        assert isinstance(x, torch.Tensor)  # the incoming rows (step_args)
        return outputs[0], outputs[1][: len(x)]

    def step_loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        x_mem: torch.Tensor | None,
        y_mem: torch.Tensor | None,
        seen: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The step's tensor work (compiled with compile_step): [incoming; replayed] rows -> (loss, logits, model
        inputs, labels)."""
        if x_mem is not None and y_mem is not None:
            x, y = torch.cat([x, x_mem]), torch.cat([y, y_mem])
        inputs = self.to_input(x)
        logits = self.forward_float(inputs)
        return er_loss(logits, y, seen), logits, inputs, y

    def split_blocker(self) -> str | None:
        return self.hooks_blocker()
