"""An embedded Prefect server that dies with the process that started it.

``distill run cifar`` used to leave Prefect to spin up its own temporary ("ephemeral") server when
``PREFECT_API_URL`` was unset. That server is a plain subprocess: a SIGKILL of ``distill run`` left it
running for good. :func:`embedded_prefect_server` starts the server itself, under a small watchdog,
and guarantees that it goes away with its parent::

    with embedded_prefect_server(Path(".distill/prefect")) as api_url:
        distill_cifar(profile="smoke")  # talks to api_url

The process tree (verified with prefect 3.9.1)::

    distill run (parent)
      └─ watchdog       python -I -u flows/embedded.py --watchdog ...   new session, own process group
           └─ server    prefect server start --host 127.0.0.1 --port P  new session, own process group

``prefect server start`` (one worker, the default) is a single process: uvicorn, the API, the UI and
the background services (scheduler, late runs, docket tasks ...) all run in its threads; it starts no
child process. Only ``--workers N`` (N > 1) would add uvicorn worker processes; those stay in the
server's process group, which is what the watchdog kills, so they are covered too.

Why a watchdog, and not just ``prctl(PR_SET_PDEATHSIG)`` on the server:

* PDEATHSIG fires when the *thread* that forked the child exits, not the process. Entering this
  context manager in a short-lived thread would kill the server while the parent still runs. The
  watchdog's death signal (SIGUSR1) only makes it *check* ``os.getppid()``; it stops the server only
  when the parent process is really gone (after a thread exit ``getppid()`` still names the parent).
* PDEATHSIG only reaches the direct child. The watchdog kills the server's whole process group,
  so any descendants go too.
* ``preexec_fn`` is unsafe in a multi-threaded parent (Prefect runs threads). The parent starts the
  watchdog with ``start_new_session`` only; the watchdog sets its own PDEATHSIG after start and
  then re-checks ``getppid()`` (closing the race where the parent dies first). The watchdog is
  single-threaded, so it may use ``preexec_fn`` to give the server PDEATHSIG=SIGKILL: if the
  watchdog itself is SIGKILLed, the server dies at once.
* Portable fallback (macOS, other POSIX): the watchdog also polls ``os.getppid()`` every 0.25 s; a
  dead parent shows up as a changed ppid. Windows is not supported (no process groups / killpg).

What happens when the parent (``distill run``) gets ...

* **SIGKILL**: nothing runs in the parent. The kernel sends the watchdog SIGUSR1 (Linux PDEATHSIG;
  elsewhere the 0.25 s poll notices), the watchdog sends SIGTERM to the server's process group,
  waits up to ``grace`` seconds (default 10) and then sends SIGKILL to the group. The tree was gone
  0.4 s after the parent in the tests (1-2 s if the server is slow to shut down). The flow run stays "Running" in the server's database.
* **SIGTERM**: while a flow runs in the main thread, Prefect's engine turns SIGTERM into
  ``TerminationSignal``, reports the run as Crashed (the server is still up: it is in its own
  session), then re-sends SIGTERM to itself with the default action, so the process dies without
  running this context manager's exit code. Outside a flow run Python's default SIGTERM action kills
  the process at once. Either way the watchdog sees the parent die and stops the server as for SIGKILL.
* **Ctrl-C (SIGINT)**: the terminal signals only its foreground process group; the watchdog and the
  server are in their own sessions and do not get it. The parent gets ``KeyboardInterrupt``, Prefect
  marks the flow run Crashed/Cancelled through the still-running server, the exception leaves the
  ``with`` block and the server is stopped cleanly (SIGTERM, then SIGKILL after ``grace``). A second
  Ctrl-C during that stop only interrupts the parent's wait: the watchdog finishes the stop on its own.
* **normal exit or an exception** in the ``with`` block: Prefect's log and event workers are drained
  while the server is still up, then the server is stopped as for Ctrl-C.

Prefect settings: Prefect 3 reads its settings (``PREFECT_API_URL`` included) into a root settings
context when ``prefect`` is first imported. Setting ``os.environ["PREFECT_API_URL"]`` after
``import prefect`` is **not** honoured by ``get_client()`` / flows in this process (checked: it still
spun up an ephemeral server). So the context manager does both: it sets ``os.environ`` (for child
processes and for a ``prefect`` imported later) and enters
``prefect.settings.temporary_settings({PREFECT_API_URL: url})`` for this process (a contextvar, copied
into the threads Prefect's task runner uses). It also adds 127.0.0.1/localhost to ``NO_PROXY`` so
that an ``HTTP(S)_PROXY`` does not capture the local API. Everything is restored on exit.

When ``PREFECT_API_URL`` is already set (in the environment, or in Prefect's resolved settings:
profile, ``.env``), the context manager is a pass-through: it yields that URL and starts nothing.

Logs: server and watchdog output go to ``<home>/embedded-server.log`` (appended; rotated to ``.1``
above 5 MB). While a server runs its pids are in ``<home>/embedded-server.<parent pid>.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, Optional

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
LOG_NAME = "embedded-server.log"
_LOG_ROTATE_BYTES = 5 * 1024 * 1024
_POLL_S = 0.25
_WATCHDOG_TAG = "[embedded-watchdog]"

# urllib without proxies: never route 127.0.0.1 through an HTTP(S)_PROXY
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

_active: list["EmbeddedPrefectServer"] = []


class EmbeddedServerError(RuntimeError):
    """The embedded Prefect server did not start (the message holds the tail of its log)."""


# --------------------------------------------------------------------------------------------------
# Linux parent-death signal
# --------------------------------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _set_pdeathsig(sig: int) -> bool:
    """``prctl(PR_SET_PDEATHSIG, sig)`` for the calling process; False where unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except Exception:  # pragma: no cover - exotic libc
        return False


