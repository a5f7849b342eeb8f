"""Flow parameters: one pydantic model, so the Prefect UI renders a form and a bad value fails early.

``params_model(kind)`` builds each kind's flow parameters: its ``overrides`` are the kind's config with every
field optional (recursively, :func:`partial_model`) and the same constraints, so the Prefect server's schema
check rejects e.g. ``kd.temperature = 0`` at submission, naming the field; the flow then validates the merged
config before any compute.
"""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Optional
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_core import InitErrorDetails, PydanticCustomError

from distill import home
from distill.kinds import get_kind

# The experiment name is also the prefix of the registered models (<experiment>-teacher|baseline|student)
# and appears in MLflow search filters and store keys: a plain token, checked before anything runs.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
NAME_RULE = "1 to 100 letters, digits, '.', '_' or '-', starting with a letter or digit"
# A Prefect work-pool name (also the <pool> of the deployment distill-train/<pool>).
POOL_PATTERN = r'''^[^\s/\\'"`%&<>\x00-\x1f\x7f]{1,100}$'''
POOL_RULE = "1 to 100 characters, without whitespace, quotes or any of / \\ % & < > `"

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):")  # two letters at least: C:\ stays a path
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
STORE_SCHEMES = ("file", "s3")
TRACKING_SCHEMES = (
    "http", "https", "file", "sqlite", "postgresql", "postgres", "mysql", "mssql", "databricks", "databricks-uc", "uc",
)


def _plain(value: str, what: str) -> None:
    if not value or not value.strip():
        raise ValueError(f"{what} is empty")
    if value != value.strip() or _CONTROL.search(value):
        raise ValueError(f"{what} has leading/trailing whitespace or control characters")


def check_store_url(url: str) -> str:
    """``file:///abs/dir``, ``s3://bucket[/prefix]`` or a plain path; what tasks.storage.open_store accepts.
    Messages never echo the URL (it may carry credentials)."""
    _plain(url, "store URL")
    m = _SCHEME.match(url)
    if m is None:
        return url  # a plain path
    scheme = m.group(1).lower()
    if scheme not in STORE_SCHEMES or not url[m.end():].startswith("//"):
        raise ValueError(f"unsupported store URL (scheme {scheme!r}): use file:///path, s3://bucket/prefix or a plain path")
    parts = urlsplit(url)
    if "@" in parts.netloc:
        raise ValueError(f"credentials in a {scheme}:// store URL are not supported; use the AWS_* environment variables")
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.strip("/"):
            raise ValueError("file:// store URLs must name a local folder: file:///absolute/path")
    elif not re.fullmatch(r"[A-Za-z0-9._-]{1,255}", parts.netloc):
        raise ValueError("s3:// store URLs must name a bucket: s3://bucket/prefix")
    return url


def check_tracking_uri(uri: str) -> str:
    """An MLflow tracking URI: http(s)://host, sqlite:///path, file:/path, a database URL
    (postgresql://, mysql://, mssql://, optionally +driver), databricks[://profile], uc:, or a plain path."""
    _plain(uri, "tracking URI")
    m = _SCHEME.match(uri)
    if m is None:
        return uri  # a plain path (or 'databricks')
    scheme = m.group(1).lower()
    base = scheme.split("+", 1)[0]
    if base not in TRACKING_SCHEMES:
        raise ValueError(
            f"unsupported tracking URI scheme {scheme!r}: use http(s)://host, sqlite:///path, file:/path, "
            "postgresql://, mysql://, mssql://, databricks or a plain path"
        )
    rest = uri[m.end():]
    if base in ("http", "https") and "@" in urlsplit(uri).netloc:
        # a flow parameter is stored in Prefect's database and shown in its UI: credentials never go there
        raise ValueError("credentials in an http(s) tracking URI would be stored with the flow run; set "
                         "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")
    if base in ("http", "https", "postgresql", "postgres", "mysql", "mssql"):
        if not rest.startswith("//") or not urlsplit(uri).hostname or re.search(r"\s", uri):
            raise ValueError(f"a {scheme} tracking URI must look like {scheme}://host[:port][/path], without spaces")
    elif base == "sqlite":
        if not rest.startswith("///") or not rest[3:].strip():
            raise ValueError("a sqlite tracking URI needs a database path: sqlite:///path/to/mlflow.db")
    elif base == "file":
        if not rest.strip("/"):
            raise ValueError("a file: tracking URI needs a path: file:///path")
    return uri

