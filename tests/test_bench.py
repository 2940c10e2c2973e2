"""The benchmark command end to end on a tiny stream (no timing is asserted), and the loop's speed changes:
they must not change what a run computes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cil.core.data.stream import ClassIncrementalStream
from cil.core.objectives.common import mask_logits
from cil.errors import ConfigError
from cil.run.bench.contestants import OURS, final_accuracy, run_ours
from cil.run.bench.workloads import shorten_stream, workload_config, workload_dataset
from cil.run.config import validate
from cil.run.experiment import build_learner

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_smoke_writes_json_with_expected_keys(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        "-m",
        "cil",
        "bench",
        "--workloads",
        "digits",
        "--contestants",
        "er",
        "--batches-per-task",
        "3",
        "--repeats",
        "1",
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    assert {"args", "machine", "load_before", "load_after", "summary", "runs"} <= set(res)
    # one timed run without timers, then one instrumented run for the breakdown that the timing ignores
    assert [r.get("profile", False) for r in res["runs"]] == [False, True]
    assert all("error" not in r for r in res["runs"])
    assert "breakdown" not in res["runs"][0] and "breakdown" in res["runs"][1]
    er = res["summary"]["digits"]["er"]
    assert {"samples_per_s", "samples_per_cpu_s", "final_acc", "peak_rss_mb", "train_time_s"} <= set(er)
    assert er["samples"] == 5 * 3 * 10  # 3 batches of 10 from each of the 5 tasks
    assert er["samples_per_s"] > 0 and er["peak_rss_mb"] > 0 and 0 <= er["final_acc"] <= 100
    assert {"forward", "backward_step", "buffer", "arithmetic", "other"} <= set(er["breakdown_s"])
    assert er["runs"] == 1 and er["profile_runs"] == 1
    assert er["train_time_s"] == res["runs"][0]["train_time_s"]  # the timing comes from the timed run only
    assert "digits" in proc.stdout and "er" in proc.stdout


def test_bench_rejects_unknown_contestant(tmp_path, capsys):
    from cil.run.bench.main import main  # `cil bench ...` (the smoke test above runs the command itself)

    assert main(["--contestants", "er,warp_drive", "--out", str(tmp_path / "x.json")]) == 2
    assert "warp_drive" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_shorten_stream_keeps_the_first_batches_of_every_task():
    cfg = workload_config("digits")
    ds = workload_dataset("digits", cfg)
    full = ClassIncrementalStream(ds, 5, 10, "random", seed=0)
    short = shorten_stream(ClassIncrementalStream(ds, 5, 10, "random", seed=0), 2)
    assert len(short) == 10 and short.n_samples == 100
    for a, b in zip(full.tasks, short.tasks, strict=True):
        assert torch.equal(a.train_idx[:20], b.train_idx)
    assert [b.task for b in short.batches()] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_final_accuracy_is_the_learners_final_average_accuracy(tmp_path):
    cfg = workload_config("digits")
    learner = build_learner(cfg, tmp_path, workload_dataset("digits", cfg))
    shorten_stream(learner.stream, 8)
    res = learner.run()
    learner.logger.close()
    acc = final_accuracy(learner.method.model, learner.stream)
    assert acc["final_acc"] == pytest.approx(res["final_avg_acc"], abs=1e-4)


@pytest.mark.parametrize("method", ["er", "gsa"])
def test_deferred_online_accuracy_and_loss_match_per_step_accounting(tmp_path, method):
    """The learner reduces losses and online accuracy at read-back time; the numbers must equal the
    per-step computation (the seen-class mask as it was at each step)."""
    cfg = workload_config("digits", method)
    cfg.log.every = 7
    cfg.method.replay_batch_size = 10
    learner = build_learner(cfg, tmp_path, workload_dataset("digits", cfg))
    shorten_stream(learner.stream, 9)
    m = learner.method
    observe, ref = m.observe, {"correct": 0, "losses": []}

    def observe_and_count(batch):
        out = observe(batch)
        pred = mask_logits(out.logits, m.seen).argmax(1)
        ref["correct"] += int((pred == batch.y).sum())
        ref["losses"].append(float(out.loss))
        return out

    m.observe = observe_and_count
    res = learner.run()
    learner.logger.close()
    assert res["online_acc"] == pytest.approx(100.0 * ref["correct"] / learner.stream.n_samples, abs=1e-9)
    # the last read-back covers the steps since the previous multiple of log.every (or task end)
    n_last = len(learner.stream) - max(
        k for k in range(len(learner.stream)) if k % 7 == 0 or k in _task_end_steps(learner.stream)
    )
    expected = sum(ref["losses"][-n_last:]) / n_last
    assert learner.last_log["loss"] == pytest.approx(expected, rel=1e-5)


def _task_end_steps(stream):
    ends, total = set(), 0
    for n in stream.batches_per_task:
        total += n
        ends.add(total)
    return ends


def test_nonfinite_loss_still_stops_the_run(tmp_path):
    from cil.errors import TrainingError

    cfg = workload_config("digits", "naive")
    cfg.log.every = 5
    learner = build_learner(cfg, tmp_path, workload_dataset("digits", cfg))
    with torch.no_grad():
        learner.method.model.head.bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match="non-finite"):
        learner.run()
    learner.logger.close()
    assert learner.step == 5  # stopped at the first read-back


def test_threads_key_sets_torch_threads_and_is_validated(tmp_path):
    cfg = workload_config("digits")
    cfg.threads = 0
    with pytest.raises(ConfigError, match="threads"):
        validate(cfg)
    before = torch.get_num_threads()
    try:
        cfg.threads = 1
        build_learner(cfg, tmp_path, workload_dataset("digits", cfg)).logger.close()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_breakdown_times_gsa_augmentation():
    """The breakdown finds GSA's augmentation however the step calls it (per call or drawn at once)."""
    from cil.run.bench.contestants import run_ours

    cfg = workload_config("digits", method="gsa")
    res = run_ours(cfg, workload_dataset("digits", cfg), 3, breakdown=True)
    times = res["breakdown"]
    assert times["augment"] > 0 and times["forward"] > 0


