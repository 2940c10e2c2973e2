"""GSA (Guo, Liu, Zhao, CVPR 2023): the step of ../shared/gsa.md, one incoming batch at a time.

Step numbers in comments refer to the spec. Choices of the official code that the spec leaves open:
- Xc is the incoming batch first, then the current-task buffer samples, so "the first floor(R*r) items of Xc"
  prefer fresh data (as the official code orders them).
- The two views are the augmented batch and its horizontal flip, [A(x), hflip(A(x))], as the spec and the issue
  state. The official code's view function draws the augmentation twice, [A(x), hflip(A'(x))]:
  `independent_views=true` reproduces that. The new-data branch then gets one more augmentation pass
  (`new_branch_augment`), as in the official code.
- All augmentations of a step are drawn at once (`draw_augmentations`), in the order the step applies them; on
  CPU this equals drawing them call by call, bit for bit. The mixed replay batch is therefore composed before
  the new-data forward pass (its buffer draws use the buffer's own generator, so nothing changes).
- The new-data and replay branches are separate forward passes (separate batch-norm statistics), as in the
  official code.
- "Seen classes" are the labels observed in the stream so far; r = |seen classes of task t| / |seen classes|.
  The official code's softmax also spans the not-yet-observed classes of the current task (its head grows a task
  at a time); with batches shuffled across a task's classes the two agree after a few batches.
"""
from __future__ import annotations

from typing import Optional

import torch

from cil.augment import GSAAugment, PreDrawn, two_views
from cil.methods.base import Method, to_float
from cil.objectives.gsa import GradientStats, gsa_new_loss, gsa_replay_loss


