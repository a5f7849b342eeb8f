"""The stages of the diffusion kind: prepare, train (teacher, baseline, progressive round, consistency), evaluate,
speed. Every function runs without Prefect, MLflow or boto3.

Roles and their ``kd`` (the stage's distillation config):

- ``teacher``: trained with the denoising loss (``teacher.source = "train"``), or an existing diffusers pipeline
  folder copied in; sampled with DDIM at ``teacher.sample_steps``.
- ``baseline``: the teacher itself, no training, sampled with DDIM at ``target_steps`` (the same number of
  network evaluations as the students).
- ``student``, ``kd = {"method": "progressive", "steps": k}``: one progressive-distillation round; initialised
  from its teacher (the run's teacher or the previous round), sampled with DDIM at ``k`` steps.
- ``student``, ``kd = {"method": "consistency", "skip": s}``: consistency distillation from the teacher, sampled
  with the multistep consistency sampler at ``target_steps``.

Each stage ends with ``val_fid``: FID at its own step count against the validation split (the gate's metric).
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Optional

import torch

from ..files import atomic_write_json, sha256_json
from ..image.data import load_prepared, read_manifest
from ..image.stages import manifest_sha256
from ..image.stages import prepare as _prepare_images
from ..stage_output import claim_out_dir
from . import losses, metrics, sampling
from .config import DiffusionLabConfig
from .models import (META_NAME, build_unet, load_external_teacher, load_model_folder, model_fn, read_meta,
                     save_model_folder)
from .schedule import Schedule
from .train import fit, resolve_runtime, train_fingerprint

__all__ = ["evaluate", "load_images", "prepare", "speed", "stage_fingerprint", "train"]

OUTPUTS = (META_NAME, "model_index.json", "metrics.json", "history.json")


def prepare(cfg: DiffusionLabConfig, progress: bool = True) -> dict:
    return _prepare_images(cfg.data, progress=progress)


def load_images(data_dir: str | Path, split: str, cfg: DiffusionLabConfig) -> torch.Tensor:
    """uint8 [N, C, H, W] of one split, resized to ``data.image_size`` (antialiased) and turned to ``data.channels``."""
    x = load_prepared(data_dir)[split][0]
    size, channels = cfg.data.image_size, cfg.data.channels
    if (size is None or tuple(x.shape[2:]) == (size, size)) and channels == x.shape[1]:
        return x
    f = x.float()
    if channels == 1 and f.shape[1] == 3:
        f = (f * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    if size is not None and tuple(f.shape[2:]) != (size, size):
        f = torch.nn.functional.interpolate(f, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return f.round_().clamp_(0, 255).to(torch.uint8)


def schedule_of(cfg: DiffusionLabConfig) -> Schedule:
    return Schedule.make(cfg.schedule.kind, cfg.schedule.T, cfg.schedule.prediction)


def own_steps(role: str, cfg: DiffusionLabConfig, kd: Optional[dict]) -> int:
    if role == "teacher":
        return cfg.teacher.sample_steps
    if role == "student" and kd and kd.get("method") == "progressive":
        return int(kd["steps"])
    return cfg.target_steps


def sampler_of(role: str, kd: Optional[dict]) -> str:
    return "consistency" if role == "student" and kd and kd.get("method") == "consistency" else "ddim"


def stage_fingerprint(role: str, cfg: DiffusionLabConfig, *, data_sha256: str, kd: Optional[dict] = None,
                      teacher_sha256: Optional[str] = None) -> dict:
    """What determines a stage's result."""
    fp: dict[str, Any] = {"role": role, "kind": "diffusion", "data": data_sha256,
                          "data_transform": {k: getattr(cfg.data, k) for k in ("image_size", "channels", "hflip")},
                          "schedule": cfg.schedule.model_dump(mode="json"),
                          "val": {"val_samples": cfg.eval.val_samples, "seed": cfg.eval.seed}}
    if role == "teacher":
        t = cfg.teacher
        fp["teacher"] = ({"source": "train", "model": t.model.model_dump(mode="json"), "train": train_fingerprint(t.train)}
                         if t.source == "train" else {"source": t.source})
        fp["steps"] = t.sample_steps
        return fp
    fp.update({"teacher_weights": teacher_sha256, "steps": own_steps(role, cfg, kd), "kd": kd})
    if role == "student":
        section = cfg.progressive if kd and kd.get("method") == "progressive" else cfg.consistency
        fp["train"] = train_fingerprint(section.train)
        if kd and kd.get("method") == "consistency":
            fp["huber_c"] = cfg.consistency.huber_c
    return fp




