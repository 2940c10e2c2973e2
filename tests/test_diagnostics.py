"""cil.core.diagnostics: the accounting against autograd on the methods' real losses, and training unchanged by it."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cil.core.data import load_dataset
from cil.core.objectives import GradientStats
from cil.errors import ConfigError
from cil.run.config import default_config, validate
from cil.run.experiment import build_learner
from cil.schema import RunConfig

REPO = Path(__file__).resolve().parents[1]
METHODS = ("er", "er_ace", "gsa")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def config(method: str, enabled: bool, every: int = 1, **method_kw) -> RunConfig:
    cfg = default_config(method)
    cfg.dataset.name = "digits"
    cfg.buffer.size = 60
    cfg.log.progress = False
    cfg.eval.anytime_every = 0
    cfg.diagnostics.enabled = enabled
    cfg.diagnostics.every = every
    if method == "gsa":  # the spec's step, smaller batches: quick on 2 cores
        cfg.method.replay_batch_size, cfg.method.current_task_replay, cfg.method.warmup_batches = 16, 4, 2
    for k, v in method_kw.items():
        setattr(cfg.method, k, v)
    return cfg


def feed(learner, n_batches: int):
    """Drive the learner's method through the first n batches, as the learner's loop does."""
    for batch in learner.stream.batches():
        if batch.step == n_batches:
            return batch
        learner.train_batch(batch)
    raise AssertionError("stream too short")


def test_row_weights_scale_each_rows_contribution():
    g = torch.Generator().manual_seed(0)
    logits, y = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randint(0, 5, (7,), generator=g)
    w = torch.rand(7, generator=g, dtype=torch.float64)
    mask = torch.tensor([True, True, False, True, True])
    y = torch.where(y == 2, torch.zeros_like(y), y)
    stats = GradientStats(5)
    stats.update(logits, y, mask, row_weights=w)
    z = logits.clone().requires_grad_(True)
    loss = (w * F.cross_entropy(z.masked_fill(~mask, float("-inf")), y, reduction="none")).sum()
    (grad,) = torch.autograd.grad(loss, z)
    torch.testing.assert_close(stats.positive, (-grad).clamp(min=0).sum(0))
    torch.testing.assert_close(stats.negative, grad.clamp(min=0).sum(0))


@pytest.mark.parametrize("method", METHODS)
def test_accounting_matches_autograd_of_the_methods_loss(tmp_path, digits, method):
    """On a task-1 batch with replay: the reported terms add up to the method's loss; the effective masses are the
    sign-split autograd gradient of that loss on the logits; the per-source parameter gradients add up to the
    gradient the optimiser used."""
    learner = build_learner(config(method, True, every=1), tmp_path, dataset=digits)
    per_task = learner.stream.batches_per_task[0]
    batch = feed(learner, per_task + 3)  # task 1, buffer holds task 0 and task 1 samples
    learner.method.on_task_start(batch.task, learner.stream.tasks[batch.task].classes)
    diag, model = learner.diagnostics, learner.method.model

    outputs, captured = [], {}
    hook = model.register_forward_hook(lambda mod, inp, out: outputs.append(out))
    original = diag.before_backward

    def capture(loss):
        captured["loss"], captured["terms"] = loss, list(diag.terms)
        captured["logit_grads"] = torch.autograd.grad(loss, outputs, retain_graph=True)
        original(loss)

    diag.before_backward = capture
    diag.flush()
    before = {k: (st.positive.clone(), st.negative.clone()) for k, st in diag.stats.items()}
    diag.begin_batch(batch)
    learner.method.observe(batch)
    hook.remove()
    diag.flush()

    terms = captured["terms"]
    assert {t.source for t in terms} == {"new", "replay"}
    torch.testing.assert_close(sum(t.row_losses().sum() for t in terms), captured["loss"], rtol=1e-5, atol=1e-6)

    grad = torch.cat(captured["logit_grads"]).double()
    now = {k: (st.positive, st.negative) for k, st in diag.stats.items()}
    for idx, expected in ((0, (-grad).clamp(min=0).sum(0)), (1, grad.clamp(min=0).sum(0))):
        got = sum(now["effective", s][idx] - before["effective", s][idx] for s in ("new", "replay"))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)

    flat = torch.cat([p.grad.reshape(-1) for p in diag.params])
    total = diag.last_grads["new"] + diag.last_grads["replay"]
    torch.testing.assert_close(total, flat, rtol=1e-4, atol=1e-6)
    rec = diag._pending_grad
    assert rec["new"][0] == pytest.approx(float(diag.last_grads["new"].norm()), rel=1e-5)
    assert rec["total"][0] == pytest.approx(float(flat.norm()), rel=1e-4)
    assert set(rec["replay_tasks"]) <= {0, 1} and 0 in rec["replay_tasks"]
    assert -1 <= rec["cos"] <= 1


def test_er_reports_incoming_and_replay_rows_separately(tmp_path, digits):
    """ER's one CE over incoming+replay rows splits by rows: the effective masses of each source are the
    autograd gradient of the loss on those rows."""
    learner = build_learner(config("er", True), tmp_path, dataset=digits)
    batch = feed(learner, learner.stream.batches_per_task[0] + 2)
    diag = learner.diagnostics
    outputs = []
    hook = learner.method.model.register_forward_hook(lambda mod, inp, out: outputs.append(out))
    grads = {}
    original = diag.before_backward
    diag.before_backward = lambda loss: (
        grads.setdefault("g", torch.autograd.grad(loss, outputs[0], retain_graph=True)[0]),
        original(loss),
    )
    diag.flush()
    before = {s: diag.stats["effective", s].negative.clone() for s in ("new", "replay")}
    diag.begin_batch(batch)
    learner.method.observe(batch)
    hook.remove()
    diag.flush()
    n = len(batch.y)
    g = grads["g"].double()
    torch.testing.assert_close(diag.stats["effective", "new"].negative - before["new"], g[:n].clamp(min=0).sum(0))
    torch.testing.assert_close(diag.stats["effective", "replay"].negative - before["replay"], g[n:].clamp(min=0).sum(0))


def run_result(cfg, digits, tmp_path):
    learner = build_learner(cfg, tmp_path, dataset=digits)
    res = learner.run()
    learner.logger.close()
    return learner, res


@pytest.mark.parametrize("method", METHODS)
def test_diagnostics_leave_training_bit_identical(tmp_path, digits, method):
    off, res_off = run_result(config(method, False), digits, tmp_path / "off")
    on, res_on = run_result(config(method, True, every=2), digits, tmp_path / "on")
    assert res_on["acc_matrix"] == res_off["acc_matrix"]
    for a, b in zip(off.method.model.state_dict().values(), on.method.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert "diagnostics" in res_on and "diagnostics" not in res_off
    assert on.diagnostics.grads, "no gradient was measured"

    summary = res_on["diagnostics"]
    per_task = {e["task"]: e for e in summary["per_task"]}
    assert sorted(per_task) == list(range(5))
    # What the instrument is for: ER's new data push old classes down; ER-ACE's and GSA's masks never do.
    for t in range(1, 5):
        old_from_new = per_task[t]["mass/new/old"]
        assert old_from_new["pos"] == 0
        assert (old_from_new["neg"] > 0) if method == "er" else (old_from_new["neg"] == 0)
        assert per_task[t]["mass/replay/old"]["pos"] > 0
    gains = [g for g in summary["gains"] if g["after_task"] == 4]
    assert [g["task"] for g in gains] == [0, 1, 2, 3, 4]
    acc = res_on["acc_matrix"]
    assert gains[1]["gain"] == pytest.approx(acc[4][1] - acc[3][1])
    on.diagnostics.flush()
    if method == "gsa":  # the replay mass is GSA's own statistics
        torch.testing.assert_close(on.diagnostics.stats["mass", "replay"].positive, on.method.gsa.stats.positive)
        torch.testing.assert_close(on.diagnostics.stats["mass", "replay"].negative, on.method.gsa.stats.negative)


def test_every_must_be_positive():
    cfg = config("er", True, every=0)
    with pytest.raises(ConfigError, match="diagnostics.every=0"):
        validate(cfg)


@pytest.mark.slow
def test_cli_writes_diagnostics_logs_and_plots(tmp_path, cli_in_process):
    run_dir = tmp_path / "run"
    cmd = [
        f"hydra.run.dir={run_dir}",
        "dataset=digits",
        "method=er",
        "buffer.size=100",
        "log.progress=false",
        "eval.anytime_every=0",
        "diagnostics.enabled=true",
        "diagnostics.every=10",
    ]
    proc = cli_in_process(*cmd)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((run_dir / "results.json").read_text())
    assert len(res["diagnostics"]["per_task"]) == 5 and res["diagnostics"]["measured_steps"] >= 10
    keys = {line.split(",")[2] for line in (run_dir / "metrics.csv").read_text().splitlines()[1:]}
    assert {
        "diag/grad_norm/new",
        "diag/grad_norm/replay",
        "diag/grad_cos",
        "diag/mass/all/ratio_old",
        "diag/gain/task_0",
    } <= keys
    series = json.loads((run_dir / "diagnostics.json").read_text())
    assert series["snapshots"] and series["grads"]
    for name in ("diag_ratio.png", "diag_grad_norms.png", "diag_gain.png"):
        assert (run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_state_dict_round_trip_keeps_the_statistics(tmp_path, digits):
    learner = build_learner(config("er_ace", True, every=5), tmp_path, dataset=digits)
    feed(learner, 30)
    state = learner.diagnostics.state_dict()
    fresh = build_learner(config("er_ace", True, every=5), tmp_path / "b", dataset=digits).diagnostics
    fresh.load_state_dict(state)
    assert learner.diagnostics.stats["mass", "replay"].positive.sum() > 0  # something to lose
    for key, st in learner.diagnostics.stats.items():
        assert torch.equal(fresh.stats[key].positive, st.positive)
        assert torch.equal(fresh.stats[key].negative, st.negative)
    assert fresh.summary()["classes"] == learner.diagnostics.summary()["classes"]
