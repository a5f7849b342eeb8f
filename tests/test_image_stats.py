"""The image kind normalises with the pixel statistics of the training split: computed at prepare time (manifest),
recorded by every trained model (config.json) and used by evaluation, speed, input examples and the teacher."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distill.image import stages
from distill.image.config import EvalConfig, load_profile
from distill.image.data import CIFAR10_MEAN, CIFAR10_STD, channel_stats, load_prepared, normalize
from distill.image.data.stats import PixelStats, stats_from_manifest
from distill.image.evaluate import SPEED_KEYS
from distill.image.train import _renormalizer, fit

# two classes, one solid colour each, equally many images per class in every split (stratified):
# R: 255 / 0 -> mean 0.5, std 0.5; G: 0 / 255 -> 0.5, 0.5; B: 51 / 102 -> mean 0.3, std 0.1
COLOURS = {"a": (255, 0, 51), "b": (0, 255, 102)}
EXPECTED = PixelStats((0.5, 0.5, 0.3), (0.5, 0.5, 0.1))
SIDE = 16


def _png(rgb) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (SIDE, SIDE), rgb).save(buf, format="PNG")
    return buf.getvalue()


def _source(root: Path, n_train=20, n_test=4) -> Path:
    for split, n in (("train", n_train), ("test", n_test)):
        for cls, rgb in COLOURS.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                (d / f"{i:03d}.png").write_bytes(_png(rgb))
    return root


def _cfg(src, cache, **eval_overrides):
    t = {"epochs": 1, "batch_size": 10, "progress": "off"}
    return load_profile("smoke", {
        "data": {"source": str(src), "cache_dir": str(cache), "val_size": 10, "train_subset": 20, "test_subset": 8},
        "teacher": {"name": "resnet_small", "kwargs": {"width": 4, "depth": 1}},
        "student": {"name": "resnet_small", "kwargs": {"width": 4, "depth": 1}},
        "teacher_train": t, "student_train": t,
        "eval": {"latency_runs": 1, "throughput_runs": 1, "warmup_runs": 0, **eval_overrides},
    })


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("stats")
    src = _source(tmp / "src")
    cfg = _cfg(src, tmp / "cache")
    prep = stages.prepare(cfg.data, progress=False)
    data_dir = Path(prep["dir"])
    stages.train("teacher", cfg, data_dir, tmp / "teacher")
    return {"cfg": cfg, "src": src, "cache": tmp / "cache", "data": data_dir, "manifest": prep["manifest"],
            "teacher": tmp / "teacher"}


# --- computing them ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk", [1, 3, 1000])
def test_channel_stats_match_numpy_whatever_the_chunk(chunk):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (17, 3, 5, 7), dtype=np.uint8)
    st = channel_stats(x, chunk=chunk)
    f = x.astype(np.float64) / 255
    np.testing.assert_allclose(st.mean, f.mean(axis=(0, 2, 3)), rtol=1e-13)
    np.testing.assert_allclose(st.std, f.std(axis=(0, 2, 3)), rtol=1e-12)
    assert channel_stats(torch.from_numpy(x)) == channel_stats(x)  # a CPU tensor works too


def test_channel_stats_edge_cases():
    x = np.zeros((4, 2, 3, 3), dtype=np.uint8)
    x[:, 0] = 255
    x[:2, 1] = 255
    st = channel_stats(x)
    assert st.mean == (1.0, 0.5) and st.std == (1.0, 0.5)  # constant channel: std 1.0, never 0
    with pytest.raises(ValueError, match="uint8"):
        channel_stats(x.astype(np.float32))
    with pytest.raises(ValueError, match="at least one pixel"):
        channel_stats(np.zeros((0, 3, 4, 4), dtype=np.uint8))


def test_prepare_records_the_training_split_stats(lab):
    m = lab["manifest"]
    assert m["normalization"]["split"] == "train"
    np.testing.assert_allclose(m["normalization"]["mean"], EXPECTED.mean, atol=1e-12)
    np.testing.assert_allclose(m["normalization"]["std"], EXPECTED.std, atol=1e-12)
    assert stats_from_manifest(m) == PixelStats(tuple(m["normalization"]["mean"]), tuple(m["normalization"]["std"]))
    x_train = load_prepared(lab["data"])["train"][0]
    assert len(x_train) == 20  # after subsetting
    assert channel_stats(x_train) == stats_from_manifest(m)


def test_a_cache_without_stats_is_not_reused(lab, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(lab["cache"], cache)
    folder = cache / lab["data"].name
    man = json.loads((folder / "manifest.json").read_text())
    del man["normalization"]
    (folder / "manifest.json").write_text(json.dumps(man))
    prep = stages.prepare(_cfg(lab["src"], cache).data, progress=False)
    assert prep["manifest"]["normalization"] == lab["manifest"]["normalization"]  # rebuilt


# --- recording and using them -----------------------------------------------------------------------------


def test_a_trained_model_records_the_stats(lab, tmp_path):
    meta = json.loads((lab["teacher"] / "config.json").read_text())
    assert meta["normalization"] == {"mean": lab["manifest"]["normalization"]["mean"],
                                     "std": lab["manifest"]["normalization"]["std"]}
    assert stages.model_normalization(lab["teacher"]) == stats_from_manifest(lab["manifest"])
    stages.train("student", lab["cfg"], lab["data"], tmp_path / "s", teacher_dir=lab["teacher"])
    assert json.loads((tmp_path / "s" / "config.json").read_text())["normalization"] == meta["normalization"]


def test_fit_defaults_to_the_stats_of_its_training_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (24, 3, 8, 8), dtype=torch.uint8, generator=g)
    y = torch.arange(24) % 2
    from distill.image.config import TrainConfig
    from distill.image.models import build_model

    cfg = TrainConfig(epochs=1, batch_size=8, device="cpu", compile="off", progress="off")
    _, res = fit(build_model("resnet_small", 2, width=4, depth=1), {"train": (x[:16], y[:16]), "val": (x[16:], y[16:])}, cfg)
    assert res.normalization == channel_stats(x[:16]).to_json()
    _, res = fit(build_model("resnet_small", 2, width=4, depth=1), {"train": (x[:16], y[:16]), "val": (x[16:], y[16:])}, cfg,
                 stats=EXPECTED)
    assert res.normalization == EXPECTED.to_json()


def _copy_model(lab, dst: Path, stats: PixelStats | None) -> Path:
    shutil.copytree(lab["teacher"], dst)
    meta = json.loads((dst / "config.json").read_text())
    if stats is None:
        del meta["normalization"]
    else:
        meta["normalization"] = stats.to_json()
    (dst / "config.json").write_text(json.dumps(meta))
    return dst


def test_evaluation_and_input_example_use_the_models_stats(lab, tmp_path):
    no_speed = EvalConfig(speed=False)
    ref = stages.evaluate(lab["teacher"], lab["data"], no_speed, out_path=tmp_path / "ref.json")
    again = stages.evaluate(_copy_model(lab, tmp_path / "same", stages.model_normalization(lab["teacher"])),
                            lab["data"], no_speed)
    assert again["loss"] == ref["loss"]
    other = PixelStats((0.1, 0.9, 0.6), (0.3, 0.2, 0.05))
    moved = stages.evaluate(_copy_model(lab, tmp_path / "other", other), lab["data"], no_speed)
    assert moved["loss"] != ref["loss"]  # the prediction follows the stats in config.json

    x = load_prepared(lab["data"])["test"][0][:1]
    ex = stages.input_example(tmp_path / "other", lab["data"])
    assert ex.dtype == np.float32 and ex.shape == (1, 3, SIDE, SIDE)
    np.testing.assert_array_equal(ex, normalize(x, *other).numpy())
    np.testing.assert_array_equal(stages.input_example(lab["teacher"], lab["data"]),
                                  normalize(x, *stages.model_normalization(lab["teacher"])).numpy())
    # a model folder written before the stats were recorded was trained with the CIFAR-10 constants
    assert stages.model_normalization(_copy_model(lab, tmp_path / "legacy", None)) == (CIFAR10_MEAN, CIFAR10_STD)


def test_bad_recorded_stats_name_the_folder(lab, tmp_path):
    folder = _copy_model(lab, tmp_path / "bad", None)
    meta = json.loads((folder / "config.json").read_text())
    meta["normalization"] = {"mean": [0.5, 0.5], "std": [0.0, 1.0]}
    (folder / "config.json").write_text(json.dumps(meta))
    with pytest.raises(stages.ModelLoadError, match="normalization") as e:
        stages.model_normalization(folder)
    assert str(folder) in str(e.value)


def test_the_teacher_input_is_renormalised_to_its_own_stats():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    s, t = EXPECTED, PixelStats((0.2, 0.4, 0.6), (0.3, 0.1, 0.7))
    scale, shift = _renormalizer(s, t, torch.device("cpu"))
    torch.testing.assert_close(torch.addcmul(shift, normalize(x, *s), scale), normalize(x, *t), atol=1e-5, rtol=1e-5)
    assert _renormalizer(s, s, torch.device("cpu")) is None and _renormalizer(s, None, torch.device("cpu")) is None


# --- speed ------------------------------------------------------------------------------------------------


def test_speed_alone_follows_the_student_batch_and_evaluate_can_skip_it(lab, tmp_path):
    m = stages.speed(lab["teacher"], lab["data"], lab["cfg"].eval, out_path=tmp_path / "speed.json")
    expected_keys = set(SPEED_KEYS[:4]) | ({"latency_ms_b1_cuda", "throughput_cuda"} if torch.cuda.is_available() else set())
    assert set(m) == expected_keys
    assert lab["cfg"].eval.throughput_batch is None
    assert m["throughput_batch"] == lab["cfg"].student_train.batch_size == 10
    assert m["speed_device"] == "cpu" and m["latency_ms_b1"] > 0 and m["throughput"] > 0
    assert json.loads((tmp_path / "speed.json").read_text()) == m
    set_batch = lab["cfg"].eval.model_copy(update={"throughput_batch": 3})
    assert stages.speed(lab["teacher"], lab["data"], set_batch)["throughput_batch"] == 3

    out = tmp_path / "e.json"
    plain = stages.evaluate(lab["teacher"], lab["data"], lab["cfg"].eval, speed=False, out_path=out)
    assert not any(k.startswith(("latency", "throughput", "speed")) for k in plain)
    full = stages.evaluate(lab["teacher"], lab["data"], lab["cfg"].eval, out_path=out)
    assert set(SPEED_KEYS[:4]) <= set(full) and full["throughput_batch"] == 10
    assert full["accuracy"] == plain["accuracy"]
