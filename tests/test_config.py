import warnings

import pytest
from pydantic import ValidationError

from distill.image.config import PRESETS, LabConfig, load_profile, parse_overrides


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


def _locs(ei) -> list[str]:
    return [".".join(str(p) for p in err["loc"]) for err in ei.value.errors()]


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"kd": {"temperature": INF}}, "kd.temperature"),
        ({"kd": {"temperature": 1e-300}}, "kd.temperature"),
        ({"kd": {"temperature": 1000}}, "kd.temperature"),
        ({"sweep": {"temperatures": [4, INF]}}, "sweep.temperatures"),
        ({"sweep": {"temperatures": [1e-300]}}, "sweep.temperatures"),
        ({"sweep": {"temperatures": [1000]}}, "sweep.temperatures"),
        ({"student_train": {"lr": INF}}, "student_train.lr"),
        ({"student_train": {"lr": 1e-300}}, "student_train.lr"),
        ({"teacher_train": {"lr": 100}}, "teacher_train.lr"),
        ({"teacher_train": {"weight_decay": INF}}, "teacher_train.weight_decay"),
        ({"teacher_train": {"weight_decay": 2}}, "teacher_train.weight_decay"),
        ({"teacher": {"name": "resnet_small", "kwargs": {"width": INF}}}, "teacher.kwargs"),
    ],
)
def test_non_finite_and_absurd_floats_fail_naming_the_field(overrides, field):
    with pytest.raises(ValidationError) as ei:
        load_profile("smoke", overrides)
    assert any(loc.startswith(field) for loc in _locs(ei)), _locs(ei)


def test_json_infinity_from_set_is_refused():
    for item in ("kd.temperature=Infinity", "kd.temperature=1e999", "student_train.lr=NaN", "sweep.temperatures=[4, Infinity]"):
        with pytest.raises(ValidationError) as ei:
            load_profile("smoke", parse_overrides([item]))
        assert any(loc.startswith(item.split("=")[0]) for loc in _locs(ei)), (item, _locs(ei))


def test_sweep_members_take_the_kd_bounds():
    from distill.image.config import KDConfig, SweepConfig

    for t in (0.01, 1e-300, 101.0, INF):
        with pytest.raises(ValidationError):
            KDConfig(temperature=t)
        with pytest.raises(ValidationError):
            SweepConfig(temperatures=[t])
    for t in (0.1, 100.0):
        assert KDConfig(temperature=t).temperature == SweepConfig(temperatures=[t]).temperatures[0] == t


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"student_train": {"epochs": 10**6}}, "student_train.epochs"),
        ({"teacher_train": {"batch_size": 10**7}}, "teacher_train.batch_size"),
        ({"teacher_train": {"eval_batch_size": 10**7}}, "teacher_train.eval_batch_size"),
        ({"teacher_train": {"seed": 2**40}}, "teacher_train.seed"),
        ({"data": {"val_size": 10**9}}, "data.val_size"),
        ({"data": {"train_subset": 10**9}}, "data.train_subset"),
        ({"data": {"test_subset": 10**9}}, "data.test_subset"),
        ({"eval": {"batch_size": 10**7}}, "eval.batch_size"),
        ({"eval": {"latency_runs": 10**9}}, "eval.latency_runs"),
        ({"eval": {"throughput_runs": 10**9}}, "eval.throughput_runs"),
        ({"eval": {"warmup_runs": 10**9}}, "eval.warmup_runs"),
        ({"eval": {"ece_bins": 10**9}}, "eval.ece_bins"),
        ({"eval": {"throughput_batch": 10**7}}, "eval.throughput_batch"),
        ({"sweep": {"temperatures": [float(t) for t in range(1, 100)]}}, "sweep.temperatures"),
    ],
)
def test_counts_have_upper_bounds(overrides, field):
    with pytest.raises(ValidationError) as ei:
        load_profile("smoke", overrides)
    assert any(loc.startswith(field) for loc in _locs(ei)), _locs(ei)


def test_data_config_max_image_side():
    assert load_profile("smoke").data.max_image_side == 4096
    assert load_profile("smoke", {"data": {"max_image_side": 512}}).data.max_image_side == 512
    for bad in (4, 10**6):
        with pytest.raises(ValidationError) as ei:
            load_profile("smoke", {"data": {"max_image_side": bad}})
        assert _locs(ei) == ["data.max_image_side"]


