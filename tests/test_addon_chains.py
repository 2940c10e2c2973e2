"""The add-ons end to end: MKD's augmentation and block, CCL-DC's view chain and peer update, and the evaluation
heads (MKD's averaged and teacher heads, CCL-DC's ensemble, PCR's cosine head), on the batch-norm ResNet of
tests/test_bn_lockstep.py (whose drivers, recorders and references this file uses).

Pinned here, with the official code they come from (commits in docs/protocols.md, "Official code read"):
- MKD's `tf_ema` augmentation (MKD `src/learners/ema/gsa_ema.py:76-81`: resized crop of scale [min_crop, 1],
  horizontal flip, colour jitter 0.4/0.4/0.4/0.1 with p 0.8, grayscale p 0.2), image by image against
  torchvision's functional ops in that order (docs/methods.md, MKD deviation (3): torchvision's definitions in a
  fixed order). Which batch is augmented (x = [replay draw, incoming], `gsa_ema.py:270-279`), the raw-input pass
  (:282), the block form CE + kd_lambda x KD (:283-291), and the teachers' EMA with bias correction
  a / (1 - a^k), k = max(1, b // correction_step), after the optimizer step (:295-297, `update_ema` :588-600),
  on ER-ACE (`er_ace_ema.py:133-147` has the same block).
- CCL-DC's views (CCL-DC `src/learners/ccldc/baseccl.py:97-125`, `gsaccl.py:370-372`): x0 the raw batch, x1 =
  T1(x0) a resized crop of scale [0.6, 1] then a horizontal flip, x2 = RandAugment(x1), x3 = RandAugment(x2)
  (torchvision RandAugment(3, 15) on the uint8 batch); which view feeds which term: CE on each view and the chain
  KD(f_k(x3)|f_l(x3)) + KD(f_k(x0)|f_l(x1)) + KD(f_k(x1)|f_l(x2)) + KD(f_k(x2)|f_l(x3)) (`gsaccl.py:387-396`).
- CCL-DC's peer update on GSA (`gsaccl.py:398-404`): the peer's own GSA loss (its own statistics and draws,
  docs/methods.md deviation (2)) plus its collaborative term; its loss, gradients, batch-norm state and the
  parameters after its optimizer step.
- The heads the learner evaluates (`Learner._task_end`: `evaluate_all`, then `predict` per extra head), against
  float64 references in eval mode: MKD's average ((student + teachers) / (n + 1) parameters with the student's
  buffers, `gsa_ema.py:576-586` `init_agg_model`) and teacher head (the teacher's own parameters and buffers,
  `er_ema.py:214-228` with `--eval-teacher`), CCL-DC's ensemble (mean of both peers' logits in eval mode,
  `baseccl.py:243-246`, `gsaccl.py:433-447`), PCR's cosine head (cos(f(x), w_c) / 0.09, PCR `models/resnet.py`
  `cosLinear`). Evaluation moves no running statistic and leaves every module in the mode it found it.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torchvision.transforms.functional as TF
from test_bn_lockstep import (
    BUFFER_SIZE,
    MKD_CFG,
    NUM_CLASSES,
    CallLog,
    Recorder,
    ViewLog,
    add_grads,
    assert_bn_state,
    assert_near,
    assert_sgd_step,
    assert_step,
    assert_teachers,
    batches,
    build,
    ccl_parts,
    ccl_reference,
    copy64,
    grads_of,
    lockstep,
    mkd_alphas,
    mkd_block_reference,
    names_of,
    pcr_reference,
    peer_maker,
    sgd_after,
    stream,
    where,
    with_addon,
)
from test_pcr import EPS, SCALE
from test_reference_steps import (
    OTHER,
    AugmentLog,
    Draws,
    RefStats,
    er_ace_reference,
    gsa_config,
    gsa_reference,
    to_unit,
)
from torchvision.transforms import RandAugment
from torchvision.transforms.functional import convert_image_dtype

from cil.core.addons.ccl_dc import CCLDCConfig
from cil.core.addons.mkd import MKDAugment, MKDConfig, color_jitter, in_order, in_order_masked
from cil.core.learner import Learner
from cil.core.methods.er import ER, ERConfig
from cil.core.methods.er_ace import ERACE, ERACEConfig
from cil.core.methods.gsa import GSA
from cil.core.methods.pcr import PCR, PCRConfig
from cil.core.models import build_model


def replayed_generator(g: torch.Generator) -> torch.Generator:
    """A generator in `g`'s state: the same draws again."""
    out = torch.Generator(device=g.device)
    out.set_state(g.get_state())
    return out


