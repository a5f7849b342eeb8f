"""flows.embedded: the embedded Prefect server dies with its parent, with real processes.

Two tests start a real ``prefect server start`` (about 7-20 s each on a busy 2-core machine); the
others use a stand-in server (a tiny HTTP server that also spawns a SIGTERM-ignoring grandchild), so
the process-tree mechanics are checked in about a second each. Liveness is read from /proc (Linux).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("prefect")

from flows import embedded  # noqa: E402
from flows.embedded import EmbeddedPrefectServer, EmbeddedServerError, active_server, embedded_prefect_server  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# A stand-in for `prefect server start --host H --port P`: answers /api/health and has a grandchild
# that ignores SIGTERM (only the watchdog's final SIGKILL of the process group gets rid of it).
STAND_IN = r"""
import http.server, subprocess, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"true")
    def log_message(self, *a):
        pass
print("stand-in server listening", flush=True)
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""
STAND_IN_CMD = [sys.executable, "-c", STAND_IN]


# ---------------------------------------------------------------------------------------------- helpers


def _procs() -> dict[int, tuple[str, int]]:
    """pid -> (state, pgrp) for every process in /proc."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(d)] = (fields[0], int(fields[2]))
    return out


def _alive(pids=(), pgids=()) -> list[int]:
    """Live (non-zombie) processes among ``pids`` or in the process groups ``pgids``."""
    pids, pgids = set(p for p in pids if p), set(g for g in pgids if g)
    return sorted(pid for pid, (state, pgrp) in _procs().items() if state != "Z" and (pid in pids or pgrp in pgids))


def _group(pgid: int) -> list[int]:
    return _alive(pgids=[pgid])


def _wait_gone(pids, pgids, timeout: float) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if not _alive(pids, pgids):
            return time.monotonic() - t0
        time.sleep(0.1)
    raise AssertionError(f"still alive after {timeout}s: {_alive(pids, pgids)}")


def _kill_all(pids, pgids) -> None:
    for g in pgids:
        if g:
            try:
                os.killpg(g, signal.SIGKILL)
            except OSError:
                pass
    for p in pids:
        if p:
            try:
                os.kill(p, signal.SIGKILL)
            except OSError:
                pass


def _healthy(url: str) -> bool:
    try:
        with _OPENER.open(f"{url}/health", timeout=5) as r:
            return r.status == 200
    except OSError:
        return False


def _child_env(home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_HOME"] = str(home)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _wait_file(path: Path, proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            return json.loads(path.read_text())
        if proc.poll() is not None:
            raise AssertionError(f"child exited with {proc.returncode}:\n{proc.stdout.read() if proc.stdout else ''}")
        time.sleep(0.1)
    raise AssertionError(f"{path} not written within {timeout}s")


@pytest.fixture
def no_api_url(monkeypatch):
    """No PREFECT_API_URL, neither in the environment nor in Prefect's current settings."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        assert embedded.configured_api_url() is None
        yield


# ---------------------------------------------------------------------------------------------- real Prefect server


def test_real_server_runs_a_flow_and_stops_its_tree(tmp_path, no_api_url):
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.settings import get_current_settings

    @task
    def add(a: int, b: int) -> int:
        return a + b

    @flow(name="embedded-smoke")
    def smoke(x: int) -> int:
        return add.submit(x, 1).result() + add(x, 2)

    home = tmp_path / "home"
    with embedded_prefect_server(home) as url:  # UI enabled: the default
        srv = active_server()
        pids = [srv.watchdog_pid, srv.server_pid]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/api")
        assert os.environ["PREFECT_API_URL"] == url
        assert get_current_settings().api.url == url  # honoured although prefect was imported before
        assert _healthy(url)
        assert set(pids) <= set(_alive(pids))
        assert srv.server_pgid == srv.server_pid and srv.server_pgid != os.getpgid(0)
        with _OPENER.open(url[: -len("/api")] + "/", timeout=10) as r:  # the UI
            assert r.status == 200
        state = smoke(3, return_state=True)
        assert state.is_completed() and state.result() == 9
        with get_client(sync_client=True) as client:
            assert str(client.api_url).startswith(url)
            fr = client.read_flow_run(state.state_details.flow_run_id)
            assert fr.state.is_completed()
        assert srv.state_file.exists()
    # stopped synchronously: nothing of the tree is left, and the settings are back
    assert not _alive(pids, [srv.server_pgid]), _procs()
    assert "PREFECT_API_URL" not in os.environ
    assert get_current_settings().api.url is None
    assert not srv.state_file.exists()
    text = (home / embedded.LOG_NAME).read_text()
    assert "SIGTERM received" in text and "server stopped" in text


def test_real_server_dies_when_parent_is_sigkilled(tmp_path):
    home, info = tmp_path / "home", tmp_path / "pids.json"
    child_src = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from flows.embedded import embedded_prefect_server, active_server\n"
        "with embedded_prefect_server(Path(sys.argv[1]), ui=False) as url:\n"
        "    Path(sys.argv[2]).write_text(json.dumps({'url': url, **active_server().pids()}))\n"
        "    time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", child_src, str(home), str(info)], env=_child_env(home),
                             cwd=str(tmp_path), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    st = {}
    try:
        st = _wait_file(info, child, timeout=180)
        pids, pgids = [st["watchdog_pid"], st["server_pid"]], [st["server_pgid"]]
        assert _healthy(st["url"])
        assert set(pids) <= set(_alive(pids, pgids))
        child.kill()
        child.wait()
        took = _wait_gone(pids, pgids, timeout=15)
        print(f"server tree gone {took:.1f}s after SIGKILL of its parent")
        assert not _healthy(st["url"])
        assert f"parent {child.pid} is gone" in (home / embedded.LOG_NAME).read_text()
    finally:
        child.kill()
        child.wait()
        _kill_all([st.get("watchdog_pid"), st.get("server_pid")], [st.get("server_pgid")])


