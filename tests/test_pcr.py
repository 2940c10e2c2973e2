"""PCR (cil/core/methods/pcr.py) against independent references written here from the paper and the official code
(FelixHuiweiLin/PCR: agents/pcr.py, utils/loss.py SupConLoss in 'proxy' mode, models/resnet.py cosLinear,
utils/setup_elements.py transforms_aug).

- The batched augmentation equals torchvision's per-image functional ops in the official order.
- The assembled step, driven through `Learner.train_batch` over a short digits stream: at every step the loss and
  every parameter's gradient equal a float64 reference computed from the parameters before the step, the recorded
  buffer draw and the recorded augmentation. The reference is the official SupConLoss in proxy mode, written
  as an anchor x row matrix (anchor i against the proxy of every row j's label, mean over the positive j).
- Evaluation uses the cosine head; incoming and replayed rows go through separate passes; `iters` shares the
  incoming augmentation; a short CLI run and a kill/resume are sane; bad knobs name their key.
"""

from __future__ import annotations

import copy
import functools
import json
import signal
from pathlib import Path

import pytest
import torch
import torchvision.transforms.functional as TF

from cil.core.augment import SimCLRAugment
from cil.core.buffer import ReplayBuffer
from cil.core.data import load_dataset
from cil.core.data.stream import ClassIncrementalStream
from cil.core.learner import Learner
from cil.core.methods.pcr import PCR, PCRConfig
from cil.core.models import build_model
from cil.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SHAPE = (1, 8, 8)
NUM_CLASSES = 10
N_TASKS = 5
ORDER = [3, 7, 0, 9, 5, 1, 8, 2, 6, 4]
BATCH = 10
TAU = 0.09  # official --pcr_temp
SCALE = 0.09  # official cosLinear.scale
EPS = 1e-6  # official norm epsilon
RTOL, ATOL = 1e-5, 1e-6


# ---------------------------------------------------------------------------------------------------------------
# The augmentation against torchvision, image by image
# ---------------------------------------------------------------------------------------------------------------
def torchvision_reference(img: torch.Tensor, p: dict, i: int, size) -> torch.Tensor:
    """transforms_aug of the official code on one [C, H, W] float image, with the drawn parameters of image i:
    RandomResizedCrop -> RandomHorizontalFlip -> RandomApply(ColorJitter, 0.8) -> RandomGrayscale(0.2)."""
    top, left, h, w = (int(v) for v in p["boxes"][i])
    out = TF.resized_crop(img, top, left, h, w, list(size), antialias=True)
    if p["flip"][i]:
        out = TF.hflip(out)
    if p["jitter"][i]:
        b, c, s, hue = (float(v) for v in p["factors"][i])
        ops = [
            lambda x: TF.adjust_brightness(x, b),
            lambda x: TF.adjust_contrast(x, c),
            lambda x: TF.adjust_saturation(x, s),
            lambda x: TF.adjust_hue(x, hue),
        ]
        for k in p["order"][i].tolist():
            out = ops[k](out)
    if p["gray"][i] and out.shape[0] == 3:
        out = TF.rgb_to_grayscale(out, num_output_channels=3)
    return out


@pytest.mark.parametrize("channels", [3, 1])
def test_augmentation_matches_torchvision_per_image(channels):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(64, channels, 16, 16, generator=g)
    aug = SimCLRAugment((16, 16))
    p = aug.draw(len(x), 16, 16, torch.Generator().manual_seed(1))
    out = aug.apply(x, p)
    # every branch is exercised
    for key in ("flip", "jitter", "gray"):
        assert 0 < int(p[key].sum()) < len(x), key
    assert sorted(p["order"][0].tolist()) == [0, 1, 2, 3] and len({tuple(o) for o in p["order"].tolist()}) > 5
    f = p["factors"]
    assert (f[:, :3] >= 0.6).all() and (f[:, :3] <= 1.4).all() and (f[:, 3].abs() <= 0.1).all()
    areas = p["boxes"][:, 2] * p["boxes"][:, 3] / 256.0
    assert areas.min() < 0.4 and (areas >= 0.2 - 0.05).all()  # scale (0.2, 1)
    # tolerance: torchvision's tensor luma weighs red 0.2989, PIL (the official code's path) and we 0.299
    for i in range(len(x)):
        torch.testing.assert_close(
            out[i], torchvision_reference(x[i], p, i, (16, 16)), rtol=0, atol=3e-4, msg=lambda m, i=i: f"image {i}: {m}"
        )


# ---------------------------------------------------------------------------------------------------------------
# The assembled step through the learner
# ---------------------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits():
    return load_dataset("digits")


