"""Typed configuration (pydantic). A bad value fails when the config is built, naming the field.

Three presets: ``smoke`` (CPU, minutes), ``seed`` (the seed document's recipe, see ../shared/ANCHORS.md)
and ``full`` (a stronger recipe whose teacher clearly beats the baseline).
"""

from __future__ import annotations

import copy
import json
import warnings
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .losses import LOSSES
from .models import MODELS, parameter_count


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(_Strict):
    name: str = Field(description="registered model name (distill.models.MODELS)")
    kwargs: dict[str, Union[int, float, str, bool]] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; registered models: {sorted(MODELS)}")
        return v


class DataConfig(_Strict):
    source: str | None = Field(
        None, description="ImageFolder folder/tarball, torchvision CIFAR-10 folder, 'torchvision', or None for $DISTILL_CIFAR10"
    )
    cache_dir: str = ".cache/distill/data"
    val_size: int = Field(5000, ge=1, description="images split off the training split for model selection")
    split_seed: int = 0
    train_subset: int | None = Field(None, ge=1)
    test_subset: int | None = Field(None, ge=1)
    expected_classes: list[str] | None = None


class TrainConfig(_Strict):
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(128, ge=1)
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)
    schedule: Literal["cosine_epoch", "cosine_step"] = Field(
        "cosine_epoch", description="cosine annealing stepped per epoch (the seed's) or per optimiser step"
    )
    warmup_epochs: int = Field(0, ge=0)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "off"] = Field("auto", description="auto = bf16 autocast on CUDA, off on CPU")
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: Literal["auto", "off", "default", "reduce-overhead"] = Field(
        "auto", description="torch.compile mode; auto = reduce-overhead (CUDA graphs) on CUDA, off on CPU"
    )
    eval_batch_size: int = Field(1000, ge=1)
    progress: Literal["auto", "bar", "log", "off"] = "auto"

    @model_validator(mode="after")
    def _warmup(self):
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        return self


class KDConfig(_Strict):
    loss: str = "kd"
    temperature: float = Field(4.0, gt=0)
    alpha: float = Field(0.7, ge=0, le=1)

    @field_validator("loss")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in LOSSES:
            raise ValueError(f"unknown loss {v!r}; registered losses: {sorted(LOSSES)}")
        return v


class SweepConfig(_Strict):
    enabled: bool = True
    temperatures: list[float] = Field(default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0])
    alphas: list[float] = Field(default_factory=lambda: [0.7])

    @field_validator("temperatures")
    @classmethod
    def _t(cls, v):
        if not v:
            raise ValueError("at least one temperature is needed")
        bad = [t for t in v if not t > 0]
        if bad:
            raise ValueError(f"temperatures must be > 0, got {bad}")
        return v

    @field_validator("alphas")
    @classmethod
    def _a(cls, v):
        if not v:
            raise ValueError("at least one alpha is needed")
        bad = [a for a in v if not 0 <= a <= 1]
        if bad:
            raise ValueError(f"alphas must be in [0, 1], got {bad}")
        return v

    def members(self) -> list[KDConfig]:
        return [KDConfig(temperature=t, alpha=a) for a in self.alphas for t in self.temperatures]


class EvalConfig(_Strict):
    batch_size: int = Field(1000, ge=1)
    ece_bins: int = Field(15, ge=1)
    speed: bool = Field(True, description="measure latency and throughput")
    latency_runs: int = Field(50, ge=1)
    throughput_batch: int = Field(256, ge=1)
    throughput_runs: int = Field(5, ge=1)
    warmup_runs: int = Field(5, ge=0)


