"""The balancing rules of the replay term (cil/core/objectives/balance.py, `method.balance`; docs/methods.md,
"Balancing rules"): each rule's weights against a hand computation, the equivalences between rules, the
magnitude rule's closed-form logit-gradient norms against autograd, GSA's default unchanged, resume after SIGKILL
with each stateful rule, and the config errors."""

import io
import math
import signal

import pytest
import torch
from test_resume import FAST, checkpoint_step, cli, comparable, run_here

from cil.core.buffer import ReplayBuffer
from cil.core.data import load_dataset
from cil.core.data.stream import ClassIncrementalStream
from cil.core.methods import method_class
from cil.core.models import build_model
from cil.core.objectives.balance import logit_grad_norm, make_rule
from cil.core.objectives.common import classes_mask, cross_entropy_masked
from cil.core.objectives.gsa import GradientStats
from cil.errors import ConfigError
from cil.run.config import default_config, validate

C = 5


def hand_stats(batches):
    """G+ and G- per batch by hand (float64, plain loops over rows): p = softmax(z); the row's own class gets
    1 - p_y, every other class p_c."""
    out = []
    for z, y in batches:
        pos, neg = [0.0] * C, [0.0] * C
        for zi, yi in zip(z.tolist(), y.tolist(), strict=True):
            e = [math.exp(v) for v in zi]
            p = [v / sum(e) for v in e]
            for c in range(C):
                if c == yi:
                    pos[c] += 1 - p[c]
                else:
                    neg[c] += p[c]
        out.append((pos, neg))
    return out


def hand_weights(pos, neg):
    return [2 / (1 + math.exp(-(p / n - 1))) for p, n in zip(pos, neg, strict=True)]


def toy_batches(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(8, C, generator=g, dtype=torch.float64) * 2, torch.randint(0, C, (8,), generator=g))
        for _ in range(n)
    ]


def feed(rule, batches, tasks=None):
    for i, (z, y) in enumerate(batches):
        rule.start(0 if tasks is None else tasks[i])
        rule.update(z, y)


def close(a, b):
    assert torch.allclose(
        torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), rtol=1e-9, atol=1e-12
    ), (a, b)


# ---------------------------------------------------------------------------------------------------------------
# Each rule on hand-made statistics
# ---------------------------------------------------------------------------------------------------------------
def test_each_rule_weights_against_hand_computation():
    batches = toy_batches()
    per = hand_stats(batches)

    def sum_(rows, k):
        return [sum(r[k][c] for r in rows) for c in range(C)]

    rule = make_rule("cumulative", C)
    feed(rule, batches)
    close(rule.weights(torch.float64), hand_weights(sum_(per, 0), sum_(per, 1)))

    m = 0.7
    rule = make_rule("ema", C, momentum=m)
    feed(rule, batches)
    ema = [[0.0] * C, [0.0] * C]
    for pos, neg in per:
        ema = [
            [m * s + v for s, v in zip(ema[0], pos, strict=True)],
            [m * s + v for s, v in zip(ema[1], neg, strict=True)],
        ]
    close(rule.positive, ema[0])
    close(rule.weights(torch.float64), hand_weights(*ema))

    rule = make_rule("window", C, window=4)
    feed(rule, batches)
    close(rule.weights(torch.float64), hand_weights(sum_(per[-4:], 0), sum_(per[-4:], 1)))

    rule = make_rule("task_reset", C)
    feed(rule, batches, tasks=[0, 0, 0, 1, 1, 1])
    close(rule.weights(torch.float64), hand_weights(sum_(per[3:], 0), sum_(per[3:], 1)))

    for name in ("constant", "magnitude"):
        rule = make_rule(name, C)
        feed(rule, batches)
        assert torch.equal(rule.weights(), torch.ones(C))
        close(
            rule.ratio(), [p / n for p, n in zip(sum_(per, 0), sum_(per, 1), strict=True)]
        )  # the logged cumulative ratio


def test_ema_with_momentum_one_and_a_long_window_equal_cumulative():
    batches = toy_batches(10, seed=3)
    cum, ema, win = make_rule("cumulative", C), make_rule("ema", C, momentum=1.0), make_rule("window", C, window=10)
    for rule in (cum, ema, win):
        feed(rule, batches)
    assert torch.equal(ema.positive, cum.positive) and torch.equal(ema.negative, cum.negative)
    close(win.positive, cum.positive)
    close(win.negative, cum.negative)
    short = make_rule("window", C, window=9)
    feed(short, batches)
    assert not torch.allclose(short.positive, cum.positive)


