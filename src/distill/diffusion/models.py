"""UNets and model folders of the diffusion kind.

A stage's model folder is a diffusers pipeline folder that ``DiffusionPipeline.from_pretrained`` loads
(``model_index.json`` of a ``DDIMPipeline``, ``unet/`` in safetensors, ``scheduler/`` equal to our schedule with
trailing timesteps) plus ``distill.json``: the sampler the model is meant for (``ddim``, or ``consistency`` for a
consistency-distilled student, whose multistep sampling re-noises between steps), its own step count, the
schedule, the image shape, the UNet weights' sha256 and the stage fingerprint. Weights are never unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch

from ..files import atomic_write_bytes, sha256_file
from .config import DiffusionLabConfig, UNetConfig
from .schedule import Schedule

__all__ = ["FORMAT", "META_NAME", "ModelFolderError", "build_unet", "load_model_folder", "model_fn",
           "read_meta", "save_model_folder", "schedule_of_folder", "unet_weights_file"]

FORMAT = "distill-diffusion/1"
META_NAME = "distill.json"
_WEIGHTS = ("unet", "diffusion_pytorch_model.safetensors")
_BETA = {"cosine": "squaredcos_cap_v2", "linear": "linear"}
_PRED = {"v": "v_prediction", "epsilon": "epsilon"}


class ModelFolderError(ValueError):
    """A folder that is not a usable diffusion model; the message names it and what is wrong."""


def build_unet(spec: UNetConfig, *, image_size: int, channels: int):
    """A ``UNet2DModel`` for ``channels`` x ``image_size`` x ``image_size`` images."""
    from diffusers import UNet2DModel

    levels = len(spec.block_out_channels)
    if image_size % (2 ** (levels - 1)):
        raise ModelFolderError(f"image size {image_size} is not divisible by 2^{levels - 1} "
                               f"({levels} UNet levels in block_out_channels {spec.block_out_channels})")
    down = tuple("AttnDownBlock2D" if i in spec.attention_levels else "DownBlock2D" for i in range(levels))
    up = tuple("AttnUpBlock2D" if i in spec.attention_levels else "UpBlock2D" for i in reversed(range(levels)))
    return UNet2DModel(
        sample_size=image_size, in_channels=channels, out_channels=channels,
        block_out_channels=tuple(spec.block_out_channels), layers_per_block=spec.layers_per_block,
        down_block_types=down, up_block_types=up, norm_num_groups=spec.norm_num_groups, dropout=spec.dropout,
    )


def model_fn(unet):
    """``model_fn(z, t)`` of :mod:`.sampling` and :mod:`.losses` for a diffusers UNet."""
    def fn(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return unet(z, t).sample.float()
    return fn


def scheduler_for(schedule: Schedule):
    from diffusers import DDIMScheduler

    return DDIMScheduler(**schedule.scheduler_config())


def unet_weights_file(folder: str | Path) -> Path:
    return Path(folder).joinpath(*_WEIGHTS)


def save_model_folder(out_dir: str | Path, unet, schedule: Schedule, *, sampler: str, steps: int,
                      extra: Optional[dict] = None) -> dict:
    """Write the pipeline folder (unet, scheduler, model_index.json) and ``distill.json`` into ``out_dir``;
    each part is written to a temporary folder first and moved into place. Returns the meta."""
    from diffusers import DDIMPipeline

    if sampler not in ("ddim", "consistency"):
        raise ValueError(f"sampler must be 'ddim' or 'consistency', got {sampler!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    unet = unet.to("cpu", memory_format=torch.contiguous_format).float().eval()
    tmp = Path(tempfile.mkdtemp(dir=out_dir, prefix=".pipeline.tmp-"))
    try:
        DDIMPipeline(unet=unet, scheduler=scheduler_for(schedule)).save_pretrained(tmp, safe_serialization=True)
        for name in ("unet", "scheduler", "model_index.json"):
            dest = out_dir / name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(tmp / name, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    meta = {
        "format": FORMAT, "sampler": sampler, "steps": int(steps), "schedule": schedule.to_dict(),
        "image": {"channels": int(unet.config.in_channels), "size": int(unet.config.sample_size)},
        "parameters": int(sum(p.numel() for p in unet.parameters())),
        "weights_sha256": sha256_file(unet_weights_file(out_dir)), **(extra or {}),
    }
    atomic_write_bytes(out_dir / META_NAME, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
    return meta


def read_meta(folder: str | Path) -> dict:
    folder = Path(folder)
    p = folder / META_NAME
    try:
        meta = json.loads(p.read_bytes())
    except FileNotFoundError:
        raise ModelFolderError(f"{folder} is not a distill diffusion model folder (no {META_NAME})") from None
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{p} cannot be read: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ModelFolderError(f"{p} is not in format {FORMAT}")
    return meta


def _load_unet(folder: Path):
    from diffusers import UNet2DModel

    weights = unet_weights_file(folder)
    if not weights.is_file():
        raise ModelFolderError(f"{folder} has no {'/'.join(_WEIGHTS)} (safetensors weights are required; "
                               "pickled .bin weights are not loaded)")
    try:
        return UNet2DModel.from_pretrained(folder / "unet", use_safetensors=True).eval()
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelFolderError(f"cannot load the UNet of {folder}: {e}") from e


def load_model_folder(folder: str | Path, *, verify: bool = True) -> tuple[Any, dict]:
    """``(unet, meta)`` of a stage's model folder; the UNet weights are checked against ``distill.json``."""
    folder = Path(folder)
    meta = read_meta(folder)
    if verify:
        actual = sha256_file(unet_weights_file(folder))
        if actual != meta.get("weights_sha256"):
            raise ModelFolderError(f"{unet_weights_file(folder)}: sha256 {actual} differs from {META_NAME}'s "
                                   f"{meta.get('weights_sha256')}")
    return _load_unet(folder), meta


