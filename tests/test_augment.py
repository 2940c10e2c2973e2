"""Tests of cil.core.augment: batched per-sample augmentation with torchvision RandomResizedCrop semantics."""

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from cil.core.augment import (
    GSAAugment,
    PreDrawn,
    _boxes_from_uniforms,
    _fallback_box,
    hflip,
    resized_crop,
    sample_crop_boxes,
    two_views,
)

SCALE = (0.6, 1.0)
RATIO = (3 / 4, 4 / 3)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def images(b=16, c=3, h=32, w=32, seed=0):
    return torch.rand(b, c, h, w, generator=gen(seed))


def test_output_shape_dtype_device():
    aug = GSAAugment((32, 32))
    for dtype in (torch.float32, torch.float64):
        x = images(5, 3, 40, 36).to(dtype)
        y = aug(x, gen())
        assert y.shape == (5, 3, 32, 32) and y.dtype == dtype and y.device == x.device
    y = GSAAugment((24, 20))(images(4, 1, 32, 32), gen())
    assert y.shape == (4, 1, 24, 20)
    with pytest.raises(TypeError):
        aug(torch.zeros(2, 3, 32, 32, dtype=torch.uint8), gen())
    with pytest.raises(ValueError):
        aug(torch.zeros(2, 5, 32, 32), gen())  # neither 1 nor 3 channels


def test_boxes_respect_scale_and_ratio_bounds():
    n, size = 4000, 256  # large image: rounding w, h to integers moves area/ratio by < 1 %
    boxes = sample_crop_boxes(n, size, size, gen(1), SCALE, RATIO)
    top, left, h, w = boxes.unbind(1)
    assert boxes.dtype == torch.long and boxes.shape == (n, 4)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= size).all() and (left + w <= size).all()
    frac = (h * w).double() / size**2
    r = w.double() / h.double()
    assert frac.min() >= SCALE[0] * 0.99 and frac.max() <= SCALE[1] * 1.01
    assert r.min() >= RATIO[0] * 0.99 and r.max() <= RATIO[1] * 1.01
    # the ranges are used, not a degenerate corner of them
    assert frac.min() < 0.62 and frac.max() > 0.95 and r.min() < 0.77 and r.max() > 1.3
    # positions are spread over the free room
    assert (top > 0).any() and (left > 0).any() and (top + h < size).any()


def test_boxes_match_torchvision_distribution():
    """Same sampling semantics as torchvision RandomResizedCrop.get_params (rejection included): compare the
    mean crop size and offset over many draws on a 32x32 image, where ~40 % of candidates are rejected."""
    n = 4000
    ours = sample_crop_boxes(n, 32, 32, gen(2), SCALE, RATIO).double()
    img = torch.zeros(3, 32, 32)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        tv = torch.tensor([RandomResizedCrop.get_params(img, list(SCALE), list(RATIO)) for _ in range(n)]).double()
    for k in range(4):  # top, left, h, w
        se = math.sqrt(ours[:, k].var() / n + tv[:, k].var() / n)
        assert abs(ours[:, k].mean() - tv[:, k].mean()) < 4 * se + 0.02, k


def test_first_valid_attempt_and_fallback():
    # attempt 0 cannot fit (area 1.0 at ratio 4/3 gives w = 37 > 32), attempt 1 fits: 25 x 25 at ratio 1
    u_area = torch.tensor([[1.0 - 1e-6, 0.0, 0.5]])
    u_ratio = torch.tensor([[1.0 - 1e-6, 0.5, 0.5]])
    u_pos = torch.tensor([[0.0, 0.999]])
    box = _boxes_from_uniforms(u_area, u_ratio, u_pos, 32, 32, SCALE, RATIO)
    assert box.tolist() == [[0, 7, 25, 25]]
    # no attempt fits: central crop of the whole image clamped to the ratio bounds (torchvision fallback)
    never = (torch.ones(3, 10) * (1 - 1e-6), torch.ones(3, 10) * (1 - 1e-6), torch.rand(3, 2))
    assert _boxes_from_uniforms(*never, 32, 32, SCALE, RATIO).tolist() == [[0, 0, 32, 32]] * 3
    assert _boxes_from_uniforms(*never, 32, 64, SCALE, RATIO).tolist() == [[0, 10, 32, 43]] * 3
    boxes = sample_crop_boxes(50, 32, 32, gen(3), (1.0, 1.0), (2.0, 3.0))  # never fits a square image
    assert (boxes == torch.tensor([8, 0, 16, 32])).all()