def _step_loss(role: str, cfg: DiffusionLabConfig, kd: Optional[dict], schedule: Schedule, teacher):
    if role == "teacher":
        return lambda m, ema, x, g: losses.teacher_loss(model_fn(m), x, schedule, generator=g)
    tfn = model_fn(teacher)
    if kd["method"] == "progressive":
        k = int(kd["steps"])
        return lambda m, ema, x, g: losses.progressive_loss(model_fn(m), tfn, x, schedule, k, generator=g)
    skip, c = int(kd["skip"]), cfg.consistency.huber_c
    return lambda m, ema, x, g: losses.consistency_loss(model_fn(m), model_fn(ema), tfn, x, schedule, skip=skip,
                                                        generator=g, huber_c=c)


def _check_kd(role: str, kd: Optional[dict]) -> None:
    if role == "student" and (not kd or kd.get("method") not in ("progressive", "consistency")):
        raise ValueError(f"a diffusion student needs kd.method 'progressive' or 'consistency', got {kd!r}")
    if role == "student" and kd["method"] == "progressive" and not isinstance(kd.get("steps"), int):
        raise ValueError(f"a progressive round needs an integer kd.steps, got {kd!r}")


def train(role: str, cfg: DiffusionLabConfig, data_dir, out_dir, *, teacher_dir=None, kd: Optional[dict] = None,
          log_fn=None, on_checkpoint=None, resume: bool = True) -> dict:
    """Run one stage into ``out_dir`` (a diffusers pipeline folder + distill.json + metrics + history)."""
    if role not in ("teacher", "baseline", "student"):
        raise ValueError(f"unknown diffusion role {role!r}")
    _check_kd(role, kd)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    data_sha = manifest_sha256(data_dir)
    teacher = teacher_meta = None
    if role != "teacher":
        if teacher_dir is None:
            raise ValueError(f"the diffusion {role} stage needs the teacher's model folder")
        teacher, teacher_meta = load_model_folder(teacher_dir)
    fp = stage_fingerprint(role, cfg, data_sha256=data_sha, kd=kd,
                           teacher_sha256=teacher_meta["weights_sha256"] if teacher_meta else None)
    claim_out_dir(out_dir, fp, resume, outputs=OUTPUTS, config_name=META_NAME, fresh_hint="--no-resume (resume=False)")
    schedule = schedule_of(cfg)
    res: dict[str, Any] = {"role": role, "steps": own_steps(role, cfg, kd), "sampler": sampler_of(role, kd)}
    history: list[dict] = []
    if role == "baseline":
        unet = teacher
    elif role == "teacher" and cfg.teacher.source != "train":
        unet = load_external_teacher(cfg.teacher.source, cfg)
    else:  # only the stages that train read the training split
        x_train = load_images(data_dir, "train", cfg)
        if role == "teacher":
            unet = build_unet(cfg.teacher.model, image_size=x_train.shape[-1], channels=x_train.shape[1])
            tcfg = cfg.teacher.train
        else:
            unet = _copy_unet(teacher)
            teacher = teacher.to(resolve_runtime(_section(cfg, kd).train).device).requires_grad_(False)
            tcfg = _section(cfg, kd).train
        fr = fit(unet, _step_loss(role, cfg, kd, schedule, teacher), x_train, tcfg, ckpt_dir=out_dir / "checkpoints",
                 fingerprint=fp, hflip=cfg.data.hflip, log_fn=log_fn, on_checkpoint=on_checkpoint, resume=resume,
                 desc=role if role == "teacher" else _stage_desc(kd))
        unet, history = fr.ema, fr.history
        res.update({"resumed_from_step": fr.resumed_from_step, "steps_run": fr.steps_run,
                    "train_seconds_loop": fr.train_seconds})
    meta = save_model_folder(out_dir, unet, schedule, sampler=res["sampler"], steps=res["steps"],
                             extra={"role": role, "kd": kd, "fingerprint": fp, "fingerprint_sha256": sha256_json(fp)})
    res["val_fid"] = val_fid(out_dir, data_dir, cfg)
    res.update({"weights_sha256": meta["weights_sha256"], "params": meta["parameters"],
                "train_seconds": time.perf_counter() - t0})
    atomic_write_json(out_dir / "history.json", history)
    atomic_write_json(out_dir / "metrics.json", res)
    return res


