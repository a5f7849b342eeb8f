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
from typing import Callable, Sequence

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


class _Member:
    """One model of a fit: its optimiser, lr schedule, loss (KD with ``kd``, else cross-entropy), the weights of
    its best epoch so far and its history. Several members train in lockstep on the same batches."""

    def __init__(self, name: str, model: nn.Module, kd: KDConfig | None, cfg: TrainConfig, rt: Runtime,
                 steps_per_epoch: int, stats: PixelStats):
        self.name, self.model, self.kd = name, model, kd
        dev = rt.device
        model.to(dev)
        if rt.channels_last:
            model.to(memory_format=torch.channels_last)
        self.loss_fn = get_loss(kd.loss) if kd is not None else get_loss("ce")
        self.loss_kw = {"temperature": kd.temperature, "alpha": kd.alpha} if kd is not None else {}
        self.opt = torch.optim.SGD(
            model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov,
            **({"fused": True} if dev.type == "cuda" else {}),
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, LRSchedule(cfg.epochs, steps_per_epoch, cfg.warmup_epochs, cfg.schedule == "cosine_epoch")
        )
        self.fwd: Callable = model
        self.result = FitResult(runtime={"device": str(dev), "amp_bf16": rt.amp, "channels_last": rt.channels_last,
                                         "compile": rt.compile}, normalization=stats.to_json())
        self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def state(self) -> dict:
        res = self.result
        return {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                "scheduler": self.sched.state_dict(), "best_model": self.best_state, "best_epoch": res.best_epoch,
                "best_val_acc": res.best_val_acc, "history": res.history, "train_seconds": res.train_seconds}

    def load(self, st: dict, dev: torch.device) -> None:
        self.model.load_state_dict(st["model"])
        self.opt.load_state_dict(st["optimizer"])
        self.sched.load_state_dict(st["scheduler"])
        self.best_state = {k: v.to(dev) for k, v in st["best_model"].items()}
        res = self.result
        res.history = list(st["history"])
        res.best_epoch, res.best_val_acc = int(st["best_epoch"]), float(st["best_val_acc"])
        res.train_seconds = float(st["train_seconds"])

    def update(self, xb: torch.Tensor, yb: torch.Tensor, t_logits: torch.Tensor | None, rt: Runtime) -> torch.Tensor:
        """One optimiser step on the (augmented, normalised) batch; the teacher's logits feed the KD loss."""
        with torch.autocast(rt.device.type, dtype=torch.bfloat16, enabled=rt.amp):
            s_logits = self.fwd(xb)
        loss = self.loss_fn(s_logits, t_logits if self.kd is not None else None, yb, **self.loss_kw)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        return loss.detach()


