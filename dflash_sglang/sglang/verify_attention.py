"""The split-KV verify: the target's verifies attend through our split-KV verify kernel, by default wherever the
target's attention backend is triton (`--speculative-dflash-verify-splitkv` insists on it, `--no-...` turns it off).

SGLang 0.5.16's triton backend runs a TARGET_VERIFY's attention with its prefill kernel (`extend_attention_fwd`):
one program per (request, query head) walks the whole committed prefix. On the H200 that is 450 us a layer at 8k
tokens of context on Qwen3-32B, 29 ms a step, against 62 us for an AR step's one row. The backend also carries a
split-KV kernel for verifies (`verify_splitkv_fwd`, enabled only on AMD gfx95), but inside the server's CUDA graphs
it always runs 16 splits, which makes it ~3x the prefill kernel at 256 tokens (docs/results/
verify-attention-h200-2026-11-30.md).

Ours (`dflash_sglang.kernels.split_attention`: one program per request, KV head and prefix split, each request's
split count from its own length at run time; the block causal, or a tree's custom mask in SGLang's layout, or, for
the drafter's bidirectional block, all of it) takes over the backend's `forward_extend` for TARGET_VERIFY batches,
on the target's verify backends (the chain's or the tree's, and the adaptive width's chain and one-token ones) and
on the drafter's, when it is a triton backend. It stores the block's K/V as the backend does, then reads the
block's keys and values where the model left them: the backend's own verify path first copies both into
contiguous tensors, two copy kernels a layer (0.28 ms of a Qwen3-32B verify step on the H200, 2026-11-30). What
the kernel does not model (sliding windows, logit caps, sinks, scaled FP8 KV caches, a mask over the prefix,
decode-context parallelism, deterministic mode, score mods, value heads narrower than the key's) goes to the
backend's own `forward_extend`.
On by default since a float32 server matched AR token for token with it, chain and tree (2026-11-30).
"""

from __future__ import annotations

import os

from dflash_sglang.config import DFlashConfigError
from dflash_sglang.kernels.split_attention import verify_attention
from dflash_sglang.sglang.env import env_switch

SPLITKV_ENV = "DFLASH_SGLANG_VERIFY_SPLITKV"
FLAG = "--speculative-dflash-verify-splitkv"
SPLITKV_BACKENDS = ("triton",)


def splitkv_from_env(environ=os.environ) -> bool | None:
    """True: the flag asked for it; False: `--no-speculative-dflash-verify-splitkv`; None: wherever it applies."""
    return env_switch(SPLITKV_ENV, environ)


def resolve_splitkv(setting: bool | None, target_backend) -> bool:
    """Whether the verifies take our kernel: as asked, or by default when the target's backend is a triton one."""
    return is_triton_backend(target_backend) if setting is None else setting


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

    return isinstance(attn_backend, TritonAttnBackend) and hasattr(attn_backend, "_set_kv_buffer")


def use_splitkv_verify(attn_backend) -> None:
    """Send `attn_backend`'s TARGET_VERIFY attention through our kernel (before its graphs are captured)."""
    if not is_triton_backend(attn_backend):
        raise DFlashConfigError([
            f"{FLAG} needs the target's verify on SGLang 0.5.16's TritonAttnBackend; "
            f"this one is {type(attn_backend).__name__}: drop {FLAG}"
        ])
    if not isinstance(attn_backend.forward_extend, SplitKVVerifyExtend):
        attn_backend.forward_extend = SplitKVVerifyExtend(attn_backend)


class SplitKVVerifyExtend:
    """A triton backend's `forward_extend` with its TARGET_VERIFY batches served by our kernel; every other call,
    and every verify our kernel does not model, goes to the backend's own method."""

    def __init__(self, backend):
        self.backend = backend
        self.extend = backend.forward_extend  # the bound original

    def __call__(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, score_mod=None,
                 aux_tensors=None):
        if not self.serves(q, k, v, layer, forward_batch, sinks, score_mod):
            return self.extend(q, k, v, layer, forward_batch, save_kv_cache=save_kv_cache, sinks=sinks,
                               score_mod=score_mod, aux_tensors=aux_tensors)
        from sglang.srt.mem_cache.memory_pool import KVWriteLoc

        backend, meta = self.backend, self.backend.forward_metadata
        if save_kv_cache:  # as the backend stores an unscaled cache, before attending
            backend._set_kv_buffer(forward_batch, layer, KVWriteLoc(
                forward_batch.out_cache_loc, meta.swa_out_cache_loc, full_loc=meta.out_cache_loc_full_physical), k, v)
        out = getattr(forward_batch, "_attn_output", None)
        if out is None:
            out = q.new_empty((q.shape[0], layer.tp_q_head_num * layer.v_head_dim))
        pool = backend.token_to_kv_pool
        verify_attention(q.view(-1, layer.tp_q_head_num, layer.qk_head_dim),
                         k.view(-1, layer.tp_k_head_num, layer.qk_head_dim),
                         v.view(-1, layer.tp_v_head_num, layer.v_head_dim),
                         pool.get_key_buffer(layer.layer_id), pool.get_value_buffer(layer.layer_id), meta.kv_indptr,
                         meta.kv_indices, int(meta.max_extend_len), layer.scaling,
                         out=out.view(-1, layer.tp_q_head_num, layer.v_head_dim), mask=meta.custom_mask,
                         mask_indptr=meta.mask_indptr, causal=self.causal(layer))
        return out

    def causal(self, layer) -> bool:
        """Whether the block attends causally, as the backend's forward_extend decides it."""
        from sglang.srt.layers.radix_attention import AttentionType

        return not (layer.is_cross_attention or layer.attn_type == AttentionType.ENCODER_ONLY
                    or (layer.attn_type == AttentionType.DECODER_BIDIRECTIONAL
                        and self.backend.allow_bidirectional_attention_in_extend))

    def serves(self, q, k, v, layer, forward_batch, sinks, score_mod) -> bool:
        """Whether our kernel computes what the backend would for this call (a prefill's extend is told apart by its
        first check). Reads no device value."""
        backend, meta = self.backend, self.backend.forward_metadata
        if not forward_batch.forward_mode.is_target_verify() or k is None or v is None:
            return False
        if (sinks is not None or score_mod is not None or layer.k_scale is not None or backend.dcp_size > 1
                or backend.enable_deterministic
                or (layer.sliding_window_size is not None and layer.sliding_window_size > -1)
                or (layer.logit_cap or 0) > 0 or (layer.xai_temperature_len or -1) > 0
                or layer.qk_head_dim != layer.v_head_dim):  # (MLA's latent layout: not tested against ours)
            return False
        if backend.token_to_kv_pool.get_key_buffer(layer.layer_id).dtype != q.dtype or meta.max_extend_len is None:
            return False
        batch = meta.qo_indptr.shape[0] - 1
        if batch < 1 or q.shape[0] != batch * int(meta.max_extend_len):
            return False
        # A custom mask (a tree's) is read over the block only: the backend's kernel skips its prefix part too.
        return meta.custom_mask is None or (meta.mask_indptr is not None and self.causal(layer))
