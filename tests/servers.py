"""Real servers for tests, bound to 127.0.0.1: a moto S3 stand-in, a PostgreSQL server, an MLflow server, a
Prefect server and its process workers.

Plain helpers (pytest fixtures wrap them in tests/conftest.py). Every process is
started from this interpreter's venv and stopped (terminate, then kill) on exit.
"""

from __future__ import annotations

import functools
import os
import shutil
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


def pg_bin(name: str) -> str | None:
    """A PostgreSQL program (``initdb``, ``pg_ctl``, ``psql``) on PATH or in Debian's /usr/lib/postgresql/*/bin."""
    found = shutil.which(name)
    if found:
        return found
    candidates = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"), key=lambda p: int(p.parts[-3])
                        if p.parts[-3].isdigit() else 0)
    return str(candidates[-1]) if candidates else None


PG_MISSING = ("PostgreSQL server binaries (initdb, pg_ctl, psql) not found: install them (Debian: apt-get install "
              "postgresql; .ci/run does) to run the end-to-end tests, whose MLflow and Prefect servers use PostgreSQL "
              "as in production")


@contextmanager
def postgres_server(databases: tuple[str, ...] = (), timeout: float = 90.0) -> Iterator[SimpleNamespace]:
    """A throw-away PostgreSQL cluster in a temporary folder listening on 127.0.0.1 only (password auth over TCP,
    as the compose service), with ``databases`` created. Run as the ``postgres`` user when this process is root
    (``initdb`` refuses root). Yields ``url(db, driver=None)`` (``postgresql[+driver]://user:pw@host:port/db``),
    ``port``, ``user``, ``password``; the cluster is stopped and deleted on exit."""
    initdb, pg_ctl, psql = pg_bin("initdb"), pg_bin("pg_ctl"), pg_bin("psql")
    if not (initdb and pg_ctl and psql):
        raise RuntimeError(PG_MISSING)
    as_user: list[str] = []
    owner = None
    if os.geteuid() == 0:
        import pwd

        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root and there is no 'postgres' user to run the PostgreSQL server as") from None
        as_user = ["runuser", "-u", "postgres", "--"]
    # in the system temp folder, not ``workdir``: the unix socket path has a length limit, and the postgres user
    # must be able to reach the folder (pytest's are private to root)
    base = Path(tempfile.mkdtemp(prefix="distill-pg-"))
    user, password = "distill", "pg-test-password"
    (base / "pw").write_text(password + "\n")
    if owner is not None:
        for path in (base, base / "pw"):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    data, port = base / "data", free_port()
    run = functools.partial(subprocess.run, capture_output=True, text=True)
    r = run([*as_user, initdb, "-D", str(data), "-U", user, f"--pwfile={base / 'pw'}", "-A", "scram-sha-256",
             "-E", "UTF8", "--no-sync"], timeout=120)
    if r.returncode != 0:
        raise RuntimeError(f"initdb failed: {r.stdout[-2000:]}{r.stderr[-2000:]}")
    started = False
    try:
        r = run([*as_user, pg_ctl, "-D", str(data), "-l", str(base / "pg.log"), "-w", "-t", str(int(timeout)),
                 "-o", f"-p {port} -k {base} -c listen_addresses={HOST} -c fsync=off -c max_connections=200",
                 "start"], timeout=timeout + 30)
        if r.returncode != 0:
            raise RuntimeError(f"PostgreSQL did not start: {r.stderr[-2000:]}\n{_tail(base / 'pg.log')}")
        started = True
        env = {**os.environ, "PGHOST": HOST, "PGPORT": str(port), "PGUSER": user, "PGPASSWORD": password}
        for db in databases:
            r = run([psql, "-d", "postgres", "-v", "ON_ERROR_STOP=1", "-c", f'CREATE DATABASE "{db}"'], env=env,
                    timeout=60)
            if r.returncode != 0:
                raise RuntimeError(f"creating database {db} failed: {r.stderr[-2000:]}")

        def url(db: str, driver: str | None = None) -> str:
            scheme = f"postgresql+{driver}" if driver else "postgresql"
            return f"{scheme}://{user}:{password}@{HOST}:{port}/{db}"

        yield SimpleNamespace(url=url, port=port, user=user, password=password, log=base / "pg.log")
    finally:
        if started:
            run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "-w", "stop"], timeout=60)
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def mlflow_server(workdir: Path, artifacts_destination: str, env: Mapping[str, str],
                  timeout: float = 90.0, backend_store_uri: str | None = None) -> Iterator[SimpleNamespace]:
    """``mlflow server`` on ``backend_store_uri`` (default sqlite ``workdir/mlflow.db``) with proxied artifacts
    at ``artifacts_destination`` (e.g. ``s3://bucket/mlflow``); ``env`` carries the AWS_*
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
        "--backend-store-uri", backend_store_uri or f"sqlite:///{workdir.resolve().as_posix()}/mlflow.db",
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
def prefect_server(workdir: Path, timeout: float = 120.0, database_url: str | None = None) -> Iterator[SimpleNamespace]:
    """``prefect server start`` on ``database_url`` (``postgresql+asyncpg://...``; default SQLite in
    ``workdir/home``); yields ``api``, ``env`` (for clients), ``proc``."""
    workdir = Path(workdir)
    home = workdir / "home"
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    api = f"http://{HOST}:{port}/api"
    env = prefect_env(home, api)
    with _logfiles(workdir, "prefect-server") as (base, out, err):
        proc = subprocess.Popen(
            [str(VENV_BIN / "prefect"), "server", "start", "--host", HOST, "--port", str(port)],
            stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=workdir, start_new_session=True,
            env={**env, **({"PREFECT_SERVER_DATABASE_CONNECTION_URL": database_url} if database_url else {})},
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
