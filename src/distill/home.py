"""The one place that resolves where things live by default: the project home (``$DISTILL_HOME``, default
``./.distill``), its work folder, the store URL and the MLflow tracking URI. Pure functions of the
environment (no Prefect, MLflow or boto3): the CLI, tasks/ and flows/ all call these."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

__all__ = ["DEFAULT_HOME", "home", "store_url", "tracking_uri", "work_dir"]

DEFAULT_HOME = ".distill"


def home() -> Path:
    """``$DISTILL_HOME`` or ``./.distill``, absolute."""
    return Path(os.environ.get("DISTILL_HOME") or DEFAULT_HOME).expanduser().resolve()


def work_dir(create: bool = True) -> Path:
    """Local work folder of stages and caches: ``$DISTILL_WORK_DIR`` or ``<home>/work``."""
    root = Path(os.environ.get("DISTILL_WORK_DIR") or home() / "work").expanduser().resolve()
    if create:
        root.mkdir(parents=True, exist_ok=True)
    return root


def store_url(url: Optional[str] = None) -> str:
    """The given URL, else ``$DISTILL_STORE_URL``, else ``file://<home>/store``; a plain path becomes a file URL."""
    url = url or os.environ.get("DISTILL_STORE_URL")
    if url:
        return url if "://" in url else Path(url).expanduser().resolve().as_uri()
    return (home() / "store").as_uri()


def tracking_uri(uri: Optional[str] = None) -> str:
    """The given URI, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///<home>/mlflow.db`` (artifacts beside it)."""
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    h = home()
    h.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{h.as_posix()}/mlflow.db"
