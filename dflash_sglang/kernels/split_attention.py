"""A verify's attention: B query rows per request over the request's committed prefix (K/V in the paged pool) and
over the block's own B keys: causally (a chain), as a mask says (a tree) or all of them (the drafter's block). A
Triton kernel on CUDA, `verify_attention_reference` elsewhere (and under DFLASH_KERNELS=reference).

Why a kernel: SGLang 0.5.16's triton backend runs a verify's attention with its prefill kernel, one program per
request and query head walking the whole prefix; on the H200 that is 450 us a layer at 8k tokens on Qwen3-32B
against 62 us for the decode kernel's one row, and its split-KV verify kernel takes ~3x the prefill kernel's time
at 256 tokens inside the server's graphs (docs/results/verify-attention-h200-2026-11-30.md). Here, flash-decoding
shaped for a verify:

- one program per (request, KV head, prefix split) holds all G x B query rows that share the KV head (G query
  heads per KV head), so each prefix key is read once for all of them and the scores are one matrix product
  (past MAX_BLOCK_M rows, as with 16 query heads per KV head, the rows are tiled over programs);
- the split count is each request's own, from its prefix length at run time (at least MIN_SPLIT keys a split, at
  most `max_splits`), so a CUDA graph replayed at any length splits as that length needs;
- a second program per (request, KV head, MERGE_M query rows) adds the block's keys (causal, the tree's mask rows,
  or all of them) and merges the splits' partial softmaxes.
"""

from __future__ import annotations

import torch

from dflash_sglang.kernels.jit import use_triton

OP = "verify_attention"
MIN_SPLIT = 64  # prefix keys per split at least: shorter splits cost more in the merge than they save
BLOCK_N = 64  # prefix keys per iteration of a split's loop
MAX_BLOCK_M = 128  # query rows a program holds (its fp32 accumulator is MAX_BLOCK_M x head dim)
# Query rows per program of the second pass: the merge reads every split's partial of its rows, so a program per
# whole row tile would read all of them serially on a handful of SMs (one request on Qwen3-32B: 8 programs, 1 MB
# each at 16 splits); 16-row chunks spread that over 8x the programs.
MERGE_M = 16
TARGET_PROGRAMS = 256  # splits per (request, row tile) are capped so the first pass launches about this many programs
MAX_SPLITS = 16
CAUSAL, MASKED, FULL = 0, 1, 2  # what a block row sees of its block: rows up to itself, its mask row's, all

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU-only install: the reference serves
    triton = None

