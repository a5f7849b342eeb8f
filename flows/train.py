"""``distill-train``: one training stage (train, then evaluate on the test split).

The ``distill-cifar`` flow calls it in-process, or dispatches it to a GPU work pool through the deployment
``distill-train/<pool>``. The stage's store prefix is content-addressed (``stages/<key>``, see tasks/lab.py):
one process at a time works on it (a lease lock in the store); a completed stage whose model verifies is
returned as it is; otherwise training resumes from the newest verified checkpoint in the store. The result
also lands in the store (``<out_prefix>/result.json``) so the caller can read it from any machine.
"""

from __future__ import annotations

import os
import socket
from contextlib import ExitStack, nullcontext

from prefect import flow
from prefect.runtime import flow_run

from tasks.lab import (
    STAGE_LOCK_TTL, TrainJob, drop_checkpoints, evaluate_stage, group_result, stage_result, start_stage_run,
    train_group_stage, train_stage,
)
from tasks.storage import open_store
from tasks.tracking import Tracker

STAGE_LOCK_TIMEOUT = float(os.environ.get("DISTILL_STAGE_LOCK_TIMEOUT", 6 * 3600))


@flow(name="distill-train", log_prints=True, flow_run_name="{job.name}")
def distill_train(job: TrainJob) -> dict:
    threads = _set_threads(job)
    if job.members:
        return _group(job, threads)
    store = open_store(job.store_url)
    with store.lock(f"locks/{job.out_prefix}", ttl=STAGE_LOCK_TTL, timeout=STAGE_LOCK_TIMEOUT):
        done = stage_result(store, job.out_prefix)
        if done is not None:
            print(f"{job.name}: completed earlier ({store.uri(job.out_prefix)}); reused")
            return {**done, "reused": True}
        fr_id = str(flow_run.id) if flow_run.id else None
        tracker = Tracker(job.tracking_uri, job.experiment) if job.tracking_uri else None
        run_id = start_stage_run(job, tracker, fr_id, store) if tracker else None
        with (tracker.run_scope(run_id) if tracker else nullcontext()):
            trained = train_stage.with_options(task_run_name=_run_name("train", job.name))(job, run_id)
            metrics = evaluate_stage.with_options(task_run_name=_run_name("evaluate", job.name))(job, trained)
            result = {
                **trained,
                "test": metrics,
                "out_prefix": job.out_prefix,
                "data_key": job.data_key,
                "reused": False,
                "executed_by": _executed_by(fr_id, threads),
            }
            store.put_json(result, f"{job.out_prefix}/result.json")  # last: the stage is complete
        drop_checkpoints(store, job)
        key = job.kind_and_config()[0].test_metric.key
        print(f"{job.name}: stage done ({job.role}); held-out {key} {metrics.get(key, float('nan')):.4f}")
    return result


def _group(job: TrainJob, threads: int) -> dict:
    """A lockstep group stage: one training of every member together, then each member evaluated as a stage of
    its own (``<prefix>/<name>``), each with its own nested MLflow run. result.json holds every member's result."""
    store = open_store(job.store_url)
    views = job.member_views()
    names = [v.name for v in views]
    with store.lock(f"locks/{job.out_prefix}", ttl=STAGE_LOCK_TTL, timeout=STAGE_LOCK_TIMEOUT):
        done = group_result(store, job)
        if done is not None:
            print(f"{job.name}: completed earlier ({store.uri(job.out_prefix)}); reused")
            return {**done, "reused": True}
        fr_id = str(flow_run.id) if flow_run.id else None
        tracker = Tracker(job.tracking_uri, job.experiment) if job.tracking_uri else None
        run_ids = {v.name: (start_stage_run(v, tracker, fr_id, store) if tracker else None) for v in views}
        with ExitStack() as scopes:
            for run_id in run_ids.values():
                if run_id:
                    scopes.enter_context(tracker.run_scope(run_id))
            trained = train_group_stage.with_options(task_run_name=_run_name("train", job.name))(job, run_ids)
            executed_by = _executed_by(fr_id, threads)
            members = {}
            for v in views:  # each member completes as the stage it would be alone (its own result.json)
                metrics = evaluate_stage.with_options(task_run_name=_run_name("evaluate", v.name))(v, trained[v.name])
                members[v.name] = {**trained[v.name], "test": metrics, "out_prefix": v.out_prefix,
                                   "data_key": job.data_key, "reused": False, "executed_by": executed_by}
                store.put_json(members[v.name], f"{v.out_prefix}/result.json")
            result = {"members": members, "out_prefix": job.out_prefix, "reused": False, "executed_by": executed_by}
            store.put_json(result, f"{job.out_prefix}/result.json")
        drop_checkpoints(store, job)
        key = job.kind_and_config()[0].test_metric.key
        print(f"{job.name}: group stage done ({len(views)} models); held-out {key}: " + ", ".join(
            f"{n} {members[n]['test'].get(key, float('nan')):.4f}" for n in names))
    return result


def _set_threads(job: TrainJob) -> int:
    """Torch threads of this stage: its share of this machine's cores among the ``job.concurrent`` stages that
    may run at once (on a process pool each is a process of its own; in-process, a thread of the flow's
    process), or ``$DISTILL_TORCH_THREADS``. Returns the count set."""
    import torch

    from distill.runtime import stage_threads, usable_cpus

    n = stage_threads(usable_cpus(), job.concurrent, os.environ.get("DISTILL_TORCH_THREADS"))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def _executed_by(flow_run_id: str | None, threads: int) -> dict:
    return {"host": socket.gethostname(), "flow_run_id": flow_run_id or "", "pool": _pool(),
            "worker": os.environ.get("DISTILL_WORKER_NAME"), "torch_threads": threads}


def _run_name(verb: str, stage: str):
    """A task run name ``<verb>-<stage>`` (``train-teacher``, ``evaluate-progressive-4``), given to Prefect as a
    callable: a string would go through ``str.format`` with the task's parameters."""
    name = f"{verb}-{stage}"
    return lambda: name


def _pool() -> str | None:
    try:
        from prefect.context import get_run_context

        fr = get_run_context().flow_run
        return fr.work_pool_name
    except Exception:
        return None
