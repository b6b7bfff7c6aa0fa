"""Batched, device-side view makers: plain, weak and strong augmentation of uint8 images or features.

Images: weak = random shift by up to 12.5% of the side (zero padding + random crop, like
torchvision's ``RandomCrop(32, padding=4)`` in the reference code) and an optional horizontal flip;
strong = weak + RandAugment + Cutout (Co-Reg section IV-E). RandAugment draws ``num_ops`` operations
per sample with a random magnitude each; every operation runs once per call on the subset of the
batch that drew it, so the cost does not grow with a Python loop over samples.

Every random number is drawn on the CPU from ``generator`` and then moved to the data's device:
the same seed gives the same augmentation parameters on any device, and identical outputs on CPU.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from trainables.api import Views

VIEW_KINDS = ("image", "features")


def make_views(
    kind: str,
    *,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    hflip: bool,
    generator: torch.Generator,
    num_ops: int = 1,
) -> Views:
    """Plain / weak / strong view makers.

    Args:
        kind: ``image`` for uint8 (B, C, H, W) inputs, ``features`` for float (B, D) inputs.
        mean, std: per-channel normalisation applied after augmentation (images, in [0, 1] units);
            per-dimension standardisation for features (None: none).
        hflip: flip horizontally in the weak and strong views (off for digits and traffic signs).
        generator: CPU generator all randomness comes from.
        num_ops: RandAugment operations per sample in the strong view (Co-Reg: 1, FixMatch: 2).
    """
    if kind == "image":
        return _ImageViews(mean, std, hflip, generator, num_ops).views()
    if kind == "features":
        return _FeatureViews(mean, std, generator).views()
    raise ValueError(f"unknown view kind {kind!r}; allowed: {', '.join(VIEW_KINDS)}")


def _rand(generator: torch.Generator, n: int, device: torch.device) -> Tensor:
    return torch.rand(n, generator=generator).to(device)


class _FeatureViews:
    """Features: plain = (standardised) input; weak = + small gaussian noise; strong = dropout + larger noise.

    Noise is scaled by each sample's own standard deviation, so it does not depend on the feature scale.
    """

    WEAK_NOISE, STRONG_NOISE, STRONG_DROP = 0.1, 0.3, 0.2

    def __init__(self, mean: Sequence[float] | None, std: Sequence[float] | None, generator: torch.Generator):
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32)
        self.generator = generator

    def views(self) -> Views:
        return Views(plain=self.plain, weak=self.weak, strong=self.strong)

    def plain(self, x: Tensor) -> Tensor:
        x = x.float()
        if self.mean is not None:
            x = x - self.mean.to(x.device)
        if self.std is not None:
            x = x / self.std.to(x.device)
        return x

    def _noise(self, x: Tensor, scale: float) -> Tensor:
        eps = torch.randn(x.shape, generator=self.generator).to(x.device)
        return scale * x.std(dim=1, keepdim=True) * eps

    def weak(self, x: Tensor) -> Tensor:
        x = self.plain(x)
        return x + self._noise(x, self.WEAK_NOISE)

    def strong(self, x: Tensor) -> Tensor:
        x = self.plain(x)
        keep = (torch.rand(x.shape, generator=self.generator) >= self.STRONG_DROP).to(x.device)
        x = x * keep / (1.0 - self.STRONG_DROP)
        return x + self._noise(x, self.STRONG_NOISE)


class _ImageViews:
    def __init__(
        self,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        hflip: bool,
        generator: torch.Generator,
        num_ops: int,
    ):
        self.mean = torch.as_tensor(mean if mean is not None else 0.0, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.std = torch.as_tensor(std if std is not None else 1.0, dtype=torch.float32).reshape(1, -1, 1, 1)
        self.hflip = hflip
        self.generator = generator
        self.num_ops = num_ops

    def views(self) -> Views:
        return Views(plain=self.plain, weak=self.weak, strong=self.strong)

    def _normalise(self, x: Tensor) -> Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def plain(self, x: Tensor) -> Tensor:
        return self._normalise(x.float() / 255.0)

    def _weak01(self, x: Tensor) -> Tensor:
        x = random_shift(x.float() / 255.0, self.generator)
        if self.hflip:
            flip = (_rand(self.generator, len(x), x.device) < 0.5)[:, None, None, None]
            x = torch.where(flip, x.flip(-1), x)
        return x

    def weak(self, x: Tensor) -> Tensor:
        return self._normalise(self._weak01(x))

    def strong(self, x: Tensor) -> Tensor:
        x = rand_augment(self._weak01(x), self.generator, self.num_ops)
        return self._normalise(cutout(x, self.generator))


def random_shift(x: Tensor, generator: torch.Generator, max_fraction: float = 0.125) -> Tensor:
    """Zero-pad by ``max_fraction`` of each side and crop back at a random offset.  # (B, C, H, W)"""
    b, _, h, w = x.shape
    pad_h, pad_w = int(max_fraction * h + 0.5), int(max_fraction * w + 0.5)
    padded = F.pad(x, (pad_w, pad_w, pad_h, pad_h)).permute(0, 2, 3, 1)  # (B, H + 2ph, W + 2pw, C)
    dy = torch.randint(0, 2 * pad_h + 1, (b,), generator=generator).to(x.device)
    dx = torch.randint(0, 2 * pad_w + 1, (b,), generator=generator).to(x.device)
    rows = dy[:, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = dx[:, None] + torch.arange(w, device=x.device)  # (B, W)
    batch = torch.arange(b, device=x.device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2).contiguous()


def cutout(x: Tensor, generator: torch.Generator, max_fraction: float = 0.5, fill: float = 0.5) -> Tensor:
    """Grey out a square of side U(0, max_fraction) * size at a random centre (reference RandomAugment)."""
    b, _, h, w = x.shape
    side = _rand(generator, b, x.device) * max_fraction * min(h, w)  # (B,)
    cy, cx = _rand(generator, b, x.device) * h, _rand(generator, b, x.device) * w
    ys = torch.arange(h, device=x.device, dtype=x.dtype) + 0.5
    xs = torch.arange(w, device=x.device, dtype=x.dtype) + 0.5
    in_y = (ys[None, :] - cy[:, None]).abs() < side[:, None] / 2  # (B, H)
    in_x = (xs[None, :] - cx[:, None]).abs() < side[:, None] / 2  # (B, W)
    box = (in_y[:, :, None] & in_x[:, None, :])[:, None]  # (B, 1, H, W)
    return x.masked_fill(box, fill)


# RandAugment operations on [0, 1] images. Each takes (x (n, C, H, W), magnitude (n,) in [0, 1],
# sign (n,) in {-1, 1}); ranges follow FixMatch's RandAugment, with enhancement factors 1 +- 0.9 m.


def _gray(x: Tensor) -> Tensor:
    if x.shape[1] == 3:
        return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]).expand_as(x)
    return x.mean(dim=1, keepdim=True).expand_as(x)


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance: degenerate + factor * (x - degenerate), clipped to [0, 1]."""
    return (degenerate + factor[:, None, None, None] * (x - degenerate)).clamp(0.0, 1.0)


def _enhance_factor(m: Tensor, s: Tensor) -> Tensor:
    return 1.0 + 0.9 * m * s


def _identity(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    return x


def _autocontrast(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)


def _equalize(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    """Per-channel histogram equalisation on 256 levels."""
    n, c, h, w = x.shape
    levels = (x * 255).round().long().clamp(0, 255).reshape(n * c, h * w)
    hist = torch.zeros(n * c, 256, device=x.device).scatter_add_(1, levels, torch.ones_like(levels, dtype=torch.float))
    cdf = hist.cumsum(dim=1)
    cdf_min = torch.where(hist > 0, cdf, torch.full_like(cdf, float(h * w))).amin(dim=1, keepdim=True)
    span = (h * w - cdf_min).clamp_min(1.0)
    lut = ((cdf - cdf_min) / span).clamp(0.0, 1.0)
    out = lut.gather(1, levels).reshape(n, c, h, w)
    constant = (span <= 1.0).reshape(n, c, 1, 1)
    return torch.where(constant, x, out)


def _brightness(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    return _blend(torch.zeros_like(x), x, _enhance_factor(m, s))


def _contrast(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True).expand_as(x)
    return _blend(mean, x, _enhance_factor(m, s))


def _color(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    return _blend(_gray(x), x, _enhance_factor(m, s))


def _sharpness(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    c = x.shape[1]
    kernel = torch.tensor([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]], device=x.device) / 13.0
    smooth = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), kernel.expand(c, 1, 3, 3), groups=c)
    return _blend(smooth, x, _enhance_factor(m, s))


def _posterize(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    shift = 2.0 ** torch.round(4 * m)  # keep 8 - round(4 m) bits, i.e. 4..8
    return torch.floor(x * 255 / shift[:, None, None, None]) * shift[:, None, None, None] / 255


def _solarize(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    threshold = (1.0 - m)[:, None, None, None]
    return torch.where(x >= threshold, 1.0 - x, x)


def _affine(x: Tensor, theta: Tensor) -> Tensor:
    """Bilinear affine warp; pixels from outside the image are mid-grey (FixMatch's fill colour)."""
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x - 0.5, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + 0.5


def _eye(n: int, ref: Tensor) -> Tensor:
    return torch.eye(2, 3, device=ref.device, dtype=ref.dtype).repeat(n, 1, 1)  # (n, 2, 3)


def _rotate(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
    angle = m * s * math.radians(30.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = _eye(len(x), x)
    theta[:, 0, 0], theta[:, 0, 1] = cos, -sin
    theta[:, 1, 0], theta[:, 1, 1] = sin, cos
    return _affine(x, theta)


def _shear(axis: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def op(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
        theta = _eye(len(x), x)
        theta[:, axis, 1 - axis] = 0.3 * m * s
        return _affine(x, theta)

    return op


def _translate(axis: int) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    def op(x: Tensor, m: Tensor, s: Tensor) -> Tensor:
        theta = _eye(len(x), x)
        theta[:, axis, 2] = 2 * 0.3 * m * s  # normalised coordinates span 2 per side length
        return _affine(x, theta)

    return op


RAND_AUGMENT_OPS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "identity": _identity,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "brightness": _brightness,
    "contrast": _contrast,
    "color": _color,
    "sharpness": _sharpness,
    "posterize": _posterize,
    "solarize": _solarize,
    "rotate": _rotate,
    "shear_x": _shear(0),
    "shear_y": _shear(1),
    "translate_x": _translate(0),
    "translate_y": _translate(1),
}


def rand_augment(x: Tensor, generator: torch.Generator, num_ops: int = 1) -> Tensor:
    """Apply ``num_ops`` random operations per sample, each with a random magnitude and sign.  # (B, C, H, W)"""
    ops = [op for name, op in RAND_AUGMENT_OPS.items() if not (name == "color" and x.shape[1] == 1)]
    b = x.shape[0]
    for _ in range(num_ops):
        choice = torch.randint(0, len(ops), (b,), generator=generator)  # stays on the CPU: no device sync
        magnitude = _rand(generator, b, x.device)
        sign = torch.where(_rand(generator, b, x.device) < 0.5, -1.0, 1.0)
        out = x.clone()
        for k, op in enumerate(ops):
            rows = (choice == k).nonzero().flatten()
            if len(rows) == 0:
                continue
            rows = rows.to(x.device)
            out[rows] = op(x[rows], magnitude[rows], sign[rows]).to(x.dtype)
        x = out
    return x.clamp(0.0, 1.0)
