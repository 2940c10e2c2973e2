"""Our methods (DER++, PCR, OCM, OnPro), the CCL-DC add-on and the gradient-mass diagnostics inside real Avalanche
strategies: parity with our learner on the same stream and seed, streams without boundaries, refusals.

Small data only: sklearn's digits (10 classes, 8x8), 4 samples per class in 2 tasks, a 32-32 MLP, batches of 4.
Our learner runs through the runner's own builder (`cil.api.build`); the Avalanche side gets the same stream
(`cil.avalanche.peers.task_experiences`, one experience per task in our order, split by Avalanche's
`split_online_stream`), the same initialisation and the same optimizer settings.

One test goes the other way, on Avalanche's own benchmark through its public APIs only: SplitMNIST (the offline
MNIST files), streamed online by `split_online_stream`, feeds each plugin; our learner (`cil.api.build` on our MNIST
with the same class order) is then driven by `train_batch` on the very mini-batches Avalanche trained on.
"""

import itertools
import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import TensorDataset

pytest.importorskip("avalanche")

from avalanche.benchmarks.scenarios.online import split_online_stream
from avalanche.benchmarks.scenarios.supervised import class_incremental_benchmark
from avalanche.core import SupervisedPlugin
from avalanche.logging import BaseLogger
from avalanche.training import Naive
from avalanche.training.plugins import EvaluationPlugin, ReplayPlugin

from cil import api
from cil.avalanche import (
    CCLDCPlugin,
    DERPPPlugin,
    GradientMassMetric,
    GSAPlugin,
    MethodPlugin,
    MKDPlugin,
    OCMPlugin,
    OnProPlugin,
    PCRPlugin,
)
from cil.avalanche.bench import classic_benchmark
from cil.avalanche.peers import task_experiences
from cil.core.data.stream import Batch
from cil.core.methods.base import to_float
from cil.core.models import build_model
from cil.core.objectives.gsa import GradientStats
from cil.errors import ConfigError
from cil.run.experiment import build_optimizer

REPO = Path(__file__).resolve().parents[1]
BATCH, MEM, EVERY = 4, 40, 3
# method -> its options in both runs: small draws and projections for an 8x8 MLP
OPTIONS = {
    "derpp": {"replay_batch_size": 8},
    "pcr": {},
    "ocm": {"replay_batch_size": 8, "proj_dim": 16},
    "onpro": {"replay_batch_size": 8, "proj_dim": 16},
    "gsa": {"replay_batch_size": 8, "current_task_replay": 4},
}
PLUGINS = {"derpp": DERPPPlugin, "pcr": PCRPlugin, "ocm": OCMPlugin, "onpro": OnProPlugin}


def run_config(method, addon=None):
    cfg = {
        "dataset": "digits",
        "method": method,
        "model.hidden": [32, 32],
        "stream.n_tasks": 2,
        "stream.samples_per_class": 4,
        "stream.batch_size": BATCH,
        "buffer.size": MEM,
        "eval.anytime_every": 0,
        "eval.classes": "all",  # Avalanche's argmax spans every head unit
        "log.progress": False,
        "threads": 1,
        "compute.flops": False,
        "checkpoint.at_task_end": False,
        "diagnostics.enabled": True,
        "diagnostics.every": EVERY,
        "diagnostics.plots": False,
        **{f"method.{k}": v for k, v in OPTIONS[method].items()},
    }
    return {**cfg, "addon": addon} if addon else cfg


_RUNS: dict = {}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread (conftest restores the count after each test): these tiny steps only lose time to thread
    hand-offs on a shared machine, and our learner and Avalanche then run alike."""
    torch.set_num_threads(1)


def ours(method, tmp_path_factory, addon=None):
    """Our learner's run (cached per method and add-on): (learner, results, config)."""
    key = (method, addon)
    if key not in _RUNS:
        cfg = run_config(method, addon)
        learner = api.build(cfg, out_dir=tmp_path_factory.mktemp(f"{method}_{addon}"))
        _RUNS[key] = (learner, learner.run(), api.config(cfg))
    return _RUNS[key]