class LabConfig(_Strict):
    profile: str = "custom"
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: ModelSpec = Field(default_factory=lambda: ModelSpec(name="resnet34"))
    student: ModelSpec = Field(default_factory=lambda: ModelSpec(name="resnet18"))
    teacher_train: TrainConfig = Field(default_factory=TrainConfig)
    student_train: TrainConfig = Field(default_factory=TrainConfig)
    kd: KDConfig = Field(default_factory=KDConfig)
    sweep: SweepConfig = Field(default_factory=SweepConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    promotion_margin: float = Field(
        0.0, ge=0, le=1, description="val-accuracy margin (fraction) the student must beat the baseline by"
    )

    @model_validator(mode="after")
    def _sizes(self):
        try:
            t = parameter_count(self.teacher.name, **self.teacher.kwargs)
            s = parameter_count(self.student.name, **self.student.kwargs)
        except TypeError as e:  # bad kwargs for the model constructor
            raise ValueError(f"bad model kwargs: {e}") from e
        if s > t:
            warnings.warn(
                f"student {self.student.name} ({s:,} parameters) is larger than teacher {self.teacher.name} ({t:,})",
                UserWarning,
                stacklevel=2,
            )
        return self

    def digest_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


_SEED_TRAIN = dict(epochs=15, batch_size=128, lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine_epoch")

PRESETS: dict[str, dict[str, Any]] = {
    # CPU, tiny models, a stratified subset: the whole pipeline (7 trainings) runs in a few minutes on 2 cores.
    "smoke": dict(
        profile="smoke",
        data=dict(val_size=500, train_subset=4000, test_subset=1000),
        teacher=dict(name="resnet_small", kwargs=dict(width=16, depth=1)),
        student=dict(name="resnet_small", kwargs=dict(width=8, depth=1)),
        teacher_train=dict(epochs=4, batch_size=64, lr=0.05, schedule="cosine_step", device="cpu", compile="off"),
        student_train=dict(epochs=4, batch_size=64, lr=0.05, schedule="cosine_step", device="cpu", compile="off"),
        kd=dict(temperature=4.0, alpha=0.7),
        sweep=dict(temperatures=[1.0, 2.0, 4.0, 8.0, 16.0], alphas=[0.7]),
        eval=dict(latency_runs=10, throughput_runs=2, warmup_runs=2),
    ),
    # Exactly the seed document's recipe (../shared/ANCHORS.md): ResNet-34 -> ResNet-18, 15 epochs, SGD 0.1,
    # momentum 0.9, wd 5e-4, cosine per epoch, batch 128, T=4, alpha=0.7, sweep T in {1,2,4,8,16}.
    "seed": dict(
        profile="seed",
        teacher=dict(name="resnet34"),
        student=dict(name="resnet18"),
        teacher_train=_SEED_TRAIN,
        student_train=_SEED_TRAIN,
        kd=dict(temperature=4.0, alpha=0.7),
        sweep=dict(temperatures=[1.0, 2.0, 4.0, 8.0, 16.0], alphas=[0.7]),
    ),
    # Stronger: the teacher trains 4x longer than the students so that it clearly beats the baseline;
    # batch 512 with linear-scaled lr, nesterov, warmup and a per-step cosine schedule.
    "full": dict(
        profile="full",
        teacher=dict(name="resnet34"),
        student=dict(name="resnet18"),
        teacher_train=dict(epochs=120, batch_size=512, lr=0.4, nesterov=True, weight_decay=5e-4, schedule="cosine_step", warmup_epochs=3),
        student_train=dict(epochs=30, batch_size=512, lr=0.4, nesterov=True, weight_decay=5e-4, schedule="cosine_step", warmup_epochs=2),
        kd=dict(temperature=4.0, alpha=0.9),
        sweep=dict(temperatures=[1.0, 2.0, 4.0, 8.0, 16.0], alphas=[0.9]),
        promotion_margin=0.002,
    ),
}


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in (override or {}).items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "kwargs":
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def load_profile(name: str, overrides: dict | None = None) -> LabConfig:
    """Build a validated LabConfig from a preset plus nested overrides (raises pydantic.ValidationError)."""
    if name not in PRESETS:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PRESETS)}")
    overrides = copy.deepcopy(overrides or {})
    for role in ("teacher", "student"):
        spec = overrides.get(role)
        # naming another model without kwargs must not inherit the preset model's kwargs
        if isinstance(spec, dict) and "name" in spec and "kwargs" not in spec:
            spec["kwargs"] = {}
    return LabConfig.model_validate(deep_merge(PRESETS[name], overrides))


def parse_overrides(items: list[str]) -> dict:
    """``["student_train.epochs=3", "kd.temperature=2"]`` -> nested dict (values parsed as JSON when possible)."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = value
    return out
