"""The DISTRIBUTION of every random draw a method or add-on makes, against the official definition.

The lockstep tests (tests/test_reference_steps.py, test_ocm.py, test_onpro.py, test_pcr.py, test_derpp.py,
test_addons.py) replay each method's recorded draws, so they pin the losses but not the laws the draws come from.
Here the real code that makes each draw (the augmentations of cil/core/augment.py as each method builds them from
its default config, the methods' and add-ons' own helpers, the buffer's sampling) runs many times from a seeded
generator, and the empirical law is compared with the official one, whose constants are typed here (not read from
our config classes). Where possible the law is read from the outputs themselves: a grayscale row has equal
channels; on a coordinate-encoded image (channel 0 = column, channel 1 = row) the output reveals the crop box,
the crop offset and the flip; a constant-colour image reveals the colour-jitter factors.

Tolerances: counts against a binomial bound of Z = 6 standard deviations; continuous or fine-grained laws by a
two-sample or one-sample Kolmogorov-Smirnov gap below 2.5 sqrt(1/n + 1/m) (false alarm ~ 1e-5); categorical laws
and uniform draws without replacement (inclusion counts) by a chi-square below dof + 6 sqrt(2 dof) + 12. Every
seed is fixed, so the file is deterministic.

Official definitions (docs/protocols.md lists the commits; docs/methods.md the deviations):
- GSA (gydpku/GSA `GSA_CVPR/test_cifar100.py`, `CSL/tao.py`): A = RandomColorGrayLayer(p 0.2) then
  RandomResizedCropLayer(scale (0.6, 1), ratio (3/4, 4/3)); our default crop is torchvision's RandomResizedCrop
  (get_params: 10 attempts, first that fits, position uniform on the integers, central crop if none fits), the
  official affine crop is `method.crop=affine` (the same (h, w) law, centre k / L with k uniform on the integers
  [s - L, L - s], affine_grid / grid_sample with align_corners=False and reflection); views = RandomFlip(x, 2) =
  [A(x), hflip(A(x))] from one draw (`independent_views`: two draws); one more A on the new-data branch; Xc = B
  + onlysample(22, task) (without replacement); the mixed batch = int(64 (1 - r)) rows sampled with
  exclude_task=task (without replacement) + the first int(64 r) rows of Xc, r = |new classes| / |classes|.
- ER (Chaudhry et al. 2019) and ER-ACE (pclucas14/AML): the replay rows are a uniform draw without replacement from
  the whole buffer. ER-ACE's `augment=true` is GSA's A and views.
- DER++ (aimagelab/mammoth `datasets/seq_cifar10.py`, CCL-DC `baseline/derpp.py`): RandomCrop(size, padding=4)
  (offset uniform on 0..8 on each axis) then RandomHorizontalFlip(0.5), per sample; two independent replay draws.
- PCR (FelixHuiweiLin/PCR `utils/setup_elements.py`): RandomResizedCrop(scale (0.2, 1)), RandomHorizontalFlip(0.5),
  RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8) (factors uniform in [0.6, 1.4], hue in [-0.1, 0.1], the
  four in a uniformly random order), RandomGrayscale(0.2).
- OCM (gydpku/OCM `test_cifar10.py`, `InfoNCE/tao.py`): HorizontalFlipLayer (p 0.5), RandomColorGrayLayer(0.25),
  RandomResizedCropLayer(scale (0.3, 1)); feature window start `torch.randperm(D - P)[0]`, uniform on [0, D - P);
  the four rotations [X, rot180, rot90, rot270].
- OnPro (weilllllls/OnPro `train.py`, `modules/APF.py`): the same flip / grayscale 0.25 / crop (0.3, 1); offsets
  `torch.randperm(D - P)[0]`; APF pairs: round(m softmax(1 / distance)) rows per pair, the missing rows added one
  each to uniformly chosen pairs, the extra ones removed one each from uniformly chosen pairs with rows; rows of a
  pair drawn uniformly with replacement within each class (`np.random.choice(rows, n)`); one `torch.rand([]) <=
  mixup_p` per pair; lambda ~ Beta(0.4, 0.4) per row (`np.random.beta`). (OnPro's base mixup gate is not tested
  here.)
- MKD (Nicolas1203/mkd_ocl `gsa_ema.py` `tf_ema`, kornia 0.8.0): RandomResizedCrop (0.2, 1), flip 0.5,
  ColorJitter(0.4, 0.4, 0.4, 0.1) with p 0.8 (factors per image; the four ops in an order drawn per call,
  `torch.randperm(4)`), grayscale 0.2; its block's replay draw is uniform without replacement, R = the method's
  replay batch.
- CCL-DC (maorong-wang/CCL-DC `baseccl.py`, kornia 0.6.8): T1 = RandomResizedCrop (0.6, 1) + flip 0.5; x2 = RA(x1),
  x3 = RA(x2) with torchvision RandAugment(3, 15) on the uint8 batch tensor (one op choice per call for the batch).
  kornia's RandomResizedCrop (both versions) draws as torchvision's but keeps a candidate only if 0 < w < W and
  0 < h < H: no crop spans a whole side but its fallback (round(3/4 L) x L on a square image, placed at random).
- Reservoir (Vitter's algorithm R): the item at stream position n > M is kept with probability M / n, in a uniform
  slot. Class-balanced reservoir (Chrysakis & Moens, ICML 2020, Algorithm 1): an item of a class that is not full
  replaces a uniform instance of a largest class; an item of a full class is kept with probability m_c / n_c,
  replacing a uniform instance of its own class.
"""

from __future__ import annotations

import functools
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import RandAugment

from cil.core.addons.ccl_dc import CCLDC, CCLDCConfig
from cil.core.addons.mkd import MKD, MKDConfig
from cil.core.augment import rotation_views
from cil.core.buffer import ReplayBuffer
from cil.core.data.stream import Batch
from cil.core.methods.base import ClassSets
from cil.core.methods.derpp import DERPP, DERPPConfig
from cil.core.methods.er import ER, ERConfig
from cil.core.methods.er_ace import ERACE, ERACEConfig
from cil.core.methods.gsa import GSAConfig, GSAStep, gsa_augment
from cil.core.methods.ocm import OCM, OCMConfig
from cil.core.methods.onpro import OnPro, OnProConfig
from cil.core.methods.pcr import PCR, PCRConfig
from cil.core.models import build_model

CPU = torch.device("cpu")
Z = 6.0  # standard deviations of a count bound
KS_C = 2.5  # Kolmogorov-Smirnov bound factor: P(gap > KS_C sqrt(1/n + 1/m)) ~ 2 exp(-2 KS_C^2) = 7.5e-6
LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, torchvision's and the official layers' grayscale
RATIO = (3 / 4, 4 / 3)  # every resized crop here: aspect ratio range


# ---------------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------------
def assert_binomial(k: int, n: int, p: float, what: str) -> None:
    if p in (0.0, 1.0):
        assert k == n * p, f"{what}: {k} of {n}, expected all or none (p = {p})"
        return
    sd = math.sqrt(n * p * (1 - p))
    assert abs(k - n * p) <= Z * sd + 1, f"{what}: {k} of {n}, expected {n * p:.1f} +- {Z * sd:.1f} (p = {p})"


def ks_gap(a, b) -> float:
    a, b = np.sort(np.asarray(a, dtype=float)), np.sort(np.asarray(b, dtype=float))
    v = np.union1d(a, b)
    return float(np.abs(np.searchsorted(a, v, "right") / len(a) - np.searchsorted(b, v, "right") / len(b)).max())


def assert_same_law(sample, reference, what: str) -> None:
    gap, bound = ks_gap(sample, reference), KS_C * math.sqrt(1 / len(sample) + 1 / len(reference))
    assert gap <= bound, f"{what}: KS gap {gap:.4f} > {bound:.4f} (n = {len(sample)})"


def assert_uniform(sample, lo: float, hi: float, what: str) -> None:
    """One-sample KS against U[lo, hi], and the support."""
    s = np.sort(np.asarray(sample, dtype=float))
    n = len(s)
    assert s[0] >= lo - 1e-6 and s[-1] <= hi + 1e-6, f"{what}: outside [{lo}, {hi}]: {s[0]}, {s[-1]}"
    cdf = (s - lo) / (hi - lo)
    gap = max(np.abs(np.arange(1, n + 1) / n - cdf).max(), np.abs(np.arange(n) / n - cdf).max())
    assert gap <= KS_C / math.sqrt(n), f"{what}: KS gap to U[{lo}, {hi}] {gap:.4f} > {KS_C / math.sqrt(n):.4f}"


