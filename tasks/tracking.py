"""MLflow adapter: runs, metrics, artifacts, the model registry and the promotion gate.

The compute core never calls MLflow: a training loop gets ``Tracker.log_fn(run_id)``,
a plain ``callable(metrics, step)``.  Everything here goes through an explicit
``MlflowClient`` bound to one tracking URI and uses no active-run global state.  The one
exceptions are :meth:`Tracker.log_model` and :meth:`Tracker.log_model_folder`: MLflow's model logging
resolves the *global* tracking URI internally (also inside the registry store), so those calls run under
a lock with the global URI temporarily set to this tracker's URI (and restored after).

Run lifecycle: every run started here carries owner tags (host, pid, the pid's start time, boot id, optionally
the Prefect flow run) so that :meth:`Tracker.end_dead_runs` can tell a run whose process was killed from a live
one; :meth:`Tracker.run_scope` ends a run with the status matching how its block ended.

Credentials: an ``http(s)://user:password@host`` tracking URI is split; MLflow gets the clean URI and the
credentials through ``MLFLOW_TRACKING_USERNAME`` / ``MLFLOW_TRACKING_PASSWORD``.  Everything shown (repr,
:attr:`Tracker.display_uri`, error messages) goes through :mod:`tasks.secrets`.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import socket
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Literal, Mapping, Union
from urllib.parse import unquote, urlsplit

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # offline machines; explicit user settings win

import mlflow
from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .secrets import redact_text, redact_url, strip_userinfo

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

# owner of a run (set when it is started or claimed), read by Tracker.end_dead_runs
OWNER_HOST_TAG = "distill.owner.host"
OWNER_PID_TAG = "distill.owner.pid"
OWNER_PID_START_TAG = "distill.owner.pid_start"  # opaque start time of the pid: a recycled pid differs
OWNER_BOOT_TAG = "distill.owner.boot_id"
OWNER_FLOW_RUN_TAG = "distill.owner.flow_run_id"
KILLED_BY_TAG = "distill.killed_by"
KILLED_REASON_TAG = "distill.killed_reason"
ERROR_TAG = "distill.error"
# promotion: a candidate announces itself on its version before it waits for the lock (JSON value)
PROMOTION_PENDING_TAG = "promotion.pending"
PROMOTION_DECISION_TAG = "promotion.decision"
PROMOTION_REASON_TAG = "promotion.reason"
PENDING_TTL_S = 900.0  # longer than a candidate waits for the promotion lock (Store.lock timeout: 600 s)

# MLflow error codes that no retry can fix
_PERMANENT_ERRORS = frozenset({
    "RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "PERMISSION_DENIED",
    "UNAUTHENTICATED", "INVALID_STATE", "NOT_FOUND",
})

_GLOBAL_URI_LOCK = threading.RLock()
_LOCAL_LOCKS: dict[tuple[str, str], threading.Lock] = {}
_LOCAL_LOCKS_GUARD = threading.Lock()

PromotionLock = Union[ContextManager[Any], Callable[[], ContextManager[Any]]]
Direction = Literal["max", "min"]
HFFlavor = Literal["transformers", "files"]
HF_FLAVORS: tuple[str, ...] = ("transformers", "files")
DIRECTIONS: tuple[str, ...] = ("max", "min")


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


# -- process identity (owner of a run) ------------------------------------------------------


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def probe_process(pid: int) -> tuple[str, str | None]:
    """(``"alive"`` | ``"gone"`` | ``"unknown"``, start-time token or None) for ``pid`` on this host.

    The token is opaque (``/proc/<pid>/stat`` start time in clock ticks since boot, else psutil's
    ``create_time``): equal tokens for the same pid mean the same process.  A zombie counts as gone."""
    try:
        text = Path(f"/proc/{int(pid)}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        if Path("/proc/self/stat").exists():
            return "gone", None
    except OSError:
        pass
    else:
        fields = text[text.rindex(")") + 2 :].split()  # comm may contain spaces and parentheses
        return ("gone", None) if fields[0] in ("Z", "X", "x") else ("alive", fields[19])
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            proc = psutil.Process(int(pid))
            if proc.status() == psutil.STATUS_ZOMBIE:
                return "gone", None
            return "alive", f"{proc.create_time():.3f}"
        except psutil.NoSuchProcess:
            return "gone", None
        except psutil.Error:
            return "unknown", None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return "gone", None
    except (PermissionError, OSError):
        return "alive", None
    return "alive", None


def _prefect_flow_run_id() -> str | None:
    """The current Prefect flow run, if this process runs one (Prefect is not imported for this)."""
    if "prefect" not in sys.modules:
        return None
    try:
        from prefect.runtime import flow_run

        return str(flow_run.id) if flow_run.id else None
    except Exception:  # noqa: BLE001
        return None


def owner_tags(flow_run_id: str | None = None) -> dict[str, str]:
    """The owner tags of this process: host, pid, pid start token, boot id and (given, or the current
    Prefect flow run) the flow run id."""
    pid = os.getpid()
    tags = {OWNER_HOST_TAG: socket.gethostname(), OWNER_PID_TAG: str(pid),
            OWNER_PID_START_TAG: probe_process(pid)[1], OWNER_BOOT_TAG: _boot_id(),
            OWNER_FLOW_RUN_TAG: flow_run_id or _prefect_flow_run_id()}
    return {k: v for k, v in tags.items() if v}


def owner_liveness(tags: Mapping[str, str]) -> tuple[bool | None, str]:
    """Judge the owner recorded in ``tags`` from this host: (True alive | False dead | None unknown, why).

    Same host (and boot): the pid exists with the recorded start token -> alive; the pid is gone, a zombie,
    or now another process (different start token) -> dead.  Same host name, other boot id -> the host was
    rebooted since: dead.  Another host or no owner tags -> unknown."""
    host, pid = tags.get(OWNER_HOST_TAG), tags.get(OWNER_PID_TAG)
    if not host or not pid or not pid.isdigit():
        return None, "no owner tags"
    if host != socket.gethostname():
        return None, f"owner runs on another host ({host})"
    boot, my_boot = tags.get(OWNER_BOOT_TAG), _boot_id()
    if boot and my_boot and boot != my_boot:
        return False, f"owner pid {pid} on {host} belonged to an earlier boot of this host"
    state, start = probe_process(int(pid))
    if state == "gone":
        return False, f"owner process {pid} on {host} no longer exists"
    recorded = tags.get(OWNER_PID_START_TAG)
    if state == "alive" and recorded and start and recorded != start:
        return False, f"owner process {pid} on {host} is gone (the pid now belongs to another process)"
    if state == "alive":
        return True, f"owner process {pid} on {host} is running"
    return None, f"cannot tell whether process {pid} on {host} is running"


# MLflow 3's UI opens an experiment on the view its kind names; without the tag it guesses (often GenAI)
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"
# the query that opens the runs (machine-learning) view whatever the browser last used
UI_RUNS_VIEW = "workflowType=machine_learning"


def _standard_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """MLflow's own tags for what our tags already say, so the UI's Source and Version columns fill in: the code
    (``git_commit`` -> ``mlflow.source.git.commit``) and the pipeline that ran (``distill.kind`` ->
    ``mlflow.source.name`` ``distill-<kind>``, type JOB). Tags set explicitly win."""
    out: dict[str, str] = {}
    commit = tags.get("git_commit")
    if commit and commit != "unknown" and "mlflow.source.git.commit" not in tags:
        out["mlflow.source.git.commit"] = commit
    if tags.get("distill.kind") and "mlflow.source.name" not in tags:
        out["mlflow.source.name"] = f"distill-{tags['distill.kind']}"
        out["mlflow.source.type"] = "JOB"
    return out


def _client_uri(uri: str) -> tuple[str, list[str]]:
    """(URI handed to MLflow, secrets to redact).  ``http(s)://user:pw@host`` -> ``http(s)://host`` with the
    credentials put into ``MLFLOW_TRACKING_USERNAME`` / ``_PASSWORD`` (only where those are not set).
    Database URIs keep their credentials (SQLAlchemy needs them there); they are only redacted on display."""
    try:
        parts = urlsplit(uri)
        username, password = parts.username, parts.password
    except ValueError:
        return uri, []
    secrets = [s for s in (password, unquote(password or "")) if s]
    if parts.scheme.lower() not in ("http", "https") or "@" not in parts.netloc:
        return uri, secrets
    clean, _, _ = strip_userinfo(uri)
    given = {"MLFLOW_TRACKING_USERNAME": unquote(username) if username else None,
             "MLFLOW_TRACKING_PASSWORD": unquote(password) if password is not None else None}
    for var, value in given.items():
        if value is None:
            continue
        if var not in os.environ:
            os.environ[var] = value
        elif os.environ[var] != value:
            log.warning("%s is already set: the credentials in the tracking URI are not used", var)
    return clean, secrets


class Tracker:
    """One MLflow experiment on one tracking URI, driven through ``MlflowClient``."""

    retry_delay = 0.5  # first backoff of _with_retries (seconds), doubled per attempt

    def __init__(self, tracking_uri: str | None, experiment: str, artifact_location: str | None = None,
                 *, owner_flow_run_id: str | None = None):
        """``owner_flow_run_id``: recorded as the owner's flow run on every run this tracker starts or claims
        (default: the current Prefect flow run, if any).  ``tracking_uri`` is the URI handed to MLflow
        (userinfo of an http(s) URI removed); show :attr:`display_uri` instead."""
        uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise TrackingError("no MLflow tracking URI: pass tracking_uri or set MLFLOW_TRACKING_URI")
        uri, self._secrets = _client_uri(uri)
        self.tracking_uri = uri
        self.display_uri: str = redact_url(uri)
        self.owner_flow_run_id = owner_flow_run_id
        self.experiment_name = experiment
        try:
            self.client = MlflowClient(tracking_uri=uri, registry_uri=uri)
            self.experiment_id = self._get_or_create_experiment(
                experiment, artifact_location or _default_artifact_location(uri, experiment)
            )
        except Exception as e:  # noqa: BLE001 - the cause may quote the URI: re-raised redacted, unchained
            raise TrackingError(
                f"cannot open MLflow experiment {experiment!r} on {self.display_uri}: {self._redact(e)}"
            ) from None

    def __repr__(self) -> str:
        return f"Tracker({self.display_uri!r}, experiment={self.experiment_name!r})"

    def _redact(self, error: BaseException | str) -> str:
        text = f"{type(error).__name__}: {error}" if isinstance(error, BaseException) else str(error)
        return redact_text(text, self._secrets)

    def _get_or_create_experiment(self, name: str, artifact_location: str | None) -> str:
        """The experiment's id, created when missing; tagged as a model-training experiment
        (:data:`EXPERIMENT_KIND_TAG`) so that MLflow 3's UI opens it on its runs view, not the GenAI one."""
        exp = self.client.get_experiment_by_name(name)
        if exp is None:
            try:
                return self.client.create_experiment(name, artifact_location=artifact_location,
                                                     tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except MlflowException:  # created concurrently?
                exp = self.client.get_experiment_by_name(name)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            self.client.restore_experiment(exp.experiment_id)
        if EXPERIMENT_KIND_TAG not in exp.tags:  # made before the tag existed, or by someone else
            self.client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
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
                self.claim_run(existing, tags)
                self.log_params(existing, params or {})
                return existing
        tags.update(owner_tags(self.owner_flow_run_id))
        tags.update(_standard_tags(tags))
        run = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name)  # not retried: no duplicates
        run_id = run.info.run_id
        if params:
            self.log_params(run_id, params)
        return run_id

    def start_parent(self, run_name: str, params: Mapping[str, Any] | None = None,
                     tags: Mapping[str, Any] | None = None, reuse_tag: str | None = None) -> str:
        """Create a top-level run owned by this process (owner tags); with ``reuse_tag`` an existing run
        carrying the same value for that tag (e.g. a retried Prefect flow run) is reopened and claimed instead."""
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
        """Terminate ``run_id`` with ``status`` (FINISHED, FAILED or KILLED); transient errors are retried."""
        RunStatus.from_string(status)  # validates
        self._with_retries(self.client.set_terminated, run_id, status=status)

    def claim_run(self, run_id: str, tags: Mapping[str, Any] | None = None) -> None:
        """Make this process the owner of ``run_id`` (owner tags, plus ``tags``) and set it RUNNING again if
        it was terminated (e.g. a retried stage reopening its run, possibly marked KILLED meanwhile)."""
        self.set_tags(run_id, {**_str_tags(tags), **owner_tags(self.owner_flow_run_id)})
        if self._with_retries(self.client.get_run, run_id).info.status != "RUNNING":
            self._with_retries(self.client.update_run, run_id, status="RUNNING")

    @contextmanager
    def run_scope(self, run_id: str, *, claim: bool = True) -> Iterator[str]:
        """``with tracker.run_scope(run_id):`` ends the run FINISHED when the block completes, FAILED when it
        raises an ``Exception`` (tag ``distill.error``: its redacted type and message) and KILLED on any
        other ``BaseException`` (KeyboardInterrupt, SystemExit, asyncio.CancelledError, Prefect's
        TerminationSignal, GeneratorExit); the exception is re-raised.  Ending retries transient tracking
        errors; a failure to end the run after an exception is logged and never hides that exception.
        With ``claim`` (default) the run is first claimed (:meth:`claim_run`).  Yields ``run_id``."""
        if claim:
            self.claim_run(run_id)
        try:
            yield run_id
        except Exception as e:
            self._end_quietly(run_id, "FAILED", {ERROR_TAG: _truncate(self._redact(e), 1000)})
            raise
        except BaseException as e:
            self._end_quietly(run_id, "KILLED", {ERROR_TAG: _truncate(self._redact(e), 1000)})
            raise
        try:
            self.end_run(run_id, "FINISHED")
        except Exception as e:  # noqa: BLE001
            raise TrackingError(f"cannot end MLflow run {run_id} FINISHED: {self._redact(e)}") from None

    def _end_quietly(self, run_id: str, status: str, tags: Mapping[str, str]) -> None:
        for action in (lambda: self.set_tags(run_id, tags), lambda: self.end_run(run_id, status)):
            try:
                action()
            except Exception as err:  # noqa: BLE001 - never mask the exception that ended the block
                log.warning("could not end MLflow run %s as %s: %s", run_id, status, self._redact(err))

    def end_dead_runs(self, tag_key: str, tag_value: str,
                      is_alive: Callable[[Any], bool | None] | None = None) -> list[str]:
        """Set KILLED every RUNNING run of this experiment tagged ``tag_key=tag_value`` whose owner is dead;
        returns their ids.  Liveness: :func:`owner_liveness` (same host: the recorded pid still running with
        the recorded start time -> alive, gone or recycled -> dead); where that cannot tell (another host, no
        owner tags) ``is_alive(run)`` (an ``mlflow.entities.Run``) decides: False -> dead, True/None (or an
        error) -> left alone.  A killed run gets ``distill.killed_by`` (this host:pid) and
        ``distill.killed_reason`` tags.  Runs re-claimed meanwhile by a live process are left alone."""
        killed: list[str] = []
        for run in self._search_all_runs(
                f"tags.`{tag_key}` = {_quote(str(tag_value))} and attributes.status = 'RUNNING'"):
            alive, reason = owner_liveness(run.data.tags)
            if alive is None and is_alive is not None:
                try:
                    verdict = is_alive(run)
                except Exception as e:  # noqa: BLE001
                    log.warning("is_alive failed for run %s (left alone): %s", run.info.run_id, self._redact(e))
                    verdict = None
                if verdict is not None:
                    alive = bool(verdict)
                    reason = f"{reason}; is_alive callback: owner {'alive' if alive else 'not alive'}"
            if alive is False and self._kill_if_unchanged(run, reason):
                killed.append(run.info.run_id)
            elif alive is None:
                log.info("run %s left RUNNING: %s", run.info.run_id, reason)
        return killed

    def _search_all_runs(self, filter_string: str) -> list:
        runs, token = [], None
        while True:
            page = self._with_retries(self.client.search_runs, [self.experiment_id], filter_string=filter_string,
                                      order_by=["attributes.start_time ASC"], page_token=token)
            runs.extend(page)
            token = page.token
            if not token:
                return runs

    def _kill_if_unchanged(self, run, reason: str) -> bool:
        """KILL ``run`` unless it was terminated or re-claimed (owner tags changed) since it was read."""
        keys = (OWNER_HOST_TAG, OWNER_PID_TAG, OWNER_PID_START_TAG)
        now = self._with_retries(self.client.get_run, run.info.run_id)
        if now.info.status != "RUNNING" or any(now.data.tags.get(k) != run.data.tags.get(k) for k in keys):
            return False
        me = owner_tags()
        self.set_tags(run.info.run_id, {KILLED_BY_TAG: f"{me[OWNER_HOST_TAG]}:{me[OWNER_PID_TAG]}",
                                        KILLED_REASON_TAG: reason})
        self.end_run(run.info.run_id, "KILLED")
        log.warning("MLflow run %s set KILLED: %s", run.info.run_id, reason)
        return True

    # -- logging ---------------------------------------------------------------------
    def log_dataset(self, run_id: str, *, name: str, digest: str, source: str, context: str = "training",
                    profile: Mapping[str, Any] | None = None) -> None:
        """Record the data snapshot a run used as an MLflow dataset input (the UI's Dataset column and the run's
        Datasets panel): ``digest`` is the snapshot's manifest sha256 (MLflow keeps the first 36 characters; the
        whole one is in the profile), ``source`` its store URI, ``context`` e.g. training or evaluation."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        full = {"manifest_sha256": digest, **(profile or {})}
        dataset = Dataset(name=name, digest=digest[:36], source_type="distill-store",
                          source=json.dumps({"uri": source}), profile=json.dumps(full, default=str))
        tags = [InputTag(key="mlflow.data.context", value=context)]
        self._with_retries(self.client.log_inputs, run_id, datasets=[DatasetInput(dataset, tags)])

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

    def _with_retries(self, fn: Callable[..., Any], *args: Any, attempts: int = 4, **kwargs: Any) -> Any:
        """Transient tracking errors (e.g. SQLite "database is locked" under concurrent stages) are retried
        with exponential backoff from :attr:`retry_delay`; errors no retry can fix (an unknown run, an invalid
        value, no permission) and the last failure are raised."""
        for attempt in range(attempts):
            try:
                return fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001
                if attempt == attempts - 1 or getattr(e, "error_code", None) in _PERMANENT_ERRORS:
                    raise
                log.debug("transient tracking error (attempt %d/%d): %s", attempt + 1, attempts, self._redact(e))
                time.sleep(self.retry_delay * 2**attempt)

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
            self._with_retries(self.client.log_batch, run_id, tags=entries[i : i + PARAMS_PER_BATCH])

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
        *,
        model_name: str = MODEL_ARTIFACT_NAME,
        metadata: Mapping[str, Any] | None = None,
        description: str | None = None,
        model_description: str | None = None,
    ) -> dict[str, Any]:
        """Log ``model`` (pytorch flavour, torch.export "pt2", signature inferred from
        ``input_example``; a batch of 1 is doubled so the exported batch dimension stays
        dynamic; the model is put in eval mode for the export) as a LoggedModel ``model_name`` of ``run_id``
        (``metadata`` in its MLmodel file) and register it under ``registered_name`` with ``tags`` on the version
        (lineage) and ``description`` as the version's description (``model_description``: the registered model's,
        set when it has none).

        Idempotent per (registered_name, run_id): if such a version exists, nothing is logged again; tags it
        lacks are added (the ones it has are kept: its lineage is the run that made it) and it is returned with
        ``reused=True``.
        """
        tags = _str_tags(tags)
        reused = self._reuse_version(registered_name, run_id, tags, description)
        if reused is not None:
            return reused

        import mlflow.pytorch
        import numpy as np
        import torch

        run = self.client.get_run(run_id)
        # Create the LoggedModel ourselves: without an active run MLflow would put it in the
        # global / default experiment rather than the run's.
        logged = self.client.create_logged_model(
            experiment_id=run.info.experiment_id,
            name=model_name,
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
                    metadata=dict(metadata) if metadata else None,
                )
                info = self._register(registered_name, logged.model_id, run_id, tags, description, model_description)
        finally:
            model.train(was_training)
        log.info("registered %s version %s from run %s", registered_name, info["version"], run_id)
        return info

    def _register(self, registered_name: str, model_id: str, run_id: str, tags: Mapping[str, str],
                  description: str | None, model_description: str | None) -> dict[str, Any]:
        """A new version of ``registered_name`` (created when missing, with ``model_description``) from the
        LoggedModel ``model_id``."""
        self._ensure_registered_model(registered_name, model_description)
        version = self.client.create_model_version(
            name=registered_name, source=f"models:/{model_id}", run_id=run_id, tags=tags or None,
            model_id=model_id, description=description,
        )
        info = self._version_info(version, reused=False)
        info["logged_model_uri"] = f"models:/{model_id}"
        return info

    def log_model_folder(
        self,
        run_id: str,
        folder: str | os.PathLike,
        registered_name: str,
        tags: Mapping[str, Any] | None = None,
        *,
        flavor: HFFlavor = "transformers",
        task: str = "text-generation",
        model_name: str = MODEL_ARTIFACT_NAME,
        description: str | None = None,
        model_description: str | None = None,
    ) -> dict[str, Any]:
        """Log a Hugging Face model folder (``config.json``, safetensors weights, tokenizer files) as a
        LoggedModel of ``run_id`` and register it under ``registered_name`` with ``tags`` on the version.
        Idempotent per (registered_name, run_id) like :meth:`log_model`: an existing version is reused (tags it
        lacks added, ``reused=True``); returns the same dict as :meth:`log_model`; ``model_name``,
        ``description`` and ``model_description`` as there.  Nothing is downloaded
        (everything is read with ``local_files_only``) and nothing is pickled (weights stay safetensors).

        ``flavor="transformers"`` (default): MLflow's transformers flavour, ``task`` its pipeline task.  The
        folder's model (the task's auto class, e.g. ``AutoModelForCausalLM``, in its saved dtype) and tokenizer
        are loaded into memory and handed to ``mlflow.transformers.log_model`` as components, which saves them
        again with ``save_pretrained``: the model under ``model/``, the tokenizer under ``components/tokenizer/``,
        plus ``MLmodel`` (transformers and pyfunc flavours); a ``README.md`` becomes MLflow's model card, other
        files of the folder are not kept.  (MLflow 3.17 cannot log a local checkpoint *path* with transformers 5.x:
        ``transformers.pipelines.check_task`` now gives the pipeline class as a string and MLflow fails on
        ``.__name__``; hence the in-memory route.)  Load it with::

            import mlflow
            mlflow.set_tracking_uri(TRACKING_URI)
            parts = mlflow.transformers.load_model(f"models:/{name}/{version}", return_type="components")
            model, tokenizer = parts["model"], parts["tokenizer"]
            # or without the flavour (also for "files"):
            from pathlib import Path
            from transformers import AutoModelForCausalLM, AutoTokenizer
            local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}"))
            model = AutoModelForCausalLM.from_pretrained(local / "model")
            tok_dir = local / "components" / "tokenizer"  # "transformers"; with "files": local / "model"
            tokenizer = AutoTokenizer.from_pretrained(tok_dir if tok_dir.is_dir() else local / "model")

        ``flavor="files"``: the folder is copied as is (byte for byte) under ``model/`` of the LoggedModel,
        with an ``MLmodel`` file that records no loader flavour (metadata ``distill.format: hf-folder`` and
        ``task``); load it with ``from_pretrained(local / "model")`` as above.  Nothing is loaded into memory,
        so this suits any folder (e.g. a diffusers pipeline, with its own ``from_pretrained``)."""
        if flavor not in HF_FLAVORS:
            raise TrackingError(f"flavor must be one of {HF_FLAVORS}, not {flavor!r}")
        folder = Path(folder).expanduser().resolve()
        if not folder.is_dir():
            raise TrackingError(f"model folder {folder} does not exist")
        if flavor == "transformers" and not (folder / "config.json").is_file():
            raise TrackingError(f"{folder} has no config.json: not a transformers model folder (use flavor='files')")
        tags = _str_tags(tags)
        reused = self._reuse_version(registered_name, run_id, tags, description)
        if reused is not None:
            return reused

        components = self._load_hf_folder(folder, task) if flavor == "transformers" else None  # fails early
        run = self.client.get_run(run_id)
        logged = self.client.create_logged_model(
            experiment_id=run.info.experiment_id, name=model_name, source_run_id=run_id, tags=tags or None,
        )
        if components is not None:
            self._log_transformers_components(logged.model_id, run_id, components, task)
        else:
            self._log_files_folder(logged.model_id, run_id, folder, task)
        with _global_tracking_uri(self.tracking_uri):  # the registry store resolves the LoggedModel globally
            info = self._register(registered_name, logged.model_id, run_id, tags, description, model_description)
        log.info("registered %s version %s from run %s (%s folder %s)", registered_name, info["version"], run_id,
                 flavor, folder)
        return info

    def _reuse_version(self, registered_name: str, run_id: str, tags: Mapping[str, str],
                       description: str | None = None) -> dict[str, Any] | None:
        """The info of the version of ``registered_name`` already made from ``run_id``, or None. Tags it lacks
        are added and a missing description set; tags it has are never overwritten: a version's lineage
        (``prefect_flow_run_id``, ``git_commit``, ...) stays that of the run that trained it, however many later
        runs reuse it (they record the reuse on their own runs)."""
        existing = self.find_model_version(registered_name, run_id)
        if existing is None:
            return None
        for k, v in tags.items():
            if k not in existing.tags:
                self.client.set_model_version_tag(registered_name, existing.version, k, v)
        if description and not existing.description:
            self.client.update_model_version(registered_name, existing.version, description=description)
        return self._version_info(existing, reused=True)

    @staticmethod
    def _load_hf_folder(folder: Path, task: str) -> dict[str, Any]:
        """The components (model of ``task``'s auto class, tokenizer, model card) of ``folder``, from disk only."""
        from transformers import AutoTokenizer, pipelines

        try:
            auto_class = pipelines.check_task(task)[1]["pt"][0]
        except (KeyError, IndexError, TypeError) as e:
            raise TrackingError(f"transformers task {task!r} has no model class: {e}") from None
        try:
            model = auto_class.from_pretrained(str(folder), local_files_only=True, dtype="auto")
            tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise TrackingError(f"cannot load the model and tokenizer of {folder} for task {task!r} "
                                f"(use flavor='files' to log the folder as is): {e}") from None
        model.eval()
        card = None
        if (folder / "README.md").is_file():  # else MLflow looks the card up on the Hub (by the local path:
            try:                              # rejected as a repo id before any request)
                from huggingface_hub import ModelCard

                card = ModelCard.load(folder / "README.md")
            except Exception as e:  # noqa: BLE001
                log.debug("README.md of %s is no model card: %s", folder, e)
        return {"model": model, "tokenizer": tokenizer, "card": card}

    def _log_transformers_components(self, model_id: str, run_id: str, components: Mapping[str, Any],
                                     task: str) -> None:
        """``mlflow.transformers.log_model`` into the LoggedModel ``model_id`` (which it marks READY, or FAILED
        when it raises)."""
        import mlflow.transformers
        import torch
        import transformers

        requirements = [
            f"mlflow=={mlflow.__version__}",
            f"torch=={torch.__version__.split('+')[0]}",
            f"transformers=={transformers.__version__}",
        ]
        with _global_tracking_uri(self.tracking_uri):
            mlflow.transformers.log_model(
                {"model": components["model"], "tokenizer": components["tokenizer"]},
                name=MODEL_ARTIFACT_NAME,
                task=task,
                model_card=components["card"],
                model_id=model_id,
                run_id=run_id,
                pip_requirements=requirements,  # explicit: no requirement inference (it loads the model again)
            )

    def _log_files_folder(self, model_id: str, run_id: str, folder: Path, task: str) -> None:
        import tempfile

        from mlflow.entities import LoggedModelOutput, LoggedModelStatus
        from mlflow.models import Model

        try:
            self._with_retries(self.client.log_outputs, run_id, [LoggedModelOutput(model_id, step=0)])
            self.client.log_model_artifacts(model_id, str(folder), MODEL_ARTIFACT_NAME)
            with tempfile.TemporaryDirectory() as tmp:
                meta = Model(run_id=run_id, model_uuid=model_id, model_id=model_id,
                             metadata={"distill.format": "hf-folder", "task": task, "path": MODEL_ARTIFACT_NAME})
                meta.save(os.path.join(tmp, "MLmodel"))
                self.client.log_model_artifacts(model_id, tmp)
        except BaseException:
            try:
                self.client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
            except Exception as e:  # noqa: BLE001 - never mask the cause
                log.warning("could not mark LoggedModel %s FAILED: %s", model_id, self._redact(e))
            raise
        self._with_retries(self.client.finalize_logged_model, model_id, LoggedModelStatus.READY)

    def _ensure_registered_model(self, name: str, description: str | None = None) -> None:
        """Create registered model ``name`` (with ``description``) unless it exists; an existing one without a
        description gets ``description``."""
        try:
            self.client.create_registered_model(name, description=description)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
            if description and not self.client.get_registered_model(name).description:
                self.client.update_registered_model(name, description=description)

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
        candidate: float,
        baseline: float,
        margin: float,
        *,
        metric: str = VAL_ACC_TAG,
        direction: Direction = "max",
        lock: PromotionLock | None = None,
        pending_ttl_s: float = PENDING_TTL_S,
        veto: str | None = None,
    ) -> dict[str, Any]:
        """Gate on ``metric`` (higher wins with ``direction="max"``, e.g. ``val_acc``; lower wins with
        ``"min"``, e.g. ``val_ppl`` or ``fid``): alias ``challenger`` -> version always; alias ``champion`` ->
        version iff the candidate passes ``threshold`` (max: ``candidate >= baseline + margin``; min:
        ``candidate <= baseline - margin``), beats the champion strictly (max: greater, min: lower than the
        champion's value, read from its version tag named ``metric``; no champion: nothing to beat) and no
        stronger candidate is being promoted concurrently.  The candidate's version gets the tag ``metric``
        (its value) where it has none.  A candidate, baseline or margin that is not a finite number (NaN, inf:
        a diverged run) never passes.  A champion without a usable ``metric`` tag (e.g. promoted on another
        metric) is never replaced automatically.  Re-running for the current champion is a no-op that reports
        ``promoted=True``.  Reasons name the metric and the comparison, e.g.
        ``"candidate val_ppl 41.2000 > baseline 40.0000 - margin 0.5000 = 39.5000"``.

        Returns ``promoted``, ``reason``, ``metric``, ``direction``, ``candidate_version``, ``candidate``,
        ``baseline``, ``margin``, ``threshold``, ``champion_version_before``, ``champion_before`` (its
        ``metric`` value, None when there was no champion or no usable tag) and ``champion_version_after``.

        Concurrency: ``lock`` serialises the promotions of ``name`` across processes: a context manager, or a
        callable returning one (e.g. ``functools.partial(store.lock, f"locks/promote/{name}")``); without one
        only the promotions of this process are serialised.  Everything from reading the champion to setting
        the aliases and the ``promotion.decision`` / ``promotion.reason`` tags happens while it is held.
        Before waiting for it, the candidate announces itself on its version (tag ``promotion.pending``: its
        metric, direction, value, its own threshold, time and owner); a candidate that would pass the gate but
        sees a stronger announced candidate (same metric and direction) that would pass its own gate and beat
        the champion is rejected in favour of that one (a tie goes to the lower version).  So however the lock
        orders candidates that overlap in time, exactly the strongest is promoted.  Announcements on another
        metric or direction cannot be compared and are ignored, as are those older than ``pending_ttl_s`` or of
        a dead owner (same-host check); the tag is removed once the candidate has decided.  ``veto``: a reason
        from a rule the caller checked (``gate: ci_lower``): the candidate gets the challenger alias and its tags
        but is not promoted, and announces nothing."""
        if direction not in DIRECTIONS:
            raise TrackingError(f"promotion direction must be one of {DIRECTIONS}, not {direction!r}")
        if not isinstance(metric, str) or not metric or metric != metric.strip():
            raise TrackingError(f"promotion metric must be a non-empty tag name, not {metric!r}")
        version = str(version)
        gate = _Gate(metric, direction, float(candidate), float(baseline), float(margin), veto)
        if veto is None:  # a vetoed candidate is no rival of anyone
            self._announce(name, version, gate)
        try:
            with self._promotion_lock(name, lock):
                try:
                    return self._promote_locked(name, version, gate, pending_ttl_s)
                finally:
                    self._withdraw(name, version)
        except BaseException:
            self._withdraw(name, version)  # the lock may never have been acquired
            raise

    def _promotion_lock(self, name: str, lock: PromotionLock | None) -> ContextManager[Any]:
        if lock is None:
            with _LOCAL_LOCKS_GUARD:
                return _LOCAL_LOCKS.setdefault((self.tracking_uri, name), threading.Lock())
        if hasattr(lock, "__enter__") and hasattr(lock, "__exit__"):
            return lock  # type: ignore[return-value]
        if callable(lock):
            cm = lock()
            if hasattr(cm, "__enter__") and hasattr(cm, "__exit__"):
                return cm
        raise TrackingError(f"promotion lock must be a context manager or a callable returning one, not {lock!r}")

    def _announce(self, name: str, version: str, gate: "_Gate") -> None:
        info: dict[str, Any] = {"metric": gate.metric, "direction": gate.direction, "value": gate.candidate,
                                "threshold": gate.threshold, "ts": time.time(), **owner_tags(self.owner_flow_run_id)}
        if (gate.metric, gate.direction) == (VAL_ACC_TAG, "max"):
            info["val_acc"] = gate.candidate  # also understood by the val_acc-only gate of earlier releases
        self._with_retries(self.client.set_model_version_tag, name, version, PROMOTION_PENDING_TAG, json.dumps(info))

    def _withdraw(self, name: str, version: str) -> None:
        try:
            self.client.delete_model_version_tag(name, version, PROMOTION_PENDING_TAG)
        except Exception as e:  # noqa: BLE001 - already gone; a leftover is ignored once stale or decided
            log.debug("could not remove %s from %s v%s: %s", PROMOTION_PENDING_TAG, name, version, self._redact(e))

    def _pending_rivals(self, name: str, version: str, gate: "_Gate", ttl: float) -> list[tuple[str, float, float]]:
        """(version, value, threshold) of the other candidates of ``name`` announced on the same metric and
        direction as ``gate`` and not yet decided.  An announcement without metric/direction (earlier
        releases) is a ``val_acc`` / ``max`` one."""
        rivals, token = [], None
        while True:
            page = self._with_retries(self.client.search_model_versions, f"name = {_quote(name)}", page_token=token)
            for mv in page:
                raw = (mv.tags or {}).get(PROMOTION_PENDING_TAG)
                if str(mv.version) == version or not raw:
                    continue
                try:
                    info = json.loads(raw)
                    metric, direction = str(info.get("metric", VAL_ACC_TAG)), str(info.get("direction", "max"))
                    value = float(info["value"] if "value" in info else info["val_acc"])
                    threshold, ts = float(info["threshold"]), float(info["ts"])
                except (ValueError, TypeError, KeyError, AttributeError):
                    continue
                if (metric, direction) != (gate.metric, gate.direction):
                    log.warning("%s v%s is being promoted on %s (%s), this candidate v%s on %s (%s): not compared",
                                name, mv.version, metric, direction, version, gate.metric, gate.direction)
                    continue
                if time.time() - ts > ttl or owner_liveness({k: str(v) for k, v in info.items()})[0] is False:
                    continue  # stale: its process is gone (or too old to trust)
                rivals.append((str(mv.version), value, threshold))
            token = page.token
            if not token:
                return rivals

    def _champion(self, name: str, metric: str) -> tuple[str | None, float | None]:
        """(version, value of its ``metric`` tag) of the champion; the value is None where the tag is missing
        or not a finite number; (None, None) without a champion."""
        champ = self._with_retries(self.get_alias, name, CHAMPION)
        if champ is None:
            return None, None
        try:
            value = float(champ.tags[metric])
        except (KeyError, ValueError, TypeError):
            return str(champ.version), None
        return str(champ.version), value if math.isfinite(value) else None

    def _promote_locked(self, name: str, version: str, gate: "_Gate", pending_ttl_s: float) -> dict[str, Any]:
        mv = self._with_retries(self.client.get_model_version, name, version)
        if gate.metric not in mv.tags:
            self._with_retries(self.client.set_model_version_tag, name, version, gate.metric, repr(gate.candidate))
        self._with_retries(self.client.set_registered_model_alias, name, CHALLENGER, version)

        champ_version, champ_value = self._champion(name, gate.metric)  # re-read inside the critical section
        rivals = self._pending_rivals(name, version, gate, pending_ttl_s)
        promoted, reason = gate.decide(version, champ_version, champ_value, rivals)
        if promoted and champ_version != version:
            self._with_retries(self.client.set_registered_model_alias, name, CHAMPION, version)
        self._with_retries(self.client.set_model_version_tag, name, version, PROMOTION_DECISION_TAG,
                           "promoted" if promoted else "rejected")
        self._with_retries(self.client.set_model_version_tag, name, version, PROMOTION_REASON_TAG,
                           _truncate(reason, MAX_TAG_VALUE))
        after, _ = self._champion(name, gate.metric)
        return {
            "promoted": promoted,
            "reason": reason,
            "metric": gate.metric,
            "direction": gate.direction,
            "candidate_version": version,
            "candidate": gate.candidate,
            "baseline": gate.baseline,
            "margin": gate.margin,
            "threshold": gate.threshold,
            "champion_version_before": champ_version,
            "champion_before": champ_value,
            "champion_version_after": after,
        }


