"""The runner-level keys the official protocols need (docs/protocols.md): optimizer=adamw, precision=fp16,
eval.classes, stream.class_order=numpy_shuffle and model.pool.

AdamW's step equals a hand-written decoupled-weight-decay Adam update. fp16: the runner refuses it off CUDA before
anything is written; the step's GradScaler wiring (scale, unscale, skip on inf, update), its state in the checkpoint
and CCL-DC's second scaler are checked on the CPU, whose autocast and GradScaler run float16 too (the runner's CUDA
guard lifted for those tests only); a short CUDA run and its bit-for-bit resume run where a GPU is present.
eval.classes: a model whose unseen-class logits are the largest is predicted as each definition says, at every
evaluation. numpy_shuffle: the orders numpy's legacy generator gives (typed in). model.pool: feature sizes, and
`global` is today's network bit for bit."""

import copy
import csv
import functools
import io
import math
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_resume import TIMINGS, checkpoint_step
from torch.amp.grad_scaler import GradScaler

import cil.run.experiment as experiment
from cil import api
from cil.core.addons.base import Addon, AddonConfig
from cil.core.data.stream import ClassIncrementalStream, class_order
from cil.core.learner import predict
from cil.core.methods import method_class
from cil.core.methods.base import Method
from cil.core.models import build_model
from cil.core.models.resnet import ResNet18
from cil.errors import ConfigError
from cil.run.bench.workloads import shorten_stream
from cil.run.config import default_config, validate
from cil.run.experiment import build_learner, build_optimizer, load_run_dataset, run_experiment
from cil.schema import DatasetConfig

FP16_CPU_REFUSAL = (
    "precision=fp16 needs a CUDA device (autocast float16 with a GradScaler, as the official code trains); "
    "on this CPU use precision=fp32 or precision=bf16"
)


@pytest.fixture(scope="module")
def digits():
    return load_run_dataset(default_config("er", dataset=DatasetConfig(name="digits")))


def digits_cfg(method="er", **changes):
    cfg = default_config(method, dataset=DatasetConfig(name="digits"))
    cfg.log.progress, cfg.buffer.size = False, 50
    for key, value in changes.items():
        group, _, name = key.partition("__")
        setattr(getattr(cfg, group), name, value) if name else setattr(cfg, group, value)
    return cfg


def comparable(results: dict) -> dict:
    return {k: v for k, v in results.items() if k not in TIMINGS}


# -- optimizer=adamw ---------------------------------------------------------------------------------------------
def test_adamw_group_has_ccl_dc_values_and_builds_torch_adamw():
    cfg = api.config(["optimizer=adamw"])
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.betas, cfg.optimizer.weight_decay) == (
        "adamw",
        5e-4,
        [0.9, 0.999],
        1e-4,
    )
    validate(cfg)
    opt = build_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3))])
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"]) == (5e-4, (0.9, 0.999), 1e-4)
    with pytest.raises(ConfigError, match=r"optimizer.name='adamx' is not allowed: choose one of \('sgd', 'adam', "):
        validate(api.config(["optimizer.name=adamx"]))


