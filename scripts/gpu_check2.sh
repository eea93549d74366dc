#!/usr/bin/env bash
# The second GPU check, short (~3 min, under 240 s of wall time): tests/test_cuda.py, then `experiments.bench` on
# gpu-small and gpu-7b with 2 timed repetitions and no GRPO update (measured in the first check and untouched
# since: docs/bench/*.json).
#
#   OUT=/some/folder bash scripts/gpu_check2.sh      # results and logs go to $OUT (default runs/gpu_check2)
#
# What it runs, and what it leaves out to fit (the first check's figures, H200, are in docs/bench/):
# - gpu-small: our sampler (graphs, then no graphs), the log-prob check with its HF calibration, the decode-step
#   probe, and HF generate with the static cache (the faster HF mode there: 20,815 vs 11,361 tokens/s; its
#   first call, which compiles, took 34 s), under --hf-timeout 70. HF's dynamic cache is not run.
# - gpu-7b: the same, with HF's dynamic cache and without HF's static one (--hf-static off); the ratio is taken
#   against the faster of HF dynamic measured now and HF static as recorded by the first check on an H200
#   (2,921.3 tokens/s, --recorded-hf-static): a fair baseline only on an H200, which the summary checks.
# Every stage runs under `timeout`, capped by what is left of GPU_CHECK_BUDGET_S (default 235 s); a stage that
# fails or times out does not stop the next, and each bench rewrites its JSON after every stage.
OUT_DEFAULT=runs/gpu_check2
BUDGET_DEFAULT=235
source "$(dirname "$0")/gpu_common.sh"

# 1. the CUDA paths: graph vs eager vs HF generate, compaction, fallback, Gumbel-max draws, the bench on CUDA
stage tests 45 "$PY" -m pytest -q -p no:cacheprovider tests/test_cuda.py

# 2. gpu-small: SmolLM2-135M shape, 256 rows; HF static is its baseline
stage gpu-small 100 "$PY" -m experiments.bench --preset gpu-small --reps 2 --skip-train --hf-dynamic off \
    --hf-static on --hf-timeout 70 --out "$OUT/gpu-small.json"

# 3. gpu-7b: Qwen2.5-7B shape, 64 rows; HF dynamic now, HF static as recorded
stage gpu-7b 100 "$PY" -m experiments.bench --preset gpu-7b --reps 2 --skip-train --hf-static off \
    --recorded-hf-static 2921.3 --hf-timeout 60 --out "$OUT/gpu-7b.json"

# the figures, as one block at the end (computed from the JSON files, so a stage cut short still reports)
"$PY" scripts/gpu_summary.py "$OUT" --previous docs/bench/check1 2>&1 | tee "$OUT/summary.txt"
echo "total: $(( $(date +%s) - START ))s of ${BUDGET}s"