def test_task_reset_statistics_are_zero_after_a_task_start_and_survive_a_resume():
    rule = make_rule("task_reset", C)
    feed(rule, toy_batches(3), tasks=[0, 0, 0])
    assert float(rule.positive.sum()) > 0
    state = rule.state_dict()
    rule.start(1)
    assert torch.equal(rule.positive, torch.zeros(C)) and torch.equal(rule.negative, torch.zeros(C))
    resumed = make_rule("task_reset", C)
    resumed.load_state_dict(state)
    resumed.start(0)  # a resumed run in the middle of task 0 keeps task 0's statistics
    assert torch.equal(resumed.positive, state["positive"])


def test_window_ring_buffer_grows_with_the_head():
    rule = make_rule("window", 3, window=2)
    z, y = torch.randn(4, 5, dtype=torch.float64), torch.tensor([0, 1, 4, 4])
    rule.update(z, y)
    assert rule.ring_pos.shape == (2, 5) and rule.positive.shape == (5,)
    ref = GradientStats(5)
    ref.update(z, y)
    close(rule.positive, ref.positive)


# ---------------------------------------------------------------------------------------------------------------
# The magnitude rule against autograd
# ---------------------------------------------------------------------------------------------------------------
def test_magnitude_norms_and_scales_against_autograd():
    g = torch.Generator().manual_seed(5)
    c = 6
    z_new = torch.randn(12, c, generator=g, requires_grad=True)
    y_new = torch.tensor([2, 3] * 6)
    z_buf = torch.randn(20, c, generator=g, requires_grad=True)
    y_buf = torch.randint(0, 4, (20,), generator=g)
    seen = torch.tensor([True] * 4 + [False] * 2)
    present = classes_mask(y_new, c)
    bw = 2.0
    loss_new = cross_entropy_masked(z_new, y_new, present)
    loss_buf = bw * cross_entropy_masked(z_buf, y_buf, seen)
    (g_new,) = torch.autograd.grad(loss_new, z_new, retain_graph=True)
    (g_buf,) = torch.autograd.grad(loss_buf, z_buf, retain_graph=True)
    n_new, n_buf = logit_grad_norm(z_new, y_new, present), bw * logit_grad_norm(z_buf, y_buf, seen)
    assert torch.allclose(n_new, g_new.norm(), rtol=1e-5) and torch.allclose(n_buf, g_buf.norm(), rtol=1e-5)
    rho = 0.5
    rule = make_rule("magnitude", c, ratio=rho)
    a, b = rule.term_scales(n_new, n_buf)
    assert not a.requires_grad and not b.requires_grad
    # the scaled terms' logit gradients (autograd again) keep the ratio rho and the unscaled sum of norms
    (sa,) = torch.autograd.grad(a * loss_new, z_new)
    (sb,) = torch.autograd.grad(b * loss_buf, z_buf)
    assert torch.allclose(sb.norm() / sa.norm(), torch.tensor(rho), rtol=1e-5)
    assert torch.allclose(sa.norm() + sb.norm(), g_new.norm() + g_buf.norm(), rtol=1e-5)
    # nothing to balance: a zero norm leaves both terms as they are
    a0, b0 = rule.term_scales(torch.tensor(0.0), n_buf)
    assert float(a0) == 1.0 and float(b0) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# The methods on a short digits stream
