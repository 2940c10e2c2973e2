"""PCR, proxy-based contrastive replay (Lin, Zhang, Feng, Li, Ye, CVPR 2023; official code FelixHuiweiLin/PCR,
agents/pcr.py, models/resnet.py's cosLinear, utils/loss.py's SupConLoss in 'proxy' mode).

Each update: `replay_batch_size` buffer rows are drawn; the incoming rows and the replayed rows each get one
augmented copy (SimCLR-style: random resized crop 0.2-1, horizontal flip, colour jitter (0.4, 0.4, 0.4, 0.1)
with p = 0.8, grayscale with p = 0.2; `cil.core.augment.SimCLRAugment`), so the batch holds [x, A(x)] for both.
Features are L2-normalised, the proxies are the head's weight rows, L2-normalised (the head's bias is unused),
and every row is contrasted with the proxies of the classes present in the batch, each class counted once per
row carrying it (`cil.core.objectives.pcr`):

    L = mean_i -log( exp(z_i . p_{y_i} / tau) / sum_j exp(z_i . p_{y_j} / tau) ),  j over the batch's rows.

There is no other term: the official code adds `0 * CE` of the incoming rows, which changes nothing. With an
empty buffer (the stream's first batch) the official code steps on that zero loss, so the first batch trains
nothing (only batch-norm running statistics move); so does this one.

Evaluation and online accuracy use the cosine head: cos(f(x), w_c) / 0.09 (cosLinear), masked to the seen
classes by the learner. As in the official code, incoming and replayed rows go through the model in two forward
passes (`separate_passes`), the incoming batch is augmented once per batch (shared by its `iters` updates) and
a fresh replay batch is drawn and augmented for every update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import torch

from cil.core.augment import SimCLRAugment
from cil.core.data.stream import Batch
from cil.core.methods.base import Method, ReplayConfig, StepOutput, register
from cil.core.models import Backbone
from cil.core.objectives.common import classes_mask
from cil.core.objectives.pcr import cosine_logits, pcr_loss
from cil.errors import require

#: the official cosLinear's scale: evaluation logits are cosines / 0.09 (the argmax does not depend on it)
EVAL_SCALE = 0.09


@dataclass
class PCRConfig(ReplayConfig):
    name: str = "pcr"
    temperature: float = 0.09  # tau of the proxy-contrastive loss (official --pcr_temp 0.09)
    augment: bool = True  # add an augmented copy of every incoming and replayed image (official); False: originals only
    # incoming and replayed rows in two forward passes (own batch-norm statistics), as the official code; False: one
    separate_passes: bool = True

    def validate(self) -> None:
        super().validate()
        require(
            self.replay_batch_size >= 1,
            "method.replay_batch_size",
            self.replay_batch_size,
            "PCR learns only from batches mixed with replayed rows; use an integer >= 1",
        )
        require(self.temperature > 0, "method.temperature", self.temperature, "use a number > 0 (paper: 0.09)")


@register
class PCR(Method):
    name = "pcr"
    Config = PCRConfig
    cfg: PCRConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        size = tuple(self.input_shape[1:]) if self.input_shape else None
        self.augment: SimCLRAugment | None = SimCLRAugment(size) if self.cfg.augment and size else None
        self._incoming_aug: torch.Tensor | None = None  # A(x) of the current batch, shared by its updates
        # (softmax logits, labels, incoming rows) of the last update, detached
        self._last: tuple[torch.Tensor, torch.Tensor, int] | None = None

    @property
    def net(self) -> Backbone:
        return cast(Backbone, getattr(self.model, "_orig_mod", self.model))  # torch.compile wraps the model

    # -- inputs ----------------------------------------------------------------------------------------------
    def _views(self, x_new: torch.Tensor, x_mem: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[x, A(x)] of the incoming rows and of the replayed rows, as [0, 1] floats. The incoming rows' A(x) is
        drawn at the first update of a batch (in one call with that update's replayed rows) and kept."""
        if self.augment is None:
            return x_new, x_mem
        mem_aug: torch.Tensor | None
        if self._incoming_aug is None:
            both = x_new if x_mem is None else torch.cat([x_new, x_mem])
            aug = self.augment(both, self.generator)
            self._incoming_aug, mem_aug = aug[: len(x_new)], aug[len(x_new) :]
        else:
            mem_aug = None if x_mem is None else self.augment(x_mem, self.generator)
        x_new = torch.cat([x_new, self._incoming_aug])
        if x_mem is None:
            return x_new, None
        assert mem_aug is not None  # drawn above with x_mem
        return x_new, torch.cat([x_mem, mem_aug])

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.net.features(self.from_unit(x)).float()

    # -- one incoming batch ----------------------------------------------------------------------------------
    def observe(self, batch: Batch) -> StepOutput:
        self._incoming_aug = None
        try:
            return super().observe(batch)
        finally:
            self._incoming_aug = None

    def begin_batch(self, batch: Batch) -> None:
        """A peer stepped with `update` alone (CCL-DC's) draws the augmented copy of each new batch, as `observe`
        does, instead of reusing the previous batch's."""
        self._incoming_aug = None
        super().begin_batch(batch)

    def update(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(batch.y)
        mem = self.replay(self.cfg.replay_batch_size)
        x_new, x_mem = self._views(batch.x.float() / 255.0, None if mem is None else mem[0].float() / 255.0)
        reps = 2 if self.augment is not None else 1
        y_new = batch.y.repeat(reps)
        f_mem: torch.Tensor | None
        if mem is None:
            f_new, f_mem = self._features(x_new), None
        else:
            assert x_mem is not None  # the views of the replayed rows
            if self.cfg.separate_passes:
                f_new, f_mem = self._features(x_new), self._features(x_mem)
            else:
                f = self._features(torch.cat([x_new, x_mem]))
                f_new, f_mem = f[: len(x_new)], f[len(x_new) :]
        proxies = self.head.weight.float()
        logits_new = cosine_logits(f_new[:n].detach(), proxies.detach(), EVAL_SCALE)
        if mem is None:  # the official step on 0 * CE: zero gradients, nothing learned
            loss = cosine_logits(f_new, proxies, EVAL_SCALE).sum() * 0.0
            self._last = None
        else:
            assert f_mem is not None  # the replayed rows' features
            y = torch.cat([y_new, mem[1].repeat(reps)])
            loss, logits = pcr_loss(torch.cat([f_new, f_mem]), y, proxies, self.cfg.temperature)
            present, rows = classes_mask(y, logits.shape[1]), len(y_new)
            self.report("new", logits, y, present, scale=rows / len(y), rows=slice(None, rows))
            self.report("replay", logits, y, present, scale=1 - rows / len(y), rows=slice(rows, None))
            self._last = (logits.detach(), y, rows)
        self.step(loss)
        return loss, logits_new

    # -- evaluation ------------------------------------------------------------------------------------------
    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """The cosine head: cos(f(x), w_c) / 0.09 over every head unit (the learner masks to the seen classes)."""
        return cosine_logits(self.net.features(x).float(), self.head.weight.float(), EVAL_SCALE)

    def logits_of(self, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The cosine head of `model` (an MKD teacher or averaged weights too): mkd_ocl's pcr_ema distils and
        evaluates cos(f(x), w_c) / 0.09."""
        net = cast(Backbone, getattr(model, "_orig_mod", model))
        with self.autocast():
            features = net.features(x)
        return cosine_logits(features.float(), net.head.weight.float(), EVAL_SCALE)

    def log_values(self) -> dict[str, float]:
        """The last update's PCR loss over its incoming rows and over its replayed rows (both views)."""
        if self._last is None:
            return {}
        logits, y, rows = self._last
        counts = torch.zeros(logits.shape[1], dtype=logits.dtype, device=logits.device).index_add(
            0, y, torch.ones_like(y, dtype=logits.dtype)
        )
        per_row = torch.logsumexp(logits, dim=1) - (logits.gather(1, y[:, None]).squeeze(1) - counts[y].log())
        return {"pcr/loss_new": float(per_row[:rows].mean()), "pcr/loss_replay": float(per_row[rows:].mean())}
