#!/usr/bin/env bash
# One prepared GPU check: the CUDA tests, then `experiments.bench` on the gpu-small and gpu-7b presets.
#
#   OUT=/some/folder bash scripts/gpu_check.sh        # results and logs go to $OUT (default runs/gpu_check)
#
# Sized for ~8 minutes of wall time in all (GPU_CHECK_BUDGET_S, default 470 s): every stage runs under its own
# `timeout`, capped by what is left of the budget, and a stage that fails or times out does not stop the
# next. Each bench writes its JSON after every stage, so even a stage killed mid-way leaves its figures.
# Needs python3 with a CUDA build of torch and transformers (run from the repository root; nothing to install).
#
# What is cut to fit the budget (the README says so next to the figures):
# - gpu-7b runs with --reps 2 and, unless at least GPU_CHECK_7B_STATIC_S (330 s) are left when it starts,
#   --hf-static off: HF's static cache compiles the 7B forward for ~153 s on an H200 and was the slower HF mode
#   there (1,535 vs 2,833 tokens/s), so the baseline is HF's dynamic cache either way.
# - gpu-small's HF static mode gets --hf-timeout 100 (its compile took ~44 s on an H200).
OUT_DEFAULT=runs/gpu_check
BUDGET_DEFAULT=470
source "$(dirname "$0")/gpu_common.sh"
STATIC_7B_NEEDS="${GPU_CHECK_7B_STATIC_S:-330}"

# 1. the CUDA paths (graph vs eager vs HF generate, compaction, fallback) and the CPU sampler/policy tests
stage tests 150 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_sampler.py tests/test_policy.py

# 2. gpu-small: SmolLM2-135M shape, 256 rows; both HF modes
stage gpu-small 170 "$PY" -m experiments.bench --preset gpu-small --hf-timeout 100 --out "$OUT/gpu-small.json"

# 3. gpu-7b: Qwen2.5-7B shape, 64 rows; HF static only if the budget allows its ~153 s compile
if (( $(left) >= STATIC_7B_NEEDS )); then
    STATIC_7B=(--hf-static on --hf-timeout $(( $(left) - 120 )))
else
    STATIC_7B=(--hf-static off)
fi
stage gpu-7b 300 "$PY" -m experiments.bench --preset gpu-7b --reps 2 "${STATIC_7B[@]}" --out "$OUT/gpu-7b.json"

# the headline figures, as one block at the end of the output
"$PY" scripts/gpu_summary.py "$OUT" 2>&1 | tee "$OUT/summary.txt"
echo "total: $(( $(date +%s) - START ))s of ${BUDGET}s"
