"""Test-harness SGLang plugin for the float32 equality runs (not part of the product).

SGLang's fused CUDA ops (sgl_kernel rmsnorm, fused_add_rmsnorm, silu_and_mul, ...) are compiled for fp16/bf16
only: `--dtype float32` dies at the first RMSNorm ("failed to dispatch data type Float"). With
DFLASH_E2E_NATIVE_OPS=1 every SGLang MultiPlatformOp uses its own `forward_native` (plain torch), for every
contender alike (AR, builtin DFLASH, ours), so the equality check runs in float32 as the issues require.
"""

import os

DISPATCH_TARGET = "sglang.srt.layers.utils.multi_platform.MultiPlatformOp.dispatch_forward"


def register() -> None:
    if os.environ.get("DFLASH_E2E_NATIVE_OPS") != "1":
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(DISPATCH_TARGET, native_forward, HookType.AROUND)


def native_forward(_original, op):
    return op.forward_native
