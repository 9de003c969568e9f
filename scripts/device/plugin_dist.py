"""Make SGLang find our plugin without pip: dist-info folders whose entry points come from pyproject.toml.

    python3 scripts/device/plugin_dist.py OUT_DIR [--harness]

The GPU box has no package registry: the device scripts put the repo and OUT_DIR on PYTHONPATH, and
importlib.metadata (SGLang's plugin discovery) then sees dflash-sglang's `sglang.srt.plugins` entry point.
--harness adds the test-harness plugins (scripts/device/native_ops_plugin.py for float32,
triton_swa_window_plugin.py for the AR reference of sliding-window targets and host_sampler_plugin.py for host
profiles, each inert unless its variable is set; they must be importable: scripts/device on PYTHONPATH) as a
distribution of their own. Before exiting it checks what a server will need: the
installed SGLang is the supported one and the entry point is discoverable from OUT_DIR (exit 1 otherwise); on a
GPU machine it then builds our CUDA kernels into the cache the servers read (DFLASH_KERNEL_CACHE, else the default).
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from importlib.metadata import entry_points
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
HARNESS_ENTRY_POINTS = {"sglang.srt.plugins": {"dflash_e2e_native_ops": "native_ops_plugin:register",
                                                "dflash_e2e_triton_swa_window": "triton_swa_window_plugin:register",
                                                "dflash_host_sampler": "host_sampler_plugin:register"}}


def write_dist_info(out: Path, name: str, version: str, entry_points: dict[str, dict[str, str]]) -> None:
    info = out / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    lines = []
    for group, entries in entry_points.items():
        lines += [f"[{group}]"] + [f"{key} = {target}" for key, target in entries.items()] + [""]
    (info / "entry_points.txt").write_text("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--harness", action="store_true", help="also the test-harness plugins")
    args = parser.parse_args()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    write_dist_info(args.out, project["name"], project["version"], project["entry-points"])
    if args.harness:
        write_dist_info(args.out, "dflash-e2e-harness", "0", HARNESS_ENTRY_POINTS)

    sys.path[:0] = [str(REPO), str(args.out)]
    from dflash_sglang.sglang.compat import check_sglang_version

    check_sglang_version()
    expected = project["entry-points"]["sglang.srt.plugins"]["dflash_sglang"]
    found = [ep.value for ep in entry_points(group="sglang.srt.plugins") if ep.name == "dflash_sglang"]
    if found != [expected]:
        sys.exit(f"dflash_sglang's entry point is not discoverable from {args.out}: found {found}")
    print("dflash_sglang plugin discoverable:", found[0])
    build_kernels()


def build_kernels() -> None:
    """Our CUDA library into the kernel cache before any server starts: servers then load it instead of each
    compiling it at its first request (~10 s). A failed build is reported, not fatal: the ops fall back to their
    torch references and say so in the server log."""
    import torch

    if not torch.cuda.is_available():
        return
    from dflash_sglang.kernels.__main__ import main as kernels_main

    if kernels_main(["build"]) != 0:
        print("dflash kernels: servers will run the torch references")


if __name__ == "__main__":
    main()
