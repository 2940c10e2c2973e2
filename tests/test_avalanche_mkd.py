"""MKDPlugin: MKD's EMA teachers inside real Avalanche strategies, and `method=avalanche_<name> addon=mkd`.

Small data only: sklearn's digits as an Avalanche benchmark of three tasks with a permuted class order.
"""

import json
from pathlib import Path

import pytest
import torch
from test_resume import run_here
from torch import nn

pytest.importorskip("avalanche")

from avalanche.benchmarks.scenarios.online import split_online_stream
from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
from avalanche.core import SupervisedPlugin
from avalanche.models import IncrementalClassifier
from avalanche.training import Naive
from avalanche.training.plugins import ReplayPlugin
from test_avalanche import avalanche_digits

from cil.avalanche import MKDPlugin
from cil.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits_stream():
    return avalanche_digits(60)


def mlp(out=10, bn=False):
    torch.manual_seed(0)
    mid = [nn.BatchNorm1d(64)] if bn else []
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), *mid, nn.ReLU(), nn.Linear(64, out))


def naive(model, *plugins):
    return Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=10,
        eval_mb_size=50,
        plugins=list(plugins),
        evaluator=None,
    )


def train_online(strategy, exp):
    for sub in split_online_stream([exp], experience_size=10, shuffle=False):
        strategy.train(sub, shuffle=False)


def params(module):
    return [p.detach().clone() for p in module.parameters()]


class Snapshots(SupervisedPlugin):
    """Hooked after MKDPlugin: the student's parameters at the teachers' construction and after every update."""

    def __init__(self, mkd):
        super().__init__()
        self.mkd, self.init, self.steps = mkd, None, []

    def before_training_exp(self, strategy, **kwargs):
        if self.init is None:
            self.init = params(strategy.model)

    def after_update(self, strategy, **kwargs):
        self.steps.append((self.mkd.batches, params(strategy.model)))


