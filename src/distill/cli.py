"""The ``distill`` command.

  distill stage prepare  [--kind cifar|lm] --profile smoke [--source PATH] [--cache DIR]
  distill stage train    [--kind K] --role teacher|init|baseline|student --data DIR --out DIR [--teacher DIR]
                         [--init DIR] [-T 4 --alpha 0.7] [--member NAME]
  distill stage evaluate [--kind K] --model DIR --data DIR [--teacher DIR] [--split test|val]
  distill lab            [--kind K] --profile smoke --out runs/lab   (all stages in-process, no Prefect)
  distill run cifar|lm   --profile smoke [--fresh] [--no-register]   (the Prefect flow; needs the pipeline extra)
  distill config         [--kind K] --profile seed                   (print the resolved config)
  distill --version

``--kind`` picks the distillation kind (:mod:`distill.kinds`; default ``cifar``, the image classifiers).

Every subcommand takes ``--set section.field=value`` overrides, validated before any compute. A user
error (bad config or argument, bad data, a checkpoint that does not fit) is one line on stderr,
``distill: <message>``, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from pydantic import ValidationError

from . import __version__
from . import home as distill_home
from .image.config import parse_overrides
from .kinds import get_kind, kind_names
from .seedstats import seed_table

log = logging.getLogger("distill.cli")

# `distill run` flags by PipelineParams field, so that their errors name what the user typed
_RUN_FLAGS = {"train_pool": "--train-pool", "store_url": "--store", "tracking_uri": "--tracking-uri"}


class _Parser(argparse.ArgumentParser):
    """argparse, with usage errors on one line: ``distill: <message> (see 'distill stage train --help')``."""

    def error(self, message: str):
        self.exit(2, f"distill: {message} (see '{self.prog} --help')\n")


def error_lines(e: ValidationError, prefix: tuple = (), names: dict | None = None) -> list[str]:
    """One line per pydantic error, naming the field as ``section.field`` (``prefix`` prepended)."""
    lines = []
    for err in e.errors():
        loc = [str(p) for p in (*prefix, *err["loc"])]
        if loc and names and loc[0] in names:
            loc[0] = names[loc[0]]
        msg = " ".join(err["msg"].removeprefix("Value error, ").split())
        lines.append(f"{'.'.join(loc)}: {msg}" if loc else msg)
    return lines


def _fail(*lines: str) -> int:
    for line in lines:
        print(f"distill: {' '.join(str(line).split())}", file=sys.stderr)
    return 2


def _common(p: argparse.ArgumentParser, kind: bool = True) -> None:
    if kind:
        p.add_argument("--kind", default="cifar", choices=kind_names(), help="distillation kind (default: cifar)")
    p.add_argument("--profile", default="smoke", help="smoke | seed | full (default: smoke)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set student_train.epochs=3 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="distill", description="Knowledge distillation: stages and pipeline")
    ap.add_argument("--version", action="version", version=f"distill {__version__}")
    ap.add_argument("-q", "--quiet", action="store_true")
    sub = ap.add_subparsers(dest="cmd", required=True)

    st = sub.add_parser("stage", help="run one stage of the lab (no Prefect, MLflow or boto3 needed)")
    ssub = st.add_subparsers(dest="stage", required=True)
    p = ssub.add_parser("prepare", help="decode the data set into the uint8 cache; prints the prepared folder")
    _common(p)
    p.add_argument("--source", help="cifar: ImageFolder folder/tarball or torchvision CIFAR-10 folder (default: $DISTILL_CIFAR10)")
    p.add_argument("--cache", help="cache folder (default: config data.cache_dir)")
    p = ssub.add_parser("train", help="train the teacher, the baseline or a distilled student (lm: also 'init')")
    _common(p)
    p.add_argument("--role", required=True, choices=["teacher", "init", "baseline", "student"])
    p.add_argument("--data", required=True, help="prepared data folder (output of 'stage prepare')")
    p.add_argument("--out", required=True, help="output folder: weights, config, metrics.json, history.json")
    p.add_argument("--teacher", help="teacher output folder (role student; lm: also init)")
    p.add_argument("--init", help="lm: the init stage's output folder, the starting point of baseline and student")
    p.add_argument("-T", "--temperature", type=float, help="KD temperature (default: config kd.temperature)")
    p.add_argument("--alpha", type=float, help="KD weight of the soft term (default: config kd.alpha)")
    p.add_argument("--member", help="--role student: the plan member to train (e.g. progressive-4, consistency, "
                   "sweep-rkl); default: the main student")
    p.add_argument("--no-resume", action="store_true", help="ignore existing checkpoints in --out")
    p = ssub.add_parser("evaluate", help="evaluate a trained model")
    _common(p)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--teacher", help="teacher folder, for top-1 agreement")
    p.add_argument("--split", default="test", choices=["train", "val", "test"])
    p.add_argument("--out", help="metrics JSON path (default: MODEL/eval_SPLIT.json)")

    p = sub.add_parser("lab", help="run prepare, teacher, baseline, student and evaluation in-process")
    _common(p)
    p.add_argument("--out", default="runs/lab")
    p.add_argument("--source")

    p = sub.add_parser("config", help="print the resolved, validated config as JSON")
    _common(p)

    p = sub.add_parser("run", help="run a Prefect pipeline in-process (needs the 'pipeline' extra)")
    p.add_argument("pipeline", choices=kind_names())
    _common(p, kind=False)
    p.add_argument("--train-pool", help="dispatch training stages to this Prefect work pool")
    p.add_argument("--store", help="store URL: file:///path or s3://bucket/prefix (default $DISTILL_STORE_URL or .distill/store)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or .distill/mlflow.db)")
    p.add_argument("--fresh", action="store_true", help="run afresh, reusing no earlier results (passed to the flow as fresh=True)")
    p.add_argument("--no-register", action="store_true", help="do not log and register the models in MLflow")
    return ap


def _check_args(args) -> str | None:
    """Argument combinations argparse cannot express; the message, or None."""
    if args.cmd == "stage" and args.stage == "train":
        if args.role in ("student", "init") and not args.teacher:
            return f"stage train --role {args.role} needs --teacher DIR (the output folder of the teacher stage)"
        if args.role == "init" and not get_kind(args.kind).has_init:
            return f"--role init: kind {args.kind!r} has no init stage"
        if args.role != "student" and args.member:
            return f"--member applies to --role student only, not --role {args.role}"
        if args.role != "student" and (args.temperature is not None or args.alpha is not None):
            return f"-T/--temperature and --alpha apply to --role student only, not --role {args.role}"
    return None


def _kind(args):
    return get_kind(args.pipeline if args.cmd == "run" else args.kind)


def _config(args):
    return _kind(args).load_profile(args.profile, parse_overrides(args.overrides))


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def run_lab(kind, cfg, out: Path) -> dict:
    """The kind's stages, in-process, with no orchestration: prepare, teacher, init (if the kind has one),
    baseline and the main student (with the members it learns from, e.g. earlier progressive rounds), then
    evaluation of each on the held-out split (against the run's teacher); prints the table."""
    from .kinds import INIT_NAME, comparison_rows, markdown_table

    prep = kind.prepare(cfg, progress=True)
    data_dir = prep["dir"]
    t_dir = out / "teacher"
    results = {"teacher": {**kind.train("teacher", cfg, data_dir, t_dir), "role": "teacher"}}
    init_dir = None
    if kind.has_init:
        init_dir = out / INIT_NAME
        results[INIT_NAME] = {**kind.train("init", cfg, data_dir, init_dir, teacher_dir=t_dir), "role": "init"}
    plan = {m.name: m for m in kind.plan(cfg)}
    dirs = {"teacher": t_dir, **({INIT_NAME: init_dir} if init_dir else {})}
    groups: dict[str, list] = {}
    if kind.train_group is not None:  # lockstep groups train whole: the sweep and the seeds come with them
        for m in plan.values():
            if m.group is not None:
                groups.setdefault(m.group, []).append(m)
    for group, members in groups.items():
        spec = [{"role": m.role, "name": m.name, "kd": m.kd, "seed": m.seed} for m in members]
        trained = kind.train_group(cfg, data_dir, out / group, spec, teacher_dir=t_dir)
        for m in members:
            results[m.name] = {**trained[m.name], "role": m.role, "main": m.main, "sweep": m.sweep,
                               **({"seed": m.seed, "replica_of": m.replica_of} if m.replica_of is not None else {})}
            dirs[m.name] = out / group / m.name
    wanted: list[str] = []
    for m in plan.values():  # the baseline, the main student and the members it learns from (progressive rounds)
        chain, name = [], (m.name if m.group not in groups and (m.role == "baseline" or m.main) else None)
        while name is not None and name not in wanted:
            chain.append(name)
            name = plan[name].teacher
        wanted += reversed(chain)
    for name in wanted:
        m = plan[name]
        teacher_dir = out / m.teacher if m.teacher else t_dir
        res = kind.train(m.role, cfg, data_dir, out / m.name, teacher_dir=teacher_dir, init_dir=init_dir, kd=m.kd,
                         **({"seed": m.seed} if m.seed is not None else {}))
        results[m.name] = {**res, "role": m.role}
        dirs[m.name] = out / m.name
    for name, res in results.items():
        res["test"] = kind.evaluate(dirs[name], data_dir, cfg, teacher_dir=None if name == "teacher" else t_dir)
    table = markdown_table(kind.columns, comparison_rows(kind, results))
    seeds = seed_table(kind, results)
    (out / "report.md").write_text(table + "\n" + (f"\n{seeds}\n" if seeds else ""))
    print(table)
    if seeds:
        print(f"\n{seeds}")
    return {"prepare": prep["manifest_sha256"], "results": results}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error already printed on one line
        return e.code if isinstance(e.code, int) else 2
    problem = _check_args(args)
    if problem:
        return _fail(problem)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "botocore", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    kd = None
    try:
        kind = _kind(args)
        cfg = _config(args)
        if args.cmd == "stage" and args.stage == "train" and args.role == "student":
            if args.member or not hasattr(cfg, "kd"):  # a member of the kind's plan (diffusion: progressive-4, ...)
                members = {m.name: m for m in kind.plan(cfg) if m.role == "student"}
                name = args.member or next(n for n, m in members.items() if m.main)
                if name not in members:
                    return _fail(f"--member {name!r} is not a student of this config's plan: {', '.join(members)}")
                kd = members[name].kd
            else:
                update = {k: v for k, v in (("temperature", args.temperature), ("alpha", args.alpha)) if v is not None}
                try:
                    kd = type(cfg.kd).model_validate({**cfg.kd.model_dump(), **update}).model_dump(mode="json")
                except ValidationError as e:
                    return _fail(*(f"invalid configuration: {line}" for line in error_lines(e, ("kd",))))
    except ValidationError as e:
        return _fail(*(f"invalid configuration: {line}" for line in error_lines(e)))
    except ValueError as e:  # unknown profile, malformed or conflicting --set
        return _fail(e)

    from .checkpoint import CheckpointError
    from .errors import DataError

    try:
        if args.cmd == "config":
            _print(cfg.model_dump(mode="json"))
        elif args.cmd == "stage":
            _stage(args, kind, cfg, kd)
        elif args.cmd == "lab":
            if args.source:
                _set_source(cfg, args.source)
            run_lab(kind, cfg, Path(args.out))
        elif args.cmd == "run":
            return _run(args)
    except ValidationError as e:
        return _fail(*(f"invalid configuration: {line}" for line in error_lines(e)))
    except (DataError, CheckpointError, ValueError) as e:  # user mistakes: bad data, folders, checkpoints, values
        log.debug("user error", exc_info=True)
        return _fail(e)
    return 0


def _set_source(cfg, source: str) -> None:
    if not hasattr(cfg.data, "source"):
        raise ValueError("--source applies to --kind cifar; set the text files with --set data.train=[...]")
    cfg.data.source = source


def _stage(args, kind, cfg, kd) -> None:
    if args.stage == "prepare":
        if args.source:
            _set_source(cfg, args.source)
        if args.cache:
            cfg.data.cache_dir = args.cache
        res = kind.prepare(cfg, progress=True)
        _print({"dir": res["dir"], "manifest_sha256": res["manifest_sha256"], **res.get("summary", {})})
    elif args.stage == "train":
        _print(kind.train(args.role, cfg, args.data, args.out, teacher_dir=args.teacher, init_dir=args.init, kd=kd,
                          resume=not args.no_resume))
    elif args.stage == "evaluate":
        res = kind.evaluate(args.model, args.data, cfg, split=args.split, teacher_dir=args.teacher, out_path=args.out)
        _print({k: v for k, v in res.items() if k != "per_class_accuracy"})


def _pipelines(group: str) -> dict:
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=group)}


