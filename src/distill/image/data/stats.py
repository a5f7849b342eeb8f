"""Per-channel pixel statistics of a prepared training split: what every model trained on it normalises with.

:func:`channel_stats` streams over a uint8 ``[N, C, H, W]`` array in chunks of images (memory stays bounded by one
chunk whatever N is) and counts, per channel, how often each of the 256 values occurs (exact int64 counts); the
mean and the population standard deviation of the values in [0, 1] are then computed from those histograms in
float64 (two passes over 256 bins: exact sums, no cancellation). ``prepare_dataset`` records them in the manifest
(``normalization``) and a trained model records the ones it was trained with in its ``config.json``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

from .common import DataError

__all__ = ["PixelStats", "channel_stats", "stats_from_manifest", "stats_from_record"]

#: images per chunk when streaming: with 32x32 RGB images, 8192 images are 24 MiB of uint8 (one channel at a
#: time is copied, a third of that)
CHUNK_IMAGES = 8192


class PixelStats(NamedTuple):
    """Per-channel mean and std of pixel values in [0, 1]; ``normalize(x, *stats)`` takes them."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> dict:
        return {"mean": list(self.mean), "std": list(self.std)}


def channel_stats(x: Any, *, chunk: int = CHUNK_IMAGES) -> PixelStats:
    """Per-channel mean and (population) std of ``x / 255`` for a uint8 ``[N, C, H, W]`` array (numpy or a CPU
    torch tensor), streamed ``chunk`` images at a time. A channel without variance gets std 1.0 (so
    normalising only centres it instead of dividing by zero)."""
    if hasattr(x, "numpy") and not isinstance(x, np.ndarray):  # torch tensor
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4:
        raise ValueError(f"channel_stats expects uint8 [N, C, H, W], got {getattr(x, 'dtype', type(x))} "
                         f"{list(getattr(x, 'shape', ()))}")
    n, c = x.shape[:2]
    if n == 0 or x.shape[2] * x.shape[3] == 0:
        raise ValueError("channel_stats needs at least one pixel")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    hist = np.zeros((c, 256), dtype=np.int64)
    for i in range(0, n, chunk):
        block = x[i:i + chunk]
        for ch in range(c):
            hist[ch] += np.bincount(block[:, ch].reshape(-1), minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    means, stds = [], []
    for ch in range(c):
        count = float(hist[ch].sum())
        mean = float((hist[ch] * values).sum() / count)
        var = float((hist[ch] * (values - mean) ** 2).sum() / count)
        std = math.sqrt(var)
        means.append(mean)
        stds.append(std if std > 0 else 1.0)
    return PixelStats(tuple(means), tuple(stds))


def stats_from_record(record: Any, channels: int | None = None, *, where: str,
                      error: type[Exception] = ValueError) -> PixelStats:
    """``{"mean": [...], "std": [...]}`` (as a manifest or a model's config.json records it) -> PixelStats;
    ``error`` naming ``where`` if it is not one finite mean and one positive std per channel."""
    ok = isinstance(record, dict) and isinstance(record.get("mean"), list) and isinstance(record.get("std"), list)
    if ok:
        mean, std = record["mean"], record["std"]
        ok = (
            len(mean) == len(std) > 0
            and (channels is None or len(mean) == channels)
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in mean + std)
            and all(s > 0 for s in std)
        )
    if not ok:
        n = "one per channel" if channels is None else f"{channels} each"
        raise error(f"{where}: normalization must be {{\"mean\": [...], \"std\": [...]}} with finite values, "
                    f"std > 0, {n}; got {record!r}")
    return PixelStats(tuple(float(v) for v in record["mean"]), tuple(float(v) for v in record["std"]))


def stats_from_manifest(manifest: dict, where: str = "manifest.json") -> PixelStats:
    """The training split's pixel statistics a prepared folder's manifest records (``normalization``)."""
    shape = manifest.get("image_shape") or [None]
    if "normalization" not in manifest:
        raise DataError(f"{where} records no normalization statistics: prepare the data again")
    return stats_from_record(manifest["normalization"], shape[0], where=where, error=DataError)
