#!/usr/bin/env bash
# Where each server's host time goes, per output token, by Python function: AR, the builtin DFLASH, ours (chain),
# ours (tree with the adaptive width) and ours pinned to plain steps, on the SmolLM2 pair, bf16, one GPU.
#
# On a 135M target the step is host time: AR's scheduler step is ~1.8 ms at 1 and at 32 requests, ours ~3.8 and
# ~6 ms (2026-11-30, bench-2026-11-30c). The torch profiler (profile_step.py) attributes time to operators and
# CUDA calls inside one range; this samples every server's scheduler thread by Python stack
# (host_sampler_plugin.py) while host_profile.py drives closed-loop load at each concurrency, and reports
# microseconds of host time per output token by function, inclusive and self, side by side, and the exact host
# time of the step's parts (TIMED below: calls, us per call, us per token).
#
#   usage: source scripts/device/site.sh && bash scripts/device/host_profile.sh [--target DIR] [--drafter DIR]
#            [--concurrency "1 32 64"] [--rounds 3] [--tree-budget 64] [--step-timing] [--torch-profile C]
#            [--prefill-graphs] [--spec-server-args "ARGS"] [--server-args "ARGS"] [--servers "ar ours ..."]
#   Defaults: the SmolLM2 pair under /tmp/smol (target converted from the GGUF payload if absent; the drafter
#   carried in .device-drafter and copied there by this script when found).
# --step-timing: our servers also time their steps' phases on the GPU (DFLASH_SGLANG_STEP_TIMING; its CUDA events
# and polls are then part of the host figures, as they were on 2026-11-30).
# --torch-profile C: after each server's closed loop, scripts/device/profile_step.py at C requests on it (SGLang's
# torch profiler, started with Python stacks and shapes off): host synchronizations, kernel launches and graph
# replays per scheduler step. Host time that the sampler finds in calls that should not block (2026-11-30: 0.7 ms a
# plain step in FutureMap.resolve_seq_lens_cpu) is either a synchronization, which this counts, or not.
# Its table: $DIR/<name>-torch.txt, appended to table.txt; the raw traces are deleted once summarized.
# --prefill-graphs and --spec-server-args "ARGS": as bench.sh's, so the profile describes the servers the benchmark
# measured (2026-11-30: prefill graphs on, the prefill delayer on the speculative servers). Without them prefills
# run eagerly, as in the profiles before then. --server-args "ARGS": for every server, AR's included (a prefill CUDA
# graph backend, say, compared with another in a second run). --servers: a subset of NAMES below, in its order.
# Results: $OUT/host/<name>.json (figures and folded stacks), <name>.log (server), table.txt (printed last).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
SMOL="${SMOL_DIR:-/tmp/smol}"
DIR="${OUT:-$REPO/out}/host"
TARGET="$SMOL/target"
DRAFTER="$SMOL/drafter"
CONCURRENCY="1 32 64"
ROUNDS=3
TREE_BUDGET=64
STARTUP_LIMIT=300
STEP_TIMING=0
TORCH_PROFILE=""
PREFILL_GRAPHS=0
SPEC_SERVER_ARGS=""
SERVER_ARGS=""
SERVERS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --target) TARGET="$2"; shift 2 ;;
    --drafter) DRAFTER="$2"; shift 2 ;;
    --concurrency) CONCURRENCY="$2"; shift 2 ;;
    --rounds) ROUNDS="$2"; shift 2 ;;
    --tree-budget) TREE_BUDGET="$2"; shift 2 ;;
    --step-timing) STEP_TIMING=1; shift ;;
    --torch-profile) TORCH_PROFILE="$2"; shift 2 ;;
    --prefill-graphs) PREFILL_GRAPHS=1; shift ;;
    --spec-server-args) SPEC_SERVER_ARGS="$2"; shift 2 ;;
    --server-args) SERVER_ARGS="$2"; shift 2 ;;
    --servers) SERVERS="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
NAMES=(ar builtin ours ours-tree-adaptive ours-plain)
if [ -n "$SERVERS" ]; then
  for name in $SERVERS; do
    [[ " ${NAMES[*]} " == *" $name "* ]] || { echo "error: --servers: no server named $name (${NAMES[*]})" >&2; exit 2; }
  done
  read -ra NAMES <<< "$SERVERS"
fi
mkdir -p "$DIR"
WORK="$(mktemp -d /tmp/dflash-host.XXXXXX)"

if [ ! -e "$DRAFTER/model.safetensors" ] && [ -e "$REPO/.device-drafter/model.safetensors" ]; then
  mkdir -p "$DRAFTER" && cp "$REPO"/.device-drafter/{config.json,model.safetensors} "$DRAFTER/"
