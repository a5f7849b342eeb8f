"""Turning prepared uint8 batches into model input: normalisation, batched augmentation, mini-batches.

Everything here runs on whatever device the batch lives on. The mean/std are always given: a model normalises
with the pixel statistics of the training split it was trained on (the prepared manifest's ``normalization``,
recorded again in the model's config.json). ``CIFAR10_MEAN``/``CIFAR10_STD`` remain for model folders written
before those statistics were recorded (they were trained with these constants).
"""

from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = ["CIFAR10_MEAN", "CIFAR10_STD", "Augment", "iterate_batches", "normalize"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

_AFFINE_CACHE: dict = {}


def _affine(mean, std, channels: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) [C,1,1] float32 with (x/255 - mean)/std == x*scale + shift."""
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} entries for {channels} channels")
    key = (mean, std, str(device))
    hit = _AFFINE_CACHE.get(key)
    if hit is None:
        m = torch.tensor(mean, dtype=torch.float64)
        s = torch.tensor(std, dtype=torch.float64)
        scale = (1.0 / (255.0 * s)).to(torch.float32).view(-1, 1, 1).to(device)
        shift = (-m / s).to(torch.float32).view(-1, 1, 1).to(device)
        if len(_AFFINE_CACHE) >= 64:  # one entry per (data set statistics, device): keep it small
            _AFFINE_CACHE.clear()
        hit = _AFFINE_CACHE[key] = (scale, shift)
    return hit


def normalize(x_uint8: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 [..., C, H, W] -> float32 (x/255 - mean)/std on the same device; ``mean``/``std`` per channel, of
    pixel values in [0, 1] (e.g. ``normalize(x, *stats)`` with a :class:`~.stats.PixelStats`)."""
    if x_uint8.dtype != torch.uint8:
        raise ValueError(f"normalize expects uint8 images, got {x_uint8.dtype}")
    scale, shift = _affine(mean, std, x_uint8.shape[-3], x_uint8.device)
    return torch.addcmul(shift, x_uint8.to(torch.float32), scale)


class Augment:
    """Batched RandomCrop(H, padding=pad) + RandomHorizontalFlip + normalize, on x's device.

    ``x_uint8`` is [N, C, H, W] uint8. The image is zero-padded (in uint8, so the padding
    becomes the normalised value of black) and each image gets its own crop offset and flip, drawn
    from ``generator`` (or the global RNG of x's device). Random numbers are drawn on the
    generator's device and moved to x's device, so the result is a function of the generator
    state only.
    """

    def __init__(self, mean, std, pad: int = 4, flip: bool = True):
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.pad = int(pad)
        self.flip = bool(flip)

    def __repr__(self) -> str:
        return f"Augment(mean={self.mean}, std={self.std}, pad={self.pad}, flip={self.flip})"

    def __call__(self, x_uint8: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        x = x_uint8
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"Augment expects uint8 [N,C,H,W], got {x.dtype} {list(x.shape)}")
        n, c, h, w = x.shape
        dev = x.device
        rdev = generator.device if generator is not None else dev
        p = self.pad
        rows = torch.arange(h, device=dev).expand(n, h)
        cols = torch.arange(w, device=dev).expand(n, w)
        if p > 0:
            x = F.pad(x, (p, p, p, p))  # zero padding in uint8, before normalising
            oy = torch.randint(0, 2 * p + 1, (n, 1), generator=generator, device=rdev).to(dev)
            ox = torch.randint(0, 2 * p + 1, (n, 1), generator=generator, device=rdev).to(dev)
            rows = rows + oy
            cols = cols + ox
        if self.flip:
            flip = (torch.rand((n, 1), generator=generator, device=rdev) < 0.5).to(dev)
            cols = torch.where(flip, cols.flip(1), cols)
        out = x[
            torch.arange(n, device=dev).view(n, 1, 1, 1),
            torch.arange(c, device=dev).view(1, c, 1, 1),
            rows.reshape(n, 1, h, 1),
            cols.reshape(n, 1, 1, w),
        ]
        return normalize(out, self.mean, self.std)


def iterate_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, *, shuffle: bool, drop_last: bool,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (xb, yb) mini-batches; with shuffle, one torch.randperm per pass."""
    n = len(x)
    if len(y) != n:
        raise ValueError(f"x has {n} items but y has {len(y)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    end = n - n % batch_size if drop_last else n
    if shuffle:
        rdev = generator.device if generator is not None else x.device
        perm = torch.randperm(n, generator=generator, device=rdev)
        perm_x = perm.to(x.device)
        perm_y = perm_x if y.device == x.device else perm.to(y.device)
        for i in range(0, end, batch_size):
            yield x[perm_x[i:i + batch_size]], y[perm_y[i:i + batch_size]]
    else:
        for i in range(0, end, batch_size):
            yield x[i:i + batch_size], y[i:i + batch_size]