def assert_chi2(observed, expected, what: str, dof: int | None = None, scale: float = 1.0) -> None:
    observed, expected = np.asarray(observed, dtype=float), np.asarray(expected, dtype=float)
    dof = len(observed) - 1 if dof is None else dof
    chi2 = float(((observed - expected) ** 2 / expected).sum()) / scale
    bound = dof + Z * math.sqrt(2 * dof) + 12  # the + 12 keeps the false alarm near 1e-6 at a few dof too
    assert chi2 <= bound, f"{what}: chi2 {chi2:.1f} > {bound:.1f} ({dof} dof)"


def assert_uniform_inclusion(counts, draws: int, per_draw: int, what: str) -> None:
    """counts[i]: how often item i was among `per_draw` distinct items drawn uniformly without replacement out of
    K = len(counts), in `draws` draws. sum (O - E)^2 / E has mean K - per_draw, so scaled by
    f = (K - per_draw) / (K - 1) it is ~ chi2(K - 1)."""
    k = len(counts)
    f = (k - per_draw) / (k - 1)
    assert_chi2(counts, np.full(k, draws * per_draw / k), what, scale=f)


def assert_uniform_offsets(pos, room, what: str) -> None:
    """pos[i] uniform on the integers 0..room[i]: bounds, the mean, and how often each end is hit."""
    pos, room = np.asarray(pos, dtype=float), np.asarray(room, dtype=float)
    assert (pos >= 0).all() and (pos <= room).all(), f"{what}: an offset outside 0..room"
    assert room.any(), f"{what}: no room at all"
    stat = (pos - room / 2).sum() / math.sqrt((((room + 1) ** 2 - 1) / 12).sum())
    assert abs(stat) <= Z, f"{what}: mean offset {stat:.1f} sd from the centre"
    p = 1 / (room + 1)
    sd = math.sqrt((p * (1 - p)).sum())
    for end, hits in (("0", pos == 0), ("room", pos == room)):
        assert abs(hits.sum() - p.sum()) <= Z * sd + 1, f"{what}: offset {end} hit {hits.sum()}, expected {p.sum():.0f}"


# ---------------------------------------------------------------------------------------------------------------
# Reference laws and decoders
# ---------------------------------------------------------------------------------------------------------------
def crop_candidates(size: int, scale: tuple[float, float], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(h, w) of n x 10 candidates: area ~ U(scale) x size^2, log aspect ~ U(log 3/4, log 4/3), w = round(sqrt(A r)),
    h = round(sqrt(A / r))."""
    rng = np.random.default_rng(seed)
    target = size * size * rng.uniform(scale[0], scale[1], (n, 10))
    aspect = np.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1]), (n, 10)))
    return np.round(np.sqrt(target / aspect)), np.round(np.sqrt(target * aspect))


@functools.lru_cache(maxsize=8)
def reference_hw(size: int, scale: tuple[float, float], n: int = 400_000, seed: int = 0):
    """(h, w) of torchvision's RandomResizedCrop.get_params on a size x size image (also the official affine crop
    layer's law): of 10 candidates (`crop_candidates`) the first that fits (w <= size, h <= size); none fits: the
    whole (square) image."""
    h, w = crop_candidates(size, scale, n, seed)
    fits = (w > 0) & (w <= size) & (h > 0) & (h <= size)
    first, rows = fits.argmax(1), np.arange(n)
    found = fits.any(1)
    return np.where(found, h[rows, first], size), np.where(found, w[rows, first], size)


def assert_crop_law(h, w, size: int, scale: tuple[float, float], what: str, inside: bool = False) -> None:
    """The (h, w) law of `reference_hw`; `inside`: only the crops with both sides below `size`, whose law, given
    that, is also kornia's (its RandomResizedCrop keeps only such candidates: every kept candidate has the same
    probability ratio under both rules, and the first-fit selection only rescales it)."""
    rh, rw = reference_hw(size, scale)
    h, w = np.asarray(h, dtype=float), np.asarray(w, dtype=float)
    if inside:
        keep, ref_keep = (h < size) & (w < size), (rh < size) & (rw < size)
        h, w, rh, rw = h[keep], w[keep], rh[ref_keep], rw[ref_keep]
    assert_same_law(h * w, rh * rw, f"{what}: crop area")
    assert_same_law(np.log(w / h), np.log(rw / rh), f"{what}: crop aspect ratio")


def coordinate_images(n: int, size: int, scale: float = 1.0, offset: float = 0.0, blue: float = 0.0) -> torch.Tensor:
    """[n, 3, size, size]: channel 0 = offset + scale x column, channel 1 = offset + scale x row, channel 2 = blue."""
    ramp = torch.arange(size, dtype=torch.float64) * scale + offset
    img = torch.stack([ramp.expand(size, size), ramp[:, None].expand(size, size), torch.full((size, size), blue)])
    return img.float().expand(n, -1, -1, -1).contiguous()


def is_gray(out: torch.Tensor) -> np.ndarray:
    """Rows whose three channels are equal at every pixel."""
    return (((out[:, 0] - out[:, 1]).abs() + (out[:, 1] - out[:, 2]).abs()).flatten(1).amax(1) < 1e-6).numpy()


def integers(v: torch.Tensor, what: str, tol: float = 1e-3) -> np.ndarray:
    r = v.double().round()
    assert (v.double() - r).abs().max() < tol, f"{what}: not integers: {v[(v.double() - r).abs() >= tol][:5]}"
    return r.long().numpy()


def resized_crop_boxes(out: torch.Tensor, scale: float = 1.0, offset: float = 0.0):
    """(top, left, h, w, flipped) of resized crops (upscaled: box <= output size) of coordinate images, read from
    the output's corner pixels: with torchvision's resized_crop semantics the first and last output pixels sample
    the box's first and last pixels exactly."""
    x = (out[:, 0, 0, :].double() - offset) / scale
    y = (out[:, 1, :, 0].double() - offset) / scale
    flipped = (x[:, -1] < x[:, 0]).numpy()
    left, right = (
        integers(torch.minimum(x[:, 0], x[:, -1]), "left"),
        integers(torch.maximum(x[:, 0], x[:, -1]), "right"),
    )
    top, bottom = integers(y[:, 0], "top"), integers(y[:, -1], "bottom")
    return top, left, bottom - top + 1, right - left + 1, flipped


def affine_crop_params(out: torch.Tensor, size: int):
    """(h, w, ky, kx, flipped) of the official affine crop of coordinate images: theta = [[w/L, 0, kx/L],
    [0, h/L, ky/L]], affine_grid + grid_sample (align_corners=False, reflection), so output column j reads column
    clip(px_j, 0, L - 1), px_j = (L - 1)/2 + kx/2 + w (2j + 1 - L)/(2L) (exact for a linear image). Checked on every
    column / row; a flip before the crop shows as L - 1 - clip(px_j)."""
    x = out[:, 0, 0, :].double()
    y = out[:, 1, :, 0].double()
    flipped = x[:, -2] < x[:, 1]
    x = torch.where(flipped[:, None], size - 1 - x, x)
    j = torch.arange(size, dtype=torch.float64)
    params = []
    for v, name in ((y, "row"), (x, "column")):
        extent = integers(size * (v[:, size - 2] - v[:, 1]) / (size - 3), f"crop {name} extent")
        e = torch.from_numpy(extent).double()
        k = integers(2 * (v[:, 1] - (size - 1) / 2 - e * (3 - size) / (2 * size)), f"crop {name} centre")
        px = (size - 1) / 2 + torch.from_numpy(k).double()[:, None] / 2 + e[:, None] * (2 * j + 1 - size) / (2 * size)
        assert (v - px.clamp(0, size - 1)).abs().max() < 1e-3, f"the affine crop's {name} sampling grid"
        params += [extent, k]
    return params[0], params[2], params[1], params[3], flipped.numpy()