def fresh_model(cfg, seed_offset=0):
    """The model our builder makes (seeded with seed, CCL-DC's peer with seed + 7), torch's global RNG left as it
    was (our builder makes the peer so)."""
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed + seed_offset)
        return build_model("mlp", (1, 8, 8), 10, hidden=tuple(cfg.model.hidden))


class EvalLogits(SupervisedPlugin):
    """The (inputs, labels, logits) of every mini-batch Avalanche's evaluation runs."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def after_eval_forward(self, strategy, **kwargs):
        self.batches.append((strategy.mb_x.clone(), strategy.mb_y.clone(), strategy.mb_output.detach().clone()))


class Recorder(BaseLogger):
    """An Avalanche logger keeping every value it is given: {name: {x: value}}."""

    def __init__(self):
        super().__init__()
        self.values = {}

    def log_single_metric(self, name, value, x_plot):
        self.values.setdefault(name, {})[x_plot] = value


def avalanche_run(learner, cfg, make_plugins, boundaries=True, metric=None, logger=None):
    """Naive + `make_plugins()` on our learner's stream, one sub-experience per batch of ours, on our model and
    optimizer made as our builder makes them: the global RNG seeded, the model, then the method (here the
    plugins, whose method initialises its own modules from the global RNG as it is when the plugin is made)."""
    torch.manual_seed(cfg.seed)
    model = build_model("mlp", (1, 8, 8), 10, hidden=tuple(cfg.model.hidden))
    plugins = make_plugins()
    strategy = Naive(
        model=model,
        optimizer=build_optimizer(cfg, model.parameters()),
        train_mb_size=BATCH,
        eval_mb_size=1000,
        plugins=plugins,
        evaluator=EvaluationPlugin(*([metric] if metric else []), loggers=[logger] if logger else None),
    )
    for exp in task_experiences(learner.stream):
        for sub in split_online_stream([exp], BATCH, shuffle=False, access_task_boundaries=boundaries):
            strategy.train(sub, shuffle=False)
    return strategy


def host(method, cfg):
    """The method's plugin with the options and seed of our run."""
    return PLUGINS[method](mem_size=MEM, seed=cfg.seed, **OPTIONS[method])


class Labelled(TensorDataset):
    """A torch dataset with `targets`: what Avalanche's benchmark builders take."""

    def __init__(self, x, y):
        super().__init__(x, y)
        self.targets = y.tolist()


def eval_experiences(stream):
    """Each task's test set as an Avalanche experience, our class order (float inputs as our learner's)."""
    test = Labelled(to_float(stream.test_x).cpu(), stream.test_y.cpu())
    order = stream.class_order
    return list(
        class_incremental_benchmark({"test": test}, class_order=order, num_experiences=stream.n_tasks).test_stream
    )


def uint8(x):
    """[0, 1] inputs back to the uint8 images our stream holds (exact for k / 255)."""
    return x.mul(255).round().to(torch.uint8)


@torch.no_grad()
def our_eval_logits(method, x_uint8):
    """What our learner's `predict` computes before its argmax (eval mode, the method's eval head)."""
    method.model.eval()
    method.owned.eval()
    try:
        return method.eval_logits(method.to_input(x_uint8)).float()
    finally:
        method.model.train()
        method.owned.train()


def same_parameters(a, b):
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def assert_masses_equal(metric, diagnostics):
    diagnostics.flush()
    got = metric.result()
    for (kind, source), stats in diagnostics.stats.items():
        for sign, ref in (("pos", stats.positive), ("neg", stats.negative)):
            assert torch.equal(torch.tensor(got[f"{kind}/{source}"][sign], dtype=torch.float64), ref.cpu()), (
                kind,
                source,
                sign,
            )


