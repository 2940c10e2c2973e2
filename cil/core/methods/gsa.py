"""GSA (Guo, Liu, Zhao, CVPR 2023): the step of docs/gsa.md, one incoming batch at a time.

`GSAStep` is the step itself (spec steps 1-7: current-task replay, the task-only new-data loss, the balanced
mixed replay batch, the gradient statistics and the weighted replay loss) behind a public interface: the caller
hands it a forward function, the raw incoming batch and a function that turns stored images into model input.
Our learner drives it through the `GSA` method below; the Avalanche plugin (cil.avalanche.GSAPlugin) drives the
same object from Avalanche's callbacks.

Step numbers in comments refer to the spec. Choices of the official code that the spec leaves open:
- Xc is the incoming batch first, then the current-task buffer samples, so "the first floor(R*r) items of Xc"
  prefer fresh data (as the official code orders them).
- The two views are the augmented batch and its horizontal flip, [A(x), hflip(A(x))], as in the runnable
  release of the official code; `independent_views=true` draws the augmentation twice, [A(x), hflip(A'(x))],
  as a later version of it does. The new-data branch then gets one more augmentation pass
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

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Unpack

import torch
from torch import Tensor

from cil.core.augment import CROPS, GSAAugment, PaddedCropAugment, PreDrawn, two_views
from cil.core.buffer import ReplayBuffer, SampleFilters
from cil.core.data.stream import Batch
from cil.core.methods.base import BalancedReplayConfig, ClassSets, Method, MethodConfig, StepOutput, register
from cil.core.objectives.balance import Magnitude, class_log_values, logit_grad_norm, make_rule
from cil.core.objectives.gsa import GradientStats, gsa_new_loss, gsa_replay_loss
from cil.errors import require

Forward = Callable[[Tensor], Tensor]


@dataclass
class GSAConfig(BalancedReplayConfig):
    """The spec's defaults; each of the paper's choices can be switched off for ablations."""

    name: str = "gsa"
    replay_batch_size: int = 64  # R: size of the balanced mixed replay batch
    current_task_replay: int = 22  # buffer samples of the current task joined to the incoming batch
    warmup_batches: int = 5  # per task: weights fixed at 1 while statistics accumulate
    buffer_loss_weight: float = 2.0  # L = 2 * L_buf + L_new
    adaptive_weights: bool = True  # False: the old name of balance=constant (w_c = 1), kept as an alias
    balanced_replay: bool = True  # False: replay batch drawn uniformly from the whole buffer
    task_only_new_loss: bool = True  # False: new-data loss over all seen classes
    two_views: bool = True  # [A(x), hflip(A(x))]; False: one augmented view
    independent_views: bool = False  # True: [A(x), hflip(A'(x))], two draws
    augment: bool = True  # random grayscale + random resized crop
    new_branch_augment: bool = True  # the official code's extra augmentation pass on the new-data branch
    crop_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])
    grayscale_p: float = 0.2
    # The official code's behaviour where it differs (experiment=gsa_*_official turns these on; docs/methods.md)
    crop: str = "torchvision"  # "affine": the official crop (half-pixel offsets, reflection at the borders);
    # "padded": mkd_ocl's GSA, RandomCrop(size, padding=crop_padding) with one offset per call + flip p 0.5;
    # "kornia": CCL-DC's GSA, kornia's RandomResizedCrop (candidates strictly inside the image, its own fallback)
    crop_padding: int = 4  # crop=padded: zero padding on every side
    bn_extra_passes: bool = False  # the official step's forward passes outside the loss (batch-norm statistics)
    fresh_head_rows: bool = False  # a task's head rows re-initialised when it starts (a head grown per task)
    freeze_head_after_first_task: bool = False  # the official code's defect: the head stops learning after task 0
    # The GSA of the add-on papers (mkd_ocl, CCL-DC; docs/methods.md, "GSA as the add-on papers run it")
    train_without_replay: bool = True  # False: the whole step is skipped while the buffer is empty (theirs)
    replay_with_replacement: bool = False  # True: buffer draws with replacement (their np.random.choice)
    # Task-free GSA (docs/methods.md, "Task-free GSA"): the current classes and pseudo-tasks come from the stream
    task_free: bool = False  # True: never read the task; runs on streams without boundaries (stream.kind=iblurry...)
    current_classes: str = "novelty"  # task_free: "novelty" (classes since the last novel class) | "window"
    current_window: int = 10  # current_classes=window: the classes of the last W incoming batches

    def validate(self) -> None:
        super().validate()
        require(
            self.current_task_replay >= 0, "method.current_task_replay", self.current_task_replay, "use an integer >= 0"
        )
        require(self.warmup_batches >= 0, "method.warmup_batches", self.warmup_batches, "use an integer >= 0")
        require(self.buffer_loss_weight >= 0, "method.buffer_loss_weight", self.buffer_loss_weight, "use a number >= 0")
        require(0.0 <= self.grayscale_p <= 1.0, "method.grayscale_p", self.grayscale_p, "use 0 <= p <= 1")
        scale = list(self.crop_scale)
        require(
            len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
            "method.crop_scale",
            scale,
            "use [lo, hi] with 0 < lo <= hi <= 1",
        )
        require(self.crop in GSA_CROPS, "method.crop", self.crop, f"choose one of {', '.join(GSA_CROPS)}")
        require(self.crop_padding >= 0, "method.crop_padding", self.crop_padding, "use an integer >= 0")
        require(
            self.current_classes in CURRENT_CLASSES,
            "method.current_classes",
            self.current_classes,
            f"choose one of {', '.join(CURRENT_CLASSES)} (docs/methods.md, Task-free GSA)",
        )
        require(self.current_window >= 1, "method.current_window", self.current_window, "use an integer >= 1")
        for key in ("fresh_head_rows", "freeze_head_after_first_task"):
            require(
                not (self.task_free and getattr(self, key)),
                f"method.{key}",
                True,
                f"it acts at task starts, which task-free GSA does not read; drop method.{key} or set "
                "method.task_free=false",
            )
        require(
            self.adaptive_weights or self.balance in ("cumulative", "constant"),
            "method.adaptive_weights",
            self.adaptive_weights,
            f"adaptive_weights=false is the old name of method.balance=constant and "
            f"contradicts method.balance={self.balance}; drop method.adaptive_weights",
        )

    def balance_rule(self) -> str:
        return self.balance if self.adaptive_weights else "constant"

    def buffer_draws(self) -> dict[str, int]:
        return {**super().buffer_draws(), "method.current_task_replay": self.current_task_replay}


CURRENT_CLASSES = ("novelty", "window")
GSA_CROPS = (*CROPS, "kornia", "padded")  # the resized crops (torchvision's, the affine one, kornia's); mkd_ocl's


def gsa_augment(cfg: GSAConfig, image_size: Sequence[int]) -> GSAAugment:
    """GSA's augmentation A for images of `image_size` (H, W) under `cfg.crop`."""
    if cfg.crop == "padded":
        return PaddedCropAugment(image_size, grayscale_p=cfg.grayscale_p, padding=cfg.crop_padding)
    if cfg.crop == "kornia":  # CCL-DC's GSA (src/learners/baseline/gsa.py:46-49): kornia RandomResizedCrop
        return GSAAugment(image_size, scale=tuple(cfg.crop_scale), grayscale_p=cfg.grayscale_p, bounds="kornia")
    return CROPS[cfg.crop](image_size, scale=tuple(cfg.crop_scale), grayscale_p=cfg.grayscale_p)


