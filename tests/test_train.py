"""Trainer: learns, checkpoints every epoch, resumes bit-identically on CPU, reports through log_fn."""

import json

import pytest
import torch

from distill.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from distill.config import KDConfig, TrainConfig
from distill.models import build_model
from distill.train import LRSchedule, fit


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
    meta = json.loads((folder / "state.json").read_text())
    assert meta["sha256"]
    blob = bytearray((folder / "state.safetensors").read_bytes())
    blob[-1] ^= 0xFF
    (folder / "state.safetensors").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        load_checkpoint(folder)


def test_checkpoint_keeps_latest_pointer_and_prunes(tmp_path):
    for e in range(1, 5):
        save_checkpoint(tmp_path, e, {"e": torch.tensor(e)}, keep=2)
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
