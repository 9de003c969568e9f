#!/usr/bin/env bash
# What one prefill costs a speculative server, under each of SGLang's prefill CUDA graph backends: host_profile.sh
# once per backend (every server gets `--cuda-graph-backend-prefill B`), then one table of all of them.
#
# Why: in a closed loop a speculative server's requests finish on different steps and prefill one at a time, while
# AR's (same length, EOS ignored) finish and prefill together. Eagerly a prefill of the SmolLM2 target cost ~39 ms
# of host (2026-11-30e), more than ten of our decode steps; the default "breakable" graph captures the layers
# between attention calls, "full" (experimental in 0.5.16) the whole body, attention included.
#
#   usage: source scripts/device/site.sh && bash scripts/device/prefill_backends.sh [--backends "breakable full"]
#            [--servers "ar ours ours-tree-adaptive"] [--concurrency "32 64"] [--spec-server-args "ARGS"]
# Results: $OUT/prefill/<backend>/host/ (host_profile.sh's), $OUT/prefill/table.txt (printed last).
set -uo pipefail
REPO="$(cd "$(dirname "$0")/../.." && pwd)"
BACKENDS="breakable full"
SERVERS="ar ours ours-tree-adaptive"
CONCURRENCY="32 64"
SPEC_SERVER_ARGS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --backends) BACKENDS="$2"; shift 2 ;;
    --servers) SERVERS="$2"; shift 2 ;;
    --concurrency) CONCURRENCY="$2"; shift 2 ;;
    --spec-server-args) SPEC_SERVER_ARGS="$2"; shift 2 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done
ROOT="${OUT:-$REPO/out}/prefill"
mkdir -p "$ROOT"
RESULTS=()
for backend in $BACKENDS; do
  echo "== prefill graph backend: $backend"
  OUT="$ROOT/$backend" bash "$REPO/scripts/device/host_profile.sh" --prefill-graphs --concurrency "$CONCURRENCY" \
    --servers "$SERVERS" --server-args "--cuda-graph-backend-prefill $backend" \
    --spec-server-args "$SPEC_SERVER_ARGS" > "$ROOT/$backend.txt" 2>&1 || echo "== $backend: host_profile.sh failed"
  grep -E "^== " "$ROOT/$backend.txt"  # servers ready, dead or not measured
  for json in "$ROOT/$backend"/host/*.json; do
    [ -e "$json" ] || continue
    # The label says the backend, so the joint table tells the two runs' servers apart.
    python3 - "$json" "$backend" <<'EOF' && RESULTS+=("$json")
import json, sys
path, backend = sys.argv[1:]
data = json.load(open(path))
if "levels" not in data:
    sys.exit(1)
data["label"] = f"{data['label']}/{backend}"
json.dump(data, open(path, "w"))
EOF
  done
  # Each server's log lines on its prefills: SGLang names the graph it ran or says it ran eagerly.
  for log in "$ROOT/$backend"/host/*.log; do
    [ -e "$log" ] || continue
    echo "$(basename "$log" .log)/$backend: $(grep -c 'Prefill batch' "$log") prefill batches," \
      "$(grep 'Prefill batch' "$log" | grep -c 'cuda graph: False') eager"
  done | tee -a "$ROOT/prefill-counts.txt"
done
[ "${#RESULTS[@]}" -gt 0 ] || exit 1
PYTHONPATH="$REPO/scripts/device:${PYTHONPATH:-}" python3 "$REPO/scripts/device/host_profile.py" \
  --report "${RESULTS[@]}" > "$ROOT/table.txt"
cat "$ROOT/prefill-counts.txt" >> "$ROOT/table.txt"
grep -E "^server|^[a-z-]+/[a-z_]+ +[0-9]" "$ROOT/table.txt"
grep -E "(PrefillCudaGraphRunner|EagerRunner).execute|DFlashWorker.prefill|Scheduler.run_batch" "$ROOT/table.txt"
