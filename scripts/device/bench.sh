#!/usr/bin/env bash
# Side-by-side benchmark in one device command (< 10 min): one target/drafter pair served by SGLang 0.5.16 as
#   ar         plain decoding, the greedy reference                                           :30000
#   builtin    --speculative-algorithm DFLASH with DFLASH_SGLANG_DISABLE=1 (SGLang's own)      :30001
#   ours       --speculative-algorithm DFLASH through the dflash_sglang plugin (chain)        :30002
#   ours-tree  the same in tree mode, --speculative-dflash-tree-budget N                      :30003
#              (run only when the installed plugin adds that flag to SGLang's parser; else skipped with the reason)
# Every server starts at once (startup is most of the cost), then each is measured alone while the others idle:
#   sets   each prompt set at concurrency 1, first --set-prompts prompts, stopping at EOS -> tau per set
#   sweep  MATH-500 at each --concurrency, max(--rounds x c, 8) requests, EOS ignored -> tok/s, TPOT, TTFT, tau;
#          fresh prompts per level, none of the sets stage's (a radix-cache hit would shorten a prefill)
# EOS: the sweep ignores it so every contender emits the same tokens per request and batches stay full for the
# whole level (tok/s compare like for like); the sets stage stops at it because past EOS the target writes text
# no drafter is trained on (training answers end at EOS), so tau there would describe that tail, not the answers.
# Each stage has its own time limit (the contenders share what is left equally); what does not fit is recorded
# as skipped. Every output is checked against AR's for the same prompt; each mismatch carries AR's top-2 logprob
# margin at the first differing position (bench --logprobs), so bf16 near-ties show as such. AR's sets stage asks
# for the logprobs itself (its speed is not reported); its sweep runs twice: timed without them (streaming every
# position's top-2 costs the server time at high concurrency), then as the reference with them:
#   margins  AR only: the sweep's prompts and levels again with --logprobs, in what is left of AR's share;
#            outputs are checked against it (its levels preferred over the timed sweep's), a level it could not
#            run falls back to the timed sweep, whose mismatches then have no margin
# Writes $OUT/bench/: meta.json, <name>.status, <name>.{sets,sweep}.json and ar.margins.json (with output ids),
# <name>.log (server), bench.json (all figures + settings + versions + GPU); prints the markdown table last
# (python scripts/bench_report.py $OUT/bench/bench.json --out docs/results/ writes it with the plots).
#
#   usage: source .device/unpack.sh && bash scripts/device/bench.sh --target /tmp/smol/target --drafter /tmp/smol/drafter
#            [--draft-backend triton|fa4] [--concurrency "1 8 32 64"] [--sets "math500 humaneval mtbench gsm8k"]
#            [--budget S] [--max-tokens N] [--set-prompts N] [--rounds R] [--tree-budget N] [--tree-topk K]
#            [--kv-tokens N]
set -uo pipefail

TARGET=""
DRAFTER=""
DRAFT_BACKEND=triton
CONCURRENCY="1 8 32 64"
SETS="math500 humaneval mtbench gsm8k"
BUDGET=540          # seconds for the whole command; the box gives a command at most 10 minutes
MAX_TOKENS=256
SET_PROMPTS=8
ROUNDS=2
TREE_BUDGET=32
TREE_TOPK=""
KV_TOKENS=131072
while [ $# -gt 0 ]; do
  case "$1" in
    --target) TARGET="$2"; shift 2 ;;
    --drafter) DRAFTER="$2"; shift 2 ;;
    --draft-backend) DRAFT_BACKEND="$2"; shift 2 ;;
    --concurrency) CONCURRENCY="$2"; shift 2 ;;
    --sets) SETS="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --max-tokens) MAX_TOKENS="$2"; shift 2 ;;
    --set-prompts) SET_PROMPTS="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --tree-budget) TREE_BUDGET="$2"; shift 2 ;;
    --tree-topk) TREE_TOPK="$2"; shift 2 ;;
    --kv-tokens) KV_TOKENS="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
