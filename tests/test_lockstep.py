"""Lockstep group training: a model trained in a group ends bit-identical on CPU to the same model trained
alone; the group resumes after a kill; the stage writes each member's folder as the single stage would."""

import json
from pathlib import Path

import pytest
import torch

from _imagefolder import make_imagefolder, tiny_overrides
from distill.checkpoint import latest_checkpoint, load_checkpoint, retained_checkpoints
from distill.image import stages
from distill.image.config import KDConfig, TrainConfig, load_profile
from distill.image.kind import KIND
from distill.image.models import build_model
from distill.image.train import fit, fit_group
from test_train import synthetic

CFG = TrainConfig(epochs=3, batch_size=16, lr=0.05, device="cpu", compile="off", progress="off", schedule="cosine_step")


def model(seed):
    torch.manual_seed(seed)
    return build_model("resnet_small", 3, width=4, depth=1)


@pytest.fixture(scope="module")
def teacher():
    t = model(100)
    fit(t, synthetic(), CFG.model_copy(update={"epochs": 1}))
    return t.eval()


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


MEMBERS = [("baseline", None, 0), ("student", KDConfig(temperature=4.0, alpha=0.7), 0),
           ("sweep-T2", KDConfig(temperature=2.0, alpha=0.5), 0), ("student-s1", KDConfig(temperature=4.0, alpha=0.7), 1)]


def test_group_member_is_bit_identical_to_training_it_alone(teacher):
    data = synthetic()
    group = fit_group([(n, model(s), kd) for n, kd, s in MEMBERS], data, CFG, teacher=teacher)
    for name, kd, seed in MEMBERS:
        alone, res = fit(model(seed), data, CFG, teacher=teacher if kd else None, kd=kd)
        g_model, g_res = group[name]
        assert _same(g_model, alone), f"{name}: group-trained weights differ from training it alone"
        assert [h["train_loss"] for h in g_res.history] == [h["train_loss"] for h in res.history]
        assert [h["val_acc"] for h in g_res.history] == [h["val_acc"] for h in res.history]
        assert g_res.best_epoch == res.best_epoch
    # the members really differ: the seed changes the start, the KD config the loss
    assert not _same(group["student"][0], group["student-s1"][0])
    assert not _same(group["student"][0], group["baseline"][0])


def test_group_resumes_after_a_kill_bit_identically(teacher, tmp_path):
    data = synthetic()
    members = lambda: [(n, model(s), kd) for n, kd, s in MEMBERS[:3]]  # noqa: E731
    fp = {"test": "group"}
    ref = fit_group(members(), data, CFG, teacher=teacher, ckpt_dir=tmp_path / "ref", fingerprint=fp)

    class Killed(Exception):
        pass

    def die(metrics, epoch):
        if epoch == 2:
            raise Killed()

    with pytest.raises(Killed):
        fit_group(members(), data, CFG, teacher=teacher, ckpt_dir=tmp_path / "run", fingerprint=fp,
                  log_fns={"sweep-T2": die})
    assert latest_checkpoint(tmp_path / "run").name == "epoch-0002"
    seen = []
    out = fit_group(members(), data, CFG, teacher=teacher, ckpt_dir=tmp_path / "run", fingerprint=fp,
                    log_fns={"baseline": lambda m, e: seen.append(e)})
    assert seen == [3]
    for name in ref:
        assert out[name][1].resumed_from_epoch == 2
        assert _same(out[name][0], ref[name][0]), f"{name}: resumed group differs from the uninterrupted one"
        assert [h["train_loss"] for h in out[name][1].history] == [h["train_loss"] for h in ref[name][1].history]
    _, st = load_checkpoint(latest_checkpoint(tmp_path / "run"))
    assert sorted(st["members"]) == sorted(ref)
    # a group keeps its last checkpoints only (each holds every member's best weights): no best-epoch pins
    assert sorted(retained_checkpoints(tmp_path / "run")) == ["epoch-0002", "epoch-0003"]


