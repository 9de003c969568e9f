"""`python -m dflash_sglang.kernels build [--arch 90a] [--verbose]`: compile the CUDA library into the cache."""

from __future__ import annotations

import argparse
import sys
import time

from dflash_sglang.kernels import jit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dflash_sglang.kernels")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="compile csrc/ for one architecture into the kernel cache")
    build.add_argument("--arch", default=None, help="e.g. 90a or 80 (default: DFLASH_CUDA_ARCH, the GPU's, else 90a)")
    build.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = parser.parse_args(argv)

    arch = args.arch or jit.target_arch()
    start = time.perf_counter()
    try:
        library = jit.build(arch, verbose=args.verbose)
    except Exception as exc:
        print(f"dflash kernels: build for sm_{arch} failed: {exc}", file=sys.stderr)
        return 1
    print(f"dflash kernels: sm_{arch} library {library} ({time.perf_counter() - start:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
