"""The ``distill`` command.

  distill stage prepare  --profile smoke [--source PATH] [--cache DIR]
  distill stage train    --role teacher|baseline|student --data DIR --out DIR [--teacher DIR] [-T 4 --alpha 0.7]
  distill stage evaluate --model DIR --data DIR [--teacher DIR] [--split test|val]
  distill lab            --profile smoke --out runs/lab      (all stages in-process, no Prefect)
  distill run cifar      --profile smoke [--fresh] [--no-register]  (the Prefect flow; needs the pipeline extra)
  distill config         --profile seed                       (print the resolved config)
  distill --version

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
from .image.config import KDConfig, load_profile, parse_overrides

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


def _common(p: argparse.ArgumentParser) -> None:
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
    p.add_argument("--source", help="ImageFolder folder/tarball or torchvision CIFAR-10 folder (default: $DISTILL_CIFAR10)")
    p.add_argument("--cache", help="cache folder (default: config data.cache_dir)")
    p = ssub.add_parser("train", help="train the teacher, the baseline or a distilled student")
    _common(p)
    p.add_argument("--role", required=True, choices=["teacher", "baseline", "student"])
    p.add_argument("--data", required=True, help="prepared data folder (output of 'stage prepare')")
    p.add_argument("--out", required=True, help="output folder: model.safetensors, config.json, metrics.json")
    p.add_argument("--teacher", help="teacher output folder (role student)")
    p.add_argument("-T", "--temperature", type=float, help="KD temperature (default: config kd.temperature)")
    p.add_argument("--alpha", type=float, help="KD weight of the soft term (default: config kd.alpha)")
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
    p.add_argument("pipeline", choices=["cifar"])
    _common(p)
    p.add_argument("--train-pool", help="dispatch training stages to this Prefect work pool")
    p.add_argument("--store", help="store URL: file:///path or s3://bucket/prefix (default $DISTILL_STORE_URL or .distill/store)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI or .distill/mlflow.db)")
    p.add_argument("--fresh", action="store_true", help="run afresh, reusing no earlier results (passed to the flow as fresh=True)")
    p.add_argument("--no-register", action="store_true", help="do not log and register the models in MLflow")
    return ap


def _check_args(args) -> str | None:
    """Argument combinations argparse cannot express; the message, or None."""
    if args.cmd == "stage" and args.stage == "train":
        if args.role == "student" and not args.teacher:
            return "stage train --role student needs --teacher DIR (the output folder of the teacher stage)"
        if args.role != "student" and (args.temperature is not None or args.alpha is not None):
            return f"-T/--temperature and --alpha apply to --role student only, not --role {args.role}"
    return None


def _config(args):
    return load_profile(args.profile, parse_overrides(args.overrides))


def _print(obj) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True, default=str))


def run_lab(cfg, out: Path) -> dict:
    """The three stages of the lab plus evaluation, in-process, with no orchestration."""
    from .image import stages

    prep = stages.prepare(cfg.data)
    data_dir = prep["dir"]
    results = {}
    for role in ("teacher", "baseline", "student"):
        results[role] = stages.train(role, cfg, data_dir, out / role, teacher_dir=out / "teacher" if role == "student" else None)
    evals = {}
    for role in ("teacher", "baseline", "student"):
        evals[role] = stages.evaluate(out / role, data_dir, cfg.eval, teacher_dir=None if role == "teacher" else out / "teacher")
    rows = ["| model | val acc | test acc | agreement | ECE | params | latency b1 CPU (ms) |", "|---|---|---|---|---|---|---|"]
    for role in ("teacher", "baseline", "student"):
        e = evals[role]
        rows.append(
            f"| {role} | {results[role]['val_acc']:.4f} | {e['accuracy']:.4f} | {e.get('agreement', float('nan')):.4f} | "
            f"{e['ece']:.4f} | {int(e['params']):,} | {e.get('latency_ms_b1_cpu', float('nan')):.2f} |"
        )
    table = "\n".join(rows)
    (out / "report.md").write_text(table + "\n")
    print(table)
    return {"prepare": prep["manifest_sha256"], "train": results, "evaluate": evals}


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
        cfg = _config(args)
        if args.cmd == "stage" and args.stage == "train" and args.role == "student":
            try:
                kd = KDConfig(
                    loss=cfg.kd.loss,
                    temperature=args.temperature if args.temperature is not None else cfg.kd.temperature,
                    alpha=args.alpha if args.alpha is not None else cfg.kd.alpha,
                )
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
            _print(cfg.digest_dict())
        elif args.cmd == "stage":
            from .image import stages

            if args.stage == "prepare":
                if args.source:
                    cfg.data.source = args.source
                res = stages.prepare(cfg.data, args.cache)
                _print({"dir": res["dir"], "manifest_sha256": res["manifest_sha256"], "counts": res["manifest"]["counts"]})
            elif args.stage == "train":
                res = stages.train(args.role, cfg, args.data, args.out, teacher_dir=args.teacher, kd=kd, resume=not args.no_resume)
                _print(res)
            elif args.stage == "evaluate":
                res = stages.evaluate(args.model, args.data, cfg.eval, split=args.split, teacher_dir=args.teacher, out_path=args.out)
                _print({k: v for k, v in res.items() if k != "per_class_accuracy"})
        elif args.cmd == "lab":
            if args.source:
                cfg.data.source = args.source
            run_lab(cfg, Path(args.out))
        elif args.cmd == "run":
            import os

            try:
                from flows.params import PipelineParams
            except ImportError as e:  # pragma: no cover - depends on the install
                return _fail(f"the pipeline needs the 'pipeline' extra (pip install 'distill[pipeline]'): {e}")
            overrides = parse_overrides(args.overrides)
            try:  # the flow's own parameter check, before Prefect starts
                PipelineParams(profile=args.profile, overrides=overrides, train_pool=args.train_pool,
                               store_url=args.store, tracking_uri=args.tracking_uri)
            except ValidationError as e:
                return _fail(*(f"invalid parameters: {line}" for line in error_lines(e, names=_RUN_FLAGS)))
            os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
            os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "distill")
            os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
            if "PREFECT_API_URL" not in os.environ and "PREFECT_HOME" not in os.environ:
                home = Path(os.environ.get("DISTILL_HOME", ".distill")).resolve() / "prefect"
                home.mkdir(parents=True, exist_ok=True)
                os.environ["PREFECT_HOME"] = str(home)
            try:
                from flows.cifar import run_local
            except ImportError as e:  # pragma: no cover - depends on the install
                return _fail(f"the pipeline needs the 'pipeline' extra (pip install 'distill[pipeline]'): {e}")
            run_local(
                profile=args.profile, overrides=overrides, train_pool=args.train_pool,
                store_url=args.store, tracking_uri=args.tracking_uri,
                **({"fresh": True} if args.fresh else {}),
                **({"register_models": False} if args.no_register else {}),
            )
    except ValidationError as e:
        return _fail(*(f"invalid configuration: {line}" for line in error_lines(e)))
    except (DataError, CheckpointError, ValueError) as e:  # user mistakes: bad data, folders, checkpoints, values
        log.debug("user error", exc_info=True)
        return _fail(e)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
