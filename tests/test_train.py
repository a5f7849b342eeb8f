"""Trainer: learns, checkpoints every epoch, resumes bit-identically on CPU, reports through log_fn."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from _imagefolder import make_imagefolder, tiny_overrides
from distill.image import stages
from distill.image import train as train_module
from distill.checkpoint import (
    CheckpointError,
    CheckpointMismatch,
    latest_checkpoint,
    load_checkpoint,
    retained_checkpoints,
    save_checkpoint,
)
from distill.image.config import KDConfig, TrainConfig, load_profile
from distill.files import sha256_file, sha256_json
from distill.image.models import build_model
from distill.image.train import LRSchedule, fit


def synthetic(n_per_class=48, classes=3, seed=0):
    """Images whose class is visible in the colour: learnable in a few steps on CPU."""
    g = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for c in range(classes):
        base = torch.zeros(3, 32, 32)
        base[c % 3] = 180
        noise = torch.randint(0, 60, (n_per_class, 3, 32, 32), generator=g).float()
        xs.append((base + noise).clamp(0, 255).to(torch.uint8))
        ys.append(torch.full((n_per_class,), c, dtype=torch.long))
    x, y = torch.cat(xs), torch.cat(ys)
    perm = torch.randperm(len(x), generator=g)
    x, y = x[perm], y[perm]
    k = len(x) // 4
    return {"train": (x[k:], y[k:]), "val": (x[:k], y[:k])}


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return build_model("resnet_small", 3, width=4, depth=1)


CFG = TrainConfig(epochs=3, batch_size=16, lr=0.05, device="cpu", compile="off", progress="off", schedule="cosine_step")


def test_fit_learns_and_logs():
    logged = []
    model, res = fit(tiny_model(), synthetic(), CFG, log_fn=lambda m, s: logged.append((s, m)))
    assert [s for s, _ in logged] == [1, 2, 3]
    assert {"train_loss", "val_acc", "lr", "images_per_second"} <= set(logged[0][1])
    assert res.best_val_acc > 0.8  # three colours: easy
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]
    assert res.runtime == {"device": "cpu", "amp_bf16": False, "channels_last": False, "compile": "off"}


def test_fit_with_teacher_uses_kd_and_keeps_teacher_frozen():
    data = synthetic()
    teacher, _ = fit(tiny_model(1), data, CFG)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, res = fit(tiny_model(2), data, CFG.model_copy(update={"epochs": 6}), teacher=teacher, kd=KDConfig(temperature=4, alpha=0.7))
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # incl. BatchNorm running stats (eval mode)
    assert not any(p.requires_grad for p in teacher.parameters())
    assert res.best_val_acc > 0.8


class Killed(Exception):
    pass


def test_resume_after_kill_is_bit_identical(tmp_path):
    data = synthetic()
    ref_model, ref = fit(tiny_model(), data, CFG, ckpt_dir=tmp_path / "ref")

    def die_after_epoch_2(metrics, step):
        if step == 2:
            raise Killed()

    with pytest.raises(Killed):
        fit(tiny_model(), data, CFG, ckpt_dir=tmp_path / "run", log_fn=die_after_epoch_2)
    assert latest_checkpoint(tmp_path / "run").name == "epoch-0002"

    # A new process would build a fresh model with the same seed; the checkpoint restores everything else.
    seen = []
    model, res = fit(tiny_model(), data, CFG, ckpt_dir=tmp_path / "run", log_fn=lambda m, s: seen.append(s))
    assert res.resumed_from_epoch == 2 and res.epochs_run == 1 and seen == [3]
    ref_sd, sd = ref_model.state_dict(), model.state_dict()
    assert all(torch.equal(ref_sd[k], sd[k]) for k in ref_sd), "resumed weights differ from the uninterrupted run"
    assert [h["train_loss"] for h in res.history] == [h["train_loss"] for h in ref.history]
    # final checkpoints agree too (optimizer momentum, scheduler)
    _, a = load_checkpoint(latest_checkpoint(tmp_path / "ref"))
    _, b = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert a["scheduler"] == b["scheduler"]
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])


def test_resume_false_starts_over(tmp_path):
    data = synthetic()
    fit(tiny_model(), data, CFG, ckpt_dir=tmp_path)
    _, res = fit(tiny_model(), data, CFG, ckpt_dir=tmp_path, resume=False)
    assert res.resumed_from_epoch == 0 and res.epochs_run == 3


def test_checkpoint_is_pickle_free_and_verified(tmp_path):
    state = {"w": torch.arange(6.0), "nested": {"i": 3, 7: torch.ones(2)}, "t": (1, 2.5), "s": "x", "n": None}
    folder = save_checkpoint(tmp_path, 5, state)
    epoch, loaded = load_checkpoint(folder)
    assert epoch == 5 and loaded["nested"]["i"] == 3 and torch.equal(loaded["nested"][7], torch.ones(2))
    assert loaded["t"] == (1, 2.5) and loaded["n"] is None
    manifest = json.loads((folder / "checkpoint.json").read_text())
    assert manifest["files"]["state.safetensors"]["sha256"]
    blob = bytearray((folder / "state.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (folder / "state.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(folder)


def test_checkpoint_keeps_latest_pointer_and_prunes(tmp_path):
    for e in range(1, 5):
        save_checkpoint(tmp_path, e, {"e": torch.tensor(e)}, keep_last=2)
    assert latest_checkpoint(tmp_path).name == "epoch-0004"
    assert sorted(p.name for p in tmp_path.glob("epoch-*")) == ["epoch-0003", "epoch-0004"]
    assert not list(tmp_path.glob(".epoch-*"))  # no temporary leftovers


def test_lr_schedules():
    per_epoch = LRSchedule(epochs=15, steps_per_epoch=10, warmup_epochs=0, per_epoch=True)
    import math

    # the seed's CosineAnnealingLR(T_max=15), stepped once per epoch
    for e in range(15):
        assert per_epoch(e * 10 + 3) == pytest.approx(0.5 * (1 + math.cos(math.pi * e / 15)))
    per_step = LRSchedule(epochs=2, steps_per_epoch=10, warmup_epochs=1, per_epoch=False)
    assert per_step(0) < per_step(5) < per_step(9) <= 1.0
    assert per_step(19) < 0.05


def test_batch_larger_than_data_is_rejected():
    with pytest.raises(ValueError, match="batch_size"):
        fit(tiny_model(), synthetic(n_per_class=4), CFG.model_copy(update={"batch_size": 64}))


# --- checkpoints of another configuration are refused, never resumed --------------------------------------


def test_fit_refuses_checkpoints_of_another_config(tmp_path):
    data = synthetic()
    fit(tiny_model(), data, CFG, ckpt_dir=tmp_path)  # finished 3-epoch run
    shorter, longer = CFG.model_copy(update={"epochs": 2}), CFG.model_copy(update={"epochs": 5})
    with pytest.raises(CheckpointMismatch, match=r"train\.epochs \(3 -> 2\)") as e:
        fit(tiny_model(), data, shorter, ckpt_dir=tmp_path)  # used to report epochs_run == -1
    assert "resume=False" in str(e.value) and str(tmp_path) in str(e.value)
    with pytest.raises(CheckpointMismatch, match=r"train\.epochs \(3 -> 5\)"):
        fit(tiny_model(), data, longer, ckpt_dir=tmp_path)  # used to keep the old lr schedule
    with pytest.raises(CheckpointMismatch, match="kd"):
        teacher, _ = fit(tiny_model(1), data, CFG.model_copy(update={"epochs": 1}))
        fit(tiny_model(), data, CFG, ckpt_dir=tmp_path, teacher=teacher)  # a CE run's state as a KD student
    # cosmetic and retention settings are not part of the fingerprint: this resumes (nothing left to do)
    _, res = fit(tiny_model(), data, CFG.model_copy(update={"progress": "log", "keep_checkpoints": 5}), ckpt_dir=tmp_path)
    assert res.resumed_from_epoch == 3 and res.epochs_run == 0


def test_fit_never_resumes_through_a_pointer_out_of_its_folder(tmp_path):
    data = synthetic()
    fit(tiny_model(), data, CFG, ckpt_dir=tmp_path / "other-run" / "ckpt")
    other = latest_checkpoint(tmp_path / "other-run" / "ckpt")
    root = tmp_path / "run" / "ckpt"

    def die_after_epoch_1(metrics, step):
        raise Killed()

    with pytest.raises(Killed):  # the same config, killed after its first checkpoint
        fit(tiny_model(), data, CFG, ckpt_dir=root, log_fn=die_after_epoch_1)
    (root / "LATEST").write_text(f"../../other-run/ckpt/{other.name} {sha256_file(other / 'checkpoint.json')}\n")
    with pytest.raises(CheckpointError, match="LATEST") as e:
        fit(tiny_model(), data, CFG, ckpt_dir=root)
    assert str(root) in str(e.value)


def _scripted_val_accuracy(monkeypatch, data, accs):
    """Make validation report the accuracies in ``accs``, epoch by epoch."""
    y_val = data["val"][1]
    seq = iter(accs)

    def fake_predict(model, x, rt, batch_size=1000, *, stats):
        k = round(next(seq) * len(y_val))
        labels = torch.cat([y_val[:k], (y_val[k:] + 1) % 3])
        return torch.nn.functional.one_hot(labels, 3).float()

    monkeypatch.setattr(train_module, "predict", fake_predict)


@pytest.mark.parametrize(
    "keep_best, expected",
    [
        (True, [["epoch-0001"], ["epoch-0001", "epoch-0002"], ["epoch-0001", "epoch-0003"], ["epoch-0001", "epoch-0004"]]),
        (False, [["epoch-0001"], ["epoch-0002"], ["epoch-0003"], ["epoch-0004"]]),
    ],
)
def test_fit_prunes_checkpoints_before_on_checkpoint(tmp_path, monkeypatch, keep_best, expected):
    data = synthetic()
    _scripted_val_accuracy(monkeypatch, data, [0.9, 0.5, 0.6, 0.3])  # best epoch: 1
    cfg = CFG.model_copy(update={"epochs": 4, "keep_checkpoints": 1, "keep_best_checkpoint": keep_best})
    seen = []

    def on_checkpoint(folder, epoch):
        assert folder.is_dir() and folder.name == f"epoch-{epoch:04d}"
        seen.append(retained_checkpoints(tmp_path))

    _, res = fit(tiny_model(), data, cfg, ckpt_dir=tmp_path, on_checkpoint=on_checkpoint)
    assert res.best_epoch == 1 and res.best_val_acc == pytest.approx(0.9, abs=0.03)
    assert seen == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["LATEST", *expected[-1]]


# --- stages.train: the fingerprint of a stage folder -------------------------------------------------------


def _tiny_cfg(src, cache, **train):
    t = {"epochs": 2, "batch_size": 30, "progress": "off", **train}
    return load_profile("smoke", tiny_overrides(src, cache, teacher_train=t, student_train=t))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """A prepared tiny data folder and a finished 2-epoch teacher stage."""
    tmp = tmp_path_factory.mktemp("stages")
    src = make_imagefolder(tmp / "src", n_train=40, n_test=10, as_tarballs=True)
    cfg = _tiny_cfg(src, tmp / "cache")
    data_dir = Path(stages.prepare(cfg.data, progress=False)["dir"])
    stages.train("teacher", cfg, data_dir, tmp / "teacher")
    return {"cfg": cfg, "src": src, "cache": tmp / "cache", "data": data_dir, "teacher": tmp / "teacher"}


def _copy_teacher(lab, dst):
    shutil.copytree(lab["teacher"], dst)
    return dst


def test_stage_fingerprint_is_deterministic_and_covers_the_result(lab):
    cfg, data_sha = lab["cfg"], stages.manifest_sha256(lab["data"])
    teacher_sha = json.loads((lab["teacher"] / "config.json").read_text())["weights_sha256"]

    def fp(role="student", c=cfg, **kw):
        kw = {"data_manifest_sha256": data_sha, "teacher_weights_sha256": teacher_sha, **kw}
        return stages.stage_fingerprint(role, c, **kw)

    doc = fp()
    assert json.loads(json.dumps(doc)) == doc
    assert set(doc) == {"fingerprint_version", "role", "model", "train", "kd", "data_manifest_sha256", "teacher_weights_sha256",
                        "init_seed"}
    again = _tiny_cfg(lab["src"], lab["cache"])  # an equal config built separately
    assert sha256_json(fp(c=again)) == sha256_json(doc)
    # what does not change the result does not change the fingerprint
    same = [
        again.model_copy(update={"student_train": again.student_train.model_copy(update={"progress": "bar", "keep_checkpoints": 9})}),
        again.model_copy(update={"teacher_train": again.teacher_train.model_copy(update={"lr": 0.3})}),
        again.model_copy(update={"promotion_margin": 0.5}),
    ]
    for c in same:
        assert sha256_json(fp(c=c)) == sha256_json(doc)
    # everything that does, does
    differ = [
        fp("baseline"),
        fp(c=again.model_copy(update={"student_train": again.student_train.model_copy(update={"lr": 0.3})})),
        fp(c=again.model_copy(update={"student_train": again.student_train.model_copy(update={"device": "auto"})})),
        fp(kd=KDConfig(temperature=2.0)),
        fp(data_manifest_sha256="0" * 64),
        fp(teacher_weights_sha256="1" * 64),
        fp("teacher"),
    ]
    hashes = {sha256_json(d) for d in differ} | {sha256_json(doc)}
    assert len(hashes) == len(differ) + 1
    assert fp("baseline")["kd"] is None and fp("baseline")["teacher_weights_sha256"] is None
    with pytest.raises(ValueError, match="teacher_weights_sha256"):
        fp(teacher_weights_sha256=None)
    # the teacher stage recorded exactly its fingerprint
    recorded = json.loads((lab["teacher"] / "config.json").read_text())
    assert recorded["fingerprint"] == fp("teacher") and recorded["fingerprint_sha256"] == sha256_json(fp("teacher"))
    checkpoint = latest_checkpoint(lab["teacher"] / "checkpoints")
    assert json.loads((checkpoint / "checkpoint.json").read_text())["fingerprint"] == fp("teacher")


def test_stage_refuses_an_out_dir_of_another_role(lab, tmp_path):
    cfg, data = lab["cfg"], lab["data"]
    out = tmp_path / "x"
    stages.train("baseline", cfg, data, out)
    with pytest.raises(CheckpointMismatch) as e:  # used to resume the baseline's checkpoint as the "student"
        stages.train("student", cfg, data, out, teacher_dir=lab["teacher"])
    msg = str(e.value)
    assert str(out) in msg and "role" in msg and "--no-resume" in msg and "resume=False" in msg
    res = stages.train("student", cfg, data, out, teacher_dir=lab["teacher"], resume=False)
    assert res["resumed_from_epoch"] == 0 and res["epochs_run"] == 2
    assert json.loads((out / "config.json").read_text())["fingerprint"]["role"] == "student"


def test_stage_rerun_with_other_epochs_is_refused_then_started_fresh(lab, tmp_path):
    data = lab["data"]
    out = _copy_teacher(lab, tmp_path / "t")
    for epochs in (1, 4):
        other = _tiny_cfg(lab["src"], lab["cache"], epochs=epochs)
        with pytest.raises(CheckpointMismatch, match=rf"train\.epochs \(2 -> {epochs}\)"):
            stages.train("teacher", other, data, out)
    # a killed run of the other config leaves only checkpoints: refused all the same
    (out / "config.json").unlink()
    with pytest.raises(CheckpointMismatch, match=r"train\.epochs \(2 -> 1\)") as e:
        stages.train("teacher", _tiny_cfg(lab["src"], lab["cache"], epochs=1), data, out)
    assert str(out / "checkpoints") in str(e.value)
    res = stages.train("teacher", _tiny_cfg(lab["src"], lab["cache"], epochs=1), data, out, resume=False)
    assert res["epochs_run"] == 1 and res["resumed_from_epoch"] == 0
    assert retained_checkpoints(out / "checkpoints") == ["epoch-0001"]


def test_stage_refuses_a_forged_checkpoint(lab, tmp_path):
    cfg, data = lab["cfg"], lab["data"]
    out = _copy_teacher(lab, tmp_path / "t")
    folder = latest_checkpoint(out / "checkpoints")
    meta = json.loads((folder / "state.json").read_text())
    meta["state"]["__dict__"]["best_val_acc"] = 0.99  # used to become the reported validation accuracy
    (folder / "state.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="checksum mismatch for state.json") as e:
        stages.train("teacher", cfg, data, out)
    assert str(folder) in str(e.value)


def test_stage_batch_larger_than_split_fails_before_compute(lab, tmp_path):
    cfg = _tiny_cfg(lab["src"], lab["cache"], batch_size=512)
    n = json.loads((lab["data"] / "manifest.json").read_text())["counts"]["train"]["total"]
    out = tmp_path / "never"
    with pytest.raises(ValueError) as e:
        stages.train("student", cfg, lab["data"], out, teacher_dir=lab["teacher"])
    assert str(e.value) == f"student_train.batch_size (512) is larger than the training split ({n} images)"
    assert not out.exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: (d / "config.json").write_text('{"role": "tea'), "config.json is not valid JSON"),
        (lambda d: (d / "config.json").unlink(), "config.json missing"),
        (lambda d: (d / "model.safetensors").unlink(), "model.safetensors missing"),
    ],
    ids=["truncated-config", "missing-config", "missing-weights"],
)
def test_load_model_names_the_damaged_folder(lab, tmp_path, damage, message):
    folder = _copy_teacher(lab, tmp_path / "t")
    stages.load_model(folder)
    damage(folder)
    with pytest.raises(stages.ModelLoadError, match=message) as e:
        stages.load_model(folder)
    assert str(folder) in str(e.value)