# ---------------------------------------------------------------------------------------------------------------
# MKD
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("channels", [3, 1])
def test_mkd_augmentation_matches_torchvision_per_image(channels):
    """tf_ema, image by image: torchvision's resized crop (scale [0.2, 1]) of the drawn box, horizontal flip (p 0.5),
    brightness, contrast, saturation, hue (factors 1 +- 0.4, hue +- 0.1) with p 0.8 in the call's drawn order
    (kornia ColorJitter: one order per call), grayscale (p 0.2); one-channel images get brightness and contrast
    only. Every branch is exercised, over calls of different orders."""
    x = torch.rand(96, channels, 16, 16, generator=torch.Generator().manual_seed(0))
    aug = MKDAugment((16, 16), (0.2, 1.0))
    g = torch.Generator().manual_seed(1)
    orders = set()
    for _ in range(3):
        again = replayed_generator(g)
        out = aug(x, g)
        gray0, boxes = aug.crop.draw(len(x), 16, 16, again)  # the draws of the call, in its order
        u = torch.rand(len(x), 7, generator=again)
        order = torch.randperm(4, generator=again).tolist()
        orders.add(tuple(order))
        assert not gray0.any(), "tf_ema's crop has no grayscale of its own"
        areas = boxes[:, 2] * boxes[:, 3] / 256.0
        assert float(areas.min()) >= 0.2 - 0.05 and float(areas.min()) < 0.4
        flip, jitter, gray = u[:, 0] < 0.5, u[:, 1] < 0.8, u[:, 6] < 0.2
        for branch in (flip, jitter, gray):
            assert 0 < int(branch.sum()) < len(x)
        for i in range(len(x)):
            top, left, h, w = (int(v) for v in boxes[i])
            ref = TF.resized_crop(x[i], top, left, h, w, [16, 16], antialias=True)
            if flip[i]:
                ref = TF.hflip(ref)
            if jitter[i]:
                b, c, s = (1 - 0.4 + 0.8 * float(u[i, k]) for k in (2, 3, 4))
                hue = (2 * float(u[i, 5]) - 1) * 0.1
                ops = [
                    lambda v, b=b: TF.adjust_brightness(v, b),
                    lambda v, c=c: TF.adjust_contrast(v, c),
                    lambda v, s=s: TF.adjust_saturation(v, s),
                    lambda v, hue=hue: TF.adjust_hue(v, hue),
                ]
                for op in order:
                    if channels == 3 or op < 2:
                        ref = ops[op](ref)
            if gray[i] and channels == 3:
                ref = TF.rgb_to_grayscale(ref, num_output_channels=3)
            # torchvision's luma weighs red 0.2989, the official kornia / PIL path and ours 0.299
            torch.testing.assert_close(out[i], ref, rtol=0, atol=3e-4, msg=lambda m, i=i: f"image {i}: {m}")
    assert len(orders) == 3, orders  # three calls, three orders: the order is the call's, not a constant


@pytest.mark.parametrize("channels", [3, 1])
def test_mkd_jitter_order_read_on_the_host_or_masked_on_the_device_is_the_same(channels):
    """The jitter's two ways of following the drawn order (read on a CPU; masked where reading would sync) give
    the same images for every one of the 24 orders."""
    g = torch.Generator().manual_seed(3)
    x, u = torch.rand(6, channels, 8, 8, generator=g), torch.rand(6, 4, generator=g)
    ops = [lambda v, k=k: (v + 0.1 * (k + 1)).clamp(0, 1) * (1 - 0.05 * k) for k in range(4 if channels == 3 else 2)]
    seen = set()
    for perm in itertools.permutations(range(4)):
        order = torch.tensor(perm)
        assert torch.equal(in_order(x, ops, order), in_order_masked(x, ops, order)), perm
        seen.add(color_jitter(x, u, order).sum().item())
    assert len(seen) > 1  # the order matters


