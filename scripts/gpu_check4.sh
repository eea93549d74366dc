#!/usr/bin/env bash
# The fourth GPU check (~7 min, under 430 s of wall time): tests/test_cuda.py, then `experiments.bench` on
# gpu-7b and gpu-small with the CUDA defaults of this check (stacked weights, fused elementwise ops, the grid
# cache where its attention fills the GPU), each saving turned off in turn (--variants), the previous default
# (`ours_full_cache_unstacked`), and an eager step's GPU time by kernel (--profile-step).
#
#   OUT=/some/folder bash scripts/gpu_check4.sh      # results and logs go to $OUT (default runs/gpu_check4)
#   STAGES="tests gpu-7b" OUT=... bash scripts/gpu_check4.sh   # only these stages (default: all three)
#
# Left out to fit: the GRPO update (docs/bench/check1, untouched since), the no-graphs runs, HF's static cache on
# gpu-7b (a ~153 s compile: its baseline is HF static as recorded by the first check on an H200, 2,921.3
# tokens/s, the faster HF mode in every check so far), HF's dynamic cache on both presets (1,928 and 2,601
# tokens/s for gpu-7b in checks 3 and 2; about half HF static's speed on gpu-small).
OUT_DEFAULT=runs/gpu_check4
BUDGET_DEFAULT=430
source "$(dirname "$0")/gpu_common.sh"
STAGES="${STAGES:-tests gpu-7b gpu-small}"
wanted() { [[ " $STAGES " == *" $1 "* ]]; }

# 1. the CUDA paths: graph vs eager vs HF generate, grid cache vs full slot cache, fused ops, compaction, fallback
wanted tests && stage tests 100 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py

# 2. gpu-7b first (its target is the open one): Qwen2.5-7B shape, 64 rows; HF static as recorded
wanted gpu-7b && stage gpu-7b 165 "$PY" -m experiments.bench --preset gpu-7b --reps 2 --skip-train --no-graphs off --variants on \
    --profile-step on --hf-dynamic off --hf-static off --recorded-hf-static 2921.3 --out "$OUT/gpu-7b.json"

# 3. gpu-small: SmolLM2-135M shape, 256 rows; HF static (measured now) is its baseline
wanted gpu-small && stage gpu-small 150 "$PY" -m experiments.bench --preset gpu-small --reps 2 --skip-train --no-graphs off \
    --variants on --profile-step on --hf-dynamic off --hf-static on --hf-timeout 70 --out "$OUT/gpu-small.json"

"$PY" scripts/gpu_summary.py "$OUT" --previous docs/bench/check3 2>&1 | tee "$OUT/summary.txt"
echo "total: $(( $(date +%s) - START ))s of ${BUDGET}s"
