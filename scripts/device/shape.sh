#!/usr/bin/env bash
# A published model shape with random weights (--load-format dummy), served by real SGLang 0.5.16 on one H200, one
# server at a time, in the order --stages lists them:
#   ar    plain decoding                                          -> AR ms/token (t_AR)
#   b8    ours, chain, B = 8 (a shorter verify)                   -> draft / verify / rest GPU ms per step, ms/step
#   b16   ours, chain, --speculative-num-draft-tokens 16          -> the same
#   b32   ours, chain, B = 32                                     -> the same, cost only
#   b64   ours, chain, B = 64                                     -> the same, cost only
#   b16fp8 ours, chain, B = 16, drafter projections in FP8         -> the same (--speculative-draft-model-quantization)
#   b8fp8 the same at B = 8
#   b16sk, b16fp8sk  b16 and b16fp8 with the verify's attention on our split-KV kernel
#         (--speculative-dflash-verify-splitkv; its gain grows with the context: --prompt-tokens)
#   tN    ours, tree mode: --speculative-dflash-tree-budget N --speculative-dflash-topk 4 over the B = 16 drafter
#         (N = 16, 31, 32, 63, 64; verify width N + 1)            -> the same
#   tNfp8 the tree with the FP8 drafter (N = 31, 63)              -> the same
#   tNsk, tNfp8sk  t31 / t63 (and with the FP8 drafter) on our split-KV verify kernel, the tree's mask in it
#   b16fp8fhsk, t31fp8fhsk  b16fp8sk / t31fp8sk with the draft head in FP8 too (--speculative-dflash-draft-head-fp8)
# --shape gemma-4-31b (default): the Gemma-4-31B-it layout and the z-lab gemma-4-31B-it-DFlash drafter shape;
# --shape qwen3-32b: Qwen3-32B and a z-lab-style 5-layer drafter (dflash_sglang/shapes.py). The drafter has random
# weights, so acceptance is ~1 and only cost is measured; B = 8 / 32 / 64 reuse it with block_size changed. Each
# stage: SGLang's memory lines (weights, KV pools, CUDA graphs, memory left), nvidia-smi while serving, then greedy
# concurrency-1 streaming requests (ignore_eos, so every request has exactly --max-tokens tokens). Our worker logs
# per-step GPU times (DFLASH_SGLANG_STEP_TIMING=1; in tree mode `draft` includes the tree build). The summary sets
# each DFLASH stage's step against one AR decode step (GPU step / t_AR and end-to-end step / t_AR), with the bars of
# issue 8 for qwen3-32b (chain <= 1.10x, tree N <= 64 <= 1.20x) and, for gemma-4-31b, the bound
# tau*t_AR/(t_verify+t_draft) at the published tau. A stage starts only if --min-stage seconds of --budget are left;
# the rest are reported as skipped. summary.json, run.json, per-stage JSON and server logs land in
# $OUT/shape-<shape> ($OUT defaults to out/), summary.json rewritten after every stage.
#
#   usage: source .device/unpack.sh && bash scripts/device/shape.sh [--shape gemma-4-31b|qwen3-32b]
#            [--draft-backend fa4|triton] [--stages "ar b16 ..."] [--budget S] [--min-stage S]
#            [--prompts N] [--prompt-tokens N] [--max-tokens N] [--mem-fraction F] [--port P] [--profile]
#   env:   EXTRA_SERVER_ARGS="..." appended to every launch; CUDA_VISIBLE_DEVICES picks the GPU (its first entry is
#          the one nvidia-smi is asked about; GPU 0 when unset)
# --stages defaults to "ar b16 b32 b64" for gemma-4-31b and "ar b16 t32 t64" for qwen3-32b: a server start is
# ~80-120 s at this size, so four stages are about what the default --budget 530 of one 600 s device command holds;
# a stage that does not fit is skipped, to run in a next command (shape_report.py merges the summaries).
# --port P is the only port set: SGLang picks a free NCCL port itself, so P alone keeps this beside other servers.
# --draft-backend defaults to fa4 when the FA4 site is unpacked (import cutlass, flash_attn.cute), else triton.
# --profile: after a stage's requests, scripts/device/profile_step.py records 12 steps at concurrency 1 with SGLang's
# torch profiler (~30 s a stage; skipped when less than a minute of the budget is left): GPU time per kernel of one
# decode step (ours: the worker's step; AR: a scheduler step that replayed the decode graph), for setting a verify
# against an AR step kernel by kernel. The summary lands in <stage>.profile.json, the trace is deleted.
# --prompt-tokens N: each request's prompt is N token ids (distinct per request) instead of a short text, so the
# steps attend over ~N tokens of context, as a long answer's later steps do; the servers' context length grows to
# fit. Turn summary.json into docs/results/<shape>-shape-DATE.md with scripts/shape_report.py.
set -euo pipefail

