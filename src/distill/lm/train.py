"""The language-model distillation loop: ``fit_lm(student, train_blocks, val_blocks, cfg, teacher=..., kd=...)``.

Data. ``train_blocks`` / ``val_blocks`` are ``(input_ids [N, T] long, labels [N, T] long, mask [N, T] bool)``,
already aligned: ``logits[:, t]`` (the model's output at position ``t``) predicts ``labels[:, t]``, and ``mask``
selects the target tokens (prompt / padding / the last position of a packed block are False). Nothing is shifted
here. Models are Hugging Face style causal LMs, called as ``model(input_ids=x, use_cache=False)`` and read through
``.logits`` (a plain tensor output is accepted too). The blocks may live on the CPU; micro-batches are moved to
the training device.

Optimisation.

- AdamW (``lr``, ``betas``, ``weight_decay`` on parameters of 2 or more dimensions only, none on biases and norm
  weights; fused on CUDA), learning rate per optimiser step: linear warmup over
  ``warmup_steps`` then cosine from ``lr`` down to ``min_lr_ratio * lr`` at step ``steps`` (``schedule="cosine"``)
  or flat (``"constant"``); gradient-norm clipping at ``grad_clip`` (0 = off).
- One optimiser step consumes ``batch_size * grad_accum`` blocks as ``grad_accum`` micro-batches of
  ``batch_size``. **Accumulation weighting**: the step's loss is the mean per target token over *all* the blocks
  of the step. Each micro-batch contributes ``(sum of its per-token losses) / N_step`` where ``N_step`` is the
  number of target tokens of the whole step (known in advance from the masks), i.e. micro-batches are weighted
  by their token counts. The accumulated gradient is therefore exactly (to fp rounding) that of one batch of
  ``grad_accum * batch_size`` blocks, whatever the token counts of the micro-batches (not only when they are equal).
  For distillation the per-token loss is that of :func:`distill.lm.losses.distill_loss` (its soft and hard terms
  are both means over the same tokens, so ``mean * num_tokens`` is the per-token sum).
- Loss: with a teacher and ``kd.kind != "ce"``, :func:`distill.lm.losses.distill_loss` (``kind``, ``temperature``,
  ``alpha``, ``beta``, ``skew``, ``chunk_tokens``); without a teacher or with ``kind="ce"``, plain masked
  cross-entropy (chunked the same way, with activation checkpointing per chunk). The teacher is frozen (eval mode,
  ``requires_grad=False``) and runs per micro-batch under ``inference_mode``; if the two vocabularies differ both
  logits are sliced to the shared leading ``min(V_student, V_teacher)`` entries.
- bf16 autocast on CUDA (``amp="auto"``), or wherever ``amp="bf16"``; the losses run in float32.

Generated batches: on-policy GKD and sequence-level KD (:mod:`distill.lm.gkd`; Agarwal et al. 2024, TRL
``GKDTrainer`` conventions). With ``kd.lmbda > 0`` each micro-batch is, with probability ``lmbda``, replaced by the
STUDENT's sampled continuations of its prompts (the first ``gen_prompt_tokens`` input tokens of each block, up to
``gen_max_new_tokens`` new tokens at ``gen_temperature``, a row stopping after its first EOS); with ``kd.seq_kd``
the other micro-batches use the TEACHER's sampled continuations instead of the data. Only the generated tokens
(EOS included) are targets; the teacher then scores the generated sequence and the same token loss runs on it.
The draw for micro-batch ``j`` of step ``s`` and its samples come from generators seeded by ``(seed, s, j)`` only
(never the global RNG), so a resumed run replays the same decisions and samples; sampling runs under ``no_grad``
with the model in eval mode (then back in train mode), on the weights of the start of the step. The step's token
count ``N_step`` is that of the batches actually trained on. Generation needs a teacher and a divergence ``kind``
(``"ce"`` is refused by :class:`LMKDConfig`), and ``gen_prompt_tokens + gen_max_new_tokens`` must not exceed the
block length (checked when :func:`fit_lm` starts). With ``lmbda == 0`` and ``seq_kd`` off nothing is generated and
runs, fingerprints and checkpoints are exactly those of a config without these fields.

Order. Epoch ``e`` visits the training blocks in ``randperm(N)`` drawn from a generator seeded by ``(seed, e)`` only
(on the CPU, so the order does not depend on the device), dropping the last ``N mod (batch_size * grad_accum)``
blocks; step ``s`` (0-based) is position ``s mod steps_per_epoch`` of epoch ``s // steps_per_epoch``. A resumed run
therefore replays the same batches from the middle of an epoch.

Validation and logging. Every ``eval_every`` steps and after the last step: mean per-token cross-entropy on the
masked tokens of ``val_blocks`` (the first ``eval_batches`` batches of ``batch_size`` blocks, 0 = all) and its
perplexity ``exp``; the weights with the lowest validation loss are kept and returned. At those steps
``log_fn(metrics, step)`` (``step`` = optimiser steps done) receives :data:`LOG_KEYS`:

- ``train_loss``: mean per target token training loss over the steps since the previous log;
- ``val_loss``, ``val_ppl``: as above;
- ``lr``: the learning rate of the last optimiser step;
- ``tokens_per_second``: input tokens (``batch * T``, teacher and student forward included) per second of
  training time since the previous log (validation and checkpoint writing excluded; generation time counts as
  training time, generated tokens count as the input tokens of their micro-batch);
- only with generated batches (:data:`GKD_LOG_KEYS`): ``onpolicy_frac``, the share of the micro-batches since the
  previous log that were on-policy (the student's samples).

Checkpoints. With ``ckpt_dir``, every ``checkpoint_every`` steps (also in the middle of an epoch) and after the
last step, through :mod:`distill.checkpoint` (pickle-free, checksummed, atomic, fingerprinted, retention
``keep_checkpoints``). **Naming**: ``save_checkpoint`` names folders ``epoch-NNNN`` after its integer ``epoch``
argument; here that integer is the *global optimiser step* (``epoch-0150`` = the state after 150 optimiser
steps; 4 to 9 digits, so up to 999,999,999 steps). A checkpoint holds the model, optimiser, scheduler, global RNG
states, the step, the position in the epoch (``epoch``, ``step_in_epoch``, ``steps_per_epoch``), the history, the
best validation loss and its weights, and the partial training-loss sums of the current log interval, so a run
killed after a checkpoint and resumed ends bit-identical on CPU to an uninterrupted one (and logs the same
values, ``tokens_per_second`` aside). ``on_checkpoint(folder, step)`` is called after each one (before the
``log_fn`` of that step). A checkpoint written for another fingerprint (default :func:`lm_fit_fingerprint`) is
refused with :class:`~distill.checkpoint.CheckpointMismatch`; ``resume=False`` deletes old checkpoints.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn
from torch.utils.checkpoint import checkpoint as activation_checkpoint

from ..checkpoint import (
    CheckpointError,
    CheckpointMismatch,
    resume_checkpoint,
    clear_checkpoints,
    save_checkpoint,
)
from ..files import sha256_json
from ..runtime import Progress as _Progress
from ..runtime import epoch_generator as _epoch_generator
from ..runtime import rng_state as _rng_state
from ..runtime import set_rng_state as _set_rng_state
from . import gkd as _gkd
from .losses import distill_loss_parts

__all__ = [
    "GKD_LOG_KEYS",
    "LOG_KEYS",
    "LMFitResult",
    "LMKDConfig",
    "LMSchedule",
    "LMTrainConfig",
    "Blocks",
    "fit_lm",
    "lm_fit_fingerprint",
    "lm_kd_fingerprint",
    "lm_train_fingerprint",
    "mean_token_ce",
    "perplexity",
]

log = logging.getLogger("distill.lm.train")

Blocks = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (input_ids [N,T] long, labels [N,T] long, mask [N,T] bool)
LogFn = Callable[[dict, int], None]

#: the metric keys ``log_fn`` receives at every evaluation step
LOG_KEYS = ("train_loss", "val_loss", "val_ppl", "lr", "tokens_per_second")
#: the extra keys (history rows and ``log_fn``) of a run with generated batches (``kd.lmbda > 0`` or ``kd.seq_kd``)
GKD_LOG_KEYS = ("onpolicy_frac",)

MAX_STEPS = 10_000_000  # checkpoint folders hold the step in at most 9 digits


# --------------------------------------------------------------------------------------------- configuration


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


Beta = Annotated[float, Field(ge=0.0, lt=1.0, allow_inf_nan=False)]


class LMTrainConfig(_Strict):
    steps: int = Field(1000, ge=1, le=MAX_STEPS, description="total optimiser steps")
    batch_size: int = Field(8, ge=1, le=65536, description="blocks per micro-batch")
    grad_accum: int = Field(1, ge=1, le=4096, description="micro-batches per optimiser step")
    lr: float = Field(3e-4, ge=1e-8, le=10)
    weight_decay: float = Field(0.01, ge=0, le=1)
    betas: tuple[Beta, Beta] = (0.9, 0.95)
    warmup_steps: int = Field(0, ge=0, le=MAX_STEPS)
    schedule: Literal["cosine", "constant"] = Field("cosine", description="after warmup: cosine to min_lr_ratio*lr, or flat")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final lr of the cosine as a fraction of lr")
    grad_clip: float = Field(1.0, ge=0, le=1e6, description="max global gradient norm; 0 = no clipping")
    seed: int = Field(0, ge=0, le=2**32 - 1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "off"] = Field("auto", description="auto = bf16 autocast on CUDA, off on CPU")
    checkpoint_every: int = Field(200, ge=1, le=MAX_STEPS, description="steps between checkpoints (with ckpt_dir)")
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="last N step checkpoints kept")
    eval_every: int = Field(200, ge=1, le=MAX_STEPS, description="steps between validations (and log_fn calls)")
    eval_batches: int = Field(0, ge=0, le=10_000_000, description="validation batches of batch_size blocks; 0 = all")
    chunk_tokens: int = Field(4096, ge=1, le=2**24, description="target tokens per loss chunk (memory bound)")
    progress: Literal["auto", "bar", "log", "off"] = "auto"

    @model_validator(mode="after")
    def _warmup(self):
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self


class LMKDConfig(_Strict):
    kind: Literal["fkl", "rkl", "skew_fkl", "skew_rkl", "jsd", "tv", "ce"] = Field(
        "fkl", description="token divergence of distill.lm.losses, or 'ce' for the plain cross-entropy baseline"
    )
    temperature: float = Field(1.0, gt=0.05, le=100)
    alpha: float = Field(1.0, ge=0, le=1, description="weight of the soft term; 1 - alpha weighs the hard CE")
    beta: float = Field(0.5, ge=0, le=1, description="jsd interpolation (0 forward KL, 1 reverse KL)")
    skew: float = Field(0.1, ge=0, lt=1, description="mixing weight of skew_fkl / skew_rkl")
    # on-policy GKD / sequence-level KD (distill.lm.gkd; TRL GKDTrainer's lmbda, seq_kd, max_new_tokens, temperature)
    lmbda: float = Field(
        0.0, ge=0, le=1,
        description="probability that a training micro-batch is replaced by the STUDENT's own sampled continuations "
                    "of its prompts (on-policy GKD); 0 = never",
    )
    seq_kd: bool = Field(
        False,
        description="sequence-level KD: the micro-batches that are not on-policy use the TEACHER's sampled "
                    "continuations of their prompts instead of the data",
    )
    gen_prompt_tokens: int = Field(
        16, ge=1, le=2**20, description="the first N input tokens of each data block are the generation prompt"
    )
    gen_max_new_tokens: int = Field(
        32, ge=1, le=2**20, description="most tokens sampled per prompt (a row stops after its first EOS)"
    )
    gen_temperature: float = Field(1.0, gt=0, le=100, description="sampling temperature of the generated batches")

    @property
    def generates(self) -> bool:
        """True when some training micro-batches are generated (``lmbda > 0`` or ``seq_kd``)."""
        return self.lmbda > 0 or self.seq_kd

    @model_validator(mode="after")
    def _generation_needs_a_divergence(self):
        if self.kind == "ce" and self.generates:
            raise ValueError(
                f"lmbda ({self.lmbda}) > 0 or seq_kd ({self.seq_kd}) needs a distillation kind, not kind='ce': "
                "generated batches are scored by the teacher"
            )
        return self


class LMSchedule:
    """lr multiplier per optimiser step: linear warmup ``(s + 1) / (warmup + 1)`` for ``s < warmup``, then cosine
    from 1 to ``min_ratio`` at ``s = steps`` (or 1 for ``constant``). A plain object, so LambdaLR's state_dict
    stays JSON-serialisable."""

    def __init__(self, steps: int, warmup_steps: int, min_ratio: float, kind: str = "cosine"):
        self.steps, self.warmup_steps, self.min_ratio, self.kind = steps, warmup_steps, min_ratio, kind

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.kind == "constant":
            return 1.0
        t = min(1.0, (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps))
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


# --------------------------------------------------------------------------------------------- fingerprints

# LMTrainConfig fields that do not change what a run computes (display, retention, checkpoint cadence)
NON_RESULT_FIELDS = frozenset({"progress", "keep_checkpoints", "checkpoint_every"})
#: LMKDConfig fields of generated batches: left out of the fingerprint while no batch is generated, so that
#: fingerprints (and checkpoints) of runs without generation are exactly those from before these fields existed
GKD_FIELDS = ("lmbda", "seq_kd", "gen_prompt_tokens", "gen_max_new_tokens", "gen_temperature")


def lm_train_fingerprint(cfg: LMTrainConfig) -> dict:
    return {k: v for k, v in cfg.model_dump(mode="json").items() if k not in NON_RESULT_FIELDS}


def lm_kd_fingerprint(kd: LMKDConfig) -> dict:
    """``kd.model_dump(mode="json")`` without :data:`GKD_FIELDS` when ``kd`` generates no batch."""
    out = kd.model_dump(mode="json")
    return out if kd.generates else {k: v for k, v in out.items() if k not in GKD_FIELDS}


def _model_id(model: nn.Module) -> dict:
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    return {"class": type(model).__qualname__, "state_shapes_sha256": sha256_json(shapes)}


def _blocks_id(blocks: Blocks) -> dict:
    out = {"shape": list(blocks[0].shape)}
    for name, t in zip(("input_ids", "labels", "mask"), blocks):
        a = t.detach().cpu().contiguous().numpy()
        out[f"{name}_sha256"] = hashlib.sha256(memoryview(a).cast("B")).hexdigest()
    return out


def lm_fit_fingerprint(
    student: nn.Module,
    cfg: LMTrainConfig,
    train_blocks: Blocks,
    val_blocks: Blocks,
    *,
    teacher: nn.Module | None = None,
    kd: LMKDConfig | None = None,
) -> dict:
    """The fingerprint :func:`fit_lm` records in its checkpoints when its caller gives none: student (and, when
    distilling, teacher) class + parameter shapes, :func:`lm_train_fingerprint`, the KD config when distilling,
    and the shape and sha256 of every data tensor (hashing costs about a second per few hundred MB)."""
    distilling = teacher is not None and (kd or LMKDConfig()).kind != "ce"
    return {
        "fit_lm": 1,
        "model": _model_id(student),
        "teacher": _model_id(teacher) if distilling else None,
        "train": lm_train_fingerprint(cfg),
        "kd": lm_kd_fingerprint(kd or LMKDConfig()) if distilling else None,
        "data": {"train": _blocks_id(train_blocks), "val": _blocks_id(val_blocks)},
    }


# ------------------------------------------------------------------------------------------------ helpers


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids=input_ids, use_cache=False)
    return out.logits if hasattr(out, "logits") else out


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _ce_chunk(s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.autocast(device_type=s.device.type, enabled=False):
        return F.cross_entropy(s.float(), y, reduction="sum")


def _masked_ce_sum(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, chunk_tokens: int) -> tuple[torch.Tensor, int]:
    """(summed float32 cross-entropy over the masked tokens, their number), ``chunk_tokens`` tokens at a time
    (under activation checkpointing when gradients flow: float32 ``tokens x vocab`` for one chunk at a time)."""
    vocab = logits.shape[-1]
    flat = mask.reshape(-1).to(logits.device, torch.bool)
    n = int(flat.sum())
    s = logits.reshape(-1, vocab)
    y = labels.reshape(-1).to(logits.device)
    if n != flat.numel():
        s, y = s[flat], y[flat]
    if n == 0:
        return s.float().sum() * 0.0, 0
    y = y.long()
    use_ckpt = torch.is_grad_enabled() and s.requires_grad
    total = None
    for s_c, y_c in zip(s.split(chunk_tokens), y.split(chunk_tokens)):
        if use_ckpt:
            part = activation_checkpoint(_ce_chunk, s_c, y_c, use_reentrant=False, preserve_rng_state=False)
        else:
            part = _ce_chunk(s_c, y_c)
        total = part if total is None else total + part
    return total, n


def _ppl(ce: float) -> float:
    return math.exp(ce) if ce < 700 else math.inf


def _check_blocks(name: str, blocks, vocab: int | None = None) -> Blocks:
    if not isinstance(blocks, (tuple, list)) or len(blocks) != 3 or not all(isinstance(t, torch.Tensor) for t in blocks):
        raise ValueError(f"{name} must be a tuple (input_ids, labels, mask) of tensors")
    ids, labels, mask = blocks
    if ids.dim() != 2 or labels.shape != ids.shape or mask.shape != ids.shape:
        raise ValueError(
            f"{name}: input_ids, labels and mask must share one [N, T] shape, got "
            f"{tuple(ids.shape)}, {tuple(labels.shape)}, {tuple(mask.shape)}"
        )
    for what, t in (("input_ids", ids), ("labels", labels)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name}: {what} must be an integer tensor, got {t.dtype}")
    if mask.dtype != torch.bool:
        raise ValueError(f"{name}: mask must be a bool tensor, got {mask.dtype}")
    if len(ids) == 0:
        raise ValueError(f"{name} holds no block")
    targets = labels[mask]
    if targets.numel() and (int(targets.min()) < 0 or (vocab is not None and int(targets.max()) >= vocab)):
        raise ValueError(f"{name}: labels at target positions must lie in [0, {vocab}) (masked-out ones may hold -100)")
    if ids.numel() and (int(ids.min()) < 0 or (vocab is not None and int(ids.max()) >= vocab)):
        raise ValueError(f"{name}: input_ids must lie in [0, {vocab})")
    return ids, labels, mask


def _vocab_size(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    v = getattr(cfg, "vocab_size", None)
    return int(v) if isinstance(v, int) else None


@torch.no_grad()
def mean_token_ce(
    model: nn.Module,
    blocks: Blocks,
    batch_size: int = 8,
    *,
    max_batches: int | None = None,
    amp: bool = False,
    chunk_tokens: int = 4096,
) -> tuple[float, int]:
    """(mean per-token cross-entropy over the masked target tokens of ``blocks``, number of those tokens), on the
    model's device, in eval mode (its mode is restored), in batches of ``batch_size`` blocks (the first
    ``max_batches`` only, when given). ``amp``: bf16 autocast. Raises ValueError without any target token."""
    ids, labels, mask = _check_blocks("blocks", blocks)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    dev = _model_device(model)
    was_training = model.training
    model.eval()
    total = torch.zeros((), dtype=torch.float64, device=dev)
    n = 0
    try:
        with torch.inference_mode():
            for i, start in enumerate(range(0, len(ids), batch_size)):
                if max_batches and i >= max_batches:
                    break
                sl = slice(start, start + batch_size)
                m = mask[sl].to(dev, non_blocking=True)
                if not bool(m.any()):
                    continue
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    logits = _logits(model, ids[sl].to(dev, non_blocking=True))
                s, k = _masked_ce_sum(logits, labels[sl].to(dev, non_blocking=True), m, chunk_tokens)
                total += s.double()
                n += k
    finally:
        model.train(was_training)
    if n == 0:
        raise ValueError("no target token (mask is all False) in the evaluated blocks")
    return float(total.item()) / n, n


def perplexity(
    model: nn.Module, blocks: Blocks, batch_size: int = 8, *, max_batches: int | None = None, amp: bool = False,
    chunk_tokens: int = 4096,
) -> float:
    """``exp`` of :func:`mean_token_ce` (inf when that overflows)."""
    return _ppl(mean_token_ce(model, blocks, batch_size, max_batches=max_batches, amp=amp, chunk_tokens=chunk_tokens)[0])


# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class LMFitResult:
    history: list[dict] = field(default_factory=list)  # one row per evaluation: step + LOG_KEYS
    best_step: int = 0
    best_val_loss: float = math.inf
    best_val_ppl: float = math.inf
    steps_run: int = 0  # optimiser steps run by this call (after a resume: the remaining ones)
    resumed_from_step: int = 0
    train_seconds: float = 0.0  # training time (validation and checkpoints excluded), all calls together
    tokens_per_second: float = 0.0  # input tokens per training second in this call
    runtime: dict = field(default_factory=dict)


class _LMTrainer:
    def __init__(self, student, train_blocks, val_blocks, cfg: LMTrainConfig, teacher, kd: LMKDConfig, desc: str):
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("device='cuda' was requested but CUDA is not available")
        cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        self.dev = dev = torch.device("cuda" if cuda else "cpu")
        self.amp = cfg.amp == "bf16" or (cfg.amp == "auto" and cuda)
        self.cfg, self.kd, self.desc, self.model = cfg, kd, desc, student
        self.distill = teacher is not None and kd.kind != "ce"
        self.teacher = teacher if self.distill else None
        vocab = _vocab_size(student)
        self.train = _check_blocks("train_blocks", train_blocks, vocab)
        self.val = _check_blocks("val_blocks", val_blocks, vocab)
        if not bool(self.val[2].any()):
            raise ValueError("val_blocks hold no target token (mask is all False)")
        n = len(self.train[0])
        self.per_step = cfg.batch_size * cfg.grad_accum
        if n < self.per_step:
            raise ValueError(
                f"batch_size * grad_accum ({self.per_step}) is larger than the training split ({n} blocks)"
            )
        self.steps_per_epoch = n // self.per_step  # drop_last
        self._perm_epoch, self._perm = -1, None
        self._setup_generation(student, teacher, vocab)

        student.to(dev)
        if self.teacher is not None:
            self.teacher.to(dev).eval()
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.params = params = [p for p in student.parameters() if p.requires_grad]
        groups = [  # no weight decay on biases and norm weights (1-D parameters)
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        self.opt = torch.optim.AdamW(
            [g for g in groups if g["params"]], lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay,
            **({"fused": True} if dev.type == "cuda" else {}),
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, LMSchedule(cfg.steps, cfg.warmup_steps, cfg.min_lr_ratio, cfg.schedule)
        )
        self.result = LMFitResult(runtime={"device": str(dev), "amp_bf16": self.amp, "distill": self.distill})
        self.best_state: dict | None = None
        self.start_step = 0
        self.last_lr = float(self.opt.param_groups[0]["lr"])
        # sums of the current log interval (checkpointed, so a resumed run logs the same train_loss)
        self.pending = {"loss_sum": 0.0, "target_tokens": 0, "input_tokens": 0, "seconds": 0.0}
        if self.generates:  # micro-batches of the interval, and how many of them were on-policy
            self.pending.update(micro_batches=0, onpolicy_batches=0)
        self.log_keys = LOG_KEYS + (GKD_LOG_KEYS if self.generates else ())

    def _setup_generation(self, student: nn.Module, teacher: nn.Module | None, vocab: int | None) -> None:
        """Checks and constants of generated batches (``kd.lmbda > 0`` or ``kd.seq_kd``)."""
        kd = self.kd
        self.generates = kd.generates
        if not self.generates:
            return
        if teacher is None:  # kind="ce" with lmbda / seq_kd is refused by LMKDConfig itself
            raise ValueError(
                f"lmbda ({kd.lmbda}) > 0 or seq_kd ({kd.seq_kd}) needs a teacher to score the generated batches"
            )
        block = int(self.train[0].shape[1])
        need = kd.gen_prompt_tokens + kd.gen_max_new_tokens
        if need > block:
            raise ValueError(
                f"gen_prompt_tokens ({kd.gen_prompt_tokens}) + gen_max_new_tokens ({kd.gen_max_new_tokens}) = {need} "
                f"does not fit the training blocks of {block} tokens; lower them or use longer blocks"
            )
        known = [v for v in (vocab, _vocab_size(teacher)) if v is not None]
        self.gen_vocab = min(known) if known else None  # sample from the shared vocabulary only
        self.eos_student = _gkd.eos_ids(student, teacher)
        self.eos_teacher = _gkd.eos_ids(teacher, student)

    # --- checkpoints -----------------------------------------------------------------------------------------

    def restore(self, root: Path, fingerprint: dict) -> None:
        loaded = resume_checkpoint(root, fingerprint, fresh_hint="resume=False")
        if loaded is None:
            return
        folder, step_done, st = loaded
        if step_done > self.cfg.steps:
            raise CheckpointMismatch(f"checkpoint {folder} is at step {step_done}, beyond this run's {self.cfg.steps} steps")
        try:
            if int(st["step"]) != step_done or int(st["steps_per_epoch"]) != self.steps_per_epoch:
                raise CheckpointMismatch(
                    f"checkpoint {folder}: step {st['step']} with {st['steps_per_epoch']} steps per epoch does not fit "
                    f"this run (step {step_done}, {self.steps_per_epoch} steps per epoch): other data or batch size"
                )
            self.model.load_state_dict(st["model"])
            self.opt.load_state_dict(st["optimizer"])
            self.sched.load_state_dict(st["scheduler"])
            _set_rng_state(st["rng"])
            best = st["best_model"]
            self.best_state = {k: v.to(self.dev) for k, v in best.items()} if best is not None else None
            res = self.result
            res.history = [dict(r) for r in st["history"]]
            res.best_step, res.best_val_loss = int(st["best_step"]), float(st["best_val_loss"])
            res.best_val_ppl = _ppl(res.best_val_loss)
            res.train_seconds = float(st["train_seconds"])
            p = st["pending"]
            self.pending = {
                "loss_sum": float(p["loss_sum"]), "target_tokens": int(p["target_tokens"]),
                "input_tokens": int(p["input_tokens"]), "seconds": float(p["seconds"]),
            }
            if self.generates:
                self.pending.update(micro_batches=int(p["micro_batches"]), onpolicy_batches=int(p["onpolicy_batches"]))
            self.last_lr = float(st["last_lr"])
        except CheckpointMismatch:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError, IndexError) as e:
            raise CheckpointError(f"checkpoint {folder}: its state does not fit this model and optimiser: {e!r}") from e
        self.start_step = self.result.resumed_from_step = step_done
        log.info("%s: resumed from checkpoint %s (step %d of %d)", self.desc, folder, step_done, self.cfg.steps)

    def save(self, root: Path, step: int, fingerprint: dict) -> Path:
        res = self.result
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "scheduler": self.sched.state_dict(),
            "rng": _rng_state(),
            "step": step,
            "epoch": step // self.steps_per_epoch,
            "step_in_epoch": step % self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch,
            "best_model": self.best_state,
            "best_step": res.best_step,
            "best_val_loss": res.best_val_loss,
            "history": res.history,
            "train_seconds": res.train_seconds,
            "pending": dict(self.pending),
            "last_lr": self.last_lr,
        }
        return save_checkpoint(root, step, state, fingerprint=fingerprint, keep_last=self.cfg.keep_checkpoints)

    # --- training --------------------------------------------------------------------------------------------

    def _order(self, epoch: int) -> torch.Tensor:
        if self._perm_epoch != epoch:
            g = _epoch_generator(self.cfg.seed, epoch, torch.device("cpu"))
            self._perm, self._perm_epoch = torch.randperm(len(self.train[0]), generator=g), epoch
        return self._perm

    def _step_batches(self, step: int) -> tuple[list[Blocks], int, int]:
        """The micro-batches of optimiser step ``step`` on the device (generated ones in place of the drawn data
        micro-batches), their target tokens and their input tokens."""
        cfg, dev = self.cfg, self.dev
        epoch, pos = divmod(step, self.steps_per_epoch)
        idx = self._order(epoch)[pos * self.per_step : (pos + 1) * self.per_step]
        ids, labels, mask = (t[idx.to(t.device)] for t in self.train)
        batches = []
        for j in range(cfg.grad_accum):
            sl = slice(j * cfg.batch_size, (j + 1) * cfg.batch_size)
            batch = tuple(t[sl].to(dev, non_blocking=True) for t in (ids, labels, mask))
            if self.generates:
                batch = self._maybe_generate(step, j, batch)
            batches.append(batch)
        if not self.generates:
            return batches, int(mask.sum()), int(ids.numel())
        return batches, sum(int(m.sum()) for _, _, m in batches), sum(int(x.numel()) for x, _, _ in batches)

    def _maybe_generate(self, step: int, j: int, batch: Blocks) -> Blocks:
        """Micro-batch ``j`` of step ``step``: on-policy (the student's samples) with probability ``lmbda``, else
        the teacher's samples with ``seq_kd``, else the data. The draw and the samples come from generators seeded
        by ``(seed, step, j)`` only, so a resumed run replays them."""
        cfg, kd = self.cfg, self.kd
        on_policy = False
        if kd.lmbda > 0:
            coin = torch.Generator().manual_seed(_gkd.mixed_seed("gkd-onpolicy", cfg.seed, step, j))
            on_policy = float(torch.rand((), generator=coin)) < kd.lmbda
        self.pending["micro_batches"] += 1
        self.pending["onpolicy_batches"] += int(on_policy)
        if not (on_policy or kd.seq_kd):
            return batch
        g = torch.Generator(device=self.dev).manual_seed(_gkd.mixed_seed("gkd-sample", cfg.seed, step, j))
        return _gkd.generated_blocks(
            self.model if on_policy else self.teacher, batch[0][:, : kd.gen_prompt_tokens],
            max_new_tokens=kd.gen_max_new_tokens, generator=g, temperature=kd.gen_temperature,
            eos_token_ids=self.eos_student if on_policy else self.eos_teacher, vocab_limit=self.gen_vocab,
            amp=self.amp,
        )

    def _micro_loss_sum(self, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Summed per-token loss of one micro-batch (attached to the student's graph)."""
        dev, kd = self.dev, self.kd
        if self.teacher is not None:
            with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
                t_logits = _logits(self.teacher, x)
            t_logits = t_logits.clone()  # a normal tensor, usable next to autograd-tracked ones
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.amp):
            s_logits = _logits(self.model, x)
        if self.teacher is None:
            return _masked_ce_sum(s_logits, y, m, self.cfg.chunk_tokens)[0]
        v = min(s_logits.shape[-1], t_logits.shape[-1])
        if s_logits.shape[-1] != v or t_logits.shape[-1] != v:
            s_logits, t_logits = s_logits[..., :v], t_logits[..., :v]
        parts = distill_loss_parts(
            s_logits, t_logits, y, m, kind=kd.kind, temperature=kd.temperature, alpha=kd.alpha,
            beta=kd.beta, skew=kd.skew, chunk_tokens=self.cfg.chunk_tokens,
        )
        return parts.loss * parts.num_tokens

    def train_step(self, step: int) -> tuple[torch.Tensor, int, int]:
        """Optimiser step ``step`` (0-based): (summed per-token loss, target tokens, input tokens)."""
        cfg = self.cfg
        batches, n_step, n_in = self._step_batches(step)
        denom = float(max(n_step, 1))
        self.opt.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.dev)
        for x, y, m in batches:
            micro_sum = self._micro_loss_sum(x, y, m)
            (micro_sum / denom).backward()
            loss_sum += micro_sum.detach().double()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip)
        self.last_lr = float(self.opt.param_groups[0]["lr"])
        self.opt.step()
        self.sched.step()
        return loss_sum, n_step, n_in

    def validate(self, step: int) -> float:
        cfg = self.cfg
        val_loss, _ = mean_token_ce(
            self.model, self.val, cfg.batch_size, max_batches=cfg.eval_batches or None, amp=self.amp,
            chunk_tokens=cfg.chunk_tokens,
        )
        self.model.train()
        res = self.result
        if self.best_state is None or val_loss < res.best_val_loss:
            res.best_step, res.best_val_loss, res.best_val_ppl = step, val_loss, _ppl(val_loss)
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        return val_loss


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _FitLoop:
    """The step loop of :func:`fit_lm`: training time, the sums of the log interval, validation rows,
    checkpoints and the callbacks."""

    def __init__(self, tr: _LMTrainer, ckpt_root: Path | None, fingerprint: dict | None,
                 log_fn: LogFn | None, on_checkpoint: Callable[[Path, int], None] | None):
        self.tr, self.cfg, self.pending = tr, tr.cfg, tr.pending
        self.ckpt_root, self.fingerprint = ckpt_root, fingerprint
        self.log_fn, self.on_checkpoint = log_fn, on_checkpoint
        self.acc_loss = torch.tensor(tr.pending["loss_sum"], dtype=torch.float64, device=tr.dev)
        self.call_tokens, self.call_seconds = 0, 0.0
        self.progress: _Progress | None = None
        self.t_mark = 0.0

    def run(self) -> None:
        tr, cfg = self.tr, self.cfg
        self.progress = _Progress(cfg.progress, cfg.steps - tr.start_step, tr.desc)
        tr.model.train()
        _sync(tr.dev)
        self.t_mark = time.perf_counter()
        try:
            for step in range(tr.start_step, cfg.steps):
                self.step(step)
        finally:
            self.progress.close()

    def step(self, step: int) -> None:
        cfg, pending = self.cfg, self.pending
        loss_sum, n_tgt, n_in = self.tr.train_step(step)
        done = step + 1
        self.acc_loss += loss_sum
        pending["target_tokens"] += n_tgt
        pending["input_tokens"] += n_in
        self.call_tokens += n_in
        self.progress.update(1)
        do_eval = done % cfg.eval_every == 0 or done == cfg.steps
        do_ckpt = self.ckpt_root is not None and (done % cfg.checkpoint_every == 0 or done == cfg.steps)
        if not (do_eval or do_ckpt):
            return
        self._stop_clock()
        row = self._evaluate(done) if do_eval else None
        if do_ckpt:
            folder = self.tr.save(self.ckpt_root, done, self.fingerprint)
            if self.on_checkpoint is not None:
                self.on_checkpoint(folder, done)
        if row is not None and self.log_fn is not None:
            self.log_fn({k: float(row[k]) for k in self.tr.log_keys}, done)
        _sync(self.tr.dev)
        self.t_mark = time.perf_counter()

    def _stop_clock(self) -> None:
        """Close the training time since the last mark; the loss sum goes to ``pending`` (for checkpoints)."""
        _sync(self.tr.dev)
        dt = time.perf_counter() - self.t_mark
        self.pending["seconds"] += dt
        self.tr.result.train_seconds += dt
        self.call_seconds += dt
        self.pending["loss_sum"] = float(self.acc_loss.item())

    def _evaluate(self, done: int) -> dict:
        """Validate, append the history row of the interval that ends at step ``done``, start a new interval."""
        tr, cfg, pending, desc = self.tr, self.cfg, self.pending, self.tr.desc
        train_loss = pending["loss_sum"] / max(pending["target_tokens"], 1)
        if not math.isfinite(train_loss):
            raise FloatingPointError(f"{desc}: training loss is {train_loss} at step {done}; lower the lr")
        val_loss = tr.validate(done)
        secs = pending["seconds"]
        row = {
            "step": done,
            "train_loss": train_loss,
            "val_loss": val_loss,
            "val_ppl": _ppl(val_loss),
            "lr": tr.last_lr,
            "tokens_per_second": pending["input_tokens"] / secs if secs > 0 else 0.0,
        }
        extra = ""
        if tr.generates:
            row["onpolicy_frac"] = pending["onpolicy_batches"] / max(pending["micro_batches"], 1)
            extra = f" onpolicy {row['onpolicy_frac']:.2f}"
            pending.update(micro_batches=0, onpolicy_batches=0)
        tr.result.history.append(row)
        self.progress.epoch_line(
            f"{desc} step {done}/{cfg.steps}: train_loss {train_loss:.4f} val_loss {val_loss:.4f} "
            f"val_ppl {row['val_ppl']:.2f} lr {tr.last_lr:.3g}{extra} ({row['tokens_per_second']:.0f} tok/s)"
        )
        pending.update(loss_sum=0.0, target_tokens=0, input_tokens=0, seconds=0.0)
        self.acc_loss.zero_()
        return row


