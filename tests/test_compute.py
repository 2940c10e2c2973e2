"""Compute accounting and the real-time mode (cil/core/compute.py, cil/run/realtime.py, docs/compute.md): the FLOP
counter against a hand count, counting changes nothing, the real-time schedule trains and stores exactly the
scheduled batches and predicts all of them, delay 1 is a normal run, and a killed real-time run resumes bit for bit."""

import json
import signal

import pytest
import torch
from test_resume import TIMINGS, checkpoint_step, cli, run_here

from cil.core.buffer import ReplayBuffer
from cil.core.compute import count_flops, delay_from_flops
from cil.core.data.stream import Batch
from cil.core.methods.base import Method
from cil.core.methods.er import ER, ERConfig
from cil.core.models.mlp import MLP
from cil.errors import ConfigError
from cil.run.config import default_config, validate
from cil.run.experiment import build_learner, run_experiment

IGNORED = TIMINGS | {"config", "flops", "realtime"}


def cfg(method="er", **over):
    c = default_config(method)
    c.dataset.name, c.log.progress, c.log.every, c.buffer.size, c.threads = "digits", False, 15, 100, 1
    c.eval.anytime_every = 20
    for key, value in over.items():
        group, name = key.split("__")
        setattr(getattr(c, group), name, value)
    return c


def same(a: dict, b: dict) -> dict:
    return {k: v for k, v in a.items() if k not in IGNORED} == {k: v for k, v in b.items() if k not in IGNORED}


