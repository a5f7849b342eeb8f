"""The comparison report of any kind: a markdown table (the kind's columns), the sweep, the promotion decision,
generated samples when the kind has them (text, or image files its evaluation wrote), and plots (training
curves; the test metric across the sweep; quality against sampling steps when the kind declares
``extras["curve"]``)."""

from __future__ import annotations

import logging
import math
import re
import shlex
from pathlib import Path
from typing import Any, Callable, Optional

from distill.files import contained_path
from distill.kinds import Column, Kind, comparison_rows, markdown_table
from distill.seedstats import seed_summary, seed_table
from tasks.secrets import redact_text, redact_url, strip_userinfo
from tasks.tracking import UI_RUNS_VIEW

__all__ = ["artifact_markdown", "build_report", "curve_points", "fetch_sample_files", "formatted_rows",
           "mlflow_run_line", "plot_quality_vs_steps", "sweep_points"]

log = logging.getLogger("distill.report")
SAMPLES_DIR = "samples"
#: the order of the models in the samples section: teacher, baseline, the init stage, students
_ROLE_ORDER = {"teacher": 0, "baseline": 1, "init": 2, "student": 3}


def sweep_points(kind: Kind, results: dict[str, dict]) -> list[dict]:
    """The sweep members (and the main student when it is one), with their coordinates and test metric; with
    replicas per seed, one point per member: the mean over its seeds, with ``lo`` / ``hi`` (the 95 % t
    interval of the test metric) and ``n``."""
    tm = kind.test_metric
    summary = seed_summary(kind, results)
    if summary:
        return [{**s["sweep"], "name": name, tm.key: s["test"]["mean"], "lo": s["test"]["lo"], "hi": s["test"]["hi"],
                 "n": s["test"]["n"]} for name, s in summary.items() if s.get("sweep") and s.get("test")]
    return [{**r["sweep"], "name": name, tm.key: r["test"].get(tm.key)}
            for name, r in results.items() if r.get("sweep") and r.get("test")]


