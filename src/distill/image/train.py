"""The training loop: ``fit(model, data, cfg, teacher=..., log_fn=...)``.

- SGD with momentum and weight decay, cosine schedule (per epoch like the seed, or per step), optional warmup.
- On CUDA: the split lives on the device, augmentation runs there in batch, bf16 autocast and channels_last,
  optional torch.compile (``reduce-overhead`` = CUDA graphs). On CPU the same code runs on CPU tensors.
- Inputs are normalised with the per-channel pixel statistics of the training split (``stats``; by default
  computed from ``data["train"]``), recorded in :attr:`FitResult.normalization`.
- The frozen teacher runs under ``inference_mode`` on exactly the student's augmented batch (re-normalised to
  the teacher's own statistics when it was trained with other ones).
- A checkpoint after every epoch (model, optimiser, scheduler, RNG states, best-so-far weights, history),
  stamped with the run's fingerprint; a killed run resumes from the last one and ends bit-identical on CPU to
  an uninterrupted run, and a checkpoint of another configuration is refused, never resumed. Old checkpoints
  are pruned (``keep_checkpoints`` last ones plus the best epoch's).
- Metrics go to a ``log_fn(metrics, step)`` callback; the loop never talks to a tracking server.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..checkpoint import (
    CheckpointError,
    CheckpointMismatch,
    resume_checkpoint,
    clear_checkpoints,
    save_checkpoint,
)
from .config import KDConfig, TrainConfig
from .data import Augment, PixelStats, channel_stats, iterate_batches, normalize
from ..files import sha256_json
from ..runtime import Progress as _Progress
from ..runtime import epoch_generator as _epoch_generator
from ..runtime import rng_state as _rng_state
from ..runtime import set_rng_state as _set_rng_state
from .losses import get_loss

log = logging.getLogger("distill.image.train")

LogFn = Callable[[dict, int], None]


@dataclass
class Runtime:
    device: torch.device
    amp: bool
    channels_last: bool
    compile: str  # "off" | "default" | "reduce-overhead"


def resolve_runtime(cfg: TrainConfig) -> Runtime:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was requested but CUDA is not available")
    dev = torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()) else "cpu")
    cuda = dev.type == "cuda"
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and cuda)
    cl = cfg.channels_last == "on" or (cfg.channels_last == "auto" and cuda)
    comp = cfg.compile
    if comp == "auto":
        comp = "reduce-overhead" if cuda else "off"
    return Runtime(dev, amp, cl, comp)


class LRSchedule:
    """Linear warmup then cosine to 0; evaluated per optimiser step. ``per_epoch`` holds the lr flat within an
    epoch (the seed's CosineAnnealingLR(T_max=epochs) stepped once per epoch). A plain object, so LambdaLR's
    state_dict stays JSON-serialisable."""

    def __init__(self, epochs: int, steps_per_epoch: int, warmup_epochs: int, per_epoch: bool):
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.warmup_epochs, self.per_epoch = warmup_epochs, per_epoch

    def __call__(self, step: int) -> float:
        if self.per_epoch:
            t, warm, total = step // self.steps_per_epoch, self.warmup_epochs, self.epochs
        else:
            t, warm, total = step, self.warmup_epochs * self.steps_per_epoch, self.epochs * self.steps_per_epoch
        if t < warm:
            return (t + 1) / (warm + 1)
        return 0.5 * (1.0 + math.cos(math.pi * (t - warm) / max(1, total - warm)))


@dataclass
class FitResult:
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_acc: float = 0.0
    epochs_run: int = 0
    resumed_from_epoch: int = 0
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    runtime: dict = field(default_factory=dict)
    normalization: dict = field(default_factory=dict)  # {"mean": [...], "std": [...]} the inputs were normalised with


def as_stats(stats) -> PixelStats:
    """A (mean, std) pair or ``{"mean", "std"}`` dict as :class:`~distill.image.data.PixelStats`."""
    if isinstance(stats, dict):
        stats = (stats["mean"], stats["std"])
    mean, std = stats
    return PixelStats(tuple(float(v) for v in mean), tuple(float(v) for v in std))


@torch.no_grad()
def predict(model: nn.Module, x_u8: torch.Tensor, rt: Runtime, batch_size: int = 1000, *, stats) -> torch.Tensor:
    """Float32 logits of ``model`` on uint8 images (normalised here with ``stats`` = (mean, std), those of the
    data the model was trained on), in batches, on rt.device."""
    mean, std = as_stats(stats)
    was_training = model.training
    model.eval()
    outs = []
    for i in range(0, len(x_u8), batch_size):
        xb = normalize(x_u8[i : i + batch_size].to(rt.device, non_blocking=True), mean, std)
        if rt.channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.amp):
            outs.append(model(xb).float())
    model.train(was_training)
    return torch.cat(outs) if outs else torch.empty(0)


# TrainConfig fields that do not change what a run computes (display, retention): not in its fingerprint.
NON_RESULT_FIELDS = frozenset({"progress", "keep_checkpoints", "keep_best_checkpoint"})


def train_fingerprint(cfg: TrainConfig) -> dict:
    """The fields of ``cfg`` that determine a run's result (all but :data:`NON_RESULT_FIELDS`), as JSON values."""
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NON_RESULT_FIELDS}


