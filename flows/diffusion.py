"""``distill-diffusion``: diffusion step distillation -> teacher (a many-step sampler; reused when its key
matches) -> baseline, distilled students sampling in 1-4 steps (e.g. progressive-distillation rounds, each
learning from the previous round, and consistency students) as a pool of stages -> speed measured alone ->
MLflow registration (the diffusers pipeline folder) and promotion gate on the kind's selection metric -> report
with quality against sampling steps and image grids from the same noise for every model.

Run it with ``distill run diffusion --profile smoke`` (in-process, embedded default) or
``prefect deployment run distill-diffusion/local``. The stages are the diffusion kind's
(``distill.diffusion.kind``); the pipeline is the one every kind shares (``flows/pipeline.py``).
"""

from __future__ import annotations

from typing import Optional

from .params import params_model
from .pipeline import pipeline_flow
from .pipeline import run_local as _run_local

DiffusionPipelineParams = params_model("diffusion")
Params = DiffusionPipelineParams


distill_diffusion = pipeline_flow("diffusion", "distill_diffusion", __doc__.split("\n\n")[0])


def run_local(profile: str = "smoke", overrides: Optional[dict] = None, train_pool: Optional[str] = None,
              store_url: Optional[str] = None, tracking_uri: Optional[str] = None, fresh: bool = False,
              register_models: bool = True) -> dict:
    """Entry point of ``distill run diffusion``: the flow in-process (embedded default)."""
    return _run_local(distill_diffusion, DiffusionPipelineParams, profile=profile, overrides=overrides,
                      train_pool=train_pool, store_url=store_url, tracking_uri=tracking_uri, fresh=fresh,
                      register_models=register_models)