# ---------------------------------------------------------------------------------------------- mechanics (stand-in)


def test_passthrough_when_api_url_is_set(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")

    def no_popen(*a, **k):
        raise AssertionError("started a process")

    monkeypatch.setattr(embedded.subprocess, "Popen", no_popen)
    with embedded_prefect_server(tmp_path / "home") as url:
        assert url == "http://127.0.0.1:9/api"
        assert active_server() is None
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:9/api"
    assert not (tmp_path / "home").exists()


def test_sigkilled_parent_takes_whole_tree_including_stubborn_grandchild(tmp_path):
    home, info = tmp_path / "home", tmp_path / "pids.json"
    child_src = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from flows.embedded import embedded_prefect_server, active_server\n"
        f"with embedded_prefect_server(Path(sys.argv[1]), grace=1, command={STAND_IN_CMD!r}) as url:\n"
        "    Path(sys.argv[2]).write_text(json.dumps({'url': url, **active_server().pids()}))\n"
        "    time.sleep(600)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", child_src, str(home), str(info)], env=_child_env(home),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    st = {}
    try:
        st = _wait_file(info, child, timeout=60)
        deadline = time.monotonic() + 10
        while len(_group(st["server_pgid"])) < 2 and time.monotonic() < deadline:  # server + grandchild
            time.sleep(0.05)
        assert len(_group(st["server_pgid"])) == 2
        child.kill()
        child.wait()
        took = _wait_gone([st["watchdog_pid"], st["server_pid"]], [st["server_pgid"]], timeout=15)
        assert took < 1 + 5  # grace 1 s for the SIGTERM-ignoring grandchild, plus polling
    finally:
        child.kill()
        child.wait()
        _kill_all([st.get("watchdog_pid"), st.get("server_pid")], [st.get("server_pgid")])


def test_ctrl_c_in_parent_does_not_reach_server_and_stops_it_cleanly(tmp_path):
    home, info = tmp_path / "home", tmp_path / "pids.json"
    child_src = (
        "import json, sys, time\n"
        "from pathlib import Path\n"
        "from flows.embedded import embedded_prefect_server, active_server\n"
        f"with embedded_prefect_server(Path(sys.argv[1]), grace=1, command={STAND_IN_CMD!r}) as url:\n"
        "    Path(sys.argv[2]).write_text(json.dumps({'url': url, **active_server().pids()}))\n"
        "    time.sleep(600)\n"
    )
    # the child leads its own process group, like a shell job in a terminal
    child = subprocess.Popen([sys.executable, "-c", child_src, str(home), str(info)], env=_child_env(home),
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    st = {}
    try:
        st = _wait_file(info, child, timeout=60)
        os.killpg(child.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        out, _ = child.communicate(timeout=30)
        assert "KeyboardInterrupt" in out
        assert not _alive([st["watchdog_pid"], st["server_pid"]], [st["server_pgid"]])
        text = (home / embedded.LOG_NAME).read_text()
        # stopped by the context manager's exit (SIGTERM to the watchdog), not by the SIGINT itself
        assert "SIGTERM received" in text and "SIGINT" not in text
    finally:
        child.kill()
        child.wait()
        _kill_all([st.get("watchdog_pid"), st.get("server_pid")], [st.get("server_pgid")])


def test_exit_of_the_starting_thread_does_not_stop_the_server(tmp_path):
    srv = EmbeddedPrefectServer(tmp_path / "home", grace=1, command=STAND_IN_CMD)
    errors: list[BaseException] = []

    def start():
        try:
            srv.start(timeout=30)
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    t = threading.Thread(target=start)
    t.start()
    t.join()
    try:
        assert not errors, errors
        time.sleep(1.5)  # PDEATHSIG fired at the thread's exit: the watchdog must only have checked getppid()
        assert srv.watchdog.poll() is None
        assert _healthy(srv.url)
        assert srv.server_pid in _alive([srv.server_pid])
    finally:
        srv.stop()
    assert not _alive([srv.watchdog_pid, srv.server_pid], [srv.server_pgid])
    assert srv.watchdog.returncode == 0


def test_start_failure_reports_log_tail_and_cleans_up(tmp_path):
    crash = [sys.executable, "-c", "import sys; print('stand-in: cannot open the database', flush=True); sys.exit(3)"]
    srv = EmbeddedPrefectServer(tmp_path / "home", grace=1, command=crash)
    with pytest.raises(EmbeddedServerError, match="exited before") as ei:
        srv.start(timeout=30)
    assert "cannot open the database" in str(ei.value)
    assert not _alive([srv.watchdog_pid, srv.server_pid], [srv.server_pgid])

    silent = [sys.executable, "-c", "import time; print('stand-in: never listens', flush=True); time.sleep(600)"]
    srv = EmbeddedPrefectServer(tmp_path / "home", grace=1, command=silent)
    t0 = time.monotonic()
    with pytest.raises(EmbeddedServerError, match="did not answer") as ei:
        srv.start(timeout=2)
    assert time.monotonic() - t0 < 10
    assert "never listens" in str(ei.value)
    assert not _alive([srv.watchdog_pid, srv.server_pid], [srv.server_pgid])
