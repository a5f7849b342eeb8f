"""The comparison report: a markdown table and plots (training curves, accuracy against temperature)."""

from __future__ import annotations

import math
from pathlib import Path

COLUMNS = [
    ("model", "model"),
    ("val acc", "val_acc"),
    ("test acc", "test_accuracy"),
    ("KD gain", "kd_gain"),
    ("agreement", "agreement"),
    ("ECE", "test_ece"),
    ("params", "params"),
    ("size (MB)", "size_mb"),
    ("latency b1 CPU (ms)", "latency_ms_b1_cpu"),
    ("throughput b256 CPU (img/s)", "throughput_b256_cpu"),
]


def _fmt(key: str, v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key == "model":
        return str(v)
    if key == "params":
        return f"{int(v):,}"
    if key == "kd_gain":
        return f"{100 * v:+.2f} pt"
    if key in ("val_acc", "test_accuracy", "agreement"):
        return f"{100 * v:.2f} %"
    if key in ("size_mb", "latency_ms_b1_cpu"):
        return f"{v:.2f}"
    if key == "throughput_b256_cpu":
        return f"{v:,.0f}"
    return f"{v:.4f}"


def rows_for(results: dict[str, dict]) -> list[dict]:
    """One flat row per model; KD gain = test accuracy minus the baseline's (same data, same budget)."""
    base = results.get("baseline", {}).get("test", {}).get("test_accuracy")
    rows = []
    for name, r in results.items():
        t = r.get("test", {})
        row = {"model": name, "val_acc": r.get("val_acc"), **{k: t.get(k) for _, k in COLUMNS if k in t}}
        row["kd_gain"] = (t.get("test_accuracy") - base) if (base is not None and r.get("role") == "student") else None
        rows.append(row)
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    sep = "|" + "---|" * len(COLUMNS)
    body = ["| " + " | ".join(_fmt(k, row.get(k)) for _, k in COLUMNS) + " |" for row in rows]
    return "\n".join([head, sep, *body])


def plot_curves(results: dict[str, dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for name, r in results.items():
        hist = r.get("history") or []
        if not hist:
            continue
        ep = [h["epoch"] for h in hist]
        style = "-" if r.get("role") != "student" or name == "student" else ":"
        ax1.plot(ep, [h["train_loss"] for h in hist], style, label=name)
        ax2.plot(ep, [100 * h["val_acc"] for h in hist], style, label=name)
    ax1.set(title="training loss (students: the KD loss, not comparable to CE)", xlabel="epoch", ylabel="loss")
    ax2.set(title="validation accuracy", xlabel="epoch", ylabel="accuracy (%)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_sweep(sweep: list[dict], baseline_acc: float | None, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for alpha in sorted({s["alpha"] for s in sweep}):
        pts = sorted((s["temperature"], 100 * s["test_accuracy"]) for s in sweep if s["alpha"] == alpha)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=f"student, alpha={alpha:g}")
    if baseline_acc is not None:
        ax.axhline(100 * baseline_acc, color="grey", ls="--", label="baseline (hard labels)")
    ax.set_xscale("log", base=2)
    ax.set(title="test accuracy against temperature", xlabel="temperature T", ylabel="test accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_report(results: dict[str, dict], sweep: list[dict], promotion: dict | None, notes: list[str], out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = rows_for(results)
    table = markdown_table(rows)
    baseline_acc = results.get("baseline", {}).get("test", {}).get("test_accuracy")
    curves = plot_curves(results, out_dir / "training_curves.png")
    sweep_png = plot_sweep(sweep, baseline_acc, out_dir / "accuracy_vs_temperature.png") if sweep else None
    lines = ["# distill-cifar comparison", "", table, ""]
    if sweep:
        lines += ["## Temperature sweep (test accuracy)", "", "| T | alpha | test acc | KD gain |", "|---|---|---|---|"]
        for s in sorted(sweep, key=lambda s: (s["alpha"], s["temperature"])):
            gain = "-" if baseline_acc is None else f"{100 * (s['test_accuracy'] - baseline_acc):+.2f} pt"
            lines.append(f"| {s['temperature']:g} | {s['alpha']:g} | {100 * s['test_accuracy']:.2f} % | {gain} |")
        lines.append("")
    if promotion:
        lines += ["## Promotion gate", ""]
        lines.append(
            f"- student version {promotion.get('candidate_version')}: val acc {100 * promotion['candidate_val_acc']:.2f} % vs baseline "
            f"{100 * promotion['baseline_val_acc']:.2f} % (margin {100 * promotion['margin']:.2f} pt); champion before: "
            f"{promotion.get('champion_version_before') or 'none'}"
            + (f" ({100 * promotion['champion_val_acc_before']:.2f} %)" if promotion.get("champion_val_acc_before") is not None else "")
        )
        lines.append(f"- decision: **{'promoted to champion' if promotion['promoted'] else 'not promoted'}** ({promotion['reason']})")
        lines.append("")
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    lines += ["Plots: training_curves.png" + (", accuracy_vs_temperature.png" if sweep_png else "")]
    md = "\n".join(lines) + "\n"
    (out_dir / "report.md").write_text(md)
    return {"markdown": md, "table": table, "rows": rows, "files": [str(p) for p in (out_dir / "report.md", curves, sweep_png) if p]}
