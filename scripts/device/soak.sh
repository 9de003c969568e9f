#!/usr/bin/env bash
# Soak on the GPU box, standalone: a tiny pair served twice at once on loopback -- plain decoding (the AR reference,
# :30001) and DFLASH through our plugin (:30000), both float32 -- then scripts/device/soak.py against them, then
# scripts/device/request_checks.py. Results land in $OUT/soak-ARCH ($OUT defaults to out/).
#
#   usage: source .device/unpack.sh && bash scripts/device/soak.sh [--arch qwen3|llama|gemma4] [--budget S]
#            [-- extra soak.py flags, e.g. --requests 500 --seed 1]
#   env:   EXTRA_SERVER_ARGS="..." appended to both launches
set -euo pipefail

ARCH=qwen3
BUDGET=540           # seconds for the whole command (the box allows 10 minutes)
while [ $# -gt 0 ]; do
  case "$1" in
    --arch) ARCH="$2"; shift 2 ;;
    --budget) BUDGET="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${OUT:-$REPO/out}/soak-$ARCH"
WORK="$(mktemp -d /tmp/dflash-soak.XXXXXX)"
mkdir -p "$OUT"
PIDS=()
stop_servers() {
  for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done
  sleep 3
  for pid in "${PIDS[@]}"; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap 'stop_servers; rm -rf "$WORK"' EXIT

# Our entry point and the float32 native-ops harness, discoverable without pip (as in e2e.sh).
python3 "$REPO/scripts/device/plugin_dist.py" "$WORK/dist" --harness
export PYTHONPATH="$REPO:$REPO/scripts/device:$WORK/dist${PYTHONPATH:+:$PYTHONPATH}" DFLASH_E2E_NATIVE_OPS=1 \
  TRITON_F32_DEFAULT=ieee  # float32 as IEEE float32 in Triton dots too (triton_fp32_probe.py)

python3 -m dflash_sglang make-tiny --arch "$ARCH" --out "$WORK/pair" > "$OUT/make-tiny.log" 2>&1 \
  || { cat "$OUT/make-tiny.log"; exit 1; }
COMMON=(--model-path "$WORK/pair/target" --dtype float32 --attention-backend triton --sampling-backend pytorch
        --mem-fraction-static 0.25 --disable-prefill-cuda-graph --cuda-graph-max-bs 64 --host 127.0.0.1
        --log-level info)
# shellcheck disable=SC2206  # word splitting of the extra flags is the point
EXTRA=(${EXTRA_SERVER_ARGS:-})
setsid python3 -m sglang.launch_server "${COMMON[@]}" --port 30001 "${EXTRA[@]}" > "$OUT/ar.log" 2>&1 &
PIDS+=($!)
setsid python3 -m sglang.launch_server "${COMMON[@]}" --port 30000 --speculative-algorithm DFLASH \
  --speculative-draft-model-path "$WORK/pair/drafter" --speculative-num-draft-tokens 16 \
  --speculative-draft-attention-backend triton "${EXTRA[@]}" > "$OUT/ours.log" 2>&1 &
PIDS+=($!)
for i in 0 1; do
  python3 "$REPO/scripts/device/e2e_client.py" wait --port $((30000 + 1 - i)) --pid "${PIDS[$i]}" --timeout 240 \
    || { tail -n 30 "$OUT/ar.log" "$OUT/ours.log"; exit 1; }
done

STATUS=0
python3 "$REPO/scripts/device/soak.py" --port 30000 --ref-port 30001 --out "$OUT" \
  --time-budget $(( (BUDGET - SECONDS) * 2 / 3 )) --log "$OUT/ours.log" --log "$OUT/ar.log" "$@" || STATUS=1
python3 "$REPO/scripts/device/request_checks.py" --port 30000 --ref-port 30001 --out "$OUT/request_checks.json" \
  || STATUS=1
exit $STATUS
