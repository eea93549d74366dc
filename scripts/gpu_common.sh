# Shared by scripts/gpu_check*.sh (sourced, not run): the time budget, the `stage`
# runner and the machine description. The caller sets OUT_DEFAULT and BUDGET_DEFAULT first.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$OUT_DEFAULT}"
mkdir -p "$OUT"
BUDGET="${GPU_CHECK_BUDGET_S:-$BUDGET_DEFAULT}"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
START=$(date +%s)

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# stage NAME CAP_S COMMAND...: run under timeout min(CAP_S, time left), log to $OUT/NAME.log, never abort
stage() {
    local name="$1" cap="$2"; shift 2
    local limit; limit=$(left)
    (( cap < limit )) && limit=$cap
    if (( limit < 15 )); then
        echo "=== $name: skipped, ${limit}s left of the ${BUDGET}s budget" | tee "$OUT/$name.log"
        return 0
    fi
    echo "=== $name (limit ${limit}s, $(left)s of budget left): $*"
    local t0; t0=$(date +%s)
    timeout --signal=TERM --kill-after=5 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc after $(( $(date +%s) - t0 ))s" | tee -a "$OUT/$name.log"
    return 0
}

{
    echo "date: $(date -u +%FT%TZ)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    "$PY" -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version() if torch.cuda.is_available() else None, 'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" 2>&1
} | tee "$OUT/env.txt"
