"""``distill-train``: one training stage (train, then evaluate on the test split).

The ``distill-cifar`` flow calls it in-process, or dispatches it to a GPU work pool through the deployment
``distill-train/<pool>``. Its result also lands in the store (``<out_prefix>/result.json``) so the caller can
read it from any machine.
"""

from __future__ import annotations

import os
import socket

from prefect import flow
from prefect.runtime import flow_run

from tasks.lab import TrainJob, evaluate_stage, train_stage
from tasks.storage import open_store


@flow(name="distill-train", log_prints=True, flow_run_name="{job.name}")
def distill_train(job: TrainJob) -> dict:
    trained = train_stage(job)
    metrics = evaluate_stage(job, trained)
    result = {
        **trained,
        "test": metrics,
        "out_prefix": job.out_prefix,
        "data_key": job.data_key,
        "executed_by": {"host": socket.gethostname(), "flow_run_id": str(flow_run.id or ""), "pool": _pool(),
                        "worker": os.environ.get("DISTILL_WORKER_NAME")},
    }
    open_store(job.store_url).put_json(result, f"{job.out_prefix}/result.json")
    return result


def _pool() -> str | None:
    try:
        from prefect.context import get_run_context

        fr = get_run_context().flow_run
        return fr.work_pool_name
    except Exception:
        return None
