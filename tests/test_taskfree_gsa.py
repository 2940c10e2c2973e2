"""Task-free GSA (`method.task_free=true`, docs/methods.md "Task-free GSA"): pseudo-tasks and current classes from
the incoming labels, the label-filtered buffer draws, its equality with task-aware GSA on a disjoint stream, blurry
streams through the CLI with SIGKILL/resume, and the Avalanche plugin's fallback on streams without boundaries."""

import json
import signal
import warnings

import pytest
import torch
from test_blurry import cli
from test_resume import comparable, run_here

from cil.core.buffer import ReplayBuffer
from cil.core.data import load_dataset
from cil.core.data.stream import Batch, ClassIncrementalStream
from cil.core.learner import Learner
from cil.core.methods.base import ClassSets
from cil.core.methods.gsa import GSA, GSAConfig, PseudoTasks
from cil.core.models import build_model
from cil.errors import ConfigError
from cil.run.config import default_config, validate
from cil.schema import StreamConfig

SHAPE = (1, 8, 8)


def labels_batch(labels, step=0):
    y = torch.tensor(labels)
    return Batch(torch.full((len(labels), *SHAPE), 7, dtype=torch.uint8), y, y.clone(), None, step, None)


def make_gsa(buffer_size=100, seed=0, **cfg):
    torch.manual_seed(seed)
    model = build_model("mlp", SHAPE, 10, hidden=(32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    buf = ReplayBuffer(buffer_size, SHAPE, seed=seed + 1)
    return GSA(model, opt, buf, GSAConfig(**cfg), 10, torch.device("cpu"), seed=seed + 2, input_shape=SHAPE)


def feed(pseudo: PseudoTasks, labels):
    """One batch through the pseudo-tasks, then marked seen (the order GSA.observe uses)."""
    y = torch.tensor(labels)
    out = pseudo.observe(y, y)
    pseudo.classes.mark_seen(y, y)
    return out, sorted(pseudo.classes.task_labels), pseudo.classes.task_mask.nonzero().squeeze(1).tolist()


# -- the current classes and the pseudo-task counter, on hand-made batches --------------------------------------
def test_novelty_rule_on_hand_made_batches():
    p = PseudoTasks(ClassSets(10, torch.device("cpu")), "novelty")
    steps = [feed(p, labels) for labels in ([0, 1, 1], [1, 0], [2, 0], [0, 1, 2], [1], [3, 1], [3])]
    # (pseudo-task, batches since its start), current classes (host), the mask over the head (device)
    assert [s[0] for s in steps] == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1)]
    # a novel class restarts the set at its batch's labels; every later batch's labels join it
    assert [s[1] for s in steps] == [[0, 1], [0, 1], [0, 2], [0, 1, 2], [0, 1, 2], [1, 3], [1, 3]]
    assert all(host == mask for _, host, mask in steps)
    assert p.classes.task == 2 and p.others() == [0, 2] and p.current() == [1, 3]


def test_window_rule_on_hand_made_batches():
    p = PseudoTasks(ClassSets(10, torch.device("cpu")), "window", window=2)
    steps = [feed(p, labels) for labels in ([0], [1], [1], [2, 1], [2], [2])]
    assert [s[1] for s in steps] == [[0], [0, 1], [1], [1, 2], [1, 2], [2]]
    assert all(host == mask for _, host, mask in steps)
    # the counter is the novelty counter under either rule
    assert [s[0] for s in steps] == [(0, 0), (1, 0), (1, 1), (2, 0), (2, 1), (2, 2)]


def test_masks_are_replaced_never_changed_in_place():
    p = PseudoTasks(ClassSets(10, torch.device("cpu")), "novelty")
    feed(p, [0])
    held = p.classes.task_mask
    before = held.clone()
    feed(p, [0, 4])
    assert torch.equal(held, before) and p.classes.task_mask[4]


