#!/usr/bin/env bash
# A DFlash drafter for SmolLM2-135M-Instruct, end to end on one H200 within SMOL_BUDGET seconds (default 900):
#   1. convert the GGUF (payloads .device-smol1..4, see scripts/prepare_smollm2.sh) to a bf16 HF checkpoint;
#   2. serve it with SGLang (plain decoding, SMOL_SERVERS servers on 127.0.0.1:30100..) and regenerate the
#      target's greedy answers to the ~46k training prompts (chat template, up to 512 new tokens, 384 requests in
#      flight); stop the servers;
#   3. pick the mask token (a special token no prompt or answer contains) and train a 5-layer drafter, B=16,
#      initialised from the target's last 5 layers, under a wall-clock cap that leaves time for the final
#      acceptance estimate on held-out records.
# Results: /tmp/smol/drafter (z-lab layout) and /tmp/smol/result/{run.log, server*.log, train_log.jsonl,
# summary.json (regen stats, timings, train summary), exit_code, DONE, drafter.tar.partNN}; copied to
# "$OUT/smollm2/" when OUT is set (the device runner brings back at most 8 files of 16 MiB: the drafter, ~39 MB,
# travels as a tar in parts; `cat drafter.tar.part* | tar -x` gives drafter/).
#
#   usage: source .device/unpack.sh && bash scripts/device/train_smollm2.sh
#          (after `source .device-smol1/unpack.sh` .. `smol4` in earlier commands on the same warm machine: see
#          docs/training.md for which folders travel together)
#   background: source .device/unpack.sh &&
#            (OUT= setsid bash scripts/device/train_smollm2.sh >/dev/null 2>&1 </dev/null &)
#          (OUT= so the run does not copy into whatever later command's $OUT is live when it ends)
#          then, from a later command: bash scripts/device/train_smollm2.sh --collect   (copies the results to $OUT)
#   env:   SMOL_BUDGET=900   seconds for the whole script: conversion ~60 s, SGLang up ~60 s, regeneration of the
#                            ~46k prompts (22k took 118 s over 3 servers on one GPU), the rest trains (at least 8
#                            minutes; answers still unsent when regeneration must stop are skipped). More than
#                            one device command allows (600 s), so run it in the background as above.
#          SMOL_TRAIN_MAX=600  seconds of training at most (issue 4 allows 10 minutes of H200 training time)
#          SMOL_TRAIN_MIN=480  seconds of training the regeneration must leave (a shorter run when device time
#                            is short)
#          SMOL_SERVERS=3    SGLang servers of the target that share the regeneration prompts (a 135M model's
#                            decode is bound by each scheduler's host time, not by the GPU)
#          SMOL_SERVER_GPUS="0 1"  GPUs the servers take in turn (default: the one this script sees); training
#                            stays on the script's own GPU
#          SMOL_CONCURRENCY=384  regeneration requests in flight over all servers (each caps its running requests
#                            at its share)
#          SMOL_VARIANT_ARGS="--lr 2e-3"  a second drafter, trained at the same time on SMOL_VARIANT_GPU
#                            (default 0: the x2 box's other GPU) from the same answers with these train arguments
#                            appended (argparse: the last value wins) and the same time cap; the one with the higher
#                            held-out acceptance estimate becomes $SMOL/drafter, the other stays as
#                            drafter-recipe or drafter-variant, and both estimates go into summary.json. Each trains
#                            on one H200 for at most SMOL_TRAIN_MAX: a two-way comparison per run, not a longer one.
#          SMOL_DIR=/tmp/smol    where the payloads were unpacked and results go
#          SMOL_CPU_TEST=1   plumbing check without a GPU or SGLang: a tiny random Llama target (make-tiny), the
#                            reference regenerate path on SMOL_CPU_PROMPTS (default 12) prompts, a few CPU steps
set -euo pipefail

REPO="$(cd "$(dirname "$0")/../.." && pwd)"
SMOL="${SMOL_DIR:-/tmp/smol}"
RESULT="$SMOL/result"
COPY_TO="${OUT:+$OUT/smollm2}"

