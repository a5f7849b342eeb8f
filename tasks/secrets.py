"""Redaction of credentials: the one place that decides what a URL looks like once it is logged, stored in
Prefect's database, written to ``summary.json`` or returned from a task.

Users may put ``user:password@`` into ``AWS_ENDPOINT_URL`` or an MLflow tracking URI; the pipeline keeps
working with the real value in its own process, but every copy that leaves it goes through
:func:`redact_url` / :func:`redact_text`.
"""

from __future__ import annotations

import os
import re
from typing import Any, Iterable
from urllib.parse import urlsplit, urlunsplit

REDACTED = "***"

# scheme://userinfo@host...  (userinfo = anything up to the last '@' before the first '/', '?' or '#')
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<userinfo>[^/?#\s@]+)@")
_SECRET_ENV = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "PREFECT_API_KEY",
)


def redact_url(url: str | None) -> str | None:
    """``http://user:pw@host:5000/x`` -> ``http://***@host:5000/x``; anything without userinfo unchanged."""
    if url is None:
        return None
    url = str(url)
    try:
        parts = urlsplit(url)
    except ValueError:
        return _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", url)
    if "@" not in parts.netloc:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit((parts.scheme, f"{REDACTED}@{host}", parts.path, parts.query, parts.fragment))


def strip_userinfo(url: str) -> tuple[str, str | None, str | None]:
    """(url without userinfo, username, password): for handing credentials to a client through its own
    variables (e.g. ``MLFLOW_TRACKING_USERNAME``) instead of the URL."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url, None, None
    host = parts.netloc.rsplit("@", 1)[1]
    clean = urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))
    return clean, parts.username, parts.password


def _env_secrets(extra: Iterable[str | None] = ()) -> list[str]:
    values = [os.environ.get(v) for v in _SECRET_ENV]
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "MLFLOW_S3_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        url = os.environ.get(var)
        if url:
            try:
                p = urlsplit(url)
                values += [p.password]
            except ValueError:
                pass
    values += list(extra)
    return sorted({v for v in values if v and len(v) >= 4}, key=len, reverse=True)


def redact_text(text: str, extra_secrets: Iterable[str | None] = ()) -> str:
    """Redact URL userinfo anywhere in ``text`` and every known secret value (from the environment and
    ``extra_secrets``)."""
    text = _URL_USERINFO.sub(lambda m: f"{m.group('scheme')}{REDACTED}@", str(text))
    for secret in _env_secrets(extra_secrets):
        text = text.replace(secret, REDACTED)
    return text


def redact(obj: Any) -> Any:
    """Deep copy of a JSON-like value with every string passed through :func:`redact_text`."""
    if isinstance(obj, str):
        return redact_text(obj)
    if isinstance(obj, dict):
        return {k: redact(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [redact(v) for v in obj]
    return obj