if triton is not None:

    @triton.jit
    def _query_tile(q_ptr, b, h, m, stride_qt, stride_qh, B: tl.constexpr, G: tl.constexpr, D: tl.constexpr,
                    BLOCK_D: tl.constexpr):
        # Row m (of the KV head's G x B) is query head h * G + m // B at the request's block row m % B.
        d = tl.arange(0, BLOCK_D)
        rows = (b * B + m % B).to(tl.int64) * stride_qt + (h * G + m // B) * stride_qh
        return tl.load(q_ptr + rows[:, None] + d[None, :], mask=(m < G * B)[:, None] & (d < D)[None, :], other=0.0)

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        # float32 inputs (the fp32 equality runs) multiply exactly; bf16 ones on the tensor cores.
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _split_count(length, min_split, max_splits):
        # A request's prefix splits: at least min_split keys each, at most max_splits, one for an empty prefix.
        return tl.minimum(tl.maximum(tl.cdiv(length, min_split), 1), max_splits)

    @triton.jit
    def _scratch_row(b, tile, s, max_splits, BLOCK_M: tl.constexpr):
        # The first scratch row of request b's row tile `tile` in split s ([batch, tiles, max_splits, BLOCK_M]).
        return ((b * tl.num_programs(1) + tile) * max_splits + s).to(tl.int64) * BLOCK_M

    @triton.jit
    def _prefix_splits_kernel(q_ptr, k_ptr, v_ptr, kv_indptr, kv_indices, part_o, part_lse, stride_qt, stride_qh,
                              stride_ks, stride_kh, stride_vs, stride_vh, sm_scale, max_splits, min_split,
                              B: tl.constexpr, G: tl.constexpr, D: tl.constexpr, DV: tl.constexpr,
                              BLOCK_M: tl.constexpr, TILES: tl.constexpr, BLOCK_D: tl.constexpr,
                              BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        tile = tl.program_id(1)  # KV head h's row tile tile % TILES
        s = tl.program_id(2)
        h = tile // TILES
        m = (tile % TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
        start = tl.load(kv_indptr + b).to(tl.int32)
        length = tl.load(kv_indptr + b + 1).to(tl.int32) - start
        split_len = tl.cdiv(length, _split_count(length, min_split, max_splits))
        lo = s * split_len
        hi = tl.minimum(lo + split_len, length)  # empty past this request's splits
        q = _query_tile(q_ptr, b, h, m, stride_qt, stride_qh, B, G, D, BLOCK_D)
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
        i = lo
        while i < hi:  # a while loop: Triton's CPU interpreter (the CPU test) takes no runtime range bounds
            n = i + tl.arange(0, BLOCK_N)
            inside = n < hi
            slots = tl.load(kv_indices + start + n, mask=inside, other=0).to(tl.int64)
            k = tl.load(k_ptr + slots[:, None] * stride_ks + h * stride_kh + d[None, :],
                        mask=inside[:, None] & (d < D)[None, :], other=0.0)
            scores = tl.where(inside[None, :], _dot(q, tl.trans(k), IEEE) * sm_scale, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.exp(scores - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            v = tl.load(v_ptr + slots[:, None] * stride_vs + h * stride_vh + dv[None, :],
                        mask=inside[:, None] & (dv < DV)[None, :], other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IEEE)
            l_i = l_i * alpha + tl.sum(p, 1)
            m_i = m_new
            i += BLOCK_N
        local = tl.arange(0, BLOCK_M)
        base = _scratch_row(b, tile, s, max_splits, BLOCK_M)
        safe_l = tl.where(l_i > 0, l_i, 1.0)
        tl.store(part_o + (base + local)[:, None] * BLOCK_DV + dv[None, :], acc / safe_l[:, None])
        tl.store(part_lse + base + local, tl.where(l_i > 0, m_i + tl.log(safe_l), float("-inf")))

    @triton.jit
    def _block_and_merge_kernel(q_ptr, kb_ptr, vb_ptr, o_ptr, kv_indptr, mask_ptr, mask_indptr, part_o, part_lse,
                                stride_qt, stride_qh, stride_kbt, stride_kbh, stride_vbt, stride_vbh, stride_ot,
                                stride_oh, sm_scale, max_splits, min_split, B: tl.constexpr, G: tl.constexpr,
                                D: tl.constexpr, DV: tl.constexpr, BLOCK_M: tl.constexpr, TILES: tl.constexpr,
                                MERGE_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                                BLOCK_B: tl.constexpr, BLOCK_MODE: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        tile = tl.program_id(1)
        h = tile // TILES
        local = tl.program_id(2) * MERGE_M + tl.arange(0, MERGE_M)  # this program's rows of the tile
        m = (tile % TILES) * BLOCK_M + local
        q = _query_tile(q_ptr, b, h, m, stride_qt, stride_qh, B, G, D, BLOCK_D)
        d = tl.arange(0, BLOCK_D)
        dv = tl.arange(0, BLOCK_DV)
        c = tl.arange(0, BLOCK_B)
        length = tl.load(kv_indptr + b + 1).to(tl.int32) - tl.load(kv_indptr + b).to(tl.int32)
        # The block: row m % B sees block keys 0..m % B (CAUSAL, a chain), those its mask row sets (MASKED, a tree:
        # SGLang's layout, B rows of prefix + B entries from mask_indptr[b], the prefix's all set), or all (FULL, the
        # drafter's bidirectional block).
        inside = (c < B)[None, :] & (m < G * B)[:, None]
        if BLOCK_MODE == 1:
            bits = tl.load(mask_ptr + tl.load(mask_indptr + b).to(tl.int64) + (m % B)[:, None].to(tl.int64)
                           * (length + B) + length + c[None, :], mask=inside, other=0)
            visible = inside & (bits != 0)
        elif BLOCK_MODE == 2:
            visible = inside
        else:
            visible = inside & (c[None, :] <= (m % B)[:, None])
        block_rows = (b * B + c).to(tl.int64)
        kb = tl.load(kb_ptr + block_rows[:, None] * stride_kbt + h * stride_kbh + d[None, :],
                     mask=(c < B)[:, None] & (d < D)[None, :], other=0.0)
        scores = tl.where(visible, _dot(q, tl.trans(kb), IEEE) * sm_scale, float("-inf"))
        # A row that sees no block key (padding rows) keeps a finite maximum and contributes nothing.
        m_run = tl.max(scores, 1)
        m_run = tl.where(m_run == float("-inf"), 0.0, m_run)
        p = tl.exp(scores - m_run[:, None])
        l_run = tl.sum(p, 1)
        vb = tl.load(vb_ptr + block_rows[:, None] * stride_vbt + h * stride_vbh + dv[None, :],
                     mask=(c < B)[:, None] & (dv < DV)[None, :], other=0.0)
        acc = _dot(p.to(vb.dtype), vb, IEEE)
        # The prefix's splits, each a normalized partial output and its log-sum-exp.
        splits = _split_count(length, min_split, max_splits)
        s = 0
        while s < splits:
            base = _scratch_row(b, tile, s, max_splits, BLOCK_M)
            lse = tl.load(part_lse + base + local)
            part = tl.load(part_o + (base + local)[:, None] * BLOCK_DV + dv[None, :])
            m_new = tl.maximum(m_run, lse)
            keep = tl.exp(m_run - m_new)
            add = tl.exp(lse - m_new)
            acc = acc * keep[:, None] + part * add[:, None]
            l_run = l_run * keep + add
            m_run = m_new
            s += 1
        out = acc / tl.where(l_run > 0, l_run, 1.0)[:, None]
        rows = (b * B + m % B).to(tl.int64) * stride_ot + (h * G + m // B) * stride_oh
        tl.store(o_ptr + rows[:, None] + dv[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=(m < G * B)[:, None] & (dv < DV)[None, :])

def verify_attention(q: torch.Tensor, k_block: torch.Tensor, v_block: torch.Tensor, k_buffer: torch.Tensor,
                     v_buffer: torch.Tensor, kv_indptr: torch.Tensor, kv_indices: torch.Tensor, block: int,
                     sm_scale: float, out: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                     mask_indptr: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
    """Attention of a verify, written into `out` (or a new tensor) [bs * B, Hq, Dv] and returned.

    q [bs * B, Hq, D]: the block's queries, request-major; k_block / v_block [bs * B, Hkv, D / Dv]: the block's own
    keys and values; k_buffer / v_buffer [slots, Hkv, D / Dv]: the KV pool; kv_indptr [bs + 1], kv_indices: each
    request's committed prefix as pool slots. Every row attends to its request's whole prefix; in the block, row j
    attends to rows 0..j (a chain), or, given `mask` (bool or uint8) and `mask_indptr` [bs + 1] in SGLang's
    custom-mask layout (request b's B rows of prefix + B entries from mask_indptr[b]; a tree), to the block rows its
    mask row sets, or, with `causal` False and no mask, to every block row (the drafter's bidirectional block).
    """
    out = torch.empty(q.shape[:2] + (v_block.shape[-1],), dtype=q.dtype, device=q.device) if out is None else out
    run = verify_attention_triton if use_triton(OP, q, triton) else verify_attention_reference
    return run(q, k_block, v_block, k_buffer, v_buffer, kv_indptr, kv_indices, block, sm_scale, out, mask,
               mask_indptr, causal)


def split_count(batch: int, row_tiles: int) -> int:
    """The most prefix splits a (request, row tile) gets: enough programs to fill the GPU, no more."""
    return max(1, min(MAX_SPLITS, TARGET_PROGRAMS // max(1, batch * row_tiles)))


def verify_attention_triton(q, k_block, v_block, k_buffer, v_buffer, kv_indptr, kv_indices, block: int,
                            sm_scale: float, out: torch.Tensor, mask: torch.Tensor | None = None,
                            mask_indptr: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
    """The kernels' launch, wherever Triton runs them (CUDA; CPU tensors under TRITON_INTERPRET=1, as the test
    does). No host sync: the splits come from kv_indptr on the device."""
    tokens, heads, dim = q.shape
    batch, kv_heads, dim_v = tokens // block, k_buffer.shape[1], v_buffer.shape[-1]
    group = heads // kv_heads
    block_m = min(MAX_BLOCK_M, max(16, triton.next_power_of_2(group * block)))
    tiles = triton.cdiv(group * block, block_m)
    block_dv = max(16, triton.next_power_of_2(dim_v))
    max_splits = split_count(batch, kv_heads * tiles)
    part_o = torch.empty((batch, kv_heads * tiles, max_splits, block_m, block_dv), dtype=torch.float32,
                         device=q.device)
    part_lse = torch.empty((batch, kv_heads * tiles, max_splits, block_m), dtype=torch.float32, device=q.device)
    common = dict(B=block, G=group, D=dim, DV=dim_v, BLOCK_M=block_m, TILES=tiles,
                  BLOCK_D=max(16, triton.next_power_of_2(dim)), BLOCK_DV=block_dv, IEEE=q.dtype == torch.float32)
    wide = {"num_warps": 8} if block_m >= 128 and q.is_cuda else {}
    _prefix_splits_kernel[(batch, kv_heads * tiles, max_splits)](
        q, k_buffer, v_buffer, kv_indptr, kv_indices, part_o, part_lse, q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1), float(sm_scale), max_splits,
        MIN_SPLIT, BLOCK_N=BLOCK_N, **common, **wide)
    has_mask = mask is not None
    chunks = triton.cdiv(min(block_m, group * block), MERGE_M)
    _block_and_merge_kernel[(batch, kv_heads * tiles, chunks)](
        q, k_block, v_block, out, kv_indptr, mask if has_mask else kv_indptr, mask_indptr if has_mask else kv_indptr,
        part_o, part_lse, q.stride(0), q.stride(1), k_block.stride(0), k_block.stride(1), v_block.stride(0),
        v_block.stride(1), out.stride(0), out.stride(1), float(sm_scale), max_splits, MIN_SPLIT,
        BLOCK_B=max(16, triton.next_power_of_2(block)), BLOCK_MODE=MASKED if has_mask else (CAUSAL if causal else FULL),
        MERGE_M=MERGE_M, **common)
    return out


def verify_attention_reference(q, k_block, v_block, k_buffer, v_buffer, kv_indptr, kv_indices, block: int,
                               sm_scale: float, out: torch.Tensor, mask: torch.Tensor | None = None,
                               mask_indptr: torch.Tensor | None = None, causal: bool = True) -> torch.Tensor:
    """The same in float32 torch, one request at a time."""
    heads, kv_heads = q.shape[1], k_buffer.shape[1]
    group = heads // kv_heads
    block_causal = torch.ones(block, block, dtype=torch.bool, device=q.device).tril()
    bounds = kv_indptr.tolist()
    for r in range(len(bounds) - 1):
        rows = slice(r * block, (r + 1) * block)
        prefix = bounds[r + 1] - bounds[r]
        slots = kv_indices[bounds[r]:bounds[r + 1]].long()
        keys = torch.cat([k_buffer[slots], k_block[rows]]).float().repeat_interleave(group, dim=1)
        values = torch.cat([v_buffer[slots], v_block[rows]]).float().repeat_interleave(group, dim=1)
        scores = torch.einsum("rhd,khd->hrk", q[rows].float(), keys) * sm_scale
        seen = block_causal if causal else torch.ones_like(block_causal)
        if mask is not None:
            start = int(mask_indptr[r])
            seen = mask[start:start + block * (prefix + block)].view(block, prefix + block)[:, prefix:] != 0
        visible = torch.cat([torch.ones(block, prefix, dtype=torch.bool, device=q.device), seen], dim=1)
        scores = scores.masked_fill(~visible, float("-inf"))
        out[rows] = torch.einsum("hrk,khd->rhd", scores.softmax(-1), values).to(out.dtype)
    return out
