#!/usr/bin/env python
"""FID / KID calibration of distill.diffusion.metrics on the CIFAR-10 JPEG copy: train split vs test split.

Two real samples of the same distribution give the floor a perfect generator could reach at this n (FID is
biased upwards at small n, so compare runs at equal n); real vs uniform-noise images give the ceiling-like
reference. Images are drawn at random (seeded) from ``train.tar.gz`` / ``test.tar.gz`` of ``--data`` (default
``$DISTILL_CIFAR10`` or ``../shared/data/cifar10-jpeg``), decoded with PIL and fed as uint8 32x32 to the
checksummed TorchScript InceptionV3 (resized to 299x299 inside ``inception_features``).

    python bench/fid_calibration.py                      # n = 2000 per side
    python bench/fid_calibration.py --n 1000 --out bench/out/fid_calibration.json

Prints one JSON line (``FID-CALIBRATION {...}``) and a short table.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import sys
import tarfile
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
from PIL import Image
from _common import fmt, write_json

from distill.diffusion import metrics as M


def default_data() -> Path:
    return Path(os.environ.get("DISTILL_CIFAR10") or HERE.parent.parent / "shared" / "data" / "cifar10-jpeg")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="images per side for train vs test (default 2000)")
    p.add_argument("--n-noise", type=int, default=200,
                   help="uniform-noise images for the real-vs-noise reference, against as many test images (default 200)")
    p.add_argument("--data", type=Path, default=default_data(), help="folder with train.tar.gz and test.tar.gz")
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--kid-subsets", type=int, default=10)
    p.add_argument("--kid-subset-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    return p.parse_args(argv)


def sample_jpegs(tar_path: Path, n: int, rng: np.random.Generator) -> torch.Tensor:
    """``n`` random JPEGs of a tar.gz (streamed once; the bytes are small) as uint8 ``[n, 3, H, W]``."""
    blobs = []
    with tarfile.open(tar_path, "r:gz") as tf:
        for m in tf:
            if m.isfile() and m.name.lower().endswith(".jpg"):
                blobs.append(tf.extractfile(m).read())
    if n > len(blobs):
        raise SystemExit(f"{tar_path} has {len(blobs)} images, --n asks for {n}")
    idx = rng.choice(len(blobs), size=n, replace=False)
    arrays = [np.asarray(Image.open(io.BytesIO(blobs[i])).convert("RGB"), dtype=np.uint8) for i in idx]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def timed_features(model, images: torch.Tensor, args, label: str) -> tuple[torch.Tensor, float]:
    t0 = time.perf_counter()
    feats = []
    for i in range(0, len(images), args.batch_size):
        feats.append(M.inception_features(model, images[i:i + args.batch_size], batch_size=args.batch_size, device=args.device))
        done = min(i + args.batch_size, len(images))
        print(f"  {label}: {done}/{len(images)} images, {done / (time.perf_counter() - t0):.2f} images/s", flush=True)
    dt = time.perf_counter() - t0
    return torch.cat(feats), len(images) / dt


def run(args) -> dict:
    rng = np.random.default_rng(args.seed)
    t_start = time.perf_counter()
    train = sample_jpegs(args.data / "train.tar.gz", args.n, rng)
    test = sample_jpegs(args.data / "test.tar.gz", max(args.n, args.n_noise), rng)
    g = torch.Generator().manual_seed(args.seed)
    noise = torch.randint(0, 256, (args.n_noise, 3, 32, 32), dtype=torch.uint8, generator=g)
    print(f"decoded {len(train)} train, {len(test)} test images in {time.perf_counter() - t_start:.1f}s", flush=True)

    model = M.load_inception(device=args.device)
    f_train, ips_train = timed_features(model, train, args, "train")
    f_test, ips_test = timed_features(model, test, args, "test")
    f_noise, ips_noise = timed_features(model, noise, args, "noise")
    kid = dict(subsets=args.kid_subsets, subset_size=args.kid_subset_size, seed=args.seed)
    tt_kid = M.kid_from_features(f_train, f_test[:args.n], **kid)
    tn_kid = M.kid_from_features(f_test[:args.n_noise], f_noise, **kid)
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "n": args.n, "n_noise": args.n_noise, "seed": args.seed, "device": args.device,
        "torch_threads": torch.get_num_threads(), "inception_sha256": M.INCEPTION_SHA256,
        "fid_train_test": M.fid_from_features(f_train, f_test[:args.n]),
        "kid_train_test": tt_kid[0], "kid_train_test_std": tt_kid[1],
        "fid_test_noise": M.fid_from_features(f_test[:args.n_noise], f_noise),
        "kid_test_noise": tn_kid[0], "kid_test_noise_std": tn_kid[1],
        "images_per_s": {"train": ips_train, "test": ips_test, "noise": ips_noise},
        "seconds": time.perf_counter() - t_start,
    }


def table(r: dict) -> str:
    ips = r["images_per_s"]
    rows = [
        "| pair | n per side | FID | KID (mean +- std) |",
        "|---|---:|---:|---:|",
        f"| CIFAR-10 train vs test (JPEG copy) | {r['n']} | {r['fid_train_test']:.2f} | "
        f"{r['kid_train_test']:.5f} +- {r['kid_train_test_std']:.5f} |",
        f"| CIFAR-10 test vs uniform noise | {r['n_noise']} | {r['fid_test_noise']:.1f} | "
        f"{r['kid_test_noise']:.3f} +- {r['kid_test_noise_std']:.3f} |",
        "",
        f"feature extraction: {fmt(ips['train'])} / {fmt(ips['test'])} / {fmt(ips['noise'])} images/s "
        f"(train / test / noise, {r['device']}, {r['torch_threads']} threads); total {r['seconds']:.0f} s",
    ]
    return "\n".join(rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    for name in ("train.tar.gz", "test.tar.gz"):
        if not (args.data / name).is_file():
            print(f"missing {args.data / name}: set --data or DISTILL_CIFAR10", file=sys.stderr)
            return 2
    result = run(args)
    print("FID-CALIBRATION " + json.dumps(result, default=str), flush=True)
    print(table(result))
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
