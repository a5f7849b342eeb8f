"""Typed configuration (pydantic). A bad value fails when the config is built, naming the field.

Three presets: ``smoke`` (CPU, minutes), ``seed`` (the seed document's recipe, see ../shared/ANCHORS.md)
and ``full`` (a stronger recipe whose teacher clearly beats the baseline).
"""

from __future__ import annotations

import copy
import functools
import inspect
import json
import typing
import warnings
from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from ..presets import deep_merge
from .losses import LOSSES
from .models import MODELS, parameter_count

# Bounds shared by every place that takes the value (KDConfig and the sweep members are built from the
# same types). Floats are finite (``allow_inf_nan=False``): JSON ``Infinity``/``NaN`` from ``--set`` or
# Prefect parameters fail here, not an epoch into training.
Temperature = Annotated[float, Field(gt=0.05, le=100, allow_inf_nan=False)]
Alpha = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
Epochs = Annotated[int, Field(ge=1, le=1000)]
BatchSize = Annotated[int, Field(ge=1, le=65536)]
ImageCount = Annotated[int, Field(ge=1, le=10_000_000)]
SWEEP_MAX = 32  # members per sweep list
SEEDS_MAX = 20  # seeds per run

MAX_PARAMETERS = 2_000_000_000  # per model, counted on the meta device when the config is built
# model-size knobs of the registered models (resnet_small), by keyword name, checked before the model is
# built on the meta device (a depth of 10**7 would take minutes to build there)
MODEL_KWARG_BOUNDS: dict[str, tuple[int, int]] = {"width": (1, 4096), "depth": (1, 100)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


@functools.lru_cache(maxsize=256)
def _cached_parameter_count(name: str, fn: Any, items: tuple) -> int:
    return parameter_count(name, **dict(items))


def model_parameter_count(name: str, kwargs: dict) -> int:
    """``distill.image.models.parameter_count`` memoised per (model, kwargs): configs are validated often."""
    return _cached_parameter_count(name, MODELS[name], tuple(sorted(kwargs.items())))


def _kwarg_value(model: str, key: str, value: Any, ann: Any) -> Any:
    """``value`` checked (and integral floats converted) against the model function's annotation."""
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(ann)
    if kind is None:  # no (simple) annotation: passed as given
        return value
    if ann is int and isinstance(value, float) and not isinstance(value, bool) and value.is_integer():
        value = int(value)
    ok = isinstance(value, ann) and (ann is bool or not isinstance(value, bool))
    if ann is float and isinstance(value, int) and not isinstance(value, bool):
        value, ok = float(value), True
    if not ok:
        raise ValueError(f"{model} parameter {key!r} must be {kind}, got {value!r}")
    return value


class ModelSpec(_Strict):
    name: str = Field(description="registered model name (distill.image.models.MODELS)")
    kwargs: dict[str, Union[int, float, str, bool]] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in MODELS:
            raise ValueError(f"unknown model {v!r}; registered models: {sorted(MODELS)}")
        return v

    @field_validator("kwargs")
    @classmethod
    def _fits_model(cls, v: dict, info: ValidationInfo) -> dict:
        """Only keywords the registered model accepts, of the annotated types, within MODEL_KWARG_BOUNDS, and
        at most MAX_PARAMETERS parameters (counted on the meta device: nothing is allocated)."""
        name = info.data.get("name")
        if name is None:  # unknown model: reported on the name
            return v
        fn = MODELS[name]
        params = inspect.signature(fn).parameters
        try:
            hints = typing.get_type_hints(fn)
        except Exception:  # unresolvable annotations: names are still checked
            hints = {}
        open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        accepted = sorted(
            n for n, p in params.items()
            if n != "num_classes" and p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        )
        out = {}
        for key, value in v.items():
            if key == "num_classes":
                raise ValueError("num_classes comes from the data set's classes; it cannot be set in kwargs")
            if key not in accepted and not open_ended:
                raise ValueError(f"model {name!r} has no parameter {key!r}; it accepts: {', '.join(accepted) or 'none'}")
            value = _kwarg_value(name, key, value, hints.get(key))
            if key in MODEL_KWARG_BOUNDS and isinstance(value, (int, float)) and not isinstance(value, bool):
                lo, hi = MODEL_KWARG_BOUNDS[key]
                if not lo <= value <= hi:
                    raise ValueError(f"{key} must be between {lo} and {hi}, got {value}")
            out[key] = value
        try:
            n = model_parameter_count(name, out)
        except (TypeError, ValueError) as e:  # rejected by the model constructor
            raise ValueError(f"model {name!r} cannot be built with {out}: {e}") from e
        if n > MAX_PARAMETERS:
            raise ValueError(f"model {name!r} with {out} has {n:,} parameters, more than the {MAX_PARAMETERS:,} allowed")
        return out


class DataConfig(_Strict):
    source: str | None = Field(
        None, description="ImageFolder folder/tarball, torchvision CIFAR-10 folder, 'torchvision', or None for $DISTILL_CIFAR10"
    )
    cache_dir: str = ".cache/distill/data"
    val_size: ImageCount = Field(5000, description="images split off the training split for model selection")
    split_seed: Seed = 0
    train_subset: ImageCount | None = None
    test_subset: ImageCount | None = None
    expected_classes: list[str] | None = None
    max_image_side: int = Field(4096, ge=8, le=65536, description="images larger than this per side are refused before decoding")


class TrainConfig(_Strict):
    epochs: Epochs = 15
    batch_size: BatchSize = 128
    lr: float = Field(0.1, ge=1e-8, le=10)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0, le=1)
    schedule: Literal["cosine_epoch", "cosine_step"] = Field(
        "cosine_epoch", description="cosine annealing stepped per epoch (the seed's) or per optimiser step"
    )
    warmup_epochs: int = Field(0, ge=0, le=1000)
    seed: Seed = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "bf16", "off"] = Field("auto", description="auto = bf16 autocast on CUDA, off on CPU")
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: Literal["auto", "off", "default", "reduce-overhead"] = Field(
        "auto", description="torch.compile mode; auto = reduce-overhead (CUDA graphs) on CUDA, off on CPU"
    )
    eval_batch_size: BatchSize = 1000
    progress: Literal["auto", "bar", "log", "off"] = "auto"
    keep_checkpoints: int = Field(2, ge=1, le=1000, description="last N epoch checkpoints kept (plus the best)")
    keep_best_checkpoint: bool = Field(True, description="also keep the best-on-validation epoch's checkpoint")

    @model_validator(mode="after")
    def _warmup(self):
        if self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmup_epochs ({self.warmup_epochs}) must be smaller than epochs ({self.epochs})")
        return self


