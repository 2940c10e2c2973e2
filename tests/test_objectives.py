"""Tests of cil.core.objectives: every assertion checks a property that breaks if the feature breaks."""

import math

import pytest
import torch
import torch.nn.functional as F

from cil.core.objectives import (
    GradientStats,
    balance_weights,
    classes_mask,
    cross_entropy_masked,
    er_ace_loss,
    er_loss,
    gsa_new_loss,
    gsa_replay_loss,
    mask_logits,
)

C = 10
SEEN_LABELS = [0, 2, 3, 7, 9]  # non-contiguous subset of the head


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def mask_of(labels, n=C):
    m = torch.zeros(n, dtype=torch.bool)
    m[list(labels)] = True
    return m


def random_batch(g, b, labels, dtype=torch.float64, n=C):
    logits = torch.randn(b, n, generator=g, dtype=dtype) * 2.0
    lab = torch.tensor(labels)
    y = lab[torch.randint(0, len(labels), (b,), generator=g)]
    return logits, y


def autograd_masses(logits, y, mask):
    """G+ and G- from torch.autograd: per-row CE gradients on the logits, split by sign, summed per class."""
    z = logits.detach().clone().requires_grad_(True)
    per_row = F.cross_entropy(z.masked_fill(~mask, float("-inf")), y, reduction="none")
    (grad,) = torch.autograd.grad(per_row.sum(), z)  # row i of grad = d CE_i / d z_i (rows are independent)
    return (-grad).clamp(min=0).sum(0), grad.clamp(min=0).sum(0)


# ---------------------------------------------------------------- common


def test_mask_logits_and_classes_mask():
    logits = torch.arange(2 * C, dtype=torch.float32).reshape(2, C)
    m = mask_of(SEEN_LABELS)
    out = mask_logits(logits, m)
    assert torch.isinf(out[:, ~m]).all() and (out[:, ~m] < 0).all()
    assert torch.equal(out[:, m], logits[:, m])
    cm = classes_mask(torch.tensor([7, 2, 7, 9]), C)
    assert cm.dtype == torch.bool and cm.shape == (C,)
    assert torch.equal(cm, mask_of([2, 7, 9]))
    assert not classes_mask(torch.empty(0, dtype=torch.long), C).any()


def test_cross_entropy_masked_equals_sliced_ce_and_empty_batch():
    logits, y = random_batch(gen(1), 16, SEEN_LABELS)
    m = mask_of(SEEN_LABELS)
    idx = torch.tensor(SEEN_LABELS)
    remap = torch.full((C,), -1, dtype=torch.long)
    remap[idx] = torch.arange(len(SEEN_LABELS))
    ref = F.cross_entropy(logits[:, idx], remap[y])
    assert torch.allclose(cross_entropy_masked(logits, y, m), ref, atol=1e-12)
    assert torch.allclose(er_loss(logits, y, m), ref, atol=1e-12)
    empty = torch.zeros(0, C, requires_grad=True)
    out = cross_entropy_masked(empty, torch.zeros(0, dtype=torch.long), m)
    assert out.item() == 0.0 and out.requires_grad


# ---------------------------------------------------------------- GradientStats


def test_stats_equal_autograd_masses_single_update():
    g = gen(2)
    m = mask_of(SEEN_LABELS)
    logits, y = random_batch(g, 32, SEEN_LABELS)
    stats = GradientStats(C)
    stats.update(logits, y, m)
    pos, neg = autograd_masses(logits, y, m)
    assert torch.allclose(stats.positive, pos, atol=1e-12)
    assert torch.allclose(stats.negative, neg, atol=1e-12)
    # classes outside the mask get nothing; seen classes do get mass
    assert (stats.positive[~m] == 0).all() and (stats.negative[~m] == 0).all()
    assert (stats.negative[m] > 0).all()
    assert stats.positive.dtype == torch.float64


def test_stats_accumulate_over_updates_with_growing_head_and_mask():
    """Several updates with a growing seen set and a head that grows (no num_classes at construction)."""
    g = gen(3)
    stats = GradientStats()  # sized lazily by the logits' width
    exp_pos = torch.zeros(C, dtype=torch.float64)
    exp_neg = torch.zeros(C, dtype=torch.float64)
    schedule = [(6, [0, 2, 3]), (6, [0, 2, 3, 5]), (C, SEEN_LABELS), (C, [0, 1, 2, 3, 7, 9])]
    for width, labels in schedule:
        m = mask_of(labels, width)
        logits, y = random_batch(g, 24, labels, n=width)
        stats.update(logits.float(), y, m)  # float32 logits (as in training) are promoted internally
        pos, neg = autograd_masses(logits.float().double(), y, m)
        exp_pos[:width] += pos
        exp_neg[:width] += neg
        assert stats.num_classes == width
        assert torch.allclose(stats.positive, exp_pos[:width], atol=1e-9)
        assert torch.allclose(stats.negative, exp_neg[:width], atol=1e-9)