def test_er_step_flops_match_a_hand_count():
    """ER on the MLP 784-400-400-10, 10 incoming + 10 replayed rows (B = 20). The counter counts matrix products
    only (addmm/mm here; ReLU, cross-entropy, the SGD update are not counted):
      forward: one addmm per layer, 2*B*in*out each                      -> 2B(784*400 + 400*400 + 400*10)
      backward: grad of each weight, an mm of 2*B*in*out                  -> 2B(784*400 + 400*400 + 400*10)
                grad of each layer's input, 2*B*in*out, except the first layer's (the images need no gradient,
                autograd skips it)                                        -> 2B(400*400 + 400*10)."""
    torch.manual_seed(0)
    model = MLP((1, 28, 28), 10, (400, 400))
    buffer = ReplayBuffer(50, (1, 28, 28))
    buffer.add(torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8), torch.arange(20) % 10, 0)
    method = ER(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        buffer,
        ERConfig(replay_batch_size=10),
        10,
        torch.device("cpu"),
    )
    y = torch.arange(10)
    batch = Batch(torch.randint(0, 256, (10, 1, 28, 28), dtype=torch.uint8), y, y.clone(), 0, 0, 0)
    _, flops = count_flops(lambda: method.observe(batch))
    b, layers = 20, 784 * 400 + 400 * 400 + 400 * 10
    assert flops == 2 * b * layers + 2 * b * layers + 2 * b * (400 * 400 + 400 * 10) == 44_768_000
    assert delay_from_flops(3 * flops + 1, flops) == 4 and delay_from_flops(flops, flops) == 1
    assert delay_from_flops(flops // 2, flops) == 1  # a cheaper method keeps up with the stream


@pytest.mark.slow
def test_counting_flops_on_every_step_changes_no_result(tmp_path):
    counted = run_experiment(cfg(compute__flops_every=1), tmp_path / "on")
    plain = run_experiment(cfg(compute__flops=False), tmp_path / "off")
    assert same(counted, plain)
    assert plain["flops"] is None
    f = counted["flops"]
    assert f["measured_steps"] == counted["stream_batches"] and f["per_step"] > 0
    assert f["total"] == pytest.approx(f["per_step"] * counted["stream_batches"])
    assert f["per_sample"] == pytest.approx(f["total"] / counted["stream_samples"])
    # digits (64 inputs): B = 20 but on the first step (empty buffer) and the short last batch of each task
    full = 2 * 20 * (2 * (64 * 400 + 400 * 400 + 400 * 10) + 400 * 400 + 400 * 10)
    assert 0.95 * full < f["per_step"] < full


def test_realtime_delay_3_trains_and_stores_every_third_batch_and_predicts_all(tmp_path, monkeypatch):
    trained, stored = [], []
    observe, remember = Method.observe, Method.remember
    monkeypatch.setattr(Method, "observe", lambda self, batch: trained.append(batch.step) or observe(self, batch))
    monkeypatch.setattr(
        Method, "remember", lambda self, batch, out: stored.append(len(batch.y)) or remember(self, batch, out)
    )
    learner = build_learner(cfg(realtime__enabled=True, realtime__delay=3), tmp_path)
    res = learner.run()
    n = len(learner.stream)
    assert trained == list(range(0, n, 3))
    assert learner.method.buffer.n_seen == sum(stored) == 10 * len(trained)  # digits: full batches of 10 here
    assert learner.online_seen == learner.stream.n_samples  # every batch is predicted
    assert res["realtime"] == {
        "reference": "er",
        "delay_source": "set",
        "delay": 3,
        "trained_batches": len(trained),
        "skipped_batches": n - len(trained),
    }
    assert len(res["acc_matrix"]) == 5  # evaluations at the same stream positions as a normal run
    assert [p["step"] for p in res["anytime_curve"]] == [
        p["step"] for p in run_experiment(cfg(), tmp_path / "normal")["anytime_curve"]
    ]


def test_skipped_batches_are_predicted_by_the_model_before_the_training_step(tmp_path):
    """Online accuracy of a skipped batch: the model before the step that was training when it arrived."""
    learner = build_learner(cfg(realtime__enabled=True, realtime__delay=3), tmp_path)
    batches = list(learner.stream.batches())
    before = learner._online_logits(batches[1].x)
    learner.train_batch(batches[0], batches[1:3])
    pending = learner._pending
    assert len(pending) == 3 and pending[1][0] is None and pending[2][0] is None
    assert torch.equal(pending[1][1], before)
    assert not torch.equal(learner._online_logits(batches[1].x), before)  # the step did change the model


def test_measured_delay_and_delay_1_is_a_normal_run(tmp_path):
    normal = run_experiment(cfg("er_ace"), tmp_path / "normal")
    one = run_experiment(cfg("er_ace", realtime__enabled=True, realtime__delay=1), tmp_path / "one")
    assert same(one, normal) and one["realtime"]["skipped_batches"] == 0 and normal["realtime"] is None
    measured = run_experiment(cfg("er_ace", realtime__enabled=True), tmp_path / "measured")
    rt = measured["realtime"]
    assert rt["delay_source"] == "measured" and rt["reference_flops_per_step"] > 0
    assert rt["delay"] == delay_from_flops(round(rt["method_flops_per_step"]), round(rt["reference_flops_per_step"]))
    assert same(measured, normal) == (rt["delay"] == 1)  # the probe leaves the run's own RNG untouched


@pytest.mark.slow
def test_realtime_run_resumes_bit_for_bit_after_sigkill(tmp_path):
    # checkpoints every 10 batches fall between a training step and its skipped batches (delay 3)
    args = [
        "dataset=digits",
        "log.progress=false",
        "log.every=15",
        "eval.anytime_every=20",
        "checkpoint.every=10",
        "buffer.size=100",
        "realtime.enabled=true",
        "realtime.delay=3",
        "threads=1",
    ]
    ref_dir, run_dir = tmp_path / "ref" / "run", tmp_path / "killed" / "run"
    ref_dir.parent.mkdir()
    run_dir.parent.mkdir()
    assert run_here(ref_dir, args).returncode == 0
    proc = cli(run_dir, args, "batch:17:KILL")  # the 17th training step: stream batch 48
    assert proc.returncode == -signal.SIGKILL
    assert checkpoint_step(run_dir) % 3 != 0  # resumed between a training step and its skipped batches
    proc = run_here(run_dir, args)
    assert proc.returncode == 0, proc.stderr
    ref, mine = (json.loads((d / "results.json").read_text()) for d in (ref_dir, run_dir))
    assert {k: v for k, v in mine.items() if k not in TIMINGS} == {k: v for k, v in ref.items() if k not in TIMINGS}
    assert (run_dir / "metrics.csv").read_bytes() == (ref_dir / "metrics.csv").read_bytes()


@pytest.mark.parametrize(
    "over, key",
    [
        ({"realtime__enabled": True, "realtime__delay": 0}, "realtime.delay"),
        ({"realtime__enabled": True, "realtime__reference": "nope"}, "realtime.reference"),
        ({"compute__flops_every": 0}, "compute.flops_every"),
    ],
)
def test_bad_keys_one_clear_error(over, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg(**over))