class GSA(Method):
    name = "gsa"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        cfg = self.cfg
        self.stats = GradientStats(self.num_classes, device=self.device)
        size = tuple(self.input_shape[1:]) if self.input_shape else None
        self.augment = GSAAugment(size, scale=tuple(cfg.crop_scale), grayscale_p=cfg.grayscale_p) \
            if cfg.augment and size else None
        self.last_weights = torch.ones(self.num_classes, device=self.device)

    def views(self, x: torch.Tensor, augment: Optional[PreDrawn] = None) -> torch.Tensor:
        """[A(x), hflip(A(x))] (or a single A(x) with two_views off); labels repeat in the same order. A is
        ``augment`` (draws made by `draw_augmentations`) when given, else ``self.augment`` (or none)."""
        aug = augment if augment is not None else self.augment
        aug = aug if aug is not None else (lambda v, g: v)
        if not self.cfg.two_views:
            return aug(x, self.generator)
        return two_views(x, aug, self.generator, independent=self.cfg.independent_views)

    def draw_augmentations(self, x: torch.Tensor, n_replay: int) -> Optional[PreDrawn]:
        """Every augmentation draw of one step at once, in the order the step applies them: the views of Xc
        (``x``), the new-branch pass over those views, the views of the ``n_replay``-row replay batch. One
        batched draw instead of three; on CPU equal to drawing call by call, bit for bit."""
        cfg = self.cfg
        if self.augment is None:
            return None
        draws_per_views = 2 if cfg.two_views and cfg.independent_views else 1
        n_views = (2 if cfg.two_views else 1) * len(x)
        rows = draws_per_views * (len(x) + n_replay) + (n_views if cfg.new_branch_augment else 0)
        return PreDrawn(self.augment, rows, x.shape[-2], x.shape[-1], self.generator)

    def repeat_labels(self, y: torch.Tensor) -> torch.Tensor:
        return torch.cat([y, y]) if self.cfg.two_views else y  # = y.repeat(2), at half its cost on a CPU

    def update(self, batch):
        loss, logits_new = self.loss(batch.x, batch.y, batch.task, batch.step_in_task)
        # 8. One optimizer step. (9. The learner adds the raw batch to the buffer afterwards.)
        self.step(loss)
        return loss, logits_new

    def as_input(self, x: torch.Tensor) -> torch.Tensor:
        """Raw uint8 images -> float model input; float inputs (e.g. from Avalanche) pass unchanged."""
        return to_float(x, self.channels_last) if x.dtype == torch.uint8 else x

    def loss(self, x: torch.Tensor, y_new: torch.Tensor, t: int, step_in_task: int):
        """Steps 1-7 on one incoming batch: returns (L, logits of the incoming rows). No optimizer step, no
        buffer update: our learner and the Avalanche plugin (cil.avalanche.GSAPlugin) both call this."""
        cfg = self.cfg
        n = len(y_new)

        # 1. Xc: the incoming batch plus up to `current_task_replay` buffer samples of the current task
        # (converted to float once, after the concatenation, when both are raw images).
        cur = self.replay(cfg.current_task_replay, task=t)
        if cur is None:
            xc, yc = self.as_input(x), y_new
        elif x.dtype == cur[0].dtype:
            xc, yc = self.as_input(torch.cat([x, cur[0]])), torch.cat([y_new, cur[1]])
        else:  # float incoming rows (the Avalanche plugin) and raw buffer rows
            xc, yc = torch.cat([self.as_input(x), self.as_input(cur[0])]), torch.cat([y_new, cur[1]])

        # 3 (composed first, so the step's augmentations can be drawn at once). The balanced mixed replay batch,
        # skipped on the very first batch: the buffer is empty.
        xm, ym = None, None
        if self.buffer is not None and len(self.buffer) > 0:
            xm, ym = self.mixed_replay_batch(xc, yc, t)
        aug = self.draw_augmentations(xc, 0 if xm is None else len(xm))

        # 2. New-data loss over the current task's classes only.
        v = self.views(xc, aug)
        if aug is not None and cfg.new_branch_augment:
            v = aug(v)
        logits_new = self.forward_float(v)
        new_mask = self.task_classes if cfg.task_only_new_loss else self.seen
        yv = self.repeat_labels(yc)
        loss = gsa_new_loss(logits_new, yv, new_mask)
        self.report("new", logits_new, yv, new_mask)

        if xm is not None:
            # 4-7. Softmax over seen classes, statistics updated first, then the weighted replay loss.
            logits_m = self.forward_float(self.views(xm, aug))
            ym = self.repeat_labels(ym)
            self.stats.update(logits_m, ym, self.seen)
            warm = step_in_task < cfg.warmup_batches
            if cfg.adaptive_weights and not warm:
                self.last_weights = self.stats.weights()
            else:
                self.last_weights = torch.ones_like(self.last_weights)
            loss = cfg.buffer_loss_weight * gsa_replay_loss(logits_m, ym, self.last_weights, self.seen) + loss
            self.report("replay", logits_m, ym, self.seen, cfg.buffer_loss_weight, self.last_weights)
        assert aug is None or aug.left == 0, "draw_augmentations drew more rows than the step used"

        return loss, logits_new[:n].detach()

    def mixed_replay_batch(self, xc: torch.Tensor, yc: torch.Tensor, task: int):
        """floor(R(1-r)) samples of other tasks + the first floor(R r) items of Xc, r = seen current / seen."""
        r_batch = self.cfg.replay_batch_size
        if not self.cfg.balanced_replay:
            mem = self.replay(r_batch)
            return self.as_input(mem[0]), mem[1]
        r = len(self.seen_labels & self.task_labels) / max(len(self.seen_labels), 1)
        n_old, n_cur = int(r_batch * (1 - r)), int(r_batch * r)
        old = self.replay(n_old, exclude_task=task)
        if old is None:
            return xc[:n_cur], yc[:n_cur]
        # Row order does not matter to a mean loss or to batch norm, so the spec's shuffle is left out.
        return torch.cat([self.as_input(old[0]), xc[:n_cur]]), torch.cat([old[1], yc[:n_cur]])

    def extra_results(self) -> dict:
        seen = sorted(self.seen_labels)
        return {"gsa": {
            "classes": seen,
            "positive": self.stats.positive.cpu()[seen].tolist(),
            "negative": self.stats.negative.cpu()[seen].tolist(),
            "weights": self.stats.weights().cpu()[seen].tolist(),
        }}

    def log_values(self) -> dict[str, float]:
        """Per seen class c: w_c = 2 sigmoid(r_c - 1) from the accumulated statistics (the weight the replay loss
        uses outside warm-up) and r_c = G+_c / G-_c; an infinite ratio (no negative mass yet) is left out."""
        seen = sorted(self.seen_labels)
        weights, ratios = self.stats.weights().cpu(), self.stats.ratio().cpu()
        out = {}
        for c in seen:
            out[f"gsa/weight/{c}"] = float(weights[c])
            if torch.isfinite(ratios[c]):
                out[f"gsa/ratio/{c}"] = float(ratios[c])
        return out

    def state_dict(self) -> dict:
        return {**super().state_dict(), "stats": self.stats.state_dict(), "last_weights": self.last_weights.clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.stats.load_state_dict(state["stats"])
        self.last_weights.copy_(state["last_weights"])
