#!/usr/bin/env bash
# End to end on the GPU box: one target/drafter pair served by real SGLang 0.5.16 three ways --
#   ar       plain decoding (the greedy reference)
#   builtin  --speculative-algorithm DFLASH with DFLASH_SGLANG_DISABLE=1 (SGLang's own DFlashWorkerV2)
#   ours     --speculative-algorithm DFLASH through the dflash_sglang plugin
# All three servers start at once on ports PORT_BASE, +1, +2 (startup is most of the cost; capped KV pools let
# them share the GPU), then are measured one at a time while the others idle: >= 50 greedy prompts at
# concurrency 1 and 16 through the OpenAI endpoint, acceptance stats through /generate, a sampling smoke test.
# --then CMD runs after the measurements while the servers are still up, e.g. the request checks or the soak
# (exported: AR_PORT, OURS_PORT, OURS_SESSION = our server's session id, OUT_DIR = this run's folder).
# Prints a table last: greedy mismatches vs AR, tok/s, mean acceptance length; exits 0 only if our server ran,
# logged its worker line and matched AR (the builtin row is the comparison point, reported but not gating) and
# --then succeeded. Logs and JSON land in $OUT/e2e-NAME ($OUT defaults to out/).
#
#   usage: source .device/unpack.sh && bash scripts/device/e2e.sh
#            [--arch qwen3|llama|gemma4 | --pair DIR] [--name NAME] [--dtype float32|bfloat16]
#            [--draft-backend triton|fa4] [--tree-budget N [--tree-topk K]] [--port-base P] [--prompts N]
#            [--budget S] [--skip-builtin] [--adaptive] [--prefill-graphs] [--then CMD]
#   env:   EXTRA_SERVER_ARGS="..." appended to every launch (e.g. --disable-overlap-schedule)
# --tree-budget serves ours in tree mode (N draft nodes, top-K per position); builtin stays a chain.
# --adaptive serves ours with --speculative-dflash-adaptive (each step speculates or decodes plainly).
# --prefill-graphs keeps SGLang's default prefill CUDA graphs (a minute or more of capture per start; every other
# run here disables them), the configuration a user's launch_server gets.
# --pair DIR takes DIR/target and DIR/drafter (e.g. the embedded demo pair) instead of a fresh tiny random pair.
# float32 is the default (the zero-mismatch bar is set in it); fa4 needs the FA4 site unpacked first (see the
# device README) and bfloat16, where mismatches must be near-ties.
set -euo pipefail

ARCH=qwen3
PAIR=""
NAME=""
DTYPE=float32
DRAFT_BACKEND=triton
NUM_PROMPTS=64
MAX_TOKENS=64
PORT_BASE=30000
BUDGET=510          # seconds for the whole run; the box gives a command at most 10 minutes
SKIP_BUILTIN=0      # --skip-builtin: AR and ours only (when device time is short)
THEN=""
TREE_BUDGET=""
TREE_TOPK=4
ADAPTIVE=0
PREFILL_GRAPHS=0
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH="$2"; shift 2 ;;
    --pair) PAIR="$2"; shift 2 ;;
    --name) NAME="$2"; shift 2 ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --draft-backend) DRAFT_BACKEND="$2"; shift 2 ;;
    --port-base) PORT_BASE="$2"; shift 2 ;;
    --prompts) NUM_PROMPTS="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --skip-builtin) SKIP_BUILTIN=1; shift ;;
    --then) THEN="$2"; shift 2 ;;
    --tree-budget) TREE_BUDGET="$2"; shift 2 ;;
    --tree-topk) TREE_TOPK="$2"; shift 2 ;;
    --adaptive) ADAPTIVE=1; shift ;;
    --prefill-graphs) PREFILL_GRAPHS=1; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
if [ "$DRAFT_BACKEND" = fa4 ] && [ "$DTYPE" != bfloat16 ]; then
  echo "--draft-backend fa4 needs --dtype bfloat16 (FlashAttention kernels take no float32)" >&2; exit 2
