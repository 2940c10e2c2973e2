"""Add-ons (cil.core.addons): MKD's EMA teachers and distillation, CCL-DC's peer and distillation chain.

The EMA update equals its formula; teachers never get gradients; the distillation sends none into the teacher;
each add-on's loss matches an independent float64 reference on a fixed batch (loss and every gradient); weight 0
is the base method bit for bit; the add-ons compose with ER, ER-ACE and GSA; a run killed mid-step resumes bit for
bit with an add-on on; bad keys give one clear error."""

import copy
import math
import signal
from pathlib import Path

import pytest
import torch
from test_resume import FAST, cli, comparable, run_here

from cil.core.addons import addon_configs
from cil.core.addons.mkd import ema_factor
from cil.core.objectives.distill import kd_loss
from cil.errors import ConfigError
from cil.run.bench.workloads import shorten_stream
from cil.run.config import default_config, validate
from cil.run.experiment import build_learner, load_run_dataset
from cil.schema import DatasetConfig

METHOD_KEYS = {
    "er": {"replay_batch_size": 10},
    "er_ace": {"replay_batch_size": 10},
    "gsa": {"replay_batch_size": 16, "current_task_replay": 4},
}


@pytest.fixture(scope="module")
def digits():
    return load_run_dataset(default_config("er", dataset=DatasetConfig(name="digits")))


def learner_for(tmp_path, digits, method="er", addon=None, batches=6, **addon_keys):
    cfg = default_config(method, dataset=DatasetConfig(name="digits"))
    cfg.buffer.size, cfg.log.progress, cfg.eval.anytime_every = 100, False, 0
    for k, v in METHOD_KEYS[method].items():
        setattr(cfg.method, k, v)
    if addon is not None:
        cfg.addon = {addon: addon_keys}
    learner = build_learner(cfg, tmp_path, digits)
    shorten_stream(learner.stream, batches)
    return learner


def run_batches(learner, n):
    for i, batch in enumerate(learner.stream.batches()):
        if i == n:
            break
        learner.train_batch(batch)


# -- MKD ---------------------------------------------------------------------------------------------------
def test_ema_update_equals_its_formula_and_teacher_gets_no_gradient(tmp_path, digits):
    learner = learner_for(
        tmp_path, digits, addon="mkd", n_teachers=3, alpha_min=0.005, alpha_max=0.1, correction_step=2
    )
    method = learner.method
    mkd = method.addons[0]
    assert mkd.alphas == pytest.approx([0.005, math.sqrt(0.005 * 0.1), 0.1])
    # construction: theta_j = a / (1 - a) * theta
    for a, t in zip(mkd.alphas, mkd.teachers, strict=True):
        for p, e in zip(method.model.parameters(), t.parameters(), strict=True):
            torch.testing.assert_close(e, p.detach() * a / (1 - a), rtol=1e-6, atol=0)
    for step in range(7):
        before = [[e.clone() for e in t.parameters()] for t in mkd.teachers]
        batch = next(b for i, b in enumerate(learner.stream.batches()) if i == step)
        learner.train_batch(batch)
        k = max(1, mkd.batches // 2)
        for a, t, old in zip(mkd.alphas, mkd.teachers, before, strict=True):
            for p, e, e0 in zip(method.model.parameters(), t.parameters(), old, strict=True):
                torch.testing.assert_close(e, (1 - a) * e0 + p.detach() * (a / (1 - a**k)), rtol=1e-5, atol=1e-7)
                assert not e.requires_grad and e.grad is None
    assert ema_factor(0.01, 25, 10) == pytest.approx(0.01 / (1 - 0.01**2))


def test_distillation_sends_no_gradient_into_the_teacher():
    torch.manual_seed(0)
    s = torch.randn(5, 7, requires_grad=True)
    t = torch.randn(5, 7, requires_grad=True)
    mask = torch.tensor([True] * 5 + [False] * 2)
    kd_loss(s, t, 4.0, mask).backward()
    assert t.grad is None and s.grad is not None and torch.all(s.grad[:, 5:] == 0)


def ref_kd(s, t, T, seen):
    """KL(softmax(t/T) || softmax(s/T)) * T^2 over the seen columns, row mean (plain float64)."""
    s, t = s[:, seen] / T, t[:, seen].detach() / T
    pt = torch.exp(t) / torch.exp(t).sum(1, keepdim=True)
    ps = torch.exp(s) / torch.exp(s).sum(1, keepdim=True)
    return (pt * (torch.log(pt) - torch.log(ps))).sum(1).mean() * T * T


def ref_ce(z, y, seen):
    z = z[:, seen]
    col = torch.tensor([seen.index(int(c)) for c in y])
    return (torch.logsumexp(z, 1) - z[torch.arange(len(y)), col]).mean()


def fixed_step(tmp_path, digits, addon, **keys):
    """A learner after 12 batches, the next batch, a fixed replay draw and fixed augmented views."""
    learner = learner_for(tmp_path, digits, addon=addon, batches=20, **keys)
    run_batches(learner, 12)
    method = learner.method
    batch = next(b for i, b in enumerate(learner.stream.batches()) if i == 12)
    mem = method.buffer.sample(10)
    method.replay = lambda n, **f: mem
    return learner, method, batch, mem


def test_mkd_block_loss_and_gradients_match_a_reference(tmp_path, digits):
    learner, method, batch, mem = fixed_step(tmp_path, digits, "mkd", kd_lambda=3.0, temperature=2.0, weight=0.7)
    mkd = method.addons[0]
    x = torch.cat([mem[0], batch.x])
    y = torch.cat([mem[1], batch.y])
    g = torch.Generator().manual_seed(5)
    aug = mkd.augment(x.float() / 255, g)
    mkd.augment = lambda v, gen: aug
    method.classes.mark_seen(batch.y, batch.y_host)
    mkd.begin_observe(method, batch)
    seen = sorted(method.classes.seen_labels)
    student64 = copy.deepcopy(method.model).double()
    teacher64 = copy.deepcopy(mkd.teachers[0]).double()
    loss = mkd.extra_loss(method)
    method.optimizer.zero_grad()
    loss.backward()
    s_aug, s_raw = student64(aug.double()), student64(x.double() / 255)
    t_aug = teacher64(aug.double())
    ref = 0.7 * (ref_ce(s_aug, y, seen) + 3.0 * (ref_kd(s_aug, t_aug, 2.0, seen) + ref_kd(s_raw, t_aug, 2.0, seen)) / 2)
    ref.backward()
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    for p, r in zip(method.model.parameters(), student64.parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), r.grad, rtol=1e-4, atol=1e-6)
    assert all(t.grad is None for t in mkd.teachers[0].parameters())


