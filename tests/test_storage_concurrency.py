"""Several real processes on one store: publishing while reading, overwriting while reading, filling the local
cache together, and the cross-process lock (mutual exclusion, takeover after SIGKILL, timeout)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import pickle
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from tasks.storage import FileStore, Lease, LockTimeout, S3Store, StoreError, _lock_id, is_integrity_error
from tests.test_storage import MiB, moto, s3_env, store  # noqa: F401 - fixtures

CTX = multiprocessing.get_context("fork")
PREFIX = "data/snapshot"


def spec_of(store) -> tuple:
    if isinstance(store, FileStore):
        return ("file", str(store.root))
    return ("s3", store.bucket, store.prefix)


def open_spec(spec: tuple):
    """A fresh store in a child process (never a client inherited through fork)."""
    if spec[0] == "file":
        return FileStore(spec[1])
    return S3Store(spec[1], spec[2], multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB)


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return root


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def wait_for(path: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout}s"
        time.sleep(0.01)


def join_all(procs, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
        p.join()
    assert not alive, "worker processes hung"
    assert [p.exitcode for p in procs] == [0] * len(procs)


# --------------------------------------------------------------------------- publish while reading


def _publisher(spec, sources: list[str], prefix: str, started: str, stop: str, limit_s: float) -> None:
    store = open_spec(spec)
    n = 0
    deadline = time.monotonic() + limit_s
    while not os.path.exists(stop) and time.monotonic() < deadline:
        store.put_dir(sources[n % len(sources)], prefix)
        n += 1
        Path(started).write_text(str(n))


def _reader(spec, prefix: str, versions: list[dict], out: str, rounds: int, started: str, stop: str) -> None:
    store = open_spec(spec)
    wait_for(Path(started))
    failures = []
    for i in range(rounds):
        dest = Path(out) / f"round-{i}"
        try:
            got = tree(store.get_dir(prefix, dest))
            if got not in versions:
                failures.append(f"round {i}: neither version: {sorted(got)}")
            rel = "common.bin"
            if store.get_dir_file(prefix, rel) not in [v[rel] for v in versions]:
                failures.append(f"round {i}: get_dir_file returned unknown bytes")
        except Exception as e:  # noqa: BLE001 - every failure is reported
            failures.append(f"round {i}: {type(e).__name__}: {e}")
        shutil.rmtree(dest, ignore_errors=True)
    (Path(out) / "failures.json").write_text(json.dumps(failures))
    Path(stop).touch()


@pytest.mark.parametrize("mode", ["identical", "alternating"])
def test_readers_see_a_complete_version_while_another_process_publishes(store, tmp_path, mode):
    v1 = {"common.bin": os.urandom(40_000), "a/b.bin": os.urandom(20_000), "only-v1.txt": b"v1"}
    v2 = {"common.bin": os.urandom(40_000), "a/b.bin": os.urandom(20_000), "a/only-v2.txt": b"v2"}
    sources = [str(write_tree(tmp_path / "v1", v1))]
    if mode == "alternating":
        sources.append(str(write_tree(tmp_path / "v2", v2)))
    store.put_dir(sources[0], PREFIX)
    first_gen = store.get_json(f"{PREFIX}/MANIFEST.json")["generation"]
    started, stop, out = tmp_path / "started", tmp_path / "stop", tmp_path / "reads"
    out.mkdir()
    spec = spec_of(store)
    writer = CTX.Process(target=_publisher, args=(spec, sources, PREFIX, str(started), str(stop), 120.0))
    reader = CTX.Process(target=_reader, args=(spec, PREFIX, [v1, v2], str(out), 40, str(started), str(stop)))
    writer.start()
    reader.start()
    join_all([reader, writer], timeout=240)

    failures = json.loads((out / "failures.json").read_text())
    assert failures == [], f"{len(failures)} of 40 reads failed: {failures[:3]}"
    publishes = int(started.read_text())
    assert publishes >= 3  # the reads really overlapped with publishes
    gens = {k.split("/")[3] for k in store.list(f"{PREFIX}/.gen")}
    if mode == "identical":
        assert gens == {first_gen}  # publishing identical content wrote nothing
    else:
        assert len(gens) <= 2  # the current and the previous generation; older ones collected
    assert tree(store.get_dir(PREFIX, tmp_path / "final")) in [v1, v2]


def _overwriter(root: str, key: str, values: list[bytes], stop: str, limit_s: float) -> None:
    store = FileStore(root)
    n = 0
    deadline = time.monotonic() + limit_s
    while not os.path.exists(stop) and time.monotonic() < deadline:
        store.put_bytes(values[n % 2], key)
        n += 1


def test_file_store_overwrite_is_atomic_for_readers(tmp_path):
    store = FileStore(tmp_path / "store")
    values = [os.urandom(200_000), os.urandom(150_000)]
    store.put_bytes(values[0], "k/obj.bin")
    stop = tmp_path / "stop"
    writers = [CTX.Process(target=_overwriter, args=(str(store.root), "k/obj.bin", values, str(stop), 60.0))
               for _ in range(2)]
    for w in writers:
        w.start()
    expected = [(hashlib.sha256(v).hexdigest(), len(v)) for v in values]
    failures, reads = [], 0
    deadline = time.monotonic() + 6.0
    try:
        while time.monotonic() < deadline or reads < 200:
            try:
                data = store.get_bytes("k/obj.bin")
                if data not in values:
                    failures.append("unknown bytes")
                ref = store.stat("k/obj.bin")
                if (ref.sha256, ref.size) not in expected:
                    failures.append(f"stat: unknown {ref}")
            except Exception as e:  # noqa: BLE001
                failures.append(f"{type(e).__name__}: {e}")
            reads += 1
            if reads >= 2000:
                break
    finally:
        stop.touch()
        join_all(writers)
    assert failures == [], f"{len(failures)} of {reads} reads failed: {failures[:3]}"
    assert store.get_bytes("k/obj.bin") in values and store.verify("k/obj.bin").size in (200_000, 150_000)
    assert not [p for p in store.root.rglob(".distill-tmp-*")]


# --------------------------------------------------------------------------- filling the local cache together


def _fetcher(spec, prefix: str, cache: str, out: str, barrier) -> None:
    store = open_spec(spec)
    barrier.wait(60)
    local = store.fetch_dir(prefix, cache)
    Path(out).write_text(json.dumps({"path": str(local), "files": {k: v.hex() for k, v in tree(local).items()}}))


def test_concurrent_fetch_dir(store, tmp_path):
    files = {f"part-{i}.bin": os.urandom(100_000) for i in range(4)}
    store.put_dir(write_tree(tmp_path / "src", files), PREFIX)
    cache = tmp_path / "cache"
    barrier = CTX.Barrier(4)
    outs = [tmp_path / f"out-{i}.json" for i in range(4)]
    procs = [CTX.Process(target=_fetcher, args=(spec_of(store), PREFIX, str(cache), str(o), barrier)) for o in outs]
    for p in procs:
        p.start()
    join_all(procs)
    results = [json.loads(o.read_text()) for o in outs]
    assert len({r["path"] for r in results}) == 1
    assert all(r["files"] == {k: v.hex() for k, v in files.items()} for r in results)
    slot = Path(results[0]["path"]).parent
    assert not [p.name for p in slot.iterdir() if p.name.startswith((".fetch-", ".trash-"))]
    assert tree(store.fetch_dir(PREFIX, cache)) == files


# --------------------------------------------------------------------------- locks


def _contender(spec, name: str, counter: str, inside: str, violations: str, rounds: int) -> None:
    store = open_spec(spec)
    for _ in range(rounds):
        with store.lock(name, ttl=10, timeout=120, poll=0.02):
            try:
                os.close(os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            except FileExistsError:
                with open(violations, "a") as f:
                    f.write(f"{os.getpid()}\n")
            n = int(Path(counter).read_text())
            time.sleep(0.01)
            Path(counter).write_text(str(n + 1))
            Path(inside).unlink(missing_ok=True)


def test_lock_excludes_other_processes(store, tmp_path):
    counter, inside, violations = tmp_path / "counter", tmp_path / "inside", tmp_path / "violations"
    counter.write_text("0")
    violations.write_text("")
    procs = [CTX.Process(target=_contender, args=(spec_of(store), "locks/stages/abc", str(counter), str(inside),
                                                  str(violations), 6)) for _ in range(3)]
    for p in procs:
        p.start()
    join_all(procs, timeout=240)
    assert violations.read_text() == ""  # never two holders at once
    assert counter.read_text() == "18"  # no lost update
    with store.lock("locks/stages/abc", timeout=0):  # released at the end
        pass


def _holder(spec, name: str, ttl: float, ready: str) -> None:
    store = open_spec(spec)
    with store.lock(name, ttl=ttl, timeout=30):
        Path(ready).touch()
        time.sleep(600)


def test_lock_is_renewed_while_held_and_taken_over_after_the_holder_is_killed(store, tmp_path):
    name = "locks/promote/cifar-student"
    ready = tmp_path / "ready"
    holder = CTX.Process(target=_holder, args=(spec_of(store), name, 3.0, str(ready)))
    holder.start()
    try:
        wait_for(ready)
        t0 = time.monotonic()
        with pytest.raises(LockTimeout, match="cifar-student"):
            with store.lock(name, ttl=3.0, timeout=7.0, poll=0.1):
                pass
        assert time.monotonic() - t0 >= 7.0  # held for more than twice its ttl: renewed
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.join()
    t0 = time.monotonic()
    with store.lock(name, ttl=5, timeout=30, poll=0.05) as lease:
        waited = time.monotonic() - t0
        assert not lease.lost
    assert waited < 15.0  # the dead holder's lease expired after its ttl (3 s) and was taken over


def test_lock_timeout_names_the_lock_and_its_holder(store):
    with store.lock("locks/stages/busy", ttl=30) as lease:
        t0 = time.monotonic()
        with pytest.raises(LockTimeout) as exc:
            with store.lock("locks/stages/busy", timeout=0.3, poll=0.05):
                pass
        assert 0.3 <= time.monotonic() - t0 < 10
    err = exc.value
    assert "locks/stages/busy" in str(err) and lease.owner in str(err) and store.url in str(err)
    assert isinstance(err, StoreError) and not is_integrity_error(err)
    assert str(pickle.loads(pickle.dumps(err))) == str(err)
    with store.lock("locks/stages/busy", timeout=0):  # free again
        pass
    assert not any(".distill-locks" in k for k in store.list(""))  # lock records are not objects


def test_lock_is_released_only_if_still_ours(store, monkeypatch):
    monkeypatch.setattr(Lease, "_renew_loop", lambda self: None)  # a holder stalled past its ttl
    with store.lock("locks/x", ttl=0.3, timeout=1) as first:
        time.sleep(0.6)
        second_cm = store.lock("locks/x", ttl=30, timeout=5)
        second = second_cm.__enter__()  # took over the expired lease
    record, _token = store._lock_read(_lock_id("locks/x"))
    assert json.loads(record)["owner"] == second.owner != first.owner  # first's exit left it alone
    second_cm.__exit__(None, None, None)
    assert store._lock_read(_lock_id("locks/x")) == (None, None)


def test_lock_takeover_has_one_winner(store):
    with store.lock("locks/race", ttl=0.2, timeout=1) as stale:
        stale._stop.set()  # stop renewing: the lease expires
        time.sleep(0.5)
        winners, errors = [], []
        everyone_tried = threading.Barrier(4, timeout=60)

        def take():
            try:
                with store.lock("locks/race", ttl=30, timeout=0) as lease:
                    winners.append(lease.owner)
                    everyone_tried.wait()  # hold until every contender has made its one attempt
            except LockTimeout:
                everyone_tried.wait()
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                everyone_tried.abort()

        threads = [threading.Thread(target=take) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert errors == [] and len(winners) == 1
