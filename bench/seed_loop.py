"""The seed document's CIFAR-10 training loop, re-implemented (our own code) for benchmarking.

What "the seed's loop as written" does, and what this module reproduces:

- a Dataset that, like ``torchvision.datasets.CIFAR10``, holds uint8 HWC arrays and builds one PIL image per
  ``__getitem__`` (``Image.fromarray``), then applies the torchvision transforms
  RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize(CIFAR-10 mean/std);
- ``DataLoader(batch_size=128, shuffle=True, num_workers=2)`` (no pin_memory, default prefetch);
- fp32 everywhere: no autocast, no channels_last, no torch.compile, cuDNN settings left at their defaults;
- per batch: ``.to(device)``, ``optimizer.zero_grad()``, ``outputs = model(inputs)``, loss, ``backward()``,
  ``step()``; SGD(lr=0.1, momentum=0.9, weight_decay=5e-4);
- distillation: the teacher in eval mode under ``torch.no_grad()``, and the seed's loss
  ``F.kl_div(log_softmax(s/T), softmax(t/T), reduction='batchmean') * T * T * alpha + (1 - alpha) * CE``
  with T=4, alpha=0.7.

Only the timing harness is added: a warm-up of a few steps, then a fixed number of timed steps
(synchronised on CUDA at both ends).
"""

from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def seed_transform() -> transforms.Compose:
    """The seed's training transforms, in the seed's order."""
    return transforms.Compose(
        [
            transforms.RandomCrop(32, padding=4),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(CIFAR10_MEAN, CIFAR10_STD),
        ]
    )


class SeedCIFAR(Dataset):
    """CIFAR-10-style dataset: uint8 [N, H, W, 3] array + int labels; a PIL image is built per item.

    ``length`` may exceed N (items wrap around), so that one epoch covers a whole timed measurement
    without the DataLoader restarting its workers in the middle of it.
    """

    def __init__(self, data_hwc: np.ndarray, targets, transform=None, length: int | None = None):
        if data_hwc.dtype != np.uint8 or data_hwc.ndim != 4 or data_hwc.shape[-1] != 3:
            raise ValueError(f"expected uint8 [N,H,W,3], got {data_hwc.dtype} {data_hwc.shape}")
        self.data = data_hwc
        self.targets = [int(t) for t in targets]  # torchvision keeps a list of ints
        self.transform = transform
        self.n = len(self.data)
        self.length = self.n if length is None else int(length)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        j = index % self.n
        img, target = Image.fromarray(self.data[j]), self.targets[j]
        if self.transform is not None:
            img = self.transform(img)
        return img, target


def make_loader(dataset: Dataset, batch_size: int = 128, num_workers: int = 2) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers)


def distillation_loss(student_logits, teacher_logits, labels, T: float = 4.0, alpha: float = 0.7):
    """The seed's loss, as written (batchmean KL on [B, C] logits is the per-sample mean: correct here)."""
    soft = F.kl_div(
        F.log_softmax(student_logits / T, dim=1), F.softmax(teacher_logits / T, dim=1), reduction="batchmean"
    ) * (T * T)
    hard = F.cross_entropy(student_logits, labels)
    return soft * alpha + (1.0 - alpha) * hard


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_seed_loop(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    *,
    teacher: nn.Module | None = None,
    warmup_steps: int = 10,
    steps: int = 200,
    temperature: float = 4.0,
    alpha: float = 0.7,
) -> dict:
    """Run the seed's loop for ``warmup_steps + steps`` batches; time the last ``steps``.

    Returns ``{"images_per_second", "seconds", "images", "steps"}``. The loader's dataset must hold at least
    ``(warmup_steps + steps) * batch_size`` items (one epoch, full batches: worker start-up falls in the
    warm-up).
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    need = (warmup_steps + steps) * loader.batch_size
    if len(loader.dataset) < need:
        raise ValueError(f"the loader's dataset holds {len(loader.dataset)} items; {need} are needed")
    model.to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()
    if teacher is not None:
        teacher.to(device)
        teacher.eval()
    model.train()
    images, t0 = 0, None
    it = iter(loader)
    try:
        for i in range(warmup_steps + steps):
            if i == warmup_steps:
                _sync(device)
                t0 = time.perf_counter()
            inputs, labels = next(it)
            inputs, labels = inputs.to(device), labels.to(device)
            optimizer.zero_grad()
            outputs = model(inputs)
            if teacher is not None:
                with torch.no_grad():
                    teacher_outputs = teacher(inputs)
                loss = distillation_loss(outputs, teacher_outputs, labels, temperature, alpha)
            else:
                loss = criterion(outputs, labels)
            loss.backward()
            optimizer.step()
            if i >= warmup_steps:
                images += inputs.shape[0]
        _sync(device)
        dt = time.perf_counter() - t0
    finally:
        del it  # shuts the workers down (outside the timed region)
    return {"images_per_second": images / dt, "seconds": dt, "images": images, "steps": steps}