for dir in "$TARGET" "$DRAFTER"; do
  if [ -z "$dir" ] || [ ! -f "$dir/config.json" ]; then
    echo "error: --target and --drafter must be model folders with a config.json (got '${dir}')" >&2; exit 2
  fi
done

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="${OUT:-$REPO/out}/bench"
WORK="$(mktemp -d /tmp/dflash-bench.XXXXXX)"
mkdir -p "$DIR"
rm -f "$DIR"/*.json "$DIR"/*.status "$DIR"/*.log
CONTENDERS=(ar builtin ours ours-tree)
declare -A PORT=([ar]=30000 [builtin]=30001 [ours]=30002 [ours-tree]=30003)
declare -A PID=()
SERVING_OURS="dflash_sglang: DFLASH is served by dflash_sglang.sglang.worker.DFlashWorker"
SERVING_BUILTIN="dflash_sglang: DFLASH is served by SGLang's builtin DFlashWorkerV2"
declare -A EXPECT=([builtin]="$SERVING_BUILTIN" [ours]="$SERVING_OURS" [ours-tree]="$SERVING_OURS")

stop_all() {
  local name
  for name in "${!PID[@]}"; do
    # Each server runs in its own session: its scheduler and detokenizer go with it.
    kill -TERM -- "-${PID[$name]}" 2>/dev/null || true
  done
  sleep 3
  for name in "${!PID[@]}"; do kill -KILL -- "-${PID[$name]}" 2>/dev/null || true; done
}
trap 'stop_all; rm -rf "$WORK"' EXIT
status() { echo "$2" > "$DIR/$1.status"; echo "== $1: $2"; }

# Our package and its SGLang entry point without pip (plugin_dist.py): the repo and the dist-info on PYTHONPATH.
python3 "$REPO/scripts/device/plugin_dist.py" "$WORK/dist" || exit 1
export PYTHONPATH="$REPO:$WORK/dist${PYTHONPATH:+:$PYTHONPATH}"
BLOCK=$(python3 -c "import sys; from dflash_sglang.config import load_drafter_config
print(load_drafter_config(sys.argv[1]).block_size)" "$DRAFTER") || { echo "error: $DRAFTER is not a DFlash drafter we can read" >&2; exit 2; }

# Several servers on one GPU. SGLang 0.5.16 sizes a server's KV pool (mem_cache/kv_cache_configurator.py,
# _profile_available_bytes) as the GPU memory free after its weights load minus pre_model_load_memory x
# (1 - mem_fraction_static), pre_model_load_memory being what was free when that server started, then clamps
# it to --max-total-tokens (_apply_token_constraints). With 0.85 each server keeps 15% of what it saw free as
# slack and the cap keeps its pool small (SmolLM2-135M: ~23 KiB per token in bf16, 131072 tokens ~3 GiB), so
# the pools fit side by side whatever order the servers allocate in. A low fraction (e.g. 0.3) would not: each
# server's slack would be 70% of the memory it saw free at start, and once an earlier server has taken its
# pool, a later one's budget goes negative. (Post-capture KV resizing, which measures after CUDA-graph capture,
# is off: it is opt-in and needs prefill graphs, disabled here.) --sleep-on-idle: an idle scheduler waits on
# its socket instead of spinning, so the idle servers leave the CPUs to the one being measured.
COMMON=(--model-path "$TARGET" --dtype bfloat16 --attention-backend triton --sampling-backend pytorch
        --disable-prefill-cuda-graph --cuda-graph-max-bs 64 --mem-fraction-static 0.85
        --max-total-tokens "$KV_TOKENS" --sleep-on-idle --host 127.0.0.1 --log-level info)
SPEC=(--speculative-algorithm DFLASH --speculative-draft-model-path "$DRAFTER"
      --speculative-draft-attention-backend "$DRAFT_BACKEND")

launch() {  # name, env setting, flags...
  local name="$1" env_setting="$2"; shift 2
  env "$env_setting" setsid python3 -m sglang.launch_server "${COMMON[@]}" --port "${PORT[$name]}" \
    --nccl-port $(( PORT[$name] + 100 )) "$@" > "$DIR/$name.log" 2>&1 &
  PID[$name]=$!
  echo "== $name: starting on :${PORT[$name]} (log: $DIR/$name.log)"
}
launch ar DFLASH_SGLANG_DISABLE=0
launch builtin DFLASH_SGLANG_DISABLE=1 "${SPEC[@]}" --speculative-num-draft-tokens "$BLOCK"
launch ours DFLASH_SGLANG_DISABLE=0 "${SPEC[@]}" --speculative-num-draft-tokens "$BLOCK"
# Tree mode is detected by its flag in SGLang's parser (the plugin adds it), so it runs the day it lands.
TREE_FLAG=--speculative-dflash-tree-budget
if python3 -m sglang.launch_server --help 2>/dev/null | grep -q -- "$TREE_FLAG"; then
  launch ours-tree DFLASH_SGLANG_DISABLE=0 "${SPEC[@]}" "$TREE_FLAG" "$TREE_BUDGET" \
    ${TREE_TOPK:+--speculative-dflash-topk "$TREE_TOPK"}
else
  status ours-tree "skipped: 'python -m sglang.launch_server --help' lists no $TREE_FLAG \
(the dflash_sglang plugin does not serve trees yet)"
fi

BENCH_SETTINGS="$(printf '%s\n' "target=$TARGET" "drafter=$DRAFTER" "block_size=$BLOCK" "draft_backend=$DRAFT_BACKEND" \
  "dtype=bfloat16" "max_tokens=$MAX_TOKENS" "concurrency=$CONCURRENCY" "sets=$SETS" "set_prompts=$SET_PROMPTS" \
  "rounds=$ROUNDS" "min_requests=8" "tree_budget=$TREE_BUDGET" "tree_topk=${TREE_TOPK:-plugin default}" \
  "kv_tokens=$KV_TOKENS" "budget_s=$BUDGET" "server_flags=${COMMON[*]:2}")" \
python3 - "$DIR/meta.json" "$REPO" "${CONTENDERS[@]}" <<'EOF'
import datetime, json, os, subprocess, sys
from importlib.metadata import PackageNotFoundError, version
import torch
versions = {}
for dist in ("sglang", "torch", "transformers", "triton", "dflash-sglang"):
    try:
        versions[dist] = version(dist)
    except PackageNotFoundError:
        versions[dist] = "unknown"
settings = dict(line.split("=", 1) for line in os.environ["BENCH_SETTINGS"].splitlines())
for key in ("block_size", "max_tokens", "set_prompts", "rounds", "min_requests", "kv_tokens", "budget_s"):
    settings[key] = int(settings[key])
settings["concurrency"] = [int(c) for c in settings["concurrency"].split()]
settings["sets"] = settings["sets"].split()
git = subprocess.run(["git", "-C", sys.argv[2], "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
settings["commit"] = git.stdout.strip() or "unknown (no git on the box)"
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
meta = {"date": datetime.date.today().isoformat(), "gpu": gpu, "versions": versions,
        "settings": settings, "contenders": sys.argv[3:]}
with open(sys.argv[1], "w") as f:
    json.dump(meta, f, indent=1)
EOF

# Wait for every started server: up, dead, or out of startup time (at most half the budget).
ready() { python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=3)" \
  "http://127.0.0.1:${PORT[$1]}" 2>/dev/null; }
STARTUP_DEADLINE=$(( BUDGET / 2 ))
declare -A UP=()
while :; do
  waiting=0
  for name in "${CONTENDERS[@]}"; do
    [ -n "${PID[$name]:-}" ] && [ -z "${UP[$name]:-}" ] || continue
    if ! kill -0 "${PID[$name]}" 2>/dev/null; then
      UP[$name]=dead
    elif ready "$name"; then
      UP[$name]=up; echo "== $name: ready after ${SECONDS}s"
    else
      waiting=1
    fi
  done
  [ "$waiting" = 1 ] && [ "$SECONDS" -lt "$STARTUP_DEADLINE" ] || break
  sleep 2
done

# Measure each ready server alone, in order (AR first: it is the reference).
RESERVE=25          # seconds kept for bench.json, the table and stopping the servers
BENCH=(python3 -m dflash_sglang bench --tokenizer "$TARGET" --max-tokens "$MAX_TOKENS" --warmup 8)
for i in "${!CONTENDERS[@]}"; do
  name="${CONTENDERS[$i]}"
  [ -n "${PID[$name]:-}" ] || continue
  case "${UP[$name]:-}" in
    up) ;;
    dead) status "$name" "failed: the server exited during startup (last lines of $name.log below)"
          tail -n 25 "$DIR/$name.log"; continue ;;
    *) status "$name" "failed: not ready within ${STARTUP_DEADLINE}s"; continue ;;
  esac
  if [ -n "${EXPECT[$name]:-}" ] && ! grep -qF "${EXPECT[$name]}" "$DIR/$name.log"; then
    status "$name" "failed: its log lacks '${EXPECT[$name]}' (wrong worker serving DFLASH)"; continue
  fi
  remaining=0
  for later in "${CONTENDERS[@]:$i}"; do [ "${UP[$later]:-}" = up ] && remaining=$(( remaining + 1 )); done
  start=$SECONDS
  share=$(( (BUDGET - RESERVE - start) / remaining ))
  if [ "$share" -lt 30 ]; then status "$name" "skipped: time budget spent (${share}s for it)"; continue; fi
  sets_limit=$(( share * 35 / 100 ))
  REFERENCE=()
  [ "$name" = ar ] && REFERENCE=(--logprobs)
  echo "== $name: measuring (${share}s: sets ${sets_limit}s, sweep the rest${REFERENCE:+, then the margins stage})"
  url="http://127.0.0.1:${PORT[$name]}"
  timeout $(( sets_limit + 30 )) "${BENCH[@]}" --url "$url" --name "$name" --sets $SETS --concurrency 1 \
    --limit "$SET_PROMPTS" --stop-at-eos --time-limit "$sets_limit" --out "$DIR/$name.sets.json" "${REFERENCE[@]}" \
    || echo "== $name: the sets stage failed"
  SWEEP=(--url "$url" --name "$name" --sets math500 --skip "$SET_PROMPTS" --concurrency $CONCURRENCY
         --rounds "$ROUNDS" --min-requests 8)
  sweep_limit=$(( share - (SECONDS - start) ))
  timeout $(( sweep_limit + 30 )) "${BENCH[@]}" "${SWEEP[@]}" --time-limit "$sweep_limit" \
    --out "$DIR/$name.sweep.json" || echo "== $name: the sweep stage failed"
  margins_limit=$(( share - (SECONDS - start) ))
  if [ "$name" = ar ] && [ "$margins_limit" -lt 10 ]; then
    echo "== ar: no time left for the margins stage (${margins_limit}s): sweep mismatches will have no margins"
  elif [ "$name" = ar ]; then
    timeout $(( margins_limit + 30 )) "${BENCH[@]}" "${SWEEP[@]}" --warmup 0 --logprobs --time-limit "$margins_limit" \
      --out "$DIR/ar.margins.json" || echo "== ar: the margins stage failed"
  fi
  status "$name" ok
  kill -TERM -- "-${PID[$name]}" 2>/dev/null || true   # done with it: free its CPUs for the next one
done

python3 -c "import json, sys; from dflash_sglang.bench import assemble_suite
json.dump(assemble_suite(sys.argv[1]), open(sys.argv[1] + '/bench.json', 'w'), indent=1)" "$DIR" \
  || { echo "error: could not assemble bench.json" >&2; exit 1; }
echo "bench.json: $DIR/bench.json (${SECONDS}s in all)"
echo
python3 "$REPO/scripts/bench_report.py" "$DIR/bench.json" --no-plots
