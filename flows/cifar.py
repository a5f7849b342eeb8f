"""``distill-cifar``: prepare data -> teacher (reused when its key matches) -> baseline, student and the
temperature sweep as a pool of stages -> speed measured alone -> MLflow registration and promotion gate on
validation accuracy -> comparison report (Prefect artifact, MLflow artifacts, printed table).

Run it with ``distill run cifar --profile smoke`` (in-process, embedded default) or
``prefect deployment run distill-cifar/local``. The stages are the image kind's (``distill.image.kind``);
the pipeline is the one every kind shares (``flows/pipeline.py``).
"""

from __future__ import annotations

from typing import Optional

from .params import PipelineParams
from .pipeline import pipeline_flow
from .pipeline import run_local as _run_local

Params = PipelineParams


distill_cifar = pipeline_flow("cifar", "distill_cifar", __doc__.split("\n\n")[0])


def run_local(profile: str = "smoke", overrides: Optional[dict] = None, train_pool: Optional[str] = None,
              store_url: Optional[str] = None, tracking_uri: Optional[str] = None, fresh: bool = False,
              register_models: bool = True) -> dict:
    """Entry point of ``distill run cifar``: the flow in-process (embedded default)."""
    return _run_local(distill_cifar, PipelineParams, profile=profile, overrides=overrides, train_pool=train_pool,
                      store_url=store_url, tracking_uri=tracking_uri, fresh=fresh, register_models=register_models)
