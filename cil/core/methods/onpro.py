"""OnPro (Wei, Ye, Huang, Zhang, Shan, ICCV 2023: "Online Prototype Learning for Online Continual Learning"),
as its official code (github.com/weilllllls/OnPro, `train.py`, `modules/OPE.py`, `modules/APF.py`) trains.

One step (docs/methods.md, "OnPro", has the equations and every difference from the official code):
- Rotations: every image gives 16 copies (the identity, the left half, right half or both halves turned by 180
  degrees, each of those turned by 0, 180, 90, 270 degrees); copy k of class y has the contrastive label
  y + k * num_classes.
- Augmentation A: random horizontal flip, random grayscale (p 0.25), random resized crop (scale 0.3-1, the
  official affine crop with reflection), per sample.
- The first task: one pass over [R(x), A(R(x))] (features and projections) gives OCM's contrastive loss
  (features sliced at a random offset) and OPE on the incoming batch; a pass over [M, A(M)] (up to
  `replay_batch_size` buffer rows, from the second batch on) gives OPE on the replayed rows; CE on A(x).
- Later tasks: a replay batch of min(replay_batch_size, per_class_replay x seen classes) buffer rows; APF
  (from the task's second batch) replaces it by mixup: a share `mixup_base_rate` of its rows mixed with each
  other (kornia's RandomMixUpV2), the rest drawn from the whole buffer as pairs of classes, each pair chosen
  with probability softmax(1 / distance of the two classes' prototypes), and mixed (lambda ~ Beta). One pass
  over [R(x), A(R(x)), R(Mmix), A(R(Mmix))] gives both contrastive losses (the incoming batch's, and the
  replayed batch's, whose mixed rows carry the label (1 - lambda) y_a + lambda y_b); OPE on the incoming batch
  and on the un-mixed replay batch (its own pass, whose prototypes feed APF at the next step); the mixup CE on
  A(Mmix). The incoming batch gets no cross-entropy after the first task.
Loss = CE + contrastive + OPE, all with weight 1; the projection head is a linear layer on the features.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cil.core.augment import CROPS, rotation_views
from cil.core.data.stream import Batch
from cil.core.methods.base import Method, ReplayConfig, register
from cil.core.models import Backbone
from cil.core.objectives.ocm import ocm_nt_xent_buffer, ocm_nt_xent_new
from cil.core.objectives.onpro import mixup_cross_entropy, prototype_loss
from cil.errors import ConfigError, require

ROTATIONS = 16  # copies per image (the official `oop`)


@dataclass
class OnProConfig(ReplayConfig):
    """Defaults: the official code's CIFAR-100 / TinyImageNet settings (README, train.py, main.py); its
    CIFAR-10 setting (mixup_p 0.6, mixup_base_rate 0.75, sim_lambda 0.5) is experiment=onpro_cifar10."""

    name: str = "onpro"
    replay_batch_size: int = 64  # buffer rows replayed per step (the official buffer_batch_size)
    per_class_replay: int = 7  # after the first task the replay batch is min(replay_batch_size, this x seen classes)
    proj_dim: int = 128  # projection head output (a linear layer on the features)
    ins_temperature: float = 0.07  # OCM's contrastive loss temperature (ins_t)
    proto_temperature: float = 0.5  # OPE temperature (proto_t)
    sim_lambda: float = 1.0  # scale of the similarities after the first task (0.5 in the official CIFAR-10 runs)
    apf: bool = True  # adaptive prototypical feedback (mixup of the replay batch); False: the raw replay batch
    mixup_base_rate: float = 0.9  # share of the replay batch mixed among itself; the rest is drawn by APF
    mixup_p: float = 0.2  # probability that a mixup call (the base batch, or one class pair) mixes at all
    # base mixup: also a Bernoulli(mixup_p) per row, as kornia 0.6.8's RandomMixUpV2 (a row mixes with p^2);
    # false: the call's gate only (a row mixes with p; the step of cil before the official gate was found)
    mixup_row_gate: bool = True
    mixup_lower: float = 0.0  # base mixup: lambda ~ U(mixup_lower, mixup_upper)
    mixup_upper: float = 0.6
    mixup_alpha: float = 0.4  # APF pairs: lambda ~ Beta(mixup_alpha, mixup_alpha)
    crop_scale: list[float] = field(default_factory=lambda: [0.3, 1.0])  # random resized crop area range
    grayscale_p: float = 0.25  # random grayscale probability
    crop: str = "affine"  # the official crop; "torchvision": torchvision's RandomResizedCrop semantics

    def validate(self) -> None:
        super().validate()
        require(
            self.replay_batch_size >= 1,
            "method.replay_batch_size",
            self.replay_batch_size,
            "use an integer >= 1 (OnPro replays every step)",
        )
        require(self.per_class_replay >= 1, "method.per_class_replay", self.per_class_replay, "use an integer >= 1")
        require(self.proj_dim >= 1, "method.proj_dim", self.proj_dim, "use an integer >= 1")
        for key in ("ins_temperature", "proto_temperature", "sim_lambda", "mixup_alpha"):
            require(getattr(self, key) > 0, f"method.{key}", getattr(self, key), "use a number > 0")
        require(
            0.0 <= self.mixup_base_rate <= 1.0, "method.mixup_base_rate", self.mixup_base_rate, "use 0 <= rate <= 1"
        )
        require(0.0 <= self.mixup_p <= 1.0, "method.mixup_p", self.mixup_p, "use 0 <= p <= 1")
        require(
            0.0 <= self.mixup_lower <= self.mixup_upper <= 1.0,
            "method.mixup_lower",
            (self.mixup_lower, self.mixup_upper),
            "use 0 <= mixup_lower <= mixup_upper <= 1",
        )
        require(
            self.mixup_alpha <= 4.0,
            "method.mixup_alpha",
            self.mixup_alpha,
            "use 0 < alpha <= 4 (the Beta sampler is exact by rejection, sized for alpha <= 4)",
        )
        require(0.0 <= self.grayscale_p <= 1.0, "method.grayscale_p", self.grayscale_p, "use 0 <= p <= 1")
        scale = list(self.crop_scale)
        require(
            len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
            "method.crop_scale",
            scale,
            "use [lo, hi] with 0 < lo <= hi <= 1",
        )
        require(self.crop in CROPS, "method.crop", self.crop, f"choose one of {sorted(CROPS)}")


def beta_sample(n: int, alpha: float, generator: torch.Generator, device: torch.device | str) -> Tensor:
    """n draws of Beta(alpha, alpha) by Joehnk's rejection method (exact), all candidates at once: enough of them
    that all n rows fail with probability < 1e-12 (then the last candidate is taken)."""
    accept = math.exp(2 * math.lgamma(alpha + 1) - math.lgamma(2 * alpha + 1))  # P(U^(1/a) + V^(1/a) <= 1)
    k = max(1, math.ceil(math.log(1e-12) / math.log1p(-min(accept, 1 - 1e-12))))
    u = torch.rand(2, n, k, generator=generator, device=device, dtype=torch.float64).clamp_min_(1e-300)
    logs = u.log() / alpha  # log U^(1/a), log V^(1/a)
    total = torch.logsumexp(logs, dim=0)
    ok = total <= 0
    first = torch.where(ok.any(1), ok.to(torch.uint8).argmax(1), torch.full_like(ok[:, 0], k - 1, dtype=torch.long))
    pick = (logs[0] - total).gather(1, first[:, None]).squeeze(1)
    return pick.exp().float()


class BaseMixupDraws(NamedTuple):
    """The random draws of APF's base mixup (kornia's RandomMixUpV2 on a random subset of the replay batch)."""

    rows: Tensor  # [k] distinct rows of the replay batch, in random order
    call: Tensor  # [] uniform: the call mixes when < mixup_p
    lam: Tensor  # [k] uniforms: lambda = mixup_lower + (mixup_upper - mixup_lower) u
    row: Tensor | None  # [k] uniforms: row i mixes when < mixup_p (mixup_row_gate); None without the row gate
    partner: Tensor  # [k] a permutation of 0..k-1: row i is mixed with row partner[i] (itself allowed)


@register
class OnPro(Method):
    name = "onpro"
    Config = OnProConfig
    needs_task_boundaries = True  # the first task's step differs; APF starts at each task's second batch
    cfg: OnProConfig

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg: OnProConfig = self.cfg
        base = cast(Backbone, getattr(self.model, "_orig_mod", self.model))  # torch.compile wraps the model
        feature_dim = base.feature_dim
        if cfg.proj_dim >= feature_dim:
            raise ConfigError(
                f"method.proj_dim={cfg.proj_dim} must be smaller than the model's feature size "
                f"({feature_dim}): OnPro compares projections with a random slice of the features; "
                f"set method.proj_dim below {feature_dim}"
            )
        shape = self.input_shape
        if shape is None or len(shape) != 3 or shape[1] != shape[2] or shape[1] % 2:
            raise ConfigError(
                f"OnPro's rotations need square images of even size, got input shape {shape}; "
                "use an image dataset such as cifar10, cifar100, tinyimagenet, mnist or digits"
            )
        self.feature_dim = feature_dim
        self.projection = self.own("projection", nn.Linear(feature_dim, cfg.proj_dim))
        self.crop = CROPS[cfg.crop](tuple(shape[1:]), scale=tuple(cfg.crop_scale), grayscale_p=cfg.grayscale_p)
        c = self.num_classes
        # APF's class means (of the last replayed batch's two views) and the classes they cover
        self.proto_mean = torch.zeros(c, cfg.proj_dim, device=self.device)
        self.proto_present = torch.zeros(c, dtype=torch.bool, device=self.device)
        iu = torch.triu_indices(c, c, 1, device=self.device)
        self.pair_a, self.pair_b = iu[0], iu[1]  # class pairs in itertools.combinations order
        self.last: dict[str, Tensor] = {}

    # -- random parts (each its own method, so tests can record them) --------------------------------------------
    def augment(self, x: Tensor) -> Tensor:
        """A(x): random horizontal flip, then random grayscale and random resized crop, per sample."""
        flip = torch.rand(len(x), generator=self.generator, device=x.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return self.crop(x, self.generator)

    def feature_offsets(self, n: int) -> Tensor:
        """n offsets, each uniform in [0, feature_dim - proj_dim): where the features are sliced."""
        return torch.randint(
            0, self.feature_dim - self.cfg.proj_dim, (n,), generator=self.generator, device=self.device
        )

    def base_mixup_draws(self, n: int, k: int) -> BaseMixupDraws:
        """The draws of the base mixup of k rows out of a replay batch of n: which rows, the call's gate, each
        row's lambda and (mixup_row_gate) each row's gate, the partners. Without the row gate the draws are the
        ones cil made before it had one (one uniform fewer per row), so such runs repeat bit for bit."""
        g, dev = self.generator, self.device
        rows = torch.randperm(n, generator=g, device=dev)[:k]
        u = torch.rand(2 * k + 1 if self.cfg.mixup_row_gate else k + 1, generator=g, device=dev)
        partner = torch.randperm(k, generator=g, device=dev)
        return BaseMixupDraws(rows, u[0], u[1 : k + 1], u[k + 1 :] if self.cfg.mixup_row_gate else None, partner)

    def apf(self, x: Tensor, y: Tensor, batch_size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Adaptive prototypical feedback on the replay batch (x as model input, y). Returns (x_mix, y_a, y_b,
        lambda): the first int(batch_size * mixup_base_rate) rows mixed among a random subset of the batch; the
        remaining rows drawn by class pair from the whole buffer (see `apf_pair_counts`) and mixed."""
        cfg, g, dev = self.cfg, self.generator, x.device
        base_n = min(int(batch_size * cfg.mixup_base_rate), len(y))
        d = self.base_mixup_draws(len(y), base_n)
        xb, yb = x[d.rows], y[d.rows]
        gate = d.call < cfg.mixup_p  # kornia's batch probability: does this call mix at all
        if d.row is not None:  # kornia 0.6.8's generator multiplies each row's lambda by a Bernoulli(p) too
            gate = gate & (d.row < cfg.mixup_p)
        lam = (cfg.mixup_lower + (cfg.mixup_upper - cfg.mixup_lower) * d.lam) * gate
        lam4 = lam.view(-1, 1, 1, 1).to(x.dtype)
        x_mix, y_a, y_b = xb * (1 - lam4) + xb[d.partner] * lam4, yb, yb[d.partner]
        m = batch_size - int(batch_size * cfg.mixup_base_rate)
        if m <= 0:
            return x_mix, y_a, y_b, lam
        counts = self.apf_pair_counts(m)
        pair = torch.searchsorted(torch.cumsum(counts, 0), torch.arange(m, device=dev), right=True)
        ca, cb = self.pair_a[pair], self.pair_b[pair]
        # a class no longer in the buffer is replaced by a random class that is (the official fallback)
        assert self.buffer is not None  # the replay batch came from it
        buf_y = self.buffer.y
        valid = buf_y >= 0
        cnt = torch.bincount(buf_y.clamp(min=0), weights=valid.float(), minlength=self.num_classes)[: self.num_classes]
        allowed = self.proto_present & (cnt > 0)
        keys = torch.rand(2, m, self.num_classes, generator=g, device=dev).masked_fill(~allowed, -1.0)
        alt = keys.argmax(-1)
        cls = torch.stack([ca, cb])
        cls = torch.where(cnt[cls] > 0, cls, alt)
        # a uniform buffer row of each class: rows sorted by label, empty slots last
        order = torch.argsort(torch.where(valid, buf_y, self.num_classes), stable=True)
        start = torch.cumsum(cnt, 0) - cnt
        u = torch.rand(2, m, generator=g, device=dev)
        k = torch.minimum((u * cnt[cls]).floor(), cnt[cls] - 1)
        rows = order[(start[cls] + k).long()]
        xa, xb2 = self.to_input(self.buffer.x[rows[0]]), self.to_input(self.buffer.x[rows[1]])
        # one mixup decision per class pair, one Beta lambda per row
        mixes = torch.rand(len(self.pair_a), generator=g, device=dev) <= cfg.mixup_p
        lam_p = beta_sample(m, cfg.mixup_alpha, g, dev) * mixes[pair]
        lam_p4 = lam_p.view(-1, 1, 1, 1).to(x.dtype)
        x_p = (1 - lam_p4) * xa + lam_p4 * xb2
        return (torch.cat([x_mix, x_p]), torch.cat([y_a, cls[0]]), torch.cat([y_b, cls[1]]), torch.cat([lam, lam_p]))

    def apf_pair_counts(self, m: int) -> Tensor:
        """Rows per class pair (itertools.combinations order over all classes; 0 for pairs of classes without a
        prototype): round(m * softmax(1 / ||p_a - p_b||)) over the pairs of classes with prototypes, then the
        official fix of the total: the missing rows added one each to random pairs, the extra ones taken one
        each from random pairs that have some. Sums to m."""
        g, dev = self.generator, self.device
        a, b = self.pair_a, self.pair_b
        valid = self.proto_present[a] & self.proto_present[b]
        dist = (self.proto_mean[a] - self.proto_mean[b]).norm(dim=1).clamp_min(1e-12)
        score = torch.where(valid, 1.0 / dist, float("-inf"))
        score = torch.where(valid.any(), score, torch.zeros_like(score))  # no pair: uniform (never when >= 2 classes)
        counts = torch.round(torch.softmax(score, 0) * m)
        diff = m - counts.sum()
        keys = torch.rand(len(a), generator=g, device=dev)
        rank_all = torch.argsort(torch.argsort(keys.masked_fill(~valid, 2.0)))
        rank_nz = torch.argsort(torch.argsort(keys.masked_fill(~valid | (counts <= 0), 2.0)))
        counts = counts + ((diff > 0) & (rank_all < diff)).float() - ((diff < 0) & (rank_nz < -diff)).float()
        return counts.long()

    # -- the step --------------------------------------------------------------------------------------------
    def embed(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(features, L2-normalised projections) of model inputs x."""
        base = cast(Backbone, getattr(self.model, "_orig_mod", self.model))  # torch.compile wraps the model
        with self.autocast():
            f = base.features(x)
            z = self.projection(f)
        return f, F.normalize(z.float(), dim=1)

    def similarity(self, z: Tensor, f: Tensor, offset: Tensor, scale: float) -> Tensor:
        """scale * z . f'[offset:offset + proj_dim] + scale * z . z, f' = f / ||f|| (OCM's similarity of rows)."""
        cols = offset + torch.arange(self.cfg.proj_dim, device=z.device)
        fs = F.normalize(f.float(), dim=1).index_select(1, cols)
        return scale * (z @ fs.t()) + scale * (z @ z.t())

    def view_labels(self, y: Tensor) -> Tensor:
        """Labels of the rows of [rotation views; their augmented views]: class + num_classes x rotation index."""
        labels = torch.cat([y + self.num_classes * k for k in range(ROTATIONS)])
        return torch.cat([labels, labels])

    def seen_prototypes(self, x: Tensor, y: Tensor) -> Tensor:
        """OPE on replayed rows (model input x): a pass over [x, A(x)]; keeps the class means for APF."""
        _, z = self.embed(torch.cat([x, self.augment(x)]))
        loss, m1, m2, present = prototype_loss(
            z[: len(y)], z[len(y) :], y, self.num_classes, self.cfg.proto_temperature
        )
        self.proto_mean = ((m1 + m2) / 2).detach()
        self.proto_present = present
        return loss

    def update(self, batch: Batch) -> tuple[Tensor, Tensor]:
        cfg = self.cfg
        x, y, n = self.to_input(batch.x), batch.y, len(batch.y)
        zero = x.new_zeros(())
        if batch.task == 0:
            rx = rotation_views(x)
            f, z = self.embed(torch.cat([rx, self.augment(rx)]))
            ins = ocm_nt_xent_new(
                self.similarity(z, f, self.feature_offsets(1)[0], 1.0).float(), self.view_labels(y), cfg.ins_temperature
            )
            ope_seen = zero
            mem = self.replay(cfg.replay_batch_size) if batch.step_in_task != 0 else None
            if mem is not None:
                ope_seen = self.seen_prototypes(self.to_input(mem[0]), mem[1])
            ope_new = prototype_loss(z[:n], z[16 * n : 17 * n], y, self.num_classes, cfg.proto_temperature)[0]
            logits_ce = self.forward_float(self.augment(x))
            ce = F.cross_entropy(logits_ce, y)
            self.report("new", logits_ce, y, self._all_classes())
        else:
            size = min(cfg.replay_batch_size, cfg.per_class_replay * len(self.classes.seen_labels))
            mem = self.replay(size)
            if mem is None:
                raise RuntimeError("OnPro needs a buffer with samples after the first task")
            xm, ym = self.to_input(mem[0]), mem[1]
            if cfg.apf and batch.step_in_task != 0:
                x_mix, y_a, y_b, lam = self.apf(xm, ym, size)
            else:
                x_mix, y_a, y_b, lam = xm, ym, ym, torch.zeros(len(ym), device=xm.device)
            soft = (1 - lam) * y_a.float() + lam * y_b.float()  # the official float label of a mixed row
            rx, rr = rotation_views(x), rotation_views(x_mix)
            f, z = self.embed(torch.cat([rx, self.augment(rx), rr, self.augment(rr)]))
            k = 32 * n
            offsets = self.feature_offsets(2)
            sim = self.similarity(z[:k], f[:k], offsets[0], cfg.sim_lambda)
            sim_r = self.similarity(z[k:], f[k:], offsets[1], cfg.sim_lambda)
            ins = ocm_nt_xent_buffer(sim_r.float(), self.view_labels(soft), cfg.ins_temperature) + ocm_nt_xent_new(
                sim.float(), self.view_labels(y), cfg.ins_temperature
            )
            logits_ce = self.forward_float(self.augment(x_mix))
            ope_seen = self.seen_prototypes(xm, ym)
            ope_new = prototype_loss(z[:n], z[16 * n : 17 * n], y, self.num_classes, cfg.proto_temperature)[0]
            ce = mixup_cross_entropy(logits_ce, y_a, y_b, lam)
            self.report("replay", logits_ce, y_a, self._all_classes())
        loss = ce + ins + ope_new + ope_seen
        self.last = {"ce": ce.detach(), "ins": ins.detach(), "ope_new": ope_new.detach(), "ope_seen": ope_seen.detach()}
        with torch.no_grad(), self.autocast():  # the incoming batch's logits: un-augmented, from the first pass
            logits = self.head(f[:n].detach()).float()
        self.step(loss)
        return loss, logits

    def _all_classes(self) -> Tensor:
        return torch.ones(self.num_classes, dtype=torch.bool, device=self.device)

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def log_values(self) -> dict[str, float]:
        return {f"onpro/{k}": float(v) for k, v in self.last.items()}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "proto_mean": self.proto_mean.cpu(), "proto_present": self.proto_present.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.proto_mean = state["proto_mean"].to(self.device, copy=True)
        self.proto_present = state["proto_present"].to(self.device, copy=True)
