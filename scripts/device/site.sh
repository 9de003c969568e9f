# SGLang's site (sglang 0.5.16 and what the box's image lacks, ../shared/device/build_site.sh's
# sglang-site.tar.xz, ~47 MB) in two halves that travel in separate device commands, and the environment that
# serves from it. Source it on the box, from the repository root:
#
#   source scripts/device/site.sh .device-site1      (one command: stores its half in /tmp/site)
#   source scripts/device/site.sh .device-site2      (a later one: joins, unpacks, then as below)
#   source scripts/device/site.sh                    (any later command on the warm machine: carries nothing)
#
# Why: `.device` (the whole tarball) plus the working tree must stay under the runner's 64 MiB, and the tree grows
# with every session's committed results (66.1 of 67.1 MB on 2026-11-30). The halves come from
# scripts/split_device_site.sh. The marker is .device/unpack.sh's, so either way of unpacking serves the other.
# Ends with "sglang 0.5.16 ready" or with what is still missing (a fresh machine keeps nothing).
_site_dir="${DFLASH_SITE_DIR:-/tmp/site}"
_site_done="$_site_dir/.sglang-site.tar.xz.done"
mkdir -p "$_site_dir"
for _site_src in "$@"; do
  for _site_part in "$_site_src"/sglang-site.tar.xz.part??; do
    [ -e "$_site_part" ] || continue
    [ -e "$_site_done" ] || cp -n "$_site_part" "$_site_dir/"
  done
done
if [ ! -e "$_site_done" ] && [ -s "$_site_dir/sglang-site.tar.xz.part00" ] \
    && [ -s "$_site_dir/sglang-site.tar.xz.part01" ]; then
  cat "$_site_dir"/sglang-site.tar.xz.part0{0,1} | tar -C "$_site_dir" -xJf - && touch "$_site_done"
  rm -f "$_site_dir"/sglang-site.tar.xz.part??
fi
if [ -e "$_site_done" ]; then
  # PYTHONPATH skips .pth files (the CuTe DSL needs its own): site.addsitedir runs them; keep the paths they add.
  _site_x=$(python3 -c "import site, sys; b = set(sys.path); site.addsitedir('$_site_dir')
print(':'.join(p for p in sys.path if p not in b and p != '$_site_dir'))" 2>/dev/null)
  case ":${PYTHONPATH:-}:" in
    *":$_site_dir:"*) ;;
    *) export PYTHONPATH="$_site_dir${_site_x:+:$_site_x}${PYTHONPATH:+:$PYTHONPATH}" ;;
  esac
  export PYTHONUNBUFFERED=1
  python3 -c "import sglang; print('sglang', sglang.__version__, 'ready')" 2>/dev/null ||
    echo "error: $_site_dir is unpacked but sglang does not import" >&2
else
  _site_missing=""
  for _site_n in 0 1; do
    [ -s "$_site_dir/sglang-site.tar.xz.part0$_site_n" ] || _site_missing="$_site_missing .device-site$((_site_n + 1))"
  done
  echo "sglang site: still missing the half in$_site_missing (send it with this script; a fresh machine keeps nothing)"
fi
