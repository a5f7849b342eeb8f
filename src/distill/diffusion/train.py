"""The diffusion training loop, shared by the teacher, every progressive round and the consistency stage.

``fit`` draws each step's batch, flips and noise from a generator seeded by ``(seed, step)``, so a run resumed
from a checkpoint replays exactly what an uninterrupted run does (bit-identical on CPU; tested). The images stay
on the device as uint8 and are scaled to [-1, 1] per batch. AdamW with linear warm-up then a constant rate,
gradient clipping, and an EMA of the weights (with the usual warm-up ``min(decay, (1 + s) / (10 + s))``), which
is the model the stage saves and samples with; for consistency distillation the same EMA is the target network.
On CUDA: bf16 autocast and channels_last (per ``amp`` / ``channels_last``). Metrics go to ``log_fn(metrics, step)``;
the loop never talks to a tracking server. Checkpoints (model, EMA, optimiser, history) every
``checkpoint_every`` steps and at the end, through :mod:`distill.checkpoint`.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from ..checkpoint import resume_checkpoint, save_checkpoint
from ..runtime import Progress, epoch_generator
from .config import DiffTrainConfig

__all__ = ["FitResult", "Runtime", "fit", "resolve_runtime", "to_unit_range", "train_fingerprint"]

#: fields that do not change a training's result (left out of its fingerprint)
NON_RESULT_FIELDS = frozenset({"progress", "checkpoint_every", "keep_checkpoints", "log_every"})

StepLoss = Callable[[torch.nn.Module, torch.nn.Module, torch.Tensor, torch.Generator], torch.Tensor]


@dataclass
class Runtime:
    device: torch.device
    amp: bool
    channels_last: bool

    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16) if self.amp else nullcontext()


def resolve_runtime(cfg: DiffTrainConfig) -> Runtime:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but CUDA is not available")
    dev = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    cuda = dev.type == "cuda"
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and cuda)  # bf16 on CPU only when asked for explicitly
    cl = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda)
    return Runtime(dev, amp, cl)


def train_fingerprint(cfg: DiffTrainConfig) -> dict:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NON_RESULT_FIELDS}


def to_unit_range(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return x_u8.float().div_(127.5).sub_(1.0)


@dataclass
class FitResult:
    model: torch.nn.Module
    ema: torch.nn.Module
    history: list[dict]
    resumed_from_step: Optional[int]
    steps_run: int
    train_seconds: float


def _batch(images: torch.Tensor, batch: int, g: torch.Generator, hflip: bool, channels_last: bool) -> torch.Tensor:
    idx = torch.randint(0, images.shape[0], (batch,), generator=g, device=g.device)
    x = to_unit_range(images[idx])
    if hflip:
        flip = torch.rand(batch, generator=g, device=g.device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@torch.no_grad()
def _ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float, step: int) -> None:
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm.detach(), 1 - d)
    for be, bm in zip(ema.buffers(), model.buffers()):
        be.copy_(bm)


def _lr(cfg: DiffTrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / (cfg.warmup_steps + 1)) if cfg.warmup_steps else cfg.lr


def _restore(ckpt_dir, fingerprint, model, ema, opt) -> tuple[int, list]:
    found = resume_checkpoint(ckpt_dir, fingerprint, fresh_hint="--no-resume (resume=False)")
    if found is None:
        return 0, []
    _, step, state = found
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    return step, list(state.get("history", []))


def fit(model: torch.nn.Module, step_loss: StepLoss, images_u8: torch.Tensor, cfg: DiffTrainConfig, *,
        ckpt_dir: str | Path, fingerprint: dict, hflip: bool = True, log_fn=None, on_checkpoint=None,
        resume: bool = True, desc: str = "train") -> FitResult:
    """Train ``model`` for ``cfg.steps`` steps of ``step_loss(model, ema, x, generator)`` on batches of
    ``images_u8`` (uint8 [N, C, H, W]); returns the trained model, its EMA and the history."""
    t_start = time.perf_counter()
    rt = resolve_runtime(cfg)
    fmt = torch.channels_last if rt.channels_last else torch.preserve_format
    model = model.to(rt.device, memory_format=fmt).train()
    ema = copy.deepcopy(model).requires_grad_(False).eval()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start, history = _restore(ckpt_dir, fingerprint, model, ema, opt) if resume else (0, [])
    images = images_u8.to(rt.device)
    progress = Progress(cfg.progress, cfg.steps - start, desc)
    t0, running, seen = time.perf_counter(), 0.0, 0
    try:
        for step in range(start, cfg.steps):
            g = epoch_generator(cfg.seed, step, rt.device)
            x = _batch(images, cfg.batch_size, g, hflip, rt.channels_last)
            for group in opt.param_groups:
                group["lr"] = _lr(cfg, step)
            with rt.autocast():
                loss = step_loss(model, ema, x, g)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            _ema_update(ema, model, cfg.ema_decay, step)
            running, seen = running + float(loss.detach()), seen + 1
            done = step + 1
            progress.update(1, loss=f"{float(loss.detach()):.4f}")
            if done % cfg.log_every == 0 or done == cfg.steps:
                row = {"step": done, "loss": running / seen, "lr": _lr(cfg, step),
                       "images_per_s": seen * cfg.batch_size / max(time.perf_counter() - t0, 1e-9)}
                history.append(row)
                progress.epoch_line(f"{desc} step {done}/{cfg.steps}: loss {row['loss']:.4f}")
                if log_fn is not None:
                    log_fn({k: v for k, v in row.items() if k != "step"}, done)
                t0, running, seen = time.perf_counter(), 0.0, 0
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
                         "history": history}
                folder = save_checkpoint(ckpt_dir, done, state, fingerprint=fingerprint, keep_last=cfg.keep_checkpoints)
                if on_checkpoint is not None:
                    on_checkpoint(folder, done)
    finally:
        progress.close()
    return FitResult(model.eval(), ema, history, start or None, cfg.steps - start, time.perf_counter() - t_start)
