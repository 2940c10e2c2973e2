"""What a run logs: metrics.csv always, GSA's per-class statistics through the stream, and TensorBoard (scalars,
the accuracy matrix as text and image, GSA's weights) only when log.tensorboard=true."""

import csv
from dataclasses import replace

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cil.run.config import method_defaults
from cil.run.experiment import run_experiment
from cil.schema import BufferConfig, DatasetConfig, EvalConfig, LogConfig, RunConfig, StreamConfig


def tiny(method: str, tensorboard: bool) -> RunConfig:
    return RunConfig(
        dataset=DatasetConfig(name="digits"),
        stream=StreamConfig(batch_size=20),
        buffer=BufferConfig(size=100),
        method=replace(method_defaults(method), replay_batch_size=10),
        eval=EvalConfig(anytime_every=10),
        log=LogConfig(every=10, progress=False, tensorboard=tensorboard),
    )


def test_gsa_statistics_in_metrics_csv_and_tensorboard(tmp_path):
    res = run_experiment(tiny("gsa", tensorboard=True), tmp_path)
    with open(tmp_path / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    weights = [r for r in rows if r["key"].startswith("gsa/weight/")]
    ratios = [r for r in rows if r["key"].startswith("gsa/ratio/")]
    assert {int(r["key"].rsplit("/", 1)[1]) for r in weights} == set(range(10))  # every class once seen
    assert all(0 < float(r["value"]) < 2 for r in weights)  # w = 2 sigmoid(r - 1)
    assert all(float(r["value"]) > 0 for r in ratios)
    # the last logged weights are the final statistics reported in results.json
    last = {int(r["key"].rsplit("/", 1)[1]): float(r["value"]) for r in weights}
    final = dict(zip(res["gsa"]["classes"], res["gsa"]["weights"], strict=True))
    assert all(abs(last[c] - final[c]) < 1e-4 for c in final)
    # the first classes appear before the later tasks' classes (logged as they are seen)
    first_step = {}
    for r in weights:
        first_step.setdefault(int(r["key"].rsplit("/", 1)[1]), int(r["step"]))
    assert min(first_step.values()) < max(first_step.values())

    ea = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()
    for tag in ("loss", "online_acc", "anytime_acc", "avg_acc_seen", "acc/task_0", "gsa/weight/0", "gsa/ratio/0"):
        assert tag in tags["scalars"], tag
    assert [e.step for e in ea.Scalars("loss")] == [int(r["step"]) for r in rows if r["key"] == "loss"]
    images = ea.Images("acc_matrix")
    assert len(images) == 5 and images[-1].width > 100  # one heatmap per task end
    assert "acc_matrix/text_summary" in tags["tensors"]


def test_no_tensorboard_unless_enabled(tmp_path):
    run_experiment(tiny("er", tensorboard=False), tmp_path)
    assert not (tmp_path / "tensorboard").exists()
    text = (tmp_path / "metrics.csv").read_text()
    assert text.startswith("step,task,key,value") and "anytime_acc" in text and "gsa/" not in text