def test_warmup_restarts_at_every_novelty_event():
    m = make_gsa(
        task_free=True, warmup_batches=2, augment=False, two_views=False, replay_batch_size=8, current_task_replay=4
    )
    unit = []
    for step, labels in enumerate([[0, 1]] * 4 + [[2, 3]] * 4 + [[0, 2]] * 2 + [[4, 0]] * 3):
        batch = labels_batch(labels * 3, step)
        m.observe(batch)
        m.remember(batch, None)
        unit.append(bool(torch.all(m.gsa.last_weights == 1)))
    # novelty at batches 0, 4, 10: two warm-up batches each (batch 0 has no replay step: weights stay 1)
    assert unit == [True, True, False, False, True, True, False, False, False, False, True, True, False]
    assert m.pseudo_step == (2, 2)


def test_task_reset_balance_restarts_at_novelty():
    m = make_gsa(
        task_free=True, balance="task_reset", augment=False, two_views=False, replay_batch_size=8, current_task_replay=4
    )
    for step, labels in enumerate([[0, 1]] * 3 + [[0, 1, 2]]):
        batch = labels_batch(labels * 3, step)
        m.observe(batch)
        m.remember(batch, None)
    # the novelty batch (class 2) restarted the statistics: only its own replay batch is in them
    assert m.gsa.rule.task == 1
    fresh = make_gsa(
        task_free=True, balance="cumulative", augment=False, two_views=False, replay_batch_size=8, current_task_replay=4
    )
    for step, labels in enumerate([[0, 1]] * 3 + [[0, 1, 2]]):
        batch = labels_batch(labels * 3, step)
        fresh.observe(batch)
        fresh.remember(batch, None)
    assert m.gsa.stats.positive.sum() < fresh.gsa.stats.positive.sum()


# -- the label-filtered draws ------------------------------------------------------------------------------------
def test_buffer_label_filter_and_host_labels():
    buf = ReplayBuffer(40, SHAPE, seed=0)
    for c in range(4):
        y = torch.full((10,), c)
        buf.add(torch.full((10, *SHAPE), c, dtype=torch.uint8), y, None, y_host=y.clone())
    assert not buf._pending_labels  # host labels: the mirror is exact at once
    x, y, task = buf.sample(15, classes=[1, 3])
    assert len(y) == 15 and set(y.tolist()) <= {1, 3} and torch.equal(x[:, 0, 0, 0].long(), y)
    assert set(task.tolist()) == {-1}
    assert len(buf.sample(50, classes=[2])[1]) == 10  # no more than there are
    assert len(buf.sample(5, classes=[])[1]) == 0


def test_step_draws_current_classes_and_the_others_by_label():
    m = make_gsa(task_free=True, augment=False, two_views=False, replay_batch_size=12, current_task_replay=6)
    calls = []
    sample = m.buffer.sample

    def recording(n, **filters):
        out = sample(n, **filters)
        calls.append((n, filters, sorted(set(out[1].tolist()))))
        return out

    for step, labels in enumerate([[0, 1]] * 6 + [[2, 3]] * 2):
        batch = labels_batch(labels * 2, step)
        if step == 7:
            m.buffer.sample = recording
        m.observe(batch)
        m.remember(batch, None)
    (n_cur, f_cur, got_cur), (n_old, f_old, got_old) = calls
    assert (n_cur, f_cur) == (6, {"classes": [2, 3]}) and got_cur == [2, 3]
    # r = 2 current of 4 seen classes: floor(12 * 1/2) rows of the other classes
    assert (n_old, f_old) == (6, {"classes": [0, 1]}) and got_old == [0, 1]
    assert set(m.buffer.task.tolist()) == {-1}  # task-free GSA stores no task


