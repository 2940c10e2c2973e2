"""Packed runs (cil/core/packed.py): K ER runs stepped together by one vmapped step give the results of K separate
runs. Not bit for bit: batched matrix products sum in another order than one run's (about 1e-7 per step); on the
MLP with SGD that stays at 1e-7 over a whole stream and the accuracy matrices are equal. A batch-norm ResNet at
lr 0.1 and batch 10 is chaotic (weights scaled by 1 + 1e-7 before a run differ by 0.1 after five steps), so
there the first steps are compared, within 1e-4."""

import os
import signal

import pytest
import torch

from cil.core.packed import PackedRuns
from cil.errors import ConfigError, TrainingError
from cil.run.checkpoint import Checkpointer
from cil.run.config import default_config
from cil.run.experiment import build_learner, load_run_dataset
from cil.schema import DatasetConfig


@pytest.fixture(scope="module")
def digits():
    return load_run_dataset(default_config("er", dataset=DatasetConfig(name="digits")))


def config(method="er", **keys):
    cfg = default_config(method, dataset=DatasetConfig(name="digits"))
    cfg.log.progress, cfg.eval.anytime_every = False, 0
    for key, value in keys.items():
        obj, *path = [cfg, *key.split(".")]
        for part in path[:-1]:
            obj = getattr(obj, part)
        setattr(obj, path[-1], value)
    return cfg


def separate_and_packed(tmp_path, digits, configs):
    separate = [build_learner(cfg, tmp_path / f"s{k}", digits) for k, cfg in enumerate(configs)]
    results = [learner.run() for learner in separate]
    packed = [build_learner(cfg, tmp_path / f"p{k}", digits) for k, cfg in enumerate(configs)]
    return separate, results, packed, PackedRuns(packed).run()


def assert_models_close(a, b, atol):
    for (name, x), y in zip(a.method.model.state_dict().items(), b.method.model.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "sweep",
    [
        [{"buffer.size": m} for m in (50, 100, 200)],  # a memory sweep: the same stream, steps of equal shape
        # seeds under random class orders: tasks end at other steps (short batches apart, streams of 145 and 146)
        [{"seed": s, "stream.class_order": "random"} for s in (0, 1, 2)],
    ],
    ids=["memory", "seeds"],
)
def test_packed_mlp_runs_equal_separate_runs(tmp_path, digits, sweep):
    """Whole Split digits streams, MLP and SGD: every run's accuracy matrix as its separate run's, weights within
    1e-6 (measured: 1e-7)."""
    separate, a, packed, b = separate_and_packed(tmp_path, digits, [config(**keys) for keys in sweep])
    assert {len(learner.stream) for learner in separate} == ({146} if "buffer.size" in sweep[0] else {145, 146})
    for k in range(len(sweep)):
        assert a[k]["acc_matrix"] == b[k]["acc_matrix"], k
        assert packed[k].step == separate[k].step
        assert_models_close(separate[k], packed[k], atol=1e-6)
    assert a[0]["acc_matrix"] != a[1]["acc_matrix"]  # the runs are different runs


@pytest.mark.slow
@pytest.mark.parametrize("separate_passes", [False, True], ids=["one-pass", "two-passes"])
def test_packed_er_ace_runs_equal_separate_runs(tmp_path, digits, separate_passes):
    """ER-ACE's own tensor function under vmap (the joint loss in one pass, or the official two passes): whole
    Split digits streams of a memory sweep with a replay batch size of their own, each run's accuracy matrix as its
    separate run's, weights within 1e-6."""
    sweep = [{"buffer.size": 50, "method.replay_batch_size": 10}, {"buffer.size": 200, "method.replay_batch_size": 20}]
    configs = [config("er_ace", **{"method.separate_passes": separate_passes, **keys}) for keys in sweep]
    separate, a, packed, b = separate_and_packed(tmp_path, digits, configs)
    for k in range(len(sweep)):
        assert a[k]["acc_matrix"] == b[k]["acc_matrix"], k
        assert_models_close(separate[k], packed[k], atol=1e-6)
    assert a[0]["acc_matrix"] != a[1]["acc_matrix"]


