#!/usr/bin/env bash
# The same servers under several SGLang scheduler settings, one host_profile.sh run per setting, then one table:
# closed-loop tok/s, host time per token, and where it goes (prefills, decode steps, the scheduler around them).
#
# Why: in a closed loop a speculative server's requests finish on different steps and prefill one at a time, while
# AR's (same length, EOS ignored) finish and prefill together. With prefill graphs on, one prefill of the SmolLM2
# target costs ~9 ms of host (2026-11-30, SGLang's "breakable" graph), several decode steps; the settings worth
# comparing are the ones that change how prefills are grouped (the prefill delayer, the scheduler's receive
# interval) or what one costs (the prefill graph backend).
#
#   usage: source scripts/device/site.sh && bash scripts/device/scheduler_variants.sh
#            --variant "NAME|ARGS FOR EVERY SERVER|ARGS FOR THE SPECULATIVE ONES" [--variant ...]
#            [--servers "ar ours ours-tree-adaptive"] [--concurrency "32 64"]
#   e.g.   --variant "base||" --variant "recv16|--scheduler-recv-interval 16|"
#          --variant "full|--cuda-graph-backend-prefill full|"
# Every server runs with prefill graphs on (bench.sh --prefill-graphs). Results: $OUT/variants/<name>/host/
# (host_profile.sh's), $OUT/variants/table.txt (printed last).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
VARIANTS=()
SERVERS="ar ours ours-tree-adaptive"
CONCURRENCY="32 64"
while [ $# -gt 0 ]; do
  case "$1" in
    --variant) VARIANTS+=("$2"); shift 2 ;;
    --servers) SERVERS="$2"; shift 2 ;;
    --concurrency) CONCURRENCY="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
[ "${#VARIANTS[@]}" -gt 0 ] || { echo "error: no --variant given" >&2; exit 2; }
for variant in "${VARIANTS[@]}"; do
  IFS='|' read -r name _ _ <<< "$variant"
  [[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "error: --variant \"$variant\": NAME must be [A-Za-z0-9_.-]+" >&2; exit 2; }
done
ROOT="${OUT:-$REPO/out}/variants"
mkdir -p "$ROOT"
RESULTS=()
for variant in "${VARIANTS[@]}"; do
  IFS='|' read -r name all_args spec_args <<< "$variant"
  echo "== $name: every server [$all_args], speculative ones [$spec_args]"
  OUT="$ROOT/$name" bash "$REPO/scripts/device/host_profile.sh" --prefill-graphs --concurrency "$CONCURRENCY" \
    --servers "$SERVERS" --server-args "$all_args" --spec-server-args "$spec_args" > "$ROOT/$name.txt" 2>&1 \
    || echo "== $name: host_profile.sh failed"
  grep -E "^== " "$ROOT/$name.txt"  # servers ready, dead or not measured
  for json in "$ROOT/$name"/host/*.json; do
    [ -e "$json" ] || continue
    # The label names the variant, so the joint table tells the runs' servers apart.
    python3 - "$json" "$name" <<'PY' && RESULTS+=("$json")
import json, sys
path, variant = sys.argv[1:]
data = json.load(open(path))
if "levels" not in data:
    sys.exit(1)
data["label"] = f"{data['label']}/{variant}"
json.dump(data, open(path, "w"))
PY
  done
  for log in "$ROOT/$name"/host/*.log; do
    [ -e "$log" ] && [ "$(basename "$log")" != convert.log ] || continue
    echo "$(basename "$log" .log)/$name: $(grep -c 'Prefill batch' "$log") prefill batches," \
      "$(grep 'Prefill batch' "$log" | grep -c '#new-seq: 1,') of one request," \
      "$(grep 'Prefill batch' "$log" | grep -c 'cuda graph: False') eager"
  done | tee -a "$ROOT/prefill-counts.txt"
done
[ "${#RESULTS[@]}" -gt 0 ] || exit 1
PYTHONPATH="$REPO/scripts/device:${PYTHONPATH:-}" python3 "$REPO/scripts/device/host_profile.py" \
  --report "${RESULTS[@]}" > "$ROOT/table.txt"
cat "$ROOT/prefill-counts.txt" >> "$ROOT/table.txt"
grep -E "^server|^[A-Za-z-]+/[A-Za-z0-9_.-]+ +[0-9]" "$ROOT/table.txt"
