"""Registration in MLflow (idempotent) and the promotion gate, as Prefect tasks."""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
from prefect import task

from distill.image import stages
from distill.image.data import load_prepared, normalize

from .lab import _logger, fetch_dir
from .storage import Store, open_store
from .tracking import Tracker


def input_example(data_dir) -> np.ndarray:
    x, _ = load_prepared(data_dir, verify=False)["test"]
    return normalize(x[:1]).numpy().astype(np.float32)


def promotion_lock(store: Store, registered_name: str) -> Callable[[], Any]:
    """The cross-process promotion lock of one registered model: a factory for ``store.lock`` on
    ``locks/promote/<name>`` (a lease in the object store every pipeline process shares)."""
    return functools.partial(store.lock, f"locks/promote/{registered_name}")


@task(name="register-models", retries=1)
def register_models(
    results: dict[str, dict],
    *,
    store_url: str,
    tracking_uri: str,
    experiment: str,
    data_key: str,
    lineage: dict[str, str],
    margin: float,
) -> dict:
    """Log teacher, baseline and student as registered models with lineage tags, then run the promotion gate
    under the store's promotion lock of the student model (:func:`promotion_lock`), so concurrent pipelines
    promote one at a time and the strongest concurrent candidate wins.

    Re-running it for the same runs creates no new versions (versions are keyed on the MLflow run)."""
    log = _logger()
    store = open_store(store_url)
    tracker = Tracker(tracking_uri, experiment)
    example = input_example(fetch_dir(store, data_key, "data"))
    versions: dict[str, dict] = {}
    for role in ("teacher", "baseline", "student"):
        r = results[role]
        model = stages.load_model(fetch_dir(store, r["model_prefix"], "models"))
        tags = {
            **lineage,
            "role": role,
            "val_acc": f"{r['val_acc']:.6f}",
            "test_accuracy": f"{r['test']['test_accuracy']:.6f}",
            "teacher_version": versions["teacher"]["version"] if role != "teacher" else "self",
            "store_uri": store.uri(r["model_prefix"]),
        }
        if role == "student" and r.get("kd"):
            tags.update({"kd.temperature": str(r["kd"]["temperature"]), "kd.alpha": str(r["kd"]["alpha"])})
        v = tracker.log_model(r["mlflow_run_id"], model, example, f"{experiment}-{role}", tags)
        versions[role] = v
        log.info("%s: %s version %s%s", role, v["name"], v["version"], " (already registered)" if v.get("reused") else "")
    student = f"{experiment}-student"
    decision = tracker.promote(
        student, versions["student"]["version"],
        candidate_val_acc=results["student"]["val_acc"], baseline_val_acc=results["baseline"]["val_acc"], margin=margin,
        lock=promotion_lock(store, student),
    )
    log.info("promotion gate: %s (%s)", "promoted" if decision["promoted"] else "not promoted", decision["reason"])
    return {"versions": versions, "promotion": decision}
