"""Build, cache and load the CUDA kernels of `csrc/` as one torch extension library, and pick the implementation.

The library (`torch.ops.dflash_sglang.*`) is compiled on first use with `torch.utils.cpp_extension` (nvcc for
the kernels, the host compiler for the op bindings) into a cache directory keyed by a hash of the sources, the
target architecture, the flags and the torch/CUDA versions; a later process loads the cached `.so` without a
compiler. `python -m dflash_sglang.kernels build` does the same ahead of time (CI, images).

Environment:
    DFLASH_KERNELS       `auto` (default): the kernels for CUDA tensors when the library loads, else the torch
                         reference; `reference`: always the reference; `cuda`: the kernels or an error.
    DFLASH_KERNELS_REFERENCE_OPS  comma-separated op names that run their reference whatever the mode (ops whose
                         GPU tests failed on this machine: scripts/device/kernel_gate.py names them).
    DFLASH_KERNEL_CACHE  cache directory (default `$XDG_CACHE_HOME/dflash_sglang/kernels`, else
                         `~/.cache/dflash_sglang/kernels`).
    DFLASH_CUDA_ARCH     target architecture such as `90a` or `80` (default: the current GPU's, else `90a`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import torch

logger = logging.getLogger("dflash_sglang.kernels")

CSRC_DIR = Path(__file__).resolve().parents[2] / "csrc"
SOURCES = ("dflash_binding.cpp", "tree_build.cu", "verify_inputs.cu", "tree_verify.cu", "commit.cu", "context_kv.cu",
           "chain_step.cu")
HEADERS = ("dflash_kernels.h",)
# Every op with a kernel, in step order (the names `use_kernel` is called with).
OPS = ("build_draft_tree", "tree_verify_inputs", "verify_tree_greedy", "verify_tree_sampling", "commit_tree",
       "chain_block", "chain_accept_greedy", "context_kv_norm_rope", "context_kv_to_pool")
HOST_FLAGS = ("-O3", "-std=c++17")
CUDA_FLAGS = ("-O3", "-std=c++17")


def target_arch() -> str:
    """`DFLASH_CUDA_ARCH`, else the current GPU (`90a` on Hopper, whose arch-specific target is our first), else 90a."""
    if arch := os.environ.get("DFLASH_CUDA_ARCH"):
        return arch
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return "90a" if (major, minor) == (9, 0) else f"{major}{minor}"
    return "90a"


def cuda_flags(arch: str) -> list[str]:
    return [*CUDA_FLAGS, f"-gencode=arch=compute_{arch},code=sm_{arch}"]


def cache_dir() -> Path:
    if path := os.environ.get("DFLASH_KERNEL_CACHE"):
        return Path(path)
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "dflash_sglang" / "kernels"


def library_name(arch: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(SOURCES + HEADERS):
        digest.update(name.encode() + b"\0" + (CSRC_DIR / name).read_bytes())
    for part in (arch, *HOST_FLAGS, *cuda_flags(arch), torch.__version__, str(torch.version.cuda)):
        digest.update(part.encode() + b"\0")
    return f"dflash_kernels_sm{arch}_{digest.hexdigest()[:16]}"


def _find_toolkit(cpp_extension) -> None:
    """Point torch at the CUDA toolkit that `nvcc` on PATH belongs to.

    torch guesses CUDA_HOME as the parent of the directory holding `nvcc`, which is wrong for wrapper scripts such
    as /usr/local/bin/nvcc exec'ing /usr/local/cuda-13.0/bin/nvcc; nvcc's dry run names its real root.
    """
    home = cpp_extension.CUDA_HOME
    if home and (Path(home) / "include" / "cuda_runtime.h").exists():
        return
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    dry_run = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull, "-o", os.devnull],
                             capture_output=True, text=True, check=False)
    top = re.search(r"^#\$ TOP=(.+)$", dry_run.stdout + dry_run.stderr, re.MULTILINE)
    if top is None or not (Path(top.group(1)) / "include" / "cuda_runtime.h").exists():
        raise RuntimeError(f"cannot locate the CUDA toolkit of {nvcc} (set CUDA_HOME)")
    cpp_extension.CUDA_HOME = str(Path(top.group(1)).resolve())


def build(arch: str | None = None, verbose: bool = False) -> Path:
    """Compile the library for `arch` into the cache (no-op when it is there) and load it; returns the `.so`."""
    from torch.utils import cpp_extension

    arch = arch or target_arch()
    name = library_name(arch)
    build_dir = cache_dir() / name
    library = build_dir / f"{name}.so"
    if not library.exists():
        _find_toolkit(cpp_extension)
        if not cpp_extension.is_ninja_available():
            raise RuntimeError("ninja not found (torch.utils.cpp_extension needs it)")
        build_dir.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(
            name=name,
            sources=[str(CSRC_DIR / s) for s in SOURCES],
            extra_cflags=list(HOST_FLAGS),
            extra_cuda_cflags=cuda_flags(arch),
            extra_include_paths=[str(CSRC_DIR)],
            build_directory=str(build_dir),
            is_python_module=False,
            verbose=verbose,
        )
    return _load(library)


@functools.cache
def _load(library: Path) -> Path:
    # The ops register under one namespace, which a process can hold only once.
    if not hasattr(torch.ops.dflash_sglang, "build_tree"):
        torch.ops.load_library(str(library))
    return library


@functools.cache
def kernel_status() -> tuple[bool, str]:
    """(whether the CUDA kernels can run here, why): builds or loads the library on first call."""
    if os.environ.get("DFLASH_KERNELS", "auto") == "reference":
        return False, "DFLASH_KERNELS=reference"
    if not torch.cuda.is_available():
        return False, "no CUDA device"
    arch = target_arch()
    try:
        library = build(arch)
    except Exception as exc:  # a missing or broken toolchain must not stop the reference path
        logger.debug("dflash kernel build failed", exc_info=True)
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return False, f"build failed: {first_line[:300]}"
    return True, f"sm_{arch}, {library}"


_logged: set[tuple[str, bool]] = set()


def use_kernel(op: str, tensor: torch.Tensor, unsupported: str | None = None) -> bool:
    """Whether `op` runs its CUDA kernel on inputs living where `tensor` does; logs the choice once per op.
    `unsupported`: why these inputs are outside what the kernel takes (they then run the reference)."""
    mode = kernels_mode()
    if op in reference_ops():
        return log_choice(op, tensor, False, "listed in DFLASH_KERNELS_REFERENCE_OPS")
    if tensor.is_cuda:
        available, why = kernel_status()
    else:
        available, why = False, f"inputs on {tensor.device.type}"
    if available and unsupported is not None:
        available, why = False, unsupported
    if mode == "cuda" and not available:
        raise RuntimeError(f"{op}: DFLASH_KERNELS=cuda but the CUDA kernel cannot run: {why}")
    return log_choice(op, tensor, available, why)


def use_triton(op: str, tensor: torch.Tensor, triton_module) -> bool:
    """The same switch and log as `use_kernel`, for a kernel Triton builds itself (`triton_module`: the imported
    triton, or None where it is not installed)."""
    mode = kernels_mode()
    if mode == "reference":
        available, why = False, "DFLASH_KERNELS=reference"
    elif not tensor.is_cuda:
        available, why = False, f"inputs on {tensor.device.type}"
    elif triton_module is None:
        available, why = False, "triton is not installed"
    else:
        available, why = True, f"Triton {triton_module.__version__}"
    if mode == "cuda" and not available:
        raise RuntimeError(f"{op}: DFLASH_KERNELS=cuda but the Triton kernel cannot run: {why}")
    return log_choice(op, tensor, available, why)


def kernels_mode() -> str:
    """DFLASH_KERNELS: auto (kernels where they run), reference (torch everywhere) or cuda (kernels or an error)."""
    mode = os.environ.get("DFLASH_KERNELS", "auto")
    if mode not in ("auto", "reference", "cuda"):
        raise ValueError(f"DFLASH_KERNELS must be auto, reference or cuda, got {mode!r}")
    return mode


def reference_ops() -> set[str]:
    names = {name.strip() for name in os.environ.get("DFLASH_KERNELS_REFERENCE_OPS", "").split(",") if name.strip()}
    if unknown := sorted(names - set(OPS)):
        raise ValueError(f"DFLASH_KERNELS_REFERENCE_OPS names unknown ops {unknown}; the ops are {', '.join(OPS)}")
    return names


def log_choice(op: str, tensor: torch.Tensor, available: bool, why: str) -> bool:
    if (op, available) not in _logged:
        _logged.add((op, available))
        if available:
            logger.info("%s: CUDA kernel (%s)", op, why)
        else:
            # CUDA inputs on the reference path are a performance bug worth a warning; CPU inputs are expected.
            logger.log(logging.WARNING if tensor.is_cuda else logging.INFO, "%s: torch reference (%s)", op, why)
    return available