fi
[ -e "$DRAFTER/config.json" ] || { echo "error: no drafter at $DRAFTER (carry .device-drafter)" >&2; exit 2; }
if [ ! -e "$TARGET/config.json" ]; then
  [ -e "$SMOL/.ready" ] || { echo "error: no target at $TARGET and no SmolLM2 payload in $SMOL" >&2; exit 2; }
  PYTHONPATH="$SMOL/site:$REPO:${PYTHONPATH:-}" python3 -m dflash_sglang convert-gguf --gguf "$SMOL/smollm2.gguf" \
    --out "$TARGET" --dtype bfloat16 > "$DIR/convert.log" 2>&1 || { tail "$DIR/convert.log"; exit 1; }
fi

python3 "$REPO/scripts/device/plugin_dist.py" "$WORK/dist" --harness || exit 1
export PYTHONPATH="$REPO:$REPO/scripts/device:$WORK/dist${PYTHONPATH:+:$PYTHONPATH}"
BLOCK=$(python3 -c "import sys; from dflash_sglang.config import load_drafter_config
print(load_drafter_config(sys.argv[1]).block_size)" "$DRAFTER") || exit 2

read -ra LEVELS <<< "$CONCURRENCY"
MAX_BS=1
for c in "${LEVELS[@]}"; do [ "$c" -gt "$MAX_BS" ] && MAX_BS=$c; done
# bench.sh's server flags, so the figures describe the servers it measures.
COMMON=(--model-path "$TARGET" --dtype bfloat16 --attention-backend triton --sampling-backend pytorch
        --mem-fraction-static 0.85 --max-total-tokens 131072 --sleep-on-idle
        --cuda-graph-max-bs "$MAX_BS" --max-running-requests "$MAX_BS" --host 127.0.0.1 --log-level info)
[ "$PREFILL_GRAPHS" = 1 ] || COMMON+=(--disable-prefill-cuda-graph)
read -ra ALL_EXTRA <<< "$SERVER_ARGS"
COMMON+=("${ALL_EXTRA[@]}")
read -ra SPEC_EXTRA <<< "$SPEC_SERVER_ARGS"
SPEC=(--speculative-algorithm DFLASH --speculative-draft-model-path "$DRAFTER" --speculative-draft-attention-backend
      triton "${SPEC_EXTRA[@]}")
CHAIN=(--speculative-num-draft-tokens "$BLOCK")
TREE=(--speculative-dflash-tree-budget "$TREE_BUDGET" --speculative-dflash-adaptive)  # its width: the budget + 1
declare -A PORT=([ar]=30400 [builtin]=30401 [ours]=30402 [ours-tree-adaptive]=30403 [ours-plain]=30404)
# Exact host time of the step's parts (host_sampler_plugin.py's timers), beside the samples.
TIMED=(
  sglang.srt.managers.scheduler:Scheduler.get_next_batch_to_run
  sglang.srt.managers.scheduler:Scheduler.update_running_batch
  sglang.srt.managers.scheduler:Scheduler.run_batch
  sglang.srt.managers.scheduler:Scheduler.process_batch_result
  sglang.srt.managers.scheduler:Scheduler.get_new_batch_prefill
  sglang.srt.managers.schedule_batch:ScheduleBatch.prepare_for_extend
  sglang.srt.managers.schedule_batch:ScheduleBatch.merge_batch
  sglang.srt.managers.schedule_batch:ScheduleBatch.filter_batch
  sglang.srt.managers.scheduler_components.batch_result_processor:SchedulerBatchResultProcessor.process_batch_result_prefill
  sglang.srt.managers.schedule_batch:ScheduleBatch.prepare_for_decode
  sglang.srt.speculative.dflash_info_v2:DFlashDraftInputV2.prepare_for_decode
  dflash_sglang.sglang.draft_state:DraftState.prepare_for_decode
  sglang.srt.model_executor.runner.decode_cuda_graph_runner:DecodeCudaGraphRunner.load_batch
  sglang.srt.model_executor.runner.decode_cuda_graph_runner:DecodeCudaGraphRunner.execute
  sglang.srt.model_executor.runner.eager_runner:EagerRunner.execute
  sglang.srt.model_executor.runner.prefill_cuda_graph_runner:PrefillCudaGraphRunner.load_batch
  sglang.srt.model_executor.runner.prefill_cuda_graph_runner:PrefillCudaGraphRunner.execute
  dflash_sglang.sglang.worker:DFlashWorker.prefill
  dflash_sglang.sglang.worker:DFlashWorker.decode
  dflash_sglang.sglang.worker:DFlashWorker.decode_tree
  dflash_sglang.sglang.worker:DFlashWorker.block
  dflash_sglang.sglang.worker:DFlashWorker.draft
  dflash_sglang.sglang.worker:DFlashWorker.verify
  dflash_sglang.sglang.worker:DFlashWorker.plain_forward
  dflash_sglang.sglang.worker:DFlashWorker.accept
  dflash_sglang.sglang.worker:DFlashWorker.accept_tree
  dflash_sglang.sglang.draft_model:DFlashSGLangDrafter.write_context_kv
)
TIMED_LIST=$(IFS=,; echo "${TIMED[*]}")
declare -A PID=()
trap 'for p in "${PID[@]}"; do kill -TERM -- "-$p" 2>/dev/null; done; sleep 2;
      for p in "${PID[@]}"; do kill -KILL -- "-$p" 2>/dev/null; done; rm -rf "$WORK"' EXIT

launch() {  # name, env settings..., -- flags... (a server not in NAMES is not started)
  [[ " ${NAMES[*]} " == *" $1 "* ]] || return 0
  local name="$1" envs=(); shift
  while [ "$1" != -- ]; do envs+=("$1"); shift; done; shift
  env DFLASH_HOST_SAMPLES="$WORK/samples/$name" DFLASH_HOST_TIMED="$TIMED_LIST" DFLASH_SGLANG_STEP_TIMING=$STEP_TIMING \
    SGLANG_PROFILE_WITH_STACK=false SGLANG_PROFILE_RECORD_SHAPES=false "${envs[@]}" setsid python3 -m \
    sglang.launch_server "${COMMON[@]}" --port "${PORT[$name]}" --nccl-port $(( PORT[$name] + 100 )) "$@" \
    > "$DIR/$name.log" 2>&1 &
  PID[$name]=$!
}
launch ar DFLASH_SGLANG_DISABLE=0 --
launch builtin DFLASH_SGLANG_DISABLE=1 -- "${SPEC[@]}" "${CHAIN[@]}"
launch ours DFLASH_SGLANG_DISABLE=0 -- "${SPEC[@]}" "${CHAIN[@]}"
launch ours-tree-adaptive DFLASH_SGLANG_DISABLE=0 -- "${SPEC[@]}" "${TREE[@]}"
# Every step a plain one (the adaptive width pinned to 1): what our plain step costs against AR's.
launch ours-plain DFLASH_SGLANG_DISABLE=0 DFLASH_SGLANG_ADAPTIVE_WIDTHS=1 -- "${SPEC[@]}" "${CHAIN[@]}" \
  --speculative-dflash-adaptive

ready() { python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1] + '/health', timeout=3)" \
  "http://127.0.0.1:${PORT[$1]}" 2>/dev/null; }
