#!/usr/bin/env bash
# Full seed-loop vs our-trainer benchmark on a GPU box (meant for an H100), from the repository root:
#
#     bash bench/gpu_run.sh            # JSON + log to $OUT if set, else to bench/out/
#
# Needs only the compute core's dependencies (torch, torchvision, numpy, pillow, pydantic, safetensors);
# no Prefect/MLflow/boto3 and no `pip install`: PYTHONPATH=src is used.
# ResNet-18 student / ResNet-34 teacher, batch 128, stages baseline, distill, teacher; our trainer with
# compile off and reduce-overhead (CUDA graphs); 3 interleaved repeats. Estimated 4-5 minutes on an H100, not yet timed
# (most of it the seed loop at ~5.5k img/s and the first torch.compile of each model).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"
DEST="${OUT:-bench/out}"
mkdir -p "$DEST"

if ! "$PY" -c "import torch, torchvision, numpy, PIL, pydantic, safetensors" 2>/dev/null; then
    echo "missing a dependency of the compute core; install with:" >&2
    echo "  $PY -m pip install 'pydantic>=2.7,<3' 'safetensors>=0.4' numpy pillow" >&2
    "$PY" -c "import torch, torchvision, numpy, PIL, pydantic, safetensors" || true
    exit 2
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0))"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true

# ${BENCH_ARGS} lets one add e.g. "--repeats 2" or "--stages distill" (later flags win).
"$PY" bench/bench_train.py --device cuda --models seed --batch 128 --images 10240 \
    --stages baseline,distill,teacher --compile off,reduce-overhead --repeats 3 \
    --seed-warmup 10 --seed-steps 200 --our-epochs 3 \
    --json "$DEST/bench_gpu.json" ${BENCH_ARGS:-} 2>&1 | tee "$DEST/bench_gpu.log"