_PARTIALS: dict[tuple, type] = {}


def _preset_values(presets: dict[str, Any]) -> str:
    """``"(every preset: 4)"`` or ``"(smoke: 1, seed: 15, full: 30)"``: what each preset sets a field to, for the
    field's description in the deployment form (where an override field itself stays empty: empty = the preset)."""
    shown = {p: json.dumps(v, separators=(",", ":")) for p, v in presets.items()}
    shown = {p: v if len(v) <= 40 else v[:37] + "..." for p, v in shown.items()}
    if len(set(shown.values())) == 1:
        return f"(every preset: {next(iter(shown.values()))})"
    return "(" + ", ".join(f"{p}: {v}" for p, v in shown.items()) + ")"


def partial_model(model: type[BaseModel], exclude: tuple[str, ...] = (),
                  presets: Optional[dict[str, dict]] = None) -> type[BaseModel]:
    """A copy of ``model`` whose fields are all optional (default None), nested models included; ``exclude``:
    top-level fields left out (``profile``, which is a parameter of its own); ``presets``: {profile: the config
    it gives, as JSON}, whose values each field's description then lists (:func:`_preset_values`)."""
    key = (model, exclude, json.dumps(presets, sort_keys=True, default=str) if presets else None)
    if key in _PARTIALS:
        return _PARTIALS[key]
    fields: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        if name in exclude:
            continue
        sub = {p: cfg.get(name) for p, cfg in presets.items() if isinstance(cfg, dict)} if presets else None
        ann = f.annotation
        info = FieldInfo.merge_field_infos(f, default=None)
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            ann = partial_model(ann, presets=sub if sub and all(isinstance(v, dict) for v in sub.values()) else None)
        elif sub:
            info = FieldInfo.merge_field_infos(
                f, default=None, description=" ".join(filter(None, (f.description, _preset_values(sub)))))
        info.default_factory = None
        fields[name] = (Optional[ann], info)
    config = ConfigDict(extra="forbid", allow_inf_nan=model.model_config.get("allow_inf_nan", True))
    part = create_model(f"{model.__name__}Overrides", __config__=config, **fields)
    _PARTIALS[key] = part
    return part


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


