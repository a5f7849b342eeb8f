#!/usr/bin/env bash
# First run of the three kinds' GPU paths, in one device call of about 5 minutes, from the repository root:
#
#     bash bench/gpu_check.sh        # logs + JSON to $OUT if set, else to bench/out/
#
# Phase 1, side by side (correctness of the CUDA paths; the timings are under shared load):
#   - `distill lab --profile seed` on the CIFAR-10 JPEG copy: ResNet-34 teacher, baseline, student, 15 epochs
#     each, the default GPU path (bf16 autocast, channels_last, on-device augmentation, torch.compile
#     reduce-overhead = CUDA graphs), cut off after CHECK_LAB_S seconds;
#   - the diffusion kind (`--profile full` with its step counts cut to seconds, FID off: the Inception file
#     does not travel);
#   - the LM kind (a random 4-layer Llama teacher with GPT-2's tokenizer made on the box, a pruned student,
#     on-policy GKD with lmbda 0.5 so generation runs on CUDA).
# Phase 2, alone: bench/bench_train.py, the seed loop vs ours (compile off and reduce-overhead), distillation
# stage only, one repeat (the short form of bench/gpu_run.sh).
#
# Carry .gpu/ (see bench/README.md): wheels/ (pydantic, pydantic_core, annotated_types, typing_inspection,
# diffusers: the box lacks them), cifar10-jpeg/, text/, gpt2-tokenizer/.
set -u
cd "$(dirname "$0")/.."
DEST="${OUT:-bench/out}"
mkdir -p "$DEST"
PY="${PYTHON:-python3}"
LAB_S="${CHECK_LAB_S:-240}"
BENCH_S="${CHECK_BENCH_S:-60}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if ! "$PY" -c "import pydantic, diffusers" 2>/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .gpu/wheels/*.whl || exit 2
fi
export PYTHONPATH="src:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "import torch, torchvision, transformers, diffusers, pydantic; assert torch.cuda.is_available();
print('GPU:', torch.cuda.get_device_name(0), '| torch', torch.__version__, '| torchvision', torchvision.__version__,
      '| transformers', transformers.__version__, '| diffusers', diffusers.__version__)" || exit 2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
WORK=/tmp/distill-check
mkdir -p "$WORK"
t0=$(date +%s)

# --- phase 1 -------------------------------------------------------------------------------------------
( start=$(date +%s)
  timeout "$LAB_S" "$PY" -m distill.cli lab --profile seed --set data.source=.gpu/cifar10-jpeg \
      --set data.cache_dir="$WORK/cache" --out "$WORK/seed-lab"
  echo "rc=$? wall: $(( $(date +%s) - start )) s" ) > "$DEST/seed_lab.log" 2>&1 &
lab_pid=$!

( start=$(date +%s)
  timeout $(( LAB_S - 20 )) "$PY" -m distill.cli lab --kind diffusion --profile full \
      --set data.source=.gpu/cifar10-jpeg --set data.cache_dir="$WORK/dcache" \
      --set teacher.train.steps=600 --set teacher.train.warmup_steps=50 --set teacher.train.checkpoint_every=300 \
      --set teacher.sample_steps=16 --set progressive.final_steps=4 --set progressive.train.steps=150 \
      --set consistency.train.steps=150 --set eval.n_samples=256 --set eval.n_reference=256 \
      --set eval.val_samples=64 --set 'eval.steps=[1,2,4,8,16]' --set eval.fid=false --out "$WORK/diffusion-lab"
  echo "rc=$? wall: $(( $(date +%s) - start )) s" ) > "$DEST/diffusion.log" 2>&1 &
diff_pid=$!

( start=$(date +%s)
  "$PY" - "$WORK/lm-teacher" <<'EOF'
import sys, torch
from transformers import GPT2TokenizerFast, LlamaConfig, LlamaForCausalLM
tok = GPT2TokenizerFast.from_pretrained(".gpu/gpt2-tokenizer")
torch.manual_seed(0)
m = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, intermediate_size=1024, max_position_embeddings=512, tie_word_embeddings=True,
    eos_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id))
m.save_pretrained(sys.argv[1]); tok.save_pretrained(sys.argv[1]); print("teacher written", sys.argv[1])
EOF
  timeout $(( LAB_S - 40 )) "$PY" -m distill.cli lab --kind lm --profile smoke \
      --set "teacher.source=\"$WORK/lm-teacher\"" --set 'data.train=[".gpu/text/tinyshakespeare.txt"]' \
      --set 'data.test=[".gpu/text/wikitext-2-test.tokens"]' --set data.block_size=256 \
      --set data.max_train_tokens=200000 --set data.max_val_tokens=8192 --set data.max_test_tokens=16384 \
      --set data.cache_dir="$WORK/lmcache" --set student.mlp=512 --set student.layers=2 \
      --set train.steps=60 --set train.batch_size=16 --set train.device=auto --set train.amp=auto \
      --set train.eval_every=30 --set train.checkpoint_every=30 --set kd.lmbda=0.5 \
      --set kd.gen_prompt_tokens=64 --set kd.gen_max_new_tokens=64 --set sweep.enabled=false \
      --set eval.max_new_tokens=32 --set eval.speed_batches=4 --out "$WORK/lm-lab"
  echo "rc=$? wall: $(( $(date +%s) - start )) s" ) > "$DEST/lm.log" 2>&1 &
lm_pid=$!
wait $lab_pid $diff_pid $lm_pid
echo "phase 1: $(( $(date +%s) - t0 )) s"

# --- phase 2 -------------------------------------------------------------------------------------------
timeout "$BENCH_S" "$PY" bench/bench_train.py --device cuda --models seed --batch 128 --images 10240 \
    --stages distill --compile off,reduce-overhead --repeats 1 --seed-warmup 10 --seed-steps 100 --our-epochs 2 \
    --json "$DEST/bench_gpu.json" > "$DEST/bench_gpu.log" 2>&1
echo "bench rc=$?"
echo "total: $(( $(date +%s) - t0 )) s"
for f in seed-lab diffusion-lab lm-lab; do
    [ -f "$WORK/$f/report.md" ] && { echo "== $f"; cat "$WORK/$f/report.md"; }
done > "$DEST/reports.md"
for f in seed_lab diffusion lm bench_gpu; do echo "===== $f"; tail -n 25 "$DEST/$f.log"; done