def test_kornia_bounds_candidate_rule_swap_and_fallback():
    """bounds="kornia" (kornia 0.6.8 / 0.8.0 ResizedCropGenerator): a candidate fits only if 0 < h < H and
    0 < w < W; the crop height is round(sqrt(A r)) (r is h / w); no candidate fits: round(W min(ratio)) x W when
    H / W > min(ratio), H x round(H / min(ratio)) when below, at a uniform random position."""
    # attempt 0 is the whole 32 x 32 image (area 1.0, ratio 1): torchvision keeps it, kornia goes on to attempt 1
    u_area, u_ratio, u_pos = torch.tensor([[1.0 - 1e-6, 0.0]]), torch.tensor([[0.5, 0.5]]), torch.tensor([[0.0, 0.0]])
    assert _boxes_from_uniforms(u_area, u_ratio, u_pos, 32, 32, SCALE, RATIO).tolist() == [[0, 0, 32, 32]]
    assert _boxes_from_uniforms(u_area, u_ratio, u_pos, 32, 32, SCALE, RATIO, "kornia").tolist() == [[0, 0, 25, 25]]
    # r in (2, 3): kornia's crops are taller than wide, torchvision's wider than tall
    _, _, h, w = sample_crop_boxes(500, 64, 64, gen(20), (0.1, 0.3), (2.0, 3.0), bounds="kornia").unbind(1)
    assert (h > w).all()
    _, _, h, w = sample_crop_boxes(500, 64, 64, gen(20), (0.1, 0.3), (2.0, 3.0)).unbind(1)
    assert (w > h).all()
    # no attempt fits (area 1.0: one side >= 8 at any ratio); kornia's fallback placed at random, not centred
    top, left, h, w = sample_crop_boxes(3000, 8, 8, gen(21), (1.0, 1.0), RATIO, bounds="kornia").unbind(1)
    assert (h == 6).all() and (w == 8).all() and (left == 0).all()
    counts = torch.bincount(top, minlength=3)
    assert len(counts) == 3 and (counts - 1000).abs().max() < 120, counts  # uniform on 0..2 (sd ~26)
    never = (torch.ones(3, 10) * (1 - 1e-6), torch.ones(3, 10) * (1 - 1e-6), torch.tensor([[0.0, 0.999]] * 3))
    assert _boxes_from_uniforms(*never, 32, 32, SCALE, RATIO, "kornia").tolist() == [[0, 0, 24, 32]] * 3
    assert _boxes_from_uniforms(*never, 32, 64, SCALE, RATIO, "kornia").tolist() == [[0, 21, 32, 43]] * 3
    boxes = sample_crop_boxes(50, 32, 32, gen(3), (1.0, 1.0), (2.0, 3.0), bounds="kornia")  # H / W < min ratio
    assert (boxes[:, 2:] == torch.tensor([32, 16])).all() and (boxes[:, 0] == 0).all()
    assert boxes[:, 1].unique().numel() > 5  # left uniform on 0..16
    with pytest.raises(ValueError, match="bounds"):
        GSAAugment((8, 8), bounds="torchvison")


def test_resampling_matches_torchvision_resized_crop():
    x = images(12, 3, 32, 32, seed=4)
    boxes = sample_crop_boxes(12, 32, 32, gen(5), (0.1, 1.0), RATIO)
    ours = resized_crop(x, boxes, (32, 32))
    for b in range(12):
        top, left, h, w = boxes[b].tolist()
        ref = TF.resized_crop(x[b], top, left, h, w, [32, 32], antialias=False)
        assert torch.allclose(ours[b], ref, atol=1e-5), b