class KDConfig(_Strict):
    loss: str = "kd"
    temperature: Temperature = 4.0
    alpha: Alpha = 0.7

    @field_validator("loss")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in LOSSES:
            raise ValueError(f"unknown loss {v!r}; registered losses: {sorted(LOSSES)}")
        return v


class SweepConfig(_Strict):
    enabled: bool = True
    # members take KDConfig's own types (Temperature, Alpha): the same bounds, stated once
    temperatures: list[Temperature] = Field(
        default_factory=lambda: [1.0, 2.0, 4.0, 8.0, 16.0], max_length=SWEEP_MAX, json_schema_extra={"uniqueItems": True}
    )
    alphas: list[Alpha] = Field(default_factory=lambda: [0.7], max_length=SWEEP_MAX, json_schema_extra={"uniqueItems": True})

    @staticmethod
    def _distinct(v: list[float], what: str) -> list[float]:
        if not v:
            raise ValueError(f"at least one {what} is needed")
        seen: set[float] = set()
        for x in v:
            if x in seen:  # two identical stages would run at once and the report would list them twice
                raise ValueError(f"{what} {x:g} is listed more than once; each value must appear once")
            seen.add(x)
        return v

    @field_validator("temperatures")
    @classmethod
    def _t(cls, v):
        return cls._distinct(v, "temperature")

    @field_validator("alphas")
    @classmethod
    def _a(cls, v):
        return cls._distinct(v, "alpha")

    def members(self) -> list[KDConfig]:
        return [KDConfig(temperature=t, alpha=a) for a in self.alphas for t in self.temperatures]