@pytest.mark.slow
@pytest.mark.parametrize("method", ["derpp", "pcr", "ocm", "onpro"])
def test_plugin_matches_our_learner_and_our_diagnostics(method, tmp_path_factory):
    learner, results, cfg = ours(method, tmp_path_factory)
    metric, logger, evals = GradientMassMetric(every=EVERY), Recorder(), EvalLogits()
    strategy = avalanche_run(learner, cfg, lambda: [host(method, cfg), evals], metric=metric, logger=logger)
    plugin = strategy.plugins[0]
    mine = learner.method
    # the same step on the same batches: parameters, owned heads and memory bit for bit
    assert same_parameters(strategy.model, mine.model)
    assert same_parameters(plugin.method.owned, mine.owned)
    assert torch.equal(plugin.method.buffer.x, mine.buffer.x) and torch.equal(plugin.method.buffer.y, mine.buffer.y)
    # Avalanche's evaluation runs the method's head (PCR: its cosine proxies): the logits our learner evaluates
    strategy.eval(eval_experiences(learner.stream))
    assert len(evals.batches) == 2  # one batch per task's test set
    for t, (x, y, logits) in enumerate(evals.batches):
        assert torch.equal(logits, our_eval_logits(mine, uint8(x)))
        assert 100 * float((logits.argmax(1) == y).float().mean()) == pytest.approx(results["acc_matrix"][-1][t])
    assert strategy.model is plugin.method.model  # the eval head was swapped back
    # the gradient masses of our diagnostics, bit for bit, and the same numbers through Avalanche's logger: at
    # every snapshot of ours (every 3 batches, and task 0's end at batch 5) but the run's end (no next task)
    assert_masses_equal(metric, mine.diagnostics)
    snapshots = {snap["step"]: snap["stats"] for snap in mine.diagnostics.snapshots}
    assert sorted(snapshots) == [3, 5, 6, 9, 10]
    logged = {k: v for k, v in logger.values.items() if k.startswith("diag/")}
    assert logged and {x for v in logged.values() for x in v} == {3, 5, 6, 9}
    for name, values in logged.items():
        _, kind, source, sign, cls = name.split("/")
        for step, value in values.items():
            assert value == snapshots[step][f"{kind}/{source}"][sign][int(cls.removeprefix("class_"))], (name, step)


@pytest.mark.slow
def test_metric_with_gsa_plugin_gives_our_diagnostics(tmp_path_factory):
    """GSAPlugin drives GSA's step, not our method object: the metric hands that step our diagnostics' report."""
    learner, _, cfg = ours("gsa", tmp_path_factory)
    metric = GradientMassMetric(every=EVERY)
    strategy = avalanche_run(
        learner, cfg, lambda: [GSAPlugin(mem_size=MEM, num_classes=10, seed=cfg.seed, **OPTIONS["gsa"])], metric=metric
    )
    assert same_parameters(strategy.model, learner.method.model)  # tests/test_avalanche.py's parity, here too
    assert_masses_equal(metric, learner.method.diagnostics)


# ------------------------------------------------------------------------------------------ Avalanche's SplitMNIST
# Pairs not in increasing order (a plugin sorts a task's classes, our stream keeps the class order's), a 64-64 MLP,
# Split MNIST's batches of 10, and only the first SPLIT_BATCHES mini-batches of the first two experiences.
SPLIT_ORDER = [8, 3, 6, 1, 0, 5, 2, 9, 4, 7]
SPLIT_HIDDEN, SPLIT_BATCH, SPLIT_MEM, SPLIT_BATCHES, SPLIT_TEST = [64, 64], 10, 200, 40, 50
SPLIT_OPTIONS = {
    "derpp": {"replay_batch_size": 10},
    "pcr": {},
    "ocm": {"replay_batch_size": 10, "proj_dim": 32},
    "onpro": {"replay_batch_size": 10, "proj_dim": 32},
}
# each method's optimizer in its conf/experiment/ protocol (Adam's and AdamW's state carries across Avalanche's
# train() calls; OCM with SGD at lr 0.1 blows up on this MLP within task 1, in our learner as in Avalanche)
SPLIT_OPTIMIZERS = {
    "derpp": {"optimizer": "adamw", "optimizer.lr": 0.0005, "optimizer.weight_decay": 0.0001},
    "pcr": {"optimizer": "sgd", "optimizer.lr": 0.1},
    "ocm": {
        "optimizer": "adam",
        "optimizer.lr": 0.001,
        "optimizer.betas": [0.9, 0.99],
        "optimizer.weight_decay": 0.0001,
    },
    "onpro": {
        "optimizer": "adam",
        "optimizer.lr": 0.0005,
        "optimizer.betas": [0.9, 0.99],
        "optimizer.weight_decay": 0.0001,
    },
}
_SPLIT_MNIST: dict = {}


