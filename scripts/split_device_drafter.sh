#!/usr/bin/env bash
# Here: cut the SmolLM2 drafter (.device-drafter: config.json + model.safetensors, 38.7 MB, what
# scripts/device/bench.sh serves as /tmp/smol/drafter) into two folders, .device-drafter1 and .device-drafter2
# (ignored by git through the `/.device*/` rule), each with an unpack.sh. Why: on 2026-11-30 the working tree
# (28.2 MB) plus the whole drafter passed the 64 MiB one device command may carry.
# On the box, one command each:  source .device-drafter1/unpack.sh   then   source .device-drafter2/unpack.sh
# The second joins the weights into /tmp/smol/drafter/ and checks their sha256.
#   usage: bash scripts/split_device_drafter.sh [DRAFTER_DIR]     (default .device-drafter)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
SRC="${1:-$REPO/.device-drafter}"
weights="$SRC/model.safetensors"
if [ ! -s "$weights" ] || [ ! -s "$SRC/config.json" ]; then
  echo "error: $SRC needs config.json and model.safetensors" >&2; exit 1
fi
sha=$(sha256sum "$weights" | cut -d' ' -f1)
size=$(stat -c %s "$weights")
half=$(( (size + 1) / 2 ))
for n in 1 2; do rm -rf "$REPO/.device-drafter$n"; mkdir -p "$REPO/.device-drafter$n"; done
head -c "$half" "$weights" > "$REPO/.device-drafter1/model.safetensors.part00"
tail -c +"$(( half + 1 ))" "$weights" > "$REPO/.device-drafter2/model.safetensors.part01"
cp "$SRC/config.json" "$REPO/.device-drafter1/"
for n in 1 2; do
  cat > "$REPO/.device-drafter$n/unpack.sh" <<EOF
# Source on the GPU box: source .device-drafter$n/unpack.sh   (written by scripts/split_device_drafter.sh)
# Stores this half of the drafter in /tmp/smol/drafter-parts; with both there, joins them into /tmp/smol/drafter.
_dr_src="\$(dirname "\${BASH_SOURCE[0]}")"
mkdir -p /tmp/smol/drafter-parts /tmp/smol/drafter
cp "\$_dr_src"/model.safetensors.part?? /tmp/smol/drafter-parts/
[ -e "\$_dr_src/config.json" ] && cp "\$_dr_src/config.json" /tmp/smol/drafter/
_dr_parts=/tmp/smol/drafter-parts/model.safetensors.part
_dr_sha=$sha
if [ -s \${_dr_parts}00 ] && [ -s \${_dr_parts}01 ]; then
  cat \${_dr_parts}0{0,1} > /tmp/smol/drafter/model.safetensors
  if [ "\$(sha256sum /tmp/smol/drafter/model.safetensors | cut -d' ' -f1)" = "\$_dr_sha" ]; then
    echo "drafter ready (/tmp/smol/drafter)"
  else
    rm -f /tmp/smol/drafter/model.safetensors /tmp/smol/drafter-parts/*
    echo "error: the joined drafter failed its sha256 check (parts removed; send both halves again)" >&2
  fi
else
  echo "drafter: half stored in /tmp/smol/drafter-parts; send the other folder (.device-drafter1 or 2)"
fi
EOF
done
du -b "$REPO"/.device-drafter?/* | sed 's/^/bytes: /'