def test_seen_masks_are_replaced_when_a_class_is_new_and_never_changed_in_place(tmp_path):
    """The learner keeps each step's seen mask by reference until it counts online accuracy, so `mark_seen` must
    hand out a new mask when a class is new (old references keep their classes) and may keep the same object
    otherwise (no tensor work for the usual batch)."""
    cfg = workload_config("digits")
    m = build_learner(cfg, tmp_path, workload_dataset("digits", cfg)).method
    labels = torch.tensor([0, 1, 1])
    m.classes.mark_seen(labels, labels)
    first = m.seen
    assert first.nonzero().squeeze(1).tolist() == [0, 1] and m.classes.seen_labels == {0, 1}
    m.classes.mark_seen(torch.tensor([1, 0]), torch.tensor([1, 0]))  # nothing new
    assert m.seen is first
    m.classes.mark_seen(torch.tensor([2, 1]), torch.tensor([2, 1]))
    assert first.nonzero().squeeze(1).tolist() == [0, 1], "a mask handed out earlier was changed in place"
    assert m.seen.nonzero().squeeze(1).tolist() == [0, 1, 2] and m.classes.seen_labels == {0, 1, 2}
    # a checkpoint round trip restores both masks and the label set that decides what is new
    state = m.state_dict()
    fresh = build_learner(cfg, tmp_path / "b", workload_dataset("digits", cfg)).method
    fresh.load_state_dict(state)
    restored = fresh.seen
    fresh.classes.mark_seen(torch.tensor([2]), torch.tensor([2]))
    assert fresh.seen is restored and restored.nonzero().squeeze(1).tolist() == [0, 1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("method", OURS)
def test_every_native_method_is_a_contestant_with_its_arithmetic_timed(method):
    """`make bench` covers every registered method: it trains, its evaluation uses the method's own evaluation
    head (the bench's final accuracy equals the learner's), and the breakdown finds its forward passes however it
    calls the network (the body, the head, its own modules)."""
    cfg = workload_config("digits", method=method)
    res = run_ours(cfg, workload_dataset("digits", cfg), 3, breakdown=True)
    assert res["final_acc"] == pytest.approx(res["learner_final_avg_acc"], abs=1e-4)
    assert res["breakdown"]["forward"] > 0 and res["breakdown"]["backward_step"] > 0


def test_er_ace_joint_loss_equals_the_two_term_loss_bit_for_bit():
    """ER-ACE's joint-pass loss (one masked fill, one log-softmax) gives the same loss and gradients, exactly, as
    the two masked cross-entropies on the incoming and replay slices."""
    from cil.core.objectives.er_ace import er_ace_loss, er_ace_loss_joint

    g = torch.Generator().manual_seed(0)
    for n, r, c in [(10, 10, 10), (10, 3, 10), (7, 10, 100)]:
        logits = torch.randn(n + r, c, generator=g) * 4
        seen = torch.zeros(c, dtype=torch.bool)
        seen[torch.randperm(c, generator=g)[: max(4, c // 2)]] = True
        labels = seen.nonzero().squeeze(1)
        y = labels[torch.randint(0, len(labels), (n + r,), generator=g)]
        y[:n] = labels[torch.randint(0, 2, (n,), generator=g)]  # the incoming batch holds two classes
        a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
        ref = er_ace_loss(a[:n], y[:n], a[n:], y[n:], seen)
        joint = er_ace_loss_joint(b, y[:n], y[n:], ~seen)
        ref.backward()
        joint.backward()
        assert torch.equal(ref, joint) and torch.equal(a.grad, b.grad)


def test_per_task_training_time_for_ours_and_the_floor():
    """Every contestant records its training time per task (wall and CPU), so a slow-down over the stream shows;
    the learner's results carry the per-task wall time, which adds up to its training time."""
    from cil.run.bench.contestants import run_floor

    cfg = workload_config("digits")
    ds = workload_dataset("digits", cfg)
    res = run_ours(cfg, ds, 3)
    assert len(res["task_train_time_s"]) == len(res["task_train_cpu_s"]) == 5 and res["task_samples"] == [30] * 5
    # the totals also hold the moments after the last task's evaluation
    assert 0.5 * res["train_time_s"] < sum(res["task_train_time_s"]) <= res["train_time_s"]
    assert 0.5 * res["train_cpu_s"] < sum(res["task_train_cpu_s"]) <= res["train_cpu_s"] + 1e-6
    assert all(t > 0 for t in res["task_train_time_s"] + res["task_train_cpu_s"])
    stream = shorten_stream(ClassIncrementalStream(ds, 5, 10, cfg.stream.class_order, seed=0), 3)
    floor = run_floor(cfg, stream)
    assert len(floor["task_train_cpu_s"]) == 5 and sum(floor["task_train_time_s"]) <= floor["train_time_s"] + 1e-6


def test_summary_reports_per_task_time_and_the_slowdown():
    from cil.run.bench.main import summarise

    run = {
        "workload": "w",
        "contestant": "x",
        "repeat": 0,
        "samples": 40,
        "samples_per_s": 1.0,
        "samples_per_cpu_s": 1.0,
        "train_time_s": 4.0,
        "final_acc": 50.0,
        "peak_rss_mb": 1.0,
        "rss_after_data_mb": 1.0,
        "task_train_time_s": [1.0, 3.0],
        "task_train_cpu_s": [1.0, 3.0],
        "task_samples": [20, 20],
    }
    s = summarise([run])["w"]["x"]
    assert s["task_train_cpu_s"] == [1.0, 3.0] and s["slowdown_last_over_first_cpu"] == pytest.approx(3.0)
    assert s["task_us_per_sample_cpu"] == pytest.approx([5e4, 15e4])


MNIST_RAW = Path(os.environ.get("CIL_DATA_ROOT") or REPO.parent / "shared" / "data") / "MNIST" / "raw"


@pytest.mark.slow
@pytest.mark.skipif(not (MNIST_RAW / "train-images-idx3-ubyte.gz").is_file(), reason="offline MNIST copy absent")
@pytest.mark.parametrize("which", ["avalanche_er", "avalanche_er_ace"])
def test_avalanche_classic_split_mnist_contestant(which, tmp_path, monkeypatch):
    """Avalanche's own SplitMNIST from the offline files (found, never downloaded: the data root is read-only,
    so torchvision extracts under the cache dir), our class order, 2 online sub-experiences of every experience:
    the same number of samples as ours, from each task's own classes, with per-task times."""
    pytest.importorskip("avalanche")
    from cil.avalanche.bench import classic_benchmark
    from cil.run.bench.contestants import run_avalanche

    monkeypatch.setenv("CIL_CACHE_DIR", str(Path.home() / ".cache" / "cil"))  # extracted once, reused
    monkeypatch.setenv("CIL_DATA_ROOT", str(MNIST_RAW.parents[1]))
    cfg = workload_config("mnist")
    ds = workload_dataset("mnist", cfg)
    stream = shorten_stream(ClassIncrementalStream(ds, 5, 10, cfg.stream.class_order, seed=0), 2)
    bench = classic_benchmark("mnist", MNIST_RAW.parents[1], stream.class_order, 5, 0)
    assert [sorted(e.classes_in_this_experience) for e in bench.train_stream] == [
        sorted(t.classes.tolist()) for t in stream.tasks
    ]
    res = run_avalanche(cfg, stream, which, "mnist", 2)
    assert res["samples"] == stream.n_samples == 100 and res["task_samples"] == [20] * 5
    assert len(res["task_train_cpu_s"]) == 5 and all(t > 0 for t in res["task_train_time_s"])
    assert 0 <= res["final_acc"] <= 100


def test_breakdown_with_an_addon_counts_no_time_twice(monkeypatch):
    """Add-ons compute their terms (with forward passes) inside the method's step: the breakdown must time
    backward and the optimizer step themselves, not the whole step, so an add-on's own work lands in "other"
    (here: 5 ms of CPU burnt in every extra_loss call), and the process-wide backward timer is removed afterwards."""
    import time as clock

    from cil.core.addons.mkd import MKD

    burnt = {"s": 0.0}
    extra_loss = MKD.extra_loss

    def slow_extra_loss(self, method):
        start = clock.thread_time()
        while clock.thread_time() - start < 0.005:
            pass
        burnt["s"] += clock.thread_time() - start
        return extra_loss(self, method)

    monkeypatch.setattr(MKD, "extra_loss", slow_extra_loss)
    original = torch.Tensor.backward
    cfg = workload_config("digits", method="er")
    cfg.addon = "mkd"
    res = run_ours(cfg, workload_dataset("digits", cfg), 6, breakdown=True)
    assert torch.Tensor.backward is original
    b = res["breakdown"]
    assert b["forward"] > 0 and b["backward_step"] > 0
    assert burnt["s"] > 0.1
    assert b["backward_step"] < burnt["s"] and b["other"] > 0.8 * burnt["s"]
