"""`--speculative-dflash-verify-splitkv`: the target's verifies attend through our split-KV verify kernel.

SGLang 0.5.16's triton backend runs a TARGET_VERIFY's attention with its prefill kernel (`extend_attention_fwd`):
one program per (request, query head) walks the whole committed prefix. On the H200 that is 450 us a layer at 8k
tokens of context on Qwen3-32B, 29 ms a step, against 62 us for an AR step's one row. The backend also carries a
split-KV kernel for verifies (`verify_splitkv_fwd`, enabled only on AMD gfx95), but inside the server's CUDA graphs
it always runs 16 splits, which makes it ~3x the prefill kernel at 256 tokens (docs/results/
verify-attention-h200-2026-11-30.md).

The backend calls that kernel through an instance attribute and falls back to the prefill kernel when it declines.
This module puts ours there (`dflash_sglang.kernels.split_attention`: one program per request, KV head and prefix
split, each request's split count from its own length at run time; the block causal, or a tree's custom mask in
SGLang's layout, or, for the drafter's bidirectional block, all of it) and turns the path on for the target's
verify backends (the chain's or the tree's, and the adaptive width's chain and one-token ones) and for the
drafter's, when it is a triton backend. What the kernel does not model (sliding windows, logit caps, sinks, scaled
FP8 KV caches, a mask over the prefix) is declined and goes to the prefill kernel.
"""

from __future__ import annotations

import os

import torch

from dflash_sglang.config import DFlashConfigError
from dflash_sglang.kernels.split_attention import verify_attention
from dflash_sglang.sglang.env import env_flag

SPLITKV_ENV = "DFLASH_SGLANG_VERIFY_SPLITKV"
FLAG = "--speculative-dflash-verify-splitkv"
SPLITKV_BACKENDS = ("triton",)


def splitkv_from_env(environ=os.environ) -> bool:
    return env_flag(SPLITKV_ENV, environ)


def check_splitkv(server_args) -> list[str]:
    """Every reason the split-KV verify cannot be served with these flags."""
    backends = {"--attention-backend": server_args.attention_backend,
                "--decode-attention-backend": server_args.decode_attention_backend}
    return [
        f"{FLAG} replaces SGLang's triton verify attention, but {flag} is {name}: pass {flag} triton, or drop {FLAG}"
        for flag, name in backends.items()
        if name is not None and name not in SPLITKV_BACKENDS
    ]


def is_triton_backend(attn_backend) -> bool:
    from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

    return isinstance(attn_backend, TritonAttnBackend) and hasattr(attn_backend, "verify_splitkv_fwd")


def use_splitkv_verify(attn_backend) -> None:
    """Send `attn_backend`'s TARGET_VERIFY attention through our kernel (before its graphs are captured)."""
    if not is_triton_backend(attn_backend):
        raise DFlashConfigError([
            f"{FLAG} needs the target's verify on SGLang 0.5.16's TritonAttnBackend with its split-KV verify hook; "
            f"this one is {type(attn_backend).__name__}: drop {FLAG}"
        ])
    attn_backend.verify_splitkv_fwd = split_kv_verify_fwd
    attn_backend.use_verify_splitkv = True


def split_kv_verify_fwd(q_extend, k_extend, v_extend, o_extend, k_buffer, v_buffer, qo_indptr, kv_indptr,
                        kv_indices, custom_mask, is_causal, mask_indptr, max_len_extend, k_scale, v_scale,
                        sm_scale=None, logit_cap=0.0, skip_prefix_custom_mask=True, sliding_window_size=-1,
                        sinks=None, window_kv_offsets=None, xai_temperature_len=-1, max_bs=None) -> bool:
    """SGLang's `verify_splitkv_fwd` contract: attention of a verify of `max_len_extend` rows per request (causal, a
    tree's `custom_mask` over the block, or, not causal, the whole block: the drafter's) into `o_extend`, True if
    served; False (nothing written) for what our kernel does not model, and the backend then runs its prefill
    kernel. Reads no device value."""
    batch = qo_indptr.shape[0] - 1
    unscaled = all(not isinstance(s, torch.Tensor) and float(s) == 1.0 for s in (k_scale, v_scale))
    if (sinks is not None or (sliding_window_size or -1) > 0 or (logit_cap or 0) > 0
            or (xai_temperature_len or -1) > 0 or not unscaled or k_buffer.dtype != q_extend.dtype
            or q_extend.dim() != 3 or batch < 1 or q_extend.shape[0] != batch * int(max_len_extend)
            or (custom_mask is not None and (mask_indptr is None or not skip_prefix_custom_mask or not is_causal))):
        return False
    scale = sm_scale if sm_scale is not None else q_extend.shape[-1] ** -0.5
    verify_attention(q_extend, k_extend, v_extend, k_buffer, v_buffer, kv_indptr, kv_indices, int(max_len_extend),
                     scale, out=o_extend, mask=custom_mask, mask_indptr=mask_indptr, causal=bool(is_causal))
    return True