declare -A UP=()
while [ "$SECONDS" -lt "$STARTUP_LIMIT" ]; do
  waiting=0
  for name in "${NAMES[@]}"; do
    [ -z "${UP[$name]:-}" ] || continue
    if ! kill -0 "${PID[$name]}" 2>/dev/null; then UP[$name]=dead; echo "== $name: died (log: $DIR/$name.log)"
    elif ready "$name"; then UP[$name]=up; echo "== $name: ready after ${SECONDS}s"
    else waiting=1; fi
  done
  [ "$waiting" = 1 ] || break
  sleep 2
done

MEASURED=()
for name in "${NAMES[@]}"; do
  [ "${UP[$name]:-}" = up ] || { echo "== $name: not measured (${UP[$name]:-not up in ${STARTUP_LIMIT}s})"; continue; }
  if python3 "$REPO/scripts/device/host_profile.py" --port "${PORT[$name]}" --samples "$WORK/samples/$name" \
      --out "$DIR/$name.json" --label "$name" --concurrency "${LEVELS[@]}" --rounds "$ROUNDS" \
      > "$DIR/$name.txt" 2>&1; then
    MEASURED+=("$DIR/$name.json")
  else
    echo "== $name: profile failed"; tail -n 5 "$DIR/$name.txt"
  fi
  # The scheduler's own log: our worker's GPU step times by phase (--step-timing) and the adaptive
  # width's choices, kept beside the host figures.
  grep -E "step timing|adaptive width" "$DIR/$name.log" > "$DIR/$name-worker-lines.txt" 2>/dev/null
  if [ -n "$TORCH_PROFILE" ]; then
    # 512 tokens a request: SGLang's profiler stops after profile_step.py's 40 steps only if the requests last.
    timeout 120 python3 "$REPO/scripts/device/profile_step.py" --port "${PORT[$name]}" --out "$WORK/torch/$name" \
      --concurrency "$TORCH_PROFILE" --max-tokens 512 --timeout 110 > "$DIR/$name-torch.txt" 2>&1 \
      || echo "== $name: torch profile failed (exit $?; $DIR/$name-torch.txt)"
    rm -rf "$WORK/torch/$name"
  fi
  kill -TERM -- "-${PID[$name]}" 2>/dev/null  # one server fewer for the next one's CPUs
done
[ "${#MEASURED[@]}" -gt 0 ] || exit 1
python3 "$REPO/scripts/device/host_profile.py" --report "${MEASURED[@]}" > "$DIR/table.txt"
if [ -n "$TORCH_PROFILE" ]; then
  for name in "${NAMES[@]}"; do
    [ -s "$DIR/$name-torch.txt" ] || continue
    echo; echo "== $name: torch profile at c$TORCH_PROFILE"
    grep -A 7 "^== " "$DIR/$name-torch.txt"  # each range's title and its seven figures
  done >> "$DIR/table.txt"
fi
# The short table last: each server's host us per token at each level, then our chain's and AR's top functions.
head -n $(( 1 + ${#MEASURED[@]} * ${#LEVELS[@]} )) "$DIR/table.txt"