def test_grayscale_all_or_nothing():
    x = images(8)
    gray = GSAAugment((32, 32), grayscale_p=1.0)(x, gen(6))
    assert torch.equal(gray[:, 0], gray[:, 1]) and torch.equal(gray[:, 1], gray[:, 2])
    colour = GSAAugment((32, 32), grayscale_p=0.0)(x, gen(6))
    # same draws (same seed), so same boxes: grey image = BT.601 luma of the colour crop
    luma = 0.299 * colour[:, 0] + 0.587 * colour[:, 1] + 0.114 * colour[:, 2]
    assert torch.allclose(gray[:, 0], luma, atol=1e-5)
    assert not torch.allclose(colour[:, 0], colour[:, 1], atol=1e-2)
    aug = GSAAugment((32, 32), grayscale_p=0.0)
    g, boxes = aug.sample(x, gen(6))
    assert not g.any() and torch.equal(colour, resized_crop(x, boxes, (32, 32)))  # colours preserved exactly
    one = images(8, c=1)
    assert torch.equal(
        GSAAugment((32, 32), grayscale_p=1.0)(one, gen(7)), GSAAugment((32, 32), grayscale_p=0.0)(one, gen(7))
    )


def test_grayscale_probability():
    aug = GSAAugment((32, 32), grayscale_p=0.2)
    g, _ = aug.sample(images(2000, h=8, w=8), gen(8))
    assert abs(g.float().mean().item() - 0.2) < 0.04
    assert g.any() and not g.all()


def test_per_sample_randomness():
    x = images(1).expand(32, -1, -1, -1).contiguous()  # the same image 32 times
    aug = GSAAugment((32, 32))
    _, boxes = aug.sample(x, gen(9))
    assert len({tuple(b) for b in boxes.tolist()}) > 16
    y = aug(x, gen(9))
    assert not torch.allclose(y[0], y[1]) and len({round(v, 4) for v in y.sum((1, 2, 3)).tolist()}) > 16


def test_seed_reproducibility():
    x = images(16)
    aug = GSAAugment((32, 32))
    assert torch.equal(aug(x, gen(10)), aug(x, gen(10)))
    assert not torch.equal(aug(x, gen(10)), aug(x, gen(11)))
    g = gen(10)
    first, second = aug(x, g), aug(x, g)  # the generator advances between calls
    assert not torch.equal(first, second)


def test_two_views_and_hflip():
    x = images(6)
    aug = GSAAugment((32, 32))
    v = two_views(x, aug, gen(12))
    assert v.shape == (12, 3, 32, 32)
    a = aug(x, gen(12))
    assert torch.equal(v[:6], a)  # the same augmented batch ...
    assert torch.equal(v[6:], hflip(v[:6]))  # ... and its mirror image
    assert torch.equal(hflip(x)[..., 0], x[..., -1]) and torch.equal(hflip(hflip(x)), x)
    assert not torch.equal(hflip(x), x)
    g = gen(13)
    ind = two_views(x, aug, g, independent=True)
    g2 = gen(13)
    first, second = aug(x, g2), aug(x, g2)
    assert torch.equal(ind[:6], first) and torch.equal(ind[6:], hflip(second))
    assert not torch.equal(ind[6:], hflip(ind[:6]))


# -- the batched code against a straightforward formulation, bit for bit --------------------------------------


