"""The registry of distillation kinds: what the pipeline needs to know about one kind, as plain functions.

A kind (``cifar`` image classifiers, ``lm`` causal language models, ``diffusion`` step distillation) is one
:class:`Kind` value built by its package (``distill.image.kind``, ``distill.lm.kind``, ``distill.diffusion.kind``);
no base classes. The pipeline side
(``tasks/``, ``flows/``) only talks to a kind through these fields, so storage, tracking, registration, the
promotion gate, the report, dispatch to a work pool, stage reuse and resume are the same for every kind.

Contract of the functions (``cfg`` is the kind's validated config model, ``kd`` a plain dict or None):

- ``load_profile(profile, overrides) -> cfg``: raises ``pydantic.ValidationError`` naming the field.
- ``prepare(cfg, progress) -> dict``: ``{"dir", "manifest_sha256", "n_train", "summary"}``; ``dir`` is a
  content-addressed local folder (published to the store as ``data/<manifest_sha256>``), ``summary`` small JSON.
- ``plan(cfg) -> list[Member]``: every stage after the teacher (and the kind's ``init`` stage), in order.
- ``fingerprint(role, cfg, *, data_sha256, kd, teacher_sha256, init_sha256) -> dict``: what determines the
  stage's result; the pipeline hashes it with the source of the core into the stage key.
- ``train(role, cfg, data_dir, out_dir, *, teacher_dir, init_dir, kd, log_fn, on_checkpoint, resume) -> dict``:
  writes a stage output folder (weights + config + ``metrics.json`` + ``history.json``) and returns its
  metrics; ``result[selection.key]`` is the validation metric the gate compares. ``role == "init"`` (kinds
  with ``has_init``) writes the students' shared starting point (e.g. a pruned teacher) and trains nothing.
- ``evaluate(model_dir, data_dir, cfg, *, split, teacher_dir, speed, out_path) -> dict``: flat JSON metrics
  of the held-out split, including ``test_metric.key``.
- ``speed(model_dir, data_dir, cfg) -> dict``: speed metrics alone (measured when nothing else trains).
- ``train_group(...)`` (optional): several members of one ``Member.group`` in one stage (see the field).
- ``weights_sha256(model_dir) -> str``: the checksum a later stage records as its teacher / init.
- ``load_model(model_dir)``: the model object (for registration).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

__all__ = ["INIT_NAME", "Column", "Kind", "Member", "Metric", "get_kind", "kind_names", "register_kind"]

#: the stage name of a kind's ``init`` role (the students' shared starting point)
INIT_NAME = "student-init"


@dataclass(frozen=True)
class Metric:
    """A metric and its direction: ``max`` (accuracy) or ``min`` (perplexity, FID)."""

    key: str
    direction: Literal["max", "min"]
    label: str = ""

    def __post_init__(self):
        if self.direction not in ("max", "min"):
            raise ValueError(f"direction must be 'max' or 'min', got {self.direction!r}")

    def better(self, a: float, b: float) -> bool:
        """``a`` strictly better than ``b``."""
        return a > b if self.direction == "max" else a < b

    def gain(self, candidate: float, reference: float) -> float:
        """How much better ``candidate`` is than ``reference``: positive is better, in the metric's units."""
        return candidate - reference if self.direction == "max" else reference - candidate

    def passes(self, candidate: float, reference: float, margin: float) -> bool:
        """``candidate`` beats ``reference`` by at least ``margin`` (in the metric's units)."""
        if not (math.isfinite(candidate) and math.isfinite(reference)):
            return False
        return self.gain(candidate, reference) >= margin