# -- against task-aware GSA on a disjoint stream ----------------------------------------------------------------
def learner(cfg, stream, seed=0):
    torch.manual_seed(seed)
    model = build_model("mlp", SHAPE, 10, hidden=(32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    method = GSA(
        model,
        opt,
        ReplayBuffer(100, SHAPE, seed=seed + 1),
        cfg,
        10,
        torch.device("cpu"),
        seed=seed + 2,
        input_shape=SHAPE,
    )
    return Learner(stream, method, progress=False, anytime_every=0)


def disjoint_digits():
    return ClassIncrementalStream(load_dataset("digits"), n_tasks=5, batch_size=10, order="natural", seed=0)


def test_novelty_rule_is_task_aware_gsa_bit_for_bit_on_a_disjoint_stream():
    """On a disjoint stream whose every task's first batch shows all its classes, the novelty events are the task
    starts and the current classes are the task's classes at every step: the label-filtered draws select the same
    buffer rows in the same order as the task-filtered ones and take the same random numbers, so the whole run is
    the task-aware run: loss, gradients and parameters equal bit for bit. (Where a task's first batch misses a
    class, the two differ from that batch on: the late class is a novelty event of its own.)"""
    stream = disjoint_digits()
    firsts = [b for b in stream.batches() if b.step_in_task == 0]
    assert all(set(b.y_host.tolist()) == set(stream.tasks[b.task].classes.tolist()) for b in firsts)  # precondition
    aware, free = learner(GSAConfig(), stream), learner(GSAConfig(task_free=True), stream)
    for batch in stream.batches():
        if batch.step >= 90:  # tasks 0-2 and 3 task starts
            break
        a = aware.train_batch(batch)
        f = free.train_batch(batch)
        assert torch.equal(a.loss, f.loss), batch.step
        for pa, pf in zip(aware.method.model.parameters(), free.method.model.parameters(), strict=True):
            assert torch.equal(pa.grad, pf.grad) and torch.equal(pa, pf), batch.step
        assert free.method.pseudo_step == (batch.task, batch.step_in_task)
        assert torch.equal(free.method.classes.task_mask, aware.method.classes.task_mask)
    assert torch.equal(aware.method.gsa.stats.positive, free.method.gsa.stats.positive)


def test_window_rule_current_classes_are_the_task_once_the_window_is_full():
    stream = disjoint_digits()
    window = 4
    free = learner(GSAConfig(task_free=True, current_classes="window", current_window=window), stream)
    checked = 0
    for batch in stream.batches():
        if batch.step >= 90:
            break
        free.train_batch(batch)
        task_classes = set(stream.tasks[batch.task].classes.tolist())
        current = free.method.classes.task_labels
        if batch.step_in_task >= window - 1:
            assert current == task_classes
            checked += 1
        elif batch.task > 0:  # the window still holds the previous task's batches
            assert current > task_classes
    assert checked > 70


# -- configuration ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "cfg, key",
    [
        (dict(task_free=True, current_classes="recent"), "method.current_classes"),
        (dict(task_free=True, current_window=0), "method.current_window"),
        (dict(task_free=True, fresh_head_rows=True), "method.fresh_head_rows"),
        (dict(task_free=True, freeze_head_after_first_task=True), "method.freeze_head_after_first_task"),
    ],
)
def test_bad_task_free_settings_name_the_key(cfg, key):
    with pytest.raises(ConfigError, match=key):
        GSAConfig(**cfg).validate()


def test_blurry_streams_take_task_free_gsa_and_refuse_plain_gsa_naming_the_switch():
    cfg = default_config("gsa", stream=StreamConfig(kind="iblurry"))
    with pytest.raises(ConfigError, match=r"method=gsa needs task boundaries.*gsa with method.task_free=true"):
        validate(cfg)
    cfg.method.task_free = True
    validate(cfg)
    assert not GSA.boundaries_needed(cfg.method) and GSA.boundaries_needed(GSAConfig())


# -- the CLI on a blurry stream, SIGKILL and resume -------------------------------------------------------------
TASK_FREE = [
    "dataset=digits",
    "log.progress=false",
    "threads=1",
    "buffer.size=100",
    "stream.kind=iblurry",
    "eval.anytime_every=0",
    "checkpoint.every=25",
    "log.every=15",
    "method=gsa",
    "method.task_free=true",
    "method.replay_batch_size=32",
    "method.current_task_replay=8",
    "method.current_classes=window",
    "method.current_window=3",
]


@pytest.mark.slow
def test_cli_task_free_gsa_on_iblurry_reports_a_auc_and_resumes_bit_for_bit(tmp_path):
    ref = tmp_path / "ref" / "run"
    ref.parent.mkdir()
    proc = run_here(ref, TASK_FREE)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((ref / "results.json").read_text())
    assert res["status"] == "complete" and res["config"]["method"]["task_free"] is True
    assert 0 < res["a_auc"] <= 100 and 0 < res["a_last"] <= 100
    assert res["gsa"]["pseudo_tasks"] >= 5 and res["gsa"]["classes"] == list(range(10))
    run = tmp_path / "killed" / "run"
    run.parent.mkdir()
    proc = cli(run, TASK_FREE, "observe:60:KILL")  # mid-step, after the checkpoint at batch 50
    assert proc.returncode == -signal.SIGKILL
    proc = run_here(run, TASK_FREE)
    assert proc.returncode == 0, proc.stderr
    assert comparable(run) == comparable(ref)


def test_state_round_trip_continues_identically_with_the_novelty_rule():
    batches = [
        labels_batch(labels * 2, i)
        for i, labels in enumerate([[0, 1]] * 3 + [[2, 0]] * 3 + [[3, 1]] * 3 + [[3, 2, 4]] * 3)
    ]
    a = make_gsa(task_free=True, augment=True, replay_batch_size=8, current_task_replay=4)
    for b in batches[:7]:
        a.remember(b, a.observe(b))
    b_ = make_gsa(task_free=True, augment=True, replay_batch_size=8, current_task_replay=4)
    b_.load_state_dict(a.state_dict())
    b_.buffer.load_state_dict(a.buffer.state_dict())
    b_.model.load_state_dict(a.model.state_dict())
    b_.pseudo_step = a.pseudo_step
    for b in batches[7:]:
        la, lb = a.observe(b).loss, b_.observe(b).loss
        a.remember(b, None)
        b_.remember(b, None)
        assert torch.equal(la, lb)
    assert a.gsa.pseudo.state_dict() == b_.gsa.pseudo.state_dict() and a.pseudo_step == b_.pseudo_step == (3, 2)


# -- the Avalanche plugin ----------------------------------------------------------------------------------------
def avalanche_digits():
    """Three digits tasks as an Avalanche benchmark (tests/test_avalanche.py's), 100 samples each."""
    pytest.importorskip("avalanche")
    from test_avalanche import avalanche_digits as benchmark

    return benchmark(100)


ORDER = [[7, 3], [9, 1], [5, 0]]  # the task classes of that benchmark


def naive(plugin):
    from avalanche.training import Naive

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    return Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=10,
        plugins=[plugin],
        evaluator=None,
    )


