"""Training stages running at once on one CPU machine: torch threads per stage, in-process vs a process pool.

The pipeline runs up to ``max_parallel`` training stages at a time: in-process as threads of the flow's process,
or on a process work pool as one Python process per stage (what Prefect's process worker starts). Before
per-stage thread counts every stage ran with torch's default, one thread per core, so ``S`` stages on ``C`` cores
ran ``S x C`` busy threads. Now each stage takes ``distill.runtime.stage_threads(C, S)`` (= C // S) threads.

This bench runs the same stage workload (a CIFAR-shaped ResNet training loop of ``--steps`` steps, the image
kind's ``resnet_small`` model, SGD, random data) ``--stages`` times at once, four ways, in one run:

    in-process, default threads  |  in-process, per-stage threads
    processes,  default threads  |  processes,  per-stage threads

plus one stage alone (all cores) as the reference. It prints wall times and ratios. The processes are plain
subprocesses of this interpreter, each importing torch and the model code as a worker's flow run does, without
Prefect's own start-up (a few seconds per flow run, the same for both thread settings).

    .venv/bin/python bench/bench_pool.py [--stages 2] [--steps 30] [--repeats 3] [--json bench/out/pool.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from _common import write_json  # noqa: E402
from distill.image.models import build_model  # noqa: E402
from distill.runtime import stage_threads, usable_cpus  # noqa: E402


def stage_work(steps: int, batch: int, width: int, seed: int) -> float:
    """One training stage's compute: ``steps`` SGD steps of resnet_small on random CIFAR-shaped data; seconds."""
    g = torch.Generator().manual_seed(seed)
    model = build_model("resnet_small", 10, width=width)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x = torch.randn(batch, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    t0 = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - t0


def in_process(n: int, threads: int | None, a) -> float:
    """``n`` stages as threads of this process (the in-process flow); torch threads set once per process."""
    torch.set_num_threads(threads or usable_cpus())
    t0 = time.perf_counter()
    workers = [threading.Thread(target=stage_work, args=(a.steps, a.batch, a.width, i)) for i in range(n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return time.perf_counter() - t0


def processes(n: int, threads: int | None, a) -> float:
    """``n`` stages as processes of their own (a process pool's flow runs); wall time from spawn to the last exit,
    minus nothing: each process's interpreter and torch import are part of what a stage costs."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env.pop(var, None)
    cmd = [sys.executable, __file__, "--child", "--steps", str(a.steps), "--batch", str(a.batch),
           "--width", str(a.width)]
    t0 = time.perf_counter()
    procs = [subprocess.Popen(cmd + ["--seed", str(i)] + (["--threads", str(threads)] if threads else []), env=env,
                              stdout=subprocess.PIPE, text=True) for i in range(n)]
    outs = [p.communicate()[0] for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a stage process failed: {outs}")
    COMPUTE.append(max(json.loads(o.strip().splitlines()[-1])["seconds"] for o in outs))
    return wall


COMPUTE: list[float] = []  # per process-way call: the slowest stage's training loop alone (no start-up)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stages", type=int, default=2, help="stages at once (the flow's max_parallel)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", default=None)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        if a.threads:
            torch.set_num_threads(a.threads)
        print(json.dumps({"seconds": stage_work(a.steps, a.batch, a.width, a.seed), "threads": torch.get_num_threads()}))
        return

    cpus = usable_cpus()
    per_stage = stage_threads(cpus, a.stages)
    print(f"{cpus} CPUs, {a.stages} stages at once; per-stage threads {per_stage} (default: {cpus} each); "
          f"resnet_small width {a.width}, batch {a.batch}, {a.steps} steps per stage; torch {torch.__version__}",
          flush=True)
    stage_work(2, a.batch, a.width, 0)  # warm-up (allocator, kernels)
    ways = {
        "one stage alone (all cores)": lambda: in_process(1, cpus, a),
        "in-process, default threads": lambda: in_process(a.stages, None, a),
        "in-process, per-stage threads": lambda: in_process(a.stages, per_stage, a),
        "processes, default threads": lambda: processes(a.stages, None, a),
        "processes, per-stage threads": lambda: processes(a.stages, per_stage, a),
    }
    samples: dict[str, list[float]] = {k: [] for k in ways}
    compute: dict[str, list[float]] = {k: [] for k in ways if k.startswith("processes")}
    for r in range(a.repeats):  # interleaved, so slow phases of a shared machine hit every way
        for name, fn in ways.items():
            samples[name].append(fn())
            extra = ""
            if name in compute:
                compute[name].append(COMPUTE[-1])
                extra = f" (training loops {COMPUTE[-1]:.2f} s, the rest is process start-up and imports)"
            print(f"  repeat {r + 1}: {name}: {samples[name][-1]:.2f} s{extra}", flush=True)
    med = {k: statistics.median(v) for k, v in samples.items()}
    print(f"\n| way | wall (median of {a.repeats}) | samples | vs per-stage threads, same path |")
    print("|---|---:|---|---:|")
    for name in ways:
        pair = name.replace("default threads", "per-stage threads")
        ratio = f"{med[name] / med[pair]:.2f}x" if pair != name and pair in med else ""
        print(f"| {name} | {med[name]:.2f} s | {', '.join(f'{x:.2f}' for x in samples[name])} | {ratio} |")
    for name, v in compute.items():
        print(f"{name}: slowest stage's training loop {statistics.median(v):.2f} s (median)")
    print(f"\nprocesses / in-process, per-stage threads: "
          f"{med['processes, per-stage threads'] / med['in-process, per-stage threads']:.2f}x; "
          f"processes, default / per-stage threads: "
          f"{med['processes, default threads'] / med['processes, per-stage threads']:.2f}x")
    write_json(a.json, {"cpus": cpus, "stages": a.stages, "per_stage_threads": per_stage, "steps": a.steps,
                        "batch": a.batch, "width": a.width, "samples": samples, "median": med, "process_compute": compute,
                        "torch": torch.__version__})


if __name__ == "__main__":
    main()
