"""Registration in MLflow (idempotent) and the promotion gate on the kind's selection metric, as Prefect tasks."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Optional

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


def _fmt(key: str, value: Any) -> str:
    if not isinstance(value, (int, float)):
        return "-"
    return f"{100 * value:.2f} %" if key.endswith(("acc", "accuracy")) else f"{value:.4g}"


def version_description(kind, role: str, r: dict, results: dict[str, dict], lineage: dict, versions: dict) -> str:
    """What a registered version is, in a sentence or three: the role and kind, its held-out figures, the data
    snapshot, its teacher and (for the student) the KD gain over the baseline trained alongside it."""
    tm, sel = kind.test_metric, kind.selection
    test = r.get("test") or {}
    parts = [f"{role} of distill-{kind.name} (stage {r.get('name') or role}): {tm.label} "
             f"{_fmt(tm.key, test.get(tm.key))}, {sel.label} {_fmt(sel.key, r.get(sel.key))}."]
    parts.append(f"Data snapshot {str(lineage.get('data_manifest_sha256', '?'))[:12]} (manifest sha256), "
                 f"code {str(lineage.get('git_commit', '?'))[:12]}.")
    if role != "teacher" and "teacher" in versions:
        parts.append(f"Teacher: {versions['teacher']['name']} version {versions['teacher']['version']}.")
    base = (results.get("baseline") or {}).get("test", {}).get(tm.key)
    if role == "student" and isinstance(base, (int, float)) and isinstance(test.get(tm.key), (int, float)):
        gain = tm.gain(test[tm.key], base)
        kd = ", ".join(f"{k}={v}" for k, v in (r.get("kd") or {}).items() if isinstance(v, (int, float, str)))
        parts.append(f"KD gain over the baseline: {gain:+.4g} ({tm.label}){f'; distillation {kd}' if kd else ''}.")
    return " ".join(parts)


def ci_lower_veto(evidence: Optional[dict], margin: float) -> Optional[str]:
    """With ``evidence`` of rule ``ci_lower`` (``metric``, ``n``, ``mean``, ``lo``, ``hi``: the paired per-seed
    gain of the student over the baseline on the selection metric), the reason the student may not be promoted:
    fewer than 2 seeds, or the interval's lower bound below ``margin``; None when the rule passes (the normal
    gate then decides) or another rule applies."""
    if not evidence or evidence.get("rule") != "ci_lower":
        return None
    n, lo, hi, metric = evidence.get("n") or 0, evidence.get("lo"), evidence.get("hi"), evidence.get("metric", "?")
    if n < 2 or not isinstance(lo, (int, float)) or not math.isfinite(lo):
        return f"ci_lower: the paired {metric} gain has no interval ({n} seed(s)); at least 2 seeds are needed"
    if lo < margin:
        return (f"ci_lower: the 95 % interval of the paired {metric} gain over {n} seeds is [{lo:.4f}, {hi:.4f}]; "
                f"its lower bound {lo:.4f} < margin {margin:.4f}")
    return None


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
    evidence: Optional[dict] = None,
    parent_run_id: Optional[str] = None,
) -> dict:
    """Log teacher, baseline and student as registered models ``<experiment>-<role>`` with lineage tags (by the
    kind's ``extras["model_format"]``: ``pytorch``, the pytorch flavour with an input example; ``hf``, the
    Hugging Face folder; ``diffusers``, the pipeline folder as is, ``flavor="files"``), then run the
    promotion gate on the kind's selection metric in its direction under the store's promotion lock of the
    student model (:func:`promotion_lock`), so concurrent pipelines promote one at a time and the strongest
    concurrent candidate wins.

    Re-running it for the same runs creates no new versions (versions are keyed on the MLflow run). A version
    made by an earlier flow run (a reused teacher) keeps that run's lineage tags; the reuse is recorded on this
    flow run's MLflow run ``parent_run_id`` (tags ``distill.reused_version.<role>``). LoggedModels are named by
    role; versions and registered models carry descriptions (:func:`version_description`)."""
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
        describe = {"model_name": role, "description": version_description(kind, role, r, results, lineage, versions),
                    "model_description": f"distill-{kind.name} {role} models ({kind.description}); registered by "
                                         f"the {experiment} pipeline, one version per training run."}
        if fmt == "hf":
            v = tracker.log_model_folder(r["mlflow_run_id"], model_dir, name, tags, **describe)
        elif fmt == "diffusers":  # a pipeline folder (model_index.json, unet/, scheduler/) logged byte for byte
            v = tracker.log_model_folder(r["mlflow_run_id"], model_dir, name, tags, flavor="files",
                                         task=kind.extras.get("model_task", "unconditional-image-generation"),
                                         **describe)
        else:  # the servable model (its preprocessing inside), an example of raw input, the consumer's metadata
            data_dir = data_dir or fetch_dir(store, data_key, "data")
            example = kind.extras["input_example"](model_dir, data_dir)
            model = kind.extras.get("serving_model", kind.load_model)(model_dir)
            metadata = kind.extras["model_metadata"](model_dir) if "model_metadata" in kind.extras else None
            v = tracker.log_model(r["mlflow_run_id"], model, example, name, tags, metadata=metadata, **describe)
        versions[role] = v
        if v.get("reused") and r.get("reused") and parent_run_id:  # not a retry re-registering this run's own
            tracker.set_tags(parent_run_id, {f"distill.reused_version.{role}": f"{v['name']}/{v['version']}"})
        log.info("%s: %s version %s%s", role, v["name"], v["version"], " (already registered)" if v.get("reused") else "")
    student = f"{experiment}-student"
    sel = kind.selection
    veto = ci_lower_veto(evidence, margin)
    decision = tracker.promote(
        student, versions["student"]["version"], results["student"][sel.key], results["baseline"][sel.key], margin,
        metric=sel.key, direction=sel.direction, lock=promotion_lock(store, student), veto=veto,
    )
    decision.update({"rule": (evidence or {}).get("rule", "mean"),
                     **({"evidence": evidence} if evidence else {})})
    log.info("promotion gate: %s (%s)", "promoted" if decision["promoted"] else "not promoted", decision["reason"])
    return {"versions": versions, "promotion": decision}