def split_mnist(root: Path):
    """Avalanche's SplitMNIST (5 experiences, SPLIT_ORDER, [0, 1] inputs) from the offline files, made once."""
    if root not in _SPLIT_MNIST:
        _SPLIT_MNIST[root] = classic_benchmark("mnist", root, SPLIT_ORDER, 5, 0)
    return _SPLIT_MNIST[root]


def split_mnist_config(method, root, addon=None):
    cfg = {
        "dataset": "mnist",
        "dataset.root": str(root),
        "dataset.download": False,
        "model": "mlp",
        "model.hidden": SPLIT_HIDDEN,
        "method": method,
        "stream.n_tasks": 5,
        "stream.class_order": SPLIT_ORDER,
        "stream.batch_size": SPLIT_BATCH,
        "buffer.size": SPLIT_MEM,
        "eval.anytime_every": 0,
        "eval.classes": "all",
        "log.progress": False,
        "threads": 1,
        "compute.flops": False,
        "checkpoint.at_task_end": False,
        **SPLIT_OPTIMIZERS[method],
        **{f"method.{k}": v for k, v in SPLIT_OPTIONS[method].items()},
    }
    return {**cfg, "addon": addon} if addon else cfg


class TrainBatches(SupervisedPlugin):
    """The (inputs, labels) of every training mini-batch, as Avalanche's loader made them."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def before_forward(self, strategy, **kwargs):
        self.batches.append((strategy.mb_x.clone(), strategy.mb_y.clone()))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("method", "addon"), [("derpp", None), ("pcr", None), ("ocm", None), ("onpro", None), ("derpp", "ccl_dc")]
)
def test_plugins_match_our_learner_on_avalanche_splitmnist(method, addon, shared_data, tmp_path):
    """Avalanche's SplitMNIST through its public APIs, streamed online: each experience split by
    `split_online_stream` (shuffled, seeded), the strategy stopped after SPLIT_BATCHES sub-experiences of each of
    the first two; the task-free plugins (DER++, PCR, CCL-DC) on a stream without boundaries, OCM and OnPro (which
    read the task) with them. Our learner then trains on those very mini-batches, task by task: the model (and
    CCL-DC's peer), the owned heads, the memory and the evaluation logits on a fixed test slice, bit for bit."""
    bench = split_mnist(shared_data)
    run_cfg = split_mnist_config(method, shared_data, addon)
    cfg = api.config(run_cfg)
    shape = (1, 28, 28)
    # Avalanche: our builder's order (the seed, the model, then the method's plugin; CCL-DC's peer from seed + 7)
    torch.manual_seed(cfg.seed)
    model = build_model("mlp", shape, 10, hidden=tuple(SPLIT_HIDDEN))
    plugins = [PLUGINS[method](mem_size=SPLIT_MEM, seed=cfg.seed, **SPLIT_OPTIONS[method])]
    if addon:
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed + 7)
            plugins.append(CCLDCPlugin(build_model("mlp", shape, 10, hidden=tuple(SPLIT_HIDDEN))))
    train, evals = TrainBatches(), EvalLogits()
    strategy = Naive(
        model=model,
        optimizer=build_optimizer(cfg, model.parameters()),
        train_mb_size=SPLIT_BATCH,
        eval_mb_size=1000,
        plugins=[*plugins, train, evals],
        evaluator=EvaluationPlugin(loggers=[]),
    )
    boundaries = method in ("ocm", "onpro")
    tasks = []
    for task, exp in enumerate(bench.train_stream[:2]):
        subs = split_online_stream([exp], SPLIT_BATCH, shuffle=True, seed=cfg.seed, access_task_boundaries=boundaries)
        for sub in itertools.islice(subs, SPLIT_BATCHES):
            strategy.train(sub)
        assert sorted(exp.classes_in_this_experience) == sorted(SPLIT_ORDER[2 * task : 2 * task + 2])
        tasks += [task] * (len(train.batches) - len(tasks))
    plugin = strategy.plugins[0]
    assert len(train.batches) == 2 * SPLIT_BATCHES and plugin.step == 2 * SPLIT_BATCHES
    assert plugin.task == (1 if boundaries else None)
    # a fixed test slice: the first SPLIT_TEST samples of each test experience (every class)
    strategy.eval([next(iter(split_online_stream([e], SPLIT_TEST, shuffle=False))) for e in bench.test_stream])
    assert [len(y) for _, y, _ in evals.batches] == [SPLIT_TEST] * 5

    # our learner, built as the runner builds it, on the same mini-batches (uint8, as our stream holds them)
    with api.build(run_cfg, out_dir=tmp_path / "ours") as learner:
        assert [t.classes.tolist() for t in learner.stream.tasks[:2]] == [SPLIT_ORDER[:2], SPLIT_ORDER[2:4]]
        for step, ((x, y), task) in enumerate(zip(train.batches, tasks, strict=True)):
            in_task = step - tasks.index(task)
            learner.train_batch(Batch(x=uint8(x), y=y, y_host=y.cpu(), task=task, step=step, step_in_task=in_task))
        mine = learner.method
        assert all(bool(p.isfinite().all()) for p in mine.model.parameters())  # a run that trained, not one gone NaN
        assert same_parameters(strategy.model, mine.model)
        assert same_parameters(plugin.method.owned, mine.owned)
        assert torch.equal(plugin.method.buffer.x, mine.buffer.x) and torch.equal(plugin.method.buffer.y, mine.buffer.y)
        if addon:
            assert same_parameters(strategy.plugins[1].peer.model, mine.addons[0].peer.model)
        for x, _, logits in evals.batches:
            assert torch.equal(logits, our_eval_logits(mine, uint8(x)))


