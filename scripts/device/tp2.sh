#!/usr/bin/env bash
# Tensor parallelism on a two-GPU box (device kind nvidia-h200-x2), in one device command: the embedded trained
# demo pair (acceptance well above 1), float32, served by SGLang 0.5.16 as two end-to-end groups at once:
#   tp2   --tp-size 2: AR, builtin DFLASH and ours (scripts/device/e2e.sh; ours must match AR at TP=2)
#   tp1   one GPU: AR and ours (the TP=1 reference for ours)
# then ours at TP=2 is compared with ours at TP=1, output for output (greedy /v1/completions texts at c1 and c16
# and /generate ids). NVLink multicast stays off (the box's rule: it can take the host's shared GPUs down).
# Prints both groups' tables and the TP=2-vs-TP=1 table last; exits 0 only if ours matched AR at TP=2 and
# ours at TP=1 everywhere. Logs and JSON land in $OUT/e2e-demo-tp2, $OUT/e2e-demo-tp1 and $OUT/tp2-vs-tp1.
#
#   usage: source .device/unpack.sh && bash scripts/device/tp2.sh [--budget S] [--prompts N]
set -uo pipefail
BUDGET=500
NUM_PROMPTS=64
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET="$2"; shift 2 ;;
    --prompts) NUM_PROMPTS="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# The two groups' servers share the GPUs (capped KV pools), so free memory differs between the two ranks at
# startup; SGLang refuses that by default ("memory capacity is unbalanced"), a guard for dedicated GPUs.
export SGLANG_ENABLE_TP_MEMORY_INBALANCE_CHECK=false
GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$GPUS" -lt 2 ]; then
  echo "error: tensor parallelism needs two GPUs, this machine has $GPUS (ask the device tool for nvidia-h200-x2)" >&2
  exit 2
fi
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"  # e2e_client.py imports dflash_sglang
OUT="${OUT:-$REPO/out}"
mkdir -p "$OUT"
E2E=(bash "$REPO/scripts/device/e2e.sh" --pair "$REPO/dflash_sglang/data/pairs/demo" --prompts "$NUM_PROMPTS"
     --budget "$BUDGET")

EXTRA_SERVER_ARGS="--tp-size 2" CUDA_VISIBLE_DEVICES=0,1 "${E2E[@]}" --name demo-tp2 --port-base 30070 \
  > "$OUT/group-tp2.log" 2>&1 &
TP2_PID=$!
CUDA_VISIBLE_DEVICES=0 "${E2E[@]}" --name demo-tp1 --skip-builtin --port-base 30080 > "$OUT/group-tp1.log" 2>&1 &
TP1_PID=$!
STATUS=0
wait "$TP2_PID" || STATUS=1
wait "$TP1_PID" || STATUS=1

TP2_DIR="$OUT/e2e-demo-tp2-float32-triton"
TP1_DIR="$OUT/e2e-demo-tp1-float32-triton"
CMP="$OUT/tp2-vs-tp1"
mkdir -p "$CMP/ours" "$CMP/ar"
for tp in 1 2; do
  dir=$TP1_DIR; [ "$tp" = 2 ] && dir=$TP2_DIR
  for who in ar ours; do
    [ -f "$dir/$who.json" ] && cp "$dir/$who.json" "$CMP/$who/$who-tp$tp.json"
  done
done
{
  for tp in 2 1; do
    echo "================ TP=$tp"
    grep -E "^== .*failed|dflash_sglang plugin" "$OUT/group-tp$tp.log" || true
    sed -n '/^pair=/,$p' "$OUT/group-tp$tp.log"
  done
  echo "================ ours at TP=2 against ours at TP=1 (and AR at TP=2 against AR at TP=1)"
  python3 "$REPO/scripts/device/e2e_client.py" report --dir "$CMP/ours" --reference ours-tp1 ours-tp2 \
    --must-pass ours-tp2 || STATUS=1
  python3 "$REPO/scripts/device/e2e_client.py" report --dir "$CMP/ar" --reference ar-tp1 ar-tp2 \
    | sed -n '/^contender/,/^$/p'
} > "$OUT/tp2-summary.txt"  # a redirect, not a pipe: STATUS set inside must survive
cat "$OUT/tp2-summary.txt"
exit "$STATUS"
