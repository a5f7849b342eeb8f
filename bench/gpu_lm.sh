#!/usr/bin/env bash
# LM distillation benchmark on a GPU box (H100 / H200), from the repository root:
#
#     bash bench/gpu_lm.sh            # JSON + log to $OUT if set, else to bench/out/
#
# NOT RUN YET (bench/gpu_check.sh ran an LM lab on CUDA on an H200, see bench/RESULTS.md). Estimated 3-4.5 minutes on an H100/H200, most of it
# the start-up of the 7 worker processes (CUDA init, imports, loading the teacher) and the on-policy TRL row's
# generation.
#
# What it runs: bench/bench_lm.py with the SmolLM2-135M-Instruct teacher and a student pruned to half width
# (hidden 576 -> 288, MLP 1536 -> 768, ~47M params), seq 512, batch 16, bf16 autocast for ours and TRL (the seed
# loop stays fp32, as written), forward KL at T=1; rows: ours with chunk_tokens full (8192) and 1024, the seed loop,
# TRL GKDTrainer lmbda=0 with gradient checkpointing off and on; on-policy (lmbda=0.5, prompt 256 + 256 new tokens,
# 6 timed steps): ours (fit_lm's GKD fields) and TRL.
# 5 warm-up + 30 timed steps per row. Target: ours >= 1.5x TRL GKD (lmbda=0) tokens/s at no more peak memory.
#
# The box has python3 + torch + transformers (+ accelerate) but NO network and NO prefect/mlflow; nothing from
# ../shared is used. Carry the git-ignored folder .gpu/ (prepared on a machine with the venv, see bench/README.md):
#
#   .gpu/smollm2/        the converted SmolLM2 folder: config.json, generation_config.json, tokenizer.json,
#                        tokenizer_config.json, chat_template.jinja (3.5 MB) and, if it can travel, model.safetensors
#                        (514 MB fp32). WITHOUT model.safetensors the teacher gets random weights of the same shapes:
#                        same speed and memory (the table says "RANDOM weights"); only on-policy EOS timing differs.
#   .gpu/wheels/*.whl    only if the box lacks trl: trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
#                        xxhash (+ pyarrow, pandas, psutil, accelerate if missing), built for the box's python;
#                        installed here offline into .gpu/site with --no-index --no-deps (the box's torch and
#                        transformers are not touched). Without trl the TRL rows are skipped, ours and seed still run.
#
# Overrides: PYTHON=..., TEACHER=path, BENCH_ARGS="--repeats 2" (later flags win).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
DEST="${OUT:-bench/out}"
TEACHER="${TEACHER:-.gpu/smollm2}"
mkdir -p "$DEST"
export PYTHONPATH="src:.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false TRL_EXPERIMENTAL_SILENCE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

if [ ! -f "$TEACHER/config.json" ] || [ ! -f "$TEACHER/tokenizer.json" ]; then
    echo "missing $TEACHER/config.json or tokenizer.json: copy the converted SmolLM2 folder there (bench/README.md)" >&2
    exit 2
fi
if ! "$PY" -c "import torch, transformers, accelerate, pydantic, safetensors, numpy" 2>/dev/null; then
    echo "missing a dependency (torch, transformers, accelerate, pydantic, safetensors, numpy):" >&2
    "$PY" -c "import torch, transformers, accelerate, pydantic, safetensors, numpy" || true
    exit 2
fi
if ! "$PY" -c "import trl.experimental.gkd" 2>/dev/null; then
    if compgen -G ".gpu/wheels/*.whl" >/dev/null; then
        echo "trl not importable: installing .gpu/wheels/*.whl offline into .gpu/site (--no-deps)"
        "$PY" -m pip install --no-index --no-deps --target .gpu/site .gpu/wheels/*.whl
    fi
    "$PY" -c "import trl.experimental.gkd" 2>/dev/null || echo "WARNING: trl still not importable: TRL rows will be skipped" >&2
fi
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__)"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
[ -f "$TEACHER/model.safetensors" ] || echo "NOTE: $TEACHER has no model.safetensors: the teacher gets random weights (same speed)"

"$PY" bench/bench_lm.py --device cuda --teacher "$TEACHER" --student-width 0.5 \
    --seq-len 512 --batch 16 --warmup 5 --steps 30 --chunks full,1024 \
    --loops ours,ours-onpolicy,seed,trl,trl-onpolicy --trl-gc off,on --onpolicy-steps 6 --timeout 240 \
    --json "$DEST/bench_lm_gpu.json" ${BENCH_ARGS:-} 2>&1 | tee "$DEST/bench_lm_gpu.log"