@pytest.mark.parametrize(("method", "steps"), [("er", 5), ("er_ace_two_passes", 3)])
def test_packed_batch_norm_runs_equal_separate_runs_first_steps(tmp_path, digits, method, steps):
    """A reduced ResNet (batch norm: running statistics stacked and updated under vmap; ER-ACE's two passes of 10
    rows each on their own statistics), two memory sizes, the first steps: weights and running statistics within
    1e-4 of the separate runs'. Fewer steps for ER-ACE's two passes: there a separate run whose weights are scaled
    by 1 + 1e-7 is 4e-4 away after three steps and 0.07 after five (measured), the packed run 3e-6 and 2e-3."""
    keys = {"model.name": "reduced_resnet18", "model.nf": 4, "stream.samples_per_class": steps}
    if method != "er":  # one task of 3 images per class: three steps of 10
        method, keys = "er_ace", {**keys, "method.separate_passes": True, "stream.n_tasks": 1}
    configs = [config(method, **keys, **{"buffer.size": m}) for m in (20, 40)]
    separate, _, packed, _ = separate_and_packed(tmp_path, digits, configs)
    for k in range(2):
        assert packed[k].step == steps
        assert_models_close(separate[k], packed[k], atol=1e-4)
        bn = packed[k].method.model.bn1
        assert int(bn.num_batches_tracked) == steps + (steps - 1) * (method == "er_ace")  # a second pass from step 2
        assert not torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))


GSA_VARIANTS = {
    "spec": {},
    "padded-crop": {"method.crop": "padded"},
    "task-free-ema": {"method.task_free": True, "method.balance": "ema"},
    "independent-views-kornia": {"method.independent_views": True, "method.crop": "kornia"},
    # experiment=gsa_*_official's switches: fresh head rows at task 1, the head frozen from then on (each run's own
    # optimizer leaves it), the affine crop, the passes outside the loss (their draws; no batch norm in the MLP)
    "official": {
        "method.crop": "affine",
        "method.bn_extra_passes": True,
        "method.fresh_head_rows": True,
        "method.freeze_head_after_first_task": True,
    },
}


@pytest.mark.parametrize("variant", GSA_VARIANTS)
def test_packed_gsa_runs_equal_separate_runs(tmp_path, digits, variant):
    """GSA's tensor function under vmap (its augmentation draws, masks and gradient statistics handed in per run, G+
    and G- handed back): three runs, M = 50 with R = 10 and M = 200 with R = 20 under seeds 0 and 1 (replay batches of
    other shapes: the step runs in groups), over two tasks of 15 images per class (warm-up, task change, mixed
    batches): weights, G+, G- (relative) and the replay weights within 1e-6 of the separate runs'; the official
    switches within 1e-4: there run 0 meets a ReLU gate turned by rounding (below), which moves one hidden unit by
    4e-5, exactly as far as a separate run whose weights start scaled by 1 + 1e-7 (measured).

    Not over whole streams: a hidden unit whose pre-activation is within rounding of 0 for some row turns ReLU's
    gate and its gradient the other way (seen at step 44 of a Split digits stream), and the runs then part as two
    float orders would: docs/performance.md sets the packed runs' accuracies beside separate runs whose weights start
    scaled by 1 + 1e-7."""
    keys = {"stream.samples_per_class": 15, "stream.n_tasks": 2, **GSA_VARIANTS[variant]}
    sweep = [(50, 10, 0), (200, 20, 0), (200, 20, 1)]
    configs = [config("gsa", seed=s, **{"buffer.size": m, "method.replay_batch_size": r, **keys}) for m, r, s in sweep]
    separate, a, packed, b = separate_and_packed(tmp_path, digits, configs)
    for k in range(len(sweep)):
        assert packed[k].step == separate[k].step == 16
        assert a[k]["acc_matrix"] == b[k]["acc_matrix"], k
        tol = 1e-4 if variant == "official" else 1e-6
        assert_models_close(separate[k], packed[k], atol=tol)
        mine, theirs = packed[k].method.gsa, separate[k].method.gsa
        for name in ("positive", "negative"):  # sums over the stream (up to ~100): relative
            torch.testing.assert_close(getattr(mine.stats, name), getattr(theirs.stats, name), rtol=tol, atol=tol)
        torch.testing.assert_close(mine.last_weights, theirs.last_weights, rtol=0, atol=tol)
        assert not torch.equal(mine.last_weights, torch.ones_like(mine.last_weights))  # weights past the warm-up
        assert torch.equal(packed[k].method.buffer.state_dict()["y"], separate[k].method.buffer.state_dict()["y"])
        assert packed[k].method.model.head.weight.requires_grad == (variant != "official")