def _baseline_band(kind: Kind, results: dict[str, dict]) -> tuple[Optional[float], Optional[tuple[float, float]]]:
    """The baseline's test metric (its mean over seeds when replicated) and its 95 % interval (or None)."""
    s = seed_summary(kind, results).get("baseline")
    if s and s.get("test"):
        t = s["test"]
        return t["mean"], ((t["lo"], t["hi"]) if t.get("lo") is not None else None)
    return results.get("baseline", {}).get("test", {}).get(kind.test_metric.key), None


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(kind: Kind, results: dict[str, dict], path: Path) -> Path | None:
    """Training loss and the selection metric on validation, per model, against epochs or steps."""
    sel = kind.selection.key
    curves = {n: r["history"] for n, r in results.items() if r.get("history")}
    if not curves:
        return None
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    xlabel = "epoch"
    for name, hist in curves.items():
        xkey = "epoch" if "epoch" in hist[0] else "step"
        xlabel = xkey
        r = results[name]
        style = "-" if r.get("role") != "student" or r.get("main") else ":"
        xs = [h[xkey] for h in hist]
        if all("train_loss" in h for h in hist):
            ax1.plot(xs, [h["train_loss"] for h in hist], style, label=name)
        if all(sel in h for h in hist):
            scale = 100 if kind.selection.key.endswith("acc") else 1
            ax2.plot(xs, [scale * h[sel] for h in hist], style, label=name)
    ax1.set(title="training loss (students: the KD loss, not comparable to CE)", xlabel=xlabel, ylabel="loss")
    ax2.set(title=kind.selection.label or sel, xlabel=xlabel, ylabel=sel)
    if kind.selection.direction == "min":
        ax2.set_yscale("log")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(kind: Kind, points: list[dict], baseline: float | None, path: Path,
               band: Optional[tuple[float, float]] = None) -> Path:
    """The test metric across the sweep: a line per value of the second axis against a numeric first axis
    (temperature), or grouped bars for a categorical first axis (the LM loss kind). Points with ``lo`` / ``hi``
    (means over seeds) get error bars of their 95 % interval; ``band``: the baseline's interval, shaded."""
    plt = _plt()
    tm = kind.test_metric
    xkey, lkey = kind.sweep_axes
    scale = 100 if tm.key.endswith("accuracy") else 1
    fig, ax = plt.subplots(figsize=(6.5, 4))
    numeric = all(isinstance(p.get(xkey), (int, float)) for p in points)
    groups = sorted({p.get(lkey) for p in points}, key=str) if lkey else [None]
    if numeric:
        for g in groups:
            pts = sorted((p for p in points if p.get(lkey) == g), key=lambda p: p[xkey])
            xs, ys = [p[xkey] for p in pts], [scale * p[tm.key] for p in pts]
            label = f"student, {lkey}={g}" if lkey else "student"
            if all(p.get("lo") is not None for p in pts):
                err = [[y - scale * p["lo"] for p, y in zip(pts, ys)], [scale * p["hi"] - y for p, y in zip(pts, ys)]]
                ax.errorbar(xs, ys, yerr=err, fmt="o-", capsize=3, label=f"{label} (mean, 95 % CI)")
            else:
                ax.plot(xs, ys, "o-", label=label)
        ax.set_xscale("log", base=2)
    else:
        xs = sorted({str(p.get(xkey)) for p in points})
        width = 0.8 / max(len(groups), 1)
        for gi, g in enumerate(groups):
            vals = {str(p.get(xkey)): scale * p[tm.key] for p in points if p.get(lkey) == g}
            pos = [i + gi * width for i, x in enumerate(xs) if x in vals]
            ax.bar(pos, [vals[x] for x in xs if x in vals], width, label=f"{lkey}={g}" if lkey else None)
        ax.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(xs))], xs)
    if baseline is not None:
        ax.axhline(scale * baseline, color="grey", ls="--", label="baseline (hard labels)")
    if band is not None:
        ax.axhspan(scale * band[0], scale * band[1], color="grey", alpha=0.15, label="baseline 95 % CI")
    ax.set(title=f"{tm.label or tm.key} across the sweep", xlabel=xkey, ylabel=tm.key)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def curve_points(curve: dict, results: dict[str, dict]) -> dict[str, list[tuple[float, float]]]:
    """{model: [(steps, metric)]} for every model whose test metrics have at least one finite
    ``curve["key"].format(steps)`` over ``curve["steps"]`` (missing and NaN points are skipped)."""
    out = {}
    for name, r in results.items():
        test = r.get("test") or {}
        pts = [(s, float(test[curve["key"].format(s)])) for s in curve["steps"]
               if _finite(test.get(curve["key"].format(s)))]
        if pts:
            out[name] = pts
    return out


def plot_quality_vs_steps(kind: Kind, results: dict[str, dict], path: Path) -> Path | None:
    """The kind's ``extras["curve"]`` (``steps``, ``key`` with ``{}`` for the step count, ``label``, ``x_label``,
    ``log_x``): one line per model against sampling steps, and the teacher's test metric as a dashed
    horizontal line (labelled with its own step count when its test metrics have ``steps``)."""
    curve = kind.extras.get("curve")
    if not curve:
        return None
    lines = curve_points(curve, results)
    if not lines:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, pts in lines.items():
        r = results[name]
        style = "o-" if r.get("role") != "student" or r.get("main") else "o:"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=name)
    teacher = (results.get("teacher") or {}).get("test") or {}
    ref = teacher.get(kind.test_metric.key)
    if _finite(ref):
        steps = teacher.get("steps")
        label = f"teacher ({steps:g} steps)" if _finite(steps) else "teacher"
        ax.axhline(float(ref), color="grey", ls="--", label=label)
    if curve.get("log_x"):
        ax.set_xscale("log", base=2)
    ax.set_xticks(list(curve["steps"]), [str(s) for s in curve["steps"]])
    label = curve.get("label") or curve["key"].format("N")
    ax.set(title=f"{label} against {curve.get('x_label') or 'steps'}", xlabel=curve.get("x_label") or "steps",
           ylabel=label)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sample_order(results: dict[str, dict]) -> list[str]:
    names = list(results)
    return sorted(names, key=lambda n: (_ROLE_ORDER.get(results[n].get("role"), len(_ROLE_ORDER)), names.index(n)))


