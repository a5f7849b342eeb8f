"""Real servers for tests, bound to 127.0.0.1: a moto S3 stand-in and an MLflow server.

Plain helpers (pytest fixtures wrap them in tests/conftest.py). Every process is
started from this interpreter's venv and stopped (terminate, then kill) on exit.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator, Mapping

VENV_BIN = Path(sys.executable).parent
HOST = "127.0.0.1"

TEST_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _no_proxy_env(env: Mapping[str, str]) -> dict[str, str]:
    env = dict(env)
    for var in ("NO_PROXY", "no_proxy"):
        items = [x for x in env.get(var, "").split(",") if x]
        for host in ("127.0.0.1", "localhost"):
            if host not in items:
                items.append(host)
        env[var] = ",".join(items)
    return env


# urllib without proxies: never route 127.0.0.1 through an HTTP(S)_PROXY
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until ``url`` answers with a status below 500 (or raise TimeoutError /
    RuntimeError if ``proc`` exits first)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server process exited with code {proc.returncode} before {url} answered")
        try:
            with _OPENER.open(url, timeout=2) as resp:
                if resp.status < 500:
                    return
                last = resp.status
        except urllib.error.HTTPError as e:
            if e.code < 500:
                return
            last = e.code
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            last = e
        time.sleep(0.1)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s (last: {last!r})")


def _stop(proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """SIGTERM the process group we started, then SIGKILL it after ``timeout``."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
    else:
        # the leader is gone; make sure no child of its group survives
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@contextmanager
def _logfiles(workdir: Path | None, name: str) -> Iterator[tuple[Path, object, object]]:
    if workdir is None:
        tmp = tempfile.TemporaryDirectory(prefix=f"{name}-")
        base = Path(tmp.name)
    else:
        tmp = None
        base = Path(workdir)
        base.mkdir(parents=True, exist_ok=True)
    out = open(base / f"{name}.stdout.log", "ab")
    err = open(base / f"{name}.stderr.log", "ab")
    try:
        yield base, out, err
    finally:
        out.close()
        err.close()
        if tmp is not None:
            tmp.cleanup()


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_bytes()[-n:].decode("utf-8", "replace")
    except OSError:
        return ""


@contextmanager
def moto_server(workdir: Path | None = None, attempts: int = 3) -> Iterator[SimpleNamespace]:
    """``moto_server -H 127.0.0.1 -p PORT``; yields ``endpoint``, ``env`` (AWS_* for boto3) and ``proc``.

    Objects live in the server's memory: everything is gone once it stops."""
    exe = VENV_BIN / "moto_server"
    with _logfiles(workdir, "moto") as (base, out, err):
        proc = None
        for attempt in range(attempts):
            port = free_port()
            endpoint = f"http://{HOST}:{port}"
            proc = subprocess.Popen(
                [str(exe), "-H", HOST, "-p", str(port)],
                stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                env=_no_proxy_env({**os.environ, **TEST_AWS_ENV}),
                start_new_session=True,
            )
            try:
                wait_http(f"{endpoint}/moto-api/", timeout=30, proc=proc)
                break
            except (RuntimeError, TimeoutError):
                _stop(proc)
                if attempt == attempts - 1:
                    raise RuntimeError(f"moto_server did not start:\n{_tail(base / 'moto.stderr.log')}") from None
        env = {"AWS_ENDPOINT_URL": endpoint, **TEST_AWS_ENV}
        try:
            yield SimpleNamespace(endpoint=endpoint, env=env, proc=proc, port=port)
        finally:
            _stop(proc)


@contextmanager
def mlflow_server(workdir: Path, artifacts_destination: str, env: Mapping[str, str],
                  timeout: float = 90.0) -> Iterator[SimpleNamespace]:
    """``mlflow server`` on sqlite (``workdir/mlflow.db``) with proxied artifacts at
    ``artifacts_destination`` (e.g. ``s3://bucket/mlflow``); ``env`` carries the AWS_*
    variables (as yielded by :func:`moto_server`).  Yields ``url`` and ``proc``."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://{HOST}:{port}"
    full_env = {**os.environ, **env}
    full_env.update(
        MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",
        MLFLOW_DISABLE_TELEMETRY="true",
        PYTHONUNBUFFERED="1",
    )
    endpoint = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
    if endpoint:
        full_env["MLFLOW_S3_ENDPOINT_URL"] = endpoint
    full_env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [
        str(VENV_BIN / "mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{workdir.resolve().as_posix()}/mlflow.db",
        "--artifacts-destination", artifacts_destination,
        "--host", HOST, "--port", str(port),
        "--workers", "1",
    ]
    with _logfiles(workdir, "mlflow-server") as (base, out, err):
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=workdir,
            env=_no_proxy_env(full_env), start_new_session=True,
        )
        try:
            try:
                wait_http(f"{url}/health", timeout=timeout, proc=proc)
            except (RuntimeError, TimeoutError) as e:
                raise RuntimeError(f"mlflow server did not start: {e}\n{_tail(base / 'mlflow-server.stderr.log')}") from None
            yield SimpleNamespace(url=url, proc=proc, port=port, workdir=workdir)
        finally:
            _stop(proc, timeout=15)


def prefect_env(home: Path, api: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Prefect client/worker talking to ``api`` (no inherited PREFECT_* settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=api,
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_CLI_PROMPT="false",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra or {})
    return _no_proxy_env(env)


@contextmanager
def prefect_server(workdir: Path, timeout: float = 120.0) -> Iterator[SimpleNamespace]:
    """``prefect server start`` (SQLite in ``workdir/home``); yields ``api``, ``env`` (for clients), ``proc``."""
    workdir = Path(workdir)
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://{HOST}:{port}/api"
    env = prefect_env(home, api)
    with _logfiles(workdir, "prefect-server") as (base, out, err):
        proc = subprocess.Popen(
            [str(VENV_BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port)],
            stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=workdir, start_new_session=True,
        )
        try:
            try:
                wait_http(f"{api}/health", timeout=timeout, proc=proc)
            except (RuntimeError, TimeoutError) as e:
                raise RuntimeError(f"prefect server did not start: {e}\n{_tail(base / 'prefect-server.stderr.log')}") from None
            yield SimpleNamespace(api=api, env=env, base=workdir, proc=proc, home=home)
        finally:
            _stop(proc, timeout=15)


@contextmanager
def prefect_worker(pool: str, env: Mapping[str, str], workdir: Path, cwd: Path) -> Iterator[SimpleNamespace]:
    """A process worker polling ``pool``; stopped (with the flow runs it started) on exit."""
    workdir = Path(workdir)
    with _logfiles(workdir, f"worker-{pool}") as (base, out, err):
        proc = subprocess.Popen(
            [str(VENV_BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process", "--name", f"worker-{pool}"],
            stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=dict(env), cwd=cwd, start_new_session=True,
        )
        try:
            yield SimpleNamespace(proc=proc, log=base / f"worker-{pool}.stderr.log", stdout=base / f"worker-{pool}.stdout.log")
        finally:
            _stop(proc, timeout=20)
