"""The benchmark command end to end on a tiny stream (no timing is asserted), and the loop's speed changes:
they must not change what a run computes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cil.run.bench.contestants import OURS, final_accuracy, run_ours
from cil.run.bench.workloads import shorten_stream, workload_config, workload_dataset
from cil.run.config import validate
from cil.core.data.stream import ClassIncrementalStream
from cil.errors import ConfigError
from cil.core.objectives.common import mask_logits
from cil.run.experiment import build_learner

REPO = Path(__file__).resolve().parents[1]


def test_bench_smoke_writes_json_with_expected_keys(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "cil", "bench", "--workloads", "digits", "--contestants", "er",
           "--batches-per-task", "3", "--repeats", "1", "--out", str(out)]
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


def test_bench_rejects_unknown_contestant(tmp_path):
    cmd = [sys.executable, "-m", "cil", "bench", "--contestants", "er,warp_drive", "--out", str(tmp_path / "x.json")]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "warp_drive" in proc.stderr
    assert not (tmp_path / "x.json").exists()


def test_shorten_stream_keeps_the_first_batches_of_every_task():
    cfg = workload_config("digits")
    ds = workload_dataset("digits", cfg)
    full = ClassIncrementalStream(ds, 5, 10, "random", seed=0)
    short = shorten_stream(ClassIncrementalStream(ds, 5, 10, "random", seed=0), 2)
    assert len(short) == 10 and short.n_samples == 100
    for a, b in zip(full.tasks, short.tasks):
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
    n_last = len(learner.stream) - max(k for k in range(len(learner.stream))
                                       if k % 7 == 0 or k in _task_end_steps(learner.stream))
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


@pytest.mark.parametrize("method", OURS)
def test_every_native_method_is_a_contestant_with_its_arithmetic_timed(method):
    """`make bench` covers every registered method: it trains, its evaluation uses the method's own evaluation
    head (the bench's final accuracy equals the learner's), and the breakdown finds its forward passes however it
    calls the network (the body, the head, its own modules)."""
    cfg = workload_config("digits", method=method)
    res = run_ours(cfg, workload_dataset("digits", cfg), 3, breakdown=True)
    assert res["final_acc"] == pytest.approx(res["learner_final_avg_acc"], abs=1e-4)
    assert res["breakdown"]["forward"] > 0 and res["breakdown"]["backward_step"] > 0
