"""Why does a failed TORCH_CHECK in our kernel library kill the process on the GPU box instead of raising?

On the H200 box (2026-11-29) an input check of `torch.ops.dflash_sglang.context_kv_norm_rope` failing ended the
process with SIGSEGV inside the op call; the same check raises RuntimeError in a build on the CPU machine. This
probe separates the suspects, each call in a fresh child process:
  1. a minimal extension built here by the same toolchain (`torch.utils.cpp_extension.load_inline`) whose only op
     fails a TORCH_CHECK: crashes too -> the toolchain (compiler / C++ runtime / ABI), not our code;
  2. the same with a check that carries no formatted message (no std::string crosses into libc10);
  3. the same with a message formatted by snprintf and passed as a C string (what csrc/dflash_binding.cpp does);
  4. our library's failing check (the test's call);
and prints the facts that bear on it: the host compiler torch uses, its default std::string ABI against torch's,
the libstdc++ the extension resolves, and whether the library has an unwind table header.

    python3 scripts/device/extension_error_probe.py [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

PROBE_SOURCE = r"""
#include <torch/library.h>
#include <ATen/ATen.h>
#include <cstdio>
void check_with_message(const at::Tensor& x) { TORCH_CHECK(x.dim() == 99, "x must have 99 dims, got ", x.dim()); }
void check_plain(const at::Tensor& x) { TORCH_CHECK(x.dim() == 99); }
void check_c_string(const at::Tensor& x) {
  char message[64];
  std::snprintf(message, sizeof(message), "x must have 99 dims, got %d", int(x.dim()));
  TORCH_CHECK(x.dim() == 99, static_cast<const char*>(message));
}
TORCH_LIBRARY(error_probe, m) {
  m.def("check_with_message(Tensor x) -> ()");
  m.def("check_plain(Tensor x) -> ()");
  m.def("check_c_string(Tensor x) -> ()");
}
TORCH_LIBRARY_IMPL(error_probe, CompositeExplicitAutograd, m) {
  m.impl("check_with_message", &check_with_message);
  m.impl("check_plain", &check_plain);
  m.impl("check_c_string", &check_c_string);
}
"""

OUR_CALL = """
import torch
from dflash_sglang.kernels import jit
assert jit.kernel_status()[0]
kv = torch.zeros(2, 1, 2, 1, 514, dtype=torch.bfloat16, device="cuda")
keys = torch.empty(1, 2, 1, 514, dtype=torch.bfloat16, device="cuda")
torch.ops.dflash_sglang.context_kv_norm_rope(
    kv, torch.ones(1, 514, device="cuda"), 1e-6, torch.zeros(2, dtype=torch.long, device="cuda"),
    torch.zeros(8, 514, device="cuda"), keys, torch.empty_like(keys))
"""


def child(code: str) -> dict:
    """Run `code` wrapped so a RuntimeError is reported; returns how the child ended."""
    wrapped = f"try:\n{_indent(code)}\nexcept RuntimeError as e:\n    print('RAISED', str(e).splitlines()[0][:200])\n"
    run = subprocess.run([sys.executable, "-u", "-X", "faulthandler", "-c", wrapped], capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    raised = [line for line in run.stdout.splitlines() if line.startswith("RAISED")]
    return {"exit": run.returncode, "raised": raised[0] if raised else None,
            "stderr_tail": run.stderr[-1500:] if run.returncode else ""}


def _indent(code: str) -> str:
    return "\n".join("    " + line for line in code.strip().splitlines())


def shell(cmd: list[str]) -> str:
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (run.stdout + run.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"({e})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    from torch.utils import cpp_extension

    from dflash_sglang.kernels import jit

    cxx = os.environ.get("CXX") or "c++"
    report: dict = {
        "torch": torch.__version__,
        "torch_cxx11_abi": bool(torch._C._GLIBCXX_USE_CXX11_ABI),
        "host_compiler": cxx,
        "host_compiler_version": shell([cxx, "--version"]).splitlines()[0:1],
        "compiler_default_abi": [line for line in shell(
            ["bash", "-c", f"echo '#include <string>' | {cxx} -x c++ -std=c++17 -dM -E - | grep _GLIBCXX_USE_CXX11_ABI"]
        ).splitlines()],
    }
    build_dir = Path(tempfile.mkdtemp(prefix="error_probe_"))
    cpp_extension.load_inline(name="error_probe", cpp_sources=[PROBE_SOURCE], is_python_module=False,
                              build_directory=str(build_dir), verbose=False)
    probe_so = next(build_dir.glob("*.so"))
    load = f"import torch\ntorch.ops.load_library({str(probe_so)!r})\n"
    report["minimal_with_message"] = child(load + "torch.ops.error_probe.check_with_message(torch.zeros(2))")
    report["minimal_plain"] = child(load + "torch.ops.error_probe.check_plain(torch.zeros(2))")
    report["minimal_c_string"] = child(load + "torch.ops.error_probe.check_c_string(torch.zeros(2))")
    libraries = [("probe", probe_so)]
    if torch.cuda.is_available():
        report["our_library"] = child(OUR_CALL)
        libraries.append(("ours", jit.build()))
    for name, so in libraries:
        report[f"{name}_ldd_libstdcxx"] = [line.strip() for line in shell(["ldd", str(so)]).splitlines()
                                           if "stdc++" in line or "gcc_s" in line]
        report[f"{name}_eh_frame_hdr"] = "GNU_EH_FRAME" in shell(["readelf", "-lW", str(so)])
        report[f"{name}_check_fail_symbols"] = [line.strip() for line in shell(
            ["bash", "-c", f"nm -DC --undefined-only {so} | grep -i 'torchCheckFail\\|c10::Error'"]).splitlines()]
    text = json.dumps(report, indent=1)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "extension-error-probe.json").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
