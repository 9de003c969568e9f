#!/usr/bin/env bash
# Here: cut .device/sglang-site.tar.xz (../shared/device/build_site.sh) into two halves for scripts/device/site.sh,
# .device-site1/sglang-site.tar.xz.part00 and .device-site2/sglang-site.tar.xz.part01 (ignored by git through the
# `/.device*/` rule), so that no device command has to carry the whole site beside the working tree.
#   usage: bash scripts/split_device_site.sh [TARBALL]     (default .device/sglang-site.tar.xz)
#   env:   SITE_PAYLOAD_ROOT=DIR  where the two folders go (default: the repository root)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
TARBALL="${1:-$REPO/.device/sglang-site.tar.xz}"
ROOT="${SITE_PAYLOAD_ROOT:-$REPO}"
[ -s "$TARBALL" ] || { echo "error: no $TARBALL: build it with ../shared/device/build_site.sh .device" >&2; exit 1; }
size=$(stat -c %s "$TARBALL")
half=$(( (size + 1) / 2 ))
for n in 1 2; do rm -rf "$ROOT/.device-site$n"; mkdir -p "$ROOT/.device-site$n"; done
head -c "$half" "$TARBALL" > "$ROOT/.device-site1/sglang-site.tar.xz.part00"
tail -c +"$(( half + 1 ))" "$TARBALL" > "$ROOT/.device-site2/sglang-site.tar.xz.part01"
if ! cat "$ROOT"/.device-site1/*.part00 "$ROOT"/.device-site2/*.part01 | cmp -s - "$TARBALL"; then
  echo "error: the halves do not join back into $TARBALL" >&2; exit 1
fi
du -b "$ROOT"/.device-site?/* | sed 's/^/half bytes: /'
