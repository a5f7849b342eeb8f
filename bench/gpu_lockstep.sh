#!/usr/bin/env bash
# Lockstep group training on a GPU box (issue 9), in one device call of about 8 minutes, from the repository root:
#
#     bash bench/gpu_lockstep.sh        # logs + JSON to $OUT if set, else to bench/out/
#
# 1. `distill lab --profile seed` on the CIFAR-10 JPEG copy: the ResNet-34 teacher, then the baseline, the student
#    and the 4 other sweep temperatures as ONE lockstep group (the teacher run once per batch), 15 epochs, then
#    the evaluation of the 7 models; cut off after LAB_S seconds.
# 2. bench/bench_lockstep.py: per-stage (one fit per member) vs lockstep (one group) for ResNet-18 students of a
#    ResNet-34 teacher, baseline + T in {1, 4, 16}, 10,240 synthetic images x 3 epochs, batch 128, CUDA graphs.
# Carry .gpu/ (wheels/ with pydantic and its deps, cifar10-jpeg/), as for bench/gpu_check.sh.
set -u
cd "$(dirname "$0")/.."
DEST="${OUT:-bench/out}"
mkdir -p "$DEST"
PY="${PYTHON:-python3}"
LAB_S="${LAB_S:-320}"
BENCH_S="${BENCH_S:-150}"
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import pydantic" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl || exit 2
fi
export PYTHONPATH="src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch; assert torch.cuda.is_available(); print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)" || exit 2
WORK=/tmp/distill-lockstep
t0=$(date +%s)
timeout "$LAB_S" "$PY" -m distill.cli lab --profile seed --set data.source=.gpu/cifar10-jpeg \
    --set data.cache_dir="$WORK/cache" --out "$WORK/seed-lab" > "$DEST/seed_lab_lockstep.log" 2>&1
echo "lab rc=$? wall $(( $(date +%s) - t0 )) s" | tee -a "$DEST/seed_lab_lockstep.log"
t1=$(date +%s)
timeout "$BENCH_S" "$PY" bench/bench_lockstep.py --device cuda --models seed --temperatures 1,4,16 --images 10240 \
    --epochs 3 --json "$DEST/lockstep_gpu.json" > "$DEST/lockstep_gpu.log" 2>&1
echo "bench rc=$? wall $(( $(date +%s) - t1 )) s" | tee -a "$DEST/lockstep_gpu.log"
[ -f "$WORK/seed-lab/report.md" ] && cp "$WORK/seed-lab/report.md" "$DEST/seed_lab_report.md"
grep -E "epoch (1|15)/15|prepared|decoded" "$DEST/seed_lab_lockstep.log" | head -40
tail -n 25 "$DEST/seed_lab_lockstep.log"; tail -n 15 "$DEST/lockstep_gpu.log"