def test_packed_gsa_statistics_passes_move_each_runs_batch_norm_statistics(tmp_path, digits):
    """The official mode's forward passes outside the loss (`bn_extra_passes`) on a reduced ResNet under vmap: two
    steps (the second with a replay batch and the passes around it) of two runs of other replay sizes; every run's
    pass count as its separate run's, weights and running statistics within 1e-5. Two steps only: on this model a
    separate run's gradient can move by 2e-2 when its weights are scaled by 1 + 1e-7 (measured at another run's
    second step), so later steps compare rounding."""
    keys = {"model.name": "reduced_resnet18", "model.nf": 4, "stream.samples_per_class": 2, "stream.n_tasks": 1}
    official = {"method.crop": "affine", "method.bn_extra_passes": True}
    draws = ("buffer.size", "method.replay_batch_size", "method.current_task_replay")
    configs = [config("gsa", **keys, **official, **dict.fromkeys(draws, m)) for m in (8, 16)]
    separate, _, packed, _ = separate_and_packed(tmp_path, digits, configs)
    for k in range(2):
        assert packed[k].step == 2
        assert_models_close(separate[k], packed[k], atol=1e-5)
        mine, theirs = packed[k].method.model.bn1, separate[k].method.model.bn1
        assert int(mine.num_batches_tracked) == int(theirs.num_batches_tracked) > 2 * 2  # and passes outside the loss
        torch.testing.assert_close(mine.running_var, theirs.running_var, rtol=0, atol=1e-5)


@pytest.mark.parametrize("method", ["er", "gsa"])
def test_a_packed_runs_flops_are_its_share_of_the_packed_step(tmp_path, digits, method):
    """compute.flops: a learner counts FLOPs around `observe`, which in a pack only queues the step, so the pack
    counts the step itself and gives each run stepped its share. Two runs of other memories (steps of equal shape):
    each run's FLOPs per step and counted steps as its separate run's (vmap's batched kernels count as the runs'
    own; GSA's groups of other shapes each count their own forward pass)."""
    keys = {"compute.flops_every": 10, "method.replay_batch_size": 10, "stream.samples_per_class": 40}
    configs = [config(method, **keys, **{"buffer.size": m}) for m in (50, 100)]
    _, a, _, b = separate_and_packed(tmp_path, digits, configs)
    for k in range(2):
        mine, theirs = b[k]["flops"], a[k]["flops"]
        assert mine["measured_steps"] == theirs["measured_steps"] > 1
        assert mine["per_step"] == pytest.approx(theirs["per_step"], rel=1e-3) and mine["per_step"] > 0, k


