#!/usr/bin/env bash
# The GPU check of the scaling work (docs/scaling.md): a random model of Qwen2.5-7B's shape trained for a
# few GRPO steps by our own loop, measured (peak memory, step time, sampling tokens/s) next to the memory
# planner's figures. On one GPU: LoRA rank 16 at the paper's settings, then the full fine-tune of the
# SmolLM2-135M shape; on N >= 2 GPUs also the FSDP2 full fine-tune of the 7B under torchrun.
#   OUT=/tmp/out GPU_CHECK_BUDGET_S=540 bash scripts/gpu_check_scale.sh     (JSON and logs in $OUT)
OUT_DEFAULT=/tmp/gpu_check_scale
BUDGET_DEFAULT=540
source "$(dirname "$0")/gpu_common.sh"
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
echo "GPUs: $NGPU" | tee -a "$OUT/env.txt"

stage lora7b 300 "$PY" scripts/scale_check.py --shape qwen7b --lora-rank 16 --steps 2 --out /tmp/scale/lora7b
stage full135m 120 "$PY" scripts/scale_check.py --shape smollm2 --steps 2 --out /tmp/scale/full135m
if (( NGPU >= 2 )); then
    stage fsdp7b 300 torchrun --nproc_per_node "$NGPU" scripts/scale_check.py --shape qwen7b --steps 2 \
        --out /tmp/scale/fsdp7b
fi
echo "=== done in $(( $(date +%s) - START ))s"