SHAPE=gemma-4-31b
DRAFT_BACKEND=""
STAGES=""           # per shape, below
BUDGET=530          # seconds for this script; unpack.sh, shutdowns and the device's 600 s limit leave no more
MIN_STAGE=100       # a server start at this size is ~80-120 s
PROMPTS=4
PROMPT_TOKENS=0     # 0: the short text prompts
MAX_TOKENS=128
MEM_FRACTION=0.80   # of ~140 GiB: ~60-66 GB target + 3-5 GB drafter + KV; the rest for activations and graphs
PORT=30000
PROFILE=0
STAGE_NAMES=$(python3 "$(dirname "$0")/shape_stages.py" names) || exit 2  # the one table, shape_stages.py
while [ $# -gt 0 ]; do
  case "$1" in
    --shape) SHAPE="$2"; shift 2 ;;
    --draft-backend) DRAFT_BACKEND="$2"; shift 2 ;;
    --stages) STAGES="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --min-stage) MIN_STAGE="$2"; shift 2 ;;
    --prompts) PROMPTS="$2"; shift 2 ;;
    --prompt-tokens) PROMPT_TOKENS="$2"; shift 2 ;;
    --max-tokens) MAX_TOKENS="$2"; shift 2 ;;
    --mem-fraction) MEM_FRACTION="$2"; shift 2 ;;
    --port) PORT="$2"; shift 2 ;;
    --profile) PROFILE=1; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
case "$SHAPE" in
  gemma-4-31b) [ -n "$STAGES" ] || STAGES="ar b16 b32 b64" ;;
  qwen3-32b) [ -n "$STAGES" ] || STAGES="ar b16 t32 t64" ;;
  *) echo "--shape must be gemma-4-31b or qwen3-32b, got $SHAPE" >&2; exit 2 ;;
esac
if [ -z "$DRAFT_BACKEND" ]; then
  if python3 -c "import cutlass, flash_attn.cute" 2>/dev/null; then DRAFT_BACKEND=fa4; else DRAFT_BACKEND=triton; fi
fi
case "$DRAFT_BACKEND" in
  fa4|triton) ;;
  *) echo "--draft-backend must be fa4 or triton, got $DRAFT_BACKEND" >&2; exit 2 ;;
esac
read -ra STAGE_LIST <<< "$STAGES"
[ "${#STAGE_LIST[@]}" -gt 0 ] || { echo "--stages is empty" >&2; exit 2; }
declare -A SEEN=()
for stage in "${STAGE_LIST[@]}"; do
  case " $STAGE_NAMES " in
    *" $stage "*) ;;
    *) echo "--stages takes $STAGE_NAMES, got $stage" >&2; exit 2 ;;
  esac
  [ -z "${SEEN[$stage]:-}" ] || { echo "--stages lists $stage twice" >&2; exit 2; }
  SEEN[$stage]=1