fi
[ -n "$NAME" ] || NAME="${PAIR:+$(basename "$PAIR")}"; NAME="${NAME:-$ARCH}-$DTYPE-$DRAFT_BACKEND${TREE_BUDGET:+-tree$TREE_BUDGET}"
[ "$ADAPTIVE" = 1 ] && NAME+=-adaptive

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
# Under the device runner $OUT is the folder that comes back; one subfolder per run.
OUT="${OUT:-$REPO/out}/e2e-$NAME"
WORK="$(mktemp -d /tmp/dflash-e2e.XXXXXX)"
CLIENT=(python3 "$REPO/scripts/device/e2e_client.py")
mkdir -p "$OUT"
rm -f "$OUT"/{ar,builtin,ours}.json "$OUT/summary.json"
# sgl_kernel's fused ops are fp16/bf16 only: float32 runs use SGLang's native ops (harness plugin, all contenders);
# and Triton rounds float32 dots as TF32 unless told otherwise, which SGLang's triton attention kernels would do
# (scripts/device/triton_fp32_probe.py): float32 means IEEE float32 here, for every contender.
if [ "$DTYPE" = float32 ]; then export DFLASH_E2E_NATIVE_OPS=1 TRITON_F32_DEFAULT=ieee; fi
# SGLang's triton decode reads one key too few on sliding-window layers: the AR reference of a Gemma target would
# not be the model's greedy output (scripts/device/triton_swa_window_plugin.py); every contender gets the fix.
export DFLASH_E2E_TRITON_SWA_FIX=1
declare -A SERVER_PID PORT
stop_servers() {
  local pid
  for pid in "${SERVER_PID[@]}"; do
    # Each server runs in its own session: its scheduler and detokenizer children go with it.
    kill -TERM -- "-$pid" 2>/dev/null || true
  done
  for pid in "${SERVER_PID[@]}"; do
    for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  SERVER_PID=()
}
trap 'stop_servers; rm -rf "$WORK"' EXIT

# 1. Our package and its SGLang entry point, without pip (plugin_dist.py), and the float32 harness plugin.
python3 "$REPO/scripts/device/plugin_dist.py" "$WORK/dist" --harness
export PYTHONPATH="$REPO:$REPO/scripts/device:$WORK/dist${PYTHONPATH:+:$PYTHONPATH}"

# 2. The pair: given, or a tiny random one (z-lab layout, the real tokenizer alongside).
if [ -n "$PAIR" ]; then
  TARGET="$PAIR/target"; DRAFTER="$PAIR/drafter"
else
  python3 -m dflash_sglang make-tiny --arch "$ARCH" --out "$WORK/pair" > "$OUT/make-tiny.log" 2>&1 \
    || { cat "$OUT/make-tiny.log"; exit 1; }
  TARGET="$WORK/pair/target"; DRAFTER="$WORK/pair/drafter"
fi
BLOCK=$(python3 -c "from dflash_sglang.config import load_drafter_config as l; print(l('$DRAFTER').block_size)")

# Several servers share the GPU: SGLang sizes a KV pool as (free memory now) - (1 - fraction) x (free memory at
# its start), so with a high fraction every server would take most of what is free; the token cap keeps each
# pool small and leaves the rest to the others (and to whatever else runs on the box).
COMMON=(--model-path "$TARGET" --dtype "$DTYPE" --attention-backend triton --sampling-backend pytorch
        --mem-fraction-static 0.85 --max-total-tokens 65536 --cuda-graph-max-bs 16 --host 127.0.0.1 --log-level info)
[ "$PREFILL_GRAPHS" = 1 ] || COMMON+=(--disable-prefill-cuda-graph)
SPEC=(--speculative-algorithm DFLASH --speculative-draft-model-path "$DRAFTER"
      --speculative-draft-attention-backend "$DRAFT_BACKEND")
CHAIN=(--speculative-num-draft-tokens "$BLOCK")
OURS=("${CHAIN[@]}")
# Tree mode: the plugin's flags set the verify width (budget + 1) themselves.
[ -n "$TREE_BUDGET" ] && OURS=(--speculative-dflash-tree-budget "$TREE_BUDGET" --speculative-dflash-topk "$TREE_TOPK")
[ "$ADAPTIVE" = 1 ] && OURS+=(--speculative-dflash-adaptive)
# SGLang builds Gemma 4's vision tower, whose attention defaults to FA3; the box's sgl_kernel has no FA3 library.
if python3 -c "import json,sys; sys.exit(not json.load(open('$TARGET/config.json'))['model_type'].startswith('gemma4'))"
then COMMON+=(--mm-attention-backend triton_attn); fi
# shellcheck disable=SC2206  # word splitting of the extra flags is the point
EXTRA=(${EXTRA_SERVER_ARGS:-})

