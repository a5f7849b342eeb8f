"""Typed configuration of the diffusion kind (pydantic). A bad value fails when the config is built, naming the field.

Sections: ``data`` (any image folder the image kind accepts, optionally resized and turned to one channel),
``schedule`` (cosine or linear betas, v or epsilon prediction, ``T`` training timesteps), ``teacher`` (trained in
the flow, or an existing diffusers pipeline folder; sampled with ``sample_steps`` DDIM steps), ``progressive``
(rounds that halve the step count, each a stage whose output teaches the next), ``consistency`` (one stage),
``eval`` (step counts, samples, FID reference), ``target_steps`` (the step count the gate and the report's main
columns compare at) and ``main`` (which student is registered and gated).

Step counts are powers of two that divide ``schedule.T`` (the default ``T = 1024`` takes every one up to 1024).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..presets import deep_merge
from ..image.config import DataConfig

__all__ = ["PRESETS", "DiffusionLabConfig", "load_profile", "progressive_steps"]

Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
Steps = Annotated[int, Field(ge=1, le=4096)]
BatchSize = Annotated[int, Field(ge=1, le=65536)]


def _pow2(v: int) -> bool:
    return v >= 1 and (v & (v - 1)) == 0


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DiffusionDataConfig(DataConfig):
    image_size: Optional[int] = Field(None, ge=4, le=1024, description="resize images to this square size (None: as decoded)")
    channels: Literal[1, 3] = Field(3, description="3 = RGB as decoded, 1 = converted to grayscale")
    hflip: bool = Field(True, description="random horizontal flips while training")


class ScheduleConfig(_Strict):
    kind: Literal["cosine", "linear"] = "cosine"
    prediction: Literal["v", "epsilon"] = Field("v", description="v-prediction is well conditioned at every t")
    T: int = Field(1024, ge=2, le=65536, description="training timesteps")


class UNetConfig(_Strict):
    """A diffusers ``UNet2DModel`` in pixel space."""

    block_out_channels: list[int] = Field(default_factory=lambda: [32, 64, 64], min_length=1, max_length=6)
    layers_per_block: int = Field(1, ge=1, le=4)
    attention_levels: list[int] = Field(default_factory=list, description="levels (0 = full resolution) with self-attention")
    norm_num_groups: int = Field(8, ge=1, le=64)
    dropout: float = Field(0.0, ge=0, lt=1)

    @model_validator(mode="after")
    def _shape(self):
        bad = [c for c in self.block_out_channels if c < 1 or c % self.norm_num_groups]
        if bad:
            raise ValueError(f"block_out_channels {bad} must be positive multiples of norm_num_groups ({self.norm_num_groups})")
        levels = [lv for lv in self.attention_levels if not 0 <= lv < len(self.block_out_channels)]
        if levels:
            raise ValueError(f"attention_levels {levels} outside 0..{len(self.block_out_channels) - 1}")
        return self


class DiffTrainConfig(_Strict):
    steps: int = Field(1000, ge=1, le=10_000_000)
    batch_size: BatchSize = 128
    lr: float = Field(2e-4, gt=0, le=1)
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0, le=1)
    grad_clip: Optional[float] = Field(1.0, gt=0)
    ema_decay: float = Field(0.999, ge=0, lt=1, description="EMA of the weights (used for sampling; with warm-up)")
    checkpoint_every: int = Field(200, ge=1)
    keep_checkpoints: int = Field(2, ge=1, le=100)
    log_every: int = Field(50, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off", "bf16"] = Field("auto", description="bf16 autocast on CUDA when auto")
    channels_last: Literal["auto", "on", "off"] = "auto"
    progress: Literal["auto", "bar", "log", "off"] = "auto"
    seed: Seed = 0

    @model_validator(mode="after")
    def _warmup(self):
        if self.warmup_steps >= self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be smaller than steps ({self.steps})")
        return self


class TeacherConfig(_Strict):
    source: str = Field("train", description="'train' (trained in the flow) or a local diffusers pipeline folder")
    model: UNetConfig = Field(default_factory=UNetConfig)
    train: DiffTrainConfig = Field(default_factory=DiffTrainConfig)
    sample_steps: Steps = Field(64, description="the teacher's own DDIM step count (its quality reference)")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        if not v.strip() or v != v.strip():
            raise ValueError("teacher.source must be 'train' or a folder path without surrounding spaces")
        return v


class ProgressiveConfig(_Strict):
    enabled: bool = True
    final_steps: Steps = Field(1, description="the last round's step count (rounds halve teacher.sample_steps down to it)")
    train: DiffTrainConfig = Field(default_factory=lambda: DiffTrainConfig(steps=500, lr=1e-4))


class ConsistencyConfig(_Strict):
    enabled: bool = True
    skip: int = Field(32, ge=1, description="timesteps the DDIM solver skips per step (divides schedule.T)")
    huber_c: Optional[float] = Field(None, gt=0, description="pseudo-Huber c; None: 0.00054 * sqrt(pixels)")
    #: train.ema_decay is the target network's EMA decay (the EMA is also the model that is saved)
    train: DiffTrainConfig = Field(default_factory=lambda: DiffTrainConfig(steps=500, lr=1e-4, ema_decay=0.95))


class DiffusionEvalConfig(_Strict):
    steps: list[Steps] = Field(default_factory=lambda: [1, 2, 4, 8], min_length=1, max_length=12)
    fid: bool = Field(True, description="FID/KID with InceptionV3; false: PSNR, grids and speed only (val_fid is NaN)")
    n_samples: int = Field(1000, ge=2, le=1_000_000, description="generated images per model and step count")
    n_reference: Optional[int] = Field(None, ge=2, description="real images of the split FID is computed against (None: all)")
    val_samples: int = Field(256, ge=2, le=1_000_000, description="generated images for the stage's val_fid")
    batch_size: BatchSize = 250
    seed: Seed = Field(0, description="the starting noise: the same for every model")
    grid: int = Field(16, ge=1, le=256, description="images in each sample grid")
    kid_subset_size: int = Field(1000, ge=2)
    inception_batch: BatchSize = 100
    speed: bool = True
    speed_runs: int = Field(3, ge=1, le=1000)


class DiffusionLabConfig(_Strict):
    profile: str = "custom"
    data: DiffusionDataConfig = Field(default_factory=DiffusionDataConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    progressive: ProgressiveConfig = Field(default_factory=ProgressiveConfig)
    consistency: ConsistencyConfig = Field(default_factory=ConsistencyConfig)
    eval: DiffusionEvalConfig = Field(default_factory=DiffusionEvalConfig)
    target_steps: Steps = Field(4, description="the step count of the gate, the KD gain and the report's FID column")
    main: Literal["progressive", "consistency"] = "progressive"
    promotion_margin: float = Field(0.0, ge=0, description="FID points the student must beat the baseline by")

    @model_validator(mode="after")
    def _steps(self):
        T = self.schedule.T
        named = {"teacher.sample_steps": [self.teacher.sample_steps], "target_steps": [self.target_steps],
                 "eval.steps": self.eval.steps, "progressive.final_steps": [self.progressive.final_steps]}
        for field, values in named.items():
            bad = [k for k in values if not _pow2(k) or T % k]
            if bad:
                raise ValueError(f"{field}: {bad} must be powers of two that divide schedule.T ({T})")
        if self.consistency.skip > T or T % self.consistency.skip:
            raise ValueError(f"consistency.skip ({self.consistency.skip}) must divide schedule.T ({T})")
        if self.target_steps >= self.teacher.sample_steps:
            raise ValueError(f"target_steps ({self.target_steps}) must be fewer than teacher.sample_steps "
                             f"({self.teacher.sample_steps}): the students sample in fewer steps than the teacher")
        if len(set(self.eval.steps)) != len(self.eval.steps):
            raise ValueError(f"eval.steps {self.eval.steps} lists a step count twice")
        p = self.progressive
        if p.enabled and not p.final_steps < self.teacher.sample_steps:
            raise ValueError(f"progressive.final_steps ({p.final_steps}) must be fewer than teacher.sample_steps "
                             f"({self.teacher.sample_steps})")
        if p.enabled and self.main == "progressive" and not p.final_steps <= self.target_steps:
            raise ValueError(f"progressive.final_steps ({p.final_steps}) must be at most target_steps "
                             f"({self.target_steps}) so that a round samples at the target")
        if self.main == "progressive" and not p.enabled:
            raise ValueError("main is 'progressive' but progressive.enabled is false")
        if self.main == "consistency" and not self.consistency.enabled:
            raise ValueError("main is 'consistency' but consistency.enabled is false")
        if not (p.enabled or self.consistency.enabled):
            raise ValueError("enable progressive or consistency distillation (or both)")
        return self

    def digest_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


def progressive_steps(cfg: DiffusionLabConfig) -> list[int]:
    """The step counts of the progressive rounds, in order: teacher.sample_steps / 2, / 4, ... final_steps."""
    out, k = [], cfg.teacher.sample_steps // 2
    while cfg.progressive.enabled and k >= cfg.progressive.final_steps:
        out.append(k)
        k //= 2
    return out


def _train(**kw) -> dict:
    return dict(device="cpu", amp="off", channels_last="off", progress="log", seed=0, **kw)


# Smoke: CIFAR-10 downsampled to 16x16, a 0.3M-parameter UNet, a 16-step teacher, two progressive rounds (8, 4
# steps) and a consistency stage. FID on 16 samples per step count against 64 real images: on 2 CPU cores the
# InceptionV3 at 299x299 runs at 1-3 images/s, so these numbers only show that the pipeline works; judge
# distillation with the `full` profile on a GPU.
PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        profile="smoke",
        data=dict(val_size=64, train_subset=2000, test_subset=64, image_size=16),
        schedule=dict(kind="cosine", prediction="v", T=1024),
        teacher=dict(source="train", model=dict(block_out_channels=[32, 64], layers_per_block=1),
                     train=_train(steps=200, batch_size=32, lr=1e-3, warmup_steps=20, ema_decay=0.99,
                                  checkpoint_every=100, log_every=50),
                     sample_steps=16),
        progressive=dict(enabled=True, final_steps=4,
                         train=_train(steps=40, batch_size=32, lr=3e-4, ema_decay=0.9, checkpoint_every=40,
                                      log_every=20)),
        consistency=dict(enabled=True, skip=64,
                         train=_train(steps=40, batch_size=32, lr=3e-4, ema_decay=0.9, checkpoint_every=40,
                                      log_every=20)),
        eval=dict(steps=[1, 4], n_samples=16, n_reference=64, val_samples=16, batch_size=64, grid=16,
                  kid_subset_size=16, inception_batch=32, speed_runs=2),
        target_steps=4,
        main="progressive",
    ),
    # CIFAR-10 at 32x32 on one GPU: the DDPM-CIFAR-like UNet at half width (8.9M parameters), a 256-step teacher,
    # rounds 128 -> 1, consistency with 32 solver steps; FID on 10k samples.
    "full": dict(
        profile="full",
        data=dict(val_size=1000),
        schedule=dict(kind="cosine", prediction="v", T=1024),
        teacher=dict(source="train", model=dict(block_out_channels=[64, 128, 128, 128], layers_per_block=2,
                                                attention_levels=[1], norm_num_groups=32, dropout=0.1),
                     train=dict(steps=100_000, batch_size=128, lr=2e-4, warmup_steps=1000, ema_decay=0.9999,
                                checkpoint_every=5000, log_every=500),
                     sample_steps=256),
        progressive=dict(enabled=True, final_steps=1,
                         train=dict(steps=10_000, batch_size=128, lr=1e-4, ema_decay=0.999, checkpoint_every=2000)),
        consistency=dict(enabled=True, skip=32,
                         train=dict(steps=20_000, batch_size=128, lr=1e-4, ema_decay=0.95, checkpoint_every=2000)),
        eval=dict(steps=[1, 2, 4, 8], n_samples=10_000, n_reference=10_000, val_samples=1000, batch_size=500),
        target_steps=4,
        main="progressive",
        promotion_margin=0.0,
    ),
}


def load_profile(name: str, overrides: dict | None = None) -> DiffusionLabConfig:
    """A validated config from a preset plus nested overrides (raises pydantic.ValidationError)."""
    if name not in PRESETS:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PRESETS)}")
    return DiffusionLabConfig.model_validate(deep_merge(PRESETS[name], overrides or {}))
