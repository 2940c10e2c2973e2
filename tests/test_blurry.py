"""Blurry streams (i-Blurry, Si-Blurry), their metrics (A_AUC, A_last, F_last) and task-free methods on them
(docs/streams.md)."""

import json
import os
import signal
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from test_resume import INTERRUPT, comparable, run_here

from cil.core import metrics
from cil.core.data import ImageDataset
from cil.core.data.blurry import BlurryStream
from cil.core.learner import Learner
from cil.core.methods import method_class
from cil.core.methods.er import ER
from cil.core.models import build_model
from cil.errors import ConfigError
from cil.run.config import default_config, validate
from cil.schema import StreamConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(run_dir, args, interrupt=None):
    """`python -m cil` (or the interrupting wrapper of tests/test_resume.py) on this checkout's cil."""
    entry = [str(INTERRUPT), interrupt] if interrupt else ["-m", "cil"]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, *entry, f"hydra.run.dir={run_dir}", *args],
        cwd=run_dir.parent,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def toy(num_classes=10, per_class=50, test_per_class=4):
    y = torch.arange(num_classes).repeat_interleave(per_class)
    ty = torch.arange(num_classes).repeat_interleave(test_per_class)
    x = torch.zeros(len(y), 1, 2, 2, dtype=torch.uint8)
    tx = torch.zeros(len(ty), 1, 2, 2, dtype=torch.uint8)
    return ImageDataset("toy", x, y, tx, ty, [f"c{i}" for i in range(num_classes)])


def stream_order(s):
    """(training index, its task) of every sample in stream order, read through batches() as the learner does."""
    out = []
    for t in s.tasks:
        out += [(i, t.index) for i in t.train_idx_host.tolist()]
    return out


# -- composition ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n, m", [(50, 10), (25, 30), (0, 100), (100, 0)])
def test_iblurry_composition_matches_n_and_m(n, m):
    ds = toy(num_classes=20, per_class=30)
    s = BlurryStream(ds, 5, batch_size=7, seed=3, kind="iblurry", disjoint_class_pct=n, blurry_sample_pct=m)
    # every training sample exactly once
    idx = [i for i, _ in stream_order(s)]
    assert sorted(idx) == list(range(len(ds.train_y)))
    assert s.n_samples == len(ds.train_y) and len(s) == sum(s.batches_per_task)
    disjoint = [c for part in s.disjoint_classes for c in part]
    blurry = [c for part in s.blurry_classes for c in part]
    assert len(disjoint) == 20 * n // 100 and sorted(disjoint + blurry) == list(range(20))
    assert all(len(p) == len(disjoint) // 5 for p in s.disjoint_classes)  # spread evenly
    task_of = dict(stream_order(s))
    labels = ds.train_y.tolist()
    home = {c: t for t, part in enumerate(s.disjoint_classes) for c in part}
    home.update({c: t for t, part in enumerate(s.blurry_classes) for c in part})
    for c in disjoint:  # a disjoint class lives in its task only
        assert {task_of[i] for i in range(len(labels)) if labels[i] == c} == {home[c]}
    # the pool holds exactly M % (rounded down) of every task's blurry samples, and only the pool leaves home
    per_task = Counter(home[labels[i]] for i in range(len(labels)) if labels[i] in blurry)
    assert s.pool_size == sum(k * m // 100 for k in per_task.values())
    away = sum(1 for i in range(len(labels)) if labels[i] in blurry and task_of[i] != home[labels[i]])
    assert away <= s.pool_size
    if s.pool_size >= 50:  # dealt evenly over 5 tasks: about 4/5 of the pool lands away from home
        assert 0.6 * s.pool_size <= away
    # the dealt pool is even: task sizes differ by the remainder at most
    sizes = [len(t.train_idx) for t in s.tasks]
    assert max(sizes) - min(sizes) <= 1


def test_same_seed_same_stream_other_seed_other_stream():
    ds = toy()
    a = BlurryStream(ds, 5, seed=1, kind="iblurry")
    b = BlurryStream(ds, 5, seed=1, kind="iblurry")
    c = BlurryStream(ds, 5, seed=2, kind="iblurry")
    assert stream_order(a) == stream_order(b)
    assert stream_order(a) != stream_order(c)
    sa, sb = BlurryStream(ds, 5, seed=4, kind="siblurry"), BlurryStream(ds, 5, seed=4, kind="siblurry")
    assert stream_order(sa) == stream_order(sb)
    # batches() from a position continues the same order (resume)
    full = [(b.step, b.task, b.y_host.tolist()) for b in a.batches()]
    assert [(b.step, b.task, b.y_host.tolist()) for b in a.batches(start=17)] == full[17:]


def test_siblurry_task_sizes_vary_and_sum_up():
    ds = toy(num_classes=20, per_class=20)
    shapes = set()
    for seed in range(4):
        s = BlurryStream(ds, 5, seed=seed, kind="siblurry", disjoint_class_pct=50, blurry_sample_pct=10)
        assert sorted(i for i, _ in stream_order(s)) == list(range(len(ds.train_y)))
        assert all(len(t.classes) >= 1 for t in s.tasks)  # no empty task
        assert sum(len(p) for p in s.disjoint_classes) == 10
        shapes.add(tuple(len(t.train_idx) for t in s.tasks))
        blurry_samples = 20 * sum(len(p) for p in s.blurry_classes)
        assert s.pool_size <= blurry_samples * 10 // 100
    assert any(len(set(sh)) > 1 for sh in shapes)  # uneven tasks
    assert len(shapes) > 1  # and not the same split for every seed


def test_test_samples_belong_to_the_home_task_of_their_class():
    ds = toy()
    s = BlurryStream(ds, 5, seed=0, kind="iblurry", disjoint_class_pct=50, blurry_sample_pct=20)
    ids = s.test_task_ids().tolist()
    for c in range(10):
        tasks = {ids[i] for i in range(len(ds.test_y)) if ds.test_y[i] == c}
        assert tasks == {s.class_task[c]}
    assert s.hides_boundaries and s.kind == "iblurry"


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("kind", "fuzzy", "stream.kind"),
        ("disjoint_class_pct", 130, "stream.disjoint_class_pct"),
        ("blurry_sample_pct", -1, "stream.blurry_sample_pct"),
    ],
)
def test_bad_stream_settings_name_the_key(key, value, needle):
    cfg = default_config("er", stream=StreamConfig(**{key: value}))
    with pytest.raises(ConfigError, match=needle):
        validate(cfg)


