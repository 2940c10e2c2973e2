"""CCL-DC: collaborative continual learning with distillation chain (Wang, Michel, Xiao, Yamasaki, "Improving
Plasticity in Online Continual Learning via Collaborative Learning", CVPR 2024; official code
maorong-wang/CCL-DC, src/learners/ccldc/{baseccl,erccl,eraceccl,gsaccl}.py).

Two peer learners run the same method, each with its own model and optimizer, and teach each other. The peer is
a second instance of the run's method (built by the runner: `make_peer`), sharing the buffer; each update it
takes its own step of the method's loss. Beside that loss, both peers get the collaborative term on a replay draw
joined to the incoming batch, x0 = [x_mem, x_in], and a chain of increasingly augmented views
x1 = T1(x0) (kornia's random resized crop [0.6, 1] + horizontal flip), x2 = RA(x1), x3 = RA(x2) (RandAugment, n ops of
magnitude m, one choice of ops for the whole batch as torchvision's RandAugment on a batch tensor does):

    L_k = ce_weight * sum_{v=0..3} CE(f_k(x_v), y)
          + kd_lambda * [KD(f_k(x3) | f_l(x3)) + KD(f_k(x0) | f_l(x1)) + KD(f_k(x1) | f_l(x2)) + KD(f_k(x2) | f_l(x3))]

(k, l the two peers, f_l detached: the distillation chain, each view learns from the peer's next, more augmented
view). L_1 joins the run's method's loss before its optimizer step, L_2 the peer's. Evaluation: the ensemble
(mean of the two peers' logits), as the official code's main accuracy; both peers alone as extra heads.
docs/methods.md ("CCL-DC add-on") lists every deviation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor

from cil.core.addons.base import Addon, AddonConfig, in_eval_mode, register
from cil.core.augment import GSAAugment
from cil.core.data.stream import Batch
from cil.core.methods.base import Method, ReplayConfig
from cil.core.objectives.distill import kd_loss
from cil.errors import ConfigError, require

HEADS = ("ensemble", "student", "peer")


@dataclass
class CCLDCConfig(AddonConfig):
    name: str = "ccl_dc"
    kd_lambda: float = 1.0  # distillation weight (parser default; CVPR24 configs: ER 2, ER-ACE 1, GSA 1)
    ce_weight: float = 0.5  # weight of the four cross-entropy terms (the official 0.5 * loss_ce)
    temperature: float = 4.0  # kl_loss's temperature
    replay_batch_size: int | None = None  # the term's buffer draw; null: the method's replay_batch_size
    crop_scale: list[float] = field(default_factory=lambda: [0.6, 1.0])  # T1's random resized crop
    randaug_n: int = 3  # RandAugment ops per view (CVPR24 configs: CIFAR 3, TinyImageNet 1)
    randaug_m: int = 15  # RandAugment magnitude (CVPR24 configs: CIFAR 15, TinyImageNet 11)
    eval_head: str = "ensemble"  # ensemble (official main accuracy) | student (the run's model) | peer
    report_heads: bool = True  # also evaluate the other two heads (results.json heads)

    def validate(self) -> None:
        super().validate()
        require(self.kd_lambda >= 0, self.key("kd_lambda"), self.kd_lambda, "use a number >= 0")
        require(self.ce_weight >= 0, self.key("ce_weight"), self.ce_weight, "use a number >= 0")
        require(self.temperature > 0, self.key("temperature"), self.temperature, "use a number > 0")
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
        require(self.randaug_n >= 0, self.key("randaug_n"), self.randaug_n, "use an integer >= 0")
        require(0 <= self.randaug_m <= 30, self.key("randaug_m"), self.randaug_m, "use an integer in [0, 30]")
        require(self.eval_head in HEADS, self.key("eval_head"), self.eval_head, f"choose one of {HEADS}")


class _PeerLink(Addon):
    """The peer's side: adds the collaborative term computed for it during the run method's update."""

    name = "ccl_dc_peer"

    def __init__(self) -> None:
        self.pending: Tensor | None = None

    def extra_loss(self, method: Method) -> Tensor | None:
        loss, self.pending = self.pending, None
        return loss


@register
class CCLDC(Addon):
    name = "ccl_dc"
    Config = CCLDCConfig
    cfg: CCLDCConfig

    def __init__(
        self, cfg: CCLDCConfig, method: Method, make_peer: Callable[[], Method] | None = None, **context: Any
    ) -> None:
        super().__init__(cfg, method)
        if make_peer is None:
            raise ConfigError(
                "addon=ccl_dc needs a peer learner: build the run with cil.run.experiment "
                "(it passes make_peer); method-less use is not supported"
            )
        self.peer = make_peer()
        self.link = _PeerLink()
        self.peer.addons = [self.link]
        size = tuple(method.input_shape[1:]) if method.input_shape else None
        # T1 is kornia's RandomResizedCrop (CCL-DC pins kornia 0.6.8), which keeps a candidate only if 0 < h < H and
        # 0 < w < W and has its own fallback (kornia@v0.6.8 kornia/augmentation/random_generator/_2d/crop.py:
        # 208-236): GSAAugment's bounds="kornia"
        self.crop = (
            GSAAugment(size, scale=tuple(cfg.crop_scale), grayscale_p=0.0, bounds="kornia")
            if size and len(size) == 2
            else None
        )
        from torchvision.transforms import RandAugment

        self.randaug = RandAugment(cfg.randaug_n, cfg.randaug_m)
        self.rng = torch.Generator().manual_seed(method.seed * 7 + 11)  # seeds of RandAugment's op choices (CPU)
        self.batch: Batch | None = None

    # -- training --------------------------------------------------------------------------------------------
    def begin_observe(self, method: Method, batch: Batch) -> None:
        self.batch = batch
        if not self.active:
            return
        # the peer is stepped with `update` alone: what its `observe` does first (the seen classes; task-free GSA's
        # pseudo-tasks from the same labels; PCR's augmented copy of this batch, not the previous one's)
        self.peer.begin_batch(batch)

    def on_task_start(self, method: Method, task: int, classes: Tensor) -> None:
        if self.active:
            self.peer.on_task_start(task, classes)

    def rand_augment(self, x: Tensor) -> Tensor:
        """torchvision's RandAugment on the uint8 batch (one op choice for the batch), its random choices drawn
        from a torch RNG seeded from this add-on's own generator (a run repeats and resumes bit for bit)."""
        from torchvision.transforms.functional import convert_image_dtype

        seed = int(torch.randint(0, 2**62, (1,), generator=self.rng))
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(seed)
            out: Tensor = self.randaug(convert_image_dtype(x, torch.uint8))
        return convert_image_dtype(out, torch.float32)

    def views(self, method: Method, x_uint8: Tensor) -> list[Tensor]:
        """[x3, x0, x1, x2] as model inputs (the official order of the passes)."""
        x0 = x_uint8.float().div(255.0)
        if self.crop is not None:
            gray, boxes = self.crop.draw(len(x0), x0.shape[-2], x0.shape[-1], method.generator)
            flip = torch.rand(len(x0), generator=method.generator, device=method.generator.device) < 0.5
            x1 = self.crop.apply(x0, gray, boxes)
            x1 = torch.where(flip.view(-1, 1, 1, 1), x1.flip(-1), x1)
            x2 = self.rand_augment(x1)
            x3 = self.rand_augment(x2)
        else:
            x1 = x2 = x3 = x0
        return [method.from_unit(v) for v in (x3, x0, x1, x2)]

    def extra_loss(self, method: Method) -> Tensor | None:
        cfg = self.cfg
        if not self.active:
            return None
        batch = self.batch
        assert batch is not None  # begin_observe comes first
        if cfg.replay_batch_size is not None:
            r = cfg.replay_batch_size
        else:  # the method's draw; a method without replay (naive) has no buffer to draw from
            r = method.cfg.replay_batch_size if isinstance(method.cfg, ReplayConfig) else 0
        mem = method.replay(r)
        x, y = (batch.x, batch.y) if mem is None else (torch.cat([mem[0], batch.x]), torch.cat([mem[1], batch.y]))
        views = self.views(method, x)
        l1 = [method.forward_float(v) for v in views]  # [x3, x0, x1, x2]
        l2 = [self.peer.forward_float(v) for v in views]
        mask = self.softmax_mask(method)
        # sum() over Tensors is typed Tensor | Literal[0] (the empty case): never 0 here, the lists are not empty
        ce1 = cast(Tensor, sum(F.cross_entropy(self.masked(z, mask), y) for z in l1))
        ce2 = cast(Tensor, sum(F.cross_entropy(self.masked(z, mask), y) for z in l2))
        T = cfg.temperature
        # the chain: (x3 | x3), (x0 | x1), (x1 | x2), (x2 | x3) -- student view | peer's view (detached)
        pairs = ((0, 0), (1, 2), (2, 3), (3, 0))
        kd1 = cast(Tensor, sum(kd_loss(l1[i], l2[j], T, mask) for i, j in pairs))
        kd2 = cast(Tensor, sum(kd_loss(l2[i], l1[j], T, mask) for i, j in pairs))
        full = mask if mask is not None else torch.ones(l1[0].shape[1], dtype=torch.bool, device=y.device)
        n_mem = 0 if mem is None else len(mem[1])
        for z in l1:
            method.report(
                "replay", z, y, full, scale=cfg.weight * cfg.ce_weight * n_mem / len(y), rows=slice(None, n_mem)
            )
            method.report(
                "new", z, y, full, scale=cfg.weight * cfg.ce_weight * (1 - n_mem / len(y)), rows=slice(n_mem, None)
            )
        self.link.pending = cfg.weight * (cfg.ce_weight * ce2 + cfg.kd_lambda * kd2)
        self.last = {"ce": ce1.detach(), "kd": kd1.detach(), "peer_ce": ce2.detach(), "peer_kd": kd2.detach()}
        return cfg.weight * (cfg.ce_weight * ce1 + cfg.kd_lambda * kd1)

    def after_step(self, method: Method) -> None:
        """The peer's update: its own step of the method's loss plus its collaborative term (official order:
        peer 1 steps, then peer 2)."""
        if self.link.pending is not None:
            assert self.batch is not None  # set by begin_observe, before the step
            self.peer.update(self.batch)

    # -- evaluation ------------------------------------------------------------------------------------------
    def peer_logits(self, x: Tensor) -> Tensor:
        peer = self.peer
        was = peer.owned.training
        peer.owned.eval()
        try:
            return in_eval_mode(peer.model, lambda: peer.predict_logits(x))
        finally:
            peer.owned.train(was)

    def eval_logits(self, method: Method, x: Tensor, head: str | None) -> Tensor | None:
        if not self.active:  # weight 0: the method's own head, as without the add-on
            return None
        which = (
            self.cfg.eval_head
            if head is None
            else {"ccl_dc_student": "student", "ccl_dc_peer": "peer", "ccl_dc_ensemble": "ensemble"}.get(head)
        )
        if which is None:
            return None
        if which == "student":
            return method.predict_logits(x)
        if which == "peer":
            return self.peer_logits(x)
        return (method.predict_logits(x).float() + self.peer_logits(x).float()) / 2

    def eval_heads(self) -> list[str]:
        if not self.cfg.report_heads or not self.active:
            return []
        return [h for h in ("ccl_dc_student", "ccl_dc_peer", "ccl_dc_ensemble") if h != f"ccl_dc_{self.cfg.eval_head}"]

    # -- state -----------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        peer = self.peer
        return {
            "model": {k: v.cpu() for k, v in peer.model.state_dict().items()},
            "optimizer": peer.optimizer.state_dict(),
            "method": peer.state_dict(),
            "rng": self.rng.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.peer.model.load_state_dict(state["model"])
        self.peer.optimizer.load_state_dict(state["optimizer"])
        self.peer.load_state_dict(state["method"])
        self.rng.set_state(state["rng"])

    def extra_results(self) -> dict[str, Any]:
        return {
            "ccl_dc": {
                "eval_head": self.cfg.eval_head,
                "cost": "two networks: about twice the method's compute and memory, plus 8 passes",
            }
        }