def test_adamw_steps_equal_a_hand_written_decoupled_weight_decay_adam():
    """Three steps on a float64 parameter against Loshchilov & Hutter's update written out: the decay multiplies
    the weights (p <- p - lr wd p) and never enters the moments, unlike Adam's L2 term."""
    cfg = default_config("er")
    cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.betas, cfg.optimizer.weight_decay = (
        "adamw",
        0.05,
        [0.8, 0.9],
        0.3,
    )
    p = torch.nn.Parameter(torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64))
    opt = build_optimizer(cfg, [p])
    grads = [torch.tensor(g, dtype=torch.float64) for g in ([0.3, -1.0, 2.0], [-0.5, 0.2, 0.1], [1.0, 1.0, -3.0])]
    lr, (b1, b2), wd, eps = 0.05, (0.8, 0.9), 0.3, 1e-8
    ref, m, v = [1.5, -2.0, 0.25], [0.0] * 3, [0.0] * 3
    for t, g in enumerate(grads, start=1):
        p.grad = g.clone()
        opt.step()
        for i, gi in enumerate(g.tolist()):
            ref[i] -= lr * wd * ref[i]  # decoupled: on the weight, before the Adam step
            m[i] = b1 * m[i] + (1 - b1) * gi
            v[i] = b2 * v[i] + (1 - b2) * gi * gi
            ref[i] -= lr * (m[i] / (1 - b1**t)) / (math.sqrt(v[i] / (1 - b2**t)) + eps)
        torch.testing.assert_close(p.detach(), torch.tensor(ref, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    # Adam with the same weight_decay (L2 in the gradient) lands elsewhere: the test tells the two apart
    q = torch.nn.Parameter(torch.tensor([1.5, -2.0, 0.25], dtype=torch.float64))
    adam = torch.optim.Adam([q], lr=lr, betas=(b1, b2), weight_decay=wd)
    for g in grads:
        q.grad = g.clone()
        adam.step()
    assert not torch.allclose(q.detach(), p.detach(), rtol=1e-4, atol=0)


def crash_at_batch_40(monkeypatch, cfg, run_dir):
    """Run `cfg` into `run_dir` until an exception in the middle of stream batch 40 (after the checkpoint at 25)."""
    observe, calls = Method.observe, []

    def crashing_observe(self, batch):
        calls.append(1)
        if len(calls) == 40:
            raise RuntimeError("simulated crash")
        return observe(self, batch)

    with monkeypatch.context() as patch:
        patch.setattr(Method, "observe", crashing_observe)
        with pytest.raises(RuntimeError, match="simulated crash"):
            run_experiment(cfg, run_dir)


# -- precision=fp16 ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("auto", marks=pytest.mark.skipif(torch.cuda.is_available(), reason="auto: CUDA"))]
)
def test_fp16_off_cuda_is_refused_in_one_line_before_anything_is_written(tmp_path, cli_in_process, device):
    validate(digits_cfg(precision="fp16"))  # the name is valid: the device is what refuses it
    with pytest.raises(ConfigError) as info:
        run_experiment(digits_cfg(precision="fp16", device=device), tmp_path / "api")
    assert str(info.value) == FP16_CPU_REFUSAL
    assert {p.name for p in (tmp_path / "api").iterdir()} <= {".cil.lock"}  # the folder's lock, nothing written
    run_dir = tmp_path / "cli"
    proc = cli_in_process(f"hydra.run.dir={run_dir}", "dataset=digits", "precision=fp16", f"device={device}")
    assert proc.returncode == 2
    assert f"error: {FP16_CPU_REFUSAL}\n" in proc.stderr
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_fp16_is_refused_for_avalanche_peers_which_train_in_fp32():
    cfg = default_config("avalanche_replay")
    cfg.precision = "fp16"
    with pytest.raises(ConfigError, match=r"precision='fp16' is not allowed: method=avalanche_replay trains Avalanche"):
        validate(cfg)


def er_method(precision, model=None, optimizer="sgd"):
    torch.manual_seed(0)
    model = model if model is not None else build_model("mlp", (1, 8, 8), 10, hidden=(16,))
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(model.parameters(), lr=0.1)
    cls = method_class("er")
    return cls(model, opt, None, cls.Config(), 10, torch.device("cpu"), precision=precision)


def test_fp16_step_scales_unscales_skips_on_inf_and_counts_good_steps():
    """Method.step under fp16 on the CPU's float16 autocast and an enabled GradScaler: the update equals the fp32
    update bit for bit (the scale is a power of two, unscaled before the step), a step whose gradient is inf
    changes nothing but halves the scale, and the growth counter counts the good steps."""
    half, full = er_method("fp16", optimizer="adam"), er_method("fp32", optimizer="adam")
    assert full.scaler is None
    assert isinstance(half.scaler, torch.amp.GradScaler) and half.scaler.is_enabled()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    with half.autocast():
        assert half.model(x).dtype == torch.float16
    for _ in range(3):
        for method in (half, full):
            method.step(F.cross_entropy(method.model(x), y))  # the loss in fp32: only the scaling differs
        for p, q in zip(half.model.parameters(), full.model.parameters(), strict=True):
            assert torch.equal(p, q)
    assert half.scaler.state_dict()["scale"] == 2.0**16 and half.scaler.state_dict()["_growth_tracker"] == 3
    params = [p.detach().clone() for p in half.model.parameters()]
    moments = copy.deepcopy(half.optimizer.state_dict()["state"])
    half.step((half.model(x) * math.inf).sum())  # inf gradients: the scaler skips the optimizer step
    assert all(torch.equal(p, q) for p, q in zip(half.model.parameters(), params, strict=True))
    after = half.optimizer.state_dict()["state"]
    assert all(torch.equal(after[k]["exp_avg"], moments[k]["exp_avg"]) for k in moments)
    assert half.scaler.state_dict()["scale"] == 2.0**15 and half.scaler.state_dict()["_growth_tracker"] == 0


def test_fp16_scaler_state_round_trips_through_the_method_state_and_a_saved_file():
    a = er_method("fp16")
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    a.step((a.model(x) * math.inf).sum())  # scale 2**15
    a.step(F.cross_entropy(a.model(x), y))  # growth tracker 1
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # as the checkpoint is read
    assert state["scaler"]["scale"] == 2.0**15 and state["scaler"]["_growth_tracker"] == 1
    b = er_method("fp16", model=copy.deepcopy(a.model))
    b.optimizer.load_state_dict(a.optimizer.state_dict())
    b.load_state_dict(state)
    assert b.scaler.state_dict() == a.scaler.state_dict()
    assert "scaler" not in er_method("fp32").state_dict()


@pytest.fixture
def fp16_on_cpu(monkeypatch):
    """Lift the runner's CUDA guard (the CPU's autocast and GradScaler do run float16), and let the scale double
    after every 2 good steps, so it climbs into fp16 overflow and skipped steps within a digits run: the skips
    then depend on the scaler's state, which a resumed run must restore to stay bit-identical."""
    monkeypatch.setattr(experiment, "check_precision", lambda name, device: None)
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, growth_interval=2))