def schedule_of_folder(folder: str | Path) -> Schedule:
    """The schedule of an external diffusers pipeline folder (its ``scheduler/scheduler_config.json``)."""
    folder = Path(folder)
    p = folder / "scheduler" / "scheduler_config.json"
    try:
        sc = json.loads(p.read_bytes())
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"teacher folder {folder}: cannot read {p}: {e}") from e
    kind = {v: k for k, v in _BETA.items()}.get(sc.get("beta_schedule", "linear"))
    pred = {v: k for k, v in _PRED.items()}.get(sc.get("prediction_type", "epsilon"))
    if kind is None or pred is None:
        raise ModelFolderError(f"teacher folder {folder}: beta_schedule {sc.get('beta_schedule')!r} / prediction_type "
                               f"{sc.get('prediction_type')!r} not supported (cosine/linear, v_prediction/epsilon)")
    if kind == "linear" and (sc.get("beta_start", 1e-4), sc.get("beta_end", 0.02)) != (1e-4, 0.02):
        raise ModelFolderError(f"teacher folder {folder}: linear betas other than 1e-4..0.02 are not supported")
    return Schedule.make(kind, int(sc.get("num_train_timesteps", 1000)), pred)


def load_external_teacher(folder: str | Path, cfg: DiffusionLabConfig):
    """The UNet of an existing diffusers pipeline folder (e.g. a DDPM-CIFAR10 pipeline), checked against the
    config: its schedule must be the config's ``schedule`` and its image shape the data's."""
    folder = Path(os.path.expanduser(folder))
    if not (folder / "unet").is_dir():
        raise ModelFolderError(f"teacher.source {str(folder)!r} is not a diffusers pipeline folder with a unet/ "
                               "subfolder")
    sched = schedule_of_folder(folder)
    want = cfg.schedule
    if (sched.kind, sched.prediction, sched.T) != (want.kind, want.prediction, want.T):
        raise ModelFolderError(
            f"teacher folder {folder} was trained with schedule kind={sched.kind}, prediction={sched.prediction}, "
            f"T={sched.T}; set schedule.kind={sched.kind} schedule.prediction={sched.prediction} "
            f"schedule.T={sched.T} (the config has {want.kind}, {want.prediction}, {want.T})")
    return _load_unet(folder)


def unet_config_hash(unet) -> dict:
    return {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