class PipelineBase(BaseModel):
    """Parameters every pipeline flow shares; :func:`params_model` adds the kind's ``profile`` and ``overrides``."""

    KIND: ClassVar[str] = "cifar"
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, hide_input_in_errors=True)  # URLs may carry secrets

    profile: str = Field("smoke", description="preset recipe")
    overrides: Any = None
    train_pool: Optional[str] = Field(
        None, description="work pool for the training stages (through the deployment distill-train/POOL, POOL being "
                          "this name); empty: every stage runs in the flow's own process",
        json_schema_extra={"pattern": POOL_PATTERN},
    )
    store_url: Optional[str] = Field(None, description="file:///path or s3://bucket/prefix; default $DISTILL_STORE_URL or .distill/store")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or .distill/mlflow.db")
    experiment: str = Field(
        "distill-cifar", min_length=1, max_length=100, json_schema_extra={"pattern": NAME_PATTERN},
        description=f"MLflow experiment and registered-model prefix: {NAME_RULE}",
    )
    max_parallel: int = Field(2, ge=1, le=64, description="training stages run at once (baseline, students, sweep)")
    register_models: bool = Field(True, description="log and register teacher, baseline and student in MLflow")
    fresh: bool = Field(
        False, description="train every stage again, ignoring completed or checkpointed work with the same key"
    )
    keep_checkpoints: bool = Field(
        False, description="keep each stage's training checkpoints in the store after it completes (by default "
        "they are deleted then: they only serve to resume an unfinished stage)"
    )

    def lab(self) -> Any:
        """The kind's validated config: the preset with the overrides merged in."""
        overrides = self.overrides.model_dump() if isinstance(self.overrides, BaseModel) else (self.overrides or {})
        return get_kind(self.KIND).load_profile(self.profile, _drop_none(overrides))

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str) -> str:
        if not re.fullmatch(NAME_PATTERN, v):
            raise ValueError(f"experiment name {v!r} is not allowed: use {NAME_RULE}")
        return v

    @field_validator("train_pool")
    @classmethod
    def _pool(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and not re.fullmatch(POOL_PATTERN, v):
            raise ValueError(f"work pool name {v!r} is not allowed: use {POOL_RULE}")
        return v

    @field_validator("store_url")
    @classmethod
    def _store(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else check_store_url(v)

    @field_validator("tracking_uri")
    @classmethod
    def _tracking(cls, v: Optional[str]) -> Optional[str]:
        return None if v is None else check_tracking_uri(v)

    @model_validator(mode="after")
    def _validate_lab(self):
        try:
            self.lab()  # raises naming the field, before any compute
        except ValidationError as e:  # name the fields as this model does: overrides.<section>.<field>
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [
                    InitErrorDetails(
                        type=PydanticCustomError(err["type"], "{message}", {"message": err["msg"]}),
                        loc=("overrides", *err["loc"]),
                        input=err.get("input"),
                    )
                    for err in e.errors()
                ],
            ) from None
        return self


_PARAMS: dict[str, type[PipelineBase]] = {}


def params_model(kind_name: str) -> type[PipelineBase]:
    """The parameter model of the flow of ``kind_name``: the shared fields, the kind's profiles as a choice, its
    config as all-optional overrides (so the Prefect server rejects a bad value at submission, naming the
    field) and its flow name as the default experiment."""
    if kind_name in _PARAMS:
        return _PARAMS[kind_name]
    kind = get_kind(kind_name)
    presets = {p: kind.load_profile(p, {}).model_dump(mode="json") for p in kind.profiles}
    overrides = partial_model(kind.config_model, exclude=("profile",), presets=presets)
    name = "PipelineParams" if kind_name == "cifar" else f"{kind_name.capitalize()}PipelineParams"
    model = create_model(
        name,
        __base__=PipelineBase,
        __doc__=f"Parameters of the ``{kind.flow}`` flow ({kind.description}).",
        profile=(Literal[tuple(kind.profiles)], Field(kind.profiles[0], description="preset recipe (each override "  # type: ignore[valid-type]
                                                      "field lists what the presets set it to)")),
        overrides=(overrides, Field(default_factory=overrides, description="fields to change in the preset")),
        experiment=(str, Field(kind.flow, min_length=1, max_length=100, json_schema_extra={"pattern": NAME_PATTERN},
                               description=f"MLflow experiment and registered-model prefix: {NAME_RULE}")),
    )
    model.KIND = kind_name
    _PARAMS[kind_name] = model
    return model


PipelineParams = params_model("cifar")


def flow_signature(kind_name: str) -> tuple[inspect.Signature, str]:
    """The flow's top-level parameters as a signature (every field of :func:`params_model`: profile,
    overrides, train_pool, ..., with its type, numeric constraints and default) and an ``Args:`` docstring block
    with their descriptions (Prefect shows them in the deployment form). Top-level parameters, so a deployment
    run that names one parameter keeps the deployment's others: Prefect merges run and deployment parameters at
    the top level only."""
    model = params_model(kind_name)
    params, doc = [], ["Args:"]
    for name, f in model.model_fields.items():
        ann = Annotated[(f.annotation, *f.metadata)] if f.metadata else f.annotation
        default = f.default_factory() if f.default_factory is not None else f.default
        if name == "overrides":
            ann, default = Optional[f.annotation], None  # none: the preset as it is
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=ann))
        doc.append(f"    {name}: {' '.join((f.description or name).split())}")
    return inspect.Signature(params), "\n".join(doc)


def params_from_flow(kind_name: str, values: dict[str, Any]) -> PipelineBase:
    """The flow's parameters as the pipeline's one model: raises ``pydantic.ValidationError`` naming the field
    (cross-field rules of the config, e.g. warmup_epochs < epochs, are checked here, not by the schema)."""
    values = {k: v for k, v in values.items() if not (k == "overrides" and v is None)}  # none: the preset as is
    return params_model(kind_name)(**values)


def validation_message(e: ValidationError) -> str:
    """One line per error, ``field.path: message``, for a flow run's state message."""
    return "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'parameters'}: {err['msg']}" for err in e.errors())


def project_home() -> Path:
    return home.home()


def resolve_store_url(url: str | None) -> str:
    return home.store_url(url)


def resolve_tracking_uri(uri: str | None) -> str:
    return home.tracking_uri(uri)