class _Trainer:
    """One fit: the shared data, augmentation and frozen teacher, and the members trained in lockstep on them
    (one for :func:`fit`, several for :func:`fit_group`). Each step augments one batch, runs the teacher once
    (when a member distils) and updates every member in turn: a member's computation is exactly what it would be
    alone, so on CPU it ends bit-identical to training it alone."""

    def __init__(self, members: Sequence[tuple[str, nn.Module, KDConfig | None]], data, cfg: TrainConfig, teacher,
                 desc: str, stats: PixelStats, teacher_stats: PixelStats | None, flat_state: bool):
        self.rt = rt = resolve_runtime(cfg)
        self.dev = dev = rt.device
        self.cfg, self.desc, self.teacher, self.flat_state = cfg, desc, teacher, flat_state
        self.x_train, self.y_train = (t.to(dev) for t in data["train"])
        self.x_val, self.y_val = (t.to(dev) for t in data["val"])
        n = len(self.x_train)
        if n < cfg.batch_size:
            raise ValueError(f"batch_size ({cfg.batch_size}) is larger than the training split ({n} images)")
        self.steps_per_epoch = n // cfg.batch_size  # drop_last: static shapes for CUDA graphs
        self.members = [_Member(name, model, kd, cfg, rt, self.steps_per_epoch, stats) for name, model, kd in members]
        self.needs_teacher = any(m.kd is not None for m in self.members)
        if self.needs_teacher and teacher is None:
            raise ValueError("a member with a KD config needs the teacher")
        if teacher is not None:
            teacher.to(dev).eval()
            if rt.channels_last:
                teacher.to(memory_format=torch.channels_last)
            for p in teacher.parameters():
                p.requires_grad_(False)
        self.stats = stats
        self.augment = Augment(stats.mean, stats.std)
        self.teacher_affine = _renormalizer(stats, teacher_stats, dev) if teacher is not None else None
        self.start_epoch = 0
        self.resumed_from_epoch = 0

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
            states = {self.members[0].name: st} if self.flat_state else st["members"]
            for m in self.members:
                m.load(states[m.name], self.dev)
            _set_rng_state(st["rng"])
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"checkpoint {folder}: its state does not fit these models and optimisers: {e!r}") from e
        self.start_epoch = self.resumed_from_epoch = epoch_done
        log.info("%s: resumed from checkpoint %s (epoch %d of %d)", self.desc, folder, epoch_done, self.cfg.epochs)

    def save(self, root: Path, epoch: int, fingerprint: dict) -> Path:
        cfg = self.cfg
        if self.flat_state:
            state = {**self.members[0].state(), "rng": _rng_state()}
        else:
            state = {"members": {m.name: m.state() for m in self.members}, "rng": _rng_state()}
        # every checkpoint holds each member's best weights; pinning the best epochs of a whole group would keep
        # up to one checkpoint of every member per distinct best epoch, so only a single fit pins its best
        best = self.members[0].result.best_epoch
        pinned = [best] if (cfg.keep_best_checkpoint and self.flat_state and best) else []
        return save_checkpoint(root, epoch, state, fingerprint=fingerprint, keep_last=cfg.keep_checkpoints, keep_epochs=pinned)

    # --- training ------------------------------------------------------------------------------------------

    def make_step(self) -> Callable[[torch.Tensor, torch.Tensor, torch.Generator], torch.Tensor]:
        rt, dev, teacher = self.rt, self.dev, self.teacher
        tfwd = teacher if self.needs_teacher else None
        if rt.compile != "off":
            # one code object compiled per member (and per shape): keep dynamo from falling back to eager at its
            # default limit of 8 recompiles when a group holds many members
            limit = getattr(torch._dynamo.config, "recompile_limit", None)
            if limit is not None:
                torch._dynamo.config.recompile_limit = max(limit, 4 * len(self.members) + 8)
            for m in self.members:
                m.fwd = torch.compile(m.model, mode=rt.compile)
            if tfwd is not None:
                tfwd = torch.compile(teacher, mode=rt.compile)
        cuda_graphs = rt.compile == "reduce-overhead" and dev.type == "cuda"
        if dev.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed shapes (drop_last): pick the fastest kernels once
        augment, members, t_affine = self.augment, self.members, self.teacher_affine

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
            return torch.stack([m.update(xb, yb, t_logits, rt) for m in members])

        return step

    def train_epoch(self, epoch: int, step, progress: _Progress) -> tuple[torch.Tensor, float, float]:
        """One pass over the training split: (mean train loss per member, lr at the epoch's start, seconds)."""
        cfg, dev = self.cfg, self.dev
        for m in self.members:
            m.model.train()
        g = _epoch_generator(cfg.seed, epoch, dev)
        loss_sum = torch.zeros(len(self.members), device=dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        lr_epoch = self.members[0].opt.param_groups[0]["lr"]
        batches = iterate_batches(self.x_train, self.y_train, cfg.batch_size, shuffle=True, drop_last=True, generator=g)
        for i, (xb, yb) in enumerate(batches):
            loss_sum += step(xb, yb, g)
            if progress.bar is not None and (i % 20 == 0 or i == self.steps_per_epoch - 1):
                progress.update(1, epoch=f"{epoch + 1}/{cfg.epochs}", loss=f"{(loss_sum[0] / (i + 1)).item():.3f}")
            else:
                progress.update(1)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        losses = (loss_sum / self.steps_per_epoch).cpu()
        for m, loss in zip(self.members, losses.tolist()):
            if not math.isfinite(loss):
                raise FloatingPointError(f"{m.name}: training loss is {loss} at epoch {epoch + 1}; lower the lr")
        return losses, float(lr_epoch), dt

    def validate(self, m: _Member, epoch: int) -> tuple[float, float]:
        """(val accuracy, val loss) of one member; remembers the weights of its best epoch so far."""
        val_logits = predict(m.model, self.x_val, self.rt, self.cfg.eval_batch_size, stats=self.stats)
        val_acc = float((val_logits.argmax(1) == self.y_val).float().mean().item())
        val_loss = float(torch.nn.functional.cross_entropy(val_logits, self.y_val).item())
        res = m.result
        if val_acc > res.best_val_acc or not res.history:
            res.best_val_acc, res.best_epoch = val_acc, epoch + 1
            m.best_state = {k: v.detach().clone() for k, v in m.model.state_dict().items()}
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
    if ckpt_dir is not None and fingerprint is None:
        fingerprint = fit_fingerprint(model, cfg, teacher=teacher, kd=kd, stats=stats)
    member = (desc, model, kd if teacher is not None else None)
    out = _run([member], data, cfg, teacher=teacher, log_fns={desc: log_fn} if log_fn else {}, ckpt_dir=ckpt_dir,
               on_checkpoint=on_checkpoint, resume=resume, desc=desc, fingerprint=fingerprint, stats=stats,
               teacher_stats=teacher_stats, flat_state=True)
    return out[desc]


def fit_group(
    members: Sequence[tuple[str, nn.Module, KDConfig | None]],
    data: dict[str, tuple[torch.Tensor, torch.Tensor]],
    cfg: TrainConfig,
    *,
    teacher: nn.Module | None = None,
    log_fns: dict[str, LogFn] | None = None,
    ckpt_dir: str | Path | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    resume: bool = True,
    desc: str = "group",
    fingerprint: dict | None = None,
    stats=None,
    teacher_stats=None,
) -> dict[str, tuple[nn.Module, FitResult]]:
    """Train several models in lockstep: ``members`` are ``(name, model, kd)``, ``kd`` None for a model trained
    on hard labels (the baseline). Every step augments one batch (the sequence :func:`fit` with the same
    ``cfg.seed`` would draw), runs the teacher on it once, and updates each member with its own loss, optimiser
    and schedule; each member is selected on validation separately. A member ends bit-identical on CPU to
    :func:`fit` of the same model alone. One checkpoint per epoch holds the whole group (``fingerprint``
    required with ``ckpt_dir``); ``log_fns[name](metrics, epoch)`` gets each member's epoch row. Returns
    {name: (best model, FitResult)}; ``FitResult.images_per_second`` is the group's (batches through every
    member per second)."""
    names = [name for name, _, _ in members]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"fit_group needs members with distinct names, got {names}")
    if ckpt_dir is not None and fingerprint is None:
        raise ValueError("fit_group with ckpt_dir needs the group's fingerprint")
    stats = as_stats(stats) if stats is not None else channel_stats(data["train"][0])
    return _run(list(members), data, cfg, teacher=teacher, log_fns=log_fns or {}, ckpt_dir=ckpt_dir,
                on_checkpoint=on_checkpoint, resume=resume, desc=desc, fingerprint=fingerprint, stats=stats,
                teacher_stats=teacher_stats, flat_state=False)


