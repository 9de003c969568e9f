#!/usr/bin/env bash
# End to end on the GPU box: one tiny target/drafter pair served by real SGLang 0.5.16 three ways --
#   ar       plain decoding (the greedy reference)
#   builtin  --speculative-algorithm DFLASH with DFLASH_SGLANG_DISABLE=1 (SGLang's own DFlashWorkerV2)
#   ours     --speculative-algorithm DFLASH through the dflash_sglang plugin
# Each gets >= 50 greedy prompts at concurrency 1 and 16 through the OpenAI endpoint on 127.0.0.1:30000, then
# acceptance stats through /generate and a sampling smoke test. Prints a table last: greedy mismatches vs AR,
# tok/s, mean acceptance length; exits 0 only if our server ran, logged its worker line and matched AR
# exactly (the builtin row is the comparison point, reported but not gating). Logs, per-contender JSON and
# summary.json land in $OUT/e2e-ARCH-BACKEND ($OUT defaults to out/).
#
#   usage: source .device/unpack.sh && bash scripts/device/e2e.sh
#            [--arch qwen3|llama|gemma4] [--draft-backend triton|fa4] [--prompts N] [--budget S] [--skip-builtin]
#   env:   EXTRA_SERVER_ARGS="..." appended to every launch (e.g. --disable-overlap-schedule)
# fa4 needs the FA4 site unpacked first (see the device README) and runs in bfloat16; triton runs in float32,
# the precision the zero-mismatch bar is set in.
set -euo pipefail

ARCH=qwen3
DRAFT_BACKEND=triton
NUM_PROMPTS=64
MAX_TOKENS=64
BLOCK=16
PORT=30000
BUDGET=510          # seconds for the whole run; the box gives a command at most 10 minutes
SKIP_BUILTIN=0      # --skip-builtin: AR and ours only (when device time is short)
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH="$2"; shift 2 ;;
    --draft-backend) DRAFT_BACKEND="$2"; shift 2 ;;
    --prompts) NUM_PROMPTS="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --skip-builtin) SKIP_BUILTIN=1; shift ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
# Under the device runner $OUT is the folder that comes back; one subfolder per pair and backend.
OUT="${OUT:-$REPO/out}/e2e-$ARCH-$DRAFT_BACKEND"
WORK="$(mktemp -d /tmp/dflash-e2e.XXXXXX)"
CLIENT=(python3 "$REPO/scripts/device/e2e_client.py")
mkdir -p "$OUT"
rm -f "$OUT"/{ar,builtin,ours}.json "$OUT/summary.json"
DTYPE=float32
[ "$DRAFT_BACKEND" = fa4 ] && DTYPE=bfloat16   # FlashAttention kernels take no float32
# sgl_kernel's fused ops are fp16/bf16 only: float32 runs use SGLang's native ops (harness plugin, all contenders)
if [ "$DTYPE" = float32 ]; then export DFLASH_E2E_NATIVE_OPS=1; fi
SERVER_PID=""

stop_server() {
  if [ -n "$SERVER_PID" ] && kill -0 "$SERVER_PID" 2>/dev/null; then
    # The server runs in its own session: its scheduler and detokenizer children go with it.
    kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
    for _ in $(seq 30); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
  fi
  SERVER_PID=""
}
trap 'stop_server; rm -rf "$WORK"' EXIT