def reference_augment(x, generator, size, scale=SCALE, ratio=RATIO, grayscale_p=0.2, attempts=10):
    """GSAAugment written one axis at a time (as before its ops were stacked and its draws fused): the same
    draws and the same float operations, so the batched code must match it exactly."""
    b, _, height, width = x.shape
    u = torch.rand(b, 2 * attempts + 3, generator=generator)
    u_area, u_ratio, u_pos = u[:, 1 : 1 + attempts], u[:, 1 + attempts : 1 + 2 * attempts], u[:, 1 + 2 * attempts :]
    target_area = float(height * width) * (scale[0] + (scale[1] - scale[0]) * u_area)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    w = torch.round(torch.sqrt(target_area * aspect))
    h = torch.round(torch.sqrt(target_area / aspect))
    valid = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)
    any_valid = valid.any(dim=1)
    fh, fw = _fallback_box(height, width, ratio)
    h = torch.where(any_valid, h.gather(1, first).squeeze(1), torch.full_like(h[:, 0], fh))
    w = torch.where(any_valid, w.gather(1, first).squeeze(1), torch.full_like(w[:, 0], fw))
    top = torch.floor(u_pos[:, 0] * (height - h + 1)).clamp(max=height - h)
    left = torch.floor(u_pos[:, 1] * (width - w + 1)).clamp(max=width - w)
    top = torch.where(any_valid, top, torch.floor((height - h) / 2)).to(x.dtype)
    left = torch.where(any_valid, left, torch.floor((width - w) / 2)).to(x.dtype)
    h, w = h.to(x.dtype), w.to(x.dtype)
    if x.shape[1] == 3:
        luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
        x = torch.where((u[:, 0] < grayscale_p)[:, None, None, None], luma.expand_as(x), x)

    def source(start, length, out):  # half-pixel centres, clamped to the crop, then normalised coordinates
        s = start[:, None] + (torch.arange(out, dtype=x.dtype)[None, :] + 0.5) * (length[:, None] / out) - 0.5
        return torch.minimum(torch.maximum(s, start[:, None]), (start + length - 1)[:, None])

    (oh, ow) = size
    gy = (2 * source(top, h, oh) + 1) / height - 1
    gx = (2 * source(left, w, ow) + 1) / width - 1
    grid = torch.stack([gx[:, None, :].expand(b, oh, ow), gy[:, :, None].expand(b, oh, ow)], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


@pytest.mark.parametrize(
    "c, hw, size, scale, ratio",
    [
        (1, (28, 28), (28, 28), SCALE, RATIO),
        (3, (32, 32), (32, 32), SCALE, RATIO),
        (3, (40, 36), (32, 24), (0.08, 1.0), RATIO),  # non-square, downscaling crops
        (1, (32, 64), (20, 30), (0.9, 1.0), (2.0, 3.0)),  # mostly the fallback box
    ],
)
def test_batched_augmentation_equals_the_per_axis_formulation(c, hw, size, scale, ratio):
    aug = GSAAugment(size, scale, ratio)
    for seed in range(5):
        for b in (1, 17, 64):
            x = images(b, c, *hw, seed=seed)
            for dtype in (torch.float32, torch.float64):
                ours = aug(x.to(dtype), gen(seed))
                assert torch.equal(ours, reference_augment(x.to(dtype), gen(seed), size, scale, ratio)), (
                    seed,
                    b,
                    dtype,
                )


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("independent", [False, True])
def test_predrawn_equals_drawing_call_by_call(c, independent):
    """GSA's step (views of Xc, the new-branch pass over them, views of the replay batch) with all draws made
    at once gives exactly the images of one draw per call, and leaves the generator where they leave it."""
    aug = GSAAugment((16, 16))
    for n_c, n_m in ((32, 64), (17, 33), (5, 0)):
        xc, xm = images(n_c, c, 16, 16, seed=1), images(n_m, c, 16, 16, seed=2)
        g_ref = gen(14)
        ref_views = two_views(xc, aug, g_ref, independent)
        ref = [ref_views, aug(ref_views, g_ref), two_views(xm, aug, g_ref, independent)]
        g = gen(14)
        per_views = 2 if independent else 1
        pre = PreDrawn(aug, per_views * (n_c + n_m) + 2 * n_c, 16, 16, g)
        views = two_views(xc, pre, None, independent)
        ours = [views, pre(views), two_views(xm, pre, None, independent)]
        assert pre.left == 0
        for a, b in zip(ours, ref, strict=True):
            assert torch.equal(a, b), (n_c, n_m)
        assert torch.equal(g.get_state(), g_ref.get_state())


def test_predrawn_refuses_more_rows_or_another_size():
    pre = PreDrawn(GSAAugment((8, 8)), 10, 8, 8, gen())
    pre(images(6, 1, 8, 8))
    with pytest.raises(ValueError, match="4 more draws"):
        pre(images(5, 1, 8, 8))
    with pytest.raises(ValueError, match="8x8"):
        pre(images(2, 1, 9, 8))
    assert pre.left == 4