# --------------------------------------------------------------------------------------------------
# The watchdog (runs as ``python -I -u flows/embedded.py --watchdog ...``; stdlib only)
# --------------------------------------------------------------------------------------------------


def _killpg(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _watchdog_main(argv: list[str]) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="embedded-watchdog")
    ap.add_argument("--parent-pid", type=int, required=True)
    ap.add_argument("--grace", type=float, default=10.0)
    ap.add_argument("--state-file", required=True)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    args = ap.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    me = os.getpid()

    def say(msg: str) -> None:
        print(f"{_WATCHDOG_TAG} {time.strftime('%H:%M:%S')} pid {me}: {msg}", file=sys.stderr, flush=True)

    stop: list[str] = []

    def on_stop(signum, _frame):
        stop.append(signal.Signals(signum).name)

    for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(s, on_stop)
    # SIGUSR1 is our parent-death signal: it only wakes the loop, which then checks getppid()
    signal.signal(signal.SIGUSR1, lambda *_: None)
    _set_pdeathsig(signal.SIGUSR1)
    if os.getppid() != args.parent_pid:  # the parent died before prctl took effect
        say(f"parent {args.parent_pid} already gone; not starting the server")
        return 1
    if stop:
        return 1

    def server_preexec() -> None:  # runs in the forked server; the watchdog is single-threaded
        _set_pdeathsig(signal.SIGKILL)
        if os.getppid() != me:
            os.kill(os.getpid(), signal.SIGKILL)

    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=server_preexec,
                            close_fds=True)
    pgid = proc.pid  # start_new_session: the server leads its own session and process group
    state = Path(args.state_file)
    tmp = state.with_name(state.name + ".tmp")
    tmp.write_text(json.dumps({"parent_pid": args.parent_pid, "watchdog_pid": me, "server_pid": proc.pid,
                               "server_pgid": pgid, "cmd": cmd}))
    os.replace(tmp, state)
    say(f"started server pid {proc.pid} (pgid {pgid}) for parent {args.parent_pid}: {' '.join(cmd)}")

    def exited() -> bool:
        # waitid(WNOWAIT) sees the exit without reaping: while the server is an unreaped zombie its
        # pid, and so its pgid, cannot be reused, so the group SIGKILL below cannot hit a stranger
        if hasattr(os, "waitid") and hasattr(os, "WNOWAIT"):
            try:
                return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT | os.WNOHANG) is not None
            except ChildProcessError:
                return True
        return proc.poll() is not None  # pragma: no cover

    reason = None
    try:
        while True:
            if exited():
                reason = "server exited"
                break
            if stop:
                reason = f"{stop[0]} received"
                break
            if os.getppid() != args.parent_pid:
                reason = f"parent {args.parent_pid} is gone"
                break
            time.sleep(_POLL_S)
        say(f"{reason}: stopping the server's process group {pgid}")
        if not exited():
            _killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + args.grace
            while not exited() and time.monotonic() < deadline:
                time.sleep(0.05)
            if not exited():
                say(f"server still alive after {args.grace:g}s: SIGKILL")
        # SIGKILL whatever is left in the group (the server after the grace period, or any descendant)
        _killpg(pgid, signal.SIGKILL)
        proc.wait()
        say(f"server stopped (code {proc.returncode})")
    finally:
        with contextlib.suppress(OSError):
            state.unlink()
    return 0