# 1. Our package and its SGLang entry point, without pip: the repo on PYTHONPATH, plus a dist-info folder
#    generated from pyproject.toml so importlib.metadata (SGLang's plugin discovery) finds the entry point.
python3 - "$REPO/pyproject.toml" "$WORK/dist" <<'EOF'
import sys, tomllib
from pathlib import Path
project = tomllib.loads(Path(sys.argv[1]).read_text())["project"]
info = Path(sys.argv[2]) / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
info.mkdir(parents=True)
(info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
lines = []
for group, entries in project["entry-points"].items():
    lines += [f"[{group}]"] + [f"{name} = {target}" for name, target in entries.items()] + [""]
(info / "entry_points.txt").write_text("\n".join(lines))
# The float32 harness plugin (scripts/device/native_ops_plugin.py), a distribution of its own.
harness = Path(sys.argv[2]) / "dflash_e2e_harness-0.dist-info"
harness.mkdir()
(harness / "METADATA").write_text("Metadata-Version: 2.1\nName: dflash-e2e-harness\nVersion: 0\n")
(harness / "entry_points.txt").write_text("[sglang.srt.plugins]\ndflash_e2e_native_ops = native_ops_plugin:register\n")
EOF
export PYTHONPATH="$REPO:$REPO/scripts/device:$WORK/dist${PYTHONPATH:+:$PYTHONPATH}"
python3 - <<'EOF'
from importlib.metadata import entry_points
from dflash_sglang.sglang.compat import check_sglang_version
check_sglang_version()
found = [ep.value for ep in entry_points(group="sglang.srt.plugins") if ep.name == "dflash_sglang"]
assert found == ["dflash_sglang.sglang.plugin:register"], found
print("dflash_sglang plugin discoverable:", found[0])
EOF

# 2. The tiny pair (z-lab layout, the real tokenizer alongside).
python3 -m dflash_sglang make-tiny --arch "$ARCH" --out "$WORK/pair" > "$OUT/make-tiny.log" 2>&1 \
  || { cat "$OUT/make-tiny.log"; exit 1; }
TARGET="$WORK/pair/target"
DRAFTER="$WORK/pair/drafter"

COMMON=(--model-path "$TARGET" --dtype "$DTYPE" --attention-backend triton --sampling-backend pytorch
        --mem-fraction-static 0.3 --disable-prefill-cuda-graph --cuda-graph-max-bs 16
        --host 127.0.0.1 --port "$PORT" --log-level info)
SPEC=(--speculative-algorithm DFLASH --speculative-draft-model-path "$DRAFTER"
      --speculative-num-draft-tokens "$BLOCK" --speculative-draft-attention-backend "$DRAFT_BACKEND")
# shellcheck disable=SC2206  # word splitting of the extra flags is the point
EXTRA=(${EXTRA_SERVER_ARGS:-})

# 3. Serve and measure each contender: name, expected startup line ("" = none), env, server flags.
# Each contender gets at most its share of what is left, so one stuck server cannot eat the others' time.
serve_and_bench() {
  local name="$1" expect="$2" env_setting="$3" share="$4"; shift 4
  local log="$OUT/$name.log" left=$(( (BUDGET - SECONDS) / share )) start=$SECONDS
  if [ "$left" -lt 60 ]; then echo "== $name: skipped, time budget spent"; return 0; fi
  echo "== $name: starting SGLang (log: $log, ${left}s left for it)"
  env $env_setting setsid python3 -m sglang.launch_server "$@" "${EXTRA[@]}" > "$log" 2>&1 &
  SERVER_PID=$!
  if ! "${CLIENT[@]}" wait --port "$PORT" --pid "$SERVER_PID" --timeout $(( left * 2 / 3 )); then
    echo "== $name: server failed to start; last lines of its log:"; tail -n 30 "$log"
    stop_server
    return 0
  fi
  echo "== $name: serving; sending $NUM_PROMPTS prompts at concurrency 1 and 16"
  timeout $(( left - (SECONDS - start) )) "${CLIENT[@]}" bench --port "$PORT" --name "$name" --out "$OUT/$name.json" \
    --num-prompts "$NUM_PROMPTS" --max-tokens "$MAX_TOKENS" --concurrency 1 16 \
    ${expect:+--log "$log" --expect "$expect"} $([ "$name" = ar ] && echo --logprobs) \
    || { echo "== $name: benchmark failed; last lines of its log:"; tail -n 30 "$log"; }
  stop_server
}

CONTENDERS=(builtin ours)
[ "$SKIP_BUILTIN" = 1 ] && CONTENDERS=(ours)
serve_and_bench ar "" "DFLASH_SGLANG_DISABLE=0" $(( ${#CONTENDERS[@]} + 1 )) "${COMMON[@]}"
BUILTIN_LINE="dflash_sglang: DFLASH is served by SGLang's builtin DFlashWorkerV2 because DFLASH_SGLANG_DISABLE=1"
[ "$SKIP_BUILTIN" = 1 ] || serve_and_bench builtin "$BUILTIN_LINE" "DFLASH_SGLANG_DISABLE=1" 2 "${COMMON[@]}" "${SPEC[@]}"
serve_and_bench ours "dflash_sglang: DFLASH is served by dflash_sglang.sglang.worker.DFlashWorker" \
  "DFLASH_SGLANG_DISABLE=0" 1 "${COMMON[@]}" "${SPEC[@]}"

# 4. The table, last.
echo
echo "arch=$ARCH dtype=$DTYPE draft-backend=$DRAFT_BACKEND block=$BLOCK prompts=$NUM_PROMPTS max_tokens=$MAX_TOKENS"
"${CLIENT[@]}" report --dir "$OUT" --reference ar "${CONTENDERS[@]}" --must-pass ours