# ---------------------------------------------------------------------------------------------------------------
def build(name, **cfg):
    torch.manual_seed(0)
    model = build_model("mlp", (1, 8, 8), 10, hidden=(32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cls = method_class(name)
    return cls(
        model,
        opt,
        ReplayBuffer(100, (1, 8, 8), seed=1),
        cls.Config(**cfg),
        10,
        torch.device("cpu"),
        seed=2,
        input_shape=(1, 8, 8),
    )


def run(name, steps=45, start=0, method=None, **cfg):
    """Batches `start` .. `steps` - 1 of the digits stream (task 0 and the start of task 1) through the method
    (a fresh one unless given); returns the method, its losses and every parameter's gradient after each step."""
    stream = ClassIncrementalStream(load_dataset("digits"), n_tasks=5, batch_size=10, order="natural", seed=0)
    m = method if method is not None else build(name, **cfg)
    task, losses, grads = m.classes.task, [], []
    for b in stream.batches(start=start):
        if b.step >= steps:
            break
        if b.task != task:
            task = b.task
            m.on_task_start(task, stream.tasks[task].classes)
        out = m.observe(b)
        m.remember(b, out)
        losses.append(out.loss)
        grads.append([p.grad.clone() for p in m.model.parameters()])
    return m, torch.stack(losses), grads


class LegacyStats:
    """GSA's statistics as they were before the rules existed: a bare GradientStats and its weights."""

    name, adaptive, scales_terms = "legacy", True, False

    def __init__(self):
        self.stats = GradientStats(10)

    def start(self, task):
        pass

    def update(self, logits, targets, mask=None):
        self.stats.update(logits, targets, mask)

    def weights(self, dtype=torch.float32):
        return self.stats.weights(dtype)


def test_gsa_cumulative_is_the_spec_step_bit_for_bit_and_ema_one_equals_it(monkeypatch):
    from cil.core.methods import gsa as gsa_module

    real = gsa_module.make_rule
    monkeypatch.setattr(gsa_module, "make_rule", lambda *a, **k: LegacyStats())
    _, loss_legacy, grads_legacy = run("gsa", 40)
    monkeypatch.setattr(gsa_module, "make_rule", real)
    m, loss_cum, grads_cum = run("gsa", 40)
    assert m.gsa.rule.name == "cumulative"
    _, loss_ema, grads_ema = run("gsa", 40, balance="ema", balance_momentum=1.0)
    for loss, grads in ((loss_cum, grads_cum), (loss_ema, grads_ema)):
        assert torch.equal(loss, loss_legacy)
        assert all(
            torch.equal(a, b)
            for step_a, step_b in zip(grads, grads_legacy, strict=True)
            for a, b in zip(step_a, step_b, strict=True)
        )
    _, loss_const, _ = run("gsa", 40, balance="constant")
    _, loss_alias, _ = run("gsa", 40, adaptive_weights=False)
    assert torch.equal(loss_const, loss_alias)  # the old key is an alias of constant
    assert not torch.equal(loss_const, loss_cum)


@pytest.mark.parametrize("name", ["gsa", "er_ace"])
def test_every_rule_changes_the_step_and_keeps_the_logged_values(name):
    base = "cumulative" if name == "gsa" else "constant"
    _, ref, _ = run(name, 45, balance=base)
    for rule in ("ema", "task_reset", "window", "constant", "magnitude"):
        if rule == base:
            continue
        m, losses, _ = run(name, 45, balance=rule, balance_momentum=0.9, balance_window=5)
        assert torch.isfinite(losses).all(), rule
        assert not torch.equal(losses, ref), rule
        logged = m.log_values()
        assert {f"gsa/weight/{c}" for c in (0, 1, 2)} <= set(logged), (rule, logged)
        if rule == "magnitude":
            assert {"balance/new_scale", "balance/replay_scale"} <= set(logged)


def test_er_ace_magnitude_scales_match_autograd_on_its_terms():
    """The step's scales equal those from autograd's logit gradients of the two terms of the last step."""
    m, _, _ = run("er_ace", 20, balance="magnitude", balance_ratio=2.0)
    (a, b), (gn, gr) = m.rule.last_scales, m.rule.last_norms
    assert torch.allclose(b * gr / (a * gn), torch.tensor(2.0), rtol=1e-5)


def test_er_ace_augment_off_is_the_paper_step_and_on_doubles_the_rows():
    _, plain, _ = run("er_ace", 15)
    _, off, _ = run("er_ace", 15, augment=False)
    assert torch.equal(plain, off)
    m, on, _ = run("er_ace", 15, augment=True)
    assert m.augment is not None and not torch.equal(on, plain)


# ---------------------------------------------------------------------------------------------------------------
# Config errors
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method, key, value",
    [
        ("gsa", "balance", "median"),
        ("gsa", "balance_momentum", 0.0),
        ("gsa", "balance_momentum", 1.5),
        ("gsa", "balance_window", 0),
        ("gsa", "balance_ratio", -1.0),
        ("er_ace", "balance", "nope"),
        ("er", "balance", "window"),
        ("er", "balance", "magnitude"),
    ],
)
def test_bad_values_name_the_key(method, key, value):
    cfg = default_config(method)
    setattr(cfg.method, key, value)
    with pytest.raises(ConfigError, match=f"method.{key}="):
        validate(cfg)


def test_adaptive_weights_false_with_another_rule_is_refused():
    cfg = default_config("gsa")
    cfg.method.adaptive_weights, cfg.method.balance = False, "window"
    with pytest.raises(ConfigError, match="method.adaptive_weights=False.*balance=window"):
        validate(cfg)


# ---------------------------------------------------------------------------------------------------------------
# Resume after SIGKILL, bit for bit, with each stateful rule
# ---------------------------------------------------------------------------------------------------------------
STATEFUL = [
    ("gsa", "ema"),
    ("gsa", "task_reset"),
    ("gsa", "window"),
    ("gsa", "magnitude"),
    ("er_ace", "ema"),
    ("er_ace", "task_reset"),
    ("er_ace", "window"),
    ("er_ace", "magnitude"),
]


@pytest.mark.parametrize("name, rule", STATEFUL)
def test_state_dict_round_trip_resumes_bit_for_bit(name, rule):
    """Stopped at batch 30 (task 1 started at 29: task_reset has just reset, the window of 7 has wrapped), saved
    through bytes as a checkpoint is, loaded into a fresh method, continued: the same losses and parameters as the
    run without a stop. ER-ACE with the augmented views, so its generator's state is in play."""
    cfg = {"balance": rule, "balance_momentum": 0.9, "balance_window": 7, "augment": True}
    whole, loss_whole, _ = run(name, 40, **cfg)
    first, loss_a, _ = run(name, 31, **cfg)
    buf = io.BytesIO()
    torch.save(
        {"method": first.state_dict(), "buffer": first.buffer.state_dict(), "model": first.model.state_dict()}, buf
    )
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    fresh = build(name, **cfg)
    fresh.model.load_state_dict(saved["model"])
    fresh.buffer.load_state_dict(saved["buffer"])
    fresh.load_state_dict(saved["method"])
    _, loss_b, _ = run(name, 40, start=31, method=fresh)
    assert torch.equal(torch.cat([loss_a, loss_b]), loss_whole)
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.parameters(), whole.model.parameters(), strict=True))