def fit_fingerprint(model: nn.Module, cfg: TrainConfig, *, teacher: nn.Module | None = None, kd: KDConfig | None = None,
                    stats=None) -> dict:
    """The fingerprint :func:`fit` records in its checkpoints when its caller gives none: the model's class and
    parameter shapes, :func:`train_fingerprint`, (with a teacher) the KD config and the input normalisation
    ``stats``. ``stages.train`` passes the fuller ``stages.stage_fingerprint`` instead (whose data manifest
    checksum covers the statistics)."""
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {
        "fit": 1,
        "model": {"class": type(model).__qualname__, "state_shapes_sha256": sha256_json(shapes)},
        "train": train_fingerprint(cfg),
        "kd": (kd or KDConfig()).model_dump(mode="json") if teacher is not None else None,
        "normalization": as_stats(stats).to_json() if stats is not None else None,
    }


def _renormalizer(stats: PixelStats, teacher_stats: PixelStats | None, device: torch.device):
    """(scale, shift) [C,1,1] mapping inputs normalised with ``stats`` to ``teacher_stats``, or None if equal."""
    if teacher_stats is None or tuple(teacher_stats) == tuple(stats):
        return None
    m_s, s_s = (torch.tensor(v, dtype=torch.float64) for v in stats)
    m_t, s_t = (torch.tensor(v, dtype=torch.float64) for v in teacher_stats)
    if len(m_t) != len(m_s):
        raise ValueError(f"the teacher's normalization has {len(m_t)} channels, the data {len(m_s)}")
    # (x*s_s + m_s - m_t) / s_t
    scale, shift = s_s / s_t, (m_s - m_t) / s_t
    return tuple(t.to(torch.float32).view(-1, 1, 1).to(device) for t in (scale, shift))