# 3. Start every contender at once: name, port offset, DFLASH_SGLANG_DISABLE, flags.
start_server() {
  local name="$1" offset="$2" disable="$3"; shift 3
  PORT[$name]=$(( PORT_BASE + offset ))
  DFLASH_SGLANG_DISABLE="$disable" setsid python3 -m sglang.launch_server "$@" "${EXTRA[@]}" \
    --port "${PORT[$name]}" > "$OUT/$name.log" 2>&1 &
  SERVER_PID[$name]=$!
  echo "== $name: starting SGLang on :${PORT[$name]} (log: $OUT/$name.log)"
}
CONTENDERS=(builtin ours)
[ "$SKIP_BUILTIN" = 1 ] && CONTENDERS=(ours)
start_server ar 0 0 "${COMMON[@]}"
[ "$SKIP_BUILTIN" = 1 ] || start_server builtin 1 1 "${COMMON[@]}" "${SPEC[@]}" "${CHAIN[@]}"
start_server ours 2 0 "${COMMON[@]}" "${SPEC[@]}" "${OURS[@]}"

# 4. Measure them one at a time. Each gets at most its share of what is left, so one stuck server cannot eat
#    the others' time.
OURS_LINE="dflash_sglang: DFLASH is served by dflash_sglang.sglang.worker.DFlashWorker"
BUILTIN_LINE="dflash_sglang: DFLASH is served by SGLang's builtin DFlashWorkerV2 because DFLASH_SGLANG_DISABLE=1"
declare -A EXPECT=([ar]="" [builtin]="$BUILTIN_LINE" [ours]="$OURS_LINE")
share_left() { echo $(( (BUDGET - SECONDS) / $1 )); }
measure() {
  local name="$1" share="$2" log="$OUT/$1.log"
  if [ "$(share_left "$share")" -lt 20 ]; then echo "== $name: skipped, time budget spent"; return 0; fi
  # All servers started together, so waiting for this one is waiting for startup: it may take what is left
  # except ~30 s for each contender measured after it.
  if ! "${CLIENT[@]}" wait --port "${PORT[$name]}" --pid "${SERVER_PID[$name]}" \
      --timeout $(( BUDGET - SECONDS - 30 * share )); then
    echo "== $name: server failed to start; last lines of its log:"; tail -n 30 "$log"
    return 0
  fi
  echo "== $name: serving; sending $NUM_PROMPTS prompts at concurrency 1 and 16"
  local limit=$(( $(share_left "$share") > 20 ? $(share_left "$share") : 20 )) code=0
  timeout "$limit" \
    "${CLIENT[@]}" bench --port "${PORT[$name]}" --name "$name" --out "$OUT/$name.json" \
    --num-prompts "$NUM_PROMPTS" --max-tokens "$MAX_TOKENS" --concurrency 1 16 \
    ${EXPECT[$name]:+--log "$log" --expect "${EXPECT[$name]}"} $([ "$name" = ar ] && echo --logprobs) || code=$?
  if [ "$code" = 124 ]; then
    # The demo group of e2e_all.sh lost its builtin this way on 2026-11-29, reported as a server failure.
    echo "== $name: benchmark not done within its ${limit}s share of the budget (the server was serving)"
  elif [ "$code" != 0 ]; then
    echo "== $name: benchmark failed (exit $code); last lines of its log:"; tail -n 30 "$log"
  fi
}
measure ar $(( ${#CONTENDERS[@]} + 1 ))
[ "$SKIP_BUILTIN" = 1 ] || measure builtin 2
measure ours 1

# 5. Anything else that needs the live servers.
THEN_STATUS=0
if [ -n "$THEN" ]; then
  echo "== then: $THEN"
  AR_PORT="${PORT[ar]}" OURS_PORT="${PORT[ours]}" OURS_SESSION="${SERVER_PID[ours]}" OUT_DIR="$OUT" \
    bash -c "$THEN" || THEN_STATUS=$?
  echo "== then: exit $THEN_STATUS"
fi
stop_servers

# 6. The table, last.
echo
echo "pair=$NAME dtype=$DTYPE draft-backend=$DRAFT_BACKEND block=$BLOCK ${TREE_BUDGET:+tree=$TREE_BUDGET/top$TREE_TOPK }prompts=$NUM_PROMPTS max_tokens=$MAX_TOKENS"
"${CLIENT[@]}" report --dir "$OUT" --reference ar "${CONTENDERS[@]}" --must-pass ours
[ "$THEN_STATUS" = 0 ]