def test_ccl_dc_loss_and_gradients_match_a_reference(tmp_path, digits):
    learner, method, batch, mem = fixed_step(tmp_path, digits, "ccl_dc", kd_lambda=2.0, ce_weight=0.5)
    ccl = method.addons[0]
    x = torch.cat([mem[0], batch.x])
    y = torch.cat([mem[1], batch.y])
    torch.manual_seed(3)
    views = [x.float() / 255 + 0.05 * torch.randn(x.shape) for _ in range(3)]  # stand-ins for x3, x1, x2
    ccl.views = lambda m, xx: [views[0], xx.float() / 255, views[1], views[2]]
    method.classes.mark_seen(batch.y, batch.y_host)
    ccl.begin_observe(method, batch)
    seen = sorted(method.classes.seen_labels)
    m1, m2 = copy.deepcopy(method.model).double(), copy.deepcopy(ccl.peer.model).double()
    loss1 = ccl.extra_loss(method)
    loss2 = ccl.link.pending
    x0 = x.double() / 255
    chain = {"x3": views[0].double(), "x0": x0, "x1": views[1].double(), "x2": views[2].double()}
    refs = []
    for me, other in ((m1, m2), (m2, m1)):
        z = {k: me(v) for k, v in chain.items()}
        w = {k: other(v) for k, v in chain.items()}
        ce = sum(ref_ce(z[k], y, seen) for k in chain)
        kd = (
            ref_kd(z["x3"], w["x3"], 4.0, seen)
            + ref_kd(z["x0"], w["x1"], 4.0, seen)
            + ref_kd(z["x1"], w["x2"], 4.0, seen)
            + ref_kd(z["x2"], w["x3"], 4.0, seen)
        )
        refs.append(0.5 * ce + 2.0 * kd)
    torch.testing.assert_close(loss1.double(), refs[0].detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss2.double(), refs[1].detach(), rtol=1e-5, atol=1e-6)
    method.optimizer.zero_grad()
    ccl.peer.optimizer.zero_grad(set_to_none=True)
    loss1.backward()
    refs[0].backward()
    for p, r in zip(method.model.parameters(), m1.parameters(), strict=True):
        torch.testing.assert_close(p.grad.double(), r.grad, rtol=1e-4, atol=1e-6)
    assert all(p.grad is None for p in ccl.peer.model.parameters())  # peer 1's term is no gradient to peer 2


# -- composition -------------------------------------------------------------------------------------------
def params(method):
    return [p.detach().clone() for p in method.model.parameters()]


@pytest.mark.parametrize("method", ["er", "er_ace", "gsa"])
@pytest.mark.parametrize("addon", ["mkd", "ccl_dc"])
def test_weight_zero_is_the_base_method_and_the_addon_composes(tmp_path, digits, method, addon):
    base = learner_for(tmp_path / "base", digits, method)
    off = learner_for(tmp_path / "off", digits, method, addon, weight=0.0, eval_head="student")
    on = learner_for(tmp_path / "on", digits, method, addon)
    for learner in (base, off, on):
        run_batches(learner, 12)
    for a, b in zip(params(base.method), params(off.method), strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(params(base.method), params(on.method), strict=True))
    assert all(math.isfinite(v) for v in on.method.addons[0].log_values().values())
    assert on.method.addons[0].log_values()


