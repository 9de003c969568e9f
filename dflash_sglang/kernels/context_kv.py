"""The drafter's context K/V after its K/V GEMM (key RMSNorm, neox RoPE, layer-major layout): CUDA kernel or
reference."""

from __future__ import annotations

import torch

from dflash_sglang.kernels import reference
from dflash_sglang.kernels.buffers import ContextKV, empty_context_kv, fill
from dflash_sglang.kernels.jit import use_kernel

MAX_HEAD_DIM = 512  # csrc/dflash_kernels.h kMaxContextHeadDim


def context_kv_norm_rope(kv: torch.Tensor, k_norm_scale: torch.Tensor, eps: float, positions: torch.Tensor,
                         cos_sin_cache: torch.Tensor, out: ContextKV | None = None) -> ContextKV:
    """Every layer's context keys and values from the drafter's stacked K/V projection, in one launch.

    Parameters:
        kv: [N, L, 2, H, D] float32/float16/bfloat16, the GEMM output viewed per token, layer, (key, value),
            kv head; the kernel takes even D up to MAX_HEAD_DIM, other D run the reference.
        k_norm_scale: [L, D] float32, each layer's key RMSNorm scale with Gemma's `1 + w` already applied.
        eps: the RMSNorm epsilon.
        positions: [N] int64 token positions, rows of `cos_sin_cache`.
        cos_sin_cache: [max_position, D] SGLang's RoPE cache (cos in the first D/2 columns, sin in the last,
            scaling already folded in), float32 or kv's dtype.
        out: optional preallocated `ContextKV` (`buffers.empty_context_kv`).

    Returns `ContextKV` of kv's dtype: keys [L, N, H, D] (normed in float32 and rounded to kv's dtype, then rotated
    in float32 and rounded again: `reference.context_kv_norm_rope`) and values [L, N, H, D], each layer's slice
    contiguous. The kernel clamps positions outside the cache where the reference raises.
    """
    num_tokens, num_layers, _, kv_heads, head_dim = kv.shape
    unsupported = None if head_dim % 2 == 0 and 2 <= head_dim <= MAX_HEAD_DIM else (
        f"head_dim {head_dim}: the kernel takes even head dims up to {MAX_HEAD_DIM}")
    if not use_kernel("context_kv_norm_rope", kv, unsupported):
        return fill(out, reference.context_kv_norm_rope(kv, k_norm_scale, eps, positions, cos_sin_cache))
    if cos_sin_cache.dtype not in (torch.float32, kv.dtype):
        cos_sin_cache = cos_sin_cache.float()
    if cos_sin_cache.stride(-1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    out = out if out is not None else empty_context_kv(num_layers, num_tokens, kv_heads, head_dim, kv.dtype, kv.device)
    torch.ops.dflash_sglang.context_kv_norm_rope(kv.contiguous(), k_norm_scale.float().contiguous(), float(eps),
                                                 positions.long().contiguous(), cos_sin_cache, *out)
    return out
