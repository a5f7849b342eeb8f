"""MLflow adapter: runs, metrics, artifacts, the model registry and the promotion gate.

The compute core never calls MLflow: a training loop gets ``Tracker.log_fn(run_id)``,
a plain ``callable(metrics, step)``.  Everything here goes through an explicit
``MlflowClient`` bound to one tracking URI and uses no active-run global state.  The one
exception is :meth:`Tracker.log_model`: MLflow's model logging resolves the *global*
tracking URI internally (also inside the registry store), so that call runs under a
lock with the global URI temporarily set to this tracker's URI (and restored after).
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import re
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline machines; explicit user settings win

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

if TYPE_CHECKING:  # torch / numpy are imported only where a model is logged
    import numpy
    import torch

log = logging.getLogger(__name__)

PARENT_RUN_TAG = "mlflow.parentRunId"
CHAMPION = "champion"
CHALLENGER = "challenger"
VAL_ACC_TAG = "val_acc"
MODEL_ARTIFACT_NAME = "model"

# MLflow limits (mlflow.utils.validation)
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000
PARAMS_PER_BATCH = 100
METRICS_PER_BATCH = 1000

_GLOBAL_URI_LOCK = threading.RLock()


class TrackingError(RuntimeError):
    pass


def default_tracking_uri(home: str | os.PathLike) -> str:
    """``sqlite:///<home>/mlflow.db`` (embedded default; artifacts go to ``<home>/mlartifacts``)."""
    home = Path(home).expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home.as_posix()}/mlflow.db"


def _default_artifact_location(tracking_uri: str, experiment: str) -> str | None:
    """For a local sqlite backend: ``file://<db dir>/mlartifacts/<experiment slug>``.
    Servers (http[s]://) choose their own (``--artifacts-destination``): None."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    db = Path(tracking_uri[len("sqlite:///"):])
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", experiment).strip("-.") or "experiment"
    return (db.parent / "mlartifacts" / slug).resolve().as_uri()


@contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Temporarily point MLflow's global tracking URI at ``uri``; restores both the
    global and the MLFLOW_TRACKING_URI variable (mlflow.set_tracking_uri changes both)."""
    from mlflow.tracking._tracking_service import utils as tracking_utils

    with _GLOBAL_URI_LOCK:
        old_global = getattr(tracking_utils, "_tracking_uri", None)
        old_env = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(uri)
        try:
            yield
        finally:
            mlflow.set_tracking_uri(old_global)
            if old_env is None:
                os.environ.pop("MLFLOW_TRACKING_URI", None)
            else:
                os.environ["MLFLOW_TRACKING_URI"] = old_env


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": "1"}``; values stringified and truncated to MLflow's limit."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(flatten_params(value, name))
        else:
            text = "None" if value is None else str(value)
            out[name] = _truncate(text, MAX_PARAM_VALUE)
    return out


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _str_tags(tags: Mapping[str, Any] | None) -> dict[str, str]:
    return {str(k): _truncate(str(v), MAX_TAG_VALUE) for k, v in (tags or {}).items() if v is not None}


