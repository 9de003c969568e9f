#!/usr/bin/env bash
# Gemma-4-31B at its published shape with random weights (--load-format dummy), served by real SGLang 0.5.16 on one
# H200, one server at a time, in priority order:
#   ar    plain decoding                                      -> AR ms/token
#   b16   ours, --speculative-num-draft-tokens 16 (published) -> draft / verify / rest GPU ms per step, ms/step
#   b32   ours, B = 32                                        -> the same, cost only (no published acceptance)
#   b64   ours, B = 64                                        -> the same, cost only
# The drafter is the z-lab gemma-4-31B-it-DFlash shape (5 layers, random weights, so acceptance ~1; only its cost is
# measured); B = 32 / 64 reuse it with block_size changed. Each stage: SGLang's memory lines (weights, KV pools,
# CUDA graphs, memory left), nvidia-smi while serving, then greedy concurrency-1 streaming requests (ignore_eos, so
# every request has exactly --max-tokens tokens). Our worker logs per-step GPU times (DFLASH_SGLANG_STEP_TIMING=1).
# A stage starts only if --min-stage seconds of --budget are left; the rest are reported as skipped. The table and
# the bound tau*t_AR/(t_verify+t_draft) at the published tau print last; summary.json, run.json, per-stage JSON
# and server logs land in $OUT/gemma4-shape ($OUT defaults to out/), summary.json rewritten after every stage.
#
#   usage: source .device/unpack.sh && bash scripts/device/gemma4_shape.sh
#            [--draft-backend fa4|triton] [--stages "ar b16 b32 b64"] [--budget S] [--min-stage S]
#            [--prompts N] [--max-tokens N] [--mem-fraction F] [--port P]
#   env:   EXTRA_SERVER_ARGS="..." appended to every launch
# --draft-backend defaults to fa4 when the FA4 site is unpacked (import cutlass, flash_attn.cute), else triton.
# Turn summary.json into docs/results/gemma4-31b-shape-DATE.md with scripts/shape_report.py.
set -euo pipefail

DRAFT_BACKEND=""
STAGES="ar b16 b32 b64"
BUDGET=530          # seconds for this script; unpack.sh, shutdowns and the device's 600 s limit leave no more
MIN_STAGE=100       # a server start at this size is ~80-120 s
PROMPTS=4
MAX_TOKENS=128
MEM_FRACTION=0.80   # of ~140 GiB: 58 GiB target + ~3 GiB drafter + KV; the rest for activations and graphs
PORT=30000
while [ $# -gt 0 ]; do
  case "$1" in
    --draft-backend) DRAFT_BACKEND="$2"; shift 2 ;;
    --stages) STAGES="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --min-stage) MIN_STAGE="$2"; shift 2 ;;
    --prompts) PROMPTS="$2"; shift 2 ;;
    --max-tokens) MAX_TOKENS="$2"; shift 2 ;;
    --mem-fraction) MEM_FRACTION="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [ -z "$DRAFT_BACKEND" ]; then
  if python3 -c "import cutlass, flash_attn.cute" 2>/dev/null; then DRAFT_BACKEND=fa4; else DRAFT_BACKEND=triton; fi
fi
case "$DRAFT_BACKEND" in
  fa4|triton) ;;
  *) echo "--draft-backend must be fa4 or triton, got $DRAFT_BACKEND" >&2; exit 2 ;;
esac
for stage in $STAGES; do
  case "$stage" in ar|b16|b32|b64) ;; *) echo "--stages takes ar b16 b32 b64, got $stage" >&2; exit 2 ;; esac
done
[ "$MIN_STAGE" -ge 60 ] || { echo "--min-stage must be at least 60 seconds, got $MIN_STAGE" >&2; exit 2; }

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${OUT:-$REPO/out}/gemma4-shape"
WORK="$(mktemp -d /tmp/dflash-gemma4.XXXXXX)"
# Our package and its SGLang entry point without pip: the repo, plus a dist-info folder generated in step 1.
export PYTHONPATH="$REPO:$WORK/dist${PYTHONPATH:+:$PYTHONPATH}"
HELPER=(python3 "$REPO/scripts/device/gemma4_shape.py")
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.log
SERVER_PID=""

stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    # The server runs in its own session: its scheduler and detokenizer children go with it.
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 15); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}

wait_gpu_released() {  # the next 62 GB server must not start while the last one's memory is still held
  [ $(( BUDGET - SECONDS )) -ge "$MIN_STAGE" ] || return 0  # no stage can follow
  for _ in $(seq 20); do
    used=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1 || echo 0)
    [ "${used:-0}" -lt 4096 ] && return 0
    sleep 1
  done
  echo "== GPU memory still in use after the last server stopped: ${used} MiB"
}

finish() {
  stop_server
  rm -rf "$WORK"
  echo
  echo "gemma-4-31b shape, bf16, dummy weights; target attention triton, draft attention $DRAFT_BACKEND;" \
       "$PROMPTS prompts x $MAX_TOKENS tokens at concurrency 1; ${SECONDS}s"
  # Exit status: 1 if a stage failed (skipped for lack of time is not a failure).
  "${HELPER[@]}" summarize --dir "$OUT" --print || exit 1
}
trap finish EXIT