def _run(members, data, cfg: TrainConfig, *, teacher, log_fns: dict[str, LogFn], ckpt_dir, on_checkpoint, resume: bool,
         desc: str, fingerprint, stats: PixelStats, teacher_stats, flat_state: bool) -> dict[str, tuple[nn.Module, FitResult]]:
    teacher_stats = as_stats(teacher_stats) if teacher_stats is not None else None
    ckpt_root = Path(ckpt_dir) if ckpt_dir is not None else None
    tr = _Trainer(members, data, cfg, teacher, desc, stats, teacher_stats, flat_state)
    if ckpt_root is not None:
        if resume:
            tr.restore(ckpt_root, fingerprint)
        else:
            clear_checkpoints(ckpt_root)
    step = tr.make_step()
    start_epoch, rt, steps_per_epoch = tr.start_epoch, tr.rt, tr.steps_per_epoch
    progress = _Progress(cfg.progress, (cfg.epochs - start_epoch) * steps_per_epoch, desc)
    images_seen, time_in_loop = 0, 0.0
    try:
        for epoch in range(start_epoch, cfg.epochs):
            losses, lr_epoch, dt = tr.train_epoch(epoch, step, progress)
            if not (rt.compile != "off" and epoch == start_epoch and cfg.epochs - start_epoch > 1):
                # steady-state speed: the first epoch of a compiled run pays for compilation / graph capture
                time_in_loop += dt
                images_seen += steps_per_epoch * cfg.batch_size
            rows = _epoch_rows(tr, epoch, losses, lr_epoch, dt, progress)
            if ckpt_root is not None:
                folder = tr.save(ckpt_root, epoch + 1, fingerprint)  # pruned already
                if on_checkpoint is not None:
                    on_checkpoint(folder, epoch + 1)
            for name, row in rows.items():
                if log_fns.get(name) is not None:
                    log_fns[name]({k: float(v) for k, v in row.items() if k != "epoch"}, epoch + 1)
    finally:
        progress.close()
    out = {}
    for m in tr.members:
        m.result.epochs_run = cfg.epochs - start_epoch
        m.result.resumed_from_epoch = tr.resumed_from_epoch
        m.result.images_per_second = images_seen / time_in_loop if time_in_loop > 0 else 0.0
        m.model.load_state_dict(m.best_state)
        out[m.name] = (m.model, m.result)
    return out


def _epoch_rows(tr: _Trainer, epoch: int, losses: torch.Tensor, lr_epoch: float, dt: float, progress) -> dict[str, dict]:
    """Validate every member after an epoch; append and return each member's history row."""
    cfg, rows = tr.cfg, {}
    for m, train_loss in zip(tr.members, losses.tolist()):
        m.result.train_seconds += dt
        val_acc, val_loss = tr.validate(m, epoch)
        row = {"epoch": epoch + 1, "train_loss": train_loss, "val_acc": val_acc, "val_loss": val_loss, "lr": lr_epoch,
               "epoch_seconds": dt, "images_per_second": tr.steps_per_epoch * cfg.batch_size / dt}
        m.result.history.append(row)
        rows[m.name] = row
        progress.epoch_line(f"{m.name} epoch {epoch + 1}/{cfg.epochs}: train_loss {train_loss:.4f} val_acc "
                            f"{val_acc:.4f} ({row['images_per_second']:.0f} img/s)")
    return rows
