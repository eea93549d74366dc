#!/usr/bin/env bash
# The third GPU check (~5 min, under 320 s of wall time): tests/test_cuda.py, then `experiments.bench` on
# gpu-small and gpu-7b with the grid cache and stacked weights (the CUDA defaults since this check), each beside
# the previous default (full slot cache, unstacked weights: `ours_full_cache_unstacked`) in the same process.
#
#   OUT=/some/folder bash scripts/gpu_check3.sh      # results and logs go to $OUT (default runs/gpu_check3)
#
# Left out to fit: the GRPO update (measured in the first check, untouched since: docs/bench/check1), the
# no-graphs sampler runs, HF's dynamic cache on gpu-small (about half HF static's speed there in both earlier
# checks) and HF's static cache on gpu-7b (a ~153 s compile): its baseline is the faster of HF dynamic measured
# now and HF static as recorded by the first check on an H200 (2,921.3 tokens/s, --recorded-hf-static), a fair
# baseline only on an H200, which the summary checks.
OUT_DEFAULT=runs/gpu_check3
BUDGET_DEFAULT=320
source "$(dirname "$0")/gpu_common.sh"

# 1. the CUDA paths: graph vs eager vs HF generate, grid cache vs full slot cache, compaction, fallback
stage tests 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py

# 2. gpu-small: SmolLM2-135M shape, 256 rows; HF static is its baseline
stage gpu-small 120 "$PY" -m experiments.bench --preset gpu-small --reps 2 --skip-train --no-graphs off \
    --hf-dynamic off --hf-static on --hf-timeout 70 --out "$OUT/gpu-small.json"

# 3. gpu-7b: Qwen2.5-7B shape, 64 rows; HF dynamic now, HF static as recorded
stage gpu-7b 135 "$PY" -m experiments.bench --preset gpu-7b --reps 2 --skip-train --no-graphs off \
    --hf-static off --recorded-hf-static 2921.3 --hf-timeout 60 --out "$OUT/gpu-7b.json"

"$PY" scripts/gpu_summary.py "$OUT" --previous docs/bench/check2 2>&1 | tee "$OUT/summary.txt"
echo "total: $(( $(date +%s) - START ))s of ${BUDGET}s"
