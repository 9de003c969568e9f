#!/usr/bin/env bash
# Issue-7 evidence in one device command: every end-to-end group of scripts/device/e2e.sh at once, plus the GPU
# path of `make demo`. Groups run concurrently on their own ports (each starts AR, builtin and ours together and
# measures them one at a time), so startup -- most of the cost -- is paid once for all of them:
#   qwen3   tiny random Qwen3 pair, float32, triton draft attention
#   gemma4  tiny random Gemma-4 pair (real Gemma-4 tokenizer), float32, triton
#   demo    the embedded trained pair (acceptance well above 1), float32, triton; then the request-level checks
#           and the soak against its live servers
#   fa4     tiny Qwen3 pair, bfloat16, ours with fa4 draft attention against AR (when the FA4 site is unpacked)
#   tree    the embedded pair, float32, ours in tree mode (31 draft nodes, top-4) against AR, 200 prompts
#   adaptive  the same tree with --speculative-dflash-adaptive against AR, 100 prompts: steps switch between the
#           tree and plain decoding (c1 and c16 sit on either side of where the tiny target's drafting stops paying)
# Speed figures of concurrent groups share the GPU and CPUs with each other: read them as smoke figures; the
# side-by-side speed comparison is scripts/device/bench.sh, run alone. Prints every group's table last.
#
#   usage: source .device/unpack.sh && bash scripts/device/e2e_all.sh [--budget S]
set -uo pipefail
BUDGET=520
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="${OUT:-$REPO/out}"
mkdir -p "$OUT"
E2E=(bash "$REPO/scripts/device/e2e.sh")
# Our kernels: built once, before any group starts its servers (they load them from the cache).
export DFLASH_KERNEL_CACHE=/tmp/dflash_kernel_cache PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
python3 -m dflash_sglang.kernels build > "$OUT/kernel-build.log" 2>&1
DEMO_PAIR="$REPO/dflash_sglang/data/pairs/demo"
# The demo group also runs the request checks and the soak on its live servers, inside the same wall clock:
# it measures in BUDGET - 230 s, then checks (<= 80 s) and soaks (<= 100 s of requests, 30 s to drain), so
# that with 30 s to stop its servers it ends with the other groups.
CHECKS_BUDGET=80
SOAK_BUDGET=100

declare -A GROUP_PID
run_group() {
  local name="$1"; shift
  "${E2E[@]}" "$@" > "$OUT/group-$name.log" 2>&1 &
  GROUP_PID[$name]=$!
}
run_group qwen3 --arch qwen3 --port-base 30010 --budget "$BUDGET"
run_group gemma4 --arch gemma4 --port-base 30020 --budget "$BUDGET"
# Both run (the soak also when a check fails); the group fails if either does.
CHECKS="timeout $CHECKS_BUDGET python3 $REPO/scripts/device/request_checks.py --port \$OURS_PORT \
  --ref-port \$AR_PORT --out \$OUT_DIR/request_checks.json --mask-text '<|mask|>'; checks=\$?; \
  timeout $(( SOAK_BUDGET + 30 )) python3 $REPO/scripts/device/soak.py --port \$OURS_PORT --ref-port \$AR_PORT \
  --out \$OUT_DIR/soak --requests 500 --max-concurrency 64 --abort-fraction 0.1 --time-budget $SOAK_BUDGET \
  --log \$OUT_DIR/ours.log --gpu-mem-cmd 'bash $REPO/scripts/device/gpu_mem_of.sh '\$OURS_SESSION; soak=\$?; \
  [ \$checks = 0 ] && [ \$soak = 0 ]"
run_group demo --pair "$DEMO_PAIR" --name demo --port-base 30030 \
  --budget $(( BUDGET - 230 )) \
  --then "$CHECKS"
run_group tree --pair "$DEMO_PAIR" --name demo --skip-builtin --tree-budget 31 --tree-topk 4 --port-base 30050 \
  --prompts 200 --budget "$BUDGET"
run_group adaptive --pair "$DEMO_PAIR" --name demo --skip-builtin --tree-budget 31 --tree-topk 4 --adaptive \
  --port-base 30060 --prompts 100 --budget "$BUDGET"
if python3 -c "import cutlass, flash_attn.cute" 2>/dev/null; then
  run_group fa4 --arch qwen3 --name qwen3 --dtype bfloat16 --draft-backend fa4 --skip-builtin --port-base 30040 \
    --budget "$BUDGET"
else
  echo "fa4 group skipped: the FA4 site is not unpacked (see the device README)"
fi
# `make demo` on a GPU machine: its own server on :30000, one chat request through the openai client. The box
# has no pip install of this package, so the demo gets our entry point the way e2e.sh does (plugin_dist.py).
DEMO_DIST="$(mktemp -d /tmp/dflash-demo-dist.XXXXXX)"
python3 "$REPO/scripts/device/plugin_dist.py" "$DEMO_DIST" > /dev/null
( cd "$REPO" && PYTHONPATH="$DEMO_DIST:$PYTHONPATH" timeout "$BUDGET" python3 -m dflash_sglang demo \
  > "$OUT/make-demo.log" 2>&1; echo "make demo exit $?" >> "$OUT/make-demo.log" ) &
DEMO_PID=$!

STATUS=0
for name in "${!GROUP_PID[@]}"; do
  wait "${GROUP_PID[$name]}" || STATUS=1
done
wait "$DEMO_PID"
{
  echo "================ make demo (GPU path)"
  tail -n 12 "$OUT/make-demo.log"
  echo "================ kernel build"
  tail -n 3 "$OUT/kernel-build.log"
  for name in qwen3 gemma4 demo tree adaptive fa4; do
    [ -f "$OUT/group-$name.log" ] || continue
    echo "================ $name"
    grep -E "^== (then|.*failed)|dflash_sglang plugin" "$OUT/group-$name.log" || true
    sed -n '/^pair=/,$p' "$OUT/group-$name.log"
  done
} | tee "$OUT/e2e-summary.txt"
exit "$STATUS"
