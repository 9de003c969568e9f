#!/usr/bin/env bash
# The JIT caches SGLang's servers fill on a fresh box, kept from one device session for the next: Triton's compiled
# kernels (~/.triton/cache) and SGLang's TVM-FFI JIT modules (~/.cache/tvm-ffi, or $TVM_FFI_CACHE_DIR). On
# 2026-11-30 six SmolLM2 servers on a fresh box spent 63 s in their first CUDA-graph capture compiling these, on
# the training chain's critical path (up 156 s after the conversion); servers started later on the same box, with
# the caches warm, were up in ~60 s.
#   pack DIR     the caches as DIR/jit-cache.tar.xz.partNN (15 MiB parts) and DIR/jit-cache.txt (what went in);
#                nothing but the .txt when the archive would exceed MAX_MB (default 24: it travels next session with
#                .device-site1, 23.5 MB, and the ~19 MB working tree, under the runner's 64 MiB)
#   restore DIR  unpack DIR/jit-cache.tar.xz.part* into place, keeping files already there
# Entries cannot go stale: Triton keys each kernel by its source, the Triton version and the GPU target, TVM-FFI
# each module by its sources' hash and the arch, so an entry from another stack is never hit, only unused.
#
#   usage: bash scripts/device/jit_cache.sh pack "$OUT/jitcache"      (at the end of a session's last command)
#          here: mkdir -p .device-cache && cp <unpacked results>/jitcache/jit-cache.tar.xz.part* .device-cache/
#          bash scripts/device/jit_cache.sh restore .device-cache      (in an early command that carries it)
set -uo pipefail
VERB="${1:-}"
DIR="${2:-}"
MAX_MB="${MAX_MB:-24}"
TVM_DIR="${TVM_FFI_CACHE_DIR:-$HOME/.cache/tvm-ffi}"
[ -n "$DIR" ] || { echo "usage: jit_cache.sh pack|restore DIR" >&2; exit 2; }

case "$VERB" in
  pack)
    mkdir -p "$DIR"
    members=()
    for path in "$HOME/.triton/cache" "$TVM_DIR"; do
      [ -d "$path" ] && members+=("$path")
    done
    if [ "${#members[@]}" = 0 ]; then
      echo "jit_cache: no cache on this machine" | tee "$DIR/jit-cache.txt"; exit 0
    fi
    archive="$(mktemp -d /tmp/jitcache.XXXXXX)/jit-cache.tar.xz"
    # Fast xz on every core, under a time cap: this runs at the end of a command the runner stops at 600 s.
    if ! XZ_OPT="-2 -T0" timeout "${PACK_SECONDS:-60}" tar -cJf "$archive" -P "${members[@]}"; then
      echo "jit_cache: not packed (tar failed or took over ${PACK_SECONDS:-60}s)" | tee "$DIR/jit-cache.txt"
      rm -rf "$(dirname "$archive")"; exit 0
    fi
    size_mb=$(( $(stat -c %s "$archive") / 1048576 ))
    { du -sh "${members[@]}"; echo "archive: ${size_mb} MiB compressed (limit ${MAX_MB})"; } > "$DIR/jit-cache.txt"
    if [ "$size_mb" -le "$MAX_MB" ]; then
      split -b 15M -d "$archive" "$DIR/jit-cache.tar.xz.part"
    else
      echo "not packed: over the limit" >> "$DIR/jit-cache.txt"
    fi
    rm -rf "$(dirname "$archive")"
    cat "$DIR/jit-cache.txt"
    ;;
  restore)
    parts=("$DIR"/jit-cache.tar.xz.part*)
    [ -e "${parts[0]}" ] || { echo "jit_cache: no jit-cache.tar.xz.part* in $DIR"; exit 0; }
    # -P: the archive holds absolute paths (the caches' own places on the box).
    cat "${parts[@]}" | tar -xJP --skip-old-files -f - || { echo "jit_cache: restore failed" >&2; exit 1; }
    echo "jit_cache: restored $(cat "${parts[@]}" | tar -tJ -f - 2>/dev/null | wc -l) entries"
    ;;
  *) echo "usage: jit_cache.sh pack|restore DIR" >&2; exit 2 ;;
esac
