"""Evaluation: one function returning every number the comparison report needs."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_save
from torch import nn

from .config import EvalConfig, TrainConfig
from .models import count_parameters
from .train import Runtime, predict


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = 15) -> float:
    """ECE with equal-width confidence bins: sum_b |B|/N * |acc(B) - conf(B)|."""
    conf, pred = probs.max(dim=1)
    correct = (pred == labels).float()
    edges = torch.linspace(0, 1, n_bins + 1, device=probs.device)
    ece = torch.zeros((), device=probs.device)
    for lo, hi in zip(edges[:-1], edges[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.float().mean() * (correct[in_bin].mean() - conf[in_bin].mean()).abs()
    return float(ece.item())


def state_dict_bytes(model: nn.Module) -> int:
    """Size of the model's weights serialised as safetensors (what ships)."""
    return len(safetensors_save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}))


#: the speed metrics (:func:`speed_metrics`): always the first four; the CUDA ones where CUDA is available
SPEED_KEYS = ("latency_ms_b1", "throughput", "throughput_batch", "speed_device", "latency_ms_b1_cuda", "throughput_cuda")


def throughput_batch(cfg: EvalConfig, student_batch_size: int | None = None) -> int:
    """The batch throughput is measured at: ``cfg.throughput_batch`` if set, else the student's training batch
    size (``student_train.batch_size`` of the LabConfig), else (no LabConfig known) TrainConfig's default."""
    if cfg.throughput_batch is not None:
        return int(cfg.throughput_batch)
    if student_batch_size is not None:
        return int(student_batch_size)
    return int(TrainConfig.model_fields["batch_size"].default)


@torch.no_grad()
def measure_speed(model: nn.Module, device: torch.device, cfg: EvalConfig, amp: bool = False, channels_last: bool = False,
                  *, batch: int, image_shape: tuple[int, ...] = (3, 32, 32)) -> dict:
    """``{"latency_ms_b1": median ms at batch 1, "throughput": images/s at batch ``batch``}`` on ``device``, with
    random inputs of ``image_shape`` (C, H, W)."""
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(n: int, runs: int) -> list[float]:
        x = torch.randn(n, *image_shape, device=device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        times = []
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            for _ in range(cfg.warmup_runs):
                model(x)
            sync()
            for _ in range(runs):
                t0 = time.perf_counter()
                model(x)
                sync()
                times.append(time.perf_counter() - t0)
        return times

    lat = run(1, cfg.latency_runs)
    thr = run(batch, cfg.throughput_runs)
    return {"latency_ms_b1": statistics.median(lat) * 1e3, "throughput": batch / statistics.median(thr)}


def speed_metrics(model: nn.Module, cfg: EvalConfig | None = None, *, batch: int | None = None,
                  image_shape: tuple[int, ...] = (3, 32, 32)) -> dict:
    """The speed metrics, under stable keys (:data:`SPEED_KEYS`):

    - ``latency_ms_b1``: median ms of a forward pass at batch 1, fp32, on ``speed_device``;
    - ``throughput``: images/s of a forward pass at batch ``throughput_batch``, fp32, on ``speed_device``;
    - ``throughput_batch``: that batch (``batch``, default :func:`throughput_batch` of ``cfg``);
    - ``speed_device``: ``"cpu"`` (the primary numbers are measured on the CPU);
    - where CUDA is available also ``latency_ms_b1_cuda`` (fp32) and ``throughput_cuda`` (bf16 autocast,
      channels_last, batch ``throughput_batch``).

    The model is left on the CPU."""
    cfg = cfg or EvalConfig()
    batch = int(batch) if batch is not None else throughput_batch(cfg)
    cpu = measure_speed(model.to("cpu"), torch.device("cpu"), cfg, batch=batch, image_shape=image_shape)
    out: dict = {"latency_ms_b1": cpu["latency_ms_b1"], "throughput": cpu["throughput"],
                 "throughput_batch": batch, "speed_device": "cpu"}
    if torch.cuda.is_available():
        gpu_model = model.to("cuda")
        lat = measure_speed(gpu_model, torch.device("cuda"), cfg, batch=batch, image_shape=image_shape)  # fp32, as the seed
        out["latency_ms_b1_cuda"] = lat["latency_ms_b1"]
        thr = measure_speed(gpu_model, torch.device("cuda"), cfg, amp=True, channels_last=True, batch=batch,
                            image_shape=image_shape)
        out["throughput_cuda"] = thr["throughput"]
        model.to(memory_format=torch.contiguous_format)
    model.to("cpu")
    return out


def evaluate(
    model: nn.Module,
    x_u8: torch.Tensor,
    y: torch.Tensor,
    cfg: EvalConfig | None = None,
    *,
    stats,
    classes: list[str] | None = None,
    teacher: nn.Module | None = None,
    teacher_stats=None,
    device: str | torch.device | None = None,
    speed_batch: int | None = None,
) -> dict:
    """Accuracy (overall and per class), loss, ECE, agreement with ``teacher``, size and (with ``cfg.speed``)
    the speed metrics of :func:`speed_metrics` at batch ``speed_batch`` (default :func:`throughput_batch`).

    ``stats`` = (mean, std): the pixel statistics the model was trained with (its config.json's
    ``normalization``); ``teacher_stats`` the teacher's (default ``stats``).

    Returns a flat dict of floats (MLflow-ready; per-class accuracy as ``acc_<class>``; ``speed_device`` is a
    string) plus ``per_class_accuracy`` as a dict.
    """
    cfg = cfg or EvalConfig()
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    rt = Runtime(dev, amp=cuda, channels_last=cuda, compile="off")
    model = model.to(dev).eval()
    y = y.to(dev)
    logits = predict(model, x_u8, rt, cfg.batch_size, stats=stats)
    probs = logits.softmax(dim=1)
    pred = logits.argmax(dim=1)
    num_classes = logits.shape[1]
    classes = classes or [str(i) for i in range(num_classes)]
    per_class = {}
    for c, name in enumerate(classes):
        mask = y == c
        per_class[name] = float((pred[mask] == c).float().mean().item()) if mask.any() else float("nan")
    out: dict = {
        "accuracy": float((pred == y).float().mean().item()),
        "loss": float(F.cross_entropy(logits, y).item()),
        "ece": expected_calibration_error(probs, y, cfg.ece_bins),
        "params": float(count_parameters(model)),
        "size_mb": state_dict_bytes(model) / 1e6,
        "n_images": float(len(y)),
    }
    out.update({f"acc_{k}": v for k, v in per_class.items()})
    if teacher is not None:
        t_stats = teacher_stats if teacher_stats is not None else stats
        t_pred = predict(teacher.to(dev).eval(), x_u8, rt, cfg.batch_size, stats=t_stats).argmax(dim=1)
        out["agreement"] = float((t_pred == pred).float().mean().item())
    if cfg.speed:
        out.update(speed_metrics(model, cfg, batch=speed_batch if speed_batch is not None else throughput_batch(cfg),
                                 image_shape=tuple(x_u8.shape[1:])))
    out["per_class_accuracy"] = per_class
    return out
