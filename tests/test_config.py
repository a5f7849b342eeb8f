import warnings

import pytest
from pydantic import ValidationError

from distill.config import PRESETS, LabConfig, load_profile, parse_overrides


def test_presets_build():
    for name in PRESETS:
        cfg = load_profile(name)
        assert cfg.profile == name


def test_seed_profile_is_the_seed_recipe():
    cfg = load_profile("seed")
    assert (cfg.teacher.name, cfg.student.name) == ("resnet34", "resnet18")
    for t in (cfg.teacher_train, cfg.student_train):
        assert (t.epochs, t.batch_size, t.lr, t.momentum, t.weight_decay, t.schedule) == (15, 128, 0.1, 0.9, 5e-4, "cosine_epoch")
    assert (cfg.kd.temperature, cfg.kd.alpha) == (4.0, 0.7)
    assert cfg.sweep.temperatures == [1, 2, 4, 8, 16]


def test_full_profile_trains_teacher_longer():
    cfg = load_profile("full")
    assert cfg.teacher_train.epochs >= 3 * cfg.student_train.epochs


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"kd": {"temperature": 0}}, "kd.temperature"),
        ({"kd": {"temperature": -1}}, "kd.temperature"),
        ({"kd": {"alpha": 1.5}}, "kd.alpha"),
        ({"kd": {"alpha": -0.1}}, "kd.alpha"),
        ({"student": {"name": "resnet9000"}}, "student.name"),
        ({"teacher": {"name": "vgg"}}, "teacher.name"),
        ({"student_train": {"epochs": 0}}, "student_train.epochs"),
        ({"teacher_train": {"epochs": 0}}, "teacher_train.epochs"),
        ({"sweep": {"temperatures": [1, 0]}}, "sweep.temperatures"),
        ({"sweep": {"alphas": [2]}}, "sweep.alphas"),
        ({"kd": {"tempreature": 2}}, "kd.tempreature"),
    ],
)
def test_bad_values_fail_naming_the_field(overrides, field):
    with pytest.raises(ValidationError) as ei:
        load_profile("smoke", overrides)
    locs = [".".join(str(p) for p in err["loc"]) for err in ei.value.errors()]
    assert any(loc.startswith(field) for loc in locs), locs
    assert field.split(".")[-1] in str(ei.value)


def test_student_larger_than_teacher_warns():
    with pytest.warns(UserWarning, match="larger than teacher"):
        load_profile("seed", {"teacher": {"name": "resnet18"}, "student": {"name": "resnet34"}})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_profile("seed")


def test_unknown_profile():
    with pytest.raises(ValueError, match="unknown profile"):
        load_profile("huge")


def test_parse_overrides_and_kwargs_reset():
    ov = parse_overrides(["student_train.epochs=3", "kd.temperature=2.5", "teacher.name=resnet34"])
    assert ov == {"student_train": {"epochs": 3}, "kd": {"temperature": 2.5}, "teacher": {"name": "resnet34"}}
    cfg = load_profile("smoke", ov)
    assert cfg.teacher.name == "resnet34" and cfg.teacher.kwargs == {}
    with pytest.raises(ValueError):
        parse_overrides(["epochs"])


def test_sweep_members():
    cfg = load_profile("smoke", {"sweep": {"temperatures": [1, 4], "alphas": [0.5, 0.9]}})
    members = cfg.sweep.members()
    assert [(m.temperature, m.alpha) for m in members] == [(1, 0.5), (4, 0.5), (1, 0.9), (4, 0.9)]


def test_json_roundtrip():
    cfg = load_profile("full")
    assert LabConfig.model_validate_json(cfg.model_dump_json()) == cfg