@pytest.mark.slow
def test_fp16_ccl_dc_peer_has_its_own_scaler_and_a_crashed_run_resumes_bit_for_bit(tmp_path, fp16_on_cpu, monkeypatch):
    def cfg():
        c = digits_cfg(precision="fp16", log__every=15, checkpoint__every=25, stream__n_tasks=5)
        c.method.replay_batch_size = 10
        c.addon = {"ccl_dc": {}}
        return c

    built, history = [], {}
    init, update = Method.__init__, GradScaler.update

    def record(self, *args, **kwargs):
        init(self, *args, **kwargs)
        built.append(self)

    def record_scale(self, new_scale=None):
        update(self, new_scale)
        history.setdefault(id(self), []).append(self.get_scale())

    monkeypatch.setattr(Method, "__init__", record)
    monkeypatch.setattr(GradScaler, "update", record_scale)
    ref = run_experiment(cfg(), tmp_path / "ref")
    monkeypatch.setattr(Method, "__init__", init)
    monkeypatch.setattr(GradScaler, "update", update)
    method, peer = built
    assert ref["precision"] == "fp16"
    assert method.scaler is not peer.scaler and method.optimizer is not peer.optimizer
    for scaler in (method.scaler, peer.scaler):  # each stepped once per batch, and skipped steps on overflow
        scales = history[id(scaler)]
        assert len(scales) == ref["stream_batches"] and max(scales) > 2.0**16
        assert any(b < a for a, b in zip(scales, scales[1:], strict=False)), scales

    crash_at_batch_40(monkeypatch, cfg(), tmp_path / "run")
    assert 25 <= checkpoint_step(tmp_path / "run") < 40
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["method"]
    assert {"scale", "_growth_tracker"} <= set(saved["scaler"]) <= set(saved["addons"]["ccl_dc"]["method"]["scaler"])
    shutil.copytree(tmp_path / "run", tmp_path / "forgetful")
    resumed = run_experiment(cfg(), tmp_path / "run")
    assert comparable(resumed) == comparable(ref)
    assert (tmp_path / "run" / "metrics.csv").read_bytes() == (tmp_path / "ref" / "metrics.csv").read_bytes()
    # the control: a resume that starts the scalers over (scale 2**16) skips other steps and ends elsewhere
    monkeypatch.setattr(GradScaler, "load_state_dict", lambda self, state: None)
    assert comparable(run_experiment(cfg(), tmp_path / "forgetful"))["acc_matrix"] != ref["acc_matrix"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
# deterministic=true warns for a kernel without a deterministic CUDA form; the bit-for-bit check below still judges
@pytest.mark.filterwarnings("ignore:.*does not have a deterministic implementation:UserWarning")
def test_fp16_on_cuda_finishes_with_finite_loss_and_resumes_bit_for_bit(tmp_path, monkeypatch):
    def cfg():
        c = digits_cfg("er", precision="fp16", device="cuda", deterministic=True, log__every=15, checkpoint__every=25)
        c.model.name, c.method.replay_batch_size = "reduced_resnet18", 10
        c.addon = {"ccl_dc": {}}
        return c

    ref = run_experiment(cfg(), tmp_path / "ref")
    assert ref["status"] == "complete" and ref["precision"] == "fp16" and ref["warnings"] == []
    with open(tmp_path / "ref" / "metrics.csv") as f:
        losses = [float(row["value"]) for row in csv.DictReader(f) if row["key"] == "loss"]
    assert losses and all(math.isfinite(v) for v in losses)
    crash_at_batch_40(monkeypatch, cfg(), tmp_path / "run")
    assert "scaler" in torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["method"]
    assert comparable(run_experiment(cfg(), tmp_path / "run")) == comparable(ref)
    assert (tmp_path / "run" / "metrics.csv").read_bytes() == (tmp_path / "ref" / "metrics.csv").read_bytes()


# -- eval.classes ------------------------------------------------------------------------------------------------
class UnseenLargest(torch.nn.Module):
    """Logits that ignore the input: class c gets c, so the last class (unseen until the last task) is the largest.
    Its bias is not in the method's optimizer, so training never moves it."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.arange(num_classes, dtype=torch.float32))

    def forward(self, x):
        return self.bias.expand(len(x), -1) + 0 * x.flatten(1).sum(1, keepdim=True)


class ExtraHead(Addon):
    """An add-on head whose largest logit is the last class and, among the rest, class 0."""

    name = "extra_head"

    def eval_logits(self, method, x, head):
        if head != "extra":
            return None
        c = method.num_classes
        logits = -torch.arange(c, dtype=torch.float32, device=x.device)
        logits[c - 1] = 100.0
        return logits.expand(len(x), -1)

    def eval_heads(self):
        return ["extra"]


def per_task_accuracy(pred_of_task, stream, test_y):
    """Accuracy (%) on each task's test samples when every prediction is `pred_of_task` (a label)."""
    return [100.0 * float((test_y[t.test_idx] == pred_of_task).float().mean()) for t in stream.tasks]


@pytest.mark.parametrize("classes", ["seen", "all"])
def test_eval_classes_decides_the_argmax_of_every_evaluation(tmp_path, digits, classes):
    """Natural order, 5 tasks of 2 digits; the model's logits grow with the label. `seen`: every prediction is the
    largest seen label; `all`: always 9 (unseen until task 4). Pinned at task ends, anytime points, A_AUC points,
    an add-on's head (its largest unit 9, then 0: `seen` predicts 0 until task 4) and online accuracy, from the
    stream's own labels."""
    cfg = digits_cfg(stream__class_order="natural", eval__classes=classes, eval__anytime_every=2)
    cfg.eval.anytime_every_samples = 20
    learner = build_learner(cfg, tmp_path, digits)
    shorten_stream(learner.stream, 3)
    learner.method.model = UnseenLargest(10)
    learner.method.addons = [ExtraHead(AddonConfig(name="extra_head"), learner.method)]
    res = learner.run()
    stream, test_y = learner.stream, learner.test_y.cpu()
    everything = classes == "all"
    seen, online = set(), 0
    for batch in stream.batches():  # what the learner saw, batch by batch
        seen |= set(batch.y_host.tolist())
        online += int((batch.y_host == (9 if everything else max(seen))).sum())
    assert res["online_acc"] == pytest.approx(100.0 * online / stream.n_samples)
    for t, row in enumerate(res["acc_matrix"]):
        top_seen = 2 * t + 1  # after task t the seen labels are 0..2t+1 (both labels of every task appear)
        assert row == pytest.approx(per_task_accuracy(9 if everything else top_seen, stream, test_y), abs=1e-4)
        extra = res["heads"]["extra"]["acc_matrix"][t]
        extra_pred = 9 if everything or top_seen == 9 else 0  # 9 is seen after task 4
        assert extra == pytest.approx(per_task_accuracy(extra_pred, stream, test_y), abs=1e-4)
    before_last = [p for p in res["anytime_curve"] if p["step"] <= 4 * 3]
    auc = [p for p in res["auc_curve"] if p["step"] <= 4 * 3]
    assert before_last and auc
    # before task 4 no test sample is a 9: under `all` every point reads 0, under `seen` none does
    assert all((p["acc"] == 0.0) is everything for p in before_last + auc), (before_last, auc)


def test_predict_masks_only_under_seen():
    method = er_method("fp32", model=UnseenLargest(10))
    method.classes.mark_seen(torch.tensor([0, 3]), torch.tensor([0, 3]))
    x = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    assert predict(method, x, 2).tolist() == [3] * 4
    assert predict(method, x, 2, all_classes=True).tolist() == [9] * 4


def test_eval_classes_is_checked():
    with pytest.raises(ConfigError, match=r"eval.classes='unseen' is not allowed: choose one of \('seen', 'all'\)"):
        validate(digits_cfg(eval__classes="unseen"))


# -- stream.class_order=numpy_shuffle --------------------------------------------------------------------------
def test_numpy_shuffle_gives_the_official_orders_and_leaves_numpy_alone(digits):
    """The CIFAR-10 orders of docs/protocols.md ("Reproducing an official class order"), typed in."""
    official = {0: [2, 8, 4, 9, 1, 6, 7, 3, 0, 5], 1: [2, 9, 6, 4, 0, 3, 1, 7, 8, 5], 2: [4, 1, 5, 0, 7, 2, 3, 6, 9, 8]}
    before = np.random.get_state()[1].copy()  # noqa: NPY002 - the legacy global generator is what must stay put
    for seed, order in official.items():
        assert class_order(10, "numpy_shuffle", seed) == order
        stream = ClassIncrementalStream(digits, 5, order="numpy_shuffle", seed=seed)
        assert stream.class_order == order
        assert [t.classes.tolist() for t in stream.tasks] == [order[i : i + 2] for i in range(0, 10, 2)]
    assert np.array_equal(np.random.get_state()[1], before)  # noqa: NPY002 - numpy's global generator untouched
    assert sorted(class_order(200, "numpy_shuffle", 3)) == list(range(200))


def test_numpy_shuffle_refuses_seeds_numpy_cannot_take_and_unknown_orders_list_it():
    fix = "stream.class_order=numpy_shuffle seeds numpy's legacy generator, which takes seeds below 2\\*\\*32"
    with pytest.raises(ConfigError, match=f"seed=4294967296 is not allowed: {fix}"):
        validate(digits_cfg(stream__class_order="numpy_shuffle", seed=2**32))
    with pytest.raises(ConfigError, match=f"seed=4294967296 is not allowed: {fix}"):
        class_order(10, "numpy_shuffle", 2**32)
    validate(digits_cfg(stream__class_order="random", seed=2**32))  # only numpy_shuffle has numpy's limit
    with pytest.raises(ConfigError, match="use 'natural', 'random', 'numpy_shuffle' or a list of labels"):
        class_order(10, "numpy", 0)


# -- model.pool ----------------------------------------------------------------------------------------------------
def stages(model, x):
    out = F.relu(model.bn1(model.conv1(x)))
    return model.layer4(model.layer3(model.layer2(model.layer1(out))))


@pytest.mark.parametrize("nf", [64, 20])
def test_avg4_pool_gives_official_feature_sizes(nf):
    for side, cells in ((32, 1), (64, 4)):
        torch.manual_seed(0)
        model = ResNet18((3, side, side), 10, nf=nf, pool="avg4").eval()
        x = torch.randn(2, 3, side, side)
        feats = model.features(x)
        assert model.feature_dim == 8 * nf * cells and feats.shape == (2, 8 * nf * cells)
        assert model.head.in_features == model.feature_dim and model(x).shape == (2, 10)
        # the official layout: avg_pool2d(out, 4).view(B, -1), channel-major over the 2x2 cells at 64x64
        assert torch.equal(feats, F.avg_pool2d(stages(model, x), 4).view(2, -1))
    torch.manual_seed(0)
    pooled = ResNet18((3, 32, 32), 10, nf=nf, pool="avg4").eval()
    torch.manual_seed(0)
    plain = ResNet18((3, 32, 32), 10, nf=nf).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(pooled.features(x), plain.features(x), rtol=1e-6, atol=1e-7)  # 4x4 map: the same mean


@pytest.mark.slow
def test_global_pool_is_the_network_of_before_bit_for_bit():
    """Default and `global`: the same parameters from the same seed (11,173,962 with 10 classes, as always) and
    features that are adaptive_avg_pool2d(., 1) of the last stage, 512-d at 32x32 and at 64x64."""
    for side in (32, 64):
        torch.manual_seed(0)
        default = ResNet18((3, side, side), 10)
        torch.manual_seed(0)
        chosen = build_model("resnet18", (3, side, side), 10, pool="global")
        assert sum(p.numel() for p in chosen.parameters()) == 11_173_962 and chosen.feature_dim == 512
        for (k, a), (j, b) in zip(default.state_dict().items(), chosen.state_dict().items(), strict=True):
            assert k == j and torch.equal(a, b)
        x = torch.randn(2, 3, side, side)
        expected = torch.flatten(F.adaptive_avg_pool2d(stages(default, x), 1), 1)
        assert torch.equal(default.features(x), expected) and torch.equal(chosen.features(x), expected)
        assert torch.equal(default(x), chosen(x))


def test_model_pool_is_checked(tmp_path, digits):
    with pytest.raises(ConfigError, match=r"model.pool='max' is not allowed: choose one of \('global', 'avg4'\)"):
        validate(digits_cfg(model__pool="max"))
    with pytest.raises(ConfigError, match=r"model.pool='avg4' is not allowed: the MLP has no pooling"):
        validate(digits_cfg(model__pool="avg4"))
    cfg = digits_cfg(model__pool="avg4", model__name="resnet18")
    validate(cfg)
    with pytest.raises(ConfigError, match=r"model.pool='avg4' needs inputs of at least 25x25 pixels .* 8x8"):
        build_learner(cfg, tmp_path, digits)
