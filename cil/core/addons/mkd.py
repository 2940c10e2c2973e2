"""MKD: momentum knowledge distillation (Michel, Wang, Xiao, Yamasaki, "Rethinking Momentum Knowledge
Distillation in Online Continual Learning", ICML 2024; official code Nicolas1203/mkd_ocl, src/learners/ema/).

Teachers are exponential moving averages (EMA) of the student's parameters. After every optimizer step, teacher j
with momentum a_j moves as (base_ema.py / er_ema.py `update_ema`)

    theta_j <- (1 - a_j) theta_j + a_j / (1 - a_j^k) * theta,    k = max(1, floor(b / correction_step))

where b is the number of stream batches seen so far (the official `stream_idx // (batch_size *
ema_correction_step)`); at construction theta_j = a_j / (1 - a_j) * theta (the same formula with k = 1 from 0).
Only parameters follow the student; a teacher's batch-norm statistics are its own (it runs in train mode, so its
forward passes move them), as in the official code. The a_j are log-spaced in [alpha_min, alpha_max].

The loss the official per-method EMA learners add (gsa_ema.py, er_ace_ema.py; `mode: block`): a replay draw of R
samples joined to the incoming batch, x = [x_mem, x_in], an augmented copy A(x) (`tf_ema`: random resized crop of
scale [min_crop, 1], horizontal flip, colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale 0.2), and

    L_mkd = CE(S(A(x)), y) + kd_lambda * mean_j ( KD_T(S(A(x)) | T_j(A(x))) + KD_T(S(x) | T_j(A(x))) ) / 2

with KD_T the temperature-T distillation (cil.core.objectives.distill.kd_loss, `WKDLoss`). `mode: main_pass`
distils on the pass the method declares (`Method.distill_pass`) instead, without the CE term: the form of
er_ema.py, where the method's own cross-entropy on its augmented combined batch is the CE term.
The whole L_mkd is multiplied by `weight`; at 0 MKD is off (no loss, no teacher update, the method's own evaluation
head and no extra heads: the base method bit for bit). docs/methods.md ("MKD add-on") lists every deviation.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from cil.core.addons.base import Addon, AddonConfig, in_eval_mode, register
from cil.core.augment import GSAAugment, random_grayscale
from cil.core.data.stream import Batch
from cil.core.methods.base import Method, ReplayConfig
from cil.core.objectives.distill import kd_loss
from cil.errors import require

MODES = ("block", "main_pass")
HEADS = ("average", "teacher", "student")


@dataclass
class MKDConfig(AddonConfig):
    name: str = "mkd"
    kd_lambda: float = 5.5  # distillation weight (icml24 configs; the parser's default is 8)
    temperature: float = 4.0  # kd_temperature
    n_teachers: int = 1  # n_teacher
    alpha_min: float = 0.01  # EMA momentum of the first teacher (alpha_min)
    alpha_max: float = 0.01  # ... of the last; the others log-spaced between (alpha_max)
    correction_step: int = 10  # ema_correction_step: stream batches per step of k in a / (1 - a^k)
    mode: str = "block"  # block: the official extra block (gsa_ema, er_ace_ema); main_pass: on the method's pass
    replay_batch_size: int | None = None  # block's buffer draw; null: the method's replay_batch_size
    augment: bool = True  # block: tf_ema augmentation of the combined batch
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # [min_crop, 1]
    raw_pass: bool = True  # the distillation on the un-augmented batch too (the official code without --no-aug)
    eval_head: str = "average"  # average: (student + teachers) / (n + 1) params (official default); teacher; student
    report_heads: bool = True  # also evaluate the student and the first teacher (results.json heads)

    def validate(self) -> None:
        super().validate()
        require(self.kd_lambda >= 0, self.key("kd_lambda"), self.kd_lambda, "use a number >= 0")
        require(self.temperature > 0, self.key("temperature"), self.temperature, "use a number > 0")
        require(self.n_teachers >= 1, self.key("n_teachers"), self.n_teachers, "use an integer >= 1")
        for k in ("alpha_min", "alpha_max"):
            require(0 < getattr(self, k) < 1, self.key(k), getattr(self, k), "use a momentum in (0, 1)")
        require(self.alpha_min <= self.alpha_max, self.key("alpha_min"), self.alpha_min, "use alpha_min <= alpha_max")
        require(self.correction_step >= 1, self.key("correction_step"), self.correction_step, "use an integer >= 1")
        require(self.mode in MODES, self.key("mode"), self.mode, f"choose one of {MODES}")
        require(
            self.replay_batch_size is None or self.replay_batch_size >= 0,
            self.key("replay_batch_size"),
            self.replay_batch_size,
            "use null (the method's) or an integer >= 0",
        )
        scale = list(self.crop_scale)
        require(
            len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
            self.key("crop_scale"),
            scale,
            "use [lo, hi] with 0 < lo <= hi <= 1",
        )
        require(self.eval_head in HEADS, self.key("eval_head"), self.eval_head, f"choose one of {HEADS}")

    def alphas(self) -> list[float]:
        n, lo, hi = self.n_teachers, math.log10(self.alpha_min), math.log10(self.alpha_max)
        return [10 ** (lo + (hi - lo) * i / max(1, n - 1)) for i in range(n)]


def ema_factor(alpha: float, batches: int, correction_step: int) -> float:
    """The student's coefficient a / (1 - a^k), k = max(1, batches // correction_step)."""
    return alpha / (1 - alpha ** max(1, batches // correction_step))


# The extra evaluation heads (results.json `heads`) and the eval_head each one shows.
EXTRA_HEADS = {"mkd_student": "student", "mkd_teacher": "teacher", "mkd_average": "average"}


def make_teacher(model: torch.nn.Module, alpha: float, correction_step: int) -> torch.nn.Module:
    """A teacher of momentum `alpha`: a copy of `model` without gradients, parameters a / (1 - a) * theta."""
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    with torch.no_grad():
        factor = ema_factor(alpha, 0, correction_step)
        for p, e in zip(model.parameters(), teacher.parameters(), strict=True):
            e.copy_(p * factor)
    return teacher


@torch.no_grad()
def ema_update(
    teachers: Sequence[torch.nn.Module],
    alphas: Sequence[float],
    params: list[Tensor],
    batches: int,
    correction_step: int,
) -> None:
    """theta_j <- (1 - a_j) theta_j + a_j / (1 - a_j^k) theta for every teacher (after an optimizer step)."""
    for alpha, teacher in zip(alphas, teachers, strict=True):
        ema: list[Tensor] = list(teacher.parameters())
        torch._foreach_mul_(ema, 1 - alpha)
        torch._foreach_add_(ema, torch._foreach_mul(params, ema_factor(alpha, batches, correction_step)))


@torch.no_grad()
def average_parameters(model: torch.nn.Module, teachers: Sequence[torch.nn.Module]) -> dict[str, Tensor]:
    """(student + teachers) / (n + 1), parameter by parameter, with the student's buffers (init_agg_model)."""
    names = [n for n, _ in model.named_parameters()]
    avg = [
        sum(ps) / (len(teachers) + 1)
        for ps in zip([p.detach() for p in model.parameters()], *[t.parameters() for t in teachers], strict=True)
    ]
    state = dict(zip(names, avg, strict=True))
    state.update(dict(model.named_buffers()))
    return state


def color_jitter(
    x: Tensor,
    u: Tensor,
    order: Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
) -> Tensor:
    """Per-sample colour jitter of [B, C, H, W] floats in [0, 1] (torchvision's definitions), factors from uniforms
    ``u`` [B, 4], the four ops (0 brightness, 1 contrast, 2 saturation, 3 hue) applied in ``order`` (long [4], a
    permutation on ``x``'s device, one for the whole batch). One-channel input: brightness and contrast only."""

    def factor(col: int, amount: float) -> Tensor:
        return (1 - amount + 2 * amount * u[:, col]).view(-1, 1, 1, 1)

    def luma3(v: Tensor) -> Tensor:
        return random_grayscale(v, torch.ones(len(v), dtype=torch.bool, device=v.device))

    def adjust_brightness(v: Tensor) -> Tensor:
        return (v * factor(0, brightness)).clamp(0, 1)

    def adjust_contrast(v: Tensor) -> Tensor:
        gray = v.mean(1, keepdim=True) if v.shape[1] == 1 else luma3(v)[:, :1]
        f = factor(1, contrast)
        return (f * v + (1 - f) * gray.mean((2, 3), keepdim=True)).clamp(0, 1)

    def adjust_saturation(v: Tensor) -> Tensor:
        f = factor(2, saturation)
        return (f * v + (1 - f) * luma3(v)).clamp(0, 1)

    def adjust_hue(v: Tensor) -> Tensor:
        return shift_hue(v, (2 * u[:, 3] - 1) * hue)

    ops: tuple[Callable[[Tensor], Tensor], ...] = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)
    if x.shape[1] != 3:  # saturation and hue leave a one-channel image as it is
        ops = ops[:2]
    # kornia ColorJitter (kornia@v0.8.0 kornia/augmentation/_2d/intensity/color_jitter.py:139-142) applies its ops
    # in the call's drawn order; reading the order on the host costs nothing on a CPU and a sync elsewhere
    return (in_order if order.device.type == "cpu" else in_order_masked)(x, ops, order)


def in_order(x: Tensor, ops: Sequence[Callable[[Tensor], Tensor]], order: Tensor) -> Tensor:
    """The ops applied in `order` (a permutation of 0..3; an index past `ops` is skipped), read on the host."""
    for i in order.tolist():
        x = ops[i](x) if i < len(ops) else x
    return x


def in_order_masked(x: Tensor, ops: Sequence[Callable[[Tensor], Tensor]], order: Tensor) -> Tensor:
    """`in_order` without reading the order: position k runs every op and keeps, through a 0-d device mask, the
    one the order puts k-th (the same values, four times the arithmetic, no host/device sync)."""
    for k in range(len(order)):
        out = x
        for i, op in enumerate(ops):
            out = torch.where(order[k] == i, op(x), out)
        x = out
    return x


def shift_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of RGB images [B, 3, H, W] in [0, 1] by ``shift`` [B] turns (torchvision's adjust_hue)."""
    r, g, b = x.unbind(1)
    maxc, minc = x.max(1).values, x.min(1).values
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    s = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    v = maxc
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    i = (i.long() % 6).unsqueeze(1)
    choices = torch.stack(
        [torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 1
    )  # [B, 6, 3, H, W]
    return choices.gather(1, i.unsqueeze(1).expand(-1, 1, 3, -1, -1)).squeeze(1)


class _MethodHead(torch.nn.Module):
    """The method's model as a submodule and `Method.logits_of` as forward: functional_call runs it on other
    weights (the averaged ones) through the method's own head."""

    def __init__(self, method: Method) -> None:
        super().__init__()
        self.method, self.model = method, method.model

    def forward(self, x: Tensor) -> Tensor:
        return self.method.logits_of(self.model, x)


class MKDAugment:
    """tf_ema (kornia 0.8.0): random resized crop (scale crop_scale, kornia's candidate rule), horizontal flip
    p 0.5, colour jitter (0.4, 0.4, 0.4, 0.1) with p 0.8 in an order drawn per call, grayscale p 0.2; per sample,
    batched, on the generator's device: the crop's draw, one ``torch.rand(n, 7)`` (flip, jitter on/off, four
    factors, grayscale), then the jitter's order."""

    def __init__(self, size: Sequence[int], crop_scale: Sequence[float]) -> None:
        # kornia's RandomResizedCrop keeps a candidate only if 0 < h < H and 0 < w < W, and has its own fallback
        # (kornia@v0.8.0 kornia/augmentation/random_generator/_2d/crop.py:238-266): GSAAugment's bounds="kornia"
        self.crop = GSAAugment(size, scale=crop_scale, grayscale_p=0.0, bounds="kornia")

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        n = len(x)
        gray0, boxes = self.crop.draw(n, x.shape[-2], x.shape[-1], generator)
        u = torch.rand(n, 7, generator=generator, device=generator.device)
        # kornia's ColorJitterGenerator draws `order = torch.randperm(4)` at every call, one order for the whole
        # batch (kornia@v0.8.0 kornia/augmentation/random_generator/_2d/color_jitter.py:110); here on the device
        order = torch.randperm(4, generator=generator, device=generator.device)
        x = self.crop.apply(x, gray0, boxes)
        x = torch.where((u[:, 0] < 0.5).view(-1, 1, 1, 1), x.flip(-1), x)
        x = torch.where((u[:, 1] < 0.8).view(-1, 1, 1, 1), color_jitter(x, u[:, 2:6], order), x)
        return random_grayscale(x, u[:, 6] < 0.2)


@register
class MKD(Addon):
    name = "mkd"
    Config = MKDConfig
    cfg: MKDConfig

    def __init__(self, cfg: MKDConfig, method: Method, **context: Any) -> None:
        super().__init__(cfg, method)
        self.alphas = cfg.alphas()
        self.teachers: list[torch.nn.Module] = []
        for alpha in self.alphas:
            self.teachers.append(make_teacher(method.model, alpha, cfg.correction_step))
        self.batches = 0  # stream batches seen (the official stream_idx / batch_size)
        self.batch: Batch | None = None
        # (inputs, logits, raw) the method declared in this update (mode main_pass)
        self.pass_: tuple[Tensor, Tensor, Tensor | None] | None = None
        size = tuple(method.input_shape[1:]) if method.input_shape else None
        self.augment = MKDAugment(size, tuple(cfg.crop_scale)) if cfg.augment and size and len(size) == 2 else None
        self._average: tuple[int, dict[str, Tensor]] | None = None  # (updates, averaged parameters): eval_head=average
        self.updates = 0

    # -- training --------------------------------------------------------------------------------------------
    def begin_observe(self, method: Method, batch: Batch) -> None:
        self.batches += 1
        self.batch = batch

    def main_pass(self, method: Method, inputs: Tensor, logits: Tensor, raw: Tensor | None) -> None:
        if self.cfg.mode == "main_pass":
            self.pass_ = (inputs, logits, raw)

    def teacher_logits(self, method: Method, x: Tensor) -> list[Tensor]:
        with torch.no_grad():
            return [method.logits_of(t, x) for t in self.teachers]

    def distill(self, method: Method, stu_aug: Tensor, stu_raw: Tensor | None, teachers: list[Tensor]) -> Tensor:
        cfg, mask = self.cfg, self.softmax_mask(method)
        total: Tensor | float = 0.0
        for t in teachers:
            term = kd_loss(stu_aug, t, cfg.temperature, mask)
            if stu_raw is not None:
                term = (term + kd_loss(stu_raw, t, cfg.temperature, mask)) / 2
            total = total + term
        assert isinstance(total, Tensor)  # one teacher at least (n_teachers >= 1)
        return total / len(teachers)

    def extra_loss(self, method: Method) -> Tensor | None:
        cfg = self.cfg
        if not self.active:
            self.pass_ = None
            return None
        if cfg.mode == "main_pass":
            if self.pass_ is None:
                return None
            inputs, logits, raw = self.pass_
            self.pass_ = None
            stu_raw = None
            if cfg.raw_pass and raw is not None:
                stu_raw = method.forward_float(raw)
            kd = self.distill(method, logits, stu_raw, self.teacher_logits(method, inputs))
            self.last = {"kd": kd.detach()}
            return cfg.weight * cfg.kd_lambda * kd
        batch = self.batch
        assert batch is not None  # begin_observe comes first
        if cfg.replay_batch_size is not None:
            r = cfg.replay_batch_size
        else:  # the method's draw; a method without replay (naive) has no buffer to draw from
            r = method.cfg.replay_batch_size if isinstance(method.cfg, ReplayConfig) else 0
        mem = method.replay(r)
        x, y = (batch.x, batch.y) if mem is None else (torch.cat([mem[0], batch.x]), torch.cat([mem[1], batch.y]))
        n_mem = 0 if mem is None else len(mem[1])
        raw = method.to_input(x)
        if self.augment is not None:
            aug = method.from_unit(self.augment(x.float().div(255.0), method.generator))
        else:
            aug = raw
        stu_raw = method.forward_float(raw) if cfg.raw_pass else None
        stu_aug = method.forward_float(aug)
        kd = self.distill(method, stu_aug, stu_raw, self.teacher_logits(method, aug))
        mask = self.softmax_mask(method)
        ce = F.cross_entropy(self.masked(stu_aug, mask), y)
        full = mask if mask is not None else torch.ones(stu_aug.shape[1], dtype=torch.bool, device=y.device)
        method.report("replay", stu_aug, y, full, scale=cfg.weight * n_mem / len(y), rows=slice(None, n_mem))
        method.report("new", stu_aug, y, full, scale=cfg.weight * (1 - n_mem / len(y)), rows=slice(n_mem, None))
        self.last = {"ce": ce.detach(), "kd": kd.detach()}
        return cfg.weight * (ce + cfg.kd_lambda * kd)

    @torch.no_grad()
    def after_step(self, method: Method) -> None:
        if not self.active:  # weight 0: MKD is off, its teachers stay as built
            return
        ema_update(
            self.teachers,
            self.alphas,
            [p.detach() for p in method.model.parameters()],
            self.batches,
            self.cfg.correction_step,
        )
        self.updates += 1

    # -- evaluation ------------------------------------------------------------------------------------------
    def averaged(self, method: Method) -> dict[str, Tensor]:
        """(student + teachers) / (n + 1), parameter by parameter, with the student's buffers (init_agg_model)."""
        if self._average is None or self._average[0] != self.updates:
            self._average = (self.updates, average_parameters(method.model, self.teachers))
        return self._average[1]

    def eval_logits(self, method: Method, x: Tensor, head: str | None) -> Tensor | None:
        if not self.active:  # weight 0: the method's own head, as without the add-on
            return None
        which = self.cfg.eval_head if head is None else EXTRA_HEADS.get(head)
        if which is None or which == "student":
            return None if which is None else method.predict_logits(x)
        if which == "teacher":
            teacher = self.teachers[0]
            return in_eval_mode(teacher, lambda: method.logits_of(teacher, x))
        # the averaged weights through the method's head (PCR: cosine), the model itself left as it is
        averaged = _MethodHead(method)
        params = {f"model.{k}": v for k, v in self.averaged(method).items()}
        return cast(Tensor, functional_call(averaged, params, (x,)))  # typed Any in torch

    def eval_heads(self) -> list[str]:
        if not self.cfg.report_heads or not self.active:
            return []
        return [h for h in EXTRA_HEADS if h != f"mkd_{self.cfg.eval_head}"]

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "teachers": [{k: v.cpu() for k, v in t.state_dict().items()} for t in self.teachers],
            "batches": self.batches,
            "updates": self.updates,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for teacher, saved in zip(self.teachers, state["teachers"], strict=True):
            teacher.load_state_dict(saved)
        self.batches, self.updates = state["batches"], state["updates"]
        self._average = None

    def extra_results(self) -> dict[str, Any]:
        return {"mkd": {"alphas": self.alphas, "eval_head": self.cfg.eval_head}}