def test_what_cannot_be_packed_is_refused(tmp_path, digits):
    with pytest.raises(ConfigError, match="method derpp has no packable step"):
        PackedRuns([build_learner(config("derpp"), tmp_path / "a", digits)])
    without_replay = config("gsa", **{"method.train_without_replay": False})
    with pytest.raises(ConfigError, match="method.train_without_replay=false"):
        PackedRuns([build_learner(without_replay, tmp_path / "a1", digits)])
    with pytest.raises(ConfigError, match="method.balance other than constant"):
        PackedRuns([build_learner(config("er_ace", **{"method.balance": "ema"}), tmp_path / "a2", digits)])
    joint = build_learner(config("er_ace"), tmp_path / "j", digits)
    two_passes = build_learner(config("er_ace", **{"method.separate_passes": True}), tmp_path / "t", digits)
    with pytest.raises(ConfigError, match=r"its method settings \(method\.\*\) differs"):
        PackedRuns([joint, two_passes])
    er = build_learner(config(), tmp_path / "b", digits)
    wide = build_learner(config(**{"model.hidden": [64]}), tmp_path / "c", digits)
    with pytest.raises(ConfigError, match=r"its model \(model\.\*\) differs"):
        PackedRuns([er, wide])


@pytest.mark.slow
def test_bench_packed_contestant_trains_k_runs_as_their_separate_runs():
    """`cil bench --contestants packed<K>`: K ER runs (seeds seed..seed+K-1) counted together; each run's accuracy
    matrix is its own ordinary run's (the figures of docs/performance.md rest on this)."""
    from cil.run.bench.contestants import packed_runs, run_ours, run_packed
    from cil.run.bench.workloads import workload_config, workload_dataset

    assert [packed_runs(n) for n in ("packed4", "packed", "packed0", "er")] == [4, 0, 0, 0]
    cfg = workload_config("digits")
    ds = workload_dataset("digits", cfg)
    res = run_packed(cfg, ds, 3, 2)
    assert res["packed_runs"] == 2 and res["samples"] == 2 * 150 and res["train_time_s"] > 0
    for seed, matrix in enumerate(res["acc_matrices"]):
        cfg.seed = seed
        assert matrix == run_ours(cfg, ds, 3)["acc_matrix"]


@pytest.mark.slow
def test_runs_of_other_optimizers_pack_each_stepping_its_own_slice(tmp_path, digits):
    """Each run keeps its own optimizer (its state and step count): SGD with momentum, Adam and AdamW at learning
    rates of their own, packed, end as their separate runs: equal accuracy matrices, SGD's weights within 1e-6, the
    Adam runs' within 5e-3, a few steps of lr: Adam's normalised update turns a rounding difference in a near-zero
    gradient into a step of about lr (measured: a separate AdamW run whose weights start scaled by 1 + 1e-7 ends
    2e-3 away from the unscaled one)."""
    configs = [
        config(**{"optimizer.momentum": 0.9, "optimizer.lr": 0.01}),
        config(**{"optimizer.name": "adam", "optimizer.lr": 0.001}),
        config(**{"optimizer.name": "adamw", "optimizer.lr": 0.002, "optimizer.weight_decay": 1e-2}),
    ]
    separate, a, packed, b = separate_and_packed(tmp_path, digits, configs)
    for k in range(len(configs)):
        assert type(packed[k].method.optimizer) is type(separate[k].method.optimizer)
        assert a[k]["acc_matrix"] == b[k]["acc_matrix"], k
        assert_models_close(separate[k], packed[k], atol=1e-6 if k == 0 else 5e-3)


def half_precision(learner, init_scale):
    """The learner's method under fp16 on the CPU's float16 autocast with an enabled GradScaler (the runner refuses
    fp16 off CUDA; the method itself runs it). A first scale of 2**40 overflows the float16 gradients; the scaler
    then backs off to 2**10, where they fit."""
    learner.method.precision = "fp16"
    learner.method.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, backoff_factor=2.0**-30)
    return learner