def with_peer(method, cfg):
    """The method's plugin and CCL-DC's, the peer made as our builder makes it."""
    return [host(method, cfg), CCLDCPlugin(fresh_model(cfg, seed_offset=7))]


@pytest.mark.slow
@pytest.mark.parametrize(("method", "addon"), [("derpp", None), ("pcr", None), ("derpp", "ccl_dc")])
def test_task_free_plugins_run_without_boundaries(method, addon, tmp_path_factory):
    learner, _, cfg = ours(method, tmp_path_factory, addon=addon)
    plugins = (lambda: with_peer(method, cfg)) if addon else (lambda: [host(method, cfg)])
    strategy = avalanche_run(learner, cfg, plugins, boundaries=False)
    # DER++, PCR and CCL-DC never read the task: the same run as our learner's, which had the boundaries
    assert strategy.plugins[0].task is None
    assert same_parameters(strategy.model, learner.method.model)
    if addon:
        assert same_parameters(strategy.plugins[1].peer.model, learner.method.addons[0].peer.model)


@pytest.mark.parametrize("plugin_class", [OCMPlugin, OnProPlugin])
def test_boundary_methods_refuse_a_stream_without_boundaries(plugin_class):
    cfg = api.config(run_config("ocm"))
    plugin = plugin_class(mem_size=MEM, proj_dim=16, replay_batch_size=8)
    model = fresh_model(cfg)
    strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), plugins=[plugin])
    exp = tiny_experience()
    with pytest.raises(ConfigError, match=r"needs task boundaries.*access_task_boundaries=True"):
        strategy.train(next(iter(split_online_stream([exp], BATCH, access_task_boundaries=False))))