def _section(cfg: DiffusionLabConfig, kd: dict):
    return cfg.progressive if kd["method"] == "progressive" else cfg.consistency


def _stage_desc(kd: dict) -> str:
    return f"progressive-{kd['steps']}" if kd["method"] == "progressive" else "consistency"


def _copy_unet(unet):
    return copy.deepcopy(unet).float().train().requires_grad_(True)


# --- sampling and quality ---------------------------------------------------------------------------------------


def _device(cfg: DiffusionLabConfig) -> torch.device:
    return resolve_runtime(cfg.teacher.train).device


def fixed_noise(n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The starting noise of evaluation: drawn on the CPU from ``seed``, so every model and every machine gets
    the same images to compare."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n, *shape), generator=g)


@torch.no_grad()
def generate(unet, meta: dict, noise: torch.Tensor, steps: int, *, batch_size: int, device, seed: int = 0) -> torch.Tensor:
    """Images in [-1, 1] (CPU float) from ``noise`` with the model's own sampler at ``steps`` steps."""
    schedule = Schedule.from_dict(meta["schedule"])
    unet = unet.to(device).eval()
    fn = model_fn(unet)
    out = []
    for i in range(0, noise.shape[0], batch_size):
        z = noise[i:i + batch_size].to(device)
        if meta["sampler"] == "consistency":
            g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + i)
            x = sampling.sample_consistency(fn, z, schedule, steps, generator=g)
        else:
            x = sampling.sample_ddim(fn, z, schedule, steps)
        out.append(x.float().cpu())
    return torch.cat(out)


def _reference_features(data_dir, split: str, n: Optional[int], cfg: DiffusionLabConfig, inception, device) -> torch.Tensor:
    """Inception features of (the first ``n`` images of) a split, cached next to the prepared data by the data
    manifest, the transform, ``n`` and the Inception weights."""
    total = int(read_manifest(data_dir)["counts"][split]["total"])
    count = min(n or total, total)
    key = sha256_json({"data": manifest_sha256(data_dir), "split": split, "n": count,
                       "size": cfg.data.image_size, "channels": cfg.data.channels,
                       "inception": metrics.INCEPTION_SHA256})[:24]
    cache = Path(cfg.data.cache_dir) / "fid-reference" / f"{key}.safetensors"
    if cache.is_file():
        from safetensors.torch import load_file

        try:
            return load_file(str(cache))["features"]
        except Exception:  # noqa: BLE001 - a damaged cache entry is recomputed
            cache.unlink(missing_ok=True)
    real = load_images(data_dir, split, cfg)[:count]  # decoded and verified only when the cache misses
    feats = metrics.inception_features(inception, real, batch_size=cfg.eval.inception_batch, device=device)
    from ..checkpoint import save_tensors_atomic

    cache.parent.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(cache, {"features": feats.contiguous()})
    return feats


def val_fid(model_dir, data_dir, cfg: DiffusionLabConfig) -> float:
    """FID at the model's own step count, ``eval.val_samples`` images vs (the first ``eval.n_reference`` images
    of) the validation split; NaN with ``eval.fid`` off."""
    if not cfg.eval.fid:
        return float("nan")
    unet, meta = load_model_folder(model_dir)
    device = _device(cfg)
    inception = metrics.load_inception(device=device)
    ref = _reference_features(data_dir, "val", cfg.eval.n_reference, cfg, inception, device)
    noise = fixed_noise(cfg.eval.val_samples, _shape(meta), cfg.eval.seed + 1)
    imgs = generate(unet, meta, noise, meta["steps"], batch_size=cfg.eval.batch_size, device=device, seed=cfg.eval.seed)
    feats = metrics.inception_features(inception, imgs, batch_size=cfg.eval.inception_batch, device=device)
    return float(metrics.fid_from_features(feats, ref))


def _shape(meta: dict) -> tuple[int, int, int]:
    return (meta["image"]["channels"], meta["image"]["size"], meta["image"]["size"])


