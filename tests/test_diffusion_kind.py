"""The diffusion kind's stages on tiny generated images: config validation, the plan, every role end to end,
exact resume, the diffusers folder, an external teacher folder."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

pytest.importorskip("diffusers")

from _imagefolder import make_imagefolder  # noqa: E402
from _tinydiff import tiny_diffusion_overrides  # noqa: E402

from distill.diffusion import stages  # noqa: E402
from distill.diffusion.config import load_profile, progressive_steps  # noqa: E402
from distill.diffusion.models import ModelFolderError, load_model_folder, read_meta  # noqa: E402
from distill.kinds import get_kind  # noqa: E402


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("diff")
    src = make_imagefolder(tmp / "src", n_train=20, n_test=6, size=16)
    cfg = load_profile("smoke", tiny_diffusion_overrides(src, tmp / "cache"))
    data_dir = stages.prepare(cfg, progress=False)["dir"]
    teacher = tmp / "teacher"
    res = stages.train("teacher", cfg, data_dir, teacher)
    return {"tmp": tmp, "cfg": cfg, "data": data_dir, "teacher": teacher, "teacher_res": res}


@pytest.mark.parametrize("override, field", [
    ({"target_steps": 3}, "target_steps"),
    ({"teacher": {"sample_steps": 2}}, "target_steps"),
    ({"eval": {"steps": [1, 6]}}, "eval.steps"),
    ({"consistency": {"skip": 100}}, "consistency.skip"),
    ({"teacher": {"train": {"warmup_steps": 400}}}, "warmup_steps"),
    ({"teacher": {"model": {"block_out_channels": [30, 64]}}}, "norm_num_groups"),
    ({"main": "consistency", "consistency": {"enabled": False}}, "consistency.enabled"),
])
def test_bad_config_names_the_field(override, field):
    with pytest.raises(ValidationError, match=field.replace(".", r"\.")):
        load_profile("smoke", override)


def test_plan_chains_progressive_rounds_and_marks_the_main_student():
    kind = get_kind("diffusion")
    cfg = load_profile("smoke")
    assert progressive_steps(cfg) == [8, 4]
    members = {m.name: m for m in kind.plan(cfg)}
    assert list(members) == ["baseline", "progressive-8", "progressive-4", "consistency"]
    assert members["progressive-8"].teacher is None and members["progressive-4"].teacher == "progressive-8"
    assert [m.name for m in members.values() if m.main] == ["progressive-4"]  # the round at target_steps
    cons = kind.plan(load_profile("smoke", {"main": "consistency"}))
    assert [m.name for m in cons if m.main] == ["consistency"]


def test_teacher_stage_writes_a_diffusers_folder(lab):
    from diffusers import DiffusionPipeline

    t = lab["teacher"]
    meta = read_meta(t)
    assert meta["sampler"] == "ddim" and meta["steps"] == 8 and meta["image"] == {"channels": 3, "size": 8}
    assert lab["teacher_res"]["val_fid"] > 0 and len(json.loads((t / "history.json").read_text())) == 2
    pipe = DiffusionPipeline.from_pretrained(str(t))
    assert type(pipe).__name__ == "DDIMPipeline" and pipe.scheduler.config.timestep_spacing == "trailing"
    # the registered folder samples with diffusers' own pipeline as with ours (DDIM, trailing, same noise)
    unet, _ = load_model_folder(t)
    noise = stages.fixed_noise(2, (3, 8, 8), 0)
    ours = stages.generate(unet, meta, noise, 4, batch_size=2, device=torch.device("cpu"))
    sched = pipe.scheduler
    sched.set_timesteps(4)
    z = noise.clone()
    with torch.no_grad():
        for tt in sched.timesteps:
            z = sched.step(pipe.unet(z, tt).sample, tt, z).prev_sample
    assert torch.allclose(ours, z.clamp(-1, 1), atol=1e-4)


def test_tampered_weights_are_refused(lab, tmp_path):
    import shutil

    copy = tmp_path / "t"
    shutil.copytree(lab["teacher"], copy)
    w = copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-3] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelFolderError, match="sha256"):
        load_model_folder(copy)


def test_baseline_round_and_consistency_stages(lab):
    cfg, data, teacher = lab["cfg"], lab["data"], lab["teacher"]
    tmp = lab["tmp"]
    base = stages.train("baseline", cfg, data, tmp / "baseline", teacher_dir=teacher)
    assert base["steps"] == 2 and base["sampler"] == "ddim"
    assert read_meta(tmp / "baseline")["weights_sha256"] == read_meta(teacher)["weights_sha256"]  # no training

    r4 = stages.train("student", cfg, data, tmp / "p4", teacher_dir=teacher, kd={"method": "progressive", "steps": 4})
    r2 = stages.train("student", cfg, data, tmp / "p2", teacher_dir=tmp / "p4", kd={"method": "progressive", "steps": 2})
    assert (r4["steps"], r2["steps"]) == (4, 2) and r2["steps_run"] == 2
    assert read_meta(tmp / "p2")["weights_sha256"] != read_meta(tmp / "p4")["weights_sha256"]

    cm = stages.train("student", cfg, data, tmp / "cm", teacher_dir=teacher, kd={"method": "consistency", "skip": 256})
    assert read_meta(tmp / "cm")["sampler"] == "consistency" and cm["steps"] == 2
    for r in (base, r4, r2, cm):
        assert r["val_fid"] >= 0 and r["val_fid"] == r["val_fid"]

    out = tmp / "cm" / "eval_test.json"
    m = stages.evaluate(tmp / "cm", data, cfg, teacher_dir=teacher, out_path=out)
    assert {"fid_s1", "fid_s2", "fid_s4", "kid_s2", "psnr_s2", "mse_s4"} <= set(m)
    assert m["fid"] == m["fid_s2"] and m["steps"] == 2 and m["n_images"] == 6
    assert m["latency_ms"] > 0 and m["images_per_s"] > 0
    assert all((tmp / "cm" / f).is_file() for f in m["files"].values())
    tm = stages.evaluate(teacher, data, cfg, out_path=tmp / "teacher" / "eval_test.json", speed=False)
    assert tm["steps"] == 8 and set(k for k in tm if k.startswith("fid_s")) == {"fid_s8"}


def test_same_noise_same_images_and_the_baseline_at_the_teachers_steps_is_the_teacher(lab, tmp_path):
    cfg = lab["cfg"]
    m = stages.evaluate(lab["teacher"], lab["data"], cfg, speed=False)
    again = stages.evaluate(lab["teacher"], lab["data"], cfg, speed=False)
    assert m["fid"] == again["fid"]  # fixed noise, deterministic sampler and features
    # the baseline is the teacher: at the teacher's own step count its images equal the teacher's
    stages.train("baseline", cfg, lab["data"], tmp_path / "b", teacher_dir=lab["teacher"])
    at8 = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"steps": [8]})})
    b = stages.evaluate(tmp_path / "b", lab["data"], at8, teacher_dir=lab["teacher"], speed=False)
    assert b["mse_s8"] == 0.0 and b["psnr_s8"] == float("inf") and b["mse_s2"] > 0


def test_killed_round_resumes_bit_identically(lab, tmp_path):
    cfg, data, teacher = lab["cfg"], lab["data"], lab["teacher"]
    kd = {"method": "progressive", "steps": 4}
    longer = cfg.model_copy(deep=True)
    longer.progressive.train.steps = 4
    ref = stages.train("student", longer, data, tmp_path / "ref", teacher_dir=teacher, kd=kd)

    calls = []

    def stop_after_first(folder, step):
        calls.append(folder)
        raise KeyboardInterrupt  # killed right after the step-2 checkpoint

    with pytest.raises(KeyboardInterrupt):
        stages.train("student", longer, data, tmp_path / "run", teacher_dir=teacher, kd=kd, on_checkpoint=stop_after_first)
    again = stages.train("student", longer, data, tmp_path / "run", teacher_dir=teacher, kd=kd)
    assert again["resumed_from_step"] == 2 and again["steps_run"] == 2
    assert read_meta(tmp_path / "run")["weights_sha256"] == read_meta(tmp_path / "ref")["weights_sha256"]
    assert ref["val_fid"] == again["val_fid"]


def test_external_teacher_folder(lab, tmp_path):
    """An existing diffusers pipeline folder (here: one written by diffusers itself) is the teacher; a schedule
    that does not match the config is refused, naming what to set."""
    from diffusers import DDIMPipeline, DDIMScheduler

    unet, _ = load_model_folder(lab["teacher"])
    ext = tmp_path / "ddpm-like"
    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1024, beta_schedule="squaredcos_cap_v2",
                                                    prediction_type="v_prediction")).save_pretrained(ext)
    cfg = lab["cfg"].model_copy(deep=True)
    cfg.teacher.source = str(ext)
    res = stages.train("teacher", cfg, lab["data"], tmp_path / "t")
    assert read_meta(tmp_path / "t")["weights_sha256"] == read_meta(lab["teacher"])["weights_sha256"]
    assert res["steps"] == 8 and "steps_run" not in res

    DDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000)).save_pretrained(tmp_path / "lin")
    cfg.teacher.source = str(tmp_path / "lin")
    with pytest.raises(ModelFolderError, match="schedule.kind=linear schedule.prediction=epsilon schedule.T=1000"):
        stages.train("teacher", cfg, lab["data"], tmp_path / "t2")


def test_lab_command_trains_the_main_round_after_the_rounds_it_learns_from(lab, tmp_path):
    """``distill lab --kind diffusion``: teacher, baseline, and the main student's chain of rounds (4 then 2)."""
    from distill.cli import main, run_lab

    out = run_lab(get_kind("diffusion"), lab["cfg"], tmp_path / "lab")
    assert list(out["results"]) == ["teacher", "baseline", "progressive-4", "progressive-2"]
    meta = read_meta(tmp_path / "lab" / "progressive-2")
    assert meta["kd"] == {"method": "progressive", "steps": 2}
    assert meta["fingerprint"]["teacher_weights"] == read_meta(tmp_path / "lab" / "progressive-4")["weights_sha256"]
    assert "| progressive-2 |" in (tmp_path / "lab" / "report.md").read_text()
    # one stage from the command line: a named plan member; a name outside the plan is refused
    sets = ["--set", f"data.source={lab['cfg'].data.source}", "--set", f"data.cache_dir={lab['cfg'].data.cache_dir}"]
    rc = main(["stage", "train", "--kind", "diffusion", "--role", "student", "--member", "nope", "--data",
               str(lab["data"]), "--teacher", str(lab["teacher"]), "--out", str(tmp_path / "x"), *sets])
    assert rc != 0 and not (tmp_path / "x").exists()


def test_without_fid_the_evaluation_still_gives_psnr_grids_and_speed(lab, tmp_path):
    import math

    cfg = lab["cfg"].model_copy(deep=True)
    cfg.eval.fid = False
    stages.train("baseline", cfg, lab["data"], tmp_path / "b", teacher_dir=lab["teacher"])
    assert math.isnan(json.loads((tmp_path / "b" / "metrics.json").read_text())["val_fid"])
    m = stages.evaluate(tmp_path / "b", lab["data"], cfg, teacher_dir=lab["teacher"], out_path=tmp_path / "e.json")
    assert math.isnan(m["fid"]) and m["psnr_s2"] > 0 and m["images_per_s"] > 0 and m["files"]