def tiny_experience(n=8, scale=1.0):
    """One experience of n random 8x8 images of classes 0 and 1 (alternating)."""
    x = torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * scale
    return class_incremental_benchmark({"train": Labelled(x, torch.arange(n) % 2)}, num_experiences=1).train_stream[0]


@pytest.mark.slow
def test_ccl_dc_plugin_matches_our_learner(tmp_path_factory):
    learner, results, cfg = ours("derpp", tmp_path_factory, addon="ccl_dc")
    metric, evals = GradientMassMetric(every=EVERY), EvalLogits()
    strategy = avalanche_run(learner, cfg, lambda: [*with_peer("derpp", cfg), evals], metric=metric)
    ccl = strategy.plugins[1]
    mine = learner.method
    peer = mine.addons[0].peer
    # both learners step as ours: the run's model and CCL-DC's peer, bit for bit
    assert same_parameters(strategy.model, mine.model)
    assert same_parameters(ccl.peer.model, peer.model)
    # Avalanche evaluates the ensemble head (the mean of the two peers' logits), as our learner does
    strategy.eval(eval_experiences(learner.stream))
    for x, _, logits in evals.batches:
        assert torch.equal(logits, our_eval_logits(mine, uint8(x)))
        with torch.no_grad():
            student = strategy.model.eval()(x)
        assert not torch.equal(logits, student)  # not the student alone
    strategy.model.train()
    # CCL-DC's cross-entropy terms reach the diagnostics as they do in our learner
    assert_masses_equal(metric, mine.diagnostics)
    assert set(ccl.log_values()) == {"ccl_dc/ce", "ccl_dc/kd", "ccl_dc/peer_ce", "ccl_dc/peer_kd"}


@pytest.mark.parametrize(
    "optimizer",
    [
        lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
        lambda p: torch.optim.Adam(p, lr=1e-3, betas=(0.9, 0.99), weight_decay=1e-4),
        lambda p: torch.optim.AdamW(p, lr=5e-4, weight_decay=1e-4),  # its defaults hold decoupled_weight_decay
    ],
    ids=["sgd", "adam", "adamw"],
)
def test_ccl_dc_peer_gets_the_strategy_optimizer_settings(optimizer):
    cfg = api.config(run_config("derpp"))
    model, peer_model = fresh_model(cfg), fresh_model(cfg, seed_offset=7)
    strategy = Naive(
        model=model,
        optimizer=optimizer(model.parameters()),
        train_mb_size=BATCH,
        plugins=[DERPPPlugin(mem_size=MEM, replay_batch_size=8), ccl := CCLDCPlugin(peer_model)],
    )
    strategy.train(next(iter(split_online_stream([tiny_experience()], BATCH))))
    peer_optimizer = ccl.peer.optimizer
    assert type(peer_optimizer) is type(strategy.optimizer) and peer_optimizer.defaults == strategy.optimizer.defaults
    assert [p for g in peer_optimizer.param_groups for p in g["params"]] == list(peer_model.parameters())


def test_ccl_dc_needs_one_of_our_methods():
    model = fresh_model(api.config(run_config("derpp")))
    for extra, hint in (
        ([ReplayPlugin(mem_size=20)], "needs one of our method plugins"),
        ([GSAPlugin(mem_size=20, num_classes=10)], r"MethodPlugin\('gsa'"),
    ):
        strategy = Naive(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            plugins=[*extra, CCLDCPlugin(fresh_model(api.config(run_config("derpp")), 7))],
        )
        with pytest.raises(ConfigError, match=hint):
            strategy.train(tiny_experience())
    with pytest.raises(ConfigError, match="bogus"):
        CCLDCPlugin(model, bogus=1)