@pytest.mark.parametrize(
    "spec,match",
    [
        ({"name": "resnet_small", "kwargs": {"widht": 8}}, "no parameter 'widht'"),
        ({"name": "resnet18", "kwargs": {"width": 8}}, "no parameter 'width'"),
        ({"name": "resnet_small", "kwargs": {"width": "wide"}}, "integer"),
        ({"name": "resnet_small", "kwargs": {"width": 8.5}}, "integer"),
        ({"name": "resnet_small", "kwargs": {"depth": True}}, "integer"),
        ({"name": "resnet_small", "kwargs": {"width": 10**6}}, "width"),
        ({"name": "resnet_small", "kwargs": {"depth": 10**7}}, "depth"),
        ({"name": "resnet_small", "kwargs": {"width": 0}}, "width"),
        ({"name": "resnet_small", "kwargs": {"num_classes": 100}}, "num_classes"),
        # within the per-keyword bounds, but 5e9 parameters: refused by the parameter-count cap
        ({"name": "resnet_small", "kwargs": {"width": 4096, "depth": 1}}, "parameters"),
    ],
)
def test_model_kwargs_are_checked_against_the_model(spec, match):
    for role in ("teacher", "student"):
        with pytest.raises(ValidationError, match=match) as ei:
            load_profile("smoke", {role: spec})
        assert f"{role}.kwargs" in _locs(ei), _locs(ei)


def test_model_kwargs_integral_floats_are_ints():
    cfg = load_profile("smoke", {"teacher": {"name": "resnet_small", "kwargs": {"width": 16.0, "depth": 2}}})
    assert cfg.teacher.kwargs == {"width": 16, "depth": 2} and isinstance(cfg.teacher.kwargs["width"], int)


@pytest.mark.parametrize(
    "sweep,field,value",
    [
        ({"temperatures": [4, 8, 8]}, "sweep.temperatures", "8"),
        ({"temperatures": [2, 2.0]}, "sweep.temperatures", "2"),
        ({"alphas": [0.5, 0.9, 0.5]}, "sweep.alphas", "0.5"),
    ],
)
def test_sweep_duplicates_are_refused(sweep, field, value):
    with pytest.raises(ValidationError) as ei:
        load_profile("smoke", {"sweep": sweep})
    errs = [e for e in ei.value.errors() if ".".join(map(str, e["loc"])) == field]
    assert errs and f" {value} " in errs[0]["msg"] and "more than once" in errs[0]["msg"], ei.value.errors()


@pytest.mark.parametrize(
    "items,key",
    [
        (["a.b=3", "a.b.c=1"], "a.b"),
        (["a=1", "a.b=2"], "'a'"),
        (["kd.alpha.x=1", "kd.alpha=0.5"], "kd.alpha"),
        (["kd..alpha=1"], "kd..alpha"),
        (["=1"], "''"),
        (["kd.=1"], "kd."),
    ],
)
def test_conflicting_or_malformed_overrides_are_clear_errors(items, key):
    with pytest.raises(ValueError) as ei:
        parse_overrides(items)
    assert key in str(ei.value), str(ei.value)


def test_overrides_merge_into_json_sections_and_last_wins():
    ov = parse_overrides(['teacher={"name": "resnet_small", "kwargs": {"width": 8}}', "teacher.kwargs.depth=2",
                          "kd.alpha=0.5", "kd.alpha=0.6"])
    assert ov == {"teacher": {"name": "resnet_small", "kwargs": {"width": 8, "depth": 2}}, "kd": {"alpha": 0.6}}
    with pytest.raises(ValueError, match="conflicting overrides"):
        parse_overrides(['teacher={"name": "resnet_small", "kwargs": 3}', "teacher.kwargs.depth=2"])


# --- flow parameters (flows/params.py): checked when the Prefect server or run_local builds them ----------------

def test_pipeline_params_experiment_name():
    from flows.params import PipelineParams

    for ok in ("distill-cifar", "exp.v2_1", "A" * 100):
        assert PipelineParams(experiment=ok).experiment == ok
    for bad in ("it's", 'a"b', "a b", "-lead", ".hidden", "a/b", "x" * 101, "", "é"):
        with pytest.raises(ValidationError) as ei:
            PipelineParams(experiment=bad)
        assert _locs(ei) == ["experiment"], _locs(ei)
    with pytest.raises(ValidationError, match="letters, digits"):
        PipelineParams(experiment="it's")


def test_pipeline_params_train_pool():
    from flows.params import PipelineParams

    for ok in (None, "gpu", "gpu-pool_2.a"):
        assert PipelineParams(train_pool=ok).train_pool == ok
    for bad in ("", "a/b", "gpu pool", "gpu\n", "it's", 'a"b', "a\\b"):
        with pytest.raises(ValidationError) as ei:
            PipelineParams(train_pool=bad)
        assert _locs(ei) == ["train_pool"], (bad, _locs(ei))


def test_pipeline_params_store_url_and_tracking_uri():
    from flows.params import PipelineParams

    for ok in (None, "file:///tmp/store", "s3://bucket/prefix", "s3://bucket", "relative/store", "/abs/store"):
        assert PipelineParams(store_url=ok).store_url == ok
    for bad in ("", "   ", "http://host/x", "s3://", "s3:/bucket", "ftp://x/y", "file://otherhost/x", "s3://key:secret@bucket/p",
                "file:///tmp/x\n"):
        with pytest.raises(ValidationError) as ei:
            PipelineParams(store_url=bad)
        assert _locs(ei) == ["store_url"], (bad, _locs(ei))
        assert "secret" not in ei.value.errors()[0]["msg"]
    for ok in (None, "http://mlflow:5000", "https://mlflow.example.com/path", "sqlite:////tmp/mlflow.db", "sqlite:///mlflow.db",
               "file:/tmp/mlruns", "file:///tmp/mlruns", "databricks", "databricks://profile", "postgresql+psycopg2://u:p@db/mlflow",
               "mlruns"):
        assert PipelineParams(tracking_uri=ok).tracking_uri == ok
    for bad in ("", "http://", "http:/host", "htp://host", "sqlite://", "sqlite:mlflow.db", "garbage:xyz", "http://a b", " http://h"):
        with pytest.raises(ValidationError) as ei:
            PipelineParams(tracking_uri=bad)
        assert _locs(ei) == ["tracking_uri"], (bad, _locs(ei))


