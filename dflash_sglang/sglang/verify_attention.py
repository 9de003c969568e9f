"""`--speculative-dflash-verify-splitkv`: the target's chain verifies attend through SGLang's split-KV verify kernel.

SGLang 0.5.16's triton backend runs a TARGET_VERIFY's attention with its prefill kernel (`extend_attention_fwd`):
one program per (request, query head) walks the whole committed prefix, so with B = 16 queries per request at c1 a
64-head target keeps 64 programs busy however long the context. Its decode kernel splits the prefix across programs
instead. On the Qwen3-32B shape (2026-11-30, 128-token contexts) the verify's attention already cost 0.61 ms a step
against the decode step's 0.36; the prefix walk grows with the context, the split one is spread over the GPU.

The same backend carries a split-KV kernel for verifies (`verify_splitkv_fwd`, flash-decode over the prefix, then
the causal block), which it enables only on AMD gfx95 and at EAGLE top-k 1. It computes causal attention only and
never reads the custom mask, so it is switched on here for the backends that serve causal verifies alone: a chain
server's target backend, and the adaptive width's chain and one-token backends. A tree's backend keeps the prefill
kernel (its mask is not causal). The kernel itself declines what it cannot serve (sliding windows, logit caps,
sinks) and the backend falls back to the prefill kernel there.

Measured per layer in CUDA graphs on the H200 (docs/results/verify-attention-h200-2026-11-30.md): in the server's
graphs the kernel always runs 16 splits (it sizes them from the whole preallocated index buffer), which makes it
0.36x the prefill kernel at 8k tokens of context and 0.5x at 4k, but 1.1-1.3x at 1k and ~3x at 256 on Qwen3-32B.
Hence a flag, for long contexts, and not the default.
"""

from __future__ import annotations

import logging
import os

from dflash_sglang.config import DFlashConfigError

logger = logging.getLogger(__name__)

SPLITKV_ENV = "DFLASH_SGLANG_VERIFY_SPLITKV"
FLAG = "--speculative-dflash-verify-splitkv"
SPLITKV_BACKENDS = ("triton",)


def splitkv_from_env(environ=os.environ) -> bool:
    return environ.get(SPLITKV_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def check_splitkv(server_args) -> list[str]:
    """Every reason the split-KV verify cannot be served with these flags."""
    backends = {"--attention-backend": server_args.attention_backend,
                "--decode-attention-backend": server_args.decode_attention_backend}
    return [
        f"{FLAG} runs SGLang's triton verify kernel, but {flag} is {name}: pass {flag} triton, or drop {FLAG}"
        for flag, name in backends.items()
        if name is not None and name not in SPLITKV_BACKENDS
    ]


def use_splitkv_verify(attn_backend) -> None:
    """Send `attn_backend`'s TARGET_VERIFY attention through the split-KV kernel (before its graphs are captured)."""
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    if not isinstance(attn_backend, TritonAttnBackend) or not hasattr(attn_backend, "verify_splitkv_fwd"):
        raise DFlashConfigError([
            f"{FLAG} needs the target's verify on SGLang 0.5.16's TritonAttnBackend with its split-KV verify kernel; "
            f"this one is {type(attn_backend).__name__}: drop {FLAG}"
        ])
    attn_backend.use_verify_splitkv = True