# -- runs and config ---------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("addon", ["mkd", "ccl_dc"])
def test_resume_after_sigkill_is_bit_identical_with_an_addon(tmp_path, addon, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).resolve().parents[1]))  # this checkout's cil
    args = [*FAST, "method=er", "method.replay_batch_size=10", f"addon={addon}", "stream.n_tasks=2"]
    args += ["stream.samples_per_class=80"]  # 80 batches: the kill at 45 falls in task 1, after its checkpoints
    ref = tmp_path / "ref" / "run"
    ref.parent.mkdir()
    proc = run_here(ref, args)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "cut" / "run"
    run.parent.mkdir()
    proc = cli(run, args, "observe:45:KILL")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    proc = run_here(run, args)
    assert proc.returncode == 0, proc.stderr
    a, b = comparable(ref), comparable(run)
    assert a == b
    assert a["heads"] and a["final_avg_acc"] > 20


def test_addon_settings_are_checked():
    cfg = default_config("er")
    cfg.addon = {"mkd": {"kd_lambda": -1.0}}
    with pytest.raises(ConfigError, match="addon.mkd.kd_lambda"):
        validate(cfg)
    cfg.addon = {"mkd": {"kd_lamda": 1.0}}
    with pytest.raises(ConfigError, match="addon.mkd.kd_lamda"):
        validate(cfg)
    cfg.addon = "nope"
    with pytest.raises(ConfigError, match="unknown"):
        validate(cfg)
    assert set(addon_configs(["mkd", "ccl_dc"])) == {"mkd", "ccl_dc"}
    cfg.addon = {"ccl_dc": {"eval_head": "both"}}
    with pytest.raises(ConfigError, match="addon.ccl_dc.eval_head"):
        validate(cfg)


def test_main_pass_mode_is_refused_for_a_method_that_declares_no_main_pass():
    """MKD's main_pass mode distils on the pass a method declares; a method that declares none would silently
    train without distillation, so the run is refused in one line that names the fix."""
    from cil.core.addons import addon_configs
    from cil.run.config import default_config, validate

    cfg = default_config("pcr")
    cfg.addon = {"mkd": {"mode": "main_pass"}}
    with pytest.raises(ConfigError, match=r"addon.mkd.mode=main_pass with method=pcr.*addon.mkd.mode=block"):
        validate(cfg)
    cfg = default_config("er")
    cfg.addon = {"mkd": {"mode": "main_pass"}}
    validate(cfg)
    assert addon_configs(cfg.addon)["mkd"].mode == "main_pass"


# -- every method with every add-on ------------------------------------------------------------------------------
def _all_methods():
    from cil.core.methods import METHODS

    return sorted(METHODS)


# digits as it comes (batches of 10), and a stream whose tasks end on a short batch (13 samples of each class: 10,
# 10, 6): a method's per-batch state (PCR's augmented copy of the incoming batch) then differs in size between one
# batch and the next, for the run's method and for CCL-DC's peer, which is stepped outside `observe`
STREAMS = {"digits": {}, "short_batches": {"samples_per_class": 13}}


@pytest.mark.parametrize("stream", sorted(STREAMS))
@pytest.mark.parametrize("addon", ["mkd", "ccl_dc"])
@pytest.mark.parametrize("method", _all_methods())
def test_every_method_composes_with_every_addon(tmp_path, digits, method, addon, stream):
    cfg = default_config(method, dataset=DatasetConfig(name="digits"))
    cfg.buffer.size, cfg.log.progress, cfg.eval.anytime_every = 100, False, 0
    for key, value in {"replay_batch_size": 16, "current_task_replay": 4}.items():
        if hasattr(cfg.method, key):
            setattr(cfg.method, key, value)
    for key, value in STREAMS[stream].items():
        setattr(cfg.stream, key, value)
    cfg.addon = {addon: {}}
    validate(cfg)
    learner = build_learner(cfg, tmp_path, digits)
    peer = getattr(learner.method.addons[0], "peer", None)
    fresh = []
    for i, batch in enumerate(learner.stream.batches()):
        if i == 6:  # two tasks: the short batch, a task change, the next task's first batches
            break
        learner.train_batch(batch)
        if peer is not None and hasattr(peer, "_incoming_aug"):  # PCR's peer draws this batch's copy, not the last's
            assert len(peer._incoming_aug) == len(batch.y)
            assert all(peer._incoming_aug is not earlier for earlier in fresh)
            fresh.append(peer._incoming_aug)
    values = learner.method.addons[0].log_values()
    assert values and all(math.isfinite(v) for v in values.values())
    learner.close()


@pytest.mark.parametrize("addon", ["mkd", "ccl_dc"])
def test_an_avalanche_peer_takes_an_addon_or_refuses_it_at_config_time(addon):
    pytest.importorskip("avalanche")
    from cil.avalanche.peers import peer_configs

    for name in sorted(peer_configs()):
        cfg = default_config(name)
        cfg.addon = {addon: {}}
        try:
            validate(cfg)
        except ConfigError as err:
            assert f"addon={addon} with method.name={name!r}" in str(err)  # the reason, in one line
