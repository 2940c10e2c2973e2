"""Batched, per-sample-random augmentation on the device (the GSA protocol's augmentation, spec
docs/gsa.md, "Protocol": per sample, random grayscale (p = 0.2) then random resized crop
(scale 0.6-1.0, ratio 3/4-4/3); "two views" = [A(x), hflip(A(x))]).

No Python loop over samples, no PIL, no host/device copies: every random number comes from one
``torch.rand`` call on the generator's device (pass a CPU generator for CPU tensors and a CUDA generator for
CUDA tensors), and all crops are resampled by one ``grid_sample`` call.

Resampling: a per-sample sampling grid built from the integer crop boxes and ``grid_sample`` (bilinear,
``align_corners=False``), with the source coordinates clamped to the crop, reproduces torchvision's
``resized_crop`` (crop, then bilinear resize with half-pixel centres) to float rounding (~1e-7). When a crop is
*upscaled* (always the case for 32x32 CIFAR crops resized to 32x32) torchvision's antialias changes nothing;
when a crop is downscaled, this is plain bilinear without antialias. Why grid_sample rather than separable
interpolation matrices, roi_align or kornia: docs/performance.md, "Augmentation".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "GSAAugment",
    "AffineCropAugment",
    "PaddedCropAugment",
    "CROPS",
    "CROP_BOUNDS",
    "PreDrawn",
    "sample_crop_boxes",
    "hflip",
    "two_views",
    "LUMA_WEIGHTS",
    "rotation_views",
]

#: ITU-R BT.601 luma weights, as in torchvision's rgb_to_grayscale.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)


def _constant(values: tuple[float | tuple[float, ...], ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """A small constant tensor, made once: building it from a Python list costs as much as a small op (~5 us),
    and on CUDA a host-to-device copy. Never modified in place."""
    if torch.compiler.is_compiling():  # a constant of the compiled graph (dynamo would trace past the cache anyway)
        return torch.tensor(values, dtype=dtype, device=device)
    return _cached_constant(values, dtype, device)


@functools.lru_cache(maxsize=64)
def _cached_constant(values: tuple[float | tuple[float, ...], ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.tensor(values, dtype=dtype, device=device)


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """torchvision's central-crop fallback size (h, w): the whole image, clamped to the ratio bounds."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return h, w


#: The candidate rules of :func:`sample_crop_boxes`: ``torchvision`` (``RandomResizedCrop.get_params``) or ``kornia``
#: (``RandomResizedCrop``'s ``ResizedCropGenerator``, the same in kornia 0.6.8 and 0.8.0).
CROP_BOUNDS = ("torchvision", "kornia")


@functools.lru_cache(maxsize=64)
def _kornia_fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
    """kornia's fallback size (h, w) when no candidate fits (``ResizedCropGenerator.forward``, kornia@v0.6.8
    ``kornia/augmentation/random_generator/_2d/crop.py:219-236``, v0.8.0 the same at 249-266): with in_ratio = H / W
    (torchvision: W / H) and only the smaller ratio bound, ``in_ratio < min``: (H, round(H / min)); ``in_ratio >
    min``: (round(W * min), W); equal: the whole image. kornia rounds in float32 (``torch.round``), as here."""
    lo = min(ratio)
    # float32: kornia's default parameter dtype
    h, w = torch.tensor(float(height), dtype=torch.float32), torch.tensor(float(width), dtype=torch.float32)
    if height / width < lo:
        return height, int(torch.round(h / lo))
    if height / width > lo:
        return int(torch.round(w * lo)), width
    return height, width