collect() {
  [ -n "$COPY_TO" ] || return 0
  rm -rf "$COPY_TO" && mkdir -p "$COPY_TO"
  cp -f "$RESULT"/* "$COPY_TO"/ 2>/dev/null || true
}

if [ "${1:-}" = --collect ]; then
  [ -d "$RESULT" ] || { echo "error: no $RESULT on this machine (a fresh machine keeps nothing)" >&2; exit 1; }
  collect
  if [ -e "$RESULT/exit_code" ]; then echo "finished, exit code $(cat "$RESULT/exit_code")"
  else echo "still running"; fi
  tail -n 5 "$RESULT/run.log"
  exit 0
fi

BUDGET="${SMOL_BUDGET:-900}"
CPU_TEST="${SMOL_CPU_TEST:-0}"
PORT=30100                    # first server; the others take the next ports
SERVERS="${SMOL_SERVERS:-3}"
read -r -a SERVER_GPUS <<< "${SMOL_SERVER_GPUS:-}"
MAX_NEW_TOKENS=512
CONCURRENCY="${SMOL_CONCURRENCY:-384}"
TARGET="$SMOL/target"
DRAFTER="$SMOL/drafter"
DATA="$SMOL/data.jsonl"
PROMPTS="$SMOL/smollm2_prompts.jsonl"
MASK_TOKEN="<empty_output>"   # SmolLM2 special token (a notebook marker) chat answers have no use for; checked below
RESERVE_FINAL=70              # seconds kept after training: imports, final estimate, export, copies

rm -rf "$RESULT" "$DRAFTER" "$DATA"
mkdir -p "$RESULT"
exec > >(tee -a "$RESULT/run.log") 2>&1
SERVER_PIDS=()
stop_server() {
  local pid
  for pid in "${SERVER_PIDS[@]}"; do
    kill -TERM -- "-$pid" 2>/dev/null || true   # its own session: scheduler and detokenizer go too
  done
  for pid in "${SERVER_PIDS[@]}"; do
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  done
  SERVER_PIDS=()
}
finish() {
  local rc=$?
  stop_server
  echo "$rc" > "$RESULT/exit_code"
  echo "train_smollm2: exit code $rc after $((SECONDS))s"
  collect
}
trap finish EXIT
TIMINGS="$RESULT/timings.jsonl"
mark() { echo "{\"phase\": \"$1\", \"seconds\": $SECONDS}" >> "$TIMINGS"; echo "== [$SECONDS s] $1"; }
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TQDM_MININTERVAL=15
DFLASH=(python3 -m dflash_sglang)

if [ "$CPU_TEST" = 1 ]; then
  # Tiny random Llama with the Qwen3 tokenizer (ChatML, like SmolLM2's): same commands, CPU-sized settings.
  "${DFLASH[@]}" make-tiny --arch llama --out "$SMOL/tiny" --draft-layers 3 > /dev/null
  rm -rf "$TARGET" && cp -r "$SMOL/tiny/target" "$TARGET"
  head -n "${SMOL_CPU_PROMPTS:-12}" "${SMOL_PROMPTS:-$PROMPTS}" > "$SMOL/cpu_prompts.jsonl"
  PROMPTS="$SMOL/cpu_prompts.jsonl"
  MASK_TOKEN="<|box_end|>"
  mark "tiny target"
  "${DFLASH[@]}" regenerate --target "$TARGET" --prompts "$PROMPTS" --chat --out "$DATA" --max-new-tokens 24 \
    --batch-size 4 --stats "$RESULT/regen_stats.json"
  mark "regenerated (reference engine)"
  TRAIN_HW=(--device cpu --dtype float32 --batch-size 4 --num-anchors 8 --max-seq-len 512 --epochs 2
            --num-eval-prompts 2 --eval-max-new-tokens 8)
  DRAFT_LAYERS=3  # the tiny target has 4
else
  if [ ! -e "$SMOL/.ready" ]; then
    echo "error: $SMOL is not ready on this machine: source .device-smol1/unpack.sh .. .device-smol4/unpack.sh" \
      "in back-to-back commands first (scripts/prepare_smollm2.sh says which folder travels with which)" >&2
    exit 1
  fi
  if ! python3 -c "import sglang" 2>/dev/null; then
    echo "error: sglang is not importable: start the command with 'source .device/unpack.sh'" >&2
    exit 1
  fi
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader || true

  # 1. GGUF -> bf16 checkpoint (the GGUF readers live in /tmp/smol/site; only this step needs them).
  PYTHONPATH="$SMOL/site:$PYTHONPATH" "${DFLASH[@]}" convert-gguf --gguf "$SMOL/smollm2.gguf" --out "$TARGET" \
    --dtype bfloat16
  mark "converted"

  # 2. Plain decoding: SERVERS servers on ports PORT.. sharing the GPU, each with its share of the requests. The
  #    KV pools are capped (--max-total-tokens: each server's requests x (prompt + 512) fit with room; SmolLM2's
  #    KV is 23 KB/token) instead of taking a fraction of the whole card. --mem-fraction-static 0.85 only relaxes
  #    SGLang's startup check (it then needs 15% of the card free beyond what it takes), it does not size a pool.
  #    Fixed NCCL ports: servers starting together could draw the same free port.
  PER_SERVER=$(( (CONCURRENCY + SERVERS - 1) / SERVERS ))
  URLS=""
  for i in $(seq 0 $((SERVERS - 1))); do
    GPU_ENV=()
    [ "${#SERVER_GPUS[@]}" -gt 0 ] && GPU_ENV=(env CUDA_VISIBLE_DEVICES="${SERVER_GPUS[$((i % ${#SERVER_GPUS[@]}))]}")
    setsid "${GPU_ENV[@]}" python3 -m sglang.launch_server --model-path "$TARGET" --dtype bfloat16 --attention-backend triton \
      --sampling-backend pytorch --disable-prefill-cuda-graph --mem-fraction-static 0.85 \
      --max-total-tokens $(( PER_SERVER * 1536 )) --max-running-requests "$PER_SERVER" \
      --cuda-graph-max-bs "$PER_SERVER" --host 127.0.0.1 --port $((PORT + i)) --nccl-port $((PORT + 50 + i)) \
      --log-level warning > "$RESULT/server$i.log" 2>&1 &
    SERVER_PIDS+=($!)
    URLS="$URLS${URLS:+,}http://127.0.0.1:$((PORT + i))"
  done
  for i in $(seq 0 $((SERVERS - 1))); do
    if ! python3 "$REPO/scripts/device/e2e_client.py" wait --port $((PORT + i)) --pid "${SERVER_PIDS[$i]}" \
        --timeout 240; then
      echo "error: SGLang server $i did not come up; last lines of its log:" >&2
      tail -n 40 "$RESULT/server$i.log" >&2
      exit 1
    fi
  done
  mark "server up"

  # 3. Answers. Requests still unsent when the deadline passes are skipped (and counted in the stats), so that
  #    at least TRAIN_MIN seconds are left for training whatever the regeneration speed turns out to be.
  TRAIN_MIN="${SMOL_TRAIN_MIN:-480}"
  REGEN_DEADLINE=$(( BUDGET - SECONDS - TRAIN_MIN - RESERVE_FINAL - 20 ))
  if [ "$REGEN_DEADLINE" -lt 30 ]; then
    echo "error: only $((BUDGET - SECONDS))s of the ${BUDGET}s budget left before regeneration" >&2
    exit 1
  fi
  REGEN_RC=0
  "${DFLASH[@]}" regenerate --target "$TARGET" --prompts "$PROMPTS" --chat --out "$DATA" \
    --max-new-tokens "$MAX_NEW_TOKENS" --server "$URLS" --concurrency "$CONCURRENCY" --timeout 120 \
    --deadline-seconds "$REGEN_DEADLINE" --stats "$RESULT/regen_stats.json" || REGEN_RC=$?
  stop_server
  mark "regenerated (SGLang)"
  # A few failed requests (reported above and in the stats) do not spoil the data; many mean something is wrong.
  python3 - "$RESULT/regen_stats.json" "$REGEN_RC" <<'EOF'
import json, sys
stats, rc = json.load(open(sys.argv[1])), int(sys.argv[2])
if stats["records"] < 1000 or stats["failed"] > 0.01 * stats["prompts"]:
    sys.exit(f"error: regeneration gave {stats['records']} records, {stats['failed']} failed (exit code {rc}): "
             f"see server.log and the errors in regen_stats.json")
EOF

  # Hyper-parameters for a 135M target on an H200, a run of several minutes:
  # - 128 anchors per sequence, batch 16: answers are <= 512 tokens (~280 on average), so 512 anchors would make
  #   every answer token an anchor, every epoch;
  #   128 blocks x 16 rows = 2048 query rows per sequence, 32k per step -- still big enough matmuls to fill the
  #   GPU, and twice the optimizer steps of batch 32 in the same minutes (the first run, at 32, got 0.49 s a
  #   step: a short run is step-bound, not gradient-noise-bound).
  # - lr 1e-3 (recipe: 6e-4 for 8B drafters over 6 epochs): a short run of a small drafter whose layers start
  #   from the target's own; the demo pair was trained the same way at 1e-3.
  # - max-seq-len 1024: prompts are <= 1200 characters (~300 tokens) + 512 answer tokens.
  # - up to 6 epochs: time ends the run (--max-minutes re-plans the cosine to the steps that fit). Training time is
  #   worth more than answers beyond ~20k: on the demo target, at equal steps, 2,400 answers x 1 epoch did no
  #   better than 800 x 3 (docs/results/ablation-2026-11-29e/), so TRAIN_MIN (8 minutes) comes first and the
  #   regeneration answers what fits before it.
  # - soft labels 1.0: each row learns the target's whole next-token distribution, not only its greedy token; on
  #   the demo target with 800 answers it raised held-out acceptance in 4 of 4 seeds (1.35 -> 1.43).
  # - gamma 1.5 instead of the published 7: while acceptance is short, the first block rows are what counts. On
  #   the demo target (soft labels): gamma 7 / 5 / 3 / 1.5 / 1 / 0.7 -> 1.33 / 1.40 / 1.48 / 1.59 / 1.58 / 1.58
  #   after 300 steps, and 1.94 (gamma 3) vs 2.12 (gamma 1.5) after 900 (docs/results/ablation-2026-11-29e/).
  # - 16 held-out records, 256 tokens each, for the final acceptance estimate (the real engine's greedy chain).
  # - 5 draft layers (5 target features), as the published drafters have: on 2026-11-30 (eighth session), side by
  #   side from the same 32k answers under the same 539 s, 5 layers made 4,540 steps to 3 layers' 6,509 and still
  #   reached the higher held-out estimate (2.28 against 2.10).
  TRAIN_HW=(--device cuda --dtype bfloat16 --batch-size 16 --num-anchors 128 --max-seq-len 1024 --epochs 6
            --soft-labels 1 --gamma 1.5 --num-eval-prompts 16 --eval-max-new-tokens 256)
  DRAFT_LAYERS=5
fi

# 4. Mask token: a special token of the tokenizer that no prompt and no answer contains.
MASK_ID=$(python3 - "$TARGET" "$DATA" "$MASK_TOKEN" <<'EOF'
import json, sys
from transformers import AutoTokenizer
target, data, token = sys.argv[1:]
tok = AutoTokenizer.from_pretrained(target)
specials = {t: i for t, i in zip(tok.all_special_tokens, tok.all_special_ids)}
specials.update({t.content: i for i, t in tok.added_tokens_decoder.items() if t.special})
if token not in specials:
    sys.exit(f"error: mask token {token!r} is not a special token of {target}; special tokens: {sorted(specials)}")
used = set()
for line in open(data):
    row = json.loads(line)
    used.update(row["prompt_ids"])
    used.update(row["output_ids"])
free = sorted(t for t, i in specials.items() if i not in used and i != tok.eos_token_id)
if specials[token] in used:
    sys.exit(f"error: mask token {token!r} (id {specials[token]}) occurs in the training data; set MASK_TOKEN to "
             f"one of the unused special tokens: {free}")
print(specials[token])
EOF
)
echo "mask token: $MASK_TOKEN (id $MASK_ID), absent from every prompt and answer"
mark "mask token checked"

# 5. Training under the cap; the final checkpoint, drafter and acceptance estimate come after it.
MAX_MINUTES=$(python3 -c "print(round(max(0.2, min($BUDGET - $SECONDS - $RESERVE_FINAL, ${SMOL_TRAIN_MAX:-600}) / 60), 2))")
echo "training for at most $MAX_MINUTES minutes"
# Expandable segments: batches of many lengths would otherwise fragment the caching allocator's fixed segments.
TRAIN=(env PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True "${DFLASH[@]}" train --target "$TARGET" --data "$DATA"
       --draft-layers "$DRAFT_LAYERS" --init-from-target --block-size 16 --mask-token-id "$MASK_ID" --lr 1e-3
       --eval-every 0 --save-every 0 --max-minutes "$MAX_MINUTES" "${TRAIN_HW[@]}")
read -r -a VARIANT_ARGS <<< "${SMOL_VARIANT_ARGS:-}"
VARIANT_PID=""
if [ "${#VARIANT_ARGS[@]}" -gt 0 ]; then
  echo "variant drafter on GPU ${SMOL_VARIANT_GPU:-0} beside the recipe's: ${VARIANT_ARGS[*]}"
  CUDA_VISIBLE_DEVICES="${SMOL_VARIANT_GPU:-0}" "${TRAIN[@]}" --out "$SMOL/drafter-variant" "${VARIANT_ARGS[@]}" \
    > "$RESULT/variant_summary.json" 2> "$RESULT/variant_train.log" &
  VARIANT_PID=$!
fi
"${TRAIN[@]}" --out "$DRAFTER" | tee "$RESULT/train_summary.json"
mark "trained"
if [ -n "$VARIANT_PID" ]; then
  if wait "$VARIANT_PID"; then
    mark "variant trained"
    # The drafter with the higher held-out estimate is the one served from here on.
    SELECTED=$(python3 - "$RESULT/train_summary.json" "$RESULT/variant_summary.json" <<'EOF'
import json, sys
recipe, variant = (json.loads(open(path).read().strip().splitlines()[-1])["acceptance"] for path in sys.argv[1:])
print("variant" if variant > recipe else "recipe")
EOF
)
    WHY="the higher held-out acceptance estimate"
  else
    # A failed comparison must not cost the run its drafter: the recipe's serves.
    echo "warning: the variant's training failed (the recipe's drafter is kept); its log ends:"
    tail -n 20 "$RESULT/variant_train.log"
    echo '{"failed": true}' > "$RESULT/variant_summary.json"
    SELECTED=recipe WHY="the variant failed"
  fi
  if [ "$SELECTED" = variant ]; then
    rm -rf "$SMOL/drafter-recipe"
    mv "$DRAFTER" "$SMOL/drafter-recipe" && mv "$SMOL/drafter-variant" "$DRAFTER"
  fi
  echo "selected: the $SELECTED's drafter ($WHY)"
  echo "$SELECTED" > "$RESULT/selected.txt"
fi
"${DFLASH[@]}" check --target "$TARGET" --drafter "$DRAFTER"

# 6. Results.
mark "results"
cp "$DRAFTER/train_log.jsonl" "$RESULT/"
for other in recipe variant; do
  [ -f "$SMOL/drafter-$other/train_log.jsonl" ] &&
    cp "$SMOL/drafter-$other/train_log.jsonl" "$RESULT/train_log-$other.jsonl"
done
tar -C "$SMOL" -cf - drafter/config.json drafter/model.safetensors | split -b 15M -d - "$RESULT/drafter.tar.part"
python3 - "$RESULT" "$BUDGET" "$MASK_TOKEN" "$MASK_ID" "$SECONDS" "${SMOL_VARIANT_ARGS:-}" <<'EOF'
import json, sys
from pathlib import Path
result, mask_token = Path(sys.argv[1]), sys.argv[3]
budget, mask_id, seconds = int(sys.argv[2]), int(sys.argv[4]), int(sys.argv[5])
summary = {
    "budget_s": budget, "elapsed_s": seconds, "mask_token": mask_token, "mask_token_id": mask_id,
    "timings": [json.loads(line) for line in (result / "timings.jsonl").read_text().splitlines()],
    "regen": json.loads((result / "regen_stats.json").read_text()),
    "train": json.loads((result / "train_summary.json").read_text().strip().splitlines()[-1]),
}
if (result / "variant_summary.json").exists():
    summary["variant"] = json.loads((result / "variant_summary.json").read_text().strip().splitlines()[-1])
    summary["variant"]["extra_args"] = sys.argv[6]
    summary["selected"] = (result / "selected.txt").read_text().strip()
(result / "summary.json").write_text(json.dumps(summary, indent=1))
for name in ("timings.jsonl", "regen_stats.json", "train_summary.json", "variant_summary.json", "selected.txt"):
    (result / name).unlink(missing_ok=True)
print(json.dumps({k: summary[k] for k in ("elapsed_s", "regen", "train", "variant", "selected") if k in summary}))
EOF
echo "ok: drafter in $DRAFTER, results in $RESULT" > "$RESULT/DONE"
