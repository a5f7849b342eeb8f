"""Registration in MLflow (idempotent) and the promotion gate on the kind's selection metric, as Prefect tasks."""

from __future__ import annotations

import functools
from typing import Any, Callable

from prefect import task

from distill.kinds import get_kind

from .lab import _logger, fetch_dir
from .storage import Store, open_store
from .tracking import Tracker

ROLES = ("teacher", "baseline", "student")


def promotion_lock(store: Store, registered_name: str) -> Callable[[], Any]:
    """The cross-process promotion lock of one registered model: a factory for ``store.lock`` on
    ``locks/promote/<name>`` (a lease in the object store every pipeline process shares)."""
    return functools.partial(store.lock, f"locks/promote/{registered_name}")


def _tags(kind, role: str, r: dict, lineage: dict, versions: dict, uri: str) -> dict:
    sel, tm = kind.selection, kind.test_metric
    tags = {**lineage, "role": role, "distill.kind": kind.name, "store_uri": uri,
            "teacher_version": versions["teacher"]["version"] if role != "teacher" else "self"}
    for key, value in ((sel.key, r.get(sel.key)), (tm.key, r.get("test", {}).get(tm.key))):
        if isinstance(value, (int, float)):
            tags[key] = f"{value:.6f}"
    if role == "student":
        tags.update({f"kd.{k}": str(v) for k, v in (r.get("kd") or {}).items() if isinstance(v, (int, float, str))})
    return tags


@task(name="register-models", retries=1)
def register_models(
    kind_name: str,
    results: dict[str, dict],
    *,
    store_url: str,
    tracking_uri: str,
    experiment: str,
    data_key: str,
    lineage: dict[str, str],
    margin: float,
) -> dict:
    """Log teacher, baseline and student as registered models ``<experiment>-<role>`` with lineage tags (by the
    kind's ``extras["model_format"]``: ``pytorch``, the pytorch flavour with an input example; ``hf``, the
    Hugging Face folder; ``diffusers``, the pipeline folder as is, ``flavor="files"``), then run the
    promotion gate on the kind's selection metric in its direction under the store's promotion lock of the
    student model (:func:`promotion_lock`), so concurrent pipelines promote one at a time and the strongest
    concurrent candidate wins.

    Re-running it for the same runs creates no new versions (versions are keyed on the MLflow run)."""
    log = _logger()
    kind = get_kind(kind_name)
    store = open_store(store_url)
    tracker = Tracker(tracking_uri, experiment)
    data_dir = None  # fetched (and verified) only for a kind whose registration needs an input example
    versions: dict[str, dict] = {}
    for role in ROLES:
        r = results[role]
        model_dir = fetch_dir(store, r["model_prefix"], "models")
        tags = _tags(kind, role, r, lineage, versions, store.uri(r["model_prefix"]))
        name = f"{experiment}-{role}"
        fmt = kind.extras.get("model_format")
        if fmt == "hf":
            v = tracker.log_model_folder(r["mlflow_run_id"], model_dir, name, tags)
        elif fmt == "diffusers":  # a pipeline folder (model_index.json, unet/, scheduler/) logged byte for byte
            v = tracker.log_model_folder(r["mlflow_run_id"], model_dir, name, tags, flavor="files",
                                         task=kind.extras.get("model_task", "unconditional-image-generation"))
        else:
            data_dir = data_dir or fetch_dir(store, data_key, "data")
            example = kind.extras["input_example"](model_dir, data_dir)
            v = tracker.log_model(r["mlflow_run_id"], kind.load_model(model_dir), example, name, tags)
        versions[role] = v
        log.info("%s: %s version %s%s", role, v["name"], v["version"], " (already registered)" if v.get("reused") else "")
    student = f"{experiment}-student"
    sel = kind.selection
    decision = tracker.promote(
        student, versions["student"]["version"], results["student"][sel.key], results["baseline"][sel.key], margin,
        metric=sel.key, direction=sel.direction, lock=promotion_lock(store, student),
    )
    log.info("promotion gate: %s (%s)", "promoted" if decision["promoted"] else "not promoted", decision["reason"])
    return {"versions": versions, "promotion": decision}