def save_grid(images: torch.Tensor, path: Path, n: int) -> None:
    from torchvision.utils import save_image

    k = min(n, images.shape[0])
    x = (images[:k].float() + 1) / 2
    if x.shape[-1] < 64:  # small images are enlarged (nearest neighbour) so the grid can be looked at
        x = torch.nn.functional.interpolate(x, scale_factor=-(-64 // x.shape[-1]), mode="nearest")
    save_image(x, str(path), nrow=max(1, int(k ** 0.5 + 0.5)), padding=2)


def evaluate(model_dir, data_dir, cfg: DiffusionLabConfig, *, split: str = "test", teacher_dir=None,
             speed: bool = True, out_path=None) -> dict:
    """FID/KID at each step count of ``eval.steps`` (the teacher at its own only), MSE/PSNR against the teacher's
    own-step images from the same noise, sample grids. ``fid``/``kid``/``psnr`` are at ``target_steps`` (the
    teacher's at its own step count), so the KD gain compares equal numbers of network evaluations."""
    unet, meta = load_model_folder(model_dir)
    device = _device(cfg)
    ev = cfg.eval
    inception = metrics.load_inception(device=device) if ev.fid else None
    ref = _reference_features(data_dir, split, ev.n_reference, cfg, inception, device) if ev.fid else None
    noise = fixed_noise(ev.n_samples, _shape(meta), ev.seed)
    is_teacher = meta.get("role") == "teacher"
    # the headline numbers are at the target step count (equal network evaluations for the baseline and every
    # student); the teacher's at its own step count
    at = meta["steps"] if is_teacher else cfg.target_steps
    steps_list = [at] if is_teacher else sorted(set(ev.steps) | {meta["steps"], at})
    reference_imgs = None
    if teacher_dir is not None and not is_teacher:
        t_unet, t_meta = load_model_folder(teacher_dir)
        reference_imgs = generate(t_unet, t_meta, noise, t_meta["steps"], batch_size=ev.batch_size, device=device)
    out_dir = Path(out_path).parent if out_path else None
    m: dict[str, Any] = {"split": split, "n_images": ev.n_samples, "n_reference": int(ref.shape[0]) if ev.fid else 0, "steps": at,
                         "own_steps": meta["steps"], "sampler": meta["sampler"], "params": meta["parameters"]}
    files = {}
    for k in steps_list:
        imgs = generate(unet, meta, noise, k, batch_size=ev.batch_size, device=device, seed=ev.seed)
        if ev.fid:
            feats = metrics.inception_features(inception, imgs, batch_size=ev.inception_batch, device=device)
            m[f"fid_s{k}"] = float(metrics.fid_from_features(feats, ref))
            m[f"kid_s{k}"] = float(metrics.kid_from_features(feats, ref, subset_size=ev.kid_subset_size, seed=ev.seed)[0])
        else:
            m[f"fid_s{k}"] = m[f"kid_s{k}"] = float("nan")
        if reference_imgs is not None:
            mse, psnr = metrics.mse_psnr(imgs, reference_imgs)
            m[f"mse_s{k}"], m[f"psnr_s{k}"] = float(mse.mean()), float(psnr[torch.isfinite(psnr)].mean()) \
                if torch.isfinite(psnr).any() else float("inf")
        if out_dir is not None:
            save_grid(imgs, out_dir / f"grid_s{k}.png", ev.grid)
            files[f"grid_s{k}"] = f"grid_s{k}.png"
    m.update({"fid": m[f"fid_s{at}"], "kid": m[f"kid_s{at}"]})
    if f"psnr_s{at}" in m:
        m["psnr"] = m[f"psnr_s{at}"]
    if speed and ev.speed:
        m.update(_speed(unet, meta, cfg, device))
    if files:
        m["files"] = files
    if out_path is not None:
        atomic_write_json(out_path, m)
    return m


def _speed(unet, meta: dict, cfg: DiffusionLabConfig, device) -> dict:
    """Latency per image (batch 1) and images/s (at ``eval.batch_size``) at the model's own step count."""
    ev, k = cfg.eval, meta["steps"]
    shape = _shape(meta)

    def timed(n: int) -> float:
        noise = fixed_noise(n, shape, 0)
        generate(unet, meta, noise, k, batch_size=n, device=device)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(ev.speed_runs):
            generate(unet, meta, noise, k, batch_size=n, device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / ev.speed_runs

    lat = timed(1)
    batch = min(ev.batch_size, 256)
    return {"latency_ms": 1000 * lat, "images_per_s": batch / timed(batch), "speed_batch": batch,
            "speed_device": str(device)}


def speed(model_dir, data_dir, cfg: DiffusionLabConfig) -> dict:
    unet, meta = load_model_folder(model_dir)
    return _speed(unet, meta, cfg, _device(cfg))


def weights_sha256(model_dir) -> str:
    return read_meta(model_dir)["weights_sha256"]


def load_model(model_dir):
    return load_model_folder(model_dir)[0]
