"""Per-stage vs lockstep training of one run's students, side by side in one process (issue 9).

The same members (a baseline on hard labels plus distilled students at several temperatures, optionally per
seed) are trained twice on the same data:

- **per-stage**: one :func:`distill.image.train.fit` per member, as the pipeline did before lockstep groups: each
  distilled member runs the frozen teacher on every batch, each pays its own set-up (and, on CUDA, its own
  torch.compile and CUDA-graph capture);
- **lockstep**: one :func:`distill.image.train.fit_group` of all members: one augmented batch per step, the
  teacher run once, every member updated in turn.

Printed: wall time of each path (set-up and compilation included, since a stage pays them), steady-state
images/s per member, the lockstep speed-up, the teacher forward's share of one per-stage distillation step,
and, on CPU, whether every member's weights are bit-identical between the two paths.

    .venv/bin/python bench/bench_lockstep.py                         # CPU, small models, 6 members
    python3 bench/bench_lockstep.py --device cuda --models seed      # GPU: ResNet-18 students, ResNet-34 teacher
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from _common import fmt, write_json  # noqa: E402
from distill.image.config import KDConfig, TrainConfig  # noqa: E402
from distill.image.models import build_model  # noqa: E402
from distill.image.train import fit, fit_group, predict, resolve_runtime  # noqa: E402

MODEL_SETS = {
    "small": {"student": ("resnet_small", {"num_classes": 10, "width": 8, "depth": 1}),
              "teacher": ("resnet_small", {"num_classes": 10, "width": 16, "depth": 1})},
    "seed": {"student": ("resnet18", {"num_classes": 10}), "teacher": ("resnet34", {"num_classes": 10})},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--models", default=None, choices=sorted(MODEL_SETS), help="default: seed on CUDA, small on CPU")
    p.add_argument("--temperatures", default="1,2,4,8,16", help="distilled members (plus the baseline)")
    p.add_argument("--seeds", default="0", help="members are replicated per seed (initial weights)")
    p.add_argument("--images", type=int, default=None, help="training images (default 10240 CUDA, 512 CPU)")
    p.add_argument("--batch", type=int, default=None, help="default 128 CUDA, 32 CPU")
    p.add_argument("--epochs", type=int, default=2, help="epochs per path; on CUDA the first is the compile warm-up")
    p.add_argument("--compile", default="auto", choices=["auto", "off", "default", "reduce-overhead"])
    p.add_argument("--order", default="per-stage,lockstep", help="which path runs first")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    a.models = a.models or ("seed" if cuda else "small")
    a.images = a.images or (10240 if cuda else 512)
    a.batch = a.batch or (128 if cuda else 32)
    a.temperatures = [float(t) for t in a.temperatures.split(",") if t]
    a.seeds = [int(s) for s in a.seeds.split(",") if s]
    return a


def make_data(n: int, n_val: int = 256, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n + n_val, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n + n_val,), generator=g, dtype=torch.int64)
    return {"train": (x[:n], y[:n]), "val": (x[n:], y[n:])}


def members(a) -> list[tuple[str, int, KDConfig | None]]:
    out = []
    for s in a.seeds:
        out.append((f"baseline-s{s}", s, None))
        out += [(f"T{t:g}-s{s}", s, KDConfig(temperature=t, alpha=0.7)) for t in a.temperatures]
    return out


def student(a, seed: int) -> torch.nn.Module:
    name, kw = MODEL_SETS[a.models]["student"]
    torch.manual_seed(seed)
    return build_model(name, **kw)


def teacher_model(a) -> torch.nn.Module:
    name, kw = MODEL_SETS[a.models]["teacher"]
    torch.manual_seed(1234)
    return build_model(name, **kw).eval()


def _steady(history: list[dict], compiled: bool) -> tuple[float, float]:
    rows = history[1:] if compiled and len(history) > 1 else history
    secs = sum(r["epoch_seconds"] for r in rows)
    imgs = sum(r["images_per_second"] * r["epoch_seconds"] for r in rows)
    return imgs, secs


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_per_stage(a, data, cfg, teacher) -> dict:
    t0 = time.perf_counter()
    models, imgs, secs = {}, 0.0, 0.0
    for name, seed, kd in members(a):
        m, res = fit(student(a, seed), data, cfg, teacher=teacher if kd else None, kd=kd, desc=name)
        models[name] = m
        i, s = _steady(res.history, cfg.compile != "off")
        imgs, secs = imgs + i, secs + s
    _sync()
    return {"wall_seconds": time.perf_counter() - t0, "member_images_per_second": imgs / secs, "models": models}


def run_lockstep(a, data, cfg, teacher) -> dict:
    t0 = time.perf_counter()
    group = [(name, student(a, seed), kd) for name, seed, kd in members(a)]
    out = fit_group(group, data, cfg, teacher=teacher, desc="lockstep")
    _sync()
    wall = time.perf_counter() - t0
    res = next(iter(out.values()))[1]
    imgs, secs = _steady(res.history, cfg.compile != "off")
    return {"wall_seconds": wall, "member_images_per_second": imgs * len(group) / secs,
            "models": {n: m for n, (m, _) in out.items()}}


def teacher_share(a, data, cfg, teacher) -> dict:
    """Seconds per batch of the teacher forward alone vs one per-stage distillation step (eager, after warm-up)."""
    rt = resolve_runtime(cfg)
    xb = data["train"][0][: a.batch]
    stats = ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    t = teacher.to(rt.device)

    def timed(fn, n=10):
        fn()
        _sync()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        _sync()
        return (time.perf_counter() - t0) / n

    fwd = timed(lambda: predict(t, xb, rt, a.batch, stats=stats))
    one = dict(data, train=(data["train"][0][: a.batch * 4], data["train"][1][: a.batch * 4]))
    c1 = cfg.model_copy(update={"epochs": 1, "compile": "off"})
    _, res = fit(student(a, 0), one, c1, teacher=teacher, kd=KDConfig())
    step = res.history[0]["epoch_seconds"] / 4
    return {"teacher_forward_s": fwd, "distill_step_s": step, "share": fwd / step}


def _identical(x: dict, y: dict) -> bool:
    for name in x:
        sa, sb = x[name].state_dict(), y[name].state_dict()
        if not all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa):
            return False
    return True


def main(argv=None) -> dict:
    a = parse_args(argv)
    data = make_data(a.images)
    cfg = TrainConfig(epochs=a.epochs, batch_size=a.batch, lr=0.1, schedule="cosine_epoch", seed=0, device=a.device,
                      compile=a.compile, eval_batch_size=256, progress="off")
    rt = resolve_runtime(cfg)
    cfg = cfg.model_copy(update={"compile": rt.compile})
    card = torch.cuda.get_device_name(0) if rt.device.type == "cuda" else "cpu"
    n = len(members(a))
    print(f"device {rt.device} ({card}) | torch {torch.__version__} | models {a.models} | {n} members "
          f"(baseline + T in {a.temperatures}, seeds {a.seeds}) | {a.images} images x {a.epochs} epochs, batch "
          f"{a.batch} | compile {rt.compile} | amp {rt.amp}")
    teacher = teacher_model(a)
    share = teacher_share(a, data, cfg, teacher)
    print(f"teacher forward {share['teacher_forward_s'] * 1e3:.2f} ms/batch = {100 * share['share']:.0f} % of one "
          f"per-stage distillation step ({share['distill_step_s'] * 1e3:.2f} ms, eager)")
    runs = {}
    for path in a.order.split(","):
        fn = run_per_stage if path == "per-stage" else run_lockstep
        runs[path] = fn(a, data, cfg, teacher)
        r = runs[path]
        print(f"  {path:<10} wall {r['wall_seconds']:7.1f} s | {fmt(r['member_images_per_second'])} member-img/s")
    ps, ls = runs["per-stage"], runs["lockstep"]
    same = _identical(ps["models"], ls["models"]) if rt.device.type == "cpu" else None
    result = {
        "device": str(rt.device), "card": card, "torch": torch.__version__, "models": a.models, "members": n,
        "images": a.images, "epochs": a.epochs, "batch": a.batch, "compile": rt.compile, "teacher": share,
        "per_stage": {k: v for k, v in ps.items() if k != "models"},
        "lockstep": {k: v for k, v in ls.items() if k != "models"},
        "speedup_wall": ps["wall_seconds"] / ls["wall_seconds"],
        "speedup_steady": ls["member_images_per_second"] / ps["member_images_per_second"],
        "bit_identical": same,
    }
    print(f"\n| path | wall (s) | member-img/s (steady) |\n|---|---:|---:|\n"
          f"| per-stage ({n} fits) | {ps['wall_seconds']:.1f} | {fmt(ps['member_images_per_second'])} |\n"
          f"| lockstep (1 group) | {ls['wall_seconds']:.1f} | {fmt(ls['member_images_per_second'])} |\n")
    print(f"lockstep / per-stage: {result['speedup_wall']:.2f}x wall, {result['speedup_steady']:.2f}x steady-state"
          + ("" if same is None else f"; members bit-identical between the paths: {same}"))
    write_json(a.json, result)
    return result


if __name__ == "__main__":
    main()
