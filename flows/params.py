"""Flow parameters: one pydantic model, so the Prefect UI renders a form and a bad value fails early.

``LabOverrides`` is LabConfig with every field optional (recursively) and the same constraints, so the
Prefect server's schema check rejects e.g. ``kd.temperature = 0`` at submission, naming the field; the
flow then validates the merged LabConfig before any compute.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic.fields import FieldInfo

from distill.config import LabConfig, load_profile

_PARTIALS: dict[type, type] = {}


def partial_model(model: type[BaseModel]) -> type[BaseModel]:
    """A copy of ``model`` whose fields are all optional (default None), nested models included."""
    if model in _PARTIALS:
        return _PARTIALS[model]
    fields: dict[str, Any] = {}
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            ann = partial_model(ann)
        info = FieldInfo.merge_field_infos(f, default=None)
        info.default_factory = None
        fields[name] = (Optional[ann], info)
    part = create_model(f"{model.__name__}Overrides", __config__=ConfigDict(extra="forbid"), **fields)
    _PARTIALS[model] = part
    return part


LabOverrides = partial_model(LabConfig)


def _drop_none(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _drop_none(v) for k, v in d.items() if v is not None}
    return d


class PipelineParams(BaseModel):
    """Parameters of the ``distill-cifar`` flow."""

    model_config = ConfigDict(extra="forbid")

    profile: Literal["smoke", "seed", "full"] = Field("smoke", description="preset recipe")
    overrides: LabOverrides = Field(default_factory=LabOverrides, description="fields to change in the preset")  # type: ignore[valid-type]
    train_pool: Optional[str] = Field(
        None, description="work pool for training stages (via deployment distill-train/<pool>); none = in-process"
    )
    store_url: Optional[str] = Field(None, description="file:///path or s3://bucket/prefix; default $DISTILL_STORE_URL or .distill/store")
    tracking_uri: Optional[str] = Field(None, description="MLflow tracking URI; default $MLFLOW_TRACKING_URI or .distill/mlflow.db")
    experiment: str = Field("distill-cifar", min_length=1, description="MLflow experiment and registered-model prefix")
    max_parallel: int = Field(2, ge=1, le=64, description="training stages run at once (baseline, students, sweep)")
    register_models: bool = Field(True, description="log and register teacher, baseline and student in MLflow")

    def lab(self) -> LabConfig:
        return load_profile(self.profile, _drop_none(self.overrides.model_dump()))

    @model_validator(mode="after")
    def _validate_lab(self):
        self.lab()  # raises naming the field, before any compute
        return self


def project_home() -> Path:
    return Path(os.environ.get("DISTILL_HOME", ".distill")).resolve()


def resolve_store_url(url: str | None) -> str:
    url = url or os.environ.get("DISTILL_STORE_URL")
    if url:
        if "://" not in url:
            return Path(url).resolve().as_uri()
        return url
    return (project_home() / "store").as_uri()


def resolve_tracking_uri(uri: str | None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    home = project_home()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'mlflow.db'}"