class StepRecorder(SupervisedPlugin):
    """Logits, labels and inputs of every training iteration, and the incoming rows of the experience."""

    def __init__(self):
        super().__init__()
        self.steps = []

    def before_backward(self, strategy, **kwargs):
        incoming = torch.stack([strategy.experience.dataset[i][0] for i in range(len(strategy.experience.dataset))])
        new = (strategy.mb_x[:, None] == incoming[None]).flatten(2).all(2).any(1)
        self.steps.append((strategy.mb_output.detach().clone(), strategy.mb_y.clone(), new))


def test_metric_on_any_strategy_splits_new_and_replay_rows():
    """Avalanche's own ER (Naive + ReplayPlugin): the gradient caught from its backward and its rows' split."""
    stream = [tiny_experience(16), tiny_experience(16, 0.5)]
    model = fresh_model(api.config(run_config("derpp")))
    metric, recorder = GradientMassMetric(every=3), StepRecorder()
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=BATCH,
        plugins=[ReplayPlugin(mem_size=20, batch_size=BATCH, batch_size_mem=BATCH), recorder],
        evaluator=EvaluationPlugin(metric),
    )
    for exp in stream:
        for sub in split_online_stream([exp], BATCH):
            strategy.train(sub)
    ref = {(k, s): GradientStats() for k in ("mass", "effective") for s in ("new", "replay")}
    replayed = 0
    for logits, y, new in recorder.steps:
        for source, rows in (("new", new), ("replay", ~new)):
            if rows.any():
                ref["mass", source].update(logits[rows], y[rows])  # Avalanche's CE: softmax over every unit
                coef = torch.full((int(rows.sum()),), 1.0 / len(y))  # its mean over the mini-batch's rows
                ref["effective", source].update(logits[rows], y[rows], row_weights=coef)
        replayed += int((~new).sum())
    assert replayed > 0 and len(recorder.steps) == 8
    got = metric.result()
    for (kind, source), st in ref.items():
        for sign, value in (("pos", st.positive), ("neg", st.negative)):
            mine = torch.tensor(got[f"{kind}/{source}"][sign], dtype=torch.float64)
            if kind == "mass":  # the same calls on the same logits
                assert torch.equal(mine, value)
            else:  # from autograd's float32 gradient against the float64 formula
                torch.testing.assert_close(mine, value, rtol=1e-6, atol=1e-9)


def test_plugin_options_and_inputs_are_checked():
    with pytest.raises(ConfigError, match=r"bogus.*its options are"):
        DERPPPlugin(bogus=1)
    with pytest.raises(ConfigError, match="iters"):
        PCRPlugin(iters=2)
    with pytest.raises(ConfigError, match="eval_classes"):
        DERPPPlugin(eval_classes="some")
    with pytest.raises(ConfigError, match=r"mem_size=10\) is smaller than replay_batch_size=64"):
        DERPPPlugin(mem_size=10)
    with pytest.raises(ConfigError, match="method.name='nope' is unknown"):
        MethodPlugin("nope")
    cfg = api.config(run_config("derpp"))

    def train(plugin, model, exp):
        strategy = Naive(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), plugins=plugin)
        strategy.train(next(iter(split_online_stream([exp], BATCH))))

    # normalised inputs: the fix is to normalise in the plugin
    with pytest.raises(ConfigError, match=r"\[0, 1\].*normalize=\(mean, std\)"):
        train([DERPPPlugin(mem_size=MEM, replay_batch_size=8)], fresh_model(cfg), tiny_experience(8, 3.0))
    # PCR reads features and the head's weights
    plain = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    with pytest.raises(ConfigError, match=r"features\(x\) and a linear `head`"):
        train([PCRPlugin(mem_size=MEM)], plain, tiny_experience())
    # MKDPlugin distils strategy.model's outputs: it cannot stack on PCR's cosine head
    with pytest.raises(ConfigError, match="MKDPlugin cannot stack"):
        train([PCRPlugin(mem_size=MEM), MKDPlugin()], fresh_model(cfg), tiny_experience())
    # two plugins that each replace the loss
    with pytest.raises(ConfigError, match="keep one"):
        train(
            [DERPPPlugin(mem_size=MEM, replay_batch_size=8), GSAPlugin(mem_size=MEM)],
            fresh_model(cfg),
            tiny_experience(),
        )


