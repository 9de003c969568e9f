#!/usr/bin/env bash
# Last step of a device command: at most 8 files come back from $OUT (16 MiB each, 2 folders deep), so everything
# the command left there goes into one xz tarball, cut into 15 MiB parts, next to a copy of SUMMARY (the text the
# command printed last, if it saved it there). Unpack here with:  cat results.tar.xz.part* | tar -xJ
#   usage: bash scripts/device/pack_out.sh [SUMMARY_FILE]
set -uo pipefail
OUT="${OUT:?OUT is the folder the device runner sends back}"
bundle="$(mktemp -d /tmp/pack.XXXXXX)"
tar -C "$OUT" -cJf "$bundle/results.tar.xz" . || { echo "pack_out: tar failed" >&2; exit 1; }
summary="${1:-}"
[ -n "$summary" ] && [ -f "$summary" ] && cp "$summary" "$bundle/summary.txt"
find "$OUT" -mindepth 1 -delete
split -b 15M -d "$bundle/results.tar.xz" "$OUT/results.tar.xz.part"
[ -f "$bundle/summary.txt" ] && cp "$bundle/summary.txt" "$OUT/"
parts=$(ls "$OUT"/results.tar.xz.part* | wc -l)
echo "pack_out: $(du -h "$bundle/results.tar.xz" | cut -f1) in $parts part(s) under \$OUT"
[ "$parts" -le 7 ] || echo "pack_out: WARNING: more than 7 parts; only 8 files come back" >&2
rm -rf "$bundle"