def _run(args) -> int:
    """``distill run <kind>``: the kind's Prefect flow in-process. The flows live outside the core (``flows/``);
    they are found through the ``distill.pipelines`` entry points, so the core never imports them."""
    import os

    runners, params = _pipelines("distill.pipelines"), _pipelines("distill.pipeline_params")
    if args.pipeline not in runners or "default" not in params:
        return _fail(f"no pipeline for kind {args.pipeline!r} is installed: install the 'pipeline' extra "
                     "(pip install 'distill[pipeline]') from the project folder")
    overrides = parse_overrides(args.overrides)
    try:
        params_model = params["default"].load()
        run_local = runners[args.pipeline].load()
    except ImportError as e:  # pragma: no cover - depends on the install
        return _fail(f"the pipeline needs the 'pipeline' extra (pip install 'distill[pipeline]'): {e}")
    try:  # the flow's own parameter check, before Prefect starts
        params_model(args.pipeline)(profile=args.profile, overrides=overrides, train_pool=args.train_pool,
                                    store_url=args.store, tracking_uri=args.tracking_uri)
    except ValidationError as e:
        return _fail(*(f"invalid parameters: {line}" for line in error_lines(e, names=_RUN_FLAGS)))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "distill")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
    if "PREFECT_API_URL" not in os.environ and "PREFECT_HOME" not in os.environ:
        prefect_home = distill_home.home() / "prefect"
        prefect_home.mkdir(parents=True, exist_ok=True)
        os.environ["PREFECT_HOME"] = str(prefect_home)
    run_local(
        profile=args.profile, overrides=overrides, train_pool=args.train_pool,
        store_url=args.store, tracking_uri=args.tracking_uri,
        **({"fresh": True} if args.fresh else {}),
        **({"register_models": False} if args.no_register else {}),
    )
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