done
[ "$MIN_STAGE" -ge 60 ] || { echo "--min-stage must be at least 60 seconds, got $MIN_STAGE" >&2; exit 2; }
case "$PORT" in ''|*[!0-9]*) echo "--port must be a number, got $PORT" >&2; exit 2 ;; esac
case "$PROMPT_TOKENS" in ''|*[!0-9]*) echo "--prompt-tokens must be a number, got $PROMPT_TOKENS" >&2; exit 2 ;; esac
# Room for the prompt, the answer and a block or tree past it (a verify writes up to 65 tokens ahead).
CONTEXT_LENGTH=$(( PROMPT_TOKENS + MAX_TOKENS + 128 > 8192 ? PROMPT_TOKENS + MAX_TOKENS + 128 : 8192 ))
PROMPT_DESC="$PROMPTS prompts"
[ "$PROMPT_TOKENS" = 0 ] || PROMPT_DESC="$PROMPTS prompts of $PROMPT_TOKENS tokens"
# The GPU this script's servers get: the first entry of CUDA_VISIBLE_DEVICES (index or UUID), else 0. nvidia-smi
# does not read CUDA_VISIBLE_DEVICES, so it is asked about this one by -i.
GPU="${CUDA_VISIBLE_DEVICES:-}"
GPU="${GPU%%,*}"
GPU="${GPU// /}"
GPU="${GPU:-0}"

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${OUT:-$REPO/out}/shape-$SHAPE"
WORK="$(mktemp -d /tmp/dflash-shape.XXXXXX)"
# Our package and its SGLang entry point without pip: the repo, plus a dist-info folder generated in step 1.
export PYTHONPATH="$REPO:$WORK/dist${PYTHONPATH:+:$PYTHONPATH}"
HELPER=(python3 "$REPO/scripts/device/shape.py")
mkdir -p "$OUT"
rm -f "$OUT"/*.json "$OUT"/*.log "$OUT"/*.profile.txt
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

wait_gpu_released() {  # the next ~65 GB server must not start while the last one's memory is still held
  [ $(( BUDGET - SECONDS )) -ge "$MIN_STAGE" ] || return 0  # no stage can follow
  for _ in $(seq 20); do
    used=$(nvidia-smi -i "$GPU" --query-gpu=memory.used --format=csv,noheader,nounits 2>/dev/null | head -n 1) \
      || used=""
    used="${used// /}"
    case "$used" in ''|*[!0-9]*) return 0 ;; esac  # no answer from nvidia-smi about this GPU: nothing to wait on
    [ "$used" -lt 4096 ] && return 0
    sleep 1
  done
  echo "== GPU $GPU memory still in use after the last server stopped: ${used} MiB"
}

finish() {
  stop_server
  rm -rf "$WORK"
  echo
  echo "$SHAPE shape, bf16, dummy weights; target attention triton, draft attention $DRAFT_BACKEND;" \
       "$PROMPT_DESC x $MAX_TOKENS tokens at concurrency 1; GPU $GPU, port $PORT; ${SECONDS}s"
  # Exit status: 1 if a stage failed (skipped for lack of time is not a failure).
  "${HELPER[@]}" summarize --dir "$OUT" --print || exit 1
}
trap finish EXIT

# 1. The dist-info folder that makes SGLang's plugin discovery find our entry point.
python3 "$REPO/scripts/device/plugin_dist.py" "$WORK/dist"

# 2. The shape pair: target config + tokenizer (+ processor), drafter configs for B = 16, 32, 64 (pairs validated).
"${HELPER[@]}" prepare --shape "$SHAPE" --out "$WORK/shape" --blocks 8 16 32 64 > "$OUT/prepare.log" 2>&1 \
  || { cat "$OUT/prepare.log"; exit 1; }
mkdir -p "$OUT/configs"
cp "$WORK/shape/target/config.json" "$OUT/configs/target.json"
cp "$WORK/shape/drafter-b16/config.json" "$OUT/configs/drafter-b16.json"

COMMON=(--model-path "$WORK/shape/target" --load-format dummy --dtype bfloat16 --attention-backend triton
        --sampling-backend pytorch --mem-fraction-static "$MEM_FRACTION" --context-length "$CONTEXT_LENGTH"
        --cuda-graph-max-bs 4 --disable-prefill-cuda-graph --host 127.0.0.1 --port "$PORT" --log-level info)
if [ "$SHAPE" = gemma-4-31b ]; then
  # SGLang builds Gemma 4's vision tower; its default attention, FA3, is not in the box's sgl_kernel.
  COMMON+=(--mm-attention-backend triton_attn)
fi
# shellcheck disable=SC2206  # word splitting of the extra flags is the point
EXTRA=(${EXTRA_SERVER_ARGS:-})
"${HELPER[@]}" run-info --dir "$OUT" --shape "$SHAPE" --stages "${STAGE_LIST[@]}" --draft-backend "$DRAFT_BACKEND" \
  --mem-fraction "$MEM_FRACTION" --prompts "$PROMPTS" --prompt-tokens "$PROMPT_TOKENS" --max-tokens "$MAX_TOKENS" \
  --budget "$BUDGET" --port "$PORT" --flags "${COMMON[@]}" "${EXTRA[@]}"

chain_flags() {  # block
  echo --speculative-algorithm DFLASH --speculative-draft-model-path "$WORK/shape/drafter-b$1" \
       --speculative-draft-load-format dummy --speculative-num-draft-tokens "$1" \
       --speculative-draft-attention-backend "$DRAFT_BACKEND"
}

tree_flags() {  # budget: N draft nodes over the B = 16 drafter (top-k: shape_stages.py's flags); the plugin sets
  # --speculative-num-draft-tokens N+1
  echo --speculative-algorithm DFLASH --speculative-draft-model-path "$WORK/shape/drafter-b16" \
       --speculative-draft-load-format dummy --speculative-dflash-tree-budget "$1" \
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
  echo "== $name: starting SGLang on :$PORT (${left}s left; log $log)"
  # SGLang's profiler records Python stacks and shapes by default (0.5.16): off, they would slow what it measures.
  env DFLASH_SGLANG_STEP_TIMING=1 DFLASH_SGLANG_STEP_TIMING_EVERY=32 SGLANG_PROFILE_WITH_STACK=false \
    SGLANG_PROFILE_RECORD_SHAPES=false \
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
  echo "== $name: serving after ${startup}s; $PROMPT_DESC, $MAX_TOKENS greedy tokens each at concurrency 1"
  local request_s=$(( BUDGET - SECONDS - 15 ))
  [ "$request_s" -ge 10 ] || request_s=10
  rc=0
  timeout "$request_s" "${HELPER[@]}" bench --port "$PORT" --out "$OUT/$name.json" \
    --prompts "$PROMPTS" --prompt-tokens "$PROMPT_TOKENS" --max-tokens "$MAX_TOKENS" || rc=$?
  if [ "$rc" -eq 0 ]; then
    "${HELPER[@]}" stage --dir "$OUT" --stage "$name" --status ok --startup-s "$startup" --flags "$@"
    if [ "$PROFILE" = 1 ] && [ $(( BUDGET - SECONDS )) -ge 60 ]; then
      timeout 90 python3 "$REPO/scripts/device/profile_step.py" --port "$PORT" --out "$WORK/profile-$name" \
        --steps 12 --max-tokens 48 > "$OUT/$name.profile.txt" 2>&1 \
        || echo "== $name: the profile failed (see $name.profile.txt)"
      cp "$WORK/profile-$name/profile-summary.json" "$OUT/$name.profile.json" 2>/dev/null || true
      rm -rf "$WORK/profile-$name"
    fi
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

stage_flags() {  # a DFLASH stage's server flags: chain B or tree budget, then what its suffixes switch on
  local mode n own
  { read -r mode n; read -r own; } < <(python3 "$REPO/scripts/device/shape_stages.py" flags "$1")
  case "$mode" in
    chain) chain_flags "$n" ;;
    tree) tree_flags "$n" ;;
  esac
  echo "$own"
}

for stage in "${STAGE_LIST[@]}"; do
  case "$stage" in
    ar) run_stage ar ;;
    # shellcheck disable=SC2046  # the flag printers print flags without spaces inside them
    *) run_stage "$stage" $(stage_flags "$stage") ;;
  esac
done