# --------------------------------------------------------------------------------------------------
# The parent side
# --------------------------------------------------------------------------------------------------


def free_port(host: str = HOST) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def server_command() -> list[str]:
    """``prefect`` from this interpreter's venv (or ``python -m prefect``)."""
    exe = Path(sys.executable).parent / "prefect"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "prefect"]


def _healthy(api_url: str, timeout: float = 2.0) -> bool:
    try:
        with _OPENER.open(f"{api_url}/health", timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, OSError, ValueError):
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover
        return True
    return True


def _with_no_proxy(env: dict) -> dict:
    env = dict(env)
    for var in ("NO_PROXY", "no_proxy"):
        items = [x for x in env.get(var, "").split(",") if x]
        items += [h for h in (HOST, "localhost") if h not in items]
        env[var] = ",".join(items)
    return env


class EmbeddedPrefectServer:
    """One ``prefect server start`` under a watchdog. Prefer :func:`embedded_prefect_server`.

    After :meth:`start`: ``url`` (``http://127.0.0.1:PORT/api``), ``watchdog_pid``, ``server_pid``,
    ``server_pgid``, ``log_path``."""

    def __init__(self, home: Path, *, ui: bool = True, grace: float = 10.0, command: Optional[list[str]] = None):
        self.home = Path(home).resolve()
        self.ui = ui
        self.grace = grace
        self.command = command
        self.url: Optional[str] = None
        self.port: Optional[int] = None
        self.log_path = self.home / LOG_NAME
        self.state_file = self.home / f"embedded-server.{os.getpid()}.json"
        self.watchdog: Optional[subprocess.Popen] = None
        self.server_pid: Optional[int] = None
        self.server_pgid: Optional[int] = None
        self._log_offset = 0

    @property
    def watchdog_pid(self) -> Optional[int]:
        return self.watchdog.pid if self.watchdog else None

    def pids(self) -> dict:
        return {"watchdog_pid": self.watchdog_pid, "server_pid": self.server_pid, "server_pgid": self.server_pgid}

    def _server_env(self) -> dict:
        env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
        env.update(PREFECT_HOME=str(self.home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   PREFECT_SERVER_UI_ENABLED="true" if self.ui else "false", PYTHONUNBUFFERED="1")
        return _with_no_proxy(env)

    def log_tail(self, lines: int = 40) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                data = f.read()
        except OSError:
            return ""
        return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])

    def _open_log(self):
        with contextlib.suppress(OSError):
            if self.log_path.stat().st_size > _LOG_ROTATE_BYTES:
                os.replace(self.log_path, self.log_path.with_name(LOG_NAME + ".1"))
        f = open(self.log_path, "ab")
        self._log_offset = f.tell()
        return f

    def start(self, timeout: float = 180.0) -> str:
        if os.name != "posix":  # pragma: no cover
            raise NotImplementedError("the embedded Prefect server needs POSIX process groups; set PREFECT_API_URL")
        self.home.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + timeout
        for attempt in range(3):
            try:
                return self._start_once(deadline)
            except EmbeddedServerError as e:
                self.stop()
                if "already in use" in str(e) and attempt < 2 and time.monotonic() < deadline:
                    log.info("port %s was taken, retrying on another port", self.port)
                    continue
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _start_once(self, deadline: float) -> str:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}/api"
        cmd = [*(self.command or server_command()), "server", "start", "--host", HOST, "--port", str(self.port)]
        with contextlib.suppress(OSError):
            self.state_file.unlink()
        with self._open_log() as logf:
            logf.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} parent pid {os.getpid()}: "
                       f"embedded Prefect server on {self.url}\n".encode())
            logf.flush()
            # no preexec_fn here: it is unsafe in a threaded parent; the watchdog sets its own PDEATHSIG
            self.watchdog = subprocess.Popen(
                [sys.executable, "-I", "-u", str(Path(__file__).resolve()), "--watchdog",
                 "--parent-pid", str(os.getpid()), "--grace", str(self.grace), "--state-file", str(self.state_file),
                 "--", *cmd],
                stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT, env=self._server_env(),
                start_new_session=True, close_fds=True,
            )
        log.info("starting the embedded Prefect server on %s (log: %s)", self.url, self.log_path)
        while True:
            if self.server_pid is None and self.state_file.exists():
                with contextlib.suppress(OSError, ValueError, KeyError):
                    st = json.loads(self.state_file.read_text())
                    self.server_pid, self.server_pgid = st["server_pid"], st["server_pgid"]
            if self.server_pid is not None and _healthy(self.url):
                log.info("embedded Prefect server ready: API %s%s", self.url,
                         f", UI http://{HOST}:{self.port}" if self.ui else "")
                return self.url
            if self.watchdog.poll() is not None:
                raise EmbeddedServerError(
                    f"the embedded Prefect server exited before {self.url} answered "
                    f"(log {self.log_path}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise EmbeddedServerError(
                    f"the embedded Prefect server did not answer on {self.url}/health in time "
                    f"(log {self.log_path}):\n{self.log_tail()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """SIGTERM the watchdog (which SIGTERMs the server's group, then SIGKILLs it after ``grace``);
        SIGKILL everything ourselves if the watchdog does not finish in time."""
        wd = self.watchdog
        if wd is None:
            return
        if wd.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                wd.send_signal(signal.SIGTERM)
            try:
                wd.wait(timeout=self.grace + 5)
            except subprocess.TimeoutExpired:
                log.warning("embedded Prefect server watchdog %s did not stop; killing the tree", wd.pid)
        if wd.poll() != 0:  # the watchdog did not finish its job (a clean watchdog exit empties the group)
            if self.server_pgid is None and self.state_file.exists():
                with contextlib.suppress(OSError, ValueError, KeyError):
                    self.server_pgid = json.loads(self.state_file.read_text())["server_pgid"]
            if self.server_pgid is not None:
                _killpg(self.server_pgid, signal.SIGKILL)
        if wd.poll() is None:
            _killpg(wd.pid, signal.SIGKILL)
            wd.wait()
        with contextlib.suppress(OSError):
            self.state_file.unlink()


def configured_api_url() -> Optional[str]:
    """``PREFECT_API_URL`` from the environment, else from Prefect's resolved settings (profile, .env)."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    try:
        from prefect.settings import get_current_settings

        return get_current_settings().api.url or None
    except Exception:  # pragma: no cover - prefect missing or broken settings
        return None


def active_server() -> Optional[EmbeddedPrefectServer]:
    """The server started by the innermost active :func:`embedded_prefect_server` of this process."""
    return _active[-1] if _active else None


def _drain_prefect_workers(timeout: float = 5.0) -> None:
    """Send Prefect's queued logs and events while the server is still up (only if already imported)."""
    for mod, name in (("prefect.logging.handlers", "APILogWorker"), ("prefect.events.worker", "EventsWorker")):
        m = sys.modules.get(mod)
        if m is None:
            continue
        try:
            getattr(m, name).drain_all(timeout=timeout)
        except Exception as e:  # pragma: no cover - best effort
            log.debug("draining %s failed: %r", name, e)


@contextlib.contextmanager
def embedded_prefect_server(home: Path, *, timeout: float = 180.0, ui: Optional[bool] = None,
                            grace: float = 10.0, command: Optional[list[str]] = None) -> Iterator[str]:
    """Start ``prefect server start`` on a free 127.0.0.1 port with ``PREFECT_HOME=home``, point this
    process's Prefect at it, yield the API URL, and stop the whole server tree on exit. The server
    also dies when this process dies, even by SIGKILL (see the module docstring).

    ``ui``: serve the Prefect UI (default: ``$PREFECT_SERVER_UI_ENABLED``, else True).
    ``timeout``: seconds to wait for ``/health``; :class:`EmbeddedServerError` (with the log tail) after.
    ``grace``: seconds between SIGTERM and SIGKILL when stopping.
    ``command``: the ``prefect`` command prefix (default :func:`server_command`; tests pass a stand-in).
    Pass-through (starts nothing, yields the URL) when ``PREFECT_API_URL`` is already configured."""
    existing = configured_api_url()
    if existing:
        log.info("PREFECT_API_URL is set (%s): not starting an embedded Prefect server", existing)
        yield existing
        return
    if ui is None:
        ui = os.environ.get("PREFECT_SERVER_UI_ENABLED", "true").strip().lower() not in ("0", "false", "no", "off")

    server = EmbeddedPrefectServer(Path(home), ui=ui, grace=grace, command=command)
    saved = {k: os.environ.get(k) for k in ("PREFECT_API_URL", "NO_PROXY", "no_proxy")}
    _active.append(server)
    try:
        url = server.start(timeout=timeout)
        os.environ.update(_with_no_proxy({k: v for k, v in os.environ.items() if k in ("NO_PROXY", "no_proxy")}))
        os.environ["PREFECT_API_URL"] = url
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: url}):
            try:
                yield url
            finally:
                _drain_prefect_workers()
    finally:
        _active.remove(server)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


if __name__ == "__main__" and sys.argv[1:2] == ["--watchdog"]:
    sys.exit(_watchdog_main(sys.argv[2:]))