class PseudoTasks:
    """Task-free GSA's stand-in for the task (docs/methods.md, "Task-free GSA"), from the incoming labels alone.

    A batch holding a label never seen before is a *novelty event*: it starts a new pseudo-task. The pseudo-task
    index (novelty events so far, minus one) and the batches since the last event replace the task index and the
    step in the task (the warm-up and `balance=task_reset` restart at every event). The *current classes* replace
    the task's classes (the new-data loss's mask, the current-class buffer draw, the mixed-batch ratio):
    - ``novelty``: the labels of the batch that brought the last novel class and of every batch since;
    - ``window``: the labels of the last ``window`` incoming batches (this one included).
    Both always hold the incoming batch's labels. They are written into `classes` (a ClassSets) as its task mask,
    task labels and task, so the step reads them where task-aware GSA reads the task's. Call `observe` once per
    incoming batch, before `classes.mark_seen` (novelty is judged against the classes seen before the batch).
    Host work only (Python sets of labels); the device mask is rebuilt, from the batches' device labels, only when
    the set changes (no read-back).
    """

    def __init__(self, classes: ClassSets, rule: str = "novelty", window: int = 10) -> None:
        self.classes, self.rule, self.window = classes, rule, window
        self.task = -1  # pseudo-task index: novelty events so far - 1
        self.step = 0  # incoming batches since the last novelty event (0: the event's batch)
        # window: (labels on the host, labels on the device) per batch
        self.recent: deque[tuple[set[int], Tensor]] = deque(maxlen=window)

    def observe(self, y: Tensor, y_host: Tensor) -> tuple[int, int]:
        """Take one incoming batch's labels (device, host); returns (pseudo-task, batches since its start)."""
        classes = self.classes
        labels = set(y_host.tolist())
        novel = not classes.seen_labels.issuperset(labels)
        self.task, self.step = (self.task + 1, 0) if novel else (self.task, self.step + 1)
        if self.rule == "novelty":
            current = labels if novel else classes.task_labels | labels
            if current != classes.task_labels:  # a new mask, never changed in place (ClassSets' rule)
                base = torch.zeros_like(classes.task_mask) if novel else classes.task_mask
                classes.task_mask = base.index_fill(0, y, True)
        else:
            self.recent.append((labels, y))
            current = set().union(*(held for held, _ in self.recent))
            if current != classes.task_labels:
                ys = torch.cat([dev for _, dev in self.recent])
                classes.task_mask = torch.zeros_like(classes.task_mask).index_fill_(0, ys, True)
        classes.task_labels, classes.task = current, self.task
        return self.task, self.step

    def current(self) -> list[int]:
        """The current classes (host), for the buffer's label filter."""
        return sorted(self.classes.task_labels)

    def others(self) -> list[int]:
        """The seen classes outside the current ones (host): the "old" side of the mixed replay batch."""
        return sorted(self.classes.seen_labels - self.classes.task_labels)

    def state_dict(self) -> dict[str, Any]:
        return {"task": self.task, "step": self.step, "recent": [sorted(held) for held, _ in self.recent]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.task, self.step = int(state["task"]), int(state["step"])
        device = self.classes.task_mask.device
        self.recent.clear()
        for held in state["recent"]:  # a batch's labels as a set: the same mask, the same current classes
            self.recent.append((set(held), torch.tensor(held, dtype=torch.long, device=device)))


def _call(fn: Callable[..., Any], *args: Any, once: bool = False) -> Any:
    return fn(*args)


class GSAPlan(NamedTuple):
    """One GSA step's host decisions (`GSAStep.plan`), the input of its tensor work (`GSAStep.step_loss`)."""

    xc: Tensor  # step 1: Xc, the incoming rows then buffer rows of the current task (classes), as stored
    yc: Tensor
    n: int  # the incoming rows
    mixed: bool  # step 3: a mixed replay batch (the buffer holds rows)
    drawn: tuple[Tensor, Tensor] | None  # its buffer rows (`draw_mixed`), or None
    n_cur: int  # the rows of Xc that join them
    aug: PreDrawn | None  # every augmentation draw of the step
    warm: Tensor  # bool []: the replay weights are fixed at 1 (warm-up)


class GSAStep:
    """Spec steps 1-7 for one incoming batch: returns the loss; no optimizer step, no buffer update.

    cfg: the GSA knobs. buffer: the replay memory (its rows are whatever the caller stores: raw uint8 images for
    our learner, model inputs for the Avalanche plugin). classes: the caller's seen / current-task classes
    (read, never changed here). generator: the augmentation's random stream, on the device. image_size: (H, W)
    of the inputs, for the augmentation. to_input: stored rows -> model input (applied to the incoming batch and
    to buffer rows). report: the diagnostics hook of `Method.report`, or None.
    """

    def __init__(
        self,
        cfg: GSAConfig,
        buffer: ReplayBuffer | None,
        classes: ClassSets,
        generator: torch.Generator,
        image_size: Sequence[int] | None,  # (H, W)
        to_input: Callable[[Tensor], Tensor],
        report: Callable[..., None] | None = None,  # Method.report
        distill: Callable[[Tensor, Tensor], None] | None = None,  # Method.distill_pass
    ) -> None:
        self.cfg, self.buffer, self.classes, self.generator = cfg, buffer, classes, generator
        self.distill = distill  # Method.distill_pass: told the replay branch's views and logits (add-ons)
        self.to_input = to_input
        self.report = report if report is not None else (lambda *args, **kwargs: None)
        device = classes.seen.device
        self.rule = make_rule(
            cfg.balance_rule(),
            classes.num_classes,
            device=device,
            momentum=cfg.balance_momentum,
            window=cfg.balance_window,
            ratio=cfg.balance_ratio,
        )
        self.augment = gsa_augment(cfg, image_size) if cfg.augment and image_size else None
        self.last_weights = torch.ones(classes.num_classes, device=device)  # w_c of the last step (1: warm-up)
        # Task-free: pseudo-tasks and current classes from the labels (the caller calls `pseudo.observe`)
        self.pseudo = PseudoTasks(classes, cfg.current_classes, cfg.current_window) if cfg.task_free else None
        self.warm_flags = (torch.tensor(False, device=device), torch.tensor(True, device=device))
        # runs `step_loss`; the GSA method hands in its own (compiled with compile_step)
        self.run_step: Callable[..., Any] = _call

    @property
    def stats(self) -> GradientStats:
        """The gradient statistics (a `GradientStats`) that define the replay weights under the balancing rule."""
        return self.rule.stats

    def grow(self, num_classes: int) -> None:
        """Widen the per-class tensors to `num_classes` (new classes: no statistics, weight 1)."""
        self.classes.grow(num_classes)
        self.rule.grow(num_classes)
        pad = num_classes - len(self.last_weights)
        if pad > 0:
            self.last_weights = torch.cat([self.last_weights, self.last_weights.new_ones(pad)])

    def _sample(self, n: int, **filters: Unpack[SampleFilters]) -> tuple[Tensor, Tensor] | None:
        if self.buffer is None or n <= 0:
            return None
        if self.cfg.replay_with_replacement:  # drawn on the device from the step's generator: no read-back
            filters = {**filters, "replace": True, "generator": self.generator}
        x, y, _ = self.buffer.sample(n, **filters)
        return (x, y) if len(y) else None

    def views(self, x: Tensor, augment: PreDrawn | None = None) -> Tensor:
        """[A(x), hflip(A(x))] (or a single A(x) with two_views off); labels repeat in the same order. A is
        ``augment`` (draws made by `draw_augmentations`) when given, else ``self.augment`` (or none)."""
        chosen = augment if augment is not None else self.augment
        aug: Callable[[Tensor, torch.Generator], Tensor] = chosen if chosen is not None else (lambda v, g: v)
        if not self.cfg.two_views:
            return aug(x, self.generator)
        return two_views(x, aug, self.generator, independent=self.cfg.independent_views)

    def draw_augmentations(self, x: Tensor, n_replay: int) -> PreDrawn | None:
        """Every augmentation draw of one step at once, in the order the step applies them: the views of Xc
        (``x``), the new-branch pass over those views, the views of the ``n_replay``-row replay batch (with
        `bn_extra_passes`, one more augmented copy of Xc first and of the replay batch before its views)."""
        cfg = self.cfg
        if self.augment is None:
            return None
        draws_per_views = 2 if cfg.two_views and cfg.independent_views else 1
        n_views = (2 if cfg.two_views else 1) * len(x)
        rows = draws_per_views * (len(x) + n_replay) + (n_views if cfg.new_branch_augment else 0)
        if cfg.bn_extra_passes:
            rows += len(x) + n_replay
        return PreDrawn(self.augment, rows, x.shape[-2], x.shape[-1], self.generator)

    def repeat_labels(self, y: Tensor) -> Tensor:
        return torch.cat([y, y]) if self.cfg.two_views else y  # = y.repeat(2), at half its cost on a CPU

    def loss(self, forward: Forward, x: Tensor, y: Tensor, task: int, step_in_task: int) -> tuple[Tensor, Tensor]:
        """Steps 1-7 on the incoming batch (x as stored, y its labels): returns (L, logits of the incoming rows,
        detached). `forward` maps model input to float logits over the head. The host decisions come first
        (`plan`), then the tensor work (`step_loss`, through `run_step`: compiled with compile_step)."""
        plan = self.plan(x, y, task, step_in_task)
        # the first step (an empty buffer) runs eagerly: a graph for one step is not worth its compilation
        first = self.buffer is not None and not plan.mixed
        loss, logits_new, weights = self.run_step(self.step_loss, forward, plan, once=first)
        if weights is not None:
            self.last_weights = weights
        return loss, logits_new

    def plan(self, x: Tensor, y: Tensor, task: int, step_in_task: int) -> GSAPlan:
        """The step's host decisions: the buffer draws (host generator), the mixed batch's share, the warm-up and
        the augmentation draws (the device generator), in the order the step has always made them."""
        cfg = self.cfg
        self.rule.start(task)  # task_reset: a new task's first step restarts the statistics
        # 1. Xc: the incoming batch plus up to `current_task_replay` buffer samples of the current task.
        if self.pseudo is None:
            cur = self._sample(cfg.current_task_replay, task=task)
        else:  # task-free: buffer rows of the current classes
            cur = self._sample(cfg.current_task_replay, classes=self.pseudo.current())
        # without buffer rows, copies: views of the stream's tensors would cost a compiled step one more graph
        xc, yc = (x.clone(), y.clone()) if cur is None else (torch.cat([x, cur[0]]), torch.cat([y, cur[1]]))
        # 3 (drawn first, so the step's augmentations can be drawn at once). The balanced mixed replay batch,
        # skipped on the very first batch: the buffer is empty.
        mixed = self.buffer is not None and len(self.buffer) > 0
        drawn, n_cur = self.draw_mixed(task) if mixed else (None, 0)
        n_cur = min(n_cur, len(yc))  # Xc's rows that exist (the slice's own bound, said once for a compiled graph)
        n_replay = (0 if drawn is None else len(drawn[1])) + n_cur if mixed else 0
        aug = self.draw_augmentations(xc, n_replay)
        # the warm-up as a device flag: one graph for both phases, no copy per step
        warm = self.warm_flags[int(step_in_task < cfg.warmup_batches)]
        return GSAPlan(xc, yc, len(y), mixed, drawn, n_cur, aug, warm)

    def step_loss(self, forward: Forward, plan: GSAPlan) -> tuple[Tensor, Tensor, Tensor | None]:
        """Steps 1-7's tensor work on a `plan`: (L, logits of the incoming rows, detached, the replay weights
        used or None without a replay batch)."""
        cfg, classes, rule = self.cfg, self.classes, self.rule
        yc, n, aug = plan.yc, plan.n, plan.aug
        xc = self.to_input(plan.xc)  # converted once, after the concatenation
        xm: Tensor | None = None
        ym: Tensor | None = None
        old: Tensor | None = None
        if plan.mixed:
            xm, ym, old = self.compose_mixed(xc, yc, plan.drawn, plan.n_cur)
        if cfg.bn_extra_passes:  # the official step's contrastive pass over Xc and an augmented copy
            self.statistics_pass(forward, xc, aug)

        # 2. New-data loss over the current task's classes only.
        v = self.views(xc, aug)
        if aug is not None and cfg.new_branch_augment:
            v = aug(v)
        logits_new = forward(v)
        new_mask = classes.task_mask if cfg.task_only_new_loss else classes.seen
        yv = self.repeat_labels(yc)
        loss = gsa_new_loss(logits_new, yv, new_mask)
        if not (rule.scales_terms and xm is not None):  # magnitude: reported with its scale below
            self.report("new", logits_new, yv, new_mask)

        weights: Tensor | None = None
        if xm is not None:
            if cfg.bn_extra_passes:  # the official step's feature passes between the two branches
                n_cur = len(xm) - (0 if old is None else len(old))
                self.statistics_pass(
                    forward, xc[:n_cur], None, xm, xm if old is None else torch.cat([old, xc]), xm, xm, xm
                )
                self.statistics_pass(forward, xm, aug, xm)
            # 4-7. Softmax over seen classes, statistics updated first, then the weighted replay loss.
            vm = self.views(xm, aug)
            logits_m = forward(vm)
            assert ym is not None  # composed with xm
            ym = self.repeat_labels(ym)
            rule.update(logits_m, ym, classes.seen)
            ones = torch.ones_like(self.last_weights)
            weights = torch.where(plan.warm, ones, rule.weights()) if rule.adaptive else ones
            if rule.scales_terms:  # magnitude: detached scales a, b from the closed-form logit-gradient norms
                assert isinstance(rule, Magnitude)  # the one rule that scales the terms
                bw = cfg.buffer_loss_weight
                a, b = rule.term_scales(
                    logit_grad_norm(logits_new, yv, new_mask), bw * logit_grad_norm(logits_m, ym, classes.seen)
                )
                loss = (b * bw) * gsa_replay_loss(logits_m, ym, weights, classes.seen) + a * loss
                self.report("new", logits_new, yv, new_mask, 1.0, a * torch.ones_like(weights))
                self.report("replay", logits_m, ym, classes.seen, bw, b * weights)
            else:
                loss = cfg.buffer_loss_weight * gsa_replay_loss(logits_m, ym, weights, classes.seen) + loss
                self.report("replay", logits_m, ym, classes.seen, cfg.buffer_loss_weight, weights)
            if self.distill is not None:
                self.distill(vm, logits_m)
            if cfg.bn_extra_passes:
                self.statistics_pass(forward, vm)
        if cfg.bn_extra_passes:  # the official code's features of the incoming batch, stored with the buffer
            self.statistics_pass(forward, xc[:n])
        assert aug is None or aug.left == 0, "draw_augmentations drew more rows than the step used"

        return loss, logits_new[:n].detach(), weights

    def mixed_replay_batch(self, xc: Tensor, yc: Tensor, task: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """floor(R(1-r)) samples of other tasks + the first floor(R r) items of Xc, r = seen current / seen.
        Returns (x, y, the other tasks' rows as model input or None)."""
        drawn, n_cur = self.draw_mixed(task)
        return self.compose_mixed(xc, yc, drawn, n_cur)

    def draw_mixed(self, task: int) -> tuple[tuple[Tensor, Tensor] | None, int]:
        """The mixed replay batch's buffer draw: (the other tasks' rows, or the uniform draw without
        `balanced_replay`, or None; floor(R r), the number of Xc's rows that join them)."""
        r_batch = self.cfg.replay_batch_size
        if not self.cfg.balanced_replay:
            return self._sample(r_batch), 0
        r = self.classes.current_share()
        n_old, n_cur = int(r_batch * (1 - r)), int(r_batch * r)
        if self.pseudo is None:
            return self._sample(n_old, exclude_task=task), n_cur
        # task-free: buffer rows of the seen classes outside the current ones
        return self._sample(n_old, classes=self.pseudo.others()), n_cur

    def compose_mixed(
        self, xc: Tensor, yc: Tensor, drawn: tuple[Tensor, Tensor] | None, n_cur: int
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The mixed replay batch from its draw (`draw_mixed`) and Xc as model input: (x, y, the other tasks' rows
        as model input or None)."""
        if not self.cfg.balanced_replay:
            if drawn is None:  # R = 0: an empty replay batch, as the balanced one is then
                return xc[:0], yc[:0], None
            return self.to_input(drawn[0]), drawn[1], None
        if drawn is None:
            return xc[:n_cur], yc[:n_cur], None
        # Row order does not matter to a mean loss or to batch norm, so the spec's shuffle is left out.
        x_old = self.to_input(drawn[0])
        return torch.cat([x_old, xc[:n_cur]]), torch.cat([drawn[1], yc[:n_cur]]), x_old

    @torch.no_grad()
    def statistics_pass(self, forward: Forward, x: Tensor, aug: PreDrawn | None = None, *more: Tensor) -> None:
        """Train-mode forward passes whose output is not used: they only move batch norm's running statistics, as
        the official step's passes outside the loss do (`bn_extra_passes`). With ``aug``: one pass over
        [x, A(x)]; then one pass over each of ``more``."""
        forward(torch.cat([x, aug(x)]) if aug is not None else x)
        for batch in more:
            forward(batch)

    # -- what a run reports and keeps ------------------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        """Seen classes with their G+, G- and current weights (results.json `gsa`)."""
        seen = sorted(self.classes.seen_labels)
        return {
            "classes": seen,
            "positive": self.stats.positive.cpu()[seen].tolist(),
            "negative": self.stats.negative.cpu()[seen].tolist(),
            "weights": self.rule.weights().cpu()[seen].tolist(),
            "balance": self.rule.name,
        }

    def log_values(self) -> dict[str, float]:
        """Per seen class c: w_c, the weight the replay loss uses outside warm-up under the balancing rule
        (2 sigmoid(r_c - 1) for the statistics rules, 1 for constant and magnitude), and r_c = G+_c / G-_c of the
        rule's statistics (cumulative ones for constant and magnitude); an infinite ratio (no negative mass yet)
        is left out. Magnitude adds its last term scales and logit-gradient norms (balance/...)."""
        return class_log_values(self.rule, self.classes.seen_labels)

    def state_dict(self) -> dict[str, Any]:
        state = {"stats": self.rule.state_dict(), "last_weights": self.last_weights.clone()}
        if self.pseudo is not None:  # the current classes themselves are the ClassSets' task mask
            state["pseudo_tasks"] = self.pseudo.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rule.load_state_dict(state["stats"])
        self.grow(len(state["last_weights"]))
        self.last_weights.copy_(state["last_weights"])
        if self.pseudo is not None:
            self.pseudo.load_state_dict(state["pseudo_tasks"])


@register
class GSA(Method):
    name = "gsa"
    Config = GSAConfig
    declares_main_pass = True
    needs_task_boundaries = True  # unless method.task_free=true (`boundaries_needed`)
    cfg: GSAConfig

    @classmethod
    def boundaries_needed(cls, cfg: MethodConfig) -> bool:
        assert isinstance(cfg, GSAConfig)  # a GSA run's config (cil.run.config checks it first)
        return not cfg.task_free

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        size = tuple(self.input_shape[1:]) if self.input_shape else None
        self.gsa = GSAStep(
            self.cfg, self.buffer, self.classes, self.generator, size, self.to_input, self.report, self.distill_pass
        )
        self.gsa.run_step = self.run_step  # compiled with compile_step
        self.pseudo_step = (-1, 0)  # task-free: (pseudo-task, batches since its start) of the incoming batch
        self.packed_mixed = False  # a packed step's plan had a mixed replay batch (its weights are kept)

    def on_task_start(self, task: int, classes: torch.Tensor) -> None:
        if self.cfg.task_free:  # a disjoint stream still announces tasks: GSA ignores them, add-ons keep theirs
            for addon in self.addons:
                addon.on_task_start(self, task, classes)
            return
        super().on_task_start(task, classes)
        if self.cfg.freeze_head_after_first_task and task >= 1:  # the optimizer no longer reaches the head
            self.head.requires_grad_(False)

    def begin_batch(self, batch: Batch) -> None:
        """What `observe` does with a batch before its updates (also for a learner stepped without observing:
        CCL-DC's peer, a pack): the task-free pseudo-task (novelty is judged before the labels are marked seen),
        the official head's fresh rows when a task starts, then the seen classes."""
        if self.cfg.task_free:
            assert self.gsa.pseudo is not None  # made when task_free
            self.pseudo_step = self.gsa.pseudo.observe(batch.y, batch.y_host)
        # a task starts (not a resume)
        if self.cfg.fresh_head_rows and batch.task is not None and batch.task >= 1 and batch.step_in_task == 0:
            generator = torch.Generator().manual_seed(self.seed * 1000 + batch.task)
            self.refresh_head_rows(sorted(self.classes.task_labels), generator)
        self.classes.mark_seen(batch.y, batch.y_host)

    def split_blocker(self) -> str | None:
        if self.gsa.rule.name in ("window", "magnitude"):
            return f"GSA with method.balance={self.gsa.rule.name} keeps a host counter in the step (no compiled step)"
        return self.hooks_blocker()

    def pack_blocker(self) -> str | None:
        if not self.cfg.train_without_replay:
            return "method.train_without_replay=false (a step skipped while the buffer is empty)"
        return None

    # -- the packed step (cil.core.packed): the plan's tensors and sizes, and the state the step updates --------
    def step_args(self, batch: Batch) -> tuple[object, ...]:
        """The step's host work (`GSAStep.plan`: buffer and augmentation draws, the warm-up), then what its tensor
        work reads: (Xc, its labels, the mixed batch's buffer rows and labels, the augmentation draws, the warm-up
        flag, the task and seen masks, G+, G-, and the sizes that fix the step's shapes: incoming rows, mixed,
        Xc's rows in the mixed batch)."""
        task, step_in_task = self.pseudo_step if self.cfg.task_free else (batch.task, batch.step_in_task)
        assert task is not None and step_in_task is not None  # pseudo-tasks, or the boundaries GSA needs
        plan = self.gsa.plan(batch.x, batch.y, task, step_in_task)  # rule.start first: task_reset zeroes G+, G-
        x_old, y_old = (None, None) if plan.drawn is None else plan.drawn
        gray, boxes = (None, None) if plan.aug is None else (plan.aug.gray, plan.aug.boxes)
        self.packed_mixed = plan.mixed
        stats, classes = self.gsa.stats, self.classes
        state = (classes.task_mask, classes.seen, stats.positive, stats.negative)
        return (plan.xc, plan.yc, x_old, y_old, gray, boxes, plan.warm, *state, plan.n, plan.mixed, plan.n_cur)

    def step_loss(
        self,
        xc: Tensor,
        yc: Tensor,
        x_old: Tensor | None,
        y_old: Tensor | None,
        gray: Tensor | None,
        boxes: Tensor | None,
        warm: Tensor,
        task_mask: Tensor,
        seen: Tensor,
        positive: Tensor,
        negative: Tensor,
        n: int,
        mixed: bool,
        n_cur: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """`GSAStep.step_loss` on `step_args`' tensors, with the masks and statistics it reads taken from them
        (and G+, G- updated in them): (L, logits of the incoming rows, the replay weights used or ones, G+, G-)."""
        gsa, classes, stats = self.gsa, self.classes, self.gsa.stats
        aug = None  # the step's augmentation draws, made by `plan` on this run's generator
        if boxes is not None and gray is not None and gsa.augment is not None:
            aug = PreDrawn.of(gsa.augment, gray, boxes, *xc.shape[-2:])
        drawn = None if x_old is None or y_old is None else (x_old, y_old)
        plan = GSAPlan(xc, yc, n, mixed, drawn, n_cur, aug, warm)
        held = classes.task_mask, classes.seen, stats.positive, stats.negative
        classes.task_mask, classes.seen, stats.positive, stats.negative = task_mask, seen, positive, negative
        try:
            loss, logits_new, weights = gsa.step_loss(self.forward_float, plan)
            positive, negative = stats.positive, stats.negative
        finally:
            classes.task_mask, classes.seen, stats.positive, stats.negative = held
        return loss, logits_new, torch.ones_like(gsa.last_weights) if weights is None else weights, positive, negative

    def packed_outputs(self, args: tuple[object, ...], outputs: tuple[Any, ...]) -> tuple[Tensor, ...]:
        return outputs

    def packed_commit(self, kept: tuple[Tensor, ...]) -> None:
        weights, positive, negative = kept
        stats = self.gsa.stats
        stats.positive.copy_(positive)  # in place: where the compiled step's graphs read them
        stats.negative.copy_(negative)
        if self.packed_mixed:
            self.gsa.last_weights = weights.clone()

    def update(self, batch: Batch) -> tuple[Tensor, Tensor]:
        if not self.cfg.train_without_replay and (self.buffer is None or len(self.buffer) == 0):
            return self.skip_update(batch)
        if self.compiler is not None:  # the statistics change inside the step: CUDA graphs need them at fixed places
            torch._dynamo.mark_static_address(self.gsa.stats.positive)
            torch._dynamo.mark_static_address(self.gsa.stats.negative)
        task, step_in_task = self.pseudo_step if self.cfg.task_free else (batch.task, batch.step_in_task)
        assert task is not None and step_in_task is not None  # pseudo-tasks, or the boundaries GSA needs
        loss, logits_new = self.gsa.loss(self.forward_float, batch.x, batch.y, task, step_in_task)
        # 8. One optimizer step. (9. The learner adds the raw batch to the buffer afterwards.)
        self.step(loss)
        return loss, logits_new

    @torch.no_grad()
    def skip_update(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """No update while the buffer is empty (`train_without_replay=false`, the add-on papers' GSA skips its whole
        step): a zero loss, and the incoming batch's logits in eval mode, so batch norm's statistics stay as they
        are (the official code runs no forward pass then)."""
        was = self.model.training
        self.model.eval()
        try:
            logits = self.forward(batch.x)
        finally:
            self.model.train(was)
        return logits.new_zeros(()), logits

    def remember(self, batch: Batch, out: StepOutput) -> None:
        if not self.cfg.task_free or self.buffer is None:
            return super().remember(batch, out)
        # No task stored; the host labels keep the buffer's label mirror exact, so the step's label-filtered
        # draws never wait for the device.
        self.buffer.add(batch.x, batch.y, None, y_host=batch.y_host)

    def extra_results(self) -> dict[str, Any]:
        out = {"gsa": self.gsa.summary()}
        if self.cfg.task_free:
            assert self.gsa.pseudo is not None  # made when task_free
            out["gsa"]["pseudo_tasks"] = self.gsa.pseudo.task + 1  # novelty events in the stream
        return out

    def log_values(self) -> dict[str, float]:
        return self.gsa.log_values()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), **self.gsa.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.gsa.load_state_dict(state)