def fetch_sample_files(get_file: Callable[[str, Path], Any], results: dict[str, dict],
                       out_dir: Path) -> dict[str, dict[str, Optional[Path]]]:
    """Bring each model's evaluation files (``res["test"]["files"]``: {label: store key}) into
    ``out_dir/samples/<model>/`` with ``get_file(key, local_path)``; returns {model: {label: local path, or None
    when it could not be fetched (logged)}}, models ordered teacher, baseline, students."""
    out: dict[str, dict[str, Optional[Path]]] = {}
    for name in _sample_order(results):
        files = (results[name].get("test") or {}).get("files")
        if not isinstance(files, dict) or not files:
            continue
        got: dict[str, Optional[Path]] = {}
        for label, key in files.items():
            try:
                local = contained_path(out_dir, f"{SAMPLES_DIR}/{name}/{Path(str(key)).name}", follow_links=False)
                local.parent.mkdir(parents=True, exist_ok=True)
                get_file(str(key), local)
                got[str(label)] = local
            except Exception as e:  # noqa: BLE001 - a missing picture never fails the report
                log.warning("could not fetch sample file %s of %s: %s", key, name, e)
                got[str(label)] = None
        out[name] = got
    return out


def _sample_files_lines(samples: dict[str, dict[str, Optional[Path]]], out_dir: Path) -> list[str]:
    """The "Samples" section: a markdown table with one row per model and one column per file label."""
    if not samples:
        return []
    labels: list[str] = []
    for files in samples.values():
        labels += [lb for lb in files if lb not in labels]
    lines = ["## Samples (same noise for every model)", "", "| model | " + " | ".join(labels) + " |",
             "|" + "---|" * (len(labels) + 1)]
    missing = []
    for name, files in samples.items():
        cells = []
        for lb in labels:
            path = files.get(lb)
            if path is not None and Path(path).is_file():
                rel = Path(path).resolve().relative_to(out_dir.resolve()).as_posix()
                cells.append(f"![{name} {lb}]({rel})")
            else:
                cells.append("-")
                if lb in files:
                    missing.append(f"{name}/{lb}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    if missing:
        lines += [f"Not available (could not be fetched from the store): {', '.join(missing)}.", ""]
    return lines


def _promotion_lines(kind: Kind, p: dict) -> list[str]:
    metric = p.get("metric", kind.selection.key)
    cand = p.get("candidate", p.get("candidate_val_acc"))
    base = p.get("baseline", p.get("baseline_val_acc"))
    champ = p.get("champion_before", p.get("champion_val_acc_before"))
    rule = "higher" if p.get("direction", kind.selection.direction) == "max" else "lower"
    line = (f"- student version {p.get('candidate_version')}: {metric} {_num(cand)} vs baseline {_num(base)} "
            f"(margin {_num(p.get('margin'))}, {rule} wins); champion before: {p.get('champion_version_before') or 'none'}")
    if champ is not None:
        line += f" ({_num(champ)})"
    rule = []
    if p.get("rule") == "ci_lower" and p.get("evidence"):
        e = p["evidence"]
        rule = [f"- rule ci_lower: the lower bound of the 95 % interval of the paired {e.get('metric')} gain over "
                f"{e.get('n')} seeds must reach the margin: interval [{_num(e.get('lo'))}, {_num(e.get('hi'))}], "
                f"mean {_num(e.get('mean'))}, margin {_num(p.get('margin'))}"]
    return ["## Promotion gate", "", line, *rule,
            f"- decision: **{'promoted to champion' if p['promoted'] else 'not promoted'}** ({p['reason']})", ""]


def _num(v: Any) -> str:
    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
        return f"{v:.4f}"
    return "-"


def _samples_lines(results: dict[str, dict]) -> list[str]:
    lines: list[str] = []
    for name, r in results.items():
        samples = (r.get("test") or {}).get("samples")
        if not samples:
            continue
        if not lines:
            lines = ["## Samples (greedy, fixed prompts)", ""]
        lines.append(f"**{name}**")
        lines.append("")
        for s in samples:
            prompt, text = (s.get("prompt", ""), s.get("completion", s.get("text", ""))) if isinstance(s, dict) else ("", s)
            lines.append(f"- `{_one_line(prompt)}` → {_one_line(text)}")
        lines.append("")
    return lines


def _one_line(s: str) -> str:
    return " ".join(str(s).split()).replace("|", "\\|")[:300]


def build_report(kind: Kind, results: dict[str, dict], promotion: dict | None, notes: list[str], out_dir: Path,
                 samples: dict[str, dict[str, Optional[Path]]] | None = None) -> dict:
    """The report in ``out_dir`` (``report.md`` and its plots). ``samples``: the models' evaluation files
    already in ``out_dir`` (:func:`fetch_sample_files`), shown in a "Samples" section."""
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = comparison_rows(kind, results)
    table = markdown_table(kind.columns, rows)
    tm = kind.test_metric
    baseline, band = _baseline_band(kind, results)
    curves = plot_curves(kind, results, out_dir / "training_curves.png")
    points = sweep_points(kind, results)
    sweep_png = (plot_sweep(kind, points, baseline, out_dir / f"{tm.key}_across_sweep.png", band=band)
                 if len(points) > 1 else None)
    steps_png = plot_quality_vs_steps(kind, results, out_dir / "quality_vs_steps.png")
    seeds = seed_table(kind, results)
    lines = [f"# {kind.flow} comparison", "", table, ""] + ([seeds, ""] if seeds else [])
    speed = {r.get("test", {}).get("speed_measured") for r in results.values()}
    if speed == {"alone"}:
        lines += ["Speed columns: each model measured on its own after every training stage had finished.", ""]
    elif speed - {None}:
        lines += ["Speed columns: some models were measured while other stages were training (under load).", ""]
    if len(points) > 1:
        xkey, lkey = kind.sweep_axes
        keys = [k for k in (xkey, lkey) if k]
        cols = [*keys, tm.key, "gain vs baseline"]
        lines += ["## Sweep", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        col = next((c for c in kind.columns if c.key == tm.key), None)
        gain_col = next((c for c in kind.columns if c.key == "gain"), None)
        for p in sorted(points, key=lambda p: tuple(str(p.get(k)) for k in keys)):
            gain = tm.gain(p[tm.key], baseline) if baseline is not None and p[tm.key] is not None else None
            fmt = (col.format(p[tm.key]) if col else _num(p[tm.key]))
            g = gain_col.format(gain) if gain_col else _num(gain)
            lines.append("| " + " | ".join([*(f"{p.get(k)}" for k in keys), fmt, g]) + " |")
        lines.append("")
    if steps_png:
        lines += [f"## {kind.extras['curve'].get('label') or 'Quality'} against "
                  f"{kind.extras['curve'].get('x_label') or 'steps'}", "", f"![quality vs steps]({steps_png.name})", ""]
    if promotion:
        lines += _promotion_lines(kind, promotion)
    lines += _samples_lines(results)
    lines += _sample_files_lines(samples or {}, out_dir)
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    plots = [p for p in (curves, sweep_png, steps_png) if p]
    if plots:
        lines += ["Plots: " + ", ".join(p.name for p in plots)]
    md = "\n".join(lines) + "\n"
    (out_dir / "report.md").write_text(md)
    return {"markdown": md, "table": table, "rows": rows, "seed_summary": seed_summary(kind, results),
            "files": [str(p) for p in (out_dir / "report.md", *plots)]}


# --- the Prefect artifacts ------------------------------------------------------------------------------------


def formatted_rows(columns: tuple[Column, ...], rows: list[dict]) -> list[dict[str, str]]:
    """The comparison table as a Prefect table artifact wants it: one {header: formatted value} per model, the
    kind's columns formatted exactly as in the markdown table (:func:`distill.kinds.markdown_table`)."""
    return [{c.header: c.format(row.get(c.key)) for c in columns} for row in rows]


def mlflow_run_line(tracking_uri: Optional[str], experiment_id: Optional[str], run_id: Optional[str], *,
                    plain: bool = False, mlflow_cmd: str = "mlflow") -> str:
    """Where the run is in MLflow: a link to ``<server>/#/experiments/<id>/runs/<id>`` for an http(s) tracking
    server (credentials stripped), else the ``mlflow ui`` command that serves the local store (sqlite, file).
    Markdown by default; ``plain``: for a terminal (no link syntax, no backticks); ``mlflow_cmd``: the command
    shown (e.g. ``.venv/bin/mlflow``)."""
    if not tracking_uri or not run_id:
        return ""
    uri = str(tracking_uri)
    scheme = uri.split(":", 1)[0].lower() if "://" in uri else ""
    if scheme in ("http", "https"):
        base = strip_userinfo(uri)[0].split("#", 1)[0].rstrip("/")
        url = f"{base}/#/experiments/{experiment_id}/runs/{run_id}?{UI_RUNS_VIEW}" if experiment_id else f"{base}/#/"
        link = url if plain else f"[{url}]({url})"
        return f"MLflow run: {link}" if experiment_id else f"MLflow: {link} (run {run_id})"
    shown = redact_url(uri) or ""
    where = f"/#/experiments/{experiment_id}/runs/{run_id}?{UI_RUNS_VIEW}" if experiment_id else "/#/"
    tick = "" if plain else "`"
    return (f"MLflow run {run_id}: serve the tracking store with {tick}{mlflow_cmd} ui --backend-store-uri "
            f"{shlex.quote(shown)} --port 5000{tick} and open http://127.0.0.1:5000{where}")


#: a markdown image whose target is no absolute http(s) URL (a file next to report.md)
_LOCAL_IMAGE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?!https?://)(?P<src>[^)\s]+)\)")


def artifact_markdown(markdown: str, *, tracking_uri: Optional[str] = None, experiment_id: Optional[str] = None,
                      run_id: Optional[str] = None, report_uri: Optional[str] = None,
                      mlflow_path: str = "report") -> str:
    """The report's markdown as a Prefect markdown artifact: first a line that leads to the MLflow parent run
    (:func:`mlflow_run_line`); local image links (plots, sample grids) become the file's name in code, since the
    Prefect UI cannot show files next to report.md; below the comparison table, where the plots and images are
    (the report folder in the store and the MLflow run's ``report/`` artifacts). ``report.md`` itself keeps its
    relative links."""
    lines = _LOCAL_IMAGE.sub(lambda m: f"`{m.group('src')}`", markdown).split("\n")
    where = []
    if report_uri:
        where.append(f"the report folder `{redact_text(report_uri)}`")
    if run_id:
        where.append(f"the MLflow run's artifacts under `{mlflow_path}/`")
    if where:
        note = f"Plots and images (not shown here): {' and '.join(where)}."
        start = next((i for i, line in enumerate(lines) if line.startswith("|")), None)
        if start is None:
            lines += ["", note]
        else:
            end = start
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            lines[end:end] = ["", note]
    head = mlflow_run_line(tracking_uri, experiment_id, run_id)
    text = "\n".join(lines)
    return f"{redact_text(head)}\n\n{text}" if head else text