def _kornia_boxes(
    target_area: Tensor, aspect: Tensor, u_pos: Tensor, height: int, width: int, ratio: tuple[float, float]
) -> Tensor:
    """kornia's ``ResizedCropGenerator`` (kornia@v0.6.8 ``kornia/augmentation/random_generator/_2d/crop.py:189-240``,
    v0.8.0 219-270) on our uniforms: the same candidates as torchvision's but for three rules, followed here
    (see :func:`sample_crop_boxes`)."""
    # kornia computes w = round(sqrt(A r)), h = round(sqrt(A / r)) and then returns them swapped (h_out = w, w_out =
    # h, crop.py:208-217 at v0.6.8): its crop height is round(sqrt(A r)), so r is h / w (the same law when the ratio
    # range is symmetric in log, as (3/4, 4/3)).
    hw = torch.stack([target_area * aspect, target_area / aspect], dim=-1).sqrt_().round_()  # [B, A, 2]
    limit = _constant((height, width), hw.dtype, hw.device)
    # kornia keeps a candidate only when 0 < h < H and 0 < w < W (`cond`, crop.py:211 at v0.6.8, 241 at v0.8.0):
    # strict, so no candidate spans a whole side (torchvision: h <= H, w <= W).
    valid = ((hw > 0) & (hw < limit)).all(dim=-1)  # [B, A]
    first = valid.to(torch.uint8).argmax(dim=1)  # the first valid attempt, as kornia's `cond.cumsum(1) == 1`
    hw = hw.gather(1, first[:, None, None].expand(-1, 1, 2)).squeeze(1)  # [B, 2]
    # No valid attempt: kornia's fallback size (not torchvision's whole image clamped to the ratio bounds).
    fh, fw = _kornia_fallback_box(height, width, ratio)
    hw = torch.where(valid.any(dim=1, keepdim=True), hw, _constant((fh, fw), hw.dtype, hw.device))
    # kornia then draws every row's position, the fallback's too (CropGenerator.forward, crop.py:72-89 at v0.6.8,
    # 91-108 at v0.8.0: start = floor(U (L - s + 1))), so its fallback is not centred as torchvision's is.
    room = limit - hw
    pos = torch.minimum(torch.floor(u_pos * (room + 1)), room)
    return torch.cat([pos, hw], dim=1).long()


