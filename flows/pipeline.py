"""The pipeline every distillation kind shares: prepare data -> teacher (reused when its key matches) -> the
kind's init stage (e.g. a pruned teacher; optional) -> baseline, student and sweep as a pool of stages ->
speed measured alone -> MLflow registration and promotion gate on the kind's selection metric -> report.

A kind plugs in through :class:`distill.kinds.Kind` only; ``flows/cifar.py`` and ``flows/lm.py`` are the
Prefect flows (names, parameters, deployments) that call :func:`run_pipeline`.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence
from urllib.parse import unquote

from prefect import flow, get_run_logger, task
from prefect.states import Failed
from pydantic import ValidationError
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.deployments import run_deployment
from prefect.runtime import flow_run

from distill.files import sha256_json
from distill.kinds import INIT_NAME, Kind, Member, get_kind
from distill.seedstats import seed_summary
from tasks.lab import (
    INTEGRITY_MARKERS, TrainJob, git_commit, measure_speed, not_integrity_error, prefect_run_alive,
    prepare_data, stage_key, stage_result, work_dir,
)
from tasks.registry import register_models
from tasks.report import artifact_markdown, build_report, fetch_sample_files, formatted_rows
from tasks.secrets import redact, redact_text, strip_userinfo
from tasks.storage import IntegrityError, open_store
from tasks.tracking import Tracker, flatten_params

from .params import (
    PipelineBase, flow_signature, params_from_flow, resolve_store_url, resolve_tracking_uri, validation_message,
)
from .train import distill_train



#: how long a stage waits for a worker to come online on its training pool before it fails (seconds)
POOL_WAIT_ENV = "DISTILL_POOL_WAIT_S"
POOL_WAIT_DEFAULT_S = 600.0
#: pool types served without a worker of ours (push pools, Prefect-managed)
_WORKERLESS_POOL_TYPES = ("prefect:managed",)


class PoolUnavailable(RuntimeError):
    """No worker serves the training pool (missing, paused, or no worker online in time): not retried."""


def pool_wait_s() -> float:
    raw = os.environ.get(POOL_WAIT_ENV, "").strip()
    if not raw:
        return POOL_WAIT_DEFAULT_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{POOL_WAIT_ENV} must be a number of seconds, got {raw!r}") from None
    return max(value, 0.0)


def ensure_pool_served(train_pool: str, *, wait_s: Optional[float] = None, poll_s: float = 3.0,
                       log: Optional[Callable[[str], None]] = None, sleep: Callable[[float], None] = time.sleep,
                       clock: Callable[[], float] = time.monotonic) -> str:
    """Check, before a stage is dispatched to ``distill-train/<train_pool>``, that a worker serves the work pool
    that deployment runs on (the deployment's pool, else the pool named ``train_pool``): a missing or paused pool
    fails at once; a pool with no online worker is polled every ``poll_s`` for up to ``wait_s`` seconds
    (default ``$DISTILL_POOL_WAIT_S``, 600), then fails. Raises :class:`PoolUnavailable` naming the pool and
    the command that fixes it; returns the pool's name."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import WorkerFilter, WorkerFilterStatus
    from prefect.client.schemas.objects import WorkPoolStatus
    from prefect.exceptions import ObjectNotFound

    wait_s = pool_wait_s() if wait_s is None else wait_s
    deployment = f"distill-train/{train_pool}"
    with get_client(sync_client=True) as client:
        try:
            dep = client.read_deployment_by_name(deployment)
        except ObjectNotFound:
            dep = None
        pool = (dep.work_pool_name if dep is not None else None) or train_pool

        def read():
            try:
                return client.read_work_pool(pool)
            except ObjectNotFound:
                raise PoolUnavailable(
                    f"work pool {pool!r} does not exist on the Prefect server, so no training stage can run on it "
                    f"(train_pool={train_pool!r}). Create it (infra/setup-pools.sh creates cpu and gpu, or "
                    f"`prefect work-pool create {pool} --type process`), deploy {deployment} "
                    f"(`prefect --no-prompt deploy --all`), start a worker (`prefect worker start --pool {pool}`), "
                    f"or run without train_pool to train in this process") from None

        def online() -> int:
            workers = client.read_workers_for_work_pool(
                pool, worker_filter=WorkerFilter(status=WorkerFilterStatus(any_=["ONLINE"])))
            return len(workers)

        wp = read()
        if dep is None:
            raise PoolUnavailable(
                f"work pool {pool!r} exists but there is no deployment {deployment} to run the training stages on "
                f"it: deploy it (`DISTILL_PROJECT_DIR=$PWD prefect --no-prompt deploy --all`, see prefect.yaml)")
        if wp.type in _WORKERLESS_POOL_TYPES or str(wp.type).endswith(":push"):
            return pool
        deadline = clock() + wait_s
        said = False
        while True:
            if wp.is_paused or wp.status == WorkPoolStatus.PAUSED:
                raise PoolUnavailable(f"work pool {pool!r} is paused, so no training stage runs on it: resume it "
                                      f"with `prefect work-pool resume {pool}`")
            if wp.status == WorkPoolStatus.READY or online():
                return pool
            left = deadline - clock()
            if left <= 0:
                raise PoolUnavailable(
                    f"no worker is online on work pool {pool!r} (waited {wait_s:g} s, {POOL_WAIT_ENV}): start one "
                    f"with `prefect worker start --pool {pool}` on a machine that can run the stages "
                    f"(a GPU host for a GPU pool), or run without train_pool to train in this process")
            if not said and log is not None:
                log(f"no worker online on work pool {pool!r} yet; waiting up to {wait_s:g} s ({POOL_WAIT_ENV}) "
                    f"for `prefect worker start --pool {pool}`")
                said = True
            sleep(min(poll_s, left))
            wp = read()


@task(name="run-training", retries=1, retry_delay_seconds=5, retry_condition_fn=not_integrity_error)
def run_training(job: TrainJob, train_pool: Optional[str]) -> dict:
    """Run one training stage in-process, or on ``train_pool`` through the ``distill-train/<pool>`` deployment
    (the flow checked first that a worker serves that pool: :func:`ensure_pool_served`). A retry (or a later
    flow run) uses the same content-addressed stage prefix, so it resumes from the newest verified checkpoint; an
    integrity failure is not retried."""
    if not train_pool:
        return distill_train(job)
    fr = run_deployment(
        f"distill-train/{train_pool}", parameters={"job": job.model_dump(mode="json")},
        flow_run_name=job.name, timeout=0, tags=["distill", job.kind, job.role],
    )
    fr = wait_for_stage(fr.id, train_pool, job.name)
    if not fr.state or not fr.state.is_completed():
        message = (fr.state.message or "") if fr.state else ""
        text = (f"training stage {job.name} on pool {train_pool!r} ended {fr.state.name if fr.state else 'without state'}"
                f" (flow run {fr.id}): {redact_text(message)}")
        if any(marker in message for marker in INTEGRITY_MARKERS):
            raise IntegrityError(text)
        raise RuntimeError(text)
    return open_store(job.store_url).get_json(f"{job.out_prefix}/result.json")


STAGE_TIMEOUT_ENV = "DISTILL_STAGE_TIMEOUT_S"


def stage_timeout_s() -> Optional[float]:
    """``$DISTILL_STAGE_TIMEOUT_S``: the most seconds one dispatched training stage may take, queueing included
    (unset or 0: no limit)."""
    raw = os.environ.get(STAGE_TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"{STAGE_TIMEOUT_ENV} must be a number of seconds, got {raw!r}") from None
    return value if value > 0 else None


def wait_for_stage(flow_run_id: Any, train_pool: str, name: str, *, poll_s: float = 2.0,
                   timeout_s: Optional[float] = None, sleep: Callable[[float], None] = time.sleep,
                   clock: Callable[[], float] = time.monotonic) -> Any:
    """Wait for a dispatched stage's flow run to end and return it. While it has not started, the pool must keep
    an online worker: a queued run (the pool's concurrency limit) waits as long as workers are there, but when
    none has been online for ``$DISTILL_POOL_WAIT_S`` the run is cancelled and :class:`PoolUnavailable` names the
    pool (``run_deployment(timeout=None)`` would wait forever). Past ``timeout_s`` (default
    ``$DISTILL_STAGE_TIMEOUT_S``, none) the run is cancelled and ``TimeoutError`` raised."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled

    timeout_s = stage_timeout_s() if timeout_s is None else timeout_s
    t0, checked = clock(), clock()
    with get_client(sync_client=True) as client:
        while True:
            fr = client.read_flow_run(flow_run_id)
            state = fr.state
            if state is not None and state.is_final():
                return fr
            try:
                if (state is None or state.is_scheduled() or state.is_pending()) and clock() - checked >= poll_s * 5:
                    ensure_pool_served(train_pool)  # waits up to $DISTILL_POOL_WAIT_S for a worker, else raises
                    checked = clock()
                if timeout_s is not None and clock() - t0 > timeout_s:
                    raise TimeoutError(f"training stage {name} on pool {train_pool!r} did not finish within "
                                       f"{timeout_s:g} s ({STAGE_TIMEOUT_ENV}); its flow run {flow_run_id} was cancelled")
            except (PoolUnavailable, TimeoutError) as e:
                client.set_flow_run_state(flow_run_id, Cancelled(message=str(e)), force=True)
                raise
            sleep(poll_s)


class Reused(NamedTuple):
    """What ``build_job`` returns for a member whose stage is already complete (no job to run)."""

    result: dict


def member_order(members: Sequence[Member]) -> list[str]:
    """The member names in an order where each member comes after the member it learns from (``teacher``).
    Refuses, with a ValueError naming the member, duplicate names, a teacher that is no member of the plan,
    a member that learns from itself, and cycles."""
    by_name: dict[str, Member] = {}
    for m in members:
        if m.name in by_name:
            raise ValueError(f"member {m.name!r} appears twice in the plan")
        by_name[m.name] = m
    for m in members:
        if m.teacher is not None and m.teacher not in by_name:
            raise ValueError(f"member {m.name!r} learns from {m.teacher!r}, which is no member of the plan "
                             f"(members: {', '.join(by_name)}; teacher=None means the run's teacher)")
    order: list[str] = []
    state: dict[str, str] = {}  # visiting / done
    for m in members:
        chain: list[str] = []
        name: Optional[str] = m.name
        while name is not None and state.get(name) != "done":
            if state.get(name) == "visiting":
                cycle = chain[chain.index(name):] + [name]
                raise ValueError(f"member {name!r} learns from itself through {' -> '.join(cycle)}")
            state[name] = "visiting"
            chain.append(name)
            name = by_name[name].teacher
        for n in reversed(chain):  # the chain's root first
            state[n] = "done"
            order.append(n)
    return order


def schedule_members(members: Sequence[Member], build_job: Callable[[Member, dict[str, dict]], Any],
                     submit: Callable[[Any], Any], max_parallel: int, *, poll_s: float = 0.5,
                     sleep: Callable[[float], None] = time.sleep) -> dict[str, dict]:
    """Run the plan's members as a pool of at most ``max_parallel`` running stages, starting the next one as
    soon as any finishes (a slow stage does not idle the others). A member whose ``teacher`` is another member
    is built only once that member has finished (or was reused): ``build_job(member, results so far)`` returns
    a job, or :class:`Reused` when the stage is already complete (its dependants are then ready at once).
    ``submit(job)`` starts a job and returns a handle with ``done() -> bool`` and ``result()`` (which raises
    the stage's error). After a failure nothing new is built or started (so its dependants never start), the
    running stages end, then the first failure is raised. The graph is checked (:func:`member_order`) before
    anything runs. Returns {member name: result} in the plan's order."""
    if max_parallel < 1:
        raise ValueError(f"max_parallel must be at least 1, got {max_parallel}")
    member_order(members)
    index = {m.name: i for i, m in enumerate(members)}
    unbuilt = list(members)
    queued: list[tuple[Member, Any]] = []  # built, waiting for a free slot, in the plan's order
    running: dict[str, Any] = {}
    done: dict[str, dict] = {}
    failure: Optional[BaseException] = None
    while True:
        if failure is None:
            try:
                _build_ready(unbuilt, queued, done, build_job, index)
                while queued and len(running) < max_parallel:
                    m, job = queued.pop(0)
                    running[m.name] = submit(job)
            except BaseException as e:  # noqa: BLE001 - let the running stages end, then raise
                failure = e
        if not running:
            break
        finished = [name for name, h in running.items() if h.done()]
        if not finished:
            sleep(poll_s)
            continue
        for name in finished:
            handle = running.pop(name)
            try:
                done[name] = handle.result()
            except BaseException as e:  # noqa: BLE001 - let the running stages end, then raise
                failure = failure or e
    if failure is not None:
        raise failure
    return {m.name: done[m.name] for m in members}


def _build_ready(unbuilt: list[Member], queued: list, done: dict[str, dict], build_job, index: dict) -> None:
    """Build every member whose teacher is ready, in the plan's order; a reused one counts as done at once (and
    may make others ready, hence the loop). Built jobs join ``queued``, kept in the plan's order."""
    progress = True
    while progress:
        progress = False
        for m in list(unbuilt):
            if m.teacher is not None and m.teacher not in done:
                continue
            built = build_job(m, dict(done))
            unbuilt.remove(m)
            if isinstance(built, Reused):
                done[m.name] = built.result
                progress = True
            else:
                queued.append((m, built))
    queued.sort(key=lambda q: index[q[0].name])


class _PrefectStage:
    """A submitted ``run-training`` task as a handle of :func:`schedule_members`."""

    def __init__(self, future: Any):
        self.future = future

    def done(self) -> bool:
        return self.future.state.is_final()

    def result(self) -> dict:
        return self.future.result()


def stage_submitter(pool: Optional[str]) -> Callable[[TrainJob], _PrefectStage]:
    """``submit`` of :func:`schedule_members`: the job as a ``run-training`` task (in-process or on ``pool``)."""

    def submit(job: TrainJob) -> _PrefectStage:
        return _PrefectStage(run_training.with_options(task_run_name=f"train-{job.name}").submit(job, pool))

    return submit


def run_pool(jobs: list[TrainJob], pool: Optional[str], max_parallel: int, poll_s: float = 0.5) -> dict[str, dict]:
    """Run independent ``jobs`` with at most ``max_parallel`` at a time (:func:`schedule_members`). Returns
    {job name: result}; the first failure is raised once the running stages have ended."""
    by_name = {j.name: j for j in jobs}
    members = [Member(role=j.role, name=j.name) for j in jobs]
    return schedule_members(members, lambda m, _done: by_name[m.name], stage_submitter(pool), max_parallel,
                            poll_s=poll_s)


class _Run:
    """What one flow run knows: the kind, its config, the store, the tracker and the ids that tag everything."""

    def __init__(self, kind: Kind, params: PipelineBase, cfg: Any):
        self.kind, self.params, self.cfg = kind, params, cfg
        self.lab = cfg.model_dump(mode="json")
        self.run_id = str(flow_run.id or "local")
        self.store_url = resolve_store_url(params.store_url)
        self.store = open_store(self.store_url)
        self.tracker = Tracker(resolve_tracking_uri(params.tracking_uri), params.experiment)
        self.salt = self.run_id if params.fresh else None
        self.commit = git_commit()
        self.notes: list[str] = []
        self.parent: Optional[str] = None
        self.log = get_run_logger()

    def job(self, role: str, name: str, data: dict, *, kd: Optional[dict] = None, teacher: Optional[dict] = None,
            init: Optional[dict] = None, speed: bool = False, eval_teacher: Optional[dict] = None,
            seed: Optional[int] = None) -> TrainJob:
        """``teacher``: what the stage learns from (keyed on its weights); ``eval_teacher``: what its evaluation
        compares with when that is another model (the run's teacher, for a member learning from a member);
        ``seed``: of the initial weights, for a kind that trains replicas per seed."""
        key = stage_key(self.kind, role, self.cfg, data_manifest_sha256=data["manifest_sha256"], kd=kd,
                        teacher_weights_sha256=teacher["weights_sha256"] if teacher else None,
                        init_weights_sha256=init["weights_sha256"] if init else None, salt=self.salt, seed=seed)
        return TrainJob(seed=seed,
            kind=self.kind.name, role=role, name=name, lab=self.lab, kd=kd, data_key=data["data_key"],
            out_prefix=f"stages/{key}", teacher_prefix=teacher["model_prefix"] if teacher else None,
            init_prefix=init["model_prefix"] if init else None, store_url=self.store_url,
            eval_teacher_prefix=eval_teacher["model_prefix"] if eval_teacher else None,
            tracking_uri=self.tracker.tracking_uri, experiment=self.params.experiment, parent_run_id=self.parent,
            speed=speed, keep_checkpoints=self.params.keep_checkpoints, tags={"prefect_flow_run_id": self.run_id, "git_commit": self.commit,
                               "data_manifest_sha256": data["manifest_sha256"]},
        )

    def group_job(self, name: str, members: list[Member], data: dict, teacher: dict) -> TrainJob:
        """One lockstep stage for ``members`` (``Kind.train_group``): each member keeps the stage prefix it would
        have alone; the group's own prefix (its checkpoints) is keyed on those."""
        keys = [self.job(m.role, m.name, data, kd=m.kd, teacher=teacher, seed=m.seed).out_prefix for m in members]
        gkey = sha256_json({"group": [[m.name, k] for m, k in zip(members, keys)]})[:32]
        spec = [{"role": m.role, "name": m.name, "kd": m.kd, "seed": m.seed, "out_prefix": k}
                for m, k in zip(members, keys)]
        return self.job("baseline", name, data, teacher=teacher).model_copy(
            update={"role": "group", "members": spec, "out_prefix": f"stages/{gkey}"})

    def single(self, job: TrainJob, what: str) -> dict:
        """One stage, reused when a completed stage with the same key verifies in the store."""
        found = stage_result(self.store, job.out_prefix)
        if found is not None:
            found["reused"] = True
            msg = (f"{what} reused from {self.store.uri(job.out_prefix)} (trained by flow run "
                   f"{found.get('executed_by', {}).get('flow_run_id') or '?'})")
            self.log.info(msg)
            self.notes.append(msg)
            return found
        self.notes.append(f"{what} made in this run ({self.store.uri(job.out_prefix)})")
        return run_pool([job], self.params.train_pool, 1)[job.name]


def pipeline_flow(kind_name: str, fn_name: str, doc: str):
    """The Prefect flow of a kind (``distill-<kind>``), taking the pipeline's parameters at the top level
    (:func:`flows.params.flow_signature`). Its first act is validation: a configuration the schema could not
    check (e.g. ``warmup_epochs >= epochs``) fails the flow run at once, the state message naming the field."""
    kind = get_kind(kind_name)
    signature, args_doc = flow_signature(kind_name)

    def body(**values: Any) -> Any:
        try:
            params = params_from_flow(kind_name, values)
        except ValidationError as e:
            message = f"invalid parameters, nothing was run: {validation_message(e)}"
            get_run_logger().error(message)
            return Failed(message=message)
        return run_pipeline(kind_name, params)

    body.__name__ = body.__qualname__ = fn_name
    body.__signature__ = signature  # type: ignore[attr-defined]
    body.__doc__ = f"{doc}\n\n{args_doc}\n"
    return flow(name=kind.flow, log_prints=True, timeout_seconds=flow_timeout_s())(body)


def flow_timeout_s() -> Optional[float]:
    """``$DISTILL_FLOW_TIMEOUT_S`` (read where the flow module is imported: the worker): the most seconds a
    pipeline flow run may take before Prefect marks it TimedOut (unset or 0: no limit)."""
    raw = os.environ.get("DISTILL_FLOW_TIMEOUT_S", "").strip()
    try:
        value = float(raw) if raw else 0.0
    except ValueError:
        raise ValueError(f"DISTILL_FLOW_TIMEOUT_S must be a number of seconds, got {raw!r}") from None
    return value if value > 0 else None


def run_pipeline(kind_name: str, params: PipelineBase) -> dict:
    """The body of every kind's flow."""
    kind = get_kind(kind_name)
    cfg = params.lab()  # validated before any compute
    r = _Run(kind, params, cfg)
    work_key = sha256_json({"kind": kind.name, "lab": r.lab, "experiment": params.experiment, "salt": r.salt})[:24]
    killed = r.tracker.end_dead_runs("distill.work_key", work_key, is_alive=prefect_run_alive)
    for dead_parent in list(killed):  # their stage runs too, unless a live worker still owns one
        killed += r.tracker.end_dead_runs("mlflow.parentRunId", dead_parent, is_alive=prefect_run_alive)
    if killed:
        r.log.info("marked %d MLflow run(s) of dead earlier attempts at this work KILLED", len(killed))
    profile = getattr(cfg, "profile", params.profile)
    r.parent = r.tracker.start_parent(
        f"{profile}-{flow_run.name or r.run_id[:8]}",
        {"kind": kind.name, "profile": profile, "train_pool": params.train_pool or "in-process", **flatten_params(r.lab)},
        {"prefect_flow_run_id": r.run_id, "git_commit": r.commit, "profile": profile, "distill.kind": kind.name,
         "distill.work_key": work_key, "distill.owner.flow_run_id": r.run_id},
        reuse_tag="prefect_flow_run_id",
    )
    with r.tracker.run_scope(r.parent):
        return _stages(r)


def _stages(r: _Run) -> dict:
    kind = r.kind
    if r.params.train_pool:  # before any compute: a pool no worker serves fails now, naming the pool
        ensure_pool_served(r.params.train_pool, log=r.log.warning)
    data = prepare_data(kind.name, r.lab, r.store_url)
    problems = kind.batch_errors(r.cfg, data["n_train"])
    if problems:  # a config error, before any stage is dispatched
        raise ValueError("; ".join(problems))
    r.tracker.log_dataset(r.parent, name=f"distill-{kind.name}-data", digest=data["manifest_sha256"],
                          source=data["uri"], profile={"n_train": data.get("n_train")})

    # --- teacher, then the kind's init stage: reused when a completed stage with the same key verifies --------
    tjob = r.job("teacher", "teacher", data)
    teacher = r.single(tjob, "teacher")
    tkey = tjob.out_prefix.split("/", 1)[1]
    r.tracker.set_tags(r.parent, {"teacher_reused": str(bool(teacher.get("reused"))).lower(), "teacher_key": tkey})
    results: dict[str, dict] = {"teacher": {**teacher, "name": "teacher", "role": "teacher"}}
    init = None
    if kind.has_init:
        init = r.single(r.job("init", INIT_NAME, data, teacher=teacher), "student init")
        results[INIT_NAME] = {**init, "name": INIT_NAME, "role": "init"}

    # --- baseline, students and sweep as one pool, each keyed by its own work ---------------------------------
    members: list[Member] = kind.plan(r.cfg)
    done, reused = _run_members(r, members, data, teacher, init)
    for m in members:
        res = done[m.name]
        # reused: found complete here, or by the stage itself (another run completed it meanwhile)
        results[m.name] = {**res, "name": m.name, "role": m.role, "main": m.main, "sweep": m.sweep,
                           "teacher_name": m.teacher or "teacher", "reused": m.name in reused or bool(res.get("reused")),
                           **({"seed": m.seed, "replica_of": m.replica_of} if m.replica_of is not None else {})}
    if reused:
        r.notes.append(f"completed earlier with the same data, config and code, reused: {', '.join(sorted(reused))}")
    for name, res in results.items():
        res.setdefault("history", _history(r.store, res))
        if res.get("reused"):
            _adopt_reused(r.tracker, r.parent, name, res, r.run_id)
    _speed_pass(r, data, results)
    return _finish(r, data, tkey, results)


def _run_members(r: _Run, members: list[Member], data: dict, teacher: dict,
                 init: Optional[dict]) -> tuple[dict[str, dict], set[str]]:
    """Every member of the plan, each keyed by its own work: one that learns from another member is keyed on (and
    started after) that member's result; members of one ``group`` train together in one lockstep stage (when the
    kind has ``train_group``); a completed stage with the same key is reused. Returns the results by member name
    and the names found complete before anything ran."""
    reused: set[str] = set()
    groups = _groups(r.kind, members)
    units, seen = [], set()
    for m in members:
        if m.group in groups:
            if m.group not in seen:
                units.append(Member(role="group", name=m.group))
                seen.add(m.group)
        else:
            units.append(m)

    found_in_groups: dict[str, dict] = {}

    def build(m: Member, so_far: dict[str, dict]) -> Any:
        if m.role == "group":  # members completed earlier (alone or in any group) are reused; the rest train
            todo = []
            for g in groups[m.name]:
                found = stage_result(r.store, r.job(g.role, g.name, data, kd=g.kd, teacher=teacher, seed=g.seed).out_prefix)
                if found is None:
                    todo.append(g)
                else:
                    found_in_groups[g.name] = found
                    reused.add(g.name)
            return r.group_job(m.name, todo, data, teacher) if todo else Reused({"members": {}})
        job = r.job(m.role, m.name, data, kd=m.kd, teacher=so_far[m.teacher] if m.teacher else teacher, init=init,
                    eval_teacher=teacher if m.teacher else None, seed=m.seed)
        found = stage_result(r.store, job.out_prefix)
        if found is None:
            return job
        reused.add(m.name)
        return Reused(found)

    # stages that may run at once: each CPU stage takes that share of the cores as torch threads (the teacher and
    # init stages run alone and keep them all)
    concurrent = max(1, min(r.params.max_parallel, len(units)))

    def build_concurrent(m: Member, so_far: dict[str, dict]) -> Any:
        job = build(m, so_far)
        return job.model_copy(update={"concurrent": concurrent}) if isinstance(job, TrainJob) else job

    done = schedule_members(units, build_concurrent, stage_submitter(r.params.train_pool), r.params.max_parallel)
    out: dict[str, dict] = {}
    for m in members:  # in the plan's order
        if m.group in groups:
            res = found_in_groups.get(m.name) or done[m.group]["members"][m.name]
            out[m.name] = {**res, "reused": bool(m.name in found_in_groups or done[m.group].get("reused"))}
        else:
            out[m.name] = done[m.name]
    return out, reused


def _groups(kind: Kind, members: list[Member]) -> dict[str, list[Member]]:
    """{group name: its members} when the kind trains groups; a grouped member must learn from the teacher."""
    if kind.train_group is None:
        return {}
    groups: dict[str, list[Member]] = {}
    names = {m.name for m in members}
    for m in members:
        if m.group is None:
            continue
        if m.teacher is not None or m.role not in ("baseline", "student") or m.group in names:
            raise ValueError(f"member {m.name!r} cannot train in group {m.group!r}: a group holds baselines and "
                             f"students of the run's teacher, and its name is no member's")
        groups.setdefault(m.group, []).append(m)
    return groups


def _speed_pass(r: _Run, data: dict, results: dict[str, dict]) -> None:
    """Latency and throughput of every model, one model at a time after all training ended: in-process stages
    share this machine's cores, so measuring inside a stage would time it against the other trainings."""
    if r.params.train_pool:
        r.notes.append("speed measured in this flow's process after all stages finished (not on the training pool's "
                       "hardware)")
    for name, res in results.items():
        try:
            s = measure_speed.with_options(task_run_name=f"speed-{name}")(r.kind.name, r.lab, r.store_url,
                                                                          data["data_key"], res["model_prefix"])
        except Exception as e:  # noqa: BLE001 - speed is a column, not a result: say so and go on
            r.log.warning("could not measure the speed of %s: %s", name, redact_text(str(e)))
            continue
        res["test"] = {**res.get("test", {}), **s, "speed_measured": "alone"}
        if res.get("mlflow_run_id") and not res.get("reused"):
            r.tracker.log_metrics(res["mlflow_run_id"], {k: v for k, v in s.items() if isinstance(v, (int, float))})


def _paired_baseline(results: dict[str, dict], res: dict) -> dict:
    """The baseline trained with the same seed as ``res`` (same initial weights and batches), else ``baseline``."""
    if res.get("seed") is not None:
        for other in results.values():
            if other.get("replica_of") == "baseline" and other.get("seed") == res["seed"]:
                return other
    return results["baseline"]


def _main_student(results: dict[str, dict]) -> str:
    return next((n for n, res in results.items() if res.get("main")), "student")


def _finish(r: _Run, data: dict, tkey: str, results: dict[str, dict]) -> dict:
    kind, params, tracker = r.kind, r.params, r.tracker
    tm = kind.test_metric
    sizes = {name: res["test"].get("n_images", res["test"].get("n_tokens")) for name, res in results.items()}
    if len(set(sizes.values())) != 1:  # every model was evaluated on the same held-out split
        raise RuntimeError(f"models were evaluated on different test splits: {sizes}")
    for res in results.values():
        base = _paired_baseline(results, res)["test"].get(tm.key)
        if res["role"] == "student" and base is not None and res.get("mlflow_run_id") and not res.get("reused"):
            tracker.log_metrics(res["mlflow_run_id"], {"kd_gain": tm.gain(res["test"][tm.key], base)})

    student = _main_student(results)
    registration = None
    if params.register_models:
        registration = register_models(
            kind.name, {"teacher": results["teacher"], "baseline": results["baseline"], "student": results[student]},
            store_url=r.store_url, tracking_uri=tracker.tracking_uri, experiment=params.experiment,
            data_key=data["data_key"],
            lineage={"data_manifest_sha256": data["manifest_sha256"], "prefect_flow_run_id": r.run_id,
                     "git_commit": r.commit, "teacher_key": tkey},
            margin=r.cfg.promotion_margin, evidence=_gate_evidence(kind, r.cfg, results, student),
            parent_run_id=r.parent,
        )
    report = publish_report(kind.name, results, registration, r.notes, r.store_url, r.run_id, tracker.tracking_uri,
                            params.experiment, r.parent)
    tracker.log_metrics(r.parent, {
        f"teacher_{tm.key}": results["teacher"]["test"][tm.key],
        f"baseline_{tm.key}": results["baseline"]["test"][tm.key],
        f"student_{tm.key}": results[student]["test"][tm.key],
        "kd_gain": tm.gain(results[student]["test"][tm.key], results["baseline"]["test"][tm.key]),
    })
    keep = ("test", "model_prefix", "mlflow_run_id", "executed_by", "reused", "stage_key", "resumed_from_epoch",
            "resumed_from_step", "teacher_name", "seed", "replica_of", "group", kind.selection.key)
    summary = redact({
        "kind": kind.name,
        "flow_run_id": r.run_id,
        "mlflow_parent_run_id": r.parent,
        "mlflow_experiment_id": tracker.experiment_id,
        "experiment": params.experiment,
        "tracking_uri": tracker.tracking_uri,
        "store_url": r.store_url,
        "data": data,
        "teacher_reused": bool(results["teacher"].get("reused")),
        "teacher_key": tkey,
        "results": {k: {kk: _jsonable(v[kk]) for kk in keep if kk in v} for k, v in results.items()},
        "registration": registration,
        "report": report,
    })
    r.store.put_json(summary, f"runs/{r.run_id}/summary.json")
    print(report["table"])
    return summary


def _gate_evidence(kind: Kind, cfg: Any, results: dict[str, dict], student: str) -> Optional[dict]:
    """With ``gate: ci_lower``: the paired per-seed gain of the main student over the baseline on the selection
    metric (mean and 95 % interval) that the promotion gate must see clear the margin."""
    if getattr(cfg, "gate", "mean") != "ci_lower":
        return None
    base = results[student].get("replica_of") or student
    gain = (seed_summary(kind, results).get(base) or {}).get("gain_selection") or {}
    return {"rule": "ci_lower", "metric": kind.selection.key, "n": gain.get("n", 0), "mean": gain.get("mean"),
            "lo": gain.get("lo"), "hi": gain.get("hi")}


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: x for k, x in v.items() if k != "samples"}
    return v


def _adopt_reused(tracker: Tracker, parent: str, name: str, r: dict, run_id: str) -> None:
    """A reused stage gets a nested run under this flow run's parent (FINISHED at once) carrying its history and
    test metrics and a tag naming the run that trained it, so this run's comparison and registration are whole
    even when the original run lives in another experiment or on another tracking server."""
    original = r.get("mlflow_run_id")
    tags = {"distill.stage_key": r.get("stage_key") or r.get("out_prefix") or "", "distill.role": r["role"],
            "distill.stage": name, "distill.reused": "true", "distill.reused_from_run": original or "",
            "prefect_flow_run_id": run_id}
    child = tracker.start_child(parent, name, {"role": r["role"], "stage": name}, tags)
    with tracker.run_scope(child):
        for row in r.get("history") or []:
            step = row.get("epoch", row.get("step"))
            if step is not None:
                tracker.log_metrics(child, {k: v for k, v in row.items() if k not in ("epoch", "step")
                                            and isinstance(v, (int, float))}, step=int(step))
        tracker.log_metrics(child, {k: v for k, v in r.get("test", {}).items()
                                    if isinstance(v, (int, float)) and not isinstance(v, bool)})
    tracker.set_tags(parent, {f"distill.reused.{name}": original or ""})
    # registration stays keyed on the run that trained the model when it is in this experiment, so a reused
    # model is not registered again as a new version
    r["adopted_run_id"] = child
    r["mlflow_run_id"] = original if original and _in_experiment(tracker, original) else child


def _in_experiment(tracker: Tracker, run_id: str) -> bool:
    try:
        return tracker.client.get_run(run_id).info.experiment_id == tracker.experiment_id
    except Exception:  # noqa: BLE001 - deleted, or another server
        return False


def _history(store, r: dict) -> list:
    try:
        return json.loads(store.get_dir_file(r["model_prefix"], "history.json"))
    except Exception:  # noqa: BLE001 - the curves are a convenience of the report
        return []


@task(name="publish-report")
def publish_report(kind_name, results, registration, notes, store_url, run_id, tracking_uri, experiment,
                   parent_run_id) -> dict:
    kind = get_kind(kind_name)
    out_dir = work_dir() / "runs" / run_id / "report"
    store = open_store(store_url)
    samples = fetch_sample_files(store.get_file, results, out_dir)  # image grids the evaluations wrote
    rep = build_report(kind, results, (registration or {}).get("promotion"), notes, out_dir, samples=samples)
    store.put_dir(out_dir, f"runs/{run_id}/report")
    report_uri = store.uri(f"runs/{run_id}/report")
    tracker = Tracker(tracking_uri, experiment)
    try:
        md = artifact_markdown(rep["markdown"], tracking_uri=tracker.tracking_uri,
                               experiment_id=tracker.experiment_id, run_id=parent_run_id, report_uri=report_uri,
                               mlflow_path="report")
        create_markdown_artifact(md, key=f"{kind.flow}-report", description="teacher vs baseline vs students")
        create_table_artifact(formatted_rows(kind.columns, rep["rows"]), key=f"{kind.flow}-table",
                              description="teacher vs baseline vs students (the report's columns)")
    except Exception as e:  # artifacts are a convenience; the report is in the store and MLflow regardless
        get_run_logger().warning("could not create Prefect artifacts: %s", redact_text(str(e)))
    tracker.log_artifacts(parent_run_id, out_dir, "report")
    return {"table": rep["table"], "uri": report_uri, "files": rep["files"]}


def run_local(flow_fn, params_model: type[PipelineBase], *, tracking_uri: Optional[str] = None,
              overrides: Optional[dict] = None, **fields: Any) -> dict:
    """``distill run <kind>``: the flow in-process (embedded default). Credentials in the tracking URI are moved
    to MLflow's variables first, so no copy of them is stored. Without PREFECT_API_URL a Prefect server is
    started for the run and dies with this process, even on SIGKILL (flows/embedded.py)."""
    from .embedded import embedded_prefect_server
    from .params import project_home

    params = params_model(tracking_uri=move_tracking_credentials(tracking_uri), overrides=overrides or {}, **fields)
    prefect_home = Path(os.environ.get("PREFECT_HOME") or project_home() / "prefect")
    with embedded_prefect_server(prefect_home):
        summary = flow_fn(**{name: getattr(params, name) for name in type(params).model_fields})
    uri = summary["tracking_uri"]
    print()
    print(f"MLflow runs: experiment {summary['experiment']!r}, parent run {summary['mlflow_parent_run_id']}")
    from tasks.report import mlflow_run_line

    print(mlflow_run_line(uri, summary.get("mlflow_experiment_id"), summary["mlflow_parent_run_id"], plain=True,
                          mlflow_cmd=".venv/bin/mlflow"))
    print(f"Report: {summary['report']['uri']}")
    return summary


def move_tracking_credentials(tracking_uri: Optional[str]) -> Optional[str]:
    """Credentials in a tracking URI go to MLflow's variables, so no copy of them is stored with the run."""
    if not tracking_uri:
        return tracking_uri
    tracking_uri, user, password = strip_userinfo(tracking_uri)
    if user:
        os.environ.setdefault("MLFLOW_TRACKING_USERNAME", unquote(user))
    if password:
        os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", unquote(password))
    return tracking_uri
