"""A trained classifier as people consume it: raw images in, class probabilities out.

The model folder's network takes images normalised with the training split's statistics (``config.json``'s
``normalization``). What is registered for serving wraps it so that a caller needs nothing from us: images as
they come from PIL or a decoder, ``[N, H, W, C]`` ``uint8`` in 0..255; out come softmax probabilities
``[N, num_classes]`` in the order of ``classes`` (in :func:`serving_metadata`). Used directly (not through
MLflow's uint8 signature), the module also takes float images in [0, 1].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from .data import load_prepared
from .stages import _read_model_meta, load_model, model_normalization

__all__ = ["ServableClassifier", "raw_input_example", "servable_model", "serving_metadata"]


class ServableClassifier(nn.Module):
    """``images [N, H, W, C]`` -> probabilities ``[N, num_classes]``: uint8 images are read as 0..255; float
    images as [0, 1], unless the batch's largest value is above 1 (then 0..255)."""

    def __init__(self, model: nn.Module, mean, std):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).to(torch.float32)
        if images.dtype == torch.uint8:  # static under torch.export: the registered signature is uint8
            x = x / 255.0
        else:
            x = x * torch.where(x.amax() > 1.0, torch.tensor(1.0 / 255.0), torch.tensor(1.0))
        return self.model((x - self.mean) / self.std).softmax(dim=1)


def servable_model(model_dir: str | Path) -> ServableClassifier:
    """The model of ``model_dir`` (verified as :func:`~distill.image.stages.load_model` does) with its own
    normalisation inside, in eval mode."""
    stats = model_normalization(model_dir)
    return ServableClassifier(load_model(model_dir), stats.mean, stats.std).eval()


def raw_input_example(model_dir: str | Path, data_dir: str | Path, *, split: str = "test", n: int = 2) -> np.ndarray:
    """The first ``n`` images of ``split`` of the prepared ``data_dir`` as a caller has them: uint8
    ``[n, H, W, C]`` (the registered signature's input)."""
    data = load_prepared(data_dir, verify=False)
    if split not in data:
        raise ValueError(f"split must be one of {sorted(data)}, got {split!r}")
    x, _ = data[split]
    return np.ascontiguousarray(x[:n].permute(0, 2, 3, 1).numpy())


def serving_metadata(model_dir: str | Path) -> dict:
    """What a consumer of the registered model needs to call it and read its output (MLflow model metadata)."""
    meta = _read_model_meta(Path(model_dir))
    stats = model_normalization(model_dir)
    classes = [str(c) for c in meta.get("classes") or range(meta["num_classes"])]
    return {
        "classes": classes,
        "num_classes": len(classes),
        "input": "images [N, H, W, C] uint8 0..255, RGB as decoded (numpy.asarray(PIL image)) at the training "
                 "image size (the signature's H, W); no normalisation",
        "output": "softmax probabilities [N, num_classes], columns in the order of 'classes'",
        "normalization": {"mean": list(stats.mean), "std": list(stats.std), "applied": "inside the model"},
        "architecture": meta["model"]["name"],
        "weights_sha256": meta["weights_sha256"],
    }
