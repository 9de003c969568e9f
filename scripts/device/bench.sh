#!/usr/bin/env bash
# Side-by-side benchmark in one device command (< 10 min): one target/drafter pair served by SGLang 0.5.16 as
#   ar           plain decoding, the greedy reference                                         :30000
#   builtin      --speculative-algorithm DFLASH with DFLASH_SGLANG_DISABLE=1 (SGLang's own)    :30001
#   ours         --speculative-algorithm DFLASH through the dflash_sglang plugin (chain)      :30002
#   ours-tree    the same in tree mode, --speculative-dflash-tree-budget N                    :30003
#   ours-tree-N  with a list of budgets (--tree-budget "8 16 32 64"): one tree contender per N :30003, :30004, ...
#                (trees run only when the installed plugin adds that flag to SGLang's parser; else skipped with
#                the reason)
#   ours-adaptive  (--adaptive) the tree of the first --tree-budget with --speculative-dflash-adaptive: each step
#                speculates or decodes plainly, whichever has been faster at the running batch size     :30020
# Every server starts at once (startup is most of the cost), then each is measured alone while the others idle:
#   sets   each prompt set at concurrency 1, first --set-prompts prompts, stopping at EOS -> tau per set
#   sweep  MATH-500 at each --concurrency, max(--rounds x c, 8) requests, EOS ignored -> tok/s, TPOT, TTFT, tau;
#          fresh prompts per level, none of the sets stage's (a radix-cache hit would shorten a prefill)
#   interleaved  after every contender's own stages, AR, the builtin, ours (and the tree contender, with a single
#          --tree-budget) again, their servers kept up for it (also those whose own stages found no time left):
#          per --concurrency level (the tree at its --tree-concurrency levels), --interleave-repeats times, one
#          short batch of MATH-500 prompts (max(--interleave-rounds x c, 4), default 1 round; the set from its
#          first prompt, fresh prompts per level and repeat while it lasts) on each in turn, in an order rotated
#          every repeat
#          (A B C D, B C D A, ...), the same prompts for all, each run from an empty radix cache (a prompt sent
#          again would prefill one token eagerly: see bench.run_interleaved) -> per repeat tok/s and its ratios
#          to AR and the builtin, their medians and min..max (bench --interleave). The machine's speed drifts over
#          tens of seconds (H200, 2026-11-30: our worker's step went from 1.6-1.8 to 2.4-2.9 ms between ours'
#          sets stage and its sweep ten seconds later, and the sweep said 0.68x the builtin at c1 where a profile
#          said as fast), so a ratio of two sweeps a minute apart measures the drift too; a ratio of two runs seconds
#          apart hardly does. These medians are the figures the bars are judged on; the sequential sweep stays for
#          TPOT, TTFT and tau per contender and for the budget sweep's c1 tok/s.
# EOS: the sweep ignores it so every contender emits the same tokens per request and batches stay full for the
# whole level (tok/s compare like for like); the sets stage stops at it because past EOS the target writes text
# no drafter is trained on (training answers end at EOS), so tau there would describe that tail, not the answers.
# Each stage has its own time limit (the contenders share what is left equally); what does not fit is recorded
# as skipped. The interleaved stage gets --interleave-share percent of --budget (default 25: 120 s of 480), taken
# from the sweeps of the contenders it measures again (their sets stages and the profile stage keep their time; a
# sweep left under 10 s is not run), and at its turn whatever is left; --interleave-share 0 turns it off. Each of
# its levels gets an equal part of what is left when the level starts and stops repeating when the next repeat
# would not fit; bench.json records the repeats each level got. Every output is checked against AR's for the same
# prompt; each mismatch carries AR's top-2 logprob margin at the first differing position (bench --logprobs), so
# bf16 near-ties show as such (the interleaved stage's are checked against AR's outputs in that stage, without
# margins). AR's sets stage asks for the logprobs itself (its speed is not reported); its sweep runs twice: timed
# without them (streaming every position's top-2 costs the server time at high concurrency), then as the
# reference with them:
#   margins  AR only: the sweep's prompts and levels again with --logprobs, in what is left of AR's share;
#            outputs are checked against it (its levels preferred over the timed sweep's), a level it could not
#            run falls back to the timed sweep, whose mismatches then have no margin
# Tree budget sweep (several --tree-budget values): the tree contenders sweep only --tree-concurrency (default 1
# with several budgets, --concurrency with one): the sets stage gives tau per set and c1 gives tok/s, which is
# what the sweep compares, and seven servers' full sweeps would not fit the command's 10 minutes. A contender
# whose sweep is a single level gives its sets stage 70% of its share (35% otherwise). Each server captures CUDA
# graphs up to the largest concurrency it will see (--cuda-graph-max-bs; SGLang captures 27 batch sizes for 64
# under speculative decoding, 1 for 1), so the c1-only trees start faster; KV pools stay capped at --kv-tokens.
# Profile stage (--profile): right after the measurement of AR, the builtin and ours, while each server is up, and
# after the last tree's, on the tree contender with the best c1 tok/s (the tree servers stay up until then),
# scripts/device/profile_step.py: ours (chain) at each --profile-concurrency (default "1 32"), AR, the builtin and
# the tree at the first (their scheduler steps are the baseline ours is compared with), each under --profile-limit seconds
# (default 60; each run is expected to take ~25 s, kept out of the contenders' shares). SGLang's /start_profile
# needs nothing at launch; the profiled servers start with SGLANG_PROFILE_WITH_STACK=false and
# SGLANG_PROFILE_RECORD_SHAPES=false (both default to true in 0.5.16: Python stacks and shapes would slow the
# host side being measured and swell the trace). The raw traces go to a temporary folder and are deleted once
# summarized; only the summaries stay.
# Time: four servers started in ~95 s on the H200 (2026-11-29) and each then took 60-85 s at --set-prompts 8
# (undertrained SmolLM2 drafter, tau ~1.1). Seven servers with --profile leave each contender ~40 s of a 540 s
# budget: pass --set-prompts 4 with a four-budget sweep and --profile, or the sets stages get cut short.
# Writes $OUT/bench/: meta.json, <name>.status, <name>.{sets,sweep}.json and ar.margins.json (with output ids),
# interleaved.{status,json} (with output ids), <name>.log (server), profile/<name>-c<C>.{status,summary.json,txt}
# (--profile), bench.json (all figures + settings + versions + GPU + profile summaries + the interleaved stage);
# prints the markdown tables last
# (python scripts/bench_report.py $OUT/bench/bench.json --out docs/results/ writes it with the plots).
#
#   usage: source .device/unpack.sh &&
#          bash scripts/device/bench.sh --target /tmp/smol/target --drafter /tmp/smol/drafter
#            [--draft-backend triton|fa4] [--concurrency "1 8 32 64"] [--sets "math500 humaneval mtbench gsm8k"]
#            [--budget S] [--max-tokens N] [--set-prompts N] [--rounds R] [--kv-tokens N]
#            [--tree-budget "N ..."] [--tree-topk K] [--tree-concurrency "1"]
#            [--profile] [--profile-concurrency "1 32"] [--profile-limit S]
#            [--interleave-share PERCENT] [--interleave-repeats R] [--interleave-rounds R] [--adaptive]
#            [--prefill-graphs] [--interleave-stop-at-eos] [--no-verify-splitkv] [--no-verify-prefill]
#            [--server-args "ARGS"] [--spec-server-args "ARGS"]
# --prefill-graphs keeps SGLang's default prefill CUDA graphs for every server (a minute or more of capture per
# start). Without it they are off, to save that time. A speculative server prefills its requests one at a time in
# a closed loop, since they finish on different steps, where AR prefills them together, so an eager prefill's
# ~20 ms of host time weighs on the sweep of a speculative server far more than on AR's.
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
TREE_CONCURRENCY=""
KV_TOKENS=131072
PROFILE=0
PROFILE_CONCURRENCY="1 32"
PROFILE_LIMIT=60
INTERLEAVE_SHARE=25   # percent of --budget for the interleaved stage (120 s of 480)
INTERLEAVE_REPEATS=5
# max(rounds x c, INTERLEAVE_MIN_REQUESTS) prompts per contender, level and repeat. One round: short runs, so a
# repeat's contenders run seconds apart and the stage fits several repeats; but each run is then one closed batch,
# which lasts as long as its slowest request (2026-11-30: the adaptive tree's mean TPOT beat AR's at c32 and c64
# while its tok/s lost). More rounds keep the batch full longer, at the cost of repeats.
INTERLEAVE_ROUNDS=1
# The interleaved stage ignores EOS by default, like the sweep: every contender emits the same token count per
# request, and AR's requests (the same length) finish together and prefill together. --interleave-stop-at-eos
# lets answers end where the target ends them, so AR's requests finish on different steps too, as in service.
INTERLEAVE_EOS=()
ADAPTIVE=0
PREFILL_GRAPHS=0
# Every server of ours attends in its verifies through our split-KV kernel (the default on triton, named so the
# report says it and a server that cannot serve it fails at startup); --no-verify-splitkv: SGLang's kernel instead.
# (--verify-splitkv, the default, is still accepted: earlier results' commands name it.)
OURS_EXTRA=(--speculative-dflash-verify-splitkv)
# Our servers prefill through their verify graphs (dflash_sglang/prefill_rows.py: the default wherever a server can;
# named, so the report says it), which takes the one-request prefills of a closed loop out of SGLang's prefill graph;
# --no-verify-prefill: SGLang's prefill instead. (--verify-prefill is still accepted: earlier results' commands name
# it.)
OURS_PREFILL=(--speculative-dflash-verify-prefill)
# --server-args "ARGS": SGLang flags for every server, AR's included, so a scheduler setting tried for the
# speculative servers (e.g. --enable-prefill-delayer, which batches the one-request prefills they run in a closed
# loop) is measured against an AR that has it too. --spec-server-args "ARGS": for the speculative servers only
# (the builtin's and ours), so AR serves in its own default setting while they get one meant for them.
ALL_EXTRA=()
SPEC_EXTRA=()
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
    --tree-concurrency) TREE_CONCURRENCY="$2"; shift 2 ;;
    --kv-tokens) KV_TOKENS="$2"; shift 2 ;;
    --profile) PROFILE=1; shift ;;
    --profile-concurrency) PROFILE_CONCURRENCY="$2"; shift 2 ;;
    --profile-limit) PROFILE_LIMIT="$2"; shift 2 ;;
    --interleave-share) INTERLEAVE_SHARE="$2"; shift 2 ;;
    --interleave-repeats) INTERLEAVE_REPEATS="$2"; shift 2 ;;
    --interleave-rounds) INTERLEAVE_ROUNDS="$2"; shift 2 ;;
    --interleave-stop-at-eos) INTERLEAVE_EOS=(--stop-at-eos); shift ;;
    --adaptive) ADAPTIVE=1; shift ;;
    --prefill-graphs) PREFILL_GRAPHS=1; shift ;;
    --verify-splitkv) OURS_EXTRA=(--speculative-dflash-verify-splitkv); shift ;;
    --no-verify-splitkv) OURS_EXTRA=(--no-speculative-dflash-verify-splitkv); shift ;;
    --verify-prefill) OURS_PREFILL=(--speculative-dflash-verify-prefill); shift ;;
    --no-verify-prefill) OURS_PREFILL=(--no-speculative-dflash-verify-prefill); shift ;;
    --server-args) read -ra ALL_EXTRA <<< "$2"; shift 2 ;;
    --spec-server-args) read -ra SPEC_EXTRA <<< "$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