@pytest.mark.parametrize("raw_pass", [True, False], ids=["raw_pass", "no_raw_pass"])
def test_mkd_block_end_to_end_on_er_ace(raw_pass):
    """ER-ACE (two passes) + MKD (two teachers, correction_step 2 so that k = b // 2 grows along the stream):
    the augmentation is of [replay draw, incoming] once; the block is the raw-input pass (`raw_pass`), the
    augmented pass and each teacher's pass, CE + kd_lambda x KD; after the optimizer step every teacher moves
    to (1 - a) theta_j + a / (1 - a^k) theta with the updated student. Loss, gradients, the batch-norm state of
    the student and both teachers and the teachers' parameters at every step of two tasks."""
    cfg = MKDConfig(**{**MKD_CFG, "correction_step": 2}, replay_batch_size=6, raw_pass=raw_pass, crop_scale=[0.3, 1])
    method = with_addon(build(ERACE, ERACEConfig(separate_passes=True)), "mkd", cfg)
    mkd = method.addons[0]
    rec = Recorder(method)
    rec.watch_addon(mkd, "mkd")
    mkd_aug = CallLog(mkd, "augment")
    alphas, ks = mkd_alphas(cfg), set()
    assert len(alphas) == 2 and alphas[0] < alphas[1]
    names = names_of(method.model)
    everything = torch.ones(BUFFER_SIZE, dtype=torch.bool)
    also = lambda: {"teachers": [copy64(t) for t in mkd.teachers]}  # noqa: E731
    steps = lockstep(method, batches(4, tasks=2), rec, [mkd_aug], also)
    for seen_batches, (batch, seen, before) in enumerate(steps, start=1):
        ks.add(max(1, seen_batches // 2))
        m64, buf = before.model64, before.buffer
        ref = er_ace_reference(m64, batch, seen, Draws(rec.calls(end="mkd"), [], buf), 10)
        draws = Draws(rec.calls(start="mkd"), [], buf)
        mem_x, mem_y = draws.rows(6, "MKD's replay draw", {}, everything[: len(buf.y)])
        draws.check_all_used()
        x_u8, y = torch.cat([mem_x, batch.x]), torch.cat([mem_y, batch.y])
        assert len(mkd_aug.calls) == 1, "one augmentation per block"
        assert torch.equal(mkd_aug.calls[0][0], to_unit(x_u8)), "the augmented batch is not [replay draw, incoming]"
        loss = mkd_block_reference(m64, before.also["teachers"], x_u8, y, mkd_aug.calls[0][1], seen, cfg)
        grads = add_grads(ref.grads, grads_of(loss, list(m64.parameters())))
        assert_step(batch, rec.loss + rec.extra["mkd"], rec.grads, ref.loss + loss.detach(), grads, names)
        assert_bn_state(method.model, m64, "student", batch)
        after = sgd_after(list(m64.parameters()), grads)
        assert_teachers(mkd, before.also["teachers"], alphas, after, seen_batches, cfg, batch)
    assert ks == {1, 2, 3, 4}, "the bias correction's k took several values"


# ---------------------------------------------------------------------------------------------------------------
# CCL-DC
# ---------------------------------------------------------------------------------------------------------------
def test_ccl_dc_views_are_the_official_chain():
    """views() on an RGB batch: x0 = the batch in [0, 1]; x1 = torchvision's resized crop (scale [0.6, 1]) of the
    drawn box, horizontally flipped where drawn; x2 = torchvision RandAugment(3, 15) of x1 and x3 = of x2 (uint8
    round trip; op choices seeded from the add-on's own generator, docs/methods.md CCL-DC deviation (5)). The
    returned order is [x3, x0, x1, x2], the order of the official passes."""
    shape = (3, 16, 16)
    torch.manual_seed(0)
    model = build_model("resnet18", shape, NUM_CLASSES, nf=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = ER(model, opt, None, ERConfig(), NUM_CLASSES, torch.device("cpu"), seed=3, input_shape=shape)

    def make_peer(_):
        peer_model = build_model("resnet18", shape, NUM_CLASSES, nf=4)
        return ER(peer_model, torch.optim.SGD(peer_model.parameters(), lr=0.1), None, ERConfig(), NUM_CLASSES, "cpu")

    ccl = with_addon(method, "ccl_dc", CCLDCConfig(), make_peer).addons[0]
    x = torch.randint(0, 256, (40, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    gen, rng = replayed_generator(method.generator), replayed_generator(ccl.rng)
    x3, x0, x1, x2 = ccl.views(method, x)
    assert torch.equal(x0, x.float() / 255)
    _, boxes = ccl.crop.draw(len(x), 16, 16, gen)
    flip = torch.rand(len(x), generator=gen) < 0.5
    assert 0 < int(flip.sum()) < len(x)
    areas = boxes[:, 2] * boxes[:, 3] / 256.0
    assert float(areas.min()) >= 0.6 - 0.05 and float(areas.max()) <= 1.0
    for i in range(len(x)):
        top, left, h, w = (int(v) for v in boxes[i])
        ref = TF.resized_crop(x0[i], top, left, h, w, [16, 16], antialias=True)
        torch.testing.assert_close(x1[i], TF.hflip(ref) if flip[i] else ref, rtol=0, atol=1e-5)
    randaug = RandAugment(3, 15)

    def ra(v):
        seed = int(torch.randint(0, 2**62, (1,), generator=rng))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return convert_image_dtype(randaug(convert_image_dtype(v, torch.uint8)), torch.float32)

    ref2 = ra(x1)
    assert torch.equal(x2, ref2), "x2 is not RandAugment(3, 15) of x1"
    assert torch.equal(x3, ra(ref2)), "x3 is not RandAugment(3, 15) of x2"
    assert not torch.equal(x2, x1) and not torch.equal(x3, x2)


@pytest.mark.slow
def test_ccl_dc_peer_update_on_gsa():
    """GSA + CCL-DC: the student's GSA step and collaborative term; then the peer's update: its own GSA step (its
    own statistics G+ / G-, its own augmentation and buffer draws) on top of its collaborative term, one
    optimizer step. For both: loss, gradients, batch-norm state (the peer's collaborative passes before its GSA
    passes, deviation (4)), statistics, and parameters after the step, at every step of three tasks; the views
    are checked to be the chain x0 -> x1 -> x2 -> x3 and fed to the terms as the official code does."""
    cfg = CCLDCConfig(kd_lambda=1.5, replay_batch_size=10)
    # Seed 1, not 0: under T1's kornia crop law the seed-0 trajectory puts the float64 reference within ~1e-7 of a ReLU
    # kink at one step (its gradient moves 0.2 % under a 1e-7 parameter nudge), which the float32 run crosses.
    seed = 1
    method = with_addon(
        build(GSA, gsa_config(OTHER), seed=seed), "ccl_dc", cfg, peer_maker(GSA, gsa_config(OTHER), seed=seed)
    )
    rec = Recorder(method)
    ccl, peer, prec = ccl_parts(method, rec)
    views = ViewLog(ccl)
    aug1, aug2 = AugmentLog(method.gsa.augment), AugmentLog(peer.gsa.augment)
    stats1, stats2 = RefStats(), RefStats()
    names = names_of(method.model)
    everything = torch.ones(BUFFER_SIZE, dtype=torch.bool)
    also = lambda: {"peer": copy64(peer.model)}  # noqa: E731
    for batch, seen, before in lockstep(method, batches(3), rec, [prec, views, aug1, aug2], also):
        assert "peer" in rec.marks and prec.loss is not None, f"the peer made no update at {where(batch)}"
        assert prec.extra.get("link") is not None, f"the peer's step lacks its collaborative term at {where(batch)}"
        m1, m2, buf = before.model64, before.also["peer"], before.buffer
        ref1 = gsa_reference(m1, batch, seen, Draws(rec.calls(end="ccl"), aug1.calls, buf), stats1, OTHER)
        draws = Draws(rec.calls("ccl", "peer"), [], buf)
        mem_x, mem_y = draws.rows(10, "CCL-DC's replay draw", {}, everything[: len(buf.y)])
        draws.check_all_used()
        y = torch.cat([mem_y, batch.y])
        l1, l2 = ccl_reference(m1, m2, views.chain(to_unit(torch.cat([mem_x, batch.x]))), y, seen, cfg)
        ref2 = gsa_reference(m2, batch, seen, Draws(rec.calls(start="peer"), aug2.calls, buf), stats2, OTHER)
        g1 = add_grads(ref1.grads, grads_of(l1, list(m1.parameters())))
        g2 = add_grads(ref2.grads, grads_of(l2, list(m2.parameters())))
        assert_step(batch, rec.loss + rec.extra["ccl"], rec.grads, ref1.loss + l1.detach(), g1, names)
        assert_step(batch, prec.loss + prec.extra["link"], prec.grads, ref2.loss + l2.detach(), g2, names, "peer, ")
        for who, m, model, model64, grads, stats in (
            ("student", method, method.model, m1, g1, stats1),
            ("peer", peer, peer.model, m2, g2, stats2),
        ):
            assert_bn_state(model, model64, who, batch)
            assert_near(m.gsa.stats.positive, stats.positive, f"the {who}'s G+ after {where(batch)}")
            assert_near(m.gsa.stats.negative, stats.negative, f"the {who}'s G- after {where(batch)}")
            assert_sgd_step(model, model64, grads, who, batch)
    assert not torch.equal(stats1.positive, stats2.positive), "each peer keeps its own statistics"
    assert views.flipped > 0 and views.unflipped > 0


# ---------------------------------------------------------------------------------------------------------------
# Evaluation heads
# ---------------------------------------------------------------------------------------------------------------
def trained(method, n_batches: int = 8) -> Learner:
    """A learner after `n_batches` training batches of two tasks (batch-norm statistics moved, teachers and peer
    trained)."""
    learner = Learner(stream(), method, progress=False, anytime_every=0, log_every=10**9)
    for batch in batches(n_batches // 2, tasks=2):
        learner.train_batch(batch)
    return learner


def evaluated(learner: Learner, modules: dict) -> dict:
    """`Learner._task_end` (evaluate_all, then every extra head through `predict`), recording the logits each head
    was evaluated with; checks that the evaluation moved no buffer and left every module in its mode."""
    method = learner.method
    logits: dict = {}
    original = method.eval_logits

    def eval_logits(x, head=None):
        out = original(x, head)
        logits.setdefault(head, []).append((x.clone(), out.detach().clone()))
        return out

    method.eval_logits = eval_logits
    buffers = {k: [b.clone() for b in m.buffers()] for k, m in modules.items()}
    modes = {k: [s.training for s in m.modules()] for k, m in modules.items()}
    learner._task_end(learner.task)
    for k, m in modules.items():
        for b, b0 in zip(m.buffers(), buffers[k], strict=True):
            assert torch.equal(b, b0), f"evaluating moved a buffer of the {k}"
        assert [s.training for s in m.modules()] == modes[k], f"evaluating changed the {k}'s mode"
    x = to_unit(learner.test_x)
    out = {}
    for head, chunks in logits.items():
        assert torch.equal(torch.cat([c[0] for c in chunks]), x), f"head {head} did not see the test set"
        out[head] = torch.cat([c[1] for c in chunks])
    return out


def accuracy_row(logits: torch.Tensor, learner: Learner) -> list[float]:
    """Per-task accuracy (%) of the argmax over the seen classes."""
    seen = learner.method.seen
    pred = logits.masked_fill(~seen, float("-inf")).argmax(1)
    tasks = learner.test_task
    return [
        100.0 * float((pred[tasks == t] == learner.test_y[tasks == t]).double().mean()) for t in range(learner.n_tasks)
    ]


def assert_head(learner, logits, ref: torch.Tensor, head, row: list[float]) -> None:
    """The logits head `head` was evaluated with equal the reference's, and the accuracy the learner recorded for
    it is that of their argmax over the seen classes."""
    assert_near(logits, ref, f"the logits of head {head}")
    seen_tasks = learner.task + 1
    assert row[:seen_tasks] == pytest.approx(accuracy_row(logits, learner)[:seen_tasks]), f"head {head}'s accuracy"


def eval64(module) -> torch.nn.Module:
    return copy64(module).eval()


def averaged64(model, teachers) -> torch.nn.Module:
    """(student + teachers) / (n + 1) parameter by parameter, the student's buffers, eval mode (init_agg_model)."""
    avg = eval64(model)
    with torch.no_grad():
        for p, *ts in zip(avg.parameters(), *[t.parameters() for t in teachers], strict=True):
            p.copy_((p + sum(t.double() for t in ts)) / (len(ts) + 1))
    return avg


@pytest.mark.parametrize("eval_head", ["average", "teacher"])
def test_mkd_heads(eval_head):
    """MKD (two teachers): the run's head (`eval_head`) and the extra heads mkd_student, mkd_teacher,
    mkd_average: (student + both teachers) / 3 parameter by parameter with the student's buffers, the first
    teacher with its own buffers, the student; all in eval mode (running statistics)."""
    cfg = MKDConfig(**MKD_CFG, eval_head=eval_head)
    method = with_addon(build(ER, ERConfig()), "mkd", cfg)
    mkd = method.addons[0]
    learner = trained(method)
    modules = {"student": method.model, **{f"teacher {j}": t for j, t in enumerate(mkd.teachers)}}
    logits = evaluated(learner, modules)
    x = to_unit(learner.test_x).double()
    with torch.no_grad():
        avg = averaged64(method.model, mkd.teachers)
        ref = {"average": avg(x), "teacher": eval64(mkd.teachers[0])(x), "student": eval64(method.model)(x)}
    assert set(logits) == {None, "mkd_student", "mkd_teacher", "mkd_average"} - {f"mkd_{eval_head}"}
    assert_head(learner, logits[None], ref[eval_head], None, learner.acc_matrix[-1])
    for head in set(logits) - {None}:
        assert_head(learner, logits[head], ref[head.removeprefix("mkd_")], head, learner.head_matrices[head][-1])


def test_ccl_dc_heads():
    """CCL-DC: the run's head is the ensemble (the mean of both peers' logits), the extra heads the student and
    the peer alone; every peer in eval mode (its own running statistics)."""
    method = with_addon(build(ER, ERConfig()), "ccl_dc", CCLDCConfig(), peer_maker(ER, ERConfig()))
    peer = method.addons[0].peer
    learner = trained(method)
    logits = evaluated(learner, {"student": method.model, "peer": peer.model})
    x = to_unit(learner.test_x).double()
    with torch.no_grad():
        s, p = eval64(method.model)(x), eval64(peer.model)(x)
    assert not torch.allclose(s, p, atol=1e-3), "two different peers"
    assert set(logits) == {None, "ccl_dc_student", "ccl_dc_peer"}
    assert_head(learner, logits[None], (s + p) / 2, None, learner.acc_matrix[-1])
    assert_head(learner, logits["ccl_dc_student"], s, "ccl_dc_student", learner.head_matrices["ccl_dc_student"][-1])
    assert_head(learner, logits["ccl_dc_peer"], p, "ccl_dc_peer", learner.head_matrices["ccl_dc_peer"][-1])


def cosine_head(model, x: torch.Tensor) -> torch.Tensor:
    """PCR's cosLinear: cos(f(x), w_c) / 0.09 (norms + 1e-6), the head's bias unused."""
    f, w = model.features(x), model.head.weight
    return (f / (f.norm(dim=1, keepdim=True) + EPS)) @ (w / (w.norm(dim=1, keepdim=True) + EPS)).T / SCALE


def test_pcr_cosine_head():
    """PCR: the logits evaluated are cos(f(x), w_c) / 0.09 with f in eval mode and w_c the head's weight rows
    (cosLinear; the head's bias takes no part)."""
    method = build(PCR, PCRConfig())
    learner = trained(method)
    with torch.no_grad():
        method.head.bias.fill_(50.0)  # any bias: the cosine head ignores it
    logits = evaluated(learner, {"model": method.model})
    with torch.no_grad():
        ref = cosine_head(eval64(method.model), to_unit(learner.test_x).double())
    assert set(logits) == {None}
    assert_head(learner, logits[None], ref, None, learner.acc_matrix[-1])


# ---------------------------------------------------------------------------------------------------------------
# MKD on PCR: the cosine head for the student, the teachers and the averaged model (mkd_ocl pcr_ema.py:119-128, :205)
# ---------------------------------------------------------------------------------------------------------------


def test_mkd_on_pcr_distils_the_cosine_head():
    """PCR + MKD: the block's CE and distillation on the cosine logits of the student and of the teachers
    (pcr_ema.py:119-128), on top of PCR's own loss; loss and gradients at every step of two tasks."""
    cfg = MKDConfig(**MKD_CFG, replay_batch_size=10)
    method = with_addon(build(PCR, PCRConfig()), "mkd", cfg)
    mkd = method.addons[0]
    rec = Recorder(method)
    rec.watch_addon(mkd, "mkd")
    augments, mkd_aug = CallLog(method.augment, "apply"), CallLog(mkd, "augment")
    names = names_of(method.model)
    everything = torch.ones(BUFFER_SIZE, dtype=torch.bool)
    also = lambda: {"teachers": [copy64(t) for t in mkd.teachers]}  # noqa: E731
    for batch, seen, before in lockstep(method, batches(3, tasks=2), rec, [augments, mkd_aug], also):
        m64, buf = before.model64, before.buffer
        params = list(m64.parameters())
        loss_pcr = pcr_reference(m64, batch, Draws(rec.calls(end="mkd"), [], buf), augments)
        draws = Draws(rec.calls(start="mkd"), [], buf)
        mem_x, mem_y = draws.rows(10, "MKD's replay draw", {}, everything[: len(buf.y)])
        draws.check_all_used()
        x_u8, y = torch.cat([mem_x, batch.x]), torch.cat([mem_y, batch.y])
        aug = mkd_aug.calls[0][1]
        loss = mkd_block_reference(m64, before.also["teachers"], x_u8, y, aug, seen, cfg, head=cosine_head)
        grads = add_grads(grads_of(loss_pcr, params), grads_of(loss, params))
        total, ref_total = rec.loss + rec.extra["mkd"], loss_pcr.detach() + loss.detach()
        assert_step(batch, total, rec.grads, ref_total, grads, names)


def test_mkd_heads_on_pcr_are_cosine_heads():
    """PCR + MKD: the student head is PCR's cosine head (passes), and so must be the averaged model's (the run's
    head) and the teacher's (pcr_ema.py:205 `model_agg.pcrForward`)."""
    method = with_addon(build(PCR, PCRConfig()), "mkd", MKDConfig(**MKD_CFG))
    mkd = method.addons[0]
    learner = trained(method)
    logits = evaluated(learner, {"student": method.model, "teacher": mkd.teachers[0]})
    x = to_unit(learner.test_x).double()
    with torch.no_grad():
        student = cosine_head(eval64(method.model), x)
        average = cosine_head(averaged64(method.model, mkd.teachers), x)
        teacher = cosine_head(eval64(mkd.teachers[0]), x)
    assert_head(learner, logits["mkd_student"], student, "mkd_student", learner.head_matrices["mkd_student"][-1])
    assert_head(learner, logits[None], average, None, learner.acc_matrix[-1])
    assert_head(learner, logits["mkd_teacher"], teacher, "mkd_teacher", learner.head_matrices["mkd_teacher"][-1])