def test_ema_update_follows_its_formula_and_teachers_get_no_gradient(digits_stream):
    mkd = MKDPlugin(n_teachers=2, alpha_min=0.1, alpha_max=0.5, correction_step=3)
    snap = Snapshots(mkd)
    model = mlp()
    strategy = naive(model, mkd, snap)
    strategy.train(digits_stream[0])  # a classic experience: 6 iterations, one epoch
    assert mkd.batches == mkd.updates == len(snap.steps) == 6
    for alpha, teacher in zip([0.1, 0.5], mkd.teachers, strict=True):
        ema = [alpha / (1 - alpha) * p.double() for p in snap.init]
        for batches, theta in snap.steps:
            k = max(1, batches // 3)
            ema = [(1 - alpha) * e + alpha / (1 - alpha**k) * p.double() for e, p in zip(ema, theta, strict=True)]
        for e, t in zip(ema, teacher.parameters(), strict=True):
            torch.testing.assert_close(t.double(), e, rtol=1e-5, atol=1e-6)
        assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    # the teachers are not the student and have moved away from a scaled copy of it
    assert not torch.allclose(mkd.teachers[0][1].weight, model[1].weight)


class LossProbe(SupervisedPlugin):
    """Records strategy.loss as it passes (one probe before MKDPlugin, one after)."""

    def __init__(self):
        super().__init__()
        self.losses, self.inputs = [], []

    def before_backward(self, strategy, **kwargs):
        self.losses.append(strategy.loss.detach().double().reshape(()))
        self.inputs.append((strategy.mb_x, strategy.mb_y, strategy.mb_output.detach().double()))


def kd_reference(student, teacher, temperature, seen):
    """KD_T(student | teacher) in float64 over the seen columns, written out independently of kd_loss."""
    cols = torch.tensor(sorted(seen))
    s, t = student[:, cols] / temperature, teacher[:, cols] / temperature
    p_t = torch.softmax(t, 1)
    return (p_t * (torch.log(p_t) - torch.log_softmax(s, 1))).sum(1).mean() * temperature**2


def test_kd_term_added_to_the_strategy_loss(digits_stream):
    before, after = LossProbe(), LossProbe()
    mkd = MKDPlugin(weight=0.5, kd_lambda=2.0, n_teachers=2, alpha_min=0.05, alpha_max=0.2)
    replay = ReplayPlugin(mem_size=30, batch_size=10, batch_size_mem=10)
    torch.manual_seed(1)
    strategy = naive(mlp(), replay, before, mkd, after)
    seen, teachers_at = set(), []

    class TeacherProbe(SupervisedPlugin):  # the teachers' logits at the same moment (before their update)
        def before_backward(self, strategy, **kwargs):
            with torch.no_grad():
                teachers_at.append([t(strategy.mb_x).double() for t in mkd.teachers])

    strategy.plugins.insert(2, TeacherProbe())
    for exp in digits_stream[:2]:
        train_online(strategy, exp)
    assert len(after.losses) == 12
    for (_x, y, out), lb, la, ts in zip(before.inputs, before.losses, after.losses, teachers_at, strict=True):
        seen |= set(y.tolist())
        kd = sum(kd_reference(out, t, 4.0, seen) for t in ts) / 2
        torch.testing.assert_close(la - lb, 0.5 * 2.0 * kd, rtol=1e-5, atol=1e-6)
    assert float(mkd.last["kd"]) > 0 and seen == {1, 3, 7, 9}


def test_weight_zero_is_the_strategy_bit_for_bit(digits_stream):
    finals = []
    for plugins in ([], [MKDPlugin(weight=0)]):
        torch.manual_seed(3)
        model = mlp()
        strategy = naive(model, ReplayPlugin(mem_size=30, batch_size=10, batch_size_mem=10), *plugins)
        for exp in digits_stream[:2]:
            train_online(strategy, exp)
        finals.append(params(model))
    assert all(torch.equal(a, b) for a, b in zip(*finals, strict=True))
    assert plugins[0].updates == 12  # the teachers still followed (eval_head may still use them)


class EvalProbe(SupervisedPlugin):
    def __init__(self):
        super().__init__()
        self.models, self.outputs, self.inputs = [], [], []

    def after_eval_forward(self, strategy, **kwargs):
        self.models.append(strategy.model)
        self.outputs.append(strategy.mb_output.detach())
        self.inputs.append(strategy.mb_x)


@pytest.mark.parametrize("head", ["teacher", "average"])
def test_eval_head_is_evaluated_and_the_student_restored(digits_stream, head):
    mkd, probe = MKDPlugin(eval_head=head, alpha_min=0.3, alpha_max=0.3), EvalProbe()
    model = mlp(bn=True)  # batch norm: evaluation must run the head in eval mode
    strategy = naive(model, mkd, probe)
    strategy.train(digits_stream[0])
    teacher = mkd.teachers[0]
    strategy.eval(digits_stream[:2])
    assert strategy.model is model and model.training and teacher.training  # restored, modes too
    assert len(probe.outputs) == 4 and all(m is not model for m in probe.models)
    if head == "teacher":
        reference = teacher.eval()
    else:  # (student + teacher) / 2 parameter-wise, the student's buffers (BN statistics)
        reference = mlp(bn=True)
        reference.load_state_dict(model.state_dict())
        with torch.no_grad():
            for r, s, t in zip(reference.parameters(), model.parameters(), teacher.parameters(), strict=True):
                r.copy_((s + t) / 2)
        reference.eval()
    with torch.no_grad():
        for x, out in zip(probe.inputs, probe.outputs, strict=True):
            torch.testing.assert_close(out, reference(x))
    teacher.train()
    student_eval = naive(mlp(bn=True), MKDPlugin(eval_head="student"), probe)
    student_eval.eval(digits_stream[:1])
    assert probe.models[-1] is student_eval.model


def test_failed_evaluation_never_trains_a_head(digits_stream):
    class Boom(SupervisedPlugin):
        def after_eval_iteration(self, strategy, **kwargs):
            raise RuntimeError("boom")

    mkd = MKDPlugin(eval_head="teacher")
    model = mlp()
    strategy = naive(model, mkd)
    strategy.train(digits_stream[0])
    strategy.plugins.append(Boom())
    with pytest.raises(RuntimeError, match="boom"):
        strategy.eval(digits_stream[:1])
    strategy.plugins.pop()
    teacher_before, student_before = params(mkd.teachers[0]), params(model)
    strategy.train(digits_stream[1])  # the student is back before anything trains
    assert strategy.model is model
    assert all(not torch.equal(a, b) for a, b in zip(student_before, model.parameters(), strict=True))
    # the teacher moved only by its EMA step (small), it was not trained by SGD in the student's place
    assert mkd.updates == 12 and all(p.grad is None for p in mkd.teachers[0].parameters())
    assert all(not torch.equal(a, b) for a, b in zip(teacher_before, mkd.teachers[0].parameters(), strict=True))


def test_checkpoint_round_trip_keeps_teachers_and_counters(digits_stream, tmp_path):
    mkd = MKDPlugin(n_teachers=2, alpha_min=0.05, alpha_max=0.2)
    strategy = naive(mlp(), mkd)
    train_online(strategy, digits_stream[0])
    train_online(strategy, digits_stream[1])
    save_checkpoint(strategy, tmp_path / "ckpt.pkl", exclude=["optimizer"])  # see test_avalanche.py
    restored, _ = maybe_load_checkpoint(
        naive(mlp(), MKDPlugin(n_teachers=2, alpha_min=0.05, alpha_max=0.2)), tmp_path / "ckpt.pkl"
    )
    restored.optimizer = torch.optim.SGD(restored.model.parameters(), lr=0.1)
    plugin = [p for p in restored.plugins if isinstance(p, MKDPlugin)][0]
    assert (plugin.batches, plugin.updates) == (mkd.batches, mkd.updates) == (12, 12)
    assert torch.equal(plugin.seen, mkd.seen)
    for a, b in zip(mkd.teachers, plugin.teachers, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    train_online(strategy, digits_stream[2])
    train_online(restored, digits_stream[2])
    for a, b in zip(mkd.teachers, plugin.teachers, strict=True):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert all(torch.equal(p, q) for p, q in zip(strategy.model.parameters(), restored.model.parameters(), strict=True))


def test_teachers_grow_with_an_incremental_classifier(digits_stream):
    class AtStart(SupervisedPlugin):  # after MKDPlugin: the teacher's head right after it followed the student
        def __init__(self):
            super().__init__()
            self.seen = []

        def before_training_exp(self, strategy, **kwargs):
            self.seen.append((params(mkd.teachers[0][-1]), params(strategy.model[-1]), mkd.batches))

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), IncrementalClassifier(64, 1))
    mkd, start = MKDPlugin(alpha_min=0.2, alpha_max=0.2, correction_step=2), AtStart()
    strategy = naive(model, mkd, start)
    ends = []
    for exp in digits_stream[:2]:
        strategy.train(exp)
        ends.append(params(mkd.teachers[0][-1]))
    head = mkd.teachers[0][-1]
    assert head.classifier.out_features == model[-1].classifier.out_features == 10
    assert torch.equal(head.active_units, model[-1].active_units)
    (t_w, t_b), (s_w, s_b), batches = start.seen[1]
    old = ends[0][0].shape[0]  # 8 after the first task (labels 7, 3)
    assert old == 8 and t_w.shape[0] == 10
    assert torch.equal(t_w[:old], ends[0][0]) and torch.equal(t_b[:old], ends[0][1])  # kept
    fixed_point = 1 / (1 - 0.2 ** max(1, batches // 2))
    torch.testing.assert_close(t_w[old:], s_w[old:] * fixed_point)  # the student's new rows, EMA fixed point
    assert mkd.updates == 12


def test_options_the_plugin_does_not_take():
    with pytest.raises(ConfigError, match="augment.*data loader"):
        MKDPlugin(augment=False)
    with pytest.raises(ConfigError, match="bogus"):
        MKDPlugin(bogus=1)
    with pytest.raises(ConfigError, match="eval_head"):
        MKDPlugin(eval_head="nope")


def cli(tmp_path, name, *args, ok=True):
    """`python -m cil` in this process (test_resume.run_here): Avalanche is already imported here."""
    run_dir = tmp_path / name
    args = ("dataset=digits", "log.progress=false", "threads=1", "eval.anytime_every=0", "buffer.size=100", *args)
    proc = run_here(run_dir, list(args))
    if not ok:
        return proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
def test_peer_with_addon_mkd_through_cli(tmp_path):
    res = cli(tmp_path, "replay_mkd", "method=avalanche_replay", "addon=mkd", "addon.mkd.eval_head=teacher")
    assert res["status"] == "complete" and res["avalanche"]["strategy"] == "Naive"
    assert res["mkd"] == {"alphas": [0.01], "eval_head": "teacher", "form": "main_pass"}
    assert len(res["acc_matrix"]) == 5 and all(len(r) == 5 for r in res["acc_matrix"])
    assert set(res["heads"]) == {"mkd_student", "mkd_average"}
    for head in res["heads"].values():
        assert len(head["acc_matrix"]) == 5 and head["final_avg_acc"] > 0
    assert res["heads"]["mkd_student"]["acc_matrix"] != res["acc_matrix"]  # the teacher is the main head


def test_refused_addons_for_peers_are_one_clear_error(tmp_path):
    proc = cli(tmp_path, "ccl", "method=avalanche_er_ace", "addon=ccl_dc", ok=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "addon=ccl_dc" in line]
    assert len(lines) == 1 and "one model and one optimizer" in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    from cil.core.addons import addon_configs
    from cil.run.config import default_config, validate

    cfg = default_config("avalanche_replay")
    cfg.addon = {"mkd": {"augment": False}}
    with pytest.raises(ConfigError, match=r"addon\.mkd\.augment=False"):
        validate(cfg)
    cfg.addon = addon_configs({"mkd": {"mode": "main_pass", "kd_lambda": 2.0}})
    validate(cfg)  # main_pass is the form the plugin runs; kd_lambda is a plugin option
    cfg = default_config("avalanche_gdumb")
    cfg.addon = "mkd"
    with pytest.raises(ConfigError, match="GDumb retrains"):
        validate(cfg)
