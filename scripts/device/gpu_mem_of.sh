#!/usr/bin/env bash
# GPU memory (MiB) held by the processes of one session -- a server started with setsid, whose session id is its
# launcher's pid -- one number per process, for soak.py --gpu-mem-cmd when other work shares the GPU.
# Exits 1 when nvidia-smi lists none of them (e.g. a container that hides process ids), so nothing passes unseen.
#   usage: bash scripts/device/gpu_mem_of.sh SESSION_ID
set -uo pipefail
pids=$(ps -o pid= --sid "$1" | tr -d ' ')
found=0
while IFS=', ' read -r pid mem; do
  if grep -qx "$pid" <<<"$pids"; then echo "$mem"; found=1; fi
done < <(nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader,nounits)
[ "$found" = 1 ]