class _Trainer:
    """One fit() call: set-up, resume, epochs, checkpoints. Split out of fit() to keep each piece readable."""

    def __init__(self, model, data, cfg: TrainConfig, teacher, kd: KDConfig | None, desc: str,
                 stats: PixelStats, teacher_stats: PixelStats | None):
        self.rt = rt = resolve_runtime(cfg)
        self.dev = dev = rt.device
        self.cfg, self.desc, self.model, self.teacher = cfg, desc, model, teacher
        self.x_train, self.y_train = (t.to(dev) for t in data["train"])
        self.x_val, self.y_val = (t.to(dev) for t in data["val"])
        n = len(self.x_train)
        if n < cfg.batch_size:
            raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the training split ({n} images)")
        self.steps_per_epoch = n // cfg.batch_size  # drop_last: static shapes for CUDA graphs

        model.to(dev)
        if rt.channels_last:
            model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(dev).eval()
            if rt.channels_last:
                teacher.to(memory_format=torch.channels_last)
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.loss_fn = get_loss(kd.loss) if teacher is not None else get_loss("ce")
        self.loss_kw = {"temperature": kd.temperature, "alpha": kd.alpha} if teacher is not None else {}

        self.opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
            **({"fused": True} if dev.type == "cuda" else {}),
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, LRSchedule(cfg.epochs, self.steps_per_epoch, cfg.warmup_epochs, cfg.schedule == "cosine_epoch")
        )
        self.stats = stats
        self.augment = Augment(stats.mean, stats.std)
        self.teacher_affine = _renormalizer(stats, teacher_stats, dev) if teacher is not None else None
        self.result = FitResult(runtime={"device": str(dev), "amp_bf16": rt.amp, "channels_last": rt.channels_last, "compile": rt.compile},
                                normalization=stats.to_json())
        self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.start_epoch = 0

    # --- checkpoints ---------------------------------------------------------------------------------------

    def restore(self, root: Path, fingerprint: dict) -> None:
        """Resume from ``root/LATEST`` if there is one; a checkpoint of another fingerprint is refused."""
        loaded = resume_checkpoint(root, fingerprint, fresh_hint="--no-resume (resume=False)")
        if loaded is None:
            return
        folder, epoch_done, st = loaded
        if epoch_done > self.cfg.epochs:
            raise CheckpointMismatch(f"checkpoint {folder} is at epoch {epoch_done}, beyond this run's {self.cfg.epochs} epochs")
        try:
            self.model.load_state_dict(st["model"])
            self.opt.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["scheduler"])
            _set_rng_state(st["rng"])
            self.best_state = {k: v.to(self.dev) for k, v in st["best_model"].items()}
            res = self.result
            res.history = list(st["history"])
            res.best_epoch, res.best_val_acc = int(st["best_epoch"]), float(st["best_val_acc"])
            res.train_seconds = float(st["train_seconds"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"checkpoint {folder}: its state does not fit this model and optimiser: {e!r}") from e
        self.start_epoch = self.result.resumed_from_epoch = epoch_done
        log.info("%s: resumed from checkpoint %s (epoch %d of %d)", self.desc, folder, epoch_done, self.cfg.epochs)

    def save(self, root: Path, epoch: int, fingerprint: dict) -> Path:
        res, cfg = self.result, self.cfg
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": _rng_state(),
            "best_model": self.best_state,
            "best_epoch": res.best_epoch,
            "best_val_acc": res.best_val_acc,
            "history": res.history,
            "train_seconds": res.train_seconds,
        }
        pinned = [res.best_epoch] if cfg.keep_best_checkpoint and res.best_epoch else []
        return save_checkpoint(root, epoch, state, fingerprint=fingerprint, keep_last=cfg.keep_checkpoints, keep_epochs=pinned)

    # --- training ------------------------------------------------------------------------------------------

    def make_step(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]:
        rt, dev, model, teacher = self.rt, self.dev, self.model, self.teacher
        fwd, tfwd = model, teacher
        if rt.compile != "off":
            fwd = torch.compile(model, mode=rt.compile)
            if teacher is not None:
                tfwd = torch.compile(teacher, mode=rt.compile)
        cuda_graphs = rt.compile == "reduce-overhead" and dev.type == "cuda"
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes (drop_last): pick the fastest kernels once
        opt, sched, augment, loss_fn, loss_kw = self.opt, self.sched, self.augment, self.loss_fn, self.loss_kw
        t_affine = self.teacher_affine

        def step(xb_u8: torch.Tensor, yb: torch.Tensor, g: torch.Generator) -> torch.Tensor:
            if cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()
            xb = augment(xb_u8, g)
            if rt.channels_last:
                xb = xb.contiguous(memory_format=torch.channels_last)
            t_logits = None
            if tfwd is not None:
                with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=rt.amp):
                    t_logits = tfwd(xb if t_affine is None else torch.addcmul(t_affine[1], xb, t_affine[0])).float()
                t_logits = t_logits.clone()  # a normal tensor, usable by autograd-tracked ops
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=rt.amp):
                s_logits = fwd(xb)
            loss = loss_fn(s_logits, t_logits, yb, **loss_kw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            return loss.detach()

        return step

    def train_epoch(self, epoch: int, step, progress: _Progress) -> tuple[float, float, float]:
        """One pass over the training split: (mean train loss, lr at the epoch's start, seconds)."""
        cfg, dev = self.cfg, self.dev
        self.model.train()
        g = _epoch_generator(cfg.seed, epoch, dev)
        loss_sum = torch.zeros((), device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        lr_epoch = self.opt.param_groups[0]["lr"]
        batches = iterate_batches(self.x_train, self.y_train, cfg.batch_size, shuffle=True, drop_last=True, generator=g)
        for i, (xb, yb) in enumerate(batches):
            loss_sum += step(xb, yb, g)
            if progress.bar is not None and (i % 20 == 0 or i == self.steps_per_epoch - 1):
                progress.update(1, epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{(loss_sum / (i + 1)).item():.3f}")
            else:
                progress.update(1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        train_loss = float((loss_sum / self.steps_per_epoch).item())
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"{self.desc}: training loss is {train_loss} at epoch {epoch + 1}; lower the lr")
        return train_loss, float(lr_epoch), dt

    def validate(self, epoch: int) -> tuple[float, float]:
        """(val accuracy, val loss); remembers the weights of the best epoch so far."""
        val_logits = predict(self.model, self.x_val, self.rt, self.cfg.eval_batch_size, stats=self.stats)
        val_acc = float((val_logits.argmax(1) == self.y_val).float().mean().item())
        val_loss = float(torch.nn.functional.cross_entropy(val_logits, self.y_val).item())
        res = self.result
        if val_acc > res.best_val_acc or not res.history:
            res.best_val_acc, res.best_epoch = val_acc, epoch + 1
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return val_acc, val_loss


def fit(
    model: nn.Module,
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    *,
    teacher: nn.Module | None = None,
    kd: KDConfig | None = None,
    log_fn: LogFn | None = None,
    ckpt_dir: str | Path | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    resume: bool = True,
    desc: str = "train",
    fingerprint: dict | None = None,
    stats=None,
    teacher_stats=None,
) -> tuple[nn.Module, FitResult]:
    """Train ``model`` on ``data["train"]``, select on ``data["val"]``; returns the best-on-validation model.

    With ``teacher`` the loss is ``kd.loss`` (default Hinton KD); without, plain cross-entropy.

    Inputs are normalised with ``stats`` = (mean, std) per channel of pixel values in [0, 1]: those of the
    training split (``stages.train`` passes the prepared manifest's); ``None`` computes them from
    ``data["train"]`` (:func:`~distill.image.data.channel_stats`). They are returned in
    ``FitResult.normalization``. ``teacher_stats``: what the teacher was trained with (default: ``stats``); the
    teacher's input is re-normalised to them when they differ.

    With ``ckpt_dir``, a checkpoint is written after every epoch, recording ``fingerprint`` (default
    :func:`fit_fingerprint`); then the last ``cfg.keep_checkpoints`` (plus, with ``cfg.keep_best_checkpoint``,
    the best epoch's) are kept and ``on_checkpoint(folder, epoch)`` is called. ``resume=True`` continues from
    ``ckpt_dir/LATEST`` and raises :class:`~distill.checkpoint.CheckpointMismatch` if the checkpoints there
    belong to another fingerprint; ``resume=False`` deletes them and starts over.
    """
    if teacher is not None:
        kd = kd or KDConfig()
    stats = as_stats(stats) if stats is not None else channel_stats(data["train"][0])
    teacher_stats = as_stats(teacher_stats) if teacher_stats is not None else None
    ckpt_root = Path(ckpt_dir) if ckpt_dir is not None else None
    if ckpt_root is not None and fingerprint is None:
        fingerprint = fit_fingerprint(model, cfg, teacher=teacher, kd=kd, stats=stats)
    tr = _Trainer(model, data, cfg, teacher, kd, desc, stats, teacher_stats)
    if ckpt_root is not None:
        if resume:
            tr.restore(ckpt_root, fingerprint)
        else:
            clear_checkpoints(ckpt_root)
    step = tr.make_step()
    result, start_epoch, rt = tr.result, tr.start_epoch, tr.rt
    steps_per_epoch = tr.steps_per_epoch
    progress = _Progress(cfg.progress, (cfg.epochs - start_epoch) * steps_per_epoch, desc)
    images_seen, time_in_loop = 0, 0.0
    try:
        for epoch in range(start_epoch, cfg.epochs):
            train_loss, lr_epoch, dt = tr.train_epoch(epoch, step, progress)
            if not (rt.compile != "off" and epoch == start_epoch and cfg.epochs - start_epoch > 1):
                # steady-state speed: the first epoch of a compiled run pays for compilation / graph capture
                time_in_loop += dt
                images_seen += steps_per_epoch * cfg.batch_size
            result.train_seconds += dt
            val_acc, val_loss = tr.validate(epoch)
            row = {
                "epoch": epoch + 1,
                "train_loss": train_loss,
                "val_acc": val_acc,
                "val_loss": val_loss,
                "lr": lr_epoch,
                "epoch_seconds": dt,
                "images_per_second": steps_per_epoch * cfg.batch_size / dt,
            }
            result.history.append(row)
            progress.epoch_line(
                f"{desc} epoch {epoch + 1}/{cfg.epochs}: train_loss {train_loss:.4f} val_acc {val_acc:.4f} "
                f"({row['images_per_second']:.0f} img/s)"
            )
            if ckpt_root is not None:
                folder = tr.save(ckpt_root, epoch + 1, fingerprint)  # pruned already
                if on_checkpoint is not None:
                    on_checkpoint(folder, epoch + 1)
            if log_fn is not None:
                log_fn({k: float(v) for k, v in row.items() if k != "epoch"}, epoch + 1)
    finally:
        progress.close()
    result.epochs_run = cfg.epochs - start_epoch
    result.images_per_second = images_seen / time_in_loop if time_in_loop > 0 else 0.0
    model.load_state_dict(tr.best_state)
    return model, result
