"""Evaluation: one function returning every number the comparison report needs."""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_save
from torch import nn

from .config import EvalConfig
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


@torch.no_grad()
def measure_speed(model: nn.Module, device: torch.device, cfg: EvalConfig, amp: bool = False, channels_last: bool = False) -> dict:
    """Median latency at batch 1 (ms) and throughput at batch ``cfg.throughput_batch`` (images/s)."""
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def run(batch: int, runs: int) -> list[float]:
        x = torch.randn(batch, 3, 32, 32, device=device)
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
    thr = run(cfg.throughput_batch, cfg.throughput_runs)
    return {
        "latency_ms_b1": statistics.median(lat) * 1e3,
        f"throughput_b{cfg.throughput_batch}": cfg.throughput_batch / statistics.median(thr),
    }


def evaluate(
    model: nn.Module,
    x_u8: torch.Tensor,
    y: torch.Tensor,
    cfg: EvalConfig | None = None,
    *,
    classes: list[str] | None = None,
    teacher: nn.Module | None = None,
    device: str | torch.device | None = None,
) -> dict:
    """Accuracy (overall and per class), loss, ECE, agreement with ``teacher``, size and speed.

    Returns a flat dict of floats (MLflow-ready; per-class accuracy as ``acc_<class>``) plus
    ``per_class_accuracy`` as a dict.
    """
    cfg = cfg or EvalConfig()
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = dev.type == "cuda"
    rt = Runtime(dev, amp=cuda, channels_last=cuda, compile="off")
    model = model.to(dev).eval()
    y = y.to(dev)
    logits = predict(model, x_u8, rt, cfg.batch_size)
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
        t_pred = predict(teacher.to(dev).eval(), x_u8, rt, cfg.batch_size).argmax(dim=1)
        out["agreement"] = float((t_pred == pred).float().mean().item())
    if cfg.speed:
        cpu_model = model.to("cpu")
        for k, v in measure_speed(cpu_model, torch.device("cpu"), cfg).items():
            out[f"{k}_cpu"] = v
        if torch.cuda.is_available():
            gpu_model = model.to("cuda")
            lat = measure_speed(gpu_model, torch.device("cuda"), cfg)  # fp32 latency, as the seed measured it
            out["latency_ms_b1_cuda"] = lat["latency_ms_b1"]
            thr = measure_speed(gpu_model, torch.device("cuda"), cfg, amp=True, channels_last=True)
            out[f"throughput_b{cfg.throughput_batch}_cuda"] = thr[f"throughput_b{cfg.throughput_batch}"]
            model.to(memory_format=torch.contiguous_format)
    out["per_class_accuracy"] = per_class
    return out