def _as_float(value: Any) -> float | None:
    """float for real numbers (Python, numpy, 0-d arrays/tensors); None for anything else."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if getattr(value, "ndim", None) == 0 and hasattr(value, "item"):  # 0-d numpy array / torch tensor
        return _as_float(value.item())
    return None


def _quote(value: str) -> str:
    if "'" in value:
        raise TrackingError(f"cannot search for a value containing a single quote: {value!r}")
    return f"'{value}'"


class Tracker:
    """One MLflow experiment on one tracking URI, driven through ``MlflowClient``."""

    def __init__(self, tracking_uri: str | None, experiment: str, artifact_location: str | None = None):
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise TrackingError("no MLflow tracking URI: pass tracking_uri or set MLFLOW_TRACKING_URI")
        self.tracking_uri = uri
        self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        self.experiment_name = experiment
        self.experiment_id = self._get_or_create_experiment(
            experiment, artifact_location or _default_artifact_location(uri, experiment)
        )

    def __repr__(self) -> str:
        return f"Tracker({self.tracking_uri!r}, experiment={self.experiment_name!r})"

    def _get_or_create_experiment(self, name: str, artifact_location: str | None) -> str:
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location)
            except MlflowException as e:  # created concurrently
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise TrackingError(f"cannot create MLflow experiment {name!r}: {e}") from e
        if exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        return exp.experiment_id

    # -- runs ------------------------------------------------------------------------
    def find_run(self, tag_key: str, tag_value: str) -> str | None:
        """The newest active run of this experiment tagged ``tag_key=tag_value``, or None."""
        runs = self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.`{tag_key}` = {_quote(str(tag_value))}",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        return runs[0].info.run_id if runs else None

    def _start(self, run_name: str, params: Mapping[str, Any] | None, tags: Mapping[str, Any] | None,
               reuse_tag: str | None) -> str:
        tags = _str_tags(tags)
        if reuse_tag is not None:
            if reuse_tag not in tags:
                raise TrackingError(f"reuse_tag {reuse_tag!r} is not among the run's tags")
            existing = self.find_run(reuse_tag, tags[reuse_tag])
            if existing is not None:
                run = self.client.get_run(existing)
                if run.info.status != "RUNNING":
                    self.client.update_run(existing, status="RUNNING")
                self.set_tags(existing, tags)
                self.log_params(existing, params or {})
                return existing
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)
        run_id = run.info.run_id
        if params:
            self.log_params(run_id, params)
        return run_id

    def start_parent(self, run_name: str, params: Mapping[str, Any] | None = None,
                     tags: Mapping[str, Any] | None = None, reuse_tag: str | None = None) -> str:
        """Create a top-level run; with ``reuse_tag`` an existing run carrying the same
        value for that tag (e.g. a retried Prefect flow run) is reopened instead."""
        return self._start(run_name, params, tags, reuse_tag)

    def start_child(self, parent_run_id: str, run_name: str, params: Mapping[str, Any] | None = None,
                    tags: Mapping[str, Any] | None = None, reuse_tag: str | None = None) -> str:
        """Create a run nested under ``parent_run_id`` (tag ``mlflow.parentRunId``)."""
        parent = self.client.get_run(parent_run_id)
        if parent.info.experiment_id != self.experiment_id:
            raise TrackingError(f"parent run {parent_run_id} belongs to another experiment")
        return self._start(run_name, params, {**(tags or {}), PARENT_RUN_TAG: parent_run_id}, reuse_tag)

    def child_runs(self, parent_run_id: str) -> list[str]:
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{PARENT_RUN_TAG}` = {_quote(parent_run_id)}",
            order_by=["attributes.start_time ASC"],
        )
        return [r.info.run_id for r in runs]

    def end_run(self, run_id: str, status: str = "FINISHED") -> None:
        RunStatus.from_string(status)  # validates
        self.client.set_terminated(run_id, status=status)

    # -- logging ---------------------------------------------------------------------
    def log_fn(self, run_id: str) -> Callable[[dict, int], None]:
        """A ``callable(metrics, step)`` for the compute core's training loop."""

        def _log(metrics: dict, step: int) -> None:
            self.log_metrics(run_id, metrics, step)

        _log.run_id = run_id  # type: ignore[attr-defined]
        return _log

    def log_metrics(self, run_id: str, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Log the numeric values of ``metrics`` (others, e.g. lists or strings, are skipped)."""
        ts = int(time.time() * 1000)
        entries = []
        for key, value in metrics.items():
            number = _as_float(value)
            if number is None:
                continue
            entries.append(Metric(key=str(key), value=number, timestamp=ts, step=int(step or 0)))
        for i in range(0, len(entries), METRICS_PER_BATCH):
            self._with_retries(self.client.log_batch, run_id, metrics=entries[i : i + METRICS_PER_BATCH])

    @staticmethod
    def _with_retries(fn: Callable[..., Any], *args: Any, attempts: int = 4, **kwargs: Any) -> Any:
        """Transient tracking errors (e.g. SQLite "database is locked" under concurrent stages) are retried
        with exponential backoff; the last failure is raised."""
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except Exception:  # noqa: BLE001
                if attempt == attempts - 1:
                    raise
                time.sleep(0.5 * 2**attempt)

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        """Flatten nested dicts with dots, stringify, truncate; values already logged with
        the same value are skipped (params are immutable in MLflow), so retries are safe."""
        flat = flatten_params(params)
        if not flat:
            return
        existing = self.client.get_run(run_id).data.params
        todo = [Param(k, v) for k, v in flat.items() if existing.get(k) != v]
        for i in range(0, len(todo), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=todo[i : i + PARAMS_PER_BATCH])

    def set_tags(self, run_id: str, tags: Mapping[str, Any]) -> None:
        entries = [RunTag(k, v) for k, v in _str_tags(tags).items()]
        for i in range(0, len(entries), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=entries[i : i + PARAMS_PER_BATCH])

    def log_artifacts(self, run_id: str, local_dir: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(run_id, str(local_dir), artifact_path)

    def log_artifact(self, run_id: str, local_path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, str(local_path), artifact_path)

    def log_text(self, run_id: str, text: str, artifact_file: str) -> None:
        self.client.log_text(run_id, text, artifact_file)

    # -- models ----------------------------------------------------------------------
    def find_model_version(self, name: str, run_id: str):
        """The (lowest) version of registered model ``name`` produced by ``run_id``, or None."""
        try:
            versions = self.client.search_model_versions(f"name = {_quote(name)} and run_id = {_quote(run_id)}")
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST":
                return None
            raise
        return min(versions, key=lambda v: int(v.version)) if versions else None

    def log_model(
        self,
        run_id: str,
        model: "torch.nn.Module",
        input_example: "numpy.ndarray",
        registered_name: str,
        tags: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Log ``model`` (pytorch flavour, torch.export "pt2", signature inferred from
        ``input_example``; a batch of 1 is doubled so the exported batch dimension stays
        dynamic; the model is put in eval mode for the export) as a LoggedModel of ``run_id``
        and register it under
        ``registered_name`` with ``tags`` on the version (lineage).

        Idempotent per (registered_name, run_id): if such a version exists, nothing is
        logged again; its tags are (re)applied and it is returned with ``reused=True``.
        """
        tags = _str_tags(tags)
        existing = self.find_model_version(registered_name, run_id)
        if existing is not None:
            for k, v in tags.items():
                if existing.tags.get(k) != v:
                    self.client.set_model_version_tag(registered_name, existing.version, k, v)
            return self._version_info(existing, reused=True)

        import mlflow.pytorch
        import numpy as np
        import torch

        run = self.client.get_run(run_id)
        # Create the LoggedModel ourselves: without an active run MLflow would put it in the
        # global / default experiment rather than the run's.
        logged = self.client.create_logged_model(
            experiment_id=run.info.experiment_id,
            name=MODEL_ARTIFACT_NAME,
            source_run_id=run_id,
            tags=tags or None,
        )
        requirements = [
            f"mlflow=={mlflow.__version__}",
            f"torch=={torch.__version__.split('+')[0]}",
            f"numpy=={np.__version__}",
        ]
        example = np.asarray(input_example)
        if example.ndim >= 1 and example.shape[0] == 1:
            # torch.export specialises a dimension whose example size is 1: a batch-1 example
            # would give a model that only accepts batch 1. Export with a batch of 2.
            example = np.concatenate([example, example], axis=0)
        was_training = model.training
        model.eval()
        try:
            with _global_tracking_uri(self.tracking_uri):
                mlflow.pytorch.log_model(
                    model,
                    name=MODEL_ARTIFACT_NAME,
                    input_example=example,
                    model_id=logged.model_id,
                    run_id=run_id,  # forwarded to mlflow.models.Model.log: links the model to the run
                    pip_requirements=requirements,  # explicit: skips MLflow's slow requirement inference
                    serialization_format="pt2",
                )
                self._ensure_registered_model(registered_name)
                version = self.client.create_model_version(
                    name=registered_name,
                    source=f"models:/{logged.model_id}",
                    run_id=run_id,
                    tags=tags or None,
                    model_id=logged.model_id,
                )
        finally:
            model.train(was_training)
        info = self._version_info(version, reused=False)
        info["logged_model_uri"] = f"models:/{logged.model_id}"
        log.info("registered %s version %s from run %s", registered_name, info["version"], run_id)
        return info

    def _ensure_registered_model(self, name: str) -> None:
        try:
            self.client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise

    @staticmethod
    def _version_info(version, reused: bool) -> dict[str, Any]:
        return {
            "name": version.name,
            "version": str(version.version),
            "model_uri": f"models:/{version.name}/{version.version}",
            "run_id": version.run_id,
            "reused": reused,
        }

    def load_model(self, model_uri: str):
        """``mlflow.pytorch.load_model`` against this tracker's URI (e.g. ``models:/NAME@champion``)."""
        import mlflow.pytorch

        with _global_tracking_uri(self.tracking_uri):
            return mlflow.pytorch.load_model(model_uri)

    def get_alias(self, name: str, alias: str):
        """The model version carrying ``alias``, or None."""
        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException as e:
            if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
                return None
            raise

    def promote(
        self,
        name: str,
        version: str,
        candidate_val_acc: float,
        baseline_val_acc: float,
        margin: float,
    ) -> dict[str, Any]:
        """Gate: alias ``challenger`` -> version always; alias ``champion`` -> version iff
        ``candidate >= baseline + margin`` and (no champion, or candidate > champion's
        ``val_acc`` version tag).  Re-running for the current champion is a no-op that
        reports ``promoted=True``.  (Read-then-set: run promotions of one model serially.)"""
        version = str(version)
        candidate = float(candidate_val_acc)
        baseline = float(baseline_val_acc)
        margin = float(margin)
        mv = self.client.get_model_version(name, version)
        if VAL_ACC_TAG not in mv.tags:
            self.client.set_model_version_tag(name, version, VAL_ACC_TAG, repr(candidate))
        self.client.set_registered_model_alias(name, CHALLENGER, version)

        champ = self.get_alias(name, CHAMPION)
        champ_version = str(champ.version) if champ is not None else None
        champ_acc: float | None = None
        if champ is not None and VAL_ACC_TAG in champ.tags:
            try:
                champ_acc = float(champ.tags[VAL_ACC_TAG])
            except ValueError:
                champ_acc = None

        threshold = baseline + margin
        if champ_version == version:
            promoted, reason = True, f"version {version} is already the champion"
        elif math.isnan(candidate) or not candidate >= threshold:
            promoted = False
            reason = (f"candidate val_acc {candidate:.4f} < baseline {baseline:.4f} + margin {margin:.4f}"
                      f" = {threshold:.4f}")
        elif champ is not None and champ_acc is None:
            promoted = False
            reason = f"champion version {champ_version} has no usable {VAL_ACC_TAG!r} tag; not replaced automatically"
        elif champ is not None and not candidate > champ_acc:
            promoted = False
            reason = f"candidate val_acc {candidate:.4f} does not beat champion v{champ_version} ({champ_acc:.4f})"
        else:
            promoted = True
            reason = (f"candidate val_acc {candidate:.4f} >= baseline + margin {threshold:.4f}"
                      + (f" and beats champion v{champ_version} ({champ_acc:.4f})" if champ is not None else
                         "; no previous champion"))
            self.client.set_registered_model_alias(name, CHAMPION, version)

        self.client.set_model_version_tag(name, version, "promotion.decision", "promoted" if promoted else "rejected")
        self.client.set_model_version_tag(name, version, "promotion.reason", _truncate(reason, MAX_TAG_VALUE))
        after = self.get_alias(name, CHAMPION)
        return {
            "promoted": promoted,
            "reason": reason,
            "candidate_version": version,
            "candidate_val_acc": candidate,
            "baseline_val_acc": baseline,
            "margin": margin,
            "champion_version_before": champ_version,
            "champion_val_acc_before": champ_acc,
            "champion_version_after": str(after.version) if after is not None else None,
        }