def test_fp16_runs_scale_unscale_and_skip_their_steps_each_on_its_own(tmp_path, digits):
    """fp16 in a pack: each run's loss is scaled by its own GradScaler and each run skips a step on inf by itself.
    Run 1's first scale overflows its first gradients, so it skips its first step while run 0 steps, as their
    separate runs do; the scalers' states end equal to the separate runs', the accuracy matrices equal, the weights
    within 2e-3 (float16 rounds products to 2**-11 of their size, and the packed kernels sum in another order;
    measured: 2e-4)."""
    keys = {"stream.samples_per_class": 30, "stream.n_tasks": 2, "optimizer.momentum": 0.9, "optimizer.lr": 0.01}
    configs = [config(seed=s, **keys) for s in (0, 1)]
    scales = [2.0**10, 2.0**40]
    separate = [half_precision(build_learner(c, tmp_path / f"s{k}", digits), scales[k]) for k, c in enumerate(configs)]
    results = [learner.run() for learner in separate]
    packed = [half_precision(build_learner(c, tmp_path / f"p{k}", digits), scales[k]) for k, c in enumerate(configs)]
    packed_results = PackedRuns(packed).run()
    states = [learner.method.scaler.state_dict() for learner in separate]
    assert states[0]["scale"] == states[1]["scale"] == 2.0**10
    assert states[1]["_growth_tracker"] == states[0]["_growth_tracker"] - 1 == packed[0].step - 1  # one skip
    for k in range(2):
        assert packed[k].method.scaler.state_dict() == states[k], k
        assert packed_results[k]["acc_matrix"] == results[k]["acc_matrix"], k
        assert_models_close(separate[k], packed[k], atol=2e-3)


@pytest.mark.slow
def test_a_run_that_fails_leaves_the_pack_and_the_others_go_on(tmp_path, digits):
    """Run 1 raises at stream batch 20 (as a non-finite loss does): its outcome is that error, its model keeps the
    weights it had then (with momentum, a slice left in the stack would still move), and runs 0 and 2 end as their
    separate runs."""
    configs = [config(seed=s, **{"optimizer.momentum": 0.9, "optimizer.lr": 0.01}) for s in (0, 1, 2)]
    separate = [build_learner(cfg, tmp_path / f"s{k}", digits) for k, cfg in enumerate(configs)]
    expected = [learner.run() for learner in separate]
    packed = [build_learner(cfg, tmp_path / f"p{k}", digits) for k, cfg in enumerate(configs)]
    broken, kept = packed[1], {}
    after_batch = broken._after_batch

    def failing_after_batch(batch, bar, tick):
        if broken.step == 20:
            kept.update({k: v.clone() for k, v in broken.method.model.state_dict().items()})
            raise TrainingError("non-finite loss at stream batch 20")
        return after_batch(batch, bar, tick)

    broken._after_batch = failing_after_batch
    outcomes = PackedRuns(packed).run_each()
    assert isinstance(outcomes[1], TrainingError) and broken.step == 20
    for name, value in broken.method.model.state_dict().items():
        assert torch.equal(value, kept[name]), name
    for k in (0, 2):
        assert outcomes[k]["acc_matrix"] == expected[k]["acc_matrix"], k
        assert_models_close(separate[k], packed[k], atol=1e-5)


def test_one_signal_asks_every_run_of_a_pack_to_stop_and_the_handlers_come_back(tmp_path):
    """The runs of a pack are all flagged by one SIGTERM, and the process's handler is back once the last run's
    loop is over, whichever ends first."""
    cfg = config()
    before = signal.getsignal(signal.SIGTERM)
    runs = [Checkpointer(tmp_path / str(k), cfg, {}) for k in range(3)]
    loops = [run.stop_on_signals() for run in runs]
    for loop in loops:
        loop.__enter__()
    os.kill(os.getpid(), signal.SIGTERM)
    assert [run.stop_signal for run in runs] == [signal.SIGTERM] * 3
    for loop in (loops[1], loops[0]):
        loop.__exit__(None, None, None)
        assert signal.getsignal(signal.SIGTERM) is not before  # a run is still in its loop
    late = Checkpointer(tmp_path / "late", cfg, {})
    with late.stop_on_signals():  # set up after the signal, while a run of its pack was still stopping
        assert late.stop_signal == signal.SIGTERM
    loops[2].__exit__(None, None, None)
    assert signal.getsignal(signal.SIGTERM) is before