def id_images(ids, shape=(1, 1, 2)) -> torch.Tensor:
    """uint8 images carrying an id < 65536 in their first two values (id // 256, id % 256)."""
    ids = torch.as_tensor(ids)
    x = torch.zeros(len(ids), int(np.prod(shape)), dtype=torch.uint8)
    x[:, 0], x[:, 1] = (ids // 256).to(torch.uint8), (ids % 256).to(torch.uint8)
    return x.view(len(ids), *shape)


def read_ids(x: torch.Tensor, scale: float = 1.0) -> list[int]:
    v = (x.reshape(len(x), -1)[:, :2].double() * scale).round().long()
    return (v[:, 0] * 256 + v[:, 1]).tolist()


def make_method(cls, cfg, shape, buffer=None, num_classes=10, seed=0, hidden=(32,)):
    torch.manual_seed(seed)
    model = build_model("mlp", shape, num_classes, hidden=hidden)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return cls(model, opt, buffer, cfg, num_classes, CPU, seed=seed, input_shape=shape)


def gsa_step(buffer=None, size: int = 16, seed: int = 0, **cfg) -> GSAStep:
    """GSA's step as the method builds it (GSAConfig defaults unless overridden), stored rows as model input."""
    return GSAStep(
        GSAConfig(**cfg),
        buffer,
        ClassSets(10, CPU),
        torch.Generator().manual_seed(seed),
        (size, size),
        lambda x: x.float(),
    )


def batch_of(ids, labels, task: int, shape=(1, 1, 2), step_in_task: int = 5) -> Batch:
    y = torch.as_tensor(labels)
    return Batch(id_images(ids, shape), y, y.clone(), task, 0, step_in_task)


def recorded(fn, calls: list):
    def wrapper(x, *args, **kwargs):
        calls.append(x.detach().clone())
        return fn(x, *args, **kwargs)

    return wrapper


# ---------------------------------------------------------------------------------------------------------------
# GSA (and ER-ACE's augment=true): grayscale + resized crop, views, the new-branch pass
# ---------------------------------------------------------------------------------------------------------------
S = 16  # image side for the GSA-style augmentation tests


def gsa_like_augment(source: str):
    """(augmentation, generator) as GSA (GSAConfig defaults) or ER-ACE with augment=true builds them."""
    if source == "gsa":
        step = gsa_step()
        return step.augment, step.generator
    method = make_method(ERACE, ERACEConfig(augment=True), (3, S, S))
    return method.augment, method.generator


@pytest.mark.parametrize("source", ["gsa", "er_ace"])
def test_gsa_augment_grayscale_then_torchvision_resized_crop(source):
    """A(x): grayscale with p 0.2, resized crop of scale (0.6, 1), ratio (3/4, 4/3), uniform integer position, no
    flip; read from the outputs of coordinate images."""
    aug, g = gsa_like_augment(source)
    n = 20_000
    out = aug(coordinate_images(n, S), g)
    gray = is_gray(out)
    assert_binomial(int(gray.sum()), n, 0.2, "grayscale rows")
    color = out[torch.from_numpy(~gray)]
    assert (color[:, 2] == 0).all(), "a non-grayscale row mixes channels"
    top, left, h, w, flipped = resized_crop_boxes(color)
    assert not flipped.any(), "A flips"
    assert_crop_law(h, w, S, (0.6, 1.0), source)
    assert_uniform_offsets(top, S - h, "crop top")
    assert_uniform_offsets(left, S - w, "crop left")


@pytest.mark.parametrize("source", ["gsa_affine", "ocm", "onpro"])
def test_affine_crop_flip_and_grayscale_laws(source):
    """The official crop layer (GSA with method.crop=affine; OCM and OnPro by default): the (h, w) law of the
    resized crop, centre k uniform on the integers [s - L, L - s], reflection outside; grayscale p; OCM and OnPro
    flip with p 0.5 before it (GSA's A never flips)."""
    n = 20_000
    x = coordinate_images(n, S)
    if source == "gsa_affine":
        step = gsa_step(crop="affine")
        out, gray_p, flip_p, scale = step.augment(x, step.generator), 0.2, 0.0, (0.6, 1.0)
    elif source == "ocm":
        method = make_method(OCM, OCMConfig(proj_dim=16), (3, S, S))
        out, gray_p, flip_p, scale = method.simclr_augment(x), 0.25, 0.5, (0.3, 1.0)
    else:
        method = make_method(OnPro, OnProConfig(proj_dim=16), (3, S, S))
        out, gray_p, flip_p, scale = method.augment(x), 0.25, 0.5, (0.3, 1.0)
    gray = is_gray(out)
    assert_binomial(int(gray.sum()), n, gray_p, "grayscale rows")
    flips = (out[:, 0, 0, -2] < out[:, 0, 0, 1]).numpy()  # channel 0 (or the luma) runs right to left
    assert_binomial(int(flips.sum()), n, flip_p, "flipped rows")
    h, w, ky, kx, flipped = affine_crop_params(out[torch.from_numpy(~gray)], S)
    assert (flipped == flips[~gray]).all()
    assert_crop_law(h, w, S, scale, source)
    assert_uniform_offsets(ky + S - h, 2 * (S - h), "crop centre (rows)")
    assert_uniform_offsets(kx + S - w, 2 * (S - w), "crop centre (columns)")


@pytest.mark.parametrize("source", ["gsa", "gsa_independent", "er_ace"])
def test_two_views_flip_the_second_view_of_one_draw(source):
    """Views = [A(x), hflip(A(x))]: the first view is never flipped, the second is the exact flip of the first;
    with independent_views the second is the flip of an independent draw A'(x) of the same law."""
    n = 8000
    if source == "er_ace":
        method = make_method(ERACE, ERACEConfig(augment=True), (3, S, S))
        x = (coordinate_images(n, S) * 16).to(torch.uint8)  # stored images; to_input divides by 255
        v, y = method._views(x, torch.zeros(n, dtype=torch.long))
        v = v * 255 / 16
        assert len(y) == 2 * n
    else:
        step = gsa_step(**({"independent_views": True} if source == "gsa_independent" else {}))  # else defaults
        v = step.views(coordinate_images(n, S))
    assert len(v) == 2 * n
    first, second = v[:n], v[n:].flip(-1)  # second view flipped back
    for view in (first, second):
        assert (view[:, 0, 0, -1] > view[:, 0, 0, 0]).all(), "a view with the wrong flip"
        assert_binomial(int(is_gray(view).sum()), n, 0.2, "grayscale rows of a view")
    if source != "gsa_independent":
        assert torch.equal(first, second), "the second view is not the flip of the first"
        return
    g1, g2 = is_gray(first), is_gray(second)
    assert_binomial(int((g1 & g2).sum()), n, 0.04, "both views grayscale (independent draws)")
    both = torch.from_numpy(~g1 & ~g2)
    b1, b2 = resized_crop_boxes(first[both])[:4], resized_crop_boxes(second[both])[:4]
    same = np.all([a == b for a, b in zip(b1, b2, strict=True)], axis=0)
    assert same.mean() < 0.05, f"{same.mean():.3f} of the rows have the same crop in both views"
    assert_crop_law(b2[2], b2[3], S, (0.6, 1.0), "second view")


def test_gsa_new_branch_pass_is_one_more_independent_A_per_view_row():
    """The new-data branch trains on A2(views): each of the 2n view rows gets its own grayscale (p 0.2) and
    resized crop (scale 0.6-1), also the two views of one image. Run through GSAStep.loss; the crop of the second
    pass is read by locating its corner pixels in the view it was applied to."""
    n = 4000
    step = gsa_step()
    step.classes.start_task(0, torch.tensor([0, 1]))
    y = torch.zeros(n, dtype=torch.long)
    step.classes.mark_seen(y, y)
    views, seen = [], []
    real_views = step.views

    def record_views(x, augment=None):
        out = real_views(x, augment)
        views.append(out.detach().clone())
        return out

    def forward(inp):
        seen.append(inp.detach().clone())
        return torch.zeros(len(inp), 10)

    step.views = record_views
    step.loss(forward, coordinate_images(n, S), y, task=0, step_in_task=0)
    assert len(views) == 1 and len(seen) == 1, "one views call and one forward pass without a buffer"
    v1 = views[0]
    v2 = seen[0]
    assert v2.shape == v1.shape == (2 * n, 3, S, S)
    g1, g2 = is_gray(v1), is_gray(v2)
    assert (g2 | ~g1).all(), "a grayscale view row is colour after the second pass"
    assert_binomial(int(g2[~g1].sum()), int((~g1).sum()), 0.2, "second-pass grayscale")
    pair = ~g1[:n]  # the two views of image i are rows i and n + i (they share their first grayscale draw)
    assert_binomial(int((g2[:n] & g2[n:])[pair].sum()), int(pair.sum()), 0.04, "second pass grayscale on both views")
    rows = torch.from_numpy(~g1 & ~g2)
    a, b = v1[rows], v2[rows]

    def locate(line, value):  # index of the pixel of a strictly monotone line holding value, exactly
        d = (line - value[:, None]).abs()
        assert d.amin(1).max() < 1e-4, "a second-pass corner pixel is not a pixel of its view"
        return d.argmin(1).numpy()

    left, right = locate(a[:, 0, 0, :], b[:, 0, 0, 0]), locate(a[:, 0, 0, :], b[:, 0, 0, -1])
    top, bottom = locate(a[:, 1, :, 0], b[:, 1, 0, 0]), locate(a[:, 1, :, 0], b[:, 1, -1, 0])
    h, w = bottom - top + 1, right - left + 1
    assert_crop_law(h, w, S, (0.6, 1.0), "second pass")
    assert_uniform_offsets(top, S - h, "second-pass crop top")
    assert_uniform_offsets(left, S - w, "second-pass crop left")


# ---------------------------------------------------------------------------------------------------------------
# Replay draws: GSA's current-task rows and mixed batch, ER, ER-ACE
# ---------------------------------------------------------------------------------------------------------------
TASK_LABELS = {0: [0, 1], 1: [2, 3], 2: [4], 3: [6, 7]}  # task 3 is current; class 5 not seen yet
TASK_ITEMS = {0: 40, 1: 40, 2: 30, 3: 40}


def filled_buffer(capacity=300, seed=1, extras=None, shape=(1, 1, 2)) -> tuple[ReplayBuffer, dict[int, int]]:
    """A buffer holding TASK_ITEMS[t] items of each task t (ids 100 t + i), not full (empty slots exist)."""
    buf = ReplayBuffer(capacity, shape, seed=seed, extras=extras)
    task_of = {}
    for t, count in TASK_ITEMS.items():
        ids = [100 * t + i for i in range(count)]
        labels = torch.tensor([TASK_LABELS[t][i % len(TASK_LABELS[t])] for i in range(count)])
        more = {name: torch.zeros(count, *s, dtype=dt) for name, (s, dt) in (extras or {}).items()}
        buf.add(id_images(ids, shape), labels, t, **more)
        task_of.update(dict.fromkeys(ids, t))
    return buf, task_of


def test_gsa_current_task_rows_and_balanced_mixed_batch():
    """Xc = B + 22 rows of the current task (uniform, without replacement); the mixed batch = floor(64 (1 - r))
    rows of the other tasks (uniform, without replacement) + the first floor(64 r) rows of Xc, r = 2/7 here
    (45 and 18). Through GSAStep.loss (augmentation off, so the forward inputs carry the rows' ids)."""
    buf, task_of = filled_buffer()
    step = gsa_step(buf, augment=False)
    step.classes.start_task(3, torch.tensor(TASK_LABELS[3]))
    seen = torch.tensor(sum(TASK_LABELS.values(), []))
    step.classes.mark_seen(seen, seen)
    incoming = list(range(900, 910))
    x, y = id_images(incoming), torch.tensor([6, 7] * 5)
    current = [i for i, t in task_of.items() if t == 3]
    others = [i for i, t in task_of.items() if t != 3]
    in_xc = dict.fromkeys(current, 0)
    in_first = dict.fromkeys(current, 0)  # among the rows of Xc that the mixed batch takes
    in_old = dict.fromkeys(others, 0)
    calls = 300
    for _ in range(calls):
        inputs = []

        def forward(inp, inputs=inputs):
            inputs.append(inp)
            return torch.zeros(len(inp), 10)

        step.loss(forward, x, y, task=3, step_in_task=10)
        assert len(inputs) == 2
        xc = read_ids(inputs[0][: len(inputs[0]) // 2])
        mixed = read_ids(inputs[1][: len(inputs[1]) // 2])
        assert xc[:10] == incoming, "Xc starts with the incoming batch"
        drawn = xc[10:]
        assert len(drawn) == 22 and len(set(drawn)) == 22, f"22 distinct current-task rows, got {drawn}"
        assert all(task_of[i] == 3 for i in drawn), "a row of another task in Xc"
        old = [i for i in mixed if i not in set(xc)]
        assert len(old) == 45 and len(set(old)) == 45, f"floor(64 * 5/7) = 45 distinct other-task rows, got {len(old)}"
        assert all(task_of.get(i, 3) != 3 for i in old), "a current-task row among the other-task rows"
        assert sorted(i for i in mixed if i in set(xc)) == sorted(xc[:18]), "the first floor(64 * 2/7) = 18 rows of Xc"
        for i in drawn:
            in_xc[i] += 1
        for i in set(xc[:18]) - set(incoming):
            in_first[i] += 1
        for i in old:
            in_old[i] += 1
    assert_uniform_inclusion(list(in_xc.values()), calls, 22, "current-task rows of Xc")
    assert_uniform_inclusion(list(in_first.values()), calls, 8, "current-task rows taken into the mixed batch")
    assert_uniform_inclusion(list(in_old.values()), calls, 45, "other-task rows of the mixed batch")


@pytest.mark.parametrize("name", ["er", "er_ace"])
def test_er_and_er_ace_replay_uniform_without_replacement_from_the_whole_buffer(name):
    """replay_batch_size (10) rows, distinct, uniform over every filled slot of every task (current one included)."""
    buf, task_of = filled_buffer()
    cls, cfg = (ER, ERConfig()) if name == "er" else (ERACE, ERACEConfig())
    method = make_method(cls, cfg, (1, 1, 2), buffer=buf, hidden=(4,))
    method.on_task_start(3, torch.tensor(TASK_LABELS[3]))
    inputs: list[torch.Tensor] = []
    method.forward_float = recorded(method.forward_float, inputs)
    counts = dict.fromkeys(task_of, 0)
    calls = 400
    for _ in range(calls):
        inputs.clear()
        method.observe(batch_of(range(900, 910), [6, 7] * 5, 3))
        ids = read_ids(torch.cat(inputs)[10:], 255)
        assert len(ids) == 10 and len(set(ids)) == 10, f"10 distinct replayed rows, got {ids}"
        for i in ids:
            counts[i] += 1
    assert_uniform_inclusion(list(counts.values()), calls, 10, f"{name} replay rows")


# ---------------------------------------------------------------------------------------------------------------
# DER++
# ---------------------------------------------------------------------------------------------------------------
def test_derpp_crop_with_padding_then_flip():
    """RandomCrop(16, padding=4) then RandomHorizontalFlip(0.5), per sample: the window's corner uniform on
    0..8 x 0..8, independent of the flip (p 0.5); the output is that window of the zero-padded image."""
    n, pad = 20_000, 4
    method = make_method(DERPP, DERPPConfig(augment=True), (2, S, S))
    ramp = torch.arange(1, S + 1, dtype=torch.uint8)
    x = torch.stack([ramp.expand(S, S), ramp[:, None].expand(S, S)]).expand(n, -1, -1, -1).contiguous()
    out = method.augment_images(x)
    assert out.shape == x.shape and out.dtype == torch.uint8
    o = out.long()
    flipped = (o[:, 0, pad, pad + 1] < o[:, 0, pad, pad]).numpy()
    row = (o[:, 1, pad].amax(1) - 1).numpy()
    col = np.where(flipped, o[:, 0, pad, S - 1 - pad].numpy(), o[:, 0, pad, pad].numpy()) - 1
    padded = F.pad(x, (pad, pad, pad, pad))
    for i in range(0, n, 97):  # the whole window, zero fill included, on a sample of rows
        window = padded[i, :, row[i] : row[i] + S, col[i] : col[i] + S]
        assert torch.equal(out[i], window.flip(-1) if flipped[i] else window), i
    assert row.min() == 0 and col.min() == 0 and row.max() == 2 * pad and col.max() == 2 * pad
    assert_binomial(int(flipped.sum()), n, 0.5, "flips")
    cells = np.bincount((row * 9 + col) * 2 + flipped.astype(int), minlength=162)
    assert len(cells) == 162
    assert_chi2(cells, np.full(162, n / 162), "crop corner (row, column) x flip")


def test_derpp_two_independent_replay_draws():
    """Each step draws two batches of 64 rows, each uniform without replacement, independent of each other: their
    overlap is hypergeometric (mean 64^2 / K)."""
    extras = DERPP.buffer_extras(DERPPConfig(), 10)
    buf, task_of = filled_buffer(extras=extras)
    method = make_method(DERPP, DERPPConfig(), (1, 1, 2), buffer=buf, hidden=(4,))
    method.on_task_start(3, torch.tensor(TASK_LABELS[3]))
    inputs: list[torch.Tensor] = []
    method.forward = recorded(method.forward, inputs)
    k, r = len(task_of), 64
    counts = [dict.fromkeys(task_of, 0), dict.fromkeys(task_of, 0)]
    overlap, calls = 0, 200
    for _ in range(calls):
        inputs.clear()
        method.observe(batch_of(range(900, 910), [6, 7] * 5, 3))
        assert len(inputs) == 3, "three passes: incoming, MSE draw, CE draw"
        draws = [read_ids(inputs[1]), read_ids(inputs[2])]
        for d, c in zip(draws, counts, strict=True):
            assert len(d) == r and len(set(d)) == r
            for i in d:
                c[i] += 1
        overlap += len(set(draws[0]) & set(draws[1]))
    for c in counts:
        assert_uniform_inclusion(list(c.values()), calls, r, "DER++ replay rows")
    mean = r * r / k
    var = r * (r / k) * ((k - r) / k) * ((k - r) / (k - 1))
    sd = math.sqrt(calls * var)
    assert abs(overlap - calls * mean) <= Z * sd, f"overlap {overlap}, expected {calls * mean:.0f} +- {Z * sd:.0f}"


# ---------------------------------------------------------------------------------------------------------------
# PCR
# ---------------------------------------------------------------------------------------------------------------
def test_pcr_augmentation_parameter_laws():
    """PCR's A as the method builds it: resized crop (0.2, 1), flip 0.5, jitter on with p 0.8, factors uniform in
    [0.6, 1.4] (brightness, contrast, saturation) and [-0.1, 0.1] (hue), the four ops in a uniformly random order,
    grayscale 0.2, each an independent draw per image (the parameters as `draw` returns them; `apply` is checked
    against torchvision image by image in tests/test_pcr.py)."""
    n, size = 40_000, 8
    aug = make_method(PCR, PCRConfig(), (3, size, size)).augment
    p = aug.draw(n, size, size, torch.Generator().manual_seed(3))
    flags = {k: p[k].numpy() for k in ("flip", "jitter", "gray")}
    for key, rate in (("flip", 0.5), ("jitter", 0.8), ("gray", 0.2)):
        assert_binomial(int(flags[key].sum()), n, rate, key)
    joint = np.bincount(flags["flip"] * 4 + flags["jitter"] * 2 + flags["gray"], minlength=8)
    prob = np.array([(0.5) * (0.8 if j else 0.2) * (0.2 if g else 0.8) for f in (0, 1) for j in (0, 1) for g in (0, 1)])
    assert_chi2(joint, n * prob, "flip x jitter x grayscale")
    f = p["factors"].double().numpy()
    for col, name in enumerate(("brightness", "contrast", "saturation")):
        assert_uniform(f[:, col], 0.6, 1.4, name)
    assert_uniform(f[:, 3], -0.1, 0.1, "hue")
    order = p["order"].numpy()
    assert (np.sort(order, 1) == np.arange(4)).all()
    perm = {q: i for i, q in enumerate(itertools.permutations(range(4)))}
    cells = np.bincount([perm[tuple(o)] for o in order.tolist()], minlength=24)
    assert_chi2(cells, np.full(24, n / 24), "jitter order")
    top, left, h, w = p["boxes"].numpy().T
    assert_crop_law(h, w, size, (0.2, 1.0), "PCR")
    assert_uniform_offsets(top, size - h, "crop top")
    assert_uniform_offsets(left, size - w, "crop left")


def test_pcr_augmentation_outputs():
    """The same rates read from PCR's augmented images: grayscale rows have equal channels (p 0.2); a colour row
    whose constant blue channel moved was jittered (p 0.8); the rest are exact crops, flipped with p 0.5, of the
    (0.2, 1) law."""
    n, size = 4000, 8
    method = make_method(PCR, PCRConfig(), (3, size, size))
    out = method.augment(coordinate_images(n, size, 1 / 32, 0.25, blue=0.5), method.generator)
    gray = is_gray(out)
    assert_binomial(int(gray.sum()), n, 0.2, "grayscale rows")
    jitter = ((out[:, 2] - 0.5).abs().flatten(1).amax(1) > 1e-6).numpy()
    assert_binomial(int(jitter[~gray].sum()), int((~gray).sum()), 0.8, "jittered colour rows")
    plain = out[torch.from_numpy(~gray & ~jitter)]
    top, left, h, w, flipped = resized_crop_boxes(plain, 1 / 32, 0.25)
    assert_binomial(int(flipped.sum()), len(plain), 0.5, "flipped rows")
    assert_crop_law(h, w, size, (0.2, 1.0), "PCR (outputs)")


def test_pcr_colour_jitter_outputs():
    """PCR's augmented constant-colour images against the official jitter (reference_jitter, random order): the
    jittered colours channel by channel, and the grayscale rows' level (grayscale after the jitter)."""
    n, c = 20_000, COLOUR
    method = make_method(PCR, PCRConfig(), (3, 4, 4))
    x = torch.tensor(c, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, 4, 4).contiguous()
    gray, o = colour_rows(method.augment(x, method.generator), c)
    assert_binomial(int(gray.sum()), n, 0.2, "grayscale rows")
    ref = reference_jitter(tuple(c), 200_000, True)
    assert_same_law(o[gray, 0].round(5), (ref @ np.array(LUMA)).round(5), "grayscale rows' level")  # atom at luma(c)
    o = o[~gray]
    jitter = np.abs(o - c).max(1) > 1e-5
    assert_binomial(int(jitter.sum()), len(o), 0.8, "jittered colour rows")
    ref = ref[np.abs(ref - c).max(1) > 1e-9]
    for ch, name in enumerate("RGB"):
        assert_same_law(o[jitter, ch], ref[:, ch], f"jittered {name}")


# ---------------------------------------------------------------------------------------------------------------
# OCM and OnPro: rotations, feature window offsets, APF
# ---------------------------------------------------------------------------------------------------------------
def test_ocm_rotations_are_the_four_rotations():
    """T(x) = [X, rot180(X), rot90(X), rot270(X)], X = [x, left half 180, both halves, right half] (16 copies)."""
    x = coordinate_images(3, 6)
    out = rotation_views(x, local=False)
    for k, turns in enumerate((0, 2, 1, 3)):
        assert torch.equal(out[3 * k : 3 * k + 3], torch.rot90(x, turns, (2, 3)))
    full = rotation_views(x)
    base = torch.cat([x, x.clone(), x.clone(), x.clone()])
    base[3:6, ..., :3] = torch.rot90(x[..., :3], 2, (2, 3))
    base[6:9] = torch.cat([torch.rot90(x[..., :3], 2, (2, 3)), torch.rot90(x[..., 3:], 2, (2, 3))], -1)
    base[9:12, ..., 3:] = torch.rot90(x[..., 3:], 2, (2, 3))
    for k, turns in enumerate((0, 2, 1, 3)):
        assert torch.equal(full[12 * k : 12 * k + 12], torch.rot90(base, turns, (2, 3)))


@pytest.mark.parametrize("source", ["ocm", "onpro"])
def test_feature_window_offsets_uniform_below_d_minus_p(source):
    """The projection is compared with features[s : s + P], s = torch.randperm(D - P)[0]: uniform on 0..D-P-1."""
    d, p, n = 40, 16, 24_000
    if source == "ocm":
        method = make_method(OCM, OCMConfig(proj_dim=p), (3, 4, 4), hidden=(d,))
        s = torch.stack([method.window_start() for _ in range(n)]).numpy()
    else:
        method = make_method(OnPro, OnProConfig(proj_dim=p), (3, 4, 4), hidden=(d,))
        s = method.feature_offsets(n).numpy()
    assert s.min() == 0 and s.max() == d - p - 1
    assert_chi2(np.bincount(s, minlength=d - p), np.full(d - p, n / (d - p)), "window start")


APF_ROWS = 12  # buffer rows per class


def apf_method(points) -> tuple[OnPro, torch.Tensor]:
    """OnPro with hand-made prototypes (points, padded with zeros) for classes 0..len(points)-1 and a buffer of 12
    rows per class (slot = id, class = id mod classes) whose images carry their id (id and (37 id + 11) mod 256)."""
    k = len(points)
    buf = ReplayBuffer(100, (3, 4, 4), seed=5)
    ids = torch.arange(k * APF_ROWS)
    x = torch.zeros(len(ids), 3, 4, 4, dtype=torch.uint8)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = ids.to(torch.uint8), ((37 * ids + 11) % 256).to(torch.uint8)
    buf.add(x, ids % k, 0)
    method = make_method(OnPro, OnProConfig(proj_dim=16), (3, 4, 4), buffer=buf, seed=4)
    proto = torch.zeros(10, 16)
    proto[:k, : len(points[0])] = torch.tensor(points)
    method.proto_mean, method.proto_present = proto, torch.arange(10) < k
    return method, method.to_input(x)


def apf_pair_rows(method: OnPro, replay: torch.Tensor, classes: int, batch_size: int):
    """APF's class-pair rows (after the base rows, int(batch_size * 0.9) of them or fewer): (x, y_a, y_b, lambda)."""
    x_mix, ya, yb, lam = method.apf(replay[: 2 * classes], torch.arange(2 * classes) % classes, batch_size)
    base = len(x_mix) - (batch_size - int(batch_size * 0.9))
    return x_mix[base:], ya[base:], yb[base:], lam[base:]


@pytest.mark.parametrize(
    "points, short",
    [([[0.0], [0.3], [0.9], [1.5]], 1), ([[0.79, 0.79], [0.3, 0.48], [0.42, 0.42], [0.34, 0.32]], -1)],
    ids=["one_row_missing", "one_row_extra"],
)
def test_apf_pair_counts_round_then_fix_the_total_at_random(points, short):
    """m = 64 - int(64 * 0.9) = 7 rows: round(7 softmax(1 / ||p_a - p_b||)) per pair, then the missing row added to
    a uniformly chosen pair (any pair), or the extra row taken from a uniformly chosen pair that has rows."""
    method, replay = apf_method(points)
    pairs = list(itertools.combinations(range(len(points)), 2))
    pts = np.array(points)
    dist = np.array([np.linalg.norm(pts[a] - pts[b]) for a, b in pairs])
    soft = np.exp(1 / dist - (1 / dist).max())
    base = np.round(7 * soft / soft.sum())
    assert 7 - base.sum() == short
    eligible = np.ones(len(pairs), bool) if short > 0 else base > 0
    assert (~eligible).any() or short > 0
    hits, calls = np.zeros(len(pairs)), 600
    for _ in range(calls):
        _, ya, yb, _ = apf_pair_rows(method, replay, len(points), 64)
        counts = np.array([int(((ya == a) & (yb == b)).sum()) for a, b in pairs])
        assert counts.sum() == 7
        change = counts - base
        assert sorted(change) == sorted([0] * (len(pairs) - 1) + [short]), (counts, base)
        hits += change != 0
    assert hits[~eligible].sum() == 0, "a row taken from a pair without rows"
    for i in np.flatnonzero(eligible):
        assert_binomial(int(hits[i]), calls, 1 / eligible.sum(), f"pair {pairs[i]} adjusted")


@pytest.mark.slow
def test_apf_pair_mixup_one_gate_per_pair_beta_lambda_per_row():
    """APF's pair rows: one Bernoulli(0.2) decision per class pair (all its rows mixed or none), lambda ~
    Beta(0.4, 0.4) per row (against numpy's Beta sampler, the official code's); each row mixes a buffer row of
    class a with one of class b, drawn uniformly within the class, with replacement. Six classes (15 pairs),
    m = 300 pair rows per call."""
    points = [[0.0], [0.3], [0.9], [1.5], [2.2], [3.0]]
    k = len(points)
    method, replay = apf_method(points)
    pix = torch.stack([replay[:, 0, 0, 0], replay[:, 0, 0, 1]], 1).double()  # the two id values of every row
    decisions, mixed_pairs, lambdas = 0, 0, []
    chosen = np.zeros(k * APF_ROWS)
    repeats, expected_repeats = 0, 0.0
    for _ in range(200):
        x, ya, yb, lam = apf_pair_rows(method, replay, k, 3000)
        assert len(lam) == 300
        lam = lam.double()
        v = torch.stack([x[:, 0, 0, 0], x[:, 0, 0, 1]], 1).double()
        for a, b in itertools.combinations(range(k), 2):
            rows = ((ya == a) & (yb == b)).nonzero().squeeze(1)
            if len(rows) == 0:
                continue
            decisions += 1
            on = lam[rows] > 0
            assert on.all() or not on.any(), "rows of one pair with different mixup decisions"
            mixed_pairs += bool(on.all())
            if on.all():
                lambdas += lam[rows].tolist()
                assert len(rows) == 1 or len(set(lam[rows].tolist())) > 1, "one lambda for all rows of a pair"
            # decode the two buffer rows of every row: (1 - lambda) x_a + lambda x_b
            ia, ib = torch.arange(a, k * APF_ROWS, k), torch.arange(b, k * APF_ROWS, k)
            lr = lam[rows][:, None, None, None]
            pred = (1 - lr) * pix[ia][None, :, None, :] + lr * pix[ib][None, None, :, :]
            err = (pred - v[rows][:, None, None, :]).abs().amax(-1).flatten(1)
            assert err.amin(1).max() < 1e-5, "a pair row that is not a mix of its classes' buffer rows"
            best = err.argmin(1)
            first = ia[best // APF_ROWS].numpy()
            np.add.at(chosen, first, 1)
            # with replacement: the pairs of rows of a group that repeat a buffer row, mean C(n, 2) / 12
            repeats += sum(c * (c - 1) // 2 for c in np.unique(first, return_counts=True)[1])
            expected_repeats += len(rows) * (len(rows) - 1) / 2 / APF_ROWS
            clear = lam[rows] > 0.01  # b is read only where its weight shows
            np.add.at(chosen, ib[(best % APF_ROWS)[clear]].numpy(), 1)
    assert_binomial(mixed_pairs, decisions, 0.2, "mixed class pairs")
    assert_same_law(lambdas, np.random.default_rng(0).beta(0.4, 0.4, 400_000), "pair lambda")
    for c in range(k):
        counts = chosen[c::k]
        assert_chi2(counts, np.full(APF_ROWS, counts.mean()), f"buffer rows of class {c}")
    sd = math.sqrt(expected_repeats)  # the indicators of the C(n, 2) pairs are uncorrelated: variance <= mean
    assert abs(repeats - expected_repeats) <= Z * sd, f"{repeats} repeated rows, {expected_repeats:.0f} expected"


# ---------------------------------------------------------------------------------------------------------------
# MKD
# ---------------------------------------------------------------------------------------------------------------
def mkd_addon(shape=(3, 8, 8), buffer=None):
    method = make_method(ER, ERConfig(), shape, buffer=buffer, hidden=(8,))
    return MKD(MKDConfig(), method), method


def hue_of(c: np.ndarray) -> np.ndarray:
    """HSV hue in turns of RGB rows c [n, 3] (chroma > 0)."""
    mx, mn = c.max(1), c.min(1)
    r, g, b = c.T
    h = np.where(mx == r, (g - b) / (mx - mn), np.where(mx == g, 2 + (b - r) / (mx - mn), 4 + (r - g) / (mx - mn)))
    return (h / 6) % 1


def hue_rotated(x: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """RGB rows x [n, 3] with their HSV hue turned by `shift` turns, V and S kept (HSV -> RGB: channel n of
    (5, 3, 1) is V - V S clip(min(k, 4 - k), 0, 1), k = (n + 6 H) mod 6)."""
    v, lo = x.max(1), x.min(1)
    chroma = v - lo
    s = np.where(v > 0, chroma / np.where(v > 0, v, 1), 0)
    h = np.where(chroma > 0, hue_of(np.where(chroma[:, None] > 0, x, [[1.0, 0.0, 0.0]])), 0)
    k = (np.array([5, 3, 1]) + 6 * ((h + shift) % 1)[:, None]) % 6
    return v[:, None] - (v * s)[:, None] * np.clip(np.minimum(k, 4 - k), 0, 1)


@functools.lru_cache(maxsize=4)
def reference_jitter(colour: tuple[float, ...], n: int, random_order: bool, seed: int = 2) -> np.ndarray:
    """n draws of the official colour jitter of the constant colour c: with p 0.8, brightness, contrast, saturation
    factors ~ U[0.6, 1.4] and a hue shift ~ U[-0.1, 0.1] (torchvision's adjust_*: scale; blend with the mean luma,
    which for a constant image is its luma; blend with the luma; HSV hue rotation; clamped to [0, 1] after each),
    in a uniformly random order (torchvision ColorJitter) or in that fixed order (kornia ColorJitter)."""
    c, rng = np.array(colour), np.random.default_rng(seed)
    b, f, s = rng.uniform(0.6, 1.4, (3, n, 1))
    h = rng.uniform(-0.1, 0.1, n)

    def luma(v):
        return (v @ np.array(LUMA))[:, None]

    ops = [
        lambda v: np.clip(b * v, 0, 1),
        lambda v: np.clip(f * v + (1 - f) * luma(v), 0, 1),
        lambda v: np.clip(s * v + (1 - s) * luma(v), 0, 1),
        lambda v: hue_rotated(v, h),
    ]
    order = np.argsort(rng.random((n, 4)), 1) if random_order else np.tile(np.arange(4), (n, 1))
    x = np.tile(c, (n, 1))
    for slot in range(4):
        x = sum(np.where((order[:, slot] == i)[:, None], op(x), 0.0) for i, op in enumerate(ops))
    return np.where(rng.random((n, 1)) < 0.8, x, c)


COLOUR = np.array([0.15, 0.10, 0.40])  # no clamping in any order; hue turns move its luma a lot


def colour_rows(out: torch.Tensor, c: np.ndarray):
    """(grayscale mask, colour of every row) of augmented constant images, which stay constant."""
    assert ((out - out[:, :, :1, :1]).abs().amax() < 1e-6).item(), "a constant image stays constant"
    return is_gray(out), out[:, :, 0, 0].double().numpy()


MKD_CALLS, MKD_ROWS = 60, 400


@functools.lru_cache(maxsize=1)
def mkd_colour_calls() -> list[tuple[np.ndarray, np.ndarray]]:
    """(grayscale mask, colour of every row) of MKD_CALLS calls of MKD's tf_ema on MKD_ROWS constant images."""
    mkd, method = mkd_addon((3, 4, 4))
    x = torch.tensor(COLOUR, dtype=torch.float32).view(1, 3, 1, 1).expand(MKD_ROWS, 3, 4, 4).contiguous()
    return [colour_rows(mkd.augment(x, method.generator), COLOUR) for _ in range(MKD_CALLS)]


def brightness_and_blend(o: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(b, k) of jittered colours o = hue_h(b (k c + (1 - k) luma(c))), as when the hue turn comes after both
    blends with the luma (contrast and saturation: k = f s): the blends keep the luma and the hue, brightness scales,
    the hue turn keeps V and S."""
    luma = float(np.dot(LUMA, c))
    v, lo = o.max(1), o.min(1)
    q = (v - lo) / v
    k = q * luma / (c.max() - c.min() - q * (c.max() - luma))
    return (v - lo) / (k * (c.max() - c.min())), k


def hue_after_both_blends(o: np.ndarray, c: np.ndarray) -> bool:
    """Whether every jittered colour of one call decodes to b in [0.6, 1.4] and k in [0.36, 1.96]: always when the
    hue turn came after contrast and saturation; otherwise some 5-8 % of the rows fall outside (so with hundreds of
    rows a call is told apart)."""
    b, k = brightness_and_blend(o, c)
    eps = 1e-4
    return bool(((b >= 0.6 - eps) & (b <= 1.4 + eps) & (k >= 0.36 - eps) & (k <= 1.96 + eps)).all())


def test_mkd_colour_jitter_laws():
    """MKD's tf_ema jitter, read from constant-colour images c (crop and flip change nothing): grayscale p 0.2;
    jitter p 0.8 (a jittered row is no longer c); hue shift ~ U[-0.1, 0.1] (brightness and the blends keep the hue,
    in any order). In the calls whose hue turn came after contrast and saturation (every call of a fixed order
    B, C, S, H; a third of them under kornia's random order): brightness b ~ U[0.6, 1.4]; contrast f and saturation
    s both blend with the luma, so the colour's HSV saturation gives their product k = f s, which follows the
    product of two independent U[0.6, 1.4]; grayscale comes last: a grayscale row holds the luma of the jittered
    colour."""
    c = COLOUR
    calls = mkd_colour_calls()
    gray = np.concatenate([g for g, _ in calls])
    assert_binomial(int(gray.sum()), len(gray), 0.2, "grayscale rows")
    colour = [(o[~g], o[g, 0]) for g, o in calls]
    jittered = [o[np.abs(o - c).max(1) > 1e-5] for o, _ in colour]
    n_colour = sum(len(o) for o, _ in colour)
    assert_binomial(sum(len(o) for o in jittered), n_colour, 0.8, "jittered colour rows")
    o = np.concatenate(jittered)
    shift = (hue_of(o) - hue_of(c[None]) + 0.5) % 1 - 0.5
    assert_uniform(shift, -0.1, 0.1, "hue shift")
    last = [i for i, o in enumerate(jittered) if hue_after_both_blends(o, c)]
    assert len(last) >= 5, f"only {len(last)} of {len(calls)} calls turn the hue after the blends"
    b, k = brightness_and_blend(np.concatenate([jittered[i] for i in last]), c)
    assert_uniform(b, 0.6, 1.4, "brightness")
    rng = np.random.default_rng(1)
    assert_same_law(k, rng.uniform(0.6, 1.4, 400_000) * rng.uniform(0.6, 1.4, 400_000), "contrast x saturation")
    level = np.concatenate([colour[i][1] for i in last])
    reference = reference_jitter(tuple(c), 200_000, False) @ np.array(LUMA)
    assert_same_law(level.round(5), reference.round(5), "grayscale rows' level")  # rounded: an atom at luma(c)


def test_mkd_colour_jitter_order_is_drawn_per_call():
    """kornia ColorJitter: the four ops in a uniformly random order drawn per call, shared by its rows. Brightness
    commutes with the rest, contrast and saturation with each other, so what shows is whether the hue turn comes
    after both blends: in a third of the calls (8 of the 24 orders)."""
    calls = mkd_colour_calls()
    last = sum(hue_after_both_blends(o[~g][np.abs(o[~g] - COLOUR).max(1) > 1e-5], COLOUR) for g, o in calls)
    assert_binomial(last, len(calls), 1 / 3, "calls that turn the hue after contrast and saturation")


@functools.lru_cache(maxsize=1)
def mkd_geometry(n: int = 20_000, size: int = 8):
    """(grayscale, jittered, (top, left, h, w, flipped) of the plain rows) of MKD's tf_ema on coordinate images
    (a row left neither jittered nor grayscale keeps its constant blue channel and its distinct channels)."""
    mkd, method = mkd_addon((3, size, size))
    out = mkd.augment(coordinate_images(n, size, 1 / 32, 0.25, blue=0.5), method.generator)
    gray = is_gray(out)
    jitter = ((out[:, 2] - 0.5).abs().flatten(1).amax(1) > 1e-6).numpy()
    return gray, jitter, resized_crop_boxes(out[torch.from_numpy(~gray & ~jitter)], 1 / 32, 0.25)


def test_mkd_crop_and_flip_laws():
    """MKD's tf_ema geometry: resized crop (0.2, 1) (the law of the crops inside the image on both sides: see
    test_kornia_resized_crops_never_span_a_whole_side) and flip 0.5, on the plain rows; grayscale 0.2, jitter 0.8."""
    size = 8
    gray, jitter, (top, left, h, w, flipped) = mkd_geometry()
    assert_binomial(int(gray.sum()), len(gray), 0.2, "grayscale rows")
    assert_binomial(int(jitter[~gray].sum()), int((~gray).sum()), 0.8, "jittered colour rows")
    assert_binomial(int(flipped.sum()), len(flipped), 0.5, "flipped rows")
    assert_crop_law(h, w, size, (0.2, 1.0), "MKD", inside=True)
    assert_uniform_offsets(top, size - h, "crop top")
    assert_uniform_offsets(left, size - w, "crop left")


@pytest.mark.parametrize("addon", ["mkd", "ccl_dc"])
def test_addon_replay_draw_uniform_without_replacement(addon):
    """The add-on's own replay draw: the method's replay_batch_size (ER: 10) rows, distinct, uniform over the whole
    buffer; read from the un-augmented pass (MKD: the raw pass; CCL-DC: x0)."""
    shape = (3, 4, 4)
    buf, task_of = filled_buffer(shape=shape)
    method = make_method(ER, ERConfig(), shape, buffer=buf, hidden=(8,))
    if addon == "mkd":
        add_on, which = MKD(MKDConfig(), method), 0
    else:
        add_on = CCLDC(CCLDCConfig(), method, make_peer=lambda: make_method(ER, ERConfig(), shape, buf, hidden=(8,)))
        which = 1
    batch = batch_of(range(900, 910), [6, 7] * 5, 3, shape)
    labels = torch.arange(8)
    method.classes.mark_seen(labels, labels)
    inputs: list[torch.Tensor] = []
    method.forward_float = recorded(method.forward_float, inputs)
    counts = dict.fromkeys(task_of, 0)
    calls = 150
    for _ in range(calls):
        inputs.clear()
        add_on.begin_observe(method, batch)
        add_on.extra_loss(method)
        ids = read_ids(inputs[which], 255)
        assert ids[10:] == list(range(900, 910)), "x = [replay draw, incoming batch]"
        drawn = ids[:10]
        assert len(set(drawn)) == 10, drawn
        for i in drawn:
            counts[i] += 1
    assert_uniform_inclusion(list(counts.values()), calls, 10, f"{addon} replay rows")


# ---------------------------------------------------------------------------------------------------------------
# CCL-DC
# ---------------------------------------------------------------------------------------------------------------
def ccl_dc_addon(shape):
    method = make_method(ER, ERConfig(), shape, hidden=(8,))
    return CCLDC(CCLDCConfig(), method, make_peer=lambda: make_method(ER, ERConfig(), shape, hidden=(8,))), method


@functools.lru_cache(maxsize=1)
def ccl_dc_first_view(n: int = 8000):
    """(x0 is the raw batch, any grayscale row, any channel mixing, (top, left, h, w, flipped)) of CCL-DC's x1."""
    ccl, method = ccl_dc_addon((3, S, S))
    x = (coordinate_images(n, S) * 16).to(torch.uint8)
    x3, x0, x1, x2 = ccl.views(method, x)
    raw = torch.equal(x0, x.float() / 255)
    return raw, bool(is_gray(x1).any()), bool((x1[:, 2] != 0).any()), resized_crop_boxes(x1, 16 / 255)


def test_ccl_dc_first_view_crop_and_flip():
    """x1 = T1(x0): resized crop (0.6, 1) (the law of the crops inside the image on both sides: see
    test_kornia_resized_crops_never_span_a_whole_side) then flip 0.5, no grayscale; x0 is the raw batch."""
    raw, any_gray, mixed, (top, left, h, w, flipped) = ccl_dc_first_view()
    assert raw and not any_gray and not mixed
    assert_binomial(int(flipped.sum()), len(flipped), 0.5, "flipped rows")
    assert_crop_law(h, w, S, (0.6, 1.0), "CCL-DC T1", inside=True)
    assert_uniform_offsets(top, S - h, "crop top")
    assert_uniform_offsets(left, S - w, "crop left")


@pytest.mark.parametrize("source", ["ccl_dc_t1", "mkd", "gsa_crop_kornia"])
def test_kornia_resized_crops_never_span_a_whole_side(source):
    """kornia's RandomResizedCrop returns a crop as wide or as tall as the image only from its fallback, when all
    10 candidates miss 0 < w < L, 0 < h < L (its fallback, a round(3/4 L) x L crop of a square image at a random
    position, spans one side): with the probability that they all miss (a few 1e-4 on these small images)."""
    if source == "ccl_dc_t1":
        size, scale, (_, _, h, w, _) = S, (0.6, 1.0), ccl_dc_first_view()[3]
    elif source == "mkd":
        size, scale, (_, _, h, w, _) = 8, (0.2, 1.0), mkd_geometry()[2]
    else:  # CCL-DC's GSA: method.crop=kornia
        size, scale = S, (0.6, 1.0)
        augment = gsa_augment(GSAConfig(crop="kornia"), (S, S))
        boxes = augment.draw(20_000, S, S, torch.Generator().manual_seed(5))[1]
        h, w = boxes[:, 2], boxes[:, 3]
    ch, cw = crop_candidates(size, scale, 400_000, 3)
    fallback = float((~((ch > 0) & (ch < size) & (cw > 0) & (cw < size)).any(1)).mean())
    full = (h == size) | (w == size)
    assert_binomial(int(full.sum()), len(h), fallback, "crops spanning the whole width or height")


def test_ccl_dc_randaugment_chain_is_torchvision_randaugment_3_15_per_batch():
    """x2 = RA(x1), x3 = RA(x2), RA = torchvision RandAugment(num_ops=3, magnitude=15) applied to the uint8 batch
    tensor (one op choice per call for the whole batch), each call a fresh draw: every call equals the reference
    transform run from the random state the call ran under, and identical images come out identical."""
    ccl, method = ccl_dc_addon((3, 8, 8))
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    real = ccl.randaug

    def spy(img):
        state = torch.random.get_rng_state()
        out = real(img)
        calls.append((state, img.clone(), out.clone()))
        return out

    ccl.randaug = spy
    reference = RandAugment(num_ops=3, magnitude=15)
    x = (torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    states = []
    for _ in range(30):
        calls.clear()
        x3, x0, x1, x2 = ccl.views(method, x)
        assert len(calls) == 2, "two RandAugment calls per chain"
        (s1, in1, out1), (s2, in2, out2) = calls
        assert (in1.float() - x1 * 255).abs().max() <= 1 and torch.equal(in2, out1), "x2 = RA(x1)"
        assert torch.equal(x2, out1.float() / 255) and torch.equal(x3, out2.float() / 255), "x3 = RA(x2)"
        for state, inp, out in calls:
            states.append(state)
            with torch.random.fork_rng(devices=[]):
                torch.random.set_rng_state(state)
                assert torch.equal(reference(inp), out), "not RandAugment(3, 15) on the batch"
    assert len({bytes(s.numpy()) for s in states}) == len(states), "two calls under the same random state"
    same = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)).expand(8, -1, -1, -1)
    outs = [ccl.rand_augment(same) for _ in range(10)]
    assert all(torch.equal(o, o[:1].expand_as(o)) for o in outs), "different ops for rows of one batch"
    assert len({bytes(o.numpy()) for o in outs}) > 5, "RandAugment draws the same ops at every call"


# ---------------------------------------------------------------------------------------------------------------
# Buffer policies
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("m, batch", [(5, 1), (4, 4)])
def test_reservoir_keeps_stream_position_n_with_probability_m_over_n_in_a_uniform_slot(m, batch):
    """Algorithm R, memory M: the first M items fill the slots in order; item n > M is kept with probability M/n,
    replacing a uniform slot. With batches, an item sits in the buffer after its batch with probability
    M / (last stream position of the batch) (a later item of the batch may overwrite it, as in sequential R)."""
    n_items, runs = 25 if batch == 1 else 28, 1000
    present = np.zeros(n_items)
    slots = np.zeros(m)
    for run in range(runs):
        buf = ReplayBuffer(m, (1,), seed=100 + run)
        for start in range(0, n_items, batch):
            pos = torch.arange(start, start + batch)
            before = buf.y.clone()
            buf.add(torch.zeros(batch, 1, dtype=torch.uint8), pos, 0)
            for p in pos.tolist():
                where = (buf.y == p).nonzero().squeeze(1)
                if len(where):
                    present[p] += 1
                    if p < m:
                        assert where.tolist() == [p], "the first M items fill the slots in order"
                    elif batch == 1:
                        slots[int(where[0])] += 1
                        assert (buf.y != before).sum() == 1
    assert (present[:m] == runs).all()
    for p in range(m, n_items):
        last = (p // batch) * batch + batch  # 1-based stream position of the batch's last item
        assert_binomial(int(present[p]), runs, m / last, f"item at stream position {p + 1} kept")
    if batch == 1:
        assert_chi2(slots, np.full(m, slots.sum() / m), "replaced slot")


def test_class_balanced_reservoir_replaces_the_largest_class_or_keeps_m_c_over_n_c():
    """CBRS, M = 4, memory [0, 0, 0, 1]: an item of the new class 2 replaces a uniform instance of the largest class
    (slots 0-2, never slot 3); then an item of class 0 (a full class: m_0 = 2 in memory, n_0 = 4 seen) is kept with
    probability 2/4, replacing a uniform one of the two instances of class 0."""
    runs = 3000
    new_slot, kept, lower = np.zeros(4), 0, 0
    for run in range(runs):
        buf = ReplayBuffer(4, (1,), policy="class_balanced", seed=run)
        buf.add(torch.tensor([[10], [11], [12], [13]], dtype=torch.uint8), torch.tensor([0, 0, 0, 1]), 0)
        before = buf.x.clone()
        buf.add(torch.tensor([[20]], dtype=torch.uint8), torch.tensor([2]), 0)
        changed = (buf.x != before).squeeze(1).nonzero().squeeze(1).tolist()
        assert len(changed) == 1 and buf.y[changed[0]] == 2
        new_slot[changed[0]] += 1
        before = buf.x.clone()
        instances = (buf.y == 0).nonzero().squeeze(1).tolist()
        buf.add(torch.tensor([[30]], dtype=torch.uint8), torch.tensor([0]), 0)
        changed = (buf.x != before).squeeze(1).nonzero().squeeze(1).tolist()
        if changed:
            kept += 1
            assert len(changed) == 1 and changed[0] in instances, "a class-0 item replaces one of class 0"
            lower += changed[0] == min(instances)
    assert new_slot[3] == 0, "the class-1 instance (not a largest class) was replaced"
    assert_chi2(new_slot[:3], np.full(3, runs / 3), "slot of the largest class replaced")
    assert_binomial(kept, runs, 0.5, "class-0 item kept (m_c / n_c = 2/4)")
    assert_binomial(lower, kept, 0.5, "which class-0 instance is replaced")