def build(cfg: PCRConfig, buffer_size=60, seed=0) -> PCR:
    torch.manual_seed(seed)
    model = build_model("mlp", SHAPE, NUM_CLASSES, hidden=(32,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    buf = ReplayBuffer(buffer_size, SHAPE, seed=seed + 1)
    return PCR(model, opt, buf, cfg, NUM_CLASSES, torch.device("cpu"), seed=seed + 2, input_shape=SHAPE)


def stream_batches(n_tasks=3, per_task=6):
    ds = _digits()
    stream = ClassIncrementalStream(ds, N_TASKS, BATCH, order=ORDER, seed=0)
    out = []
    for b in stream.batches():
        if b.task >= n_tasks:
            break
        if b.step_in_task < per_task:
            out.append(b)
    return stream, out


def proxy_supcon_reference(feats: torch.Tensor, proxies: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SupConLoss(temperature=0.09, contrast_mode='proxy') on features [N, 2, D] = [normalised feature, normalised
    proxy of its label], written out: anchors z_i, contrast rows p_{y_j}, log-probabilities over j, mean over the
    j with y_j = y_i, mean over i."""
    z = feats / (feats.norm(dim=1, keepdim=True) + EPS)
    w = proxies / (proxies.norm(dim=1, keepdim=True) + EPS)
    contrast = w[y]  # [N, D], one proxy per row
    a = z @ contrast.T / TAU
    a = a - a.max(dim=1, keepdim=True).values.detach()
    log_prob = a - torch.log(torch.exp(a).sum(dim=1, keepdim=True))
    positive = (y[:, None] == y[None, :]).double()
    return (-(positive * log_prob).sum(1) / positive.sum(1)).mean()


def run_lockstep(cfg: PCRConfig, check):
    """Drive PCR over the stream, computing the reference from a float64 copy of the parameters before each step
    and the recorded draws; `check(method_loss, method_grads, ref_loss, ref_grads, names, info)`."""
    method = build(cfg)
    stream, batches = stream_batches()
    learner = Learner(stream, method, progress=False, anytime_every=0, log_every=10**9)
    samples, augments, captured = [], [], {}
    original_sample, original_apply, original_step = method.buffer.sample, method.augment.apply, method.step

    def sample(n, **filters):
        out = original_sample(n, **filters)
        samples.append((n, filters, tuple(t.clone() for t in out)))
        return out

    def apply(x, p):
        out = original_apply(x, p)
        augments.append((x.clone(), out.clone()))
        return out

    def step(loss):
        captured["loss"] = loss.detach().clone()
        original_step(loss)
        captured["grads"] = [None if p.grad is None else p.grad.clone() for p in method.model.parameters()]

    method.buffer.sample, method.augment.apply, method.step = sample, apply, step
    names = [n for n, _ in method.model.named_parameters()]
    for batch in batches:
        model64 = copy.deepcopy(method.model).double()
        n_buf = len(method.buffer)
        buf_x, buf_y = method.buffer.x[:n_buf].clone(), method.buffer.y[:n_buf].clone()
        samples.clear(), augments.clear(), captured.clear()
        learner.train_batch(batch)
        # the draw: min(10, stored) distinct stored rows, uniformly (any filter would be wrong)
        assert len(samples) == 1 and samples[0][0] == 10 and samples[0][1] == {}
        mem_x, mem_y, _ = samples[0][2]
        assert len(mem_y) == min(10, n_buf)
        flat = buf_x.flatten(1)
        hits = [int(((flat == r).all(1) & (buf_y == y)).sum()) for r, y in zip(mem_x.flatten(1), mem_y, strict=True)]
        assert all(h >= 1 for h in hits)
        # the augmentation: one call on the incoming rows followed by the replayed rows, as [0, 1] floats
        x_new, x_mem = batch.x.float() / 255.0, mem_x.float() / 255.0
        assert len(augments) == 1
        inp, out = augments[0]
        assert torch.equal(inp, torch.cat([x_new, x_mem])), "augmented something else than [incoming; replayed]"
        a_new, a_mem = out[: len(x_new)], out[len(x_new) :]
        rows = torch.cat([x_new, a_new, x_mem, a_mem]).double()
        y = torch.cat([batch.y, batch.y, mem_y, mem_y])
        params = list(model64.parameters())
        feats = model64.features(rows)
        if len(mem_y) == 0:  # the official first step: 0 * CE, zero gradients
            ref = (model64.features(torch.cat([x_new, a_new]).double()) @ model64.head.weight.T).sum() * 0.0
        else:
            ref = proxy_supcon_reference(feats, model64.head.weight, y)
        grads = torch.autograd.grad(ref, params, allow_unused=True)
        check(captured["loss"], captured["grads"], ref.detach(), grads, names, {"batch": batch, "n_mem": len(mem_y)})
    return method


def test_every_step_matches_the_official_loss():
    """Three tasks (the first step with an empty buffer, task starts, a full buffer of several tasks): the loss
    and every parameter's gradient equal the reference's; the head's bias is unused (no gradient)."""
    seen = []

    def check(loss, grads, ref_loss, ref_grads, names, info):
        where = f"task {info['batch'].task} batch {info['batch'].step_in_task}"
        torch.testing.assert_close(loss.double(), ref_loss, rtol=RTOL, atol=ATOL, msg=lambda m: f"{where}: {m}")
        for name, g, r in zip(names, grads, ref_grads, strict=True):
            if name == "head.bias":
                assert g is None and r is None, "the proxies are the head's weight rows only"
                continue
            assert g is not None and r is not None, f"{where}: {name} has no gradient"
            torch.testing.assert_close(g.double(), r, rtol=RTOL, atol=ATOL, msg=lambda m, n=name: f"{where} {n}: {m}")
        seen.append((info["n_mem"], float(ref_loss)))

    run_lockstep(PCRConfig(), check)
    assert seen[0] == (0, 0.0) and seen[-1][0] == 10 and all(loss > 0 for _, loss in seen[1:])


def test_defaults_are_the_official_ones():
    cfg = PCRConfig()
    assert (cfg.temperature, cfg.replay_batch_size, cfg.iters) == (0.09, 10, 1)
    assert cfg.augment and cfg.separate_passes
    aug = build(cfg).augment
    assert (aug.scale, aug.ratio, aug.flip_p, aug.jitter, aug.jitter_p, aug.grayscale_p) == (
        (0.2, 1.0),
        (3 / 4, 4 / 3),
        0.5,
        (0.4, 0.4, 0.4, 0.1),
        0.8,
        0.2,
    )


def test_passes_iters_and_the_evaluation_head():
    """separate_passes: two feature passes (incoming, replayed) per update, one without; iters=2: the incoming
    augmentation is drawn once per batch, the replay batch drawn and augmented at every update; evaluation and
    online logits are cos(f(x), w_c) / 0.09, whatever the head's bias."""
    _, batches = stream_batches(n_tasks=1, per_task=3)
    for separate, expect in ((True, 2), (False, 1)):
        method = build(PCRConfig(separate_passes=separate))
        calls = []
        original = method.model.features
        method.model.features = lambda x, calls=calls, original=original: (calls.append(len(x)), original(x))[1]
        for b in batches[:2]:
            method.observe(b), method.remember(b, None)
        assert calls[1:] == ([20, 20] if separate else [40]) and len(calls) == 1 + expect

    method = build(PCRConfig(iters=2))
    sizes = []
    original_apply = method.augment.apply
    method.augment.apply = lambda x, p: (sizes.append(len(x)), original_apply(x, p))[1]
    draws = []
    original_sample = method.buffer.sample
    method.buffer.sample = lambda n, **f: (draws.append(n), original_sample(n, **f))[1]
    for b in batches[:2]:
        method.observe(b), method.remember(b, None)
    assert sizes == [10, 20, 10] and draws == [10, 10, 10, 10]

    x = batches[0].x.float() / 255.0
    with torch.no_grad():
        method.head.bias.fill_(100.0)
        f, w = method.model.features(x).double(), method.head.weight.double()
        ref = (f / (f.norm(dim=1, keepdim=True) + EPS)) @ (w / (w.norm(dim=1, keepdim=True) + EPS)).T / SCALE
        torch.testing.assert_close(method.predict_logits(x).double(), ref, rtol=1e-5, atol=1e-5)
    out = method.observe(batches[2])
    assert out.logits.shape == (BATCH, NUM_CLASSES) and out.logits.abs().max() <= 1 / SCALE + 1e-4


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"replay_batch_size": 0}, "method.replay_batch_size"),
        ({"temperature": 0.0}, "method.temperature"),
        ({"temperature": -1.0}, "method.temperature"),
        ({"iters": 0}, "method.iters"),
    ],
)
def test_bad_knobs_name_their_key(changes, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        PCRConfig(**changes).validate()


# ---------------------------------------------------------------------------------------------------------------
# The command line: a short run, and a kill / resume that ends bit for bit where an uninterrupted run ends
# ---------------------------------------------------------------------------------------------------------------
ARGS = [
    "dataset=digits",
    "log.progress=false",
    "log.every=15",
    "eval.anytime_every=20",
    "checkpoint.every=25",
    "buffer.size=100",
    "method=pcr",
    "threads=1",
]


@pytest.mark.slow
def test_cli_run_is_sane_and_resumes_bit_for_bit_after_sigkill(tmp_path, monkeypatch):
    from test_resume import checkpoint_step, cli, comparable, run_here

    monkeypatch.setenv("PYTHONPATH", str(REPO))  # the runs import this checkout's cil, whatever is installed

    ref_dir = tmp_path / "ref" / "run"
    ref_dir.parent.mkdir()
    proc = run_here(ref_dir, ARGS)
    assert proc.returncode == 0, proc.stderr
    res = json.loads((ref_dir / "results.json").read_text())
    assert res["status"] == "complete" and res["config"]["method"]["name"] == "pcr"
    assert len(res["acc_matrix"]) == N_TASKS and 60 < res["final_avg_acc"] <= 100
    assert 0 < res["anytime_acc"] <= 100 and res["train_time_s"] > 0

    run_dir = tmp_path / "killed" / "run"
    run_dir.parent.mkdir()
    proc = cli(run_dir, ARGS, "observe:40:KILL")  # mid-step in task 1: augmentation generator and buffer in flight
    assert proc.returncode == -signal.SIGKILL
    assert 25 <= checkpoint_step(run_dir) < 40
    proc = run_here(run_dir, ARGS)
    assert proc.returncode == 0, proc.stderr
    assert comparable(run_dir) == comparable(ref_dir)
    assert (run_dir / "metrics.csv").read_bytes() == (ref_dir / "metrics.csv").read_bytes()
