"""cil.avalanche: GSAPlugin inside real Avalanche strategies, and Avalanche strategies as peers through our CLI.

Small data only: sklearn's digits (1,797 8x8 images) as an Avalanche benchmark with a permuted class order.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_resume import run_here
from torch import nn

pytest.importorskip("avalanche")

from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.scenarios.online import split_online_stream
from avalanche.benchmarks.scenarios.supervised import with_classes_timeline
from avalanche.benchmarks.utils.classification_dataset import (
    _make_taskaware_tensor_classification_dataset as tensor_dataset,
)
from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
from avalanche.core import SupervisedPlugin
from avalanche.models import IncrementalClassifier
from avalanche.training import Naive

from cil.avalanche import GSAPlugin
from cil.core.data import load_dataset
from cil.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
ORDER = [[7, 3], [9, 1], [5, 0]]  # permuted, non-contiguous labels in every task


def avalanche_digits(per_task: int) -> list:
    """An Avalanche benchmark of three digits tasks in a permuted class order (classes_in_this_experience set),
    `per_task` seeded samples each (also used by tests/test_avalanche_mkd.py and tests/test_taskfree_gsa.py)."""
    d = load_dataset("digits", None)
    x, y = d.train_x.float().div(255), d.train_y.long()
    g = torch.Generator().manual_seed(0)
    datasets = []
    for classes in ORDER:
        idx = torch.nonzero(torch.isin(y, torch.tensor(classes))).squeeze(1)
        idx = idx[torch.randperm(len(idx), generator=g)][:per_task]
        datasets.append(tensor_dataset(x[idx], y[idx], task_labels=0, targets=y[idx].tolist()))
    return list(with_classes_timeline(benchmark_from_datasets(train=datasets)).train_stream)


@pytest.fixture(scope="module")
def digits_stream():
    return avalanche_digits(200)


def mlp(out=10):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, out))


def naive(model, *plugins):
    return Naive(
        model=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_mb_size=10,
        plugins=list(plugins),
        evaluator=None,
    )


class LossRecorder(SupervisedPlugin):
    """Records the loss the strategy backpropagates and the plain cross-entropy it would have used."""

    def __init__(self):
        super().__init__()
        self.pairs = []

    def after_backward(self, strategy, **kwargs):
        ce = nn.functional.cross_entropy(strategy.mb_output, strategy.mb_y)
        self.pairs.append((float(strategy.loss.detach()), float(ce.detach())))


def train_online(strategy, exp, boundaries=True):
    for sub in split_online_stream([exp], experience_size=10, shuffle=False, access_task_boundaries=boundaries):
        strategy.train(sub, shuffle=False)  # same in-batch order for both runs of the checkpoint test


def test_plugin_online_permuted_classes_stats_and_weights_evolve(digits_stream):
    model = mlp()
    gsa = GSAPlugin(mem_size=100, num_classes=10, warmup_batches=2)
    recorder = LossRecorder()
    strategy = naive(model, gsa, recorder)
    w0 = [p.detach().clone() for p in model.parameters()]
    weights_after = []
    for t, exp in enumerate(digits_stream):
        train_online(strategy, exp)
        seen = sorted(c for task in ORDER[: t + 1] for c in task)
        # statistics are keyed by the real labels: exactly the seen labels carry mass
        has_mass = (gsa.stats.positive > 0).nonzero().squeeze(1).tolist()
        if t > 0:  # task 0 has no replay step (the buffer is empty on its first batch only; later batches replay)
            assert has_mass == seen
        assert gsa.summary()["classes"] == seen
        assert sorted(gsa.classes.task_labels) == sorted(ORDER[t])
        assert set(gsa.buffer.class_counts()) <= set(seen)
        weights_after.append(gsa.weights.clone())
    unseen = [c for c in range(10) if c not in sum(ORDER, [])]
    assert torch.all(gsa.stats.positive[unseen] == 0) and torch.all(gsa.stats.negative[unseen] == 0)
    w = weights_after[-1]
    assert not torch.allclose(w[[7, 3, 9, 1, 5, 0]], torch.ones(6)), "adaptive weights never left 1"
    assert not torch.equal(weights_after[1], weights_after[2]), "weights did not evolve between tasks"
    assert all((w > 0) & (w < 2))
    assert any(not torch.equal(a, b) for a, b in zip(w0, model.parameters(), strict=True))
    # the loss Avalanche backpropagated was GSA's, not the strategy's cross-entropy, on every mini-batch
    assert len(recorder.pairs) == 60
    assert all(abs(loss - ce) > 1e-6 for loss, ce in recorder.pairs)


def test_plugin_classic_stream_with_incremental_classifier(digits_stream):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), IncrementalClassifier(64, 1))
    gsa = GSAPlugin(mem_size=60, augment=False, two_views=False, warmup_batches=0)  # num_classes grows
    strategy = naive(model, gsa)
    for exp in digits_stream[:2]:
        strategy.train(exp)  # a classic experience: 20 mini-batches of 10, one epoch
    assert model[-1].classifier.out_features == 10  # grown to label 9 + 1 by Avalanche
    assert gsa.classes.num_classes == 10
    assert (gsa.stats.positive > 0).nonzero().squeeze(1).tolist() == [1, 3, 7, 9]
    assert gsa.weights[[1, 9]].ne(1).all()  # second task, past warm-up: adaptive weights in use
    assert len(gsa.buffer) == 60 and gsa.buffer.n_seen == 400


def test_plugin_state_survives_avalanche_checkpoint(digits_stream, tmp_path):
    gsa = GSAPlugin(mem_size=50, num_classes=10)
    strategy = naive(mlp(), gsa)
    train_online(strategy, digits_stream[0])
    train_online(strategy, digits_stream[1])
    # Avalanche 0.6 cannot pickle a torch 2.x optimizer with dill (typing_extensions.sentinel; docs/avalanche.md):
    # the optimizer is left out and rebuilt, which loses nothing for plain SGD (it has no state).
    save_checkpoint(strategy, tmp_path / "ckpt.pkl", exclude=["optimizer"])
    fresh = GSAPlugin(mem_size=50, num_classes=10)
    restored, _ = maybe_load_checkpoint(naive(mlp(), fresh), tmp_path / "ckpt.pkl")
    restored.optimizer = torch.optim.SGD(restored.model.parameters(), lr=0.1)
    plugin = [p for p in restored.plugins if isinstance(p, GSAPlugin)][0]
    assert plugin.task == 1 and plugin.step_in_task == gsa.step_in_task
    # continue both on the same next task: identical statistics, buffer and weights (state fully restored)
    train_online(strategy, digits_stream[2])
    train_online(restored, digits_stream[2])
    assert torch.equal(plugin.stats.positive, gsa.stats.positive)
    assert torch.equal(plugin.stats.negative, gsa.stats.negative)
    assert torch.equal(plugin.buffer.y, gsa.buffer.y) and torch.equal(plugin.buffer.x, gsa.buffer.x)
    assert torch.equal(plugin.weights, gsa.weights)


def test_plugin_known_options_and_one_kind_of_stream(digits_stream):
    with pytest.raises(ConfigError, match="bogus"):
        GSAPlugin(bogus=1)
    # without boundaries the plugin falls back to the task-free GSA (tests/test_taskfree_gsa.py); a stream that
    # stops granting them after the task-aware step was built is refused
    strategy = naive(mlp(), GSAPlugin(mem_size=50, num_classes=10))
    train_online(strategy, digits_stream[0])
    with pytest.raises(ConfigError, match="task_free=True"):
        train_online(strategy, digits_stream[1], boundaries=False)


def cli(tmp_path, name, *args):
    """`python -m cil` in this process (test_resume.run_here): Avalanche is already imported here."""
    run_dir = tmp_path / name
    args = ("dataset=digits", "log.progress=false", "eval.anytime_every=50", "buffer.size=100", *args)
    proc = run_here(run_dir, list(args))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
def test_avalanche_peers_through_cli(tmp_path):
    er_ace = cli(tmp_path, "er_ace", "method=avalanche_er_ace")
    lwf = cli(tmp_path, "lwf", "method=avalanche_lwf", "method.params.alpha=0.5")
    for res, strategy, mode in ((er_ace, "ER_ACE", "online"), (lwf, "LwF", "task")):
        assert res["status"] == "complete"
        assert res["avalanche"]["strategy"] == strategy and res["avalanche"]["mode"] == mode
        assert len(res["acc_matrix"]) == 5 and all(len(r) == 5 for r in res["acc_matrix"])
        assert res["samples_per_s"] > 0 and res["stream_samples"] == er_ace["stream_samples"] > 1000
    assert lwf["avalanche"]["params"] == {"alpha": 0.5, "temperature": 2.0}
    # the training loss is read where Avalanche computes it (it resets strategy.loss when train() ends)
    losses = [
        float(row.split(",")[3])
        for row in (tmp_path / "er_ace" / "metrics.csv").read_text().splitlines()
        if row.split(",")[2] == "loss"
    ]
    assert losses and all(0 < v < 100 for v in losses)
    # ER-ACE keeps old tasks alive; LwF (no memory) in class-incremental mostly does not
    assert er_ace["final_avg_acc"] > 55 and er_ace["final_avg_acc"] > lwf["final_avg_acc"] + 15


@pytest.mark.slow
def test_gsa_plugin_matches_our_learner_on_the_same_stream(tmp_path):
    ours = cli(tmp_path, "gsa", "method=gsa")
    plugin = cli(tmp_path, "avalanche_gsa", "method=avalanche_gsa")
    # same batches, same seeds, same model: the plugin inside Avalanche's Naive reproduces our learner exactly
    assert plugin["acc_matrix"] == ours["acc_matrix"]
    assert plugin["gsa"] == ours["gsa"]


def test_unknown_peer_or_knob_is_one_clear_error():
    from cil.avalanche.peers import strategy_params
    from cil.run.config import default_config

    cfg = default_config("avalanche_der")
    cfg.method.name = "avalanche_nope"
    with pytest.raises(ConfigError, match="avalanche_nope"):
        strategy_params(cfg)
    cfg.method.name, cfg.method.params = "avalanche_der", {"alpha": 0.3, "bogus": 1}
    with pytest.raises(ConfigError, match="bogus"):
        strategy_params(cfg)
    cfg.method.params = {"alpha": 0.3}
    assert strategy_params(cfg) == {"alpha": 0.3, "beta": 0.5}


@pytest.mark.slow
def test_core_does_not_import_avalanche():
    code = (
        "import sys, cil, cil.run.experiment, cil.core.learner, cil.core.methods, cil.run.config; "
        "print(sorted(m for m in ('avalanche', 'hydra') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