@pytest.mark.slow
def test_cli_resume_after_sigkill_is_bit_identical_with_a_window(tmp_path):
    args = [
        *FAST,
        "method=gsa",
        "method.replay_batch_size=16",
        "method.current_task_replay=4",
        "method.balance=window",
        "method.balance_window=7",
    ]
    ref = tmp_path / "ref"
    ref.mkdir()
    proc = run_here(ref / "run", args)
    assert proc.returncode == 0, proc.stderr
    run_dir = tmp_path / "killed" / "run"
    run_dir.parent.mkdir()
    proc = cli(run_dir, args, "observe:40:KILL")  # task 1, after the task-0 checkpoint: statistics in flight
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert 25 <= checkpoint_step(run_dir) < 40
    proc = run_here(run_dir, args)
    assert proc.returncode == 0, proc.stderr
    assert comparable(run_dir) == comparable(ref / "run")
    assert (run_dir / "metrics.csv").read_bytes() == (ref / "run" / "metrics.csv").read_bytes()


@pytest.mark.parametrize(
    "name, rule", [("gsa", "magnitude"), ("gsa", "window"), ("er_ace", "window"), ("er_ace", "magnitude")]
)
def test_diagnostics_terms_add_up_to_the_rebalanced_loss(tmp_path, name, rule):
    """The per-term reports carry the rule's weights and scales: on a task-1 batch with replay, the reported
    terms add up to the loss the optimizer steps on."""
    from test_diagnostics import config
    from test_diagnostics import feed as feed_learner

    from cil.run.experiment import build_learner

    learner = build_learner(
        config(name, True, every=1, balance=rule, balance_window=5), tmp_path, dataset=load_dataset("digits")
    )
    batch = feed_learner(learner, learner.stream.batches_per_task[0] + 8)  # past GSA's warm-up of task 1
    diag, captured = learner.diagnostics, {}
    original = diag.before_backward

    def capture(loss):
        captured["loss"], captured["terms"] = loss.detach(), list(diag.terms)
        original(loss)

    diag.before_backward = capture
    diag.flush()
    diag.begin_batch(batch)
    learner.method.observe(batch)
    terms = captured["terms"]
    assert {t.source for t in terms} == {"new", "replay"}
    torch.testing.assert_close(sum(t.row_losses().sum() for t in terms), captured["loss"], rtol=1e-5, atol=1e-6)