def _boxes_from_uniforms(
    u_area: Tensor,
    u_ratio: Tensor,
    u_pos: Tensor,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    bounds: str = "torchvision",
) -> Tensor:
    """Crop boxes from uniforms in [0, 1): ``u_area``, ``u_ratio`` [B, A] (A attempts), ``u_pos`` [B, 2];
    ``bounds`` the candidate rule (:data:`CROP_BOUNDS`, see :func:`sample_crop_boxes`).

    Heights and widths travel stacked on a last axis of size 2 so that each elementwise op runs once for both
    (the per-call cost is dispatch, not arithmetic); the elementwise operations are those of the per-axis
    formulation, so the boxes are the same bit for bit."""
    area = float(height * width)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u_ratio)
    if bounds == "kornia":
        return _kornia_boxes(target_area, aspect, u_pos, height, width, ratio)
    # (h, w) of every attempt: h = round(sqrt(A / r)), w = round(sqrt(A * r))
    hw = torch.stack([target_area / aspect, target_area * aspect], dim=-1).sqrt_().round_()  # [B, A, 2]
    limit = _constant((height, width), hw.dtype, hw.device)
    valid = ((hw > 0) & (hw <= limit)).all(dim=-1)  # [B, A]
    first = valid.to(torch.uint8).argmax(dim=1)  # index of the first valid attempt (0 if none)
    hw = hw.gather(1, first[:, None, None].expand(-1, 1, 2)).squeeze(1)  # [B, 2]
    # Uniform integer offsets (top, left) in [0, H - h] x [0, W - w] (torchvision: randint(0, H - h + 1)).
    room = limit - hw
    pos = torch.minimum(torch.floor(u_pos * (room + 1)), room)
    # No valid attempt: torchvision's central crop of the whole image, clamped to the ratio bounds.
    fh, fw = _fallback_box(height, width, ratio)
    fallback = _constant(((height - fh) // 2, (width - fw) // 2, fh, fw), hw.dtype, hw.device)
    return torch.where(valid.any(dim=1, keepdim=True), torch.cat([pos, hw], dim=1), fallback).long()


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.6, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    attempts: int = 10,
    bounds: str = "torchvision",
) -> Tensor:
    """Sample ``batch`` crop boxes with torchvision ``RandomResizedCrop.get_params`` semantics, vectorised.

    Per sample: ``attempts`` candidates, each with area fraction ~ U(scale) and log aspect ratio (w/h) ~
    U(log ratio), ``w = round(sqrt(A * r))``, ``h = round(sqrt(A / r))``; the first candidate that fits in the
    image (0 < h <= H, 0 < w <= W) is taken, at a uniform random integer position; if none fits, the central crop
    of the whole image clamped to the ratio bounds. Returns long [batch, 4] rows ``(top, left, h, w)`` on the
    generator's device.

    ``bounds="kornia"``: kornia's ``RandomResizedCrop`` (0.6.8 and 0.8.0) instead. The same area and log-ratio laws,
    10 attempts, round half to even and uniform integer positions, but (1) r is h / w (``h = round(sqrt(A * r))``,
    ``w = round(sqrt(A / r))``), (2) a candidate fits only if 0 < h < H and 0 < w < W, (3) if none fits, kornia's
    fallback size (:func:`_kornia_fallback_box`; a square image with ratio (3/4, 4/3): round(3/4 W) x W) at a
    uniform random position like any other crop.
    """
    if bounds not in CROP_BOUNDS:
        raise ValueError(f"bounds must be one of {CROP_BOUNDS}, got {bounds!r}")
    u = torch.rand(batch, 2 * attempts + 2, generator=generator, device=generator.device)
    return _boxes_from_uniforms(
        u[:, :attempts], u[:, attempts : 2 * attempts], u[:, 2 * attempts :], height, width, scale, ratio, bounds
    )


def _pixel_centres(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """0.5, 1.5, ..., n - 0.5 (output pixel centres), made once. Never modified in place."""
    if torch.compiler.is_compiling():  # a constant of the compiled graph
        return torch.arange(n, device=device, dtype=dtype) + 0.5
    return _cached_pixel_centres(n, dtype, device)


@functools.lru_cache(maxsize=64)
def _cached_pixel_centres(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.arange(n, device=device, dtype=dtype) + 0.5


def crop_grid(boxes: Tensor, in_size: tuple[int, int], size: tuple[int, int], dtype: torch.dtype) -> Tensor:
    """The ``grid_sample`` grid [B, oh, ow, 2] that crops images of ``in_size`` (H, W) to ``boxes`` (long
    [B, 4]: top, left, h, w) and resizes the crops to ``size`` (oh, ow), bilinear with half-pixel centres.

    The source coordinates of bilinear resize with half-pixel centres, clamped to the crop (as
    ``F.interpolate`` on the cropped image does), are computed for y and x together (axis 1), each elementwise
    op once for both, then mapped to ``grid_sample``'s normalised coordinates (``align_corners=False``). Every
    row depends on its own box only, so grids of many boxes can be built at once and sliced."""
    height, width = in_size
    oh, ow = size
    b, device = boxes.shape[0], boxes.device
    bx = boxes.to(dtype)
    start, length = bx[:, :2, None], bx[:, 2:, None]  # [B, 2, 1]: (top, left), (h, w)
    s = start + _pixel_centres(max(oh, ow), dtype, device) * (length / _constant(((oh,), (ow,)), dtype, device)) - 0.5
    s = torch.minimum(torch.maximum(s, start), start + length - 1)
    g = (2 * s + 1) / _constant(((height,), (width,)), dtype, device) - 1  # [B, 2, max(oh, ow)]
    return torch.stack([g[:, None, 1, :ow].expand(b, oh, ow), g[:, 0, :oh, None].expand(b, oh, ow)], dim=-1)


def resample(x: Tensor, grid: Tensor) -> Tensor:
    """Bilinear resampling of ``x`` [B, C, H, W] on a grid from :func:`crop_grid`."""
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def resized_crop(x: Tensor, boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Crop every image of ``x`` [B, C, H, W] to its box (long [B, 4]: top, left, h, w) and resize it to
    ``size`` with bilinear interpolation, all in one ``grid_sample`` call."""
    return resample(x, crop_grid(boxes, (x.shape[-2], x.shape[-1]), size, x.dtype))


def random_grayscale(x: Tensor, apply: Tensor) -> Tensor:
    """Replace the images with ``apply`` (bool [B]) True by their BT.601 luma replicated to 3 channels.
    A no-op for 1-channel input."""
    if x.shape[1] == 1:
        return x
    r, g, b = LUMA_WEIGHTS
    gray = (r * x[:, 0] + g * x[:, 1] + b * x[:, 2]).unsqueeze(1)
    return torch.where(apply[:, None, None, None], gray.expand_as(x), x)


class GSAAugment:
    """Per sample: random grayscale with probability ``grayscale_p``, then a random resized crop to ``size``
    (torchvision ``RandomResizedCrop`` sampling semantics, bilinear; ``bounds="kornia"``: kornia's, see
    :func:`sample_crop_boxes`). Batched over [B, C, H, W] float tensors (C = 1 or 3) on any device; the generator
    must live on the tensor's device.

    All random numbers of a call come from one ``torch.rand(B, 23)`` draw on the generator: column 0 decides
    grayscale, then 10 area and 10 aspect-ratio uniforms (attempts), then 2 position uniforms. Several calls
    can be drawn at once with :class:`PreDrawn`.
    """

    def __init__(
        self,
        size: Sequence[int],  # (height, width)
        scale: Sequence[float] = (0.6, 1.0),  # (min, max)
        ratio: Sequence[float] = (3 / 4, 4 / 3),  # (min, max)
        grayscale_p: float = 0.2,
        attempts: int = 10,
        *,
        bounds: str = "torchvision",  # the crop's candidate rule (CROP_BOUNDS); the subclasses draw their own
    ) -> None:
        if not (0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}")
        if not (0 < ratio[0] <= ratio[1]):
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if not (0.0 <= grayscale_p <= 1.0):
            raise ValueError(f"grayscale_p must be in [0, 1], got {grayscale_p}")
        if bounds not in CROP_BOUNDS:
            raise ValueError(f"bounds must be one of {CROP_BOUNDS}, got {bounds!r}")
        self.size = (int(size[0]), int(size[1]))
        self.scale = (float(scale[0]), float(scale[1]))
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.grayscale_p = float(grayscale_p)
        self.attempts = int(attempts)
        self.bounds = bounds

    def sample(self, x: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Draw the random parameters for batch ``x``: (grayscale bool [B], boxes long [B, 4])."""
        b, _, height, width = x.shape
        return self.draw(b, height, width, generator)

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """The random parameters of ``n`` images of ``height`` x ``width``: (grayscale bool [n], boxes long
        [n, 4])."""
        a = self.attempts
        u = torch.rand(n, 2 * a + 3, generator=generator, device=generator.device)
        gray = u[:, 0] < self.grayscale_p
        boxes = _boxes_from_uniforms(
            u[:, 1 : 1 + a],
            u[:, 1 + a : 1 + 2 * a],
            u[:, 1 + 2 * a :],
            height,
            width,
            self.scale,
            self.ratio,
            self.bounds,
        )
        return gray, boxes

    def grid(self, boxes: Tensor, in_size: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """The resampling grid of ``boxes`` on images of ``in_size`` (see :func:`crop_grid`)."""
        return crop_grid(boxes, in_size, self.size, dtype)

    def apply_grid(self, x: Tensor, gray: Tensor, grid: Tensor) -> Tensor:
        """Apply grayscale flags and a grid from :meth:`grid` to ``x``."""
        return resample(random_grayscale(x, gray), grid)

    def apply(self, x: Tensor, gray: Tensor, boxes: Tensor) -> Tensor:
        """Apply given parameters (from :meth:`sample`) to ``x``."""
        return self.apply_grid(x, gray, self.grid(boxes, (x.shape[-2], x.shape[-1]), x.dtype))

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"GSAAugment expects a [B, 1 or 3, H, W] batch, got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"GSAAugment expects a float tensor, got {x.dtype}; convert the uint8 images first")
        if generator.device.type != x.device.type:
            raise ValueError(
                f"the generator lives on {generator.device} but the images on {x.device}; pass a "
                f"generator on the images' device (torch.Generator(device=x.device))"
            )
        gray, boxes = self.sample(x, generator)
        return self.apply(x, gray, boxes)

    def __repr__(self) -> str:
        bounds = "" if self.bounds == "torchvision" else f", bounds={self.bounds!r}"
        return (
            f"GSAAugment(size={self.size}, scale={self.scale}, ratio={self.ratio}, grayscale_p={self.grayscale_p}"
            f"{bounds})"
        )


class AffineCropAugment(GSAAugment):
    """The crop of GSA's official code (`RandomResizedCropLayer` of its CSL package): the same per-sample grayscale
    and the same area / aspect-ratio sampling (first of 10 attempts that fits; none fits: the whole image), but the
    crop is an affine map of the whole image: offsets are whole multiples of half a pixel, the crop's centre
    c = k / L for an integer k uniform in [s - L, L - s] (s the crop's size, L the image's, in pixels), and
    ``grid_sample`` (bilinear, ``align_corners=False``) reads outside the image by reflection. Drawn parameters
    are float rows (h / H, w / W, vertical centre, horizontal centre) in grid_sample's [-1, 1] coordinates."""

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        a = self.attempts
        u = torch.rand(n, 2 * a + 3, generator=generator, device=generator.device)
        gray = u[:, 0] < self.grayscale_p
        target_area = float(height * width) * (self.scale[0] + (self.scale[1] - self.scale[0]) * u[:, 1 : 1 + a])
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, 1 + a : 1 + 2 * a])
        hw = torch.stack([target_area / aspect, target_area * aspect], dim=-1).sqrt_().round_()  # [n, A, (h, w)]
        limit = _constant((height, width), hw.dtype, hw.device)
        valid = ((hw > 0) & (hw <= limit)).all(dim=-1)
        first = valid.to(torch.uint8).argmax(dim=1)
        hw = hw.gather(1, first[:, None, None].expand(-1, 1, 2)).squeeze(1)
        hw = torch.where(valid.any(dim=1, keepdim=True), hw, limit)
        span = 2 * (limit - hw) + 1  # the integers s - L .. L - s
        k = torch.minimum(torch.floor(u[:, 1 + 2 * a :] * span), span - 1) + hw - limit
        return gray, torch.cat([hw / limit, k / limit], dim=1)

    def grid(self, boxes: Tensor, in_size: tuple[int, int], dtype: torch.dtype) -> Tensor:
        """affine_grid of theta = [[w/W, 0, cx], [0, h/H, cy]] at the output size (align_corners=False)."""
        oh, ow = self.size
        b = boxes.to(dtype)
        ys = (2 * torch.arange(oh, device=b.device, dtype=dtype) + 1) / oh - 1
        xs = (2 * torch.arange(ow, device=b.device, dtype=dtype) + 1) / ow - 1
        gy = b[:, 0, None] * ys + b[:, 2, None]  # [n, oh]
        gx = b[:, 1, None] * xs + b[:, 3, None]  # [n, ow]
        n = len(b)
        return torch.stack([gx[:, None, :].expand(n, oh, ow), gy[:, :, None].expand(n, oh, ow)], dim=-1)

    def apply_grid(self, x: Tensor, gray: Tensor, grid: Tensor) -> Tensor:
        return F.grid_sample(
            random_grayscale(x, gray), grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )

    def apply(self, x: Tensor, gray: Tensor, boxes: Tensor) -> Tensor:
        return self.apply_grid(x, gray, self.grid(boxes, (x.shape[-2], x.shape[-1]), x.dtype))


CROPS = {"torchvision": GSAAugment, "affine": AffineCropAugment}


class PaddedCropAugment(GSAAugment):
    """torchvision's ``RandomCrop(size, padding)`` applied to a batch tensor, then kornia's ``RandomHorizontalFlip``
    (p 0.5 per sample): the ``transform_train`` of the add-on papers' GSA (mkd_ocl ``src/learners/base.py:61-66``).
    torchvision draws one offset per call on a batch tensor, so every sample of one call is cropped at the same
    offset (top, left), uniform on the integers [0, H + 2 padding - h] x [0, W + 2 padding - w] of the zero-padded
    image; the flip is drawn per sample. Per-sample grayscale (``grayscale_p``, 0 in the add-on papers) comes first,
    as in the other crops. ``scale``, ``ratio`` and ``attempts`` are unused.

    Drawn parameters are long rows (top, left, flip), one per image, from one ``torch.rand(n, 4)``; a call applies
    the offset of its first row to all its images (the other rows' offsets are drawn and left unused, so calls can
    be drawn at once with :class:`PreDrawn`, bit for bit as call by call on a CPU generator)."""

    def __init__(
        self,
        size: Sequence[int],  # (height, width)
        scale: Sequence[float] = (0.6, 1.0),
        ratio: Sequence[float] = (3 / 4, 4 / 3),
        grayscale_p: float = 0.0,
        attempts: int = 10,
        padding: int = 4,
    ) -> None:
        super().__init__(size, scale, ratio, grayscale_p, attempts)
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.padding = int(padding)

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        u = torch.rand(n, 4, generator=generator, device=generator.device)
        gray = u[:, 0] < self.grayscale_p
        p = 2 * self.padding
        span = _constant((height + p - self.size[0] + 1, width + p - self.size[1] + 1), u.dtype, u.device)
        corner = torch.minimum(torch.floor(u[:, 1:3] * span), span - 1)  # uniform integer offsets
        return gray, torch.cat([corner, (u[:, 3:] < 0.5).to(u.dtype)], dim=1).long()

    def grid(self, boxes: Tensor, in_size: tuple[int, int], dtype: torch.dtype) -> Tensor:
        return boxes  # an integer window needs no resampling grid: the rows are applied as drawn

    def apply_grid(self, x: Tensor, gray: Tensor, grid: Tensor) -> Tensor:
        if len(x) == 0:
            return x
        p, (oh, ow) = self.padding, self.size
        padded = F.pad(random_grayscale(x, gray), (p, p, p, p))  # zero fill, as torchvision's default
        # the call's first row holds its one offset (torchvision draws one per call on a batch tensor)
        rows = grid[0, 0] + torch.arange(oh, device=x.device)
        cols = grid[0, 1] + torch.arange(ow, device=x.device)
        out = padded.index_select(2, rows).index_select(3, cols)
        return torch.where(grid[:, 2, None, None, None].bool(), out.flip(-1), out)

    def apply(self, x: Tensor, gray: Tensor, boxes: Tensor) -> Tensor:
        return self.apply_grid(x, gray, boxes)

    def __repr__(self) -> str:
        return f"PaddedCropAugment(size={self.size}, padding={self.padding}, grayscale_p={self.grayscale_p})"


class PreDrawn:
    """The random parameters of several consecutive augmentation calls on ``height`` x ``width`` images, drawn
    at once (``n`` rows in all); called like the augmentation (``pre(x, generator)``, the generator unused), it
    applies the next ``len(x)`` rows, in order. The point: one ``torch.rand`` and one batched box sampling (~25
    small ops) instead of one per call.

    The resampling grids of all rows are built at once too, on the first call (with its dtype), and sliced per
    call: ~15 small ops per step instead of per call.

    On a CPU generator this equals calling ``augment(x, generator)`` each time, bit for bit: the generator's
    stream is sequential, so one ``torch.rand(a + b, 23)`` holds ``torch.rand(a, 23)`` then
    ``torch.rand(b, 23)``, and the box sampling and the grids are row-wise (``tests/test_augment.py`` checks
    both). On CUDA the draws are as random but not equal to the per-call ones (Philox hands out numbers per
    launch)."""

    def __init__(self, augment: GSAAugment, n: int, height: int, width: int, generator: torch.Generator):
        self.augment, self.height, self.width = augment, height, width
        self.gray, self.boxes = augment.draw(n, height, width, generator)
        self.grid: Tensor | None = None
        self.used = 0

    @classmethod
    def of(cls, augment: GSAAugment, gray: Tensor, boxes: Tensor, height: int, width: int) -> PreDrawn:
        """The draws another PreDrawn made (its ``gray`` and ``boxes``), none applied yet: a packed step rebuilds
        each run's from the tensors it was handed (cil.core.packed)."""
        pre = cls.__new__(cls)
        pre.augment, pre.height, pre.width = augment, height, width
        pre.gray, pre.boxes, pre.grid, pre.used = gray, boxes, None, 0
        return pre

    @property
    def left(self) -> int:
        """Rows not applied yet."""
        return len(self.boxes) - self.used

    def __call__(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        n = len(x)
        if tuple(x.shape[-2:]) != (self.height, self.width) or n > self.left:
            raise ValueError(
                f"PreDrawn holds {self.left} more draws for {self.height}x{self.width} images, "
                f"asked for {n} of shape {tuple(x.shape)}; draw as many rows as the calls need"
            )
        if self.grid is None or self.grid.dtype != x.dtype:
            self.grid = self.augment.grid(self.boxes, (self.height, self.width), x.dtype)
        rows = slice(self.used, self.used + n)
        self.used += n
        return self.augment.apply_grid(x, self.gray[rows], self.grid[rows])


def hflip(x: Tensor) -> Tensor:
    """Horizontal flip of a [..., H, W] batch."""
    return x.flip(-1)


def local_rotations(x: Tensor) -> Tensor:
    """[x, L(x), LR(x), R(x)] stacked [4N, C, H, W]: L / R turn the left / right half of every image by 180
    degrees in place, LR both halves (W must be even)."""
    n, c, h, w = x.shape
    halves = x.reshape(n, c, h, 2, w // 2)
    turned = halves.flip(2, 4)
    # variant j, half s: turned or not
    pick = torch.tensor([[0, 0], [1, 0], [1, 1], [0, 1]], dtype=torch.bool, device=x.device)
    out = torch.where(pick.view(4, 1, 1, 1, 2, 1), turned.unsqueeze(0), halves.unsqueeze(0))
    return out.reshape(4 * n, c, h, w)


def rotation_views(x: Tensor, local: bool = True) -> Tensor:
    """OCM's expansion of square images x [N, C, H, H] (also OnPro's): X = the local variants of x (or x alone),
    then [X, rot180(X), rot90(X), rot270(X)]; copy k of row i is row k * N + i (16 copies, or 4 without local)."""
    base = local_rotations(x) if local else x
    return torch.cat([base, torch.rot90(base, 2, (2, 3)), torch.rot90(base, 1, (2, 3)), torch.rot90(base, 3, (2, 3))])


def two_views(
    x: Tensor,
    augment: Callable[[Tensor, torch.Generator], Tensor],
    generator: torch.Generator,
    independent: bool = False,
) -> Tensor:
    """The spec's "two views": ``cat([A(x), hflip(A(x))])`` with the SAME augmented batch A(x) in both halves
    (labels are repeated by the caller: ``y.repeat(2)``).

    ``independent=True`` gives ``cat([A(x), hflip(A'(x))])`` with two independent draws, which is what the
    official code's ``RandomFlip(x, 2)`` does (``simclr_aug(x)`` and ``flip_inner(simclr_aug(x), 1, 1)``)."""
    a = augment(x, generator)
    b = augment(x, generator) if independent else a
    return torch.cat([a, hflip(b)], dim=0)


# ---------------------------------------------------------------------------------------------------------------
# Colour jitter and the SimCLR-style augmentation of the SCR / PCR code bases (Mai et al.'s online-CL survey code):
# RandomResizedCrop(scale 0.2-1) -> RandomHorizontalFlip -> RandomApply(ColorJitter(0.4, 0.4, 0.4, 0.1), p=0.8)
# -> RandomGrayscale(p=0.2), per sample, batched on the device.
# ---------------------------------------------------------------------------------------------------------------
def _per_image(v: Tensor) -> Tensor:
    """[B] -> [B, 1, 1, 1] (a factor per image)."""
    return v.view(-1, 1, 1, 1)


def luma(x: Tensor) -> Tensor:
    """[B, 1 or 3, H, W] -> [B, 1, H, W]: BT.601 luma (a 1-channel image is its own luma)."""
    if x.shape[1] == 1:
        return x
    r, g, b = LUMA_WEIGHTS
    return (r * x[:, 0] + g * x[:, 1] + b * x[:, 2]).unsqueeze(1)


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Scale every image by its factor ([B]), clipped to [0, 1] (torchvision's adjust_brightness)."""
    return (x * _per_image(factor)).clamp(0.0, 1.0)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend every image with the mean of its luma (one grey level per image), clipped to [0, 1]."""
    f = _per_image(factor)
    grey = luma(x).mean(dim=(1, 2, 3), keepdim=True)
    return (f * x + (1 - f) * grey).clamp(0.0, 1.0)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend every image with its own luma image, clipped to [0, 1]; a no-op on 1-channel images."""
    if x.shape[1] == 1:
        return x
    f = _per_image(factor)
    return (f * x + (1 - f) * luma(x)).clamp(0.0, 1.0)


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the hue of every image by its shift ([B], in turns, within [-0.5, 0.5]) in HSV space; a no-op on
    1-channel images. Written from the HSV definitions: hue from the largest channel's sector, back to RGB with
    c_n = v - v s clip(min(k_n, 4 - k_n), 0, 1), k_n = (n + 6 h) mod 6, n = 5, 3, 1 for R, G, B."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    v, _ = x.max(dim=1)
    lo, _ = x.min(dim=1)
    chroma = v - lo
    grey = chroma == 0
    safe_v = torch.where(v == 0, torch.ones_like(v), v)
    s = chroma / safe_v
    c = torch.where(grey, torch.ones_like(chroma), chroma)
    # sector of the largest channel (ties resolved red, then green, then blue)
    h = torch.where(v == r, (g - b) / c, torch.where(v == g, 2.0 + (b - r) / c, 4.0 + (r - g) / c))
    h = torch.where(grey, torch.zeros_like(h), h)
    h = torch.remainder(h / 6.0 + shift.view(-1, 1, 1), 1.0)
    n = _constant((5.0, 3.0, 1.0), x.dtype, x.device).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * h.unsqueeze(1), 6.0)
    ramp = torch.minimum(k, 4.0 - k).clamp(0.0, 1.0)
    vv = v.unsqueeze(1)
    return vv - vv * s.unsqueeze(1) * ramp


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def color_jitter(x: Tensor, factors: Tensor, order: Tensor) -> Tensor:
    """Apply brightness, contrast, saturation and hue (``factors`` [B, 4]: three multiplicative factors and a
    hue shift) to every image in its own order (``order`` long [B, 4]: a permutation of 0..3, the op applied
    at each position, as torchvision's ColorJitter draws one per image). Each position computes every op for
    the whole batch and keeps, per image, the one its order names (16 op evaluations, no per-image loop)."""
    for slot in range(4):
        which = order[:, slot]
        out = x
        for i, op in enumerate(JITTER_OPS):
            out = torch.where(_per_image(which == i), op(x, factors[:, i]), out)
        x = out
    return x


class SimCLRAugment:
    """Per sample, in this order: random resized crop to ``size`` (torchvision ``RandomResizedCrop`` sampling
    with ``scale``/``ratio``, bilinear), horizontal flip with probability ``flip_p``, with probability
    ``jitter_p`` a colour jitter (brightness, contrast, saturation factors uniform in [max(0, 1 - j), 1 + j],
    hue shift uniform in [-h, h], the four in a random order), then grayscale with probability ``grayscale_p``.
    Batched over float [B, 1 or 3, H, W] images in [0, 1]; every random number of a call comes from one
    ``torch.rand(B, 2 * attempts + 13)`` on the generator (crop attempts, crop position, flip, jitter on/off,
    four factors, four order keys, grayscale). ``draw`` + ``apply`` split the two halves."""

    def __init__(
        self,
        size: Sequence[int],  # (height, width)
        scale: Sequence[float] = (0.2, 1.0),  # (min, max)
        ratio: Sequence[float] = (3 / 4, 4 / 3),  # (min, max)
        flip_p: float = 0.5,
        jitter: Sequence[float] = (0.4, 0.4, 0.4, 0.1),  # (brightness, contrast, saturation, hue)
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        attempts: int = 10,
    ) -> None:
        if not (0 < scale[0] <= scale[1]):
            raise ValueError(f"scale must satisfy 0 < min <= max, got {scale}")
        if not (0 <= jitter[3] <= 0.5) or min(jitter[:3]) < 0:
            raise ValueError(f"jitter must be three factors >= 0 and a hue in [0, 0.5], got {jitter}")
        self.size = (int(size[0]), int(size[1]))
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.flip_p, self.jitter_p, self.grayscale_p = float(flip_p), float(jitter_p), float(grayscale_p)
        self.jitter = tuple(float(j) for j in jitter)
        self.attempts = int(attempts)

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> dict[str, Tensor]:
        """The random parameters of ``n`` images: boxes [n, 4], flip [n], jitter [n] (on/off), factors [n, 4],
        order [n, 4], gray [n]."""
        a = self.attempts
        u = torch.rand(n, 2 * a + 13, generator=generator, device=generator.device)
        boxes = _boxes_from_uniforms(
            u[:, :a], u[:, a : 2 * a], u[:, 2 * a : 2 * a + 2], height, width, self.scale, self.ratio
        )
        rest = u[:, 2 * a + 2 :]
        lo = _constant(tuple(max(0.0, 1 - j) for j in self.jitter[:3]) + (-self.jitter[3],), u.dtype, u.device)
        hi = _constant(tuple(1 + j for j in self.jitter[:3]) + (self.jitter[3],), u.dtype, u.device)
        return {
            "boxes": boxes,
            "flip": rest[:, 0] < self.flip_p,
            "jitter": rest[:, 1] < self.jitter_p,
            "factors": lo + (hi - lo) * rest[:, 2:6],
            "order": rest[:, 6:10].argsort(dim=1),
            "gray": rest[:, 10] < self.grayscale_p,
        }

    def apply(self, x: Tensor, p: dict[str, Tensor]) -> Tensor:
        """Apply drawn parameters (from :meth:`draw`) to ``x``."""
        x = resized_crop(x, p["boxes"], self.size)
        x = torch.where(_per_image(p["flip"]), hflip(x), x)
        x = torch.where(_per_image(p["jitter"]), color_jitter(x, p["factors"].to(x.dtype), p["order"]), x)
        return random_grayscale(x, p["gray"])

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if x.dim() != 4 or x.shape[1] not in (1, 3) or not x.is_floating_point():
            raise ValueError(f"SimCLRAugment expects a float [B, 1 or 3, H, W] batch, got {x.dtype} {tuple(x.shape)}")
        return self.apply(x, self.draw(len(x), x.shape[-2], x.shape[-1], generator))

    def __repr__(self) -> str:
        return (
            f"SimCLRAugment(size={self.size}, scale={self.scale}, flip_p={self.flip_p}, jitter={self.jitter}, "
            f"jitter_p={self.jitter_p}, grayscale_p={self.grayscale_p})"
        )
