#!/usr/bin/env bash
# The GPU check, in stages: each runs under its own `timeout`, capped by what is left of the budget
# (GPU_CHECK_BUDGET_S, default 430 s); a stage that fails or times out does not stop the next; each bench
# rewrites its JSON after every part, so a stage cut short still leaves its figures. Needs python3 with a CUDA
# build of torch and transformers, run from the repository root; nothing is downloaded (random models of the
# real shapes are built on the GPU). Results, logs and a summary go to $OUT.
#
#   OUT=/some/folder bash scripts/gpu_check.sh                        # the default stages (~7 min)
#   STAGES="tests scale-lora7b" OUT=... bash scripts/gpu_check.sh     # any stages, in the order listed below
#
# Stages (default: tests bench-7b bench-small):
#   tests           tests/test_cuda.py: CUDA graphs vs eager vs HF generate, grid cache, fused ops, fallbacks
#   bench-7b        experiments.bench on the Qwen2.5-7B shape, 64 rows: our decoder with each saving turned off
#                   in turn (--variants) and an eager step's GPU time by kernel; HF generate's static cache as
#                   recorded on an H200 (2,921.3 tokens/s: compiling it takes ~153 s)
#   bench-small     the same on the SmolLM2-135M shape, 256 rows, against HF static measured now
#   bench-update    the GRPO update's timing on both shapes (the one part the bench stages skip)
#   scale-lora7b    scripts/scale_check.py: a few GRPO steps of a random Qwen2.5-7B with LoRA rank 16, measured
#                   beside the memory planner (docs/scaling.md)
#   scale-full135m  the same, full fine-tune of the SmolLM2-135M shape
#   scale-fsdp7b    the 7B full fine-tune under torchrun with FSDP2 on every GPU (2 or more)
# docs/bench/check1 ... check4a hold the earlier checks' outputs (H200); docs/performance.md their figures.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-runs/gpu_check}"
mkdir -p "$OUT"
BUDGET="${GPU_CHECK_BUDGET_S:-430}"
STAGES="${STAGES:-tests bench-7b bench-small}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
wanted() { [[ " $STAGES " == *" $1 "* ]]; }

# stage NAME CAP_S COMMAND...: if wanted, run under timeout min(CAP_S, time left), log to $OUT/NAME.log
stage() {
    local name="$1" cap="$2"; shift 2
    wanted "$name" || return 0
    local limit; limit=$(left)
    (( cap < limit )) && limit=$cap
    if (( limit < 15 )); then
        echo "=== $name: skipped, ${limit}s left of the ${BUDGET}s budget" | tee "$OUT/$name.log"
        return 0
    fi
    echo "=== $name (limit ${limit}s, $(left)s of budget left): $*"
    local t0; t0=$(date +%s)
    timeout --signal=TERM --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/$name.log"
}

{
    echo "date: $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    "$PY" -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())" 2>&1
} | tee "$OUT/env.txt"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)

stage tests 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py
stage bench-7b 165 "$PY" -m experiments.bench --preset gpu-7b --reps 2 --skip-train --no-graphs off --variants on \
    --profile-step on --hf-dynamic off --hf-static off --recorded-hf-static 2921.3 --out "$OUT/gpu-7b.json"
stage bench-small 150 "$PY" -m experiments.bench --preset gpu-small --reps 2 --skip-train --no-graphs off \
    --variants on --profile-step on --hf-dynamic off --hf-static on --hf-timeout 70 --out "$OUT/gpu-small.json"
stage bench-update 200 bash -c "'$PY' -m experiments.bench --preset gpu-small --reps 2 --hf-dynamic off --hf-static off \
    --out '$OUT/update-small.json' && '$PY' -m experiments.bench --preset gpu-7b --reps 2 --hf-dynamic off \
    --hf-static off --out '$OUT/update-7b.json'"
stage scale-lora7b 300 "$PY" scripts/scale_check.py --shape qwen7b --lora-rank 16 --steps 2 --out "$OUT/scale/lora7b"
stage scale-full135m 120 "$PY" scripts/scale_check.py --shape smollm2 --steps 2 --out "$OUT/scale/full135m"
if (( NGPU >= 2 )); then
    stage scale-fsdp7b 300 torchrun --nproc_per_node "$NGPU" scripts/scale_check.py --shape qwen7b --steps 2 \
        --out "$OUT/scale/fsdp7b"
elif wanted scale-fsdp7b; then
    echo "=== scale-fsdp7b: skipped, needs 2 or more GPUs ($NGPU found)" | tee "$OUT/scale-fsdp7b.log"
fi

# the headline figures, computed from the JSON files (so a stage cut short still reports)
if wanted bench-7b || wanted bench-small; then
    "$PY" scripts/gpu_summary.py "$OUT" --previous docs/bench/check4 2>&1 | tee "$OUT/summary.txt"
fi
echo "total: $(( $(date +%s) - START ))s of ${BUDGET}s"