def test_pipeline_params_refuse_infinity_and_duplicates_naming_the_field():
    from flows.params import PipelineParams

    cases = [
        ({"kd": {"temperature": INF}}, "overrides.kd.temperature"),
        ({"student_train": {"lr": NAN}}, "overrides.student_train.lr"),
        ({"sweep": {"temperatures": [4, 8, 8]}}, "overrides.sweep.temperatures"),
        ({"teacher": {"name": "resnet_small", "kwargs": {"width": 4096}}}, "overrides.teacher.kwargs"),
    ]
    for overrides, field in cases:
        with pytest.raises(ValidationError) as ei:
            PipelineParams(overrides=overrides)
        assert field in _locs(ei), (field, _locs(ei))


def test_pipeline_params_json_schema_refuses_what_the_server_must():
    """The Prefect server checks flow parameters against the JSON schema at submission."""
    jsonschema = pytest.importorskip("jsonschema")
    from flows.params import PipelineParams

    schema = PipelineParams.model_json_schema()
    jsonschema.validate({"experiment": "distill-cifar", "train_pool": "gpu", "overrides": {"sweep": {"temperatures": [4, 8]}}}, schema)
    for bad in (
        {"experiment": "it's"},
        {"train_pool": "a/b"},
        {"overrides": {"sweep": {"temperatures": [4, 8, 8]}}},
        {"overrides": {"kd": {"temperature": 1e-300}}},
        {"overrides": {"student_train": {"epochs": 10**6}}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_deployment_form_shows_what_each_preset_sets():
    """An override field stays empty in the form (empty = the preset's value), and its description lists the
    presets' values, read from the presets themselves."""
    from distill.image.config import load_profile
    from flows.params import PipelineParams

    schema = PipelineParams.model_json_schema()
    defs = schema["$defs"]

    def field(section: str, name: str) -> dict:
        ref = schema["properties"]["overrides"]
        ref = next(x for x in ref.get("anyOf", [ref]) if "$ref" in x)["$ref"].split("/")[-1]
        sec = defs[ref]["properties"][section]
        sec_ref = next(x for x in sec.get("anyOf", [sec]) if "$ref" in x)["$ref"].split("/")[-1]
        return defs[sec_ref]["properties"][name]

    epochs = {p: load_profile(p, {}).student_train.epochs for p in ("smoke", "seed", "full")}
    desc = field("student_train", "epochs")["description"]
    assert f"smoke: {epochs['smoke']}, seed: {epochs['seed']}, full: {epochs['full']}" in desc
    temps = {load_profile(p, {}).kd.temperature for p in ("smoke", "seed", "full")}
    if len(temps) == 1:
        assert f"(every preset: {temps.pop()})" in field("kd", "temperature")["description"]
    assert field("student_train", "epochs").get("default") is None


def test_pipeline_params_never_store_or_echo_tracking_credentials():
    """A flow parameter lands in Prefect's database and UI: a password in the tracking URI is refused, and the
    refusal does not repeat it."""
    from pydantic import ValidationError

    from flows.params import PipelineParams

    with pytest.raises(ValidationError, match="MLFLOW_TRACKING_USERNAME") as err:
        PipelineParams(tracking_uri="http://alice:s3cr3t-pw@127.0.0.1:5000")
    assert "s3cr3t-pw" not in str(err.value)


def test_run_local_moves_tracking_credentials_out_of_the_parameters(monkeypatch):
    import flows.cifar as cifar

    seen = {}

    def fake_flow(**params):
        from flows.params import PipelineParams

        seen["params"] = params = PipelineParams(**params)
        return {"tracking_uri": params.tracking_uri, "experiment": "x", "mlflow_parent_run_id": "p",
                "report": {"uri": "file:///r"}}

    class NoServer:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return "http://127.0.0.1:1/api"

        def __exit__(self, *a):
            return False

    monkeypatch.setattr(cifar, "distill_cifar", fake_flow)
    import flows.embedded

    monkeypatch.setattr(flows.embedded, "embedded_prefect_server", NoServer)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    cifar.run_local(tracking_uri="http://alice:s3cr3t-pw@127.0.0.1:5000")
    assert seen["params"].tracking_uri == "http://127.0.0.1:5000"
    assert "s3cr3t-pw" not in seen["params"].model_dump_json()
    import os

    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice" and os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cr3t-pw"