OURS_EXTRA+=("${OURS_PREFILL[@]}")
for dir in "$TARGET" "$DRAFTER"; do
  if [ -z "$dir" ] || [ ! -f "$dir/config.json" ]; then
    echo "error: --target and --drafter must be model folders with a config.json (got '${dir}')" >&2; exit 2
  fi
done
positive_ints() {  # option, value: one or more distinct positive integers
  local n seen=" "
  [ -n "${2// /}" ] || { echo "error: $1 needs at least one positive integer" >&2; exit 2; }
  for n in $2; do
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || { echo "error: $1 takes positive integers (got '$2')" >&2; exit 2; }
    [[ "$seen" != *" $n "* ]] || { echo "error: $1 lists $n twice (got '$2')" >&2; exit 2; }
    seen+="$n "
  done
}
read -ra TREE_BUDGETS <<< "$TREE_BUDGET"
positive_ints --tree-budget "$TREE_BUDGET"
positive_ints --concurrency "$CONCURRENCY"
positive_ints --profile-concurrency "$PROFILE_CONCURRENCY"
positive_ints --profile-limit "$PROFILE_LIMIT"
positive_ints --interleave-repeats "$INTERLEAVE_REPEATS"
positive_ints --interleave-rounds "$INTERLEAVE_ROUNDS"
[[ "$INTERLEAVE_SHARE" =~ ^[0-9]+$ ]] && [ "$INTERLEAVE_SHARE" -lt 100 ] \
  || { echo "error: --interleave-share takes a percentage from 0 to 99 (got '$INTERLEAVE_SHARE')" >&2; exit 2; }

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
DIR="${OUT:-$REPO/out}/bench"
WORK="$(mktemp -d /tmp/dflash-bench.XXXXXX)"
mkdir -p "$DIR"
rm -f "$DIR"/*.json "$DIR"/*.status "$DIR"/*.log
rm -rf "$DIR/profile"

# One tree contender keeps today's name and the whole sweep; several are a budget sweep: one per N, c1 only.
declare -A TREE_OF=()
if [ "${#TREE_BUDGETS[@]}" = 1 ]; then
  TREES=(ours-tree)
  TREE_OF[ours-tree]=${TREE_BUDGETS[0]}
  TREE_CONCURRENCY="${TREE_CONCURRENCY:-$CONCURRENCY}"
else
  TREES=()
  for n in "${TREE_BUDGETS[@]}"; do TREES+=("ours-tree-$n"); TREE_OF[ours-tree-$n]=$n; done
  TREE_CONCURRENCY="${TREE_CONCURRENCY:-1}"
fi
positive_ints --tree-concurrency "$TREE_CONCURRENCY"
CONTENDERS=(ar builtin ours "${TREES[@]}")
# The interleaved stage measures these again, in turn: the chain, the builtin, AR, a single tree contender (a
# budget sweep's trees stay out: their c1 tok/s comes from their own sweeps) and the adaptive one.
INTERLEAVED=(ar builtin ours)
[ "${#TREES[@]}" = 1 ] && INTERLEAVED+=("${TREES[0]}")
if [ "$ADAPTIVE" = 1 ]; then
  CONTENDERS+=(ours-adaptive)
  INTERLEAVED+=(ours-adaptive)
fi
declare -A IN_INTERLEAVE=()
for name in "${INTERLEAVED[@]}"; do IN_INTERLEAVE[$name]=1; done
INTERLEAVE_MIN_REQUESTS=4    # so a repeat's contenders run seconds apart and the stage fits several repeats
declare -A PORT=([ar]=30000 [builtin]=30001 [ours]=30002 [ours-adaptive]=30020)
declare -A LEVELS=([ar]="$CONCURRENCY" [builtin]="$CONCURRENCY" [ours]="$CONCURRENCY" [ours-adaptive]="$CONCURRENCY")
declare -A PROFILED=()
for i in "${!TREES[@]}"; do
  PORT[${TREES[$i]}]=$(( 30003 + i ))
  LEVELS[${TREES[$i]}]="$TREE_CONCURRENCY"
done
if [ "$PROFILE" = 1 ]; then
  for name in ar builtin ours "${TREES[@]}"; do PROFILED[$name]=1; done
fi
declare -A PID=()
SERVING_OURS="dflash_sglang: DFLASH is served by dflash_sglang.sglang.worker.DFlashWorker"
SERVING_BUILTIN="dflash_sglang: DFLASH is served by SGLang's builtin DFlashWorkerV2"
declare -A EXPECT=([builtin]="$SERVING_BUILTIN" [ours]="$SERVING_OURS" [ours-adaptive]="$SERVING_OURS")
for name in "${TREES[@]}"; do EXPECT[$name]="$SERVING_OURS"; done

stop() {  # names...
  local name
  for name in "$@"; do
    # Each server runs in its own session: its scheduler and detokenizer go with it.
    [ -n "${PID[$name]:-}" ] && kill -TERM -- "-${PID[$name]}" 2>/dev/null
  done
  return 0
}
stop_all() {
  local name
  stop "${!PID[@]}"
  sleep 3
  for name in "${!PID[@]}"; do kill -KILL -- "-${PID[$name]}" 2>/dev/null || true; done
}
trap 'stop_all; rm -rf "$WORK"' EXIT
status() { echo "$2" > "$DIR/$1.status"; echo "== $1: $2"; }

# Our package and its SGLang entry point without pip (plugin_dist.py): the repo and the dist-info on PYTHONPATH.
python3 "$REPO/scripts/device/plugin_dist.py" "$WORK/dist" || exit 1
export PYTHONPATH="$REPO:$WORK/dist${PYTHONPATH:+:$PYTHONPATH}"
BLOCK=$(python3 -c "import sys; from dflash_sglang.config import load_drafter_config
print(load_drafter_config(sys.argv[1]).block_size)" "$DRAFTER") \
  || { echo "error: $DRAFTER is not a DFlash drafter we can read" >&2; exit 2; }
# Several servers on one GPU. SGLang 0.5.16 sizes a server's KV pool (mem_cache/kv_cache_configurator.py,
# _profile_available_bytes) as the GPU memory free after its weights load minus pre_model_load_memory x
# (1 - mem_fraction_static), pre_model_load_memory being what was free when that server started, then clamps
# it to --max-total-tokens (_apply_token_constraints). With 0.85 each server keeps 15% of what it saw free as
# slack and the cap keeps its pool small (SmolLM2-135M: ~23 KiB per token in bf16, 131072 tokens ~3 GiB), so
# the pools fit side by side whatever order the servers allocate in (seven SmolLM2 servers: ~21 GiB of pools,
# ~35 GiB with weights, graphs and workspaces, so each budget stays far above its capped pool). A low fraction
# (e.g. 0.3) would not: each server's slack would be 70% of the memory it saw free at start, and once an earlier
# server has taken its pool, a later one's budget goes negative. (Post-capture KV resizing, which measures after
# CUDA-graph capture, is off: it is opt-in, and needs prefill graphs.) --sleep-on-idle: an idle
# scheduler waits on its socket instead of spinning, so the idle servers leave the CPUs to the one being measured.
COMMON=(--model-path "$TARGET" --dtype bfloat16 --attention-backend triton --sampling-backend pytorch
        --mem-fraction-static 0.85 --max-total-tokens "$KV_TOKENS" --sleep-on-idle --host 127.0.0.1 --log-level info)
[ "$PREFILL_GRAPHS" = 1 ] || COMMON+=(--disable-prefill-cuda-graph)
COMMON+=("${ALL_EXTRA[@]}")
SPEC=(--speculative-algorithm DFLASH --speculative-draft-model-path "$DRAFTER"
      --speculative-draft-attention-backend "$DRAFT_BACKEND" "${SPEC_EXTRA[@]}")
PROFILE_ENV=(SGLANG_PROFILE_WITH_STACK=false SGLANG_PROFILE_RECORD_SHAPES=false)
PROFILE_EXPECTED=25  # seconds one profile run is expected to take, kept out of the contenders' shares
# Tokens per profiled request: SGLang's profiler stops itself after profile_step.py's 40 forward steps only if the
# requests last that long, which at tau 8 (a deep tree, a good drafter) takes 320 tokens; otherwise no trace.
PROFILE_TOKENS=512

read -ra PROFILE_LEVELS <<< "$PROFILE_CONCURRENCY"
profile_levels() {  # name: the concurrencies it is profiled at: ours (chain) at each, the others at the first
  case "$1" in ours) echo "${PROFILE_LEVELS[*]}" ;; *) echo "${PROFILE_LEVELS[0]}" ;; esac
}
graph_bs() {  # name: the largest batch it will run (its sweep levels, its profiles)
  local most=1 c
  for c in ${LEVELS[$1]} ${PROFILED[$1]:+$(profile_levels "$1")}; do [ "$c" -gt "$most" ] && most=$c; done
  echo "$most"
}
declare -A GRAPH_BS=()
for name in "${CONTENDERS[@]}"; do GRAPH_BS[$name]=$(graph_bs "$name"); done

# --max-running-requests: each server runs its largest level whole. SGLang 0.5.16 caps a speculative server at 48
# running requests unless told otherwise (arg_groups/speculative_hook.py) and AR at what its KV pool allows, so
# until 2026-11-30 the builtin and ours served "c64" as 48 running and 16 queued, against AR's 64.
launch() {  # name, env setting, flags...
  local name="$1" env_setting="$2"; shift 2
  local extra_env=()
  [ -n "${PROFILED[$name]:-}" ] && extra_env=("${PROFILE_ENV[@]}")
  env "$env_setting" "${extra_env[@]}" setsid python3 -m sglang.launch_server "${COMMON[@]}" \
    --cuda-graph-max-bs "${GRAPH_BS[$name]}" --max-running-requests "${GRAPH_BS[$name]}" --port "${PORT[$name]}" \
    --nccl-port $(( PORT[$name] + 100 )) "$@" > "$DIR/$name.log" 2>&1 &
  PID[$name]=$!
  echo "== $name: starting on :${PORT[$name]} (log: $DIR/$name.log)"
}
launch ar DFLASH_SGLANG_DISABLE=0
launch builtin DFLASH_SGLANG_DISABLE=1 "${SPEC[@]}" --speculative-num-draft-tokens "$BLOCK"
launch ours DFLASH_SGLANG_DISABLE=0 "${SPEC[@]}" --speculative-num-draft-tokens "$BLOCK" "${OURS_EXTRA[@]}"
# Tree mode is detected by its flag in SGLang's parser (the plugin adds it), so it runs the day it lands.
TREE_FLAG=--speculative-dflash-tree-budget
if python3 -m sglang.launch_server --help 2>/dev/null | grep -q -- "$TREE_FLAG"; then
  for name in "${TREES[@]}"; do
    launch "$name" DFLASH_SGLANG_DISABLE=0 "${SPEC[@]}" "$TREE_FLAG" "${TREE_OF[$name]}" \
      ${TREE_TOPK:+--speculative-dflash-topk "$TREE_TOPK"} "${OURS_EXTRA[@]}"
  done
  [ "$ADAPTIVE" = 1 ] && launch ours-adaptive DFLASH_SGLANG_DISABLE=0 "${SPEC[@]}" "$TREE_FLAG" "${TREE_BUDGETS[0]}" \
    ${TREE_TOPK:+--speculative-dflash-topk "$TREE_TOPK"} --speculative-dflash-adaptive "${OURS_EXTRA[@]}"
else
  UNSERVED=("${TREES[@]}")
  [ "$ADAPTIVE" = 1 ] && UNSERVED+=(ours-adaptive)
  for name in "${UNSERVED[@]}"; do
    status "$name" "skipped: 'python -m sglang.launch_server --help' lists no $TREE_FLAG \
(the dflash_sglang plugin does not serve trees yet)"
  done
fi

pairs() {  # assoc array name, keys...: "key:value key:value"
  local -n map="$1"; shift
  local key out=()
  for key in "$@"; do out+=("$key:${map[$key]}"); done
  echo "${out[*]}"
}
BENCH_SETTINGS="$(printf '%s\n' "target=$TARGET" "drafter=$DRAFTER" "block_size=$BLOCK" "draft_backend=$DRAFT_BACKEND" \
  "dtype=bfloat16" "max_tokens=$MAX_TOKENS" "concurrency=$CONCURRENCY" "sets=$SETS" "set_prompts=$SET_PROMPTS" \
  "rounds=$ROUNDS" "min_requests=8" "tree_budget=$TREE_BUDGET" "tree_topk=${TREE_TOPK:-plugin default}" \
  "tree_concurrency=$TREE_CONCURRENCY" "tree_contenders=$(pairs TREE_OF "${TREES[@]}")" \
  "cuda_graph_max_bs=$(pairs GRAPH_BS "${CONTENDERS[@]}")" "max_running_requests=$(pairs GRAPH_BS "${CONTENDERS[@]}")" \
  "profile=$PROFILE" \
  "profile_concurrency=$PROFILE_CONCURRENCY" "profile_limit_s=$PROFILE_LIMIT" "profile_max_tokens=$PROFILE_TOKENS" \
  "interleave_share=$INTERLEAVE_SHARE" "interleave_repeats=$INTERLEAVE_REPEATS" \
  "interleave_rounds=$INTERLEAVE_ROUNDS" "interleave_min_requests=$INTERLEAVE_MIN_REQUESTS" \
  "interleaved=${INTERLEAVED[*]}" "adaptive=$ADAPTIVE" \
  "kv_tokens=$KV_TOKENS" "budget_s=$BUDGET" "server_flags=${COMMON[*]:2}" "ours_flags=${OURS_EXTRA[*]}" \
  "all_flags=${ALL_EXTRA[*]}" "spec_flags=${SPEC_EXTRA[*]}")" \
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
for key in ("block_size", "max_tokens", "set_prompts", "rounds", "min_requests", "kv_tokens", "budget_s",
            "profile_limit_s", "profile_max_tokens", "interleave_share", "interleave_repeats", "interleave_rounds",
            "interleave_min_requests"):
    settings[key] = int(settings[key])
for key in ("concurrency", "tree_budget", "tree_concurrency", "profile_concurrency"):
    settings[key] = [int(c) for c in settings[key].split()]
for key in ("tree_contenders", "cuda_graph_max_bs", "max_running_requests"):
    settings[key] = {name: int(n) for name, n in (pair.rsplit(":", 1) for pair in settings[key].split())}
settings["profile"] = settings["profile"] == "1"
settings["adaptive"] = settings["adaptive"] == "1"
settings["sets"] = settings["sets"].split()
settings["interleaved"] = settings["interleaved"].split()
git = subprocess.run(["git", "-C", sys.argv[2], "describe", "--always", "--dirty"], capture_output=True, text=True)
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

RESERVE=25          # seconds kept for bench.json, the table and stopping the servers
# Seconds the contenders' sweeps leave to the interleaved stage: none when it is off or has fewer than two servers.
INTERLEAVE_LIMIT=0
interleaved_up=0
for name in "${INTERLEAVED[@]}"; do [ "${UP[$name]:-}" = up ] && interleaved_up=$(( interleaved_up + 1 )); done
[ "$interleaved_up" -ge 2 ] && INTERLEAVE_LIMIT=$(( BUDGET * INTERLEAVE_SHARE / 100 ))
INTERLEAVE_OWED=$INTERLEAVE_LIMIT  # the part of it the sweeps still to come have not given up yet
PROFILE_DIR="$DIR/profile"
declare -A PROFILE_DONE=()
measured_ok() { [ ! -f "$DIR/$1.status" ] || [ "$(head -n 1 "$DIR/$1.status")" = ok ]; }
profile_runs_left() {  # runs still to come: AR's, the builtin's, ours' and the best tree's, while they can run
  local runs=0 name levels
  if [ "$PROFILE" = 1 ]; then
    for name in ar builtin ours; do
      if [ -z "${PROFILE_DONE[$name]:-}" ] && [ "${UP[$name]:-}" = up ] && measured_ok "$name"; then
        read -ra levels <<< "$(profile_levels "$name")"; runs=$(( runs + ${#levels[@]} ))
      fi
    done
    for name in "${TREES[@]}"; do
      if [ "${UP[$name]:-}" = up ] && measured_ok "$name"; then
        read -ra levels <<< "$(profile_levels "$name")"; runs=$(( runs + ${#levels[@]} )); break
      fi
    done
  fi
  echo "$runs"
}
interleaved_kept() { [ "$INTERLEAVE_LIMIT" -gt 0 ] && [ -n "${IN_INTERLEAVE[$1]:-}" ]; }
unmeasured_up() {  # of the named servers, those up and not measured yet
  local count=0 name
  for name in "$@"; do
    [ "${UP[$name]:-}" = up ] && [ ! -f "$DIR/$name.status" ] && count=$(( count + 1 ))
  done
  echo "$count"
}
profile_server() {  # name: scripts/device/profile_step.py at each --profile-concurrency on its server
  local name="$1" c tag folder left limit code state
  mkdir -p "$PROFILE_DIR"
  for c in $(profile_levels "$name"); do
    tag="$name-c$c"
    folder="$WORK/profile/$tag"    # raw traces: outside $OUT, deleted once summarized
    left=$(( BUDGET - RESERVE - SECONDS - 30 * $(unmeasured_up "${CONTENDERS[@]}") ))
    limit=$(( left < PROFILE_LIMIT ? left : PROFILE_LIMIT ))
    if [ "$limit" -lt 20 ]; then
      state="skipped: time budget spent (${limit}s for it)"
    else
      echo "== $name: profiling at concurrency $c (at most ${limit}s)"
      timeout "$limit" python3 "$REPO/scripts/device/profile_step.py" --port "${PORT[$name]}" --out "$folder" \
        --concurrency "$c" --max-tokens "$PROFILE_TOKENS" --timeout $(( limit - 5 )) > "$PROFILE_DIR/$tag.txt" 2>&1
      code=$?
      [ -f "$folder/profile-summary.json" ] && cp "$folder/profile-summary.json" "$PROFILE_DIR/$tag.summary.json"
      case "$code" in
        0) state=ok ;;
        124) state="failed: not done within ${limit}s" ;;
        *) state="failed: profile_step.py exited with $code: $(tail -n 1 "$PROFILE_DIR/$tag.txt")" ;;
      esac
      rm -rf "$folder"
      cat "$PROFILE_DIR/$tag.txt"
    fi
    echo "$state" > "$PROFILE_DIR/$tag.status"
    echo "== $name: profile at concurrency $c: $state"
  done
}

# Measure each ready server alone, in order (AR first: it is the reference).
BENCH=(python3 -m dflash_sglang bench --tokenizer "$TARGET" --max-tokens "$MAX_TOKENS" --warmup 8)
for name in "${CONTENDERS[@]}"; do
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
  start=$SECONDS
  # The contenders still to measure share what is left equally, as if there were no interleaved stage (the sets
  # stage keeps that size); the interleaved stage's time comes out of the sweeps of the contenders it measures
  # again, each giving up an equal part of what is still owed.
  left=$(( BUDGET - RESERVE - start - PROFILE_EXPECTED * $(profile_runs_left) - INTERLEAVE_LIMIT ))
  share=$(( (left + INTERLEAVE_OWED) / $(unmeasured_up "${CONTENDERS[@]}") ))
  if [ "$share" -lt 30 ]; then status "$name" "skipped: time budget spent (${share}s for it)"; continue; fi
  read -ra levels <<< "${LEVELS[$name]}"
  sets_limit=$(( share * (${#levels[@]} == 1 ? 70 : 35) / 100 ))
  if interleaved_kept "$name"; then
    given=$(( INTERLEAVE_OWED / $(unmeasured_up "${INTERLEAVED[@]}") ))
    share=$(( share - given ))
    INTERLEAVE_OWED=$(( INTERLEAVE_OWED - given ))
  fi
  REFERENCE=()
  [ "$name" = ar ] && REFERENCE=(--logprobs)
  echo "== $name: measuring (${share}s: sets ${sets_limit}s, sweep the rest${REFERENCE:+, then the margins stage})"
  url="http://127.0.0.1:${PORT[$name]}"
  timeout $(( sets_limit + 30 )) "${BENCH[@]}" --url "$url" --name "$name" --sets $SETS --concurrency 1 \
    --limit "$SET_PROMPTS" --stop-at-eos --time-limit "$sets_limit" --out "$DIR/$name.sets.json" "${REFERENCE[@]}" \
    || echo "== $name: the sets stage failed"
  SWEEP=(--url "$url" --name "$name" --sets math500 --skip "$SET_PROMPTS" --concurrency "${levels[@]}"
         --rounds "$ROUNDS" --min-requests 8)
  sweep_limit=$(( share - (SECONDS - start) ))
  if [ "$sweep_limit" -lt 10 ]; then
    echo "== $name: no time left for the sweep (${sweep_limit}s)"
  else
    timeout $(( sweep_limit + 30 )) "${BENCH[@]}" "${SWEEP[@]}" --time-limit "$sweep_limit" \
      --out "$DIR/$name.sweep.json" || echo "== $name: the sweep stage failed"
  fi
  margins_limit=$(( share - (SECONDS - start) ))
  if [ "$name" = ar ] && [ "$margins_limit" -lt 10 ]; then
    echo "== ar: no time left for the margins stage (${margins_limit}s): sweep mismatches will have no margins"
  elif [ "$name" = ar ]; then
    timeout $(( margins_limit + 30 )) "${BENCH[@]}" "${SWEEP[@]}" --warmup 0 --logprobs --time-limit "$margins_limit" \
      --out "$DIR/ar.margins.json" || echo "== ar: the margins stage failed"
  fi
  status "$name" ok
  if [ -n "${PROFILED[$name]:-}" ] && [ -z "${TREE_OF[$name]:-}" ]; then
    profile_server "$name"
    PROFILE_DONE[$name]=1
  fi
  # Done with it: free its CPUs for the next one, unless the interleaved stage measures it again or it is a tree
  # that may be profiled (the best one is known at the end).
  interleaved_kept "$name" || { [ -n "${TREE_OF[$name]:-}" ] && [ "$PROFILE" = 1 ]; } || stop "$name"
done

if [ "$PROFILE" = 1 ]; then
  measured=()
  for name in "${TREES[@]}"; do [ -f "$DIR/$name.status" ] && measured_ok "$name" && measured+=("$name"); done
  best=""
  if [ "${#measured[@]}" -gt 0 ]; then
    best=$(python3 -c "import sys; from dflash_sglang.bench import fastest_contender
print(fastest_contender(sys.argv[1], sys.argv[2:]) or '')" "$DIR" "${measured[@]}")
  fi
  if [ -n "$best" ]; then
    echo "== profiling $best: the tree contender with the best c1 tok/s"
    profile_server "$best"
  else
    echo "== no tree contender measured at c1: no tree profile"
  fi
  for name in "${TREES[@]}"; do interleaved_kept "$name" || stop "$name"; done
fi

# Interleaved stage: the servers kept up measured again in turn at the sweep's levels (a tree at those of its
# --tree-concurrency), each repeat in a rotated order, in what is left of the budget; its paired ratios are the
# figures the bars are judged on, so a server whose own stages found no time left still takes part (2026-11-30: a
# slow start of five servers left none for the adaptive tree's, and it went unmeasured). Its prompts are MATH-500's
# from the first: each run starts on an emptied radix cache, so earlier stages' prompts are no cache hits, and the
# whole set gives c64 its 3 x 64 prompts.
if [ "$INTERLEAVE_LIMIT" -gt 0 ]; then
  pairs=()
  only=()
  for name in "${INTERLEAVED[@]}"; do
    [ "${UP[$name]:-}" = up ] && [ -f "$DIR/$name.status" ] || continue
    measured_ok "$name" || [[ "$(head -n 1 "$DIR/$name.status")" == "skipped: time budget spent"* ]] || continue
    pairs+=("$name=http://127.0.0.1:${PORT[$name]}")
    [ "${LEVELS[$name]}" = "$CONCURRENCY" ] || only+=("$name=${LEVELS[$name]// /,}")
  done
  [ "${#only[@]}" = 0 ] || only=(--contender-concurrency "${only[@]}")
  read -ra levels <<< "$CONCURRENCY"
  limit=$(( BUDGET - RESERVE - SECONDS ))
  if [ "${#pairs[@]}" -lt 2 ]; then
    status interleaved "skipped: fewer than two of ${INTERLEAVED[*]} measured"
  elif [ "$limit" -lt 20 ]; then
    status interleaved "skipped: time budget spent (${limit}s for it)"
  else
    echo "== interleaved: ${pairs[*]%%=*} in turn, ${INTERLEAVE_REPEATS} repeats per level, at most ${limit}s"
    if timeout $(( limit + 30 )) "${BENCH[@]}" --interleave "${pairs[@]}" "${only[@]}" --sets math500 \
         --concurrency "${levels[@]}" --rounds "$INTERLEAVE_ROUNDS" --min-requests "$INTERLEAVE_MIN_REQUESTS" \
         --repeats "$INTERLEAVE_REPEATS" --time-limit "$limit" "${INTERLEAVE_EOS[@]}" \
         --out "$DIR/interleaved.json"; then
      status interleaved ok
    else
      status interleaved "failed: dflash_sglang bench --interleave exited with $?"
    fi
  fi
  stop "${INTERLEAVED[@]}"
fi

python3 -c "import json, sys; from dflash_sglang.bench import assemble_suite
json.dump(assemble_suite(sys.argv[1]), open(sys.argv[1] + '/bench.json', 'w'), indent=1)" "$DIR" \
  || { echo "error: could not assemble bench.json" >&2; exit 1; }
echo "bench.json: $DIR/bench.json (${SECONDS}s in all)"
echo
python3 "$REPO/scripts/bench_report.py" "$DIR/bench.json" --no-plots
