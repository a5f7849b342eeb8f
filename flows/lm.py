"""``distill-lm``: tokenise the text with the teacher's tokenizer -> teacher (converted or copied, evaluated;
trained only if asked) -> the student's starting point (Minitron-style pruning of the teacher, or a smaller
config) -> baseline (hard labels), distilled student and the loss sweep (FKL, RKL, JSD, GKD lambda) as a pool
of stages -> speed measured alone -> MLflow registration and promotion gate on validation perplexity (lower
wins) -> report with perplexities, gap closed, agreement, samples and plots.

Run it with ``distill run lm --profile smoke`` (in-process, embedded default) or
``prefect deployment run distill-lm/local``. The stages are the LM kind's (``distill.lm.kind``); the pipeline
is the one every kind shares (``flows/pipeline.py``).
"""

from __future__ import annotations

from typing import Optional

from .params import params_model
from .pipeline import pipeline_flow
from .pipeline import run_local as _run_local

LMPipelineParams = params_model("lm")
Params = LMPipelineParams


distill_lm = pipeline_flow("lm", "distill_lm", __doc__.split("\n\n")[0])


def run_local(profile: str = "smoke", overrides: Optional[dict] = None, train_pool: Optional[str] = None,
              store_url: Optional[str] = None, tracking_uri: Optional[str] = None, fresh: bool = False,
              register_models: bool = True) -> dict:
    """Entry point of ``distill run lm``: the flow in-process (embedded default)."""
    return _run_local(distill_lm, LMPipelineParams, profile=profile, overrides=overrides, train_pool=train_pool,
                      store_url=store_url, tracking_uri=tracking_uri, fresh=fresh, register_models=register_models)
