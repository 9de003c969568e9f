"""Does a float32 `tl.dot` on this GPU round like float32? Triton's default for float32 dots is TF32 (10-bit
mantissa) on Ampere and later, unless TRITON_F32_DEFAULT=ieee. SGLang's triton attention kernels (extend, used by
verify; grouped decode) use tl.dot, so a `--dtype float32` server is not float32 throughout by default, and
verify-shaped and decode-shaped attention then round differently by ~1e-3 relative: enough to flip a greedy
near-tie. The equality runs (scripts/device/e2e.sh) set TRITON_F32_DEFAULT=ieee for every contender.

This probe runs one attention-shaped dot (64 x 64 x head_dim) under tf32 and ieee, each in a fresh process (the
knob is read at compile time), and prints the max relative error against a float64 product.

    python3 scripts/device/triton_fp32_probe.py            # both settings, one line each
"""

import os
import subprocess
import sys

import torch
import triton
import triton.language as tl


@triton.jit
def _dot_kernel(a_ptr, b_ptr, c_ptr, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(a_ptr + rm[:, None] * K + rk[None, :])
    b = tl.load(b_ptr + rk[:, None] * N + rn[None, :])
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], tl.dot(a, b))


def probe(head_dim: int) -> float:
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(64, head_dim, device="cuda", generator=gen)
    b = torch.randn(head_dim, 64, device="cuda", generator=gen)
    c = torch.empty(64, 64, device="cuda")
    _dot_kernel[(1,)](a, b, c, 64, 64, head_dim)
    exact = a.double() @ b.double()
    return ((c.double() - exact).abs().max() / exact.abs().max()).item()


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        errors = {d: probe(d) for d in (64, 128, 256)}
        print(" ".join(f"head_dim {d}: {e:.1e}" for d, e in errors.items()))
        return 0
    status = 0
    for setting in ("tf32", "ieee"):
        env = dict(os.environ, TRITON_F32_DEFAULT=setting)
        result = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True)
        line = result.stdout.strip() or result.stderr.strip().splitlines()[-1]
        print(f"TRITON_F32_DEFAULT={setting}: max relative error of a float32 tl.dot vs float64: {line}")
        status |= result.returncode
    return status


if __name__ == "__main__":
    sys.exit(main())
