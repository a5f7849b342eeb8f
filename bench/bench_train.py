#!/usr/bin/env python
"""Side-by-side throughput: the seed's training loop (bench/seed_loop.py) vs our trainer (distill.image.train.fit).

For each stage (baseline = student with hard labels, distill = student + frozen teacher, teacher = the teacher
with hard labels) and each repeat, the two loops run in the same process, one after the other, in alternating
order; the table reports medians over the repeats and ours / seed.

- seed loop: PIL-decoding DataLoader (2 workers), fp32, SGD; a warm-up of a few steps, then a fixed number of
  timed steps (one epoch of a dataset long enough for all of them).
- ours: ``fit(..., TrainConfig(epochs=1 + E))`` on the same synthetic images held as one uint8 tensor: the first
  epoch is the warm-up (torch.compile, CUDA-graph recording, cuDNN/allocator warm-up); the images/s of the
  remaining E epochs come from ``FitResult.history`` (each epoch is timed between CUDA synchronisations and
  excludes the validation pass). On CUDA fit uses bf16 autocast, channels_last and data on the GPU; the
  compile mode is taken from --compile, one row per mode.

Data: synthetic CIFAR-shaped uint8 images and random labels (10 classes), like ../shared/ANCHORS.md's throughput
table.

    python bench/bench_train.py                       # auto device; CPU: small models, GPU: resnet18/34
    python bench/bench_train.py --device cuda --compile off,reduce-overhead --json out.json
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
try:
    import distill  # noqa: F401
except ImportError:  # running from a checkout without `pip install -e .`: use ./src
    sys.path.insert(0, str(HERE.parent / "src"))

import numpy as np
import torch
import torchvision
from _common import fmt, write_json

from distill.image.config import KDConfig, TrainConfig
from distill.image.losses import get_loss
from distill.image.models import build_model, count_parameters
from distill.image.train import fit

import seed_loop

STAGES = ("baseline", "distill", "teacher")
COMPILE_MODES = ("off", "default", "reduce-overhead")
MODEL_SETS = {
    # the seed's models: CIFAR ResNet-18 student, CIFAR ResNet-34 teacher (distill.image.models, shared by both loops)
    "seed": {"student": ("resnet18", {}), "teacher": ("resnet34", {})},
    # CPU-sized: the smoke preset's models
    "small": {"student": ("resnet_small", {"width": 8, "depth": 1}), "teacher": ("resnet_small", {"width": 16, "depth": 1})},
}
TEMPERATURE, ALPHA = 4.0, 0.7


def _csv(choices):
    def parse(s: str) -> list[str]:
        items = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if not items or bad:
            raise argparse.ArgumentTypeError(f"choose from {','.join(choices)}; got {s!r}")
        return list(dict.fromkeys(items))

    return parse


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--stages", type=_csv(STAGES), default=list(STAGES), help="comma list of baseline,distill,teacher")
    p.add_argument("--models", choices=sorted(MODEL_SETS), default=None,
                   help="seed = resnet18 student / resnet34 teacher; small = resnet_small width 8 / 16 "
                        "(default: seed on CUDA, small on CPU)")
    p.add_argument("--images", type=int, default=None,
                   help="synthetic training images for our trainer (one epoch); default 10240 on CUDA, "
                        "1024 on CPU with small models, 2 batches on CPU with seed models")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--compile", type=_csv(COMPILE_MODES), default=None,
                   help="our trainer's torch.compile modes, one row each (default: off,reduce-overhead on CUDA, off on CPU)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the table shows medians")
    p.add_argument("--seed-warmup", type=int, default=None, help="untimed seed-loop steps (default 10 CUDA, 2 CPU)")
    p.add_argument("--seed-steps", type=int, default=None,
                   help="timed seed-loop steps (default 200 CUDA; CPU: images/batch)")
    p.add_argument("--our-epochs", type=int, default=None,
                   help="timed epochs of our trainer after one warm-up epoch (default 3 CUDA, 1 CPU)")
    p.add_argument("--workers", type=int, default=2, help="seed DataLoader workers (the seed used 2)")
    p.add_argument("--json", default=None, help="write all numbers to this JSON file")
    a = p.parse_args(argv)

    if a.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: CUDA is not available")
    cuda = a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available())
    a.device = "cuda" if cuda else "cpu"
    if a.models is None:
        a.models = "seed" if cuda else "small"
    if a.images is None:
        a.images = 10240 if cuda else (1024 if a.models == "small" else 2 * a.batch)
    if a.compile is None:
        a.compile = ["off", "reduce-overhead"] if cuda else ["off"]
    if a.seed_warmup is None:
        a.seed_warmup = 10 if cuda else (2 if a.models == "small" else 1)
    if a.seed_steps is None:
        a.seed_steps = 200 if cuda else max(1, a.images // a.batch)
    if a.our_epochs is None:
        a.our_epochs = 3 if cuda else 1
    for name in ("images", "batch", "repeats", "seed_steps", "our_epochs", "workers"):
        if getattr(a, name) < (0 if name == "workers" else 1):
            p.error(f"--{name.replace('_', '-')} must be positive")
    if a.seed_warmup < 0:
        p.error("--seed-warmup must be >= 0")
    if a.images < a.batch:
        p.error(f"--images ({a.images}) must be at least --batch ({a.batch})")
    return a


def make_data(n: int, n_val: int, seed: int = 0):
    """Synthetic CIFAR-shaped uint8 images (CHW for us, HWC for the seed's dataset) and labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n + n_val, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (n + n_val,), generator=g, dtype=torch.int64)
    ours = {"train": (x[:n], y[:n]), "val": (x[n:], y[n:])}
    seed_hwc = np.ascontiguousarray(x[:n].permute(0, 2, 3, 1).numpy())
    return ours, seed_hwc, y[:n].numpy()


def stage_models(models: str, stage: str):
    """(trained model, frozen teacher or None) for a stage: fresh instances, one set per loop."""
    spec = MODEL_SETS[models]
    s_name, s_kw = spec["student"]
    t_name, t_kw = spec["teacher"]
    if stage == "baseline":
        return build_model(s_name, **s_kw), None
    if stage == "distill":
        return build_model(s_name, **s_kw), build_model(t_name, **t_kw)
    return build_model(t_name, **t_kw), None


def check_loss_equivalence() -> float:
    """Max |ours - seed's| of the distillation loss on random logits (sanity check that both optimise the same)."""
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(256, 10, generator=g) * 3, torch.randn(256, 10, generator=g) * 3
    y = torch.randint(0, 10, (256,), generator=g)
    ours = get_loss("kd")(s, t, y, temperature=TEMPERATURE, alpha=ALPHA)
    seed = seed_loop.distillation_loss(s, t, y, TEMPERATURE, ALPHA)
    return float((ours - seed).abs())


def _dynamo_counters() -> dict:
    try:
        from torch._dynamo.utils import counters
    except Exception:  # pragma: no cover
        return {}
    return {
        "unique_graphs": int(counters["stats"]["unique_graphs"]),
        "graph_breaks": int(sum(counters["graph_break"].values())),
        "cudagraph_skips": int(counters["inductor"]["cudagraph_skips"]),
    }


def run_seed(stage, model, teacher, seed_hwc, labels, a, device) -> dict:
    length = (a.seed_warmup + a.seed_steps) * a.batch
    ds = seed_loop.SeedCIFAR(seed_hwc, labels, seed_loop.seed_transform(), length=max(length, len(seed_hwc)))
    loader = seed_loop.make_loader(ds, batch_size=a.batch, num_workers=a.workers)
    return seed_loop.time_seed_loop(
        model, loader, device, teacher=teacher, warmup_steps=a.seed_warmup, steps=a.seed_steps,
        temperature=TEMPERATURE, alpha=ALPHA,
    )


def run_ours(stage, model, teacher, data, a, mode: str, rep: int) -> dict:
    cfg = TrainConfig(
        epochs=1 + a.our_epochs, batch_size=a.batch, lr=0.1, momentum=0.9, weight_decay=5e-4,
        schedule="cosine_epoch", seed=rep, device=a.device, compile=mode, eval_batch_size=a.batch, progress="off",
    )
    kd = KDConfig(loss="kd", temperature=TEMPERATURE, alpha=ALPHA) if teacher is not None else None
    before = _dynamo_counters()
    t0 = time.perf_counter()
    _, res = fit(model, data, cfg, teacher=teacher, kd=kd, desc=f"bench-{stage}")
    wall = time.perf_counter() - t0
    after = _dynamo_counters()
    timed = res.history[1:]
    imgs = sum(r["images_per_second"] * r["epoch_seconds"] for r in timed)
    secs = sum(r["epoch_seconds"] for r in timed)
    return {
        "images_per_second": imgs / secs,
        "seconds": secs,
        "images": int(round(imgs)),
        "steps": (len(data["train"][0]) // a.batch) * len(timed),
        "warmup_epoch_seconds": res.history[0]["epoch_seconds"],
        "fit_images_per_second_incl_warmup": res.images_per_second,
        "wall_seconds": wall,
        "runtime": res.runtime,
        "dynamo": {k: after[k] - before.get(k, 0) for k in after},
    }


def main(argv=None) -> dict:
    a = parse_args(argv)
    device = torch.device(a.device)
    # Several fit() calls compile the same model classes in one process (3 stages x modes x fresh instances);
    # keep dynamo from falling back to eager at its default limit of 8 recompiles per code object.
    try:
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    except Exception:
        pass

    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "none (CPU)"
    meta = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": str(device),
        "card": card,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "argv": sys.argv[1:] if argv is None else list(argv),
        "args": {k: v for k, v in vars(a).items() if k != "json"},
        "kd_loss_max_abs_diff_vs_seed": check_loss_equivalence(),
    }
    spec = MODEL_SETS[a.models]
    meta["models"] = {
        role: {"name": n, "kwargs": kw, "params": count_parameters(build_model(n, **kw))} for role, (n, kw) in spec.items()
    }
    print(f"device: {device} | card: {card} | torch {torch.__version__} | torchvision {torchvision.__version__} | "
          f"CUDA {torch.version.cuda} | {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}", flush=True)
    print(f"models: student {spec['student'][0]}{spec['student'][1] or ''}, teacher {spec['teacher'][0]}{spec['teacher'][1] or ''}"
          f" | batch {a.batch} | ours: {a.images} images x (1 warm-up + {a.our_epochs} timed epochs), compile {','.join(a.compile)}"
          f" | seed: {a.workers} workers, {a.seed_warmup} warm-up + {a.seed_steps} timed steps | repeats {a.repeats}", flush=True)
    print(f"kd loss, ours vs the seed's formula: max |diff| = {meta['kd_loss_max_abs_diff_vs_seed']:.2e}", flush=True)

    data, seed_hwc, labels = make_data(a.images, n_val=a.batch)
    # one model set per (loop, stage), reused across repeats and compile modes: repeats then hit the compile cache
    seed_models = {s: stage_models(a.models, s) for s in a.stages}
    our_models = {s: stage_models(a.models, s) for s in a.stages}

    runs = []  # every measurement
    t_start = time.perf_counter()
    for rep in range(a.repeats):
        for stage in a.stages:
            order = [("seed", None)] + [("ours", m) for m in a.compile]
            if rep % 2 == 1:
                order.reverse()  # alternate who goes first, so a drift in machine load does not favour one side
            for side, mode in order:
                if side == "seed":
                    m, t = seed_models[stage]
                    r = run_seed(stage, m, t, seed_hwc, labels, a, device)
                else:
                    m, t = our_models[stage]
                    r = run_ours(stage, m, t, data, a, mode, rep)
                r.update(repeat=rep, stage=stage, loop=side, compile=mode)
                runs.append(r)
                # a partial file after every measurement: a run killed by a time limit still leaves its numbers
                write_json(a.json, {"meta": meta, "partial": True, "runs": runs})
                extra = ""
                if side == "ours":
                    extra = f" (warm-up epoch {r['warmup_epoch_seconds']:.1f}s"
                    if mode != "off":
                        d = r["dynamo"]
                        extra += f"; graphs {d.get('unique_graphs', 0)}, breaks {d.get('graph_breaks', 0)}, cudagraph skips {d.get('cudagraph_skips', 0)}"
                    extra += ")"
                label = "seed" if side == "seed" else f"ours[{mode}]"
                print(f"  repeat {rep + 1}/{a.repeats} {stage:8s} {label:22s} {fmt(r['images_per_second']):>9s} img/s"
                      f" over {r['steps']} steps, {r['seconds']:.2f}s{extra}  [{time.perf_counter() - t_start:.0f}s]", flush=True)

    rows = []
    for stage in a.stages:
        seed_v = [r["images_per_second"] for r in runs if r["stage"] == stage and r["loop"] == "seed"]
        for mode in a.compile:
            ours_v = [r["images_per_second"] for r in runs if r["stage"] == stage and r["loop"] == "ours" and r["compile"] == mode]
            s_med, o_med = statistics.median(seed_v), statistics.median(ours_v)
            rows.append({
                "stage": stage, "compile": mode,
                "seed_images_per_second": s_med, "ours_images_per_second": o_med, "ratio": o_med / s_med,
                "seed_all": seed_v, "ours_all": ours_v,
            })

    print()
    print(f"{card} | torch {torch.__version__} | batch {a.batch} | models {a.models} | median of {a.repeats}")
    print("| stage | compile | seed img/s | ours img/s | ratio ours/seed |")
    print("|---|---|---:|---:|---:|")
    for r in rows:
        spread = ""
        if len(r["seed_all"]) > 1:
            spread = (f" (seed {fmt(min(r['seed_all']))}-{fmt(max(r['seed_all']))},"
                      f" ours {fmt(min(r['ours_all']))}-{fmt(max(r['ours_all']))})")
        print(f"| {r['stage']} | {r['compile']} | {fmt(r['seed_images_per_second'])} | {fmt(r['ours_images_per_second'])} | "
              f"{r['ratio']:.2f}x |{spread}")
    distill_rows = [r for r in rows if r["stage"] == "distill"]
    target = None
    if distill_rows:
        best = max(distill_rows, key=lambda r: r["ratio"])
        target = {"stage": "distill", "batch": a.batch, "required_ratio": 4.0, "best_compile": best["compile"],
                  "best_ratio": best["ratio"], "met": best["ratio"] >= 4.0,
                  "applies": device.type == "cuda" and "H100" in card and a.batch == 128 and a.models == "seed"}
        note = "" if target["applies"] else " (the target is defined for an H100, batch 128, resnet18/34: not this run)"
        print(f"target: distillation >= 4.0x the seed loop: best {best['ratio']:.2f}x with compile={best['compile']}"
              f" -> {'met' if target['met'] else 'NOT met'}{note}")
    print(f"total {time.perf_counter() - t_start:.0f}s")

    out = {"meta": meta, "partial": False, "rows": rows, "target": target, "runs": runs}
    if a.json:
        write_json(a.json, out)
        print(f"wrote {a.json}")
    return out


if __name__ == "__main__":
    main()