@dataclass(frozen=True)
class Column:
    """A report column: header, key in a row, and how to format it (``pct``, ``gain_pt``, ``int``, ``f1``,
    ``f2``, ``f3``, ``f4``, ``gain`` (signed f3), ``str``)."""

    header: str
    key: str
    fmt: str = "f4"

    def format(self, v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "-"
        if self.fmt == "str" or not isinstance(v, (int, float)):
            return str(v)
        if self.fmt == "pct":
            return f"{100 * v:.2f} %"
        if self.fmt == "gain_pt":
            return f"{100 * v:+.2f} pt"
        if self.fmt == "int":
            return f"{int(round(v)):,}"
        if self.fmt == "gain":
            return f"{v:+.3f}"
        if self.fmt.startswith("f") and self.fmt[1:].isdigit():
            return f"{v:,.{int(self.fmt[1:])}f}"
        return f"{v}"


@dataclass(frozen=True)
class Member:
    """One training stage after the teacher: ``role`` is ``baseline`` or ``student``; ``name`` is unique in the
    run (``baseline``, ``student``, ``sweep-T4-a0.9``, ``sweep-rkl``); ``kd`` the stage's distillation config
    (None for the baseline); ``sweep`` its coordinates in the sweep (None when not a sweep member);
    ``main`` marks the student that is registered and gated."""

    role: str
    name: str
    kd: Optional[dict] = None
    sweep: Optional[dict] = None
    main: bool = False
    #: the name of an earlier member whose output is this member's teacher (a progressive-distillation round
    #: learns from the previous round); None: the run's teacher
    teacher: Optional[str] = None
    #: the seed of the member's initial weights when the kind trains replicas per seed (None: the kind's default)
    seed: Optional[int] = None
    #: the name of the first seed's member this one replicates (itself for the first seed); None: no replicas
    replica_of: Optional[str] = None
    #: members with the same group train together in one stage (``Kind.train_group``: lockstep on shared batches)
    group: Optional[str] = None


@dataclass(frozen=True)
class Kind:
    name: str
    flow: str
    description: str
    config_model: type
    profiles: tuple[str, ...]
    load_profile: Callable[..., Any]
    prepare: Callable[..., dict]
    plan: Callable[[Any], list[Member]]
    fingerprint: Callable[..., dict]
    train: Callable[..., dict]
    evaluate: Callable[..., dict]
    speed: Callable[..., dict]
    weights_sha256: Callable[[Any], str]
    load_model: Callable[[Any], Any]
    selection: Metric
    test_metric: Metric
    columns: tuple[Column, ...]
    roles: tuple[str, ...] = ("teacher", "baseline", "student")
    has_init: bool = False
    #: sweep plot: the coordinate on the x axis and the one that makes separate lines (or None)
    sweep_axes: tuple[str, Optional[str]] = ("", None)
    #: fields of ``train``'s result and of the stage fingerprint used to check batch sizes, etc.
    extras: dict = field(default_factory=dict)
    #: ``train_group(cfg, data_dir, out_dir, members, *, teacher_dir, log_fns, on_checkpoint, resume)`` trains the
    #: members of one ``Member.group`` together (``members``: ``{"role", "name", "kd", "seed"}``), writing
    #: ``out_dir/<name>/`` per member, and returns {name: metrics}; None: the kind has no groups
    train_group: Optional[Callable[..., dict]] = None

    def batch_errors(self, cfg: Any, n_train: int) -> list[str]:
        fn = self.extras.get("batch_errors")
        return list(fn(cfg, n_train)) if fn else []


_BUILTIN = {"cifar": "distill.image.kind", "lm": "distill.lm.kind", "diffusion": "distill.diffusion.kind"}
_KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind) -> Kind:
    _KINDS[kind.name] = kind
    return kind


def get_kind(name: str) -> Kind:
    """The kind named ``name`` (its module is imported on first use, so the image kind never loads transformers)."""
    if name not in _KINDS and name in _BUILTIN:
        importlib.import_module(_BUILTIN[name])
    if name not in _KINDS:
        raise ValueError(f"unknown distillation kind {name!r}; known: {', '.join(kind_names())}")
    return _KINDS[name]


def kind_names() -> list[str]:
    return sorted(set(_BUILTIN) | set(_KINDS))


# ------------------------------------------------------------------------------------------ comparison table


def comparison_rows(kind: Kind, results: dict[str, dict]) -> list[dict]:
    """One flat row per model: its validation metric, its held-out metrics, and

    - ``gain``: how much better than the baseline (of the same seed, for replicas) on the kind's test metric
      (students), in the metric's units (accuracy points as a fraction; perplexity, lower is better, as a positive number);
    - ``gap_closed``: with an init stage (the student before training), the share of the init -> teacher gap
      on the test metric that the model closed (0 = no better than its starting point, 1 = as good as the
      teacher).

    ``results``: {name: {"role": ..., <selection key>: ..., "test": {...}}}."""
    tm = kind.test_metric
    base_any = results.get("baseline", {}).get("test", {}).get(tm.key)
    base_of_seed = {r.get("seed"): r.get("test", {}).get(tm.key) for r in results.values()
                    if r.get("replica_of") == "baseline"}
    teacher = results.get("teacher", {}).get("test", {}).get(tm.key)
    init = next((r.get("test", {}).get(tm.key) for r in results.values() if r.get("role") == "init"), None)
    rows = []
    for name, r in results.items():
        t = r.get("test", {})
        row = {"model": name, "role": r.get("role"), kind.selection.key: r.get(kind.selection.key)}
        row.update({k: v for k, v in t.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)})
        x = t.get(tm.key)
        # paired: a replica of seed s is compared with the baseline of seed s (same initial weights and batches)
        base = base_of_seed.get(r["seed"], base_any) if r.get("replica_of") is not None else base_any
        row["gain"] = tm.gain(x, base) if (base is not None and x is not None and r.get("role") == "student") else None
        if init is not None and teacher is not None and x is not None and r.get("role") in ("baseline", "student", "init"):
            span = tm.gain(teacher, init)
            row["gap_closed"] = tm.gain(x, init) / span if span else None
        rows.append(row)
    return rows


def markdown_table(columns: tuple[Column, ...], rows: list[dict]) -> str:
    head = "| " + " | ".join(c.header for c in columns) + " |"
    sep = "|" + "---|" * len(columns)
    body = ["| " + " | ".join(c.format(row.get(c.key)) for c in columns) + " |" for row in rows]
    return "\n".join([head, sep, *body])