def test_stats_without_mask_use_all_head_units():
    logits, y = random_batch(gen(4), 20, list(range(C)))
    stats = GradientStats(C)
    stats.update(logits, y)
    pos, neg = autograd_masses(logits, y, torch.ones(C, dtype=torch.bool))
    assert torch.allclose(stats.positive, pos, atol=1e-12)
    assert torch.allclose(stats.negative, neg, atol=1e-12)


def test_stats_ignore_logit_gradients():
    logits, y = random_batch(gen(5), 8, SEEN_LABELS)
    logits.requires_grad_(True)
    stats = GradientStats(C)
    stats.update(logits, y, mask_of(SEEN_LABELS))
    assert not stats.positive.requires_grad and not stats.weights().requires_grad


def test_relabelling_invariance():
    g = gen(6)
    perm = torch.tensor([3, 7, 0, 9, 1, 8, 5, 2, 6, 4])  # pi: label c -> perm[c]; no fixed point
    assert (perm != torch.arange(C)).all()
    a, b = GradientStats(C), GradientStats(C)
    for labels in ([0, 2, 3], [0, 2, 3, 7], SEEN_LABELS):
        m = mask_of(labels)
        logits, y = random_batch(g, 16, labels)
        logits_p = torch.empty_like(logits)
        logits_p[:, perm] = logits  # column perm[c] of the relabelled head is old column c
        m_p = torch.zeros_like(m)
        m_p[perm] = m
        a.update(logits, y, m)
        b.update(logits_p, perm[y], m_p)
    assert torch.allclose(b.positive[perm], a.positive, atol=1e-12)
    assert torch.allclose(b.negative[perm], a.negative, atol=1e-12)
    assert torch.allclose(b.weights()[perm], a.weights(), atol=1e-6)
    # the test is not vacuous: the statistics are not themselves permutation-invariant
    assert not torch.allclose(b.positive, a.positive)


def test_weights_values_and_guards():
    s = GradientStats(6)
    s.positive = torch.tensor([1.0, 3.0, 0.0, 2.5, 0.0, 1.0], dtype=torch.float64)
    s.negative = torch.tensor([1.0, 1.0, 0.0, 0.0, 2.0, 3.0], dtype=torch.float64)
    w = s.weights()
    assert w.dtype == torch.float32 and not w.requires_grad
    assert w[0].item() == 1.0  # exact balance
    assert w[1].item() == pytest.approx(2 / (1 + math.exp(1 - 3.0)))  # G+ > G- -> > 1
    assert w[1].item() > 1.0
    assert w[2].item() == 1.0  # no evidence
    assert w[3].item() == 2.0  # G- = 0 < G+: the limit
    assert w[4].item() == pytest.approx(2 / (1 + math.e)) and w[4].item() < 1.0  # G+ = 0 < G-
    assert w[5].item() == pytest.approx(2 / (1 + math.exp(1 - 1 / 3))) and w[5].item() < 1.0
    assert torch.isfinite(w).all()
    r = s.ratio()
    assert r[2].item() == 1.0 and math.isinf(r[3].item()) and r[1].item() == 3.0
    assert torch.allclose(balance_weights(s.positive, s.negative).float(), w)


def test_weights_one_at_exact_balance_from_update_and_unseen_classes_neutral():
    s = GradientStats(4)
    m = mask_of([0, 1], 4)
    s.update(torch.zeros(2, 4), torch.tensor([0, 1]), m)  # p = 0.5 each: G+ = G- = 0.5 per seen class
    assert torch.equal(s.positive, torch.tensor([0.5, 0.5, 0, 0], dtype=torch.float64))
    assert torch.equal(s.weights(), torch.ones(4))


def test_stats_state_dict_roundtrip():
    logits, y = random_batch(gen(7), 16, SEEN_LABELS)
    a = GradientStats(C)
    a.update(logits, y, mask_of(SEEN_LABELS))
    b = GradientStats()
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.positive, b.positive) and torch.equal(a.negative, b.negative)
    sd = a.state_dict()
    sd["positive"].add_(1.0)  # state_dict is a copy
    assert not torch.equal(sd["positive"], a.positive)


# ---------------------------------------------------------------- GSA losses