def _version_key(version: str) -> int:
    try:
        return int(version)
    except ValueError:
        return sys.maxsize


def _f(value: float) -> str:
    return f"{value:.4f}"


@dataclass(frozen=True)
class _Gate:
    """The promotion gate of one candidate: ``metric`` compared in ``direction`` ("max": higher wins, "min":
    lower wins) against ``baseline`` with ``margin`` (>= 0 asks the candidate to be that much better)."""

    metric: str
    direction: Direction
    candidate: float
    baseline: float
    margin: float
    #: a reason from a rule the caller checked (e.g. the seeds' interval): the candidate is not promoted
    veto: str | None = None

    @property
    def threshold(self) -> float:
        return self.baseline + self.margin if self.direction == "max" else self.baseline - self.margin

    def passes(self, value: float, threshold: float) -> bool:
        """``value`` reaches ``threshold``."""
        return value >= threshold if self.direction == "max" else value <= threshold

    def better(self, a: float, b: float) -> bool:
        """``a`` is strictly better than ``b``."""
        return a > b if self.direction == "max" else a < b

    def decide(self, version: str, champ_version: str | None, champ_value: float | None,
               rivals: list[tuple[str, float, float]]) -> tuple[bool, str]:
        """(promoted, reason); ``rivals``: concurrently announced (version, value, threshold) on this metric."""
        if self.veto is not None:
            return False, self.veto
        m, c, thr = self.metric, self.candidate, self.threshold
        if champ_version == version:
            return True, f"version {version} is already the champion"
        if not all(math.isfinite(x) for x in (c, self.baseline, self.margin)):
            return False, (f"candidate {m} {_f(c)}, baseline {_f(self.baseline)}, margin {_f(self.margin)}: "
                           "not all finite numbers; not promoted")
        if not self.passes(c, thr):
            op, sign = ("<", "+") if self.direction == "max" else (">", "-")
            return False, (f"candidate {m} {_f(c)} {op} baseline {_f(self.baseline)} {sign} margin {_f(self.margin)}"
                           f" = {_f(thr)}")
        if champ_version is not None and champ_value is None:
            return False, f"champion version {champ_version} has no usable {m!r} tag; not replaced automatically"
        if champ_version is not None and not self.better(c, champ_value):
            return False, f"candidate {m} {_f(c)} does not beat champion v{champ_version} ({m} {_f(champ_value)})"

        def stronger(rival: tuple[str, float, float]) -> bool:
            v, value, rival_thr = rival
            # its own gate, on this champion
            would_win = self.passes(value, rival_thr) and (champ_version is None or self.better(value, champ_value))
            return would_win and (self.better(value, c) or (value == c and _version_key(v) < _version_key(version)))

        stronger_rivals = [r for r in rivals if math.isfinite(r[1]) and stronger(r)]
        if stronger_rivals:
            sign = 1.0 if self.direction == "max" else -1.0
            v, value, _ = max(stronger_rivals, key=lambda r: (sign * r[1], -_version_key(r[0])))
            return False, (f"candidate {m} {_f(c)} passes the gate, but version {v} ({m} {_f(value)}), "
                           "promoted concurrently, is stronger")
        op, sign = (">=", "+") if self.direction == "max" else ("<=", "-")
        return True, (f"candidate {m} {_f(c)} {op} baseline {_f(self.baseline)} {sign} margin {_f(self.margin)}"
                      f" = {_f(thr)}"
                      + (f" and beats champion v{champ_version} ({m} {_f(champ_value)})" if champ_version is not None
                         else "; no previous champion"))
