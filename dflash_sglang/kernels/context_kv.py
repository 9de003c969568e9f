"""The drafter's context K/V after its K/V GEMM (key RMSNorm, neox RoPE, layer-major layout): CUDA kernel or
reference. `context_kv_to_pool` does the same and stores every layer's rows straight into the KV pool."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

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
    if not use_kernel("context_kv_norm_rope", kv, unsupported_head_dim(head_dim)):
        return fill(out, reference.context_kv_norm_rope(kv, k_norm_scale, eps, positions, cos_sin_cache))
    cos_sin_cache = kernel_cache(cos_sin_cache, kv.dtype)
    out = out if out is not None else empty_context_kv(num_layers, num_tokens, kv_heads, head_dim, kv.dtype, kv.device)
    torch.ops.dflash_sglang.context_kv_norm_rope(kv.contiguous(), k_norm_scale.float().contiguous(), float(eps),
                                                 positions.long().contiguous(), cos_sin_cache, *out)
    return out


class PoolLayers(NamedTuple):
    """The drafter layers' key and value buffers in a KV pool, in layer order, with the address tables and the slot
    stride `context_kv_to_pool`'s kernel writes through (`pool_layers` builds it once; the buffers live as long as
    the pool)."""

    keys: tuple[torch.Tensor, ...]  # [S, H, D] each
    values: tuple[torch.Tensor, ...]
    key_addresses: torch.Tensor  # int64 [L], on the buffers' device
    value_addresses: torch.Tensor
    slot_stride: int  # elements between consecutive slots
    alignment: int  # bytes every base address and the slot stride are a multiple of


def pool_layers(keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> PoolLayers:
    """`PoolLayers` of per-layer [S, H, D] buffers that share one shape, dtype, device and slot stride, each slot's
    H x D elements contiguous; ValueError naming what differs otherwise."""
    buffers = [*keys, *values]
    if not keys or len(keys) != len(values):
        raise ValueError(f"pool_layers needs as many key buffers as value buffers, at least one: {len(keys)} and "
                         f"{len(values)}")
    first = buffers[0]
    for t in buffers:
        if t.dim() != 3 or t.shape != first.shape or t.dtype != first.dtype or t.device != first.device:
            raise ValueError(f"pool_layers: every buffer must be [S, H, D] like the first {tuple(first.shape)} "
                             f"{first.dtype} on {first.device}, got {tuple(t.shape)} {t.dtype} on {t.device}")
        if t.stride(2) != 1 or t.stride(1) != t.shape[2] or t.stride(0) != first.stride(0):
            raise ValueError(f"pool_layers: each slot's H x D elements must be contiguous at one slot stride, got "
                             f"strides {t.stride()}")
    itemsize = first.element_size()
    alignment = math.gcd(first.stride(0) * itemsize, *(t.data_ptr() for t in buffers))

    def addresses(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=first.device)

    return PoolLayers(tuple(keys), tuple(values), addresses(keys), addresses(values), first.stride(0), alignment)


def context_kv_to_pool(kv: torch.Tensor, k_norm_scale: torch.Tensor, eps: float, positions: torch.Tensor,
                       cos_sin_cache: torch.Tensor, slots: torch.Tensor, pool: PoolLayers) -> None:
    """`context_kv_norm_rope`, with every layer's keys and values of token n stored at pool slot `slots[n]` of that
    layer's buffers (`pool`), in one launch: the per-layer stores SGLang's pool would make after it.

    kv [N, L, 2, H, D] as for `context_kv_norm_rope`, in the pool's dtype; slots [N] int64 (several rows may share
    the padding slot 0, whose content is then any one of theirs). Slots are not bounds-checked on the GPU.
    """
    num_tokens, num_layers, _, kv_heads, head_dim = kv.shape
    if len(pool.keys) != num_layers or pool.keys[0].shape[1:] != (kv_heads, head_dim) or pool.keys[0].dtype != kv.dtype:
        raise ValueError(f"context_kv_to_pool: kv {tuple(kv.shape)} {kv.dtype} does not fit the pool's "
                         f"{len(pool.keys)} layers of {tuple(pool.keys[0].shape)} {pool.keys[0].dtype}")
    if slots.shape != (num_tokens,):
        raise ValueError(f"context_kv_to_pool: slots must be [{num_tokens}], got {tuple(slots.shape)}")
    if not use_kernel("context_kv_to_pool", kv, unsupported_head_dim(head_dim)):
        context = reference.context_kv_norm_rope(kv, k_norm_scale, eps, positions, cos_sin_cache)
        for layer_keys, layer_values, keys, values in zip(pool.keys, pool.values, *context):
            layer_keys[slots] = keys
            layer_values[slots] = values
        return
    torch.ops.dflash_sglang.context_kv_to_pool(
        kv.contiguous(), k_norm_scale.float().contiguous(), float(eps), positions.long().contiguous(),
        kernel_cache(cos_sin_cache, kv.dtype), pool.key_addresses, pool.value_addresses, slots.long().contiguous(),
        pool.slot_stride, pool.alignment)


def unsupported_head_dim(head_dim: int) -> str | None:
    """Why the kernel cannot take this head dim, or None."""
    if head_dim % 2 == 0 and 2 <= head_dim <= MAX_HEAD_DIM:
        return None
    return f"head_dim {head_dim}: the kernel takes even head dims up to {MAX_HEAD_DIM}"


def kernel_cache(cos_sin_cache: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """SGLang's RoPE cache as the kernel reads it: float32 or the kv dtype, rows contiguous."""
    if cos_sin_cache.dtype not in (torch.float32, dtype):
        cos_sin_cache = cos_sin_cache.float()
    return cos_sin_cache if cos_sin_cache.stride(-1) == 1 else cos_sin_cache.contiguous()