def test_plugin_falls_back_to_task_free_gsa_with_one_warning():
    exps = avalanche_digits()
    from avalanche.benchmarks.scenarios.online import split_online_stream

    from cil.avalanche import GSAPlugin

    gsa = GSAPlugin(mem_size=100, num_classes=10, warmup_batches=2)
    strategy = naive(gsa)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for exp in exps:
            for sub in split_online_stream([exp], experience_size=10):  # Avalanche's defaults: no boundaries
                strategy.train(sub)
    ours = [w for w in caught if "GSAPlugin" in str(w.message)]
    assert len(ours) == 1 and "task-free" in str(ours[0].message)
    assert gsa.cfg.task_free and gsa.gsa.pseudo is not None
    assert gsa.summary()["classes"] == sorted(c for task in ORDER for c in task)
    assert gsa.task >= len(ORDER) - 1  # at least one novelty event per task
    assert set(gsa.buffer.task.tolist()) == {-1}
    # forced on a stream with boundaries: the same task-free step, no warning
    forced = GSAPlugin(mem_size=100, num_classes=10, task_free=True)
    strategy = naive(forced)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for sub in split_online_stream([exps[0]], experience_size=10, access_task_boundaries=True):
            strategy.train(sub)
    assert not [w for w in caught if "GSAPlugin" in str(w.message)]
    assert forced.classes.task_labels <= set(ORDER[0]) and set(forced.buffer.task.tolist()) == {-1}