def _open_checkpoints(tr: _LMTrainer, ckpt_root: Path | None, fingerprint: dict | None, resume: bool,
                      teacher: nn.Module | None) -> dict | None:
    """Resume from (or clear) ``ckpt_root``; -> the fingerprint to record (default :func:`lm_fit_fingerprint`)."""
    if ckpt_root is None:
        return fingerprint
    if fingerprint is None:
        fingerprint = lm_fit_fingerprint(tr.model, tr.cfg, tr.train, tr.val, teacher=teacher, kd=tr.kd)
    if resume:
        tr.restore(ckpt_root, fingerprint)
    else:
        clear_checkpoints(ckpt_root)
    return fingerprint


def fit_lm(
    student: nn.Module,
    train_blocks: Blocks,
    val_blocks: Blocks,
    cfg: LMTrainConfig,
    *,
    teacher: nn.Module | None = None,
    kd: LMKDConfig | None = None,
    log_fn: LogFn | None = None,
    ckpt_dir: str | Path | None = None,
    on_checkpoint: Callable[[Path, int], None] | None = None,
    resume: bool = True,
    fingerprint: dict | None = None,
    desc: str = "lm-train",
) -> tuple[nn.Module, LMFitResult]:
    """Train ``student`` for ``cfg.steps`` optimiser steps on ``train_blocks``; returns it loaded with its
    best-on-validation weights, and an :class:`LMFitResult`. See the module docstring for the data layout, the
    loss (distillation from ``teacher`` with ``kd``, default :class:`LMKDConfig`; plain masked CE without a
    teacher or with ``kd.kind == "ce"``), accumulation weighting, logging and checkpoints.

    With ``ckpt_dir``: ``resume=True`` continues from ``ckpt_dir/LATEST`` and raises
    :class:`~distill.checkpoint.CheckpointMismatch` if the checkpoints there belong to another ``fingerprint``
    (default :func:`lm_fit_fingerprint`); ``resume=False`` deletes them and starts over."""
    kd = kd or LMKDConfig()
    ckpt_root = Path(ckpt_dir) if ckpt_dir is not None else None
    tr = _LMTrainer(student, train_blocks, val_blocks, cfg, teacher, kd, desc)
    fingerprint = _open_checkpoints(tr, ckpt_root, fingerprint, resume, teacher)
    loop = _FitLoop(tr, ckpt_root, fingerprint, log_fn, on_checkpoint)
    loop.run()
    res = tr.result
    res.steps_run = cfg.steps - tr.start_step
    res.tokens_per_second = loop.call_tokens / loop.call_seconds if loop.call_seconds > 0 else 0.0
    if tr.best_state is not None:
        student.load_state_dict(tr.best_state)
    return student, res