def test_gsa_new_loss_gradient_only_on_task_classes_and_equals_sliced_ce():
    task = [3, 7]
    tm = mask_of(task)
    logits, y = random_batch(gen(8), 12, task, dtype=torch.float32)
    logits.requires_grad_(True)
    loss = gsa_new_loss(logits, y, tm)
    loss.backward()
    assert (logits.grad[:, ~tm] == 0).all()  # exactly zero on every other class (old ones included)
    assert (logits.grad[:, tm] != 0).all()
    remap = torch.full((C,), -1, dtype=torch.long)
    remap[torch.tensor(task)] = torch.arange(len(task))
    ref = F.cross_entropy(logits.detach()[:, torch.tensor(task)], remap[y])
    assert torch.allclose(loss.detach(), ref, atol=1e-6)


def test_gsa_replay_loss_weights_are_constants_and_value():
    g = gen(9)
    m = mask_of(SEEN_LABELS)
    logits, y = random_batch(g, 16, SEEN_LABELS, dtype=torch.float32)
    logits.requires_grad_(True)
    w = (torch.rand(C, generator=g) * 2).requires_grad_(True)
    loss = gsa_replay_loss(logits, y, w, m)
    loss.backward()
    assert w.grad is None  # weights enter as constants
    assert (logits.grad[:, ~m] == 0).all() and (logits.grad[:, m] != 0).any()
    z = logits.detach().masked_fill(~m, float("-inf"))
    manual = -(w.detach()[y] * torch.log_softmax(z, 1)[torch.arange(16), y]).mean()
    assert torch.allclose(loss.detach(), manual, atol=1e-6)
    double_softmax = -(
        w.detach()[y] * torch.log_softmax(torch.softmax(z, 1).masked_fill(~m, float("-inf")), 1)[torch.arange(16), y]
    ).mean()
    assert not torch.allclose(loss.detach(), double_softmax, atol=1e-3)
    # only the target term is weighted: uniform weights 1 give plain masked CE, weights 2 give twice it
    ce = cross_entropy_masked(logits.detach(), y, m)
    assert torch.allclose(gsa_replay_loss(logits.detach(), y, torch.ones(C), m), ce, atol=1e-6)
    assert torch.allclose(gsa_replay_loss(logits.detach(), y, torch.full((C,), 2.0), m), 2 * ce, atol=1e-6)


def test_gsa_replay_loss_pads_short_weights_with_one_and_empty_batch():
    logits, y = random_batch(gen(10), 8, [0, 1, 8], dtype=torch.float32)
    m = mask_of([0, 1, 8])
    short = torch.tensor([1.0, 1.0])  # head grew after the stats were sized: missing classes weigh 1
    assert torch.allclose(gsa_replay_loss(logits, y, short, m), cross_entropy_masked(logits, y, m), atol=1e-6)
    empty = torch.zeros(0, C, requires_grad=True)
    assert gsa_replay_loss(empty, torch.zeros(0, dtype=torch.long), torch.ones(C), m).item() == 0.0


# ---------------------------------------------------------------- ER-ACE


def test_er_ace_incoming_term_only_present_classes_replay_term_all_seen():
    g = gen(11)
    seen = mask_of(SEEN_LABELS)
    new_labels = [7, 9]
    present = mask_of(new_labels)
    ln, yn = random_batch(g, 10, new_labels, dtype=torch.float32)
    lb, yb = random_batch(g, 10, SEEN_LABELS, dtype=torch.float32)
    ln.requires_grad_(True)
    lb.requires_grad_(True)
    loss = er_ace_loss(ln, yn, lb, yb, seen)
    loss.backward()
    assert (ln.grad[:, ~present] == 0).all()  # absent classes (old seen ones too) untouched
    assert (ln.grad[:, present] != 0).all()
    assert (lb.grad[:, ~seen] == 0).all()
    assert (lb.grad[:, seen] != 0).all()  # replay covers all seen classes
    ref = cross_entropy_masked(ln.detach(), yn, present) + cross_entropy_masked(lb.detach(), yb, seen)
    assert torch.allclose(loss.detach(), ref, atol=1e-6)


def test_er_ace_empty_replay_is_incoming_term():
    ln, yn = random_batch(gen(12), 10, [2, 3], dtype=torch.float32)
    seen = mask_of(SEEN_LABELS)
    first = cross_entropy_masked(ln, yn, mask_of([2, 3]))
    assert torch.allclose(er_ace_loss(ln, yn, None, None, seen), first)
    assert torch.allclose(er_ace_loss(ln, yn, torch.zeros(0, C), torch.zeros(0, dtype=torch.long), seen), first)