class LossProbe(SupervisedPlugin):
    """strategy.loss as it reaches the backward, and MKDPlugin's KD term of the same step."""

    def __init__(self, mkd=None):
        super().__init__()
        self.mkd, self.steps = mkd, []

    def before_backward(self, strategy, **kwargs):
        kd = float(self.mkd.last["kd"]) if self.mkd is not None else 0.0
        self.steps.append((float(strategy.loss.detach()), kd))


def test_mkd_plugin_adds_to_a_method_plugin_loss():
    """MKDPlugin composes with DERPPPlugin as with GSAPlugin: after it in the list, its KD term joins DER++'s loss."""
    cfg = api.config(run_config("derpp"))
    steps = {}
    for with_mkd in (False, True):
        model = fresh_model(cfg)
        mkd = MKDPlugin() if with_mkd else None
        probe = LossProbe(mkd)
        plugins = [DERPPPlugin(mem_size=MEM, replay_batch_size=8), *([mkd] if mkd else []), probe]
        strategy = Naive(
            model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), train_mb_size=8, plugins=plugins
        )
        strategy.train(next(iter(split_online_stream([tiny_experience()], 8))))  # one batch of both classes
        steps[with_mkd] = probe.steps
    (plain, _), (with_kd, kd) = steps[False][0], steps[True][0]  # the first step: same model, same batch
    assert kd > 0 and with_kd == pytest.approx(plain + 5.5 * kd, rel=1e-6)  # kd_lambda 5.5


class FailingEvaluation(SupervisedPlugin):
    """Raises at the first evaluation forward pass (after the plugins have swapped their heads in)."""

    def before_eval_forward(self, strategy, **kwargs):
        self.model_then = strategy.model
        raise RuntimeError("evaluation failed")


@pytest.mark.parametrize("kind", ["pcr", "mkd"])
def test_an_evaluation_that_raises_gets_the_model_back_at_the_next_call(kind):
    """Avalanche calls no plugin when evaluation raises: the head stays strategy.model until the next train() or
    eval(), whose first callback puts the trained model (and the head's mode) back before anything runs."""
    cfg = api.config(run_config("pcr" if kind == "pcr" else "derpp"))
    model = fresh_model(cfg)
    if kind == "pcr":  # PCR evaluates with its proxies (MethodPlugin's EvalHead)
        plugin: SupervisedPlugin = PCRPlugin(mem_size=MEM, replay_batch_size=8)
        plugins = [plugin]
    else:  # MKD evaluates with its teacher
        plugin = MKDPlugin()
        plugins = [DERPPPlugin(mem_size=MEM, replay_batch_size=8), plugin]
    failing = FailingEvaluation()
    strategy = Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=8,
        eval_mb_size=8,
        plugins=[*plugins, failing],
    )
    experience = next(iter(split_online_stream([tiny_experience()], 8)))
    strategy.train(experience)
    with pytest.raises(RuntimeError, match="evaluation failed"):
        strategy.eval([experience])
    head = failing.model_then
    assert head is not model and strategy.model is head and not head.training  # left swapped in by the failure
    before = [p.detach().clone() for p in model.parameters()]
    strategy.train(experience)
    assert strategy.model is model
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # it trained


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


@pytest.mark.slow
def test_docs_examples_run(capsys):
    """docs/avalanche.md's examples run as written (one per plugin, a few hundred samples each)."""
    blocks = python_blocks(REPO / "docs" / "avalanche.md")
    assert len(blocks) >= 6  # the setup, then GSA, MKD, our methods, CCL-DC, the metric
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/avalanche.md", "exec"), namespace)
    out = capsys.readouterr().out
    for name in ("GSAPlugin", "MKDPlugin", "DERPPPlugin", "PCRPlugin", "OCMPlugin", "OnProPlugin", "CCLDCPlugin"):
        assert f"{name}: accuracy" in out, name
    assert "diag/mass/replay/pos/class_" in out