def test_group_refuses_duplicate_names_and_kd_without_teacher():
    data = synthetic()
    with pytest.raises(ValueError, match="distinct names"):
        fit_group([("a", model(0), None), ("a", model(1), None)], data, CFG)
    with pytest.raises(ValueError, match="needs the teacher"):
        fit_group([("s", model(0), KDConfig())], data, CFG)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lockstep")
    src = make_imagefolder(tmp / "src", n_train=40, n_test=10, as_tarballs=True)
    t = {"epochs": 2, "batch_size": 30, "progress": "off"}
    cfg = load_profile("smoke", tiny_overrides(src, tmp / "cache", teacher_train=t, student_train=t))
    data_dir = Path(stages.prepare(cfg.data, progress=False)["dir"])
    stages.train("teacher", cfg, data_dir, tmp / "teacher")
    return {"cfg": cfg, "data": data_dir, "teacher": tmp / "teacher"}


def test_group_stage_writes_each_member_as_the_single_stage_would(lab, tmp_path):
    cfg = lab["cfg"]
    kd8 = cfg.kd.model_copy(update={"temperature": 8.0}).model_dump(mode="json")
    members = [{"role": "baseline", "name": "baseline", "kd": None, "seed": 0},
               {"role": "student", "name": "sweep-T8", "kd": kd8, "seed": 1}]
    out = stages.train_group(cfg, lab["data"], tmp_path / "group", members, teacher_dir=lab["teacher"])
    assert set(out) == {"baseline", "sweep-T8"} and out["sweep-T8"]["seed"] == 1
    alone = stages.train("student", cfg, lab["data"], tmp_path / "alone", teacher_dir=lab["teacher"],
                         kd=KDConfig.model_validate(kd8), seed=1)
    g_meta = json.loads((tmp_path / "group" / "sweep-T8" / "config.json").read_text())
    a_meta = json.loads((tmp_path / "alone" / "config.json").read_text())
    assert g_meta["fingerprint"] == a_meta["fingerprint"] and g_meta["fingerprint"]["init_seed"] == 1
    assert g_meta["weights_sha256"] == a_meta["weights_sha256"]
    assert out["sweep-T8"]["val_acc"] == alone["val_acc"]
    # each member folder loads and evaluates like any stage output
    m = stages.evaluate(tmp_path / "group" / "baseline", lab["data"], cfg.eval, speed=False)
    assert 0.0 <= m["accuracy"] <= 1.0
    # the same folder with other members is another group: refused, not resumed
    with pytest.raises(Exception, match="fingerprint|another"):
        stages.train_group(cfg, lab["data"], tmp_path / "group", members[:1], teacher_dir=lab["teacher"])


def test_plan_replicates_per_seed_and_groups_in_lockstep(lab):
    cfg = lab["cfg"].model_copy(update={"seeds": [3, 7]})
    plan = KIND.plan(cfg)
    names = [m.name for m in plan]
    assert names[:2] == ["baseline", "student"] and "baseline-s7" in names and "student-s7" in names
    assert {m.seed for m in plan} == {3, 7}
    assert all(m.replica_of == m.name.removesuffix("-s7") for m in plan)
    assert {m.group for m in plan} == {"lockstep"}
    split = KIND.plan(cfg.model_copy(update={"group_size": 4}))
    assert [m.group for m in split][:5] == ["lockstep-1"] * 4 + ["lockstep-2"]
    assert {m.group for m in KIND.plan(cfg.model_copy(update={"lockstep": False}))} == {None}


def test_seeds_and_gate_are_validated():
    with pytest.raises(ValueError, match="seeds"):
        load_profile("smoke", {"seeds": [1, 1]})
    with pytest.raises(ValueError, match="ci_lower"):
        load_profile("smoke", {"seeds": [0], "gate": "ci_lower"})
    assert load_profile("smoke", {}).seeds == [0, 1]