def test_iblurry_split_that_cannot_be_even_is_refused_with_the_choices():
    with pytest.raises(ConfigError, match=r"disjoint_class_pct=30 .*choose .*\[0, 50, 100\]"):
        BlurryStream(toy(), 5, kind="iblurry", disjoint_class_pct=30)


# -- methods on blurry streams --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["gsa", "ocm", "onpro"])
def test_methods_that_need_boundaries_are_refused_with_the_fix(name):
    assert method_class(name).needs_task_boundaries
    cfg = default_config(name, stream=StreamConfig(kind="iblurry"))
    with pytest.raises(
        ConfigError,
        match=rf"method={name} needs task boundaries; stream.kind=iblurry hides them: "
        r"use stream.kind=disjoint or a task-free method \(.*er_ace",
    ):
        validate(cfg)


@pytest.mark.parametrize("name", ["er", "er_ace", "derpp", "pcr", "naive"])
def test_task_free_methods_are_accepted(name):
    assert not method_class(name).needs_task_boundaries
    validate(default_config(name, stream=StreamConfig(kind="siblurry")))


class Probe(ER):
    """ER that records every batch and boundary it is handed."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.tasks_seen, self.steps_in_task, self.starts, self.ends = [], [], [], []

    def on_task_start(self, task, classes):
        self.starts.append(task)
        super().on_task_start(task, classes)

    def on_task_end(self, task):
        self.ends.append(task)

    def observe(self, batch):
        self.tasks_seen.append(batch.task)
        self.steps_in_task.append(batch.step_in_task)
        return super().observe(batch)


def probe_run(stream, **kw):
    from cil.core.buffer import ReplayBuffer

    torch.manual_seed(0)
    model = build_model("mlp", stream.dataset.input_shape, stream.num_classes, hidden=(8,))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    buffer = ReplayBuffer(40, stream.dataset.input_shape, seed=1)
    method = Probe(model, opt, buffer, ER.Config(), stream.num_classes, "cpu", seed=2)
    learner = Learner(stream, method, progress=False, anytime_every=0, **kw)
    return method, learner, learner.run()


def test_a_task_free_method_never_receives_the_task_on_a_blurry_stream():
    ds = toy()
    method, learner, res = probe_run(BlurryStream(ds, 5, batch_size=10, seed=0, kind="iblurry"), auc_every_samples=50)
    assert method.tasks_seen and set(method.tasks_seen) == {None} and set(method.steps_in_task) == {None}
    assert method.starts == [] and method.ends == []
    assert set(method.buffer.task.tolist()) == {-1}  # what it could replay carries no task either
    # the learner still measures per ground-truth task
    assert len(res["acc_matrix"]) == 5 and len(res["class_acc"]) == 5
    assert [p["samples"] for p in res["auc_curve"]] == list(range(50, 501, 50))
    assert res["a_auc"] == pytest.approx(np.mean([p["acc"] for p in res["auc_curve"]]))
    # on a disjoint stream the same method gets its tasks and boundaries, and no blurry metrics appear
    from cil.core.data.stream import ClassIncrementalStream

    method, _, res = probe_run(ClassIncrementalStream(ds, 5, batch_size=10, seed=0))
    assert method.starts == [0, 1, 2, 3, 4] and None not in method.tasks_seen
    assert "a_auc" not in res and "auc_curve" not in res


# -- metrics --------------------------------------------------------------------------------------------------
def test_a_auc_against_a_hand_computed_curve():
    # points every 100 samples: the area over the samples covered is the mean accuracy
    assert metrics.area_under_accuracy([100, 200, 300, 400], [80, 60, 50, 30]) == pytest.approx(55.0)
    # uneven points (a task's short last batch): each accuracy covers the samples since the previous point
    # (100*80 + 100*60 + 109*50) / 309
    assert metrics.area_under_accuracy([100, 200, 309], [80, 60, 50]) == pytest.approx(19450 / 309)
    assert metrics.area_under_accuracy([], []) is None
    with pytest.raises(ValueError):
        metrics.area_under_accuracy([200, 100], [1, 2])


def test_a_last_and_class_forgetting_by_hand():
    conf = np.array([[8, 2, 0], [1, 3, 0], [0, 0, 5]])
    assert metrics.seen_accuracy(conf, [0, 1]) == pytest.approx(100 * 11 / 14)
    assert metrics.class_accuracy(conf).tolist() == pytest.approx([80, 75, 100])
    nan = float("nan")
    rows = [[90, nan, nan], [70, 80, nan], [50, 60, 40], [60, 20, 30]]
    # class 0: 90 - 60; class 1: 80 - 20; class 2: 40 - 30
    assert metrics.class_forgetting(rows) == pytest.approx((30 + 60 + 10) / 3)
    # a class never above 0 before the last row is left out (the Si-Blurry rule)
    assert metrics.class_forgetting([[0, nan], [0, 50], [0, 10]]) == pytest.approx(40)
    assert metrics.class_forgetting([[1, 2]]) is None


# -- the CLI, checkpoint/resume -------------------------------------------------------------------------------
BLURRY = [
    "dataset=digits",
    "log.progress=false",
    "threads=1",
    "buffer.size=100",
    "stream.kind=iblurry",
    "eval.anytime_every=0",
    "checkpoint.every=25",
    "log.every=15",
]


@pytest.mark.slow
def test_cli_er_on_iblurry_digits_reports_a_auc_and_resumes_bit_for_bit(tmp_path):
    ref = tmp_path / "ref" / "run"
    ref.parent.mkdir()
    proc = run_here(ref, BLURRY)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((ref / "results.json").read_text())
    assert res["status"] == "complete" and res["config"]["stream"]["kind"] == "iblurry"
    assert 0 < res["a_auc"] <= 100 and 0 < res["a_last"] <= 100 and res["f_last"] is not None
    assert res["auc_every_samples"] == 100 and len(res["auc_curve"]) >= 10
    assert "A_AUC" in proc.stdout
    run = tmp_path / "killed" / "run"
    run.parent.mkdir()
    proc = cli(run, BLURRY, "observe:60:KILL")  # mid-step, after a checkpoint
    assert proc.returncode == -signal.SIGKILL
    proc = run_here(run, BLURRY)
    assert proc.returncode == 0, proc.stderr
    assert comparable(run) == comparable(ref)


def test_cli_refuses_gsa_on_a_blurry_stream(tmp_path):
    run = tmp_path / "run"
    proc = run_here(run, ["dataset=digits", "log.progress=false", "method=gsa", "stream.kind=siblurry"])
    assert proc.returncode == 2
    assert "method=gsa needs task boundaries; stream.kind=siblurry hides them" in proc.stderr
    assert not (run / "results.json").exists()
