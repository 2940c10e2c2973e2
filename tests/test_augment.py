"""Tests of cil.augment: batched per-sample augmentation with torchvision RandomResizedCrop semantics."""
import math

import pytest
import torch
from torchvision.transforms import RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from cil.augment import (GSAAugment, _boxes_from_uniforms, hflip, resized_crop, sample_crop_boxes,
                         two_views)

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
    frac = (h * w).double() / size ** 2
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


def test_resampling_matches_torchvision_resized_crop():
    x = images(12, 3, 32, 32, seed=4)
    boxes = sample_crop_boxes(12, 32, 32, gen(5), (0.1, 1.0), RATIO)
    ours = resized_crop(x, boxes, (32, 32))
    for b in range(12):
        t, l, h, w = boxes[b].tolist()
        ref = TF.resized_crop(x[b], t, l, h, w, [32, 32], antialias=False)
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
    assert torch.equal(GSAAugment((32, 32), grayscale_p=1.0)(one, gen(7)),
                       GSAAugment((32, 32), grayscale_p=0.0)(one, gen(7)))


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
    assert torch.equal(v[:6], a)                 # the same augmented batch ...
    assert torch.equal(v[6:], hflip(v[:6]))      # ... and its mirror image
    assert torch.equal(hflip(x)[..., 0], x[..., -1]) and torch.equal(hflip(hflip(x)), x)
    assert not torch.equal(hflip(x), x)
    g = gen(13)
    ind = two_views(x, aug, g, independent=True)
    g2 = gen(13)
    first, second = aug(x, g2), aug(x, g2)
    assert torch.equal(ind[:6], first) and torch.equal(ind[6:], hflip(second))
    assert not torch.equal(ind[6:], hflip(ind[:6]))