# 1. The dist-info folder that makes SGLang's plugin discovery find our entry point.
python3 "$REPO/scripts/device/plugin_dist.py" "$WORK/dist"

# 2. The shape pair: target config + tokenizer + processor, drafter configs for B = 16, 32, 64 (pairs validated).
"${HELPER[@]}" prepare --out "$WORK/shape" --blocks 16 32 64 > "$OUT/prepare.log" 2>&1 \
  || { cat "$OUT/prepare.log"; exit 1; }
mkdir -p "$OUT/configs"
cp "$WORK/shape/target/config.json" "$OUT/configs/target.json"
cp "$WORK/shape/drafter-b16/config.json" "$OUT/configs/drafter-b16.json"

COMMON=(--model-path "$WORK/shape/target" --load-format dummy --dtype bfloat16 --attention-backend triton
        --sampling-backend pytorch --mem-fraction-static "$MEM_FRACTION" --context-length 8192
        --cuda-graph-max-bs 4 --disable-prefill-cuda-graph --host 127.0.0.1 --port "$PORT" --log-level info
        --mm-attention-backend triton_attn)  # the vision tower's default, FA3, is not in the box's sgl_kernel
# shellcheck disable=SC2206  # word splitting of the extra flags is the point
EXTRA=(${EXTRA_SERVER_ARGS:-})
"${HELPER[@]}" run-info --dir "$OUT" --draft-backend "$DRAFT_BACKEND" --mem-fraction "$MEM_FRACTION" \
  --prompts "$PROMPTS" --max-tokens "$MAX_TOKENS" --budget "$BUDGET" --flags "${COMMON[@]}" "${EXTRA[@]}"

spec_flags() {
  echo --speculative-algorithm DFLASH --speculative-draft-model-path "$WORK/shape/drafter-b$1" \
       --speculative-draft-load-format dummy --speculative-num-draft-tokens "$1" \
       --speculative-draft-attention-backend "$DRAFT_BACKEND"
}

# 3. One stage: start the server, wait, measure, stop. Never runs past the budget.
run_stage() {
  local name="$1"; shift
  local left=$(( BUDGET - SECONDS )) log="$OUT/$name.log" start=$SECONDS
  if [ "$left" -lt "$MIN_STAGE" ]; then
    echo "== $name: skipped, ${left}s of the budget left (a stage needs ${MIN_STAGE}s)"
    "${HELPER[@]}" stage --dir "$OUT" --stage "$name" --status skipped --reason "time: ${left}s left" --flags "$@"
    return 0
  fi
  echo "== $name: starting SGLang (${left}s left; log $log)"
  env DFLASH_SGLANG_STEP_TIMING=1 DFLASH_SGLANG_STEP_TIMING_EVERY=32 \
    setsid python3 -m sglang.launch_server "${COMMON[@]}" "$@" "${EXTRA[@]}" > "$log" 2>&1 &
  SERVER_PID=$!
  local rc=0
  python3 "$REPO/scripts/device/e2e_client.py" wait --port "$PORT" --pid "$SERVER_PID" --timeout $(( left - 30 )) \
    || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "== $name: server did not come up; last lines of its log:"; tail -n 40 "$log"
    stop_server
    if [ "$rc" -eq 3 ]; then  # still starting when its share of the budget ran out
      "${HELPER[@]}" stage --dir "$OUT" --stage "$name" --status skipped --reason "budget ran out during startup" \
        --flags "$@"
    else
      "${HELPER[@]}" stage --dir "$OUT" --stage "$name" --status failed --reason "server exited" --flags "$@"
    fi
    wait_gpu_released
    return 0
  fi
  local startup=$(( SECONDS - start ))
  echo "== $name: serving after ${startup}s; $PROMPTS greedy requests of $MAX_TOKENS tokens at concurrency 1"
  local request_s=$(( BUDGET - SECONDS - 15 ))
  [ "$request_s" -ge 10 ] || request_s=10
  rc=0
  timeout "$request_s" "${HELPER[@]}" bench --port "$PORT" --out "$OUT/$name.json" \
    --prompts "$PROMPTS" --max-tokens "$MAX_TOKENS" || rc=$?
  if [ "$rc" -eq 0 ]; then
    "${HELPER[@]}" stage --dir "$OUT" --stage "$name" --status ok --startup-s "$startup" --flags "$@"
  elif [ "$rc" -eq 124 ]; then
    echo "== $name: the budget ran out during the requests"
    "${HELPER[@]}" stage --dir "$OUT" --stage "$name" --status skipped --reason "budget ran out during requests" \
      --startup-s "$startup" --flags "$@"
  else
    echo "== $name: requests failed; last lines of its log:"; tail -n 40 "$log"
    "${HELPER[@]}" stage --dir "$OUT" --stage "$name" --status failed --reason "requests failed" \
      --startup-s "$startup" --flags "$@"
  fi
  stop_server
  wait_gpu_released
  "${HELPER[@]}" summarize --dir "$OUT"   # what is measured so far survives a kill at the device's limit
}

for stage in ar b16 b32 b64; do
  case " $STAGES " in *" $stage "*) ;; *) continue ;; esac
  if [ "$stage" = ar ]; then
    run_stage ar
  else
    # shellcheck disable=SC2046  # spec_flags prints flags without spaces inside them
    run_stage "$stage" $(spec_flags "${stage#b}")
  fi
done
