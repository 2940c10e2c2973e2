"""OCM (Guo, Liu, Zhao, ICML 2022: online continual learning through mutual information maximisation), as its
official code (gydpku/OCM, test_cifar10.py / test_cifar100.py) trains; docs/methods.md, "OCM", has the equations.

One step on an incoming batch x (N rows):
- Each image is expanded 16-fold: the four rotations (0, 90, 180, 270 degrees) of four "local rotation" variants
  (the image; its left half, its right half, or both halves turned 180 degrees in place). Expanded row k*N + i
  gets the label y_i + k * num_classes (16 distinct label sets).
- Two views: [X16; A(X16)] with A the official "simclr" augmentation (random horizontal flip p = 0.5, random
  grayscale p = 0.25, random resized crop of scale 0.3-1.0 as an affine map with reflection).
- A linear projection head (`own`ed, 128-d) on the backbone features; z = normalise(proj(f)), and
  S = w z z^T + w z f~^T where f~ is a random 128-wide window of the normalised features f.
- Task 0: L = CE(head(A(x)), y) + L_new(S) with w = 1.
- Later tasks (with min(64, 7 * |seen classes|) buffer rows m drawn uniformly): one forward pass over both pairs;
  L = CE(head(A(m)), y_m) + L_new(S) + L_buf(S_m) + L_prev + MSE(old-class logits of A'(m), previous model's)
  with w = 0.5 (CIFAR-10 code; the CIFAR-100 code keeps 1), L_prev contrasting the current projections of the
  unaugmented rotated buffer rows with the previous model's (the model as it was when the task started; its batch
  norm in training mode, as the official copy is). New data get no cross-entropy after task 0.
Evaluation: the classifier head (masked to the seen classes by the learner, as for every method).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from cil.core.augment import CROPS, rotation_views
from cil.core.data.stream import Batch
from cil.core.methods.base import Method, ReplayConfig, register
from cil.core.models import Backbone
from cil.core.objectives.ocm import (
    ocm_ce,
    ocm_nt_xent_buffer,
    ocm_nt_xent_new,
    ocm_nt_xent_previous,
    ocm_similarity,
    old_logit_mse,
)
from cil.errors import ConfigError, require


@dataclass
class OCMConfig(ReplayConfig):
    name: str = "ocm"
    replay_batch_size: int = 64  # most buffer rows replayed per step (official: 64)
    replay_per_class: int = 7  # rows replayed = min(replay_batch_size, this * |seen classes|); 0: always the max
    temperature: float = 0.07  # tau of every contrastive loss
    proj_dim: int = 128  # width of the linear projection head (must be below the backbone's feature width)
    sim_weight: float = 0.5  # w of both similarity terms after task 0 (CIFAR-10 code 0.5, CIFAR-100 code 1.0)
    first_task_sim_weight: float = 1.0  # w during task 0 (both official scripts: 1)
    local_rotations: bool = True  # 16 transforms (4 rotations x 4 half-image rotations); False: the 4 rotations
    distill: bool = True  # after task 0: L_prev and the old-class logit MSE against the previous model
    ce_classes: str = "all"  # softmax of the cross-entropy: "all" head units (official) or "seen" classes
    crop: str = "affine"  # "affine": the official crop (reflection at the borders); "torchvision"
    crop_scale: list[float] = field(default_factory=lambda: [0.3, 1.0])  # area range of the random crop
    grayscale_p: float = 0.25  # probability of random grayscale
    flip_p: float = 0.5  # probability of the horizontal flip

    def validate(self) -> None:
        super().validate()
        require(
            self.replay_batch_size >= 1,
            "method.replay_batch_size",
            self.replay_batch_size,
            "use an integer >= 1 (OCM replays buffer rows after the first task)",
        )
        require(
            self.replay_per_class >= 0,
            "method.replay_per_class",
            self.replay_per_class,
            "use an integer >= 0 (0: always replay_batch_size rows)",
        )
        require(self.temperature > 0, "method.temperature", self.temperature, "use a number > 0")
        require(self.proj_dim >= 1, "method.proj_dim", self.proj_dim, "use an integer >= 1")
        require(self.sim_weight > 0, "method.sim_weight", self.sim_weight, "use a number > 0")
        require(
            self.first_task_sim_weight > 0,
            "method.first_task_sim_weight",
            self.first_task_sim_weight,
            "use a number > 0",
        )
        require(self.ce_classes in ("all", "seen"), "method.ce_classes", self.ce_classes, "choose 'all' or 'seen'")
        require(self.crop in CROPS, "method.crop", self.crop, f"choose one of {sorted(CROPS)}")
        scale = list(self.crop_scale)
        require(
            len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
            "method.crop_scale",
            scale,
            "use [lo, hi] with 0 < lo <= hi <= 1",
        )
        require(0.0 <= self.grayscale_p <= 1.0, "method.grayscale_p", self.grayscale_p, "use 0 <= p <= 1")
        require(0.0 <= self.flip_p <= 1.0, "method.flip_p", self.flip_p, "use 0 <= p <= 1")


@register
class OCM(Method):
    name = "ocm"
    Config = OCMConfig
    needs_task_boundaries = True  # task 0 / later tasks, the previous model, the old classes
    cfg: OCMConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        feat_dim = self.head.in_features
        if cfg.proj_dim >= feat_dim:
            raise ConfigError(
                f"method.proj_dim={cfg.proj_dim!r} is not allowed: use a width below the model's "
                f"feature width {feat_dim} (OCM compares the projection with a window of the features)"
            )
        if (
            self.input_shape is None
            or self.input_shape[1] != self.input_shape[2]
            or (cfg.local_rotations and self.input_shape[2] % 2)
        ):
            raise ConfigError(
                f"method=ocm needs square images (even width with method.local_rotations=true); "
                f"got input shape {self.input_shape}"
            )
        self.proj = self.own("proj", nn.Linear(feat_dim, cfg.proj_dim))
        size = tuple(self.input_shape[1:])
        self.augment = CROPS[cfg.crop](size, scale=tuple(cfg.crop_scale), grayscale_p=cfg.grayscale_p)
        self.n_transforms = 16 if cfg.local_rotations else 4
        self.previous: nn.ModuleDict | None = None  # {"model", "proj"}: frozen copies from the task's start
        self.old = torch.zeros(self.num_classes, dtype=torch.bool, device=self.device)  # seen before the task
        self.n_old = 0
        self.last: dict[str, torch.Tensor] = {}

    # -- task boundaries -------------------------------------------------------------------------------------
    def on_task_start(self, task: int, classes: torch.Tensor) -> None:
        super().on_task_start(task, classes)
        self.old = self.classes.seen.clone()
        self.n_old = len(self.classes.seen_labels)
        if task > 0 and self.cfg.distill:
            self.previous = self._frozen_copy()

    def _frozen_copy(self) -> nn.ModuleDict:
        copies = nn.ModuleDict(
            {"model": copy.deepcopy(getattr(self.model, "_orig_mod", self.model)), "proj": copy.deepcopy(self.proj)}
        )
        copies.requires_grad_(False)
        return copies.train()  # the official copy runs in training mode (batch statistics)

    # -- the step ----------------------------------------------------------------------------------------------
    def simclr_augment(self, x: torch.Tensor) -> torch.Tensor:
        """Random horizontal flip, then random grayscale and the random resized crop (per sample)."""
        flip = torch.rand(len(x), generator=self.generator, device=self.generator.device) < self.cfg.flip_p
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return self.augment(x, self.generator)

    def expanded_labels(self, y: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.n_transforms, device=y.device) * self.num_classes
        return (offsets[:, None] + y[None, :]).reshape(-1)

    def window_start(self) -> torch.Tensor:
        """A uniform start in [0, D - P) for the feature window (a 0-d device tensor)."""
        span = self.head.in_features - self.cfg.proj_dim
        return torch.randint(span, (), generator=self.generator, device=self.generator.device)

    def n_replay(self) -> int:
        cfg = self.cfg
        if cfg.replay_per_class == 0:
            return cfg.replay_batch_size
        return min(cfg.replay_batch_size, cfg.replay_per_class * len(self.classes.seen_labels))

    def embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(normalised features, normalised projections, logits) of model inputs, one forward pass."""
        model = cast(Backbone, getattr(self.model, "_orig_mod", self.model))  # torch.compile wraps the model
        with self.autocast():
            f = model.features(x)
            u, logits = self.proj(f), model.head(f)
        f, u = f.float(), u.float()
        return F.normalize(f, dim=1), F.normalize(u, dim=1), logits.float()

    def update(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        n = len(batch.y)
        assert batch.task is not None  # OCM needs task boundaries (a disjoint stream)
        mem = self.replay(self.n_replay()) if batch.task > 0 else None
        ce_mask = None if cfg.ce_classes == "all" else self.seen
        x = self.to_input(batch.x)
        x16 = rotation_views(x, cfg.local_rotations)
        y16 = self.expanded_labels(batch.y)
        if mem is None:
            pair = torch.cat([x16, self.simclr_augment(x16)])
            f, z, logits = self.embed(pair)
            sim = ocm_similarity(z, f, self.window_start(), cfg.first_task_sim_weight)
            l_new = ocm_nt_xent_new(sim, torch.cat([y16, y16]), cfg.temperature)
            with self.autocast():
                ce_logits = self.model(self.simclr_augment(x)).float()
            l_ce = ocm_ce(ce_logits, batch.y, ce_mask)
            self.report("new", ce_logits, batch.y, self.seen if ce_mask is not None else torch.ones_like(self.seen))
            loss = l_ce + l_new
            self.last = {"ce": l_ce.detach(), "new": l_new.detach()}
        else:
            xm, ym = self.to_input(mem[0]), mem[1]
            m16 = rotation_views(xm, cfg.local_rotations)
            ym16 = self.expanded_labels(ym)
            k = len(x16)
            aug = self.simclr_augment(torch.cat([x16, m16]))
            f, z, logits = self.embed(torch.cat([x16, aug[:k], m16, aug[k:]]))
            rows = 2 * k
            start_new, start_buf = self.window_start(), self.window_start()
            sim = ocm_similarity(z[:rows], f[:rows], start_new, cfg.sim_weight)
            sim_m = ocm_similarity(z[rows:], f[rows:], start_buf, cfg.sim_weight)
            l_new = ocm_nt_xent_new(sim, torch.cat([y16, y16]), cfg.temperature)
            l_buf = ocm_nt_xent_buffer(sim_m, torch.cat([ym16, ym16]), cfg.temperature)
            am = self.simclr_augment(torch.cat([xm, xm]))
            with self.autocast():
                ce_logits = self.model(am[: len(ym)]).float()
            l_ce = ocm_ce(ce_logits, ym, ce_mask)
            self.report("replay", ce_logits, ym, self.seen if ce_mask is not None else torch.ones_like(self.seen))
            loss = l_ce + l_new + l_buf
            self.last = {"ce": l_ce.detach(), "new": l_new.detach(), "buffer": l_buf.detach()}
            if self.previous is not None:
                with torch.no_grad(), self.autocast():
                    prev_model = cast(Backbone, self.previous["model"])
                    prev_u = self.previous["proj"](prev_model.features(m16)).float()
                    prev_logits = self.previous["model"](am[len(ym) :]).float()
                prev_z = F.normalize(prev_u, dim=1)
                l_prev = ocm_nt_xent_previous(z[rows : rows + len(m16)] @ prev_z.t(), ym16, cfg.temperature)
                l_mse = old_logit_mse(ce_logits, prev_logits, self.old, self.n_old)
                loss = loss + l_prev + l_mse
                self.last.update(previous=l_prev.detach(), logit_mse=l_mse.detach())
        self.step(loss)
        return loss, logits[:n].detach()

    # -- logging and state -----------------------------------------------------------------------------------
    def log_values(self) -> dict[str, float]:
        return {f"ocm/{k}": float(v) for k, v in self.last.items()}

    def state_dict(self) -> dict[str, Any]:
        state = {**super().state_dict(), "ocm_old": self.old.cpu(), "ocm_n_old": self.n_old}
        if self.previous is not None:
            state["ocm_previous"] = {k: v.cpu() for k, v in self.previous.state_dict().items()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.old = state["ocm_old"].to(self.device, copy=True)
        self.n_old = int(state["ocm_n_old"])
        self.previous = None
        if "ocm_previous" in state:
            self.previous = self._frozen_copy()
            self.previous.load_state_dict(state["ocm_previous"])