class EvalConfig(_Strict):
    batch_size: BatchSize = 1000
    ece_bins: int = Field(15, ge=1, le=1000)
    speed: bool = Field(True, description="measure latency and throughput")
    latency_runs: int = Field(50, ge=1, le=10_000)
    throughput_batch: Optional[int] = Field(
        None, ge=1, le=4096,
        description="batch the throughput is measured at; None = the LabConfig's student_train.batch_size",
    )
    throughput_runs: int = Field(5, ge=1, le=1000)
    warmup_runs: int = Field(5, ge=0, le=1000)


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
    seeds: list[Seed] = Field(
        default_factory=lambda: [0], min_length=1, max_length=SEEDS_MAX, json_schema_extra={"uniqueItems": True},
        description="every model but the teacher is trained once per seed (its initial weights); the batches "
                    "come from student_train.seed, so the baseline and the students of one seed are paired",
    )
    lockstep: bool = Field(True, description="train the baseline and all students in one stage on the same batches, "
                                             "the teacher run once per batch")
    group_size: Optional[int] = Field(None, ge=1, le=1000, description="at most this many models per lockstep stage "
                                                                       "(None: all in one)")
    gate: Literal["mean", "ci_lower"] = Field(
        "mean", description="promotion rule: mean = the student's val_acc beats the baseline's by the margin; "
                            "ci_lower = the lower bound of the 95 % interval of the paired per-seed gain does")

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds {v}: each seed must appear once")
        return v

    @model_validator(mode="after")
    def _gate_seeds(self):
        if self.gate == "ci_lower" and len(self.seeds) < 2:
            raise ValueError("gate 'ci_lower' needs at least 2 seeds (an interval from one run does not exist)")
        return self

    @model_validator(mode="after")
    def _sizes(self):
        try:
            t = model_parameter_count(self.teacher.name, self.teacher.kwargs)
            s = model_parameter_count(self.student.name, self.student.kwargs)
        except TypeError as e:  # bad kwargs for the model constructor
            raise ValueError(f"bad model kwargs: {e}") from e
        if s > t:
            warnings.warn(
                f"student {self.student.name} ({s:,} parameters) is larger than teacher {self.teacher.name} ({t:,})",
                UserWarning,
                stacklevel=2,
            )
        return self

    def resolved_eval(self) -> EvalConfig:
        """``eval`` with ``throughput_batch`` filled in (None -> ``student_train.batch_size``)."""
        if self.eval.throughput_batch is not None:
            return self.eval
        return self.eval.model_copy(update={"throughput_batch": self.student_train.batch_size})

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
        seeds=[0, 1],
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
        seeds=[0, 1, 2],
        gate="ci_lower",
    ),
}


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
    return LabConfig.model_validate(deep_merge(PRESETS[name], overrides, atomic=("kwargs",)))


def parse_overrides(items: list[str]) -> dict:
    """``["student_train.epochs=3", "kd.temperature=2"]`` -> nested dict (values parsed as JSON when possible).

    A later override of the same key wins; a JSON object given for a section is merged like a preset
    (``teacher={...}`` then ``teacher.kwargs.width=8`` is fine). Overrides that contradict each other
    (``a.b=3`` and ``a.b.c=1``, in either order) and empty key segments (``kd..alpha``) raise ValueError
    naming the key."""
    out: dict = {}
    origin: dict[tuple[str, ...], str] = {}  # key path -> the override that set it

    def setter(path: tuple[str, ...]) -> str:
        for n in range(len(path), 0, -1):
            if path[:n] in origin:
                return origin[path[:n]]
        return "?"

    for item in items:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        parts = tuple(key.split("."))
        if not all(p.strip() for p in parts):
            raise ValueError(f"override {item!r}: key {key!r} has an empty segment; use section.field=value")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = out
        for i, p in enumerate(parts[:-1]):
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                section = ".".join(parts[: i + 1])
                raise ValueError(
                    f"conflicting overrides for {section!r}: {setter(parts[: i + 1])!r} sets it to a value, "
                    f"so {item!r} cannot set {key!r} inside it"
                )
            node = child
        old = node.get(parts[-1])
        if isinstance(old, dict) and isinstance(value, dict):
            value = deep_merge(old, value, atomic=("kwargs",))
        elif isinstance(old, dict) and any(path[: len(parts)] == parts and len(path) > len(parts) for path in origin):
            inner = sorted({v for path, v in origin.items() if path[: len(parts)] == parts and len(path) > len(parts)})
            raise ValueError(
                f"conflicting overrides for {key!r}: {', '.join(repr(v) for v in inner)} set fields inside it, "
                f"so {item!r} cannot set it to a value"
            )
        node[parts[-1]] = value
        origin[parts] = item
    return out
