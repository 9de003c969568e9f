"""The verify attention kernel (dflash_sglang/kernels/split_attention.py): its torch reference against a plain softmax
over each request's prefix and its block (causal for a chain, a random tree's ancestors through SGLang's custom-mask
layout), the Triton kernel against the reference in Triton's CPU interpreter, and on the GPU (`-m gpu`, run on the
box by scripts/device/kernel_tests.sh)."""

from __future__ import annotations

import pytest
import torch

from dflash_sglang.kernels import split_attention

# (query heads, KV heads, head dim, block, prefix lengths): GQA groups of 1, 3, 8 and 16 (16 x 16 rows: two row
# tiles), a head dim that is no power of two, blocks of 16, 8 and 1, empty prefixes, prefixes shorter than a split
# and longer than several.
CASES = [
    (4, 4, 32, 16, [0, 5, 64]),
    (9, 3, 64, 16, [200, 1, 70, 0]),
    (8, 1, 80, 8, [300]),
    (16, 2, 32, 1, [3, 129]),
    (32, 2, 16, 16, [150, 7]),
]


def attention_inputs(heads, kv_heads, dim, block, lengths, seed, dtype=torch.float32, device="cpu"):
    """Random queries, block K/V and a pool whose prefixes sit in scattered slots; kv_indptr and kv_indices."""
    g = torch.Generator().manual_seed(seed)
    batch, slots = len(lengths), sum(lengths) + 7
    pool_k = torch.randn(slots, kv_heads, dim, generator=g)
    pool_v = torch.randn(slots, kv_heads, dim, generator=g)
    indices = torch.randperm(slots, generator=g)[: sum(lengths)]
    indptr = torch.tensor([0] + lengths).cumsum(0).to(torch.int32)
    q = torch.randn(batch * block, heads, dim, generator=g)
    k_block = torch.randn(batch * block, kv_heads, dim, generator=g)
    v_block = torch.randn(batch * block, kv_heads, dim, generator=g)
    floats = [t.to(device=device, dtype=dtype) for t in (q, k_block, v_block, pool_k, pool_v)]
    return (*floats, indptr.to(device), indices.to(device))


def fused_views(q, k_block, v_block):
    """The same values as views of one fused qkv tensor, as a model's projection leaves them (rows strided by the
    fused width): what the serving path hands the kernel."""
    tokens = q.shape[0]
    qkv = torch.cat([q.reshape(tokens, -1), k_block.reshape(tokens, -1), v_block.reshape(tokens, -1)], dim=1)
    q_flat, k_flat, v_flat = qkv.split([q[0].numel(), k_block[0].numel(), v_block[0].numel()], dim=1)
    return q_flat.view(q.shape), k_flat.view(k_block.shape), v_flat.view(v_block.shape)


def tree_mask(lengths, block, seed):
    """A random tree per request (node 0 the root, each later node under an earlier one): [bs, B, B] ancestor
    masks, and the same flattened in SGLang's custom-mask layout (B rows of prefix + B, the prefix's set) with its
    mask_indptr."""
    g = torch.Generator().manual_seed(seed)
    ancestors, flat = [], []
    for prefix in lengths:
        seen = torch.eye(block, dtype=torch.bool)
        for node in range(1, block):
            parent = int(torch.randint(0, node, (1,), generator=g))
            seen[node] |= seen[parent]
        ancestors.append(seen)
        flat.append(torch.cat([torch.ones(block, prefix, dtype=torch.bool), seen], dim=1).reshape(-1))
    indptr = torch.tensor([0] + [block * (prefix + block) for prefix in lengths]).cumsum(0)
    return torch.stack(ancestors), torch.cat(flat), indptr


def plain_attention(q, k_block, v_block, pool_k, pool_v, indptr, indices, block, scale, ancestors=None,
                    causal=True):
    """Row j of request r, query head h: softmax over its prefix's keys and the block keys it sees (0..j, its tree
    ancestors, or all), one row at a time."""
    heads, kv_heads = q.shape[1], pool_k.shape[1]
    out = torch.empty(q.shape[0], heads, pool_v.shape[-1], dtype=torch.float64)
    for r in range(len(indptr) - 1):
        slots = indices[int(indptr[r]):int(indptr[r + 1])].long()
        for j in range(block):
            row = r * block + j
            seen = (torch.arange(block) <= j) | (not causal) if ancestors is None else ancestors[r, j]
            for h in range(heads):
                kv = h // (heads // kv_heads)
                keys = torch.cat([pool_k[slots, kv], k_block[r * block:(r + 1) * block, kv][seen]]).double()
                values = torch.cat([pool_v[slots, kv], v_block[r * block:(r + 1) * block, kv][seen]]).double()
                weights = torch.softmax(keys @ q[row, h].double() * scale, dim=0)
                out[row, h] = weights @ values
    return out


@pytest.mark.parametrize("mode", ["chain", "tree", "full"])
@pytest.mark.parametrize("case", range(len(CASES)))
def test_reference_is_each_rows_softmax_over_its_prefix_and_the_block_rows_it_sees(case, mode):
    heads, kv_heads, dim, block, lengths = CASES[case]
    inputs = attention_inputs(heads, kv_heads, dim, block, lengths, seed=case)
    scale = dim ** -0.5
    ancestors, mask, mask_indptr = tree_mask(lengths, block, seed=case) if mode == "tree" else (None, None, None)
    out = split_attention.verify_attention_reference(*inputs, block, scale, torch.empty_like(inputs[0]), mask,
                                                     mask_indptr, mode != "full")
    want = plain_attention(*inputs, block, scale, ancestors, causal=mode != "full")
    assert torch.allclose(out.double(), want, atol=1e-5)


def test_cpu_inputs_run_the_reference():
    inputs = attention_inputs(4, 2, 16, 4, [3, 9], seed=11)
    out = split_attention.verify_attention(*inputs, 4, 0.25)
    want = split_attention.verify_attention_reference(*inputs, 4, 0.25, torch.empty_like(inputs[0]))
    assert torch.equal(out, want)


def test_split_count_fills_the_gpu_and_stays_within_bounds():
    assert split_attention.split_count(1, 8) == split_attention.MAX_SPLITS
    assert split_attention.split_count(4, 8) == 8 and split_attention.split_count(32, 3) == 2
    assert split_attention.split_count(48, 8) == 1 and split_attention.split_count(0, 0) == split_attention.MAX_SPLITS


def test_kernel_matches_its_reference_in_tritons_interpreter(triton_interpreter):
    """Both Triton kernels run by Triton's CPU interpreter, float32, every case above as a chain, as a tree (bool and
    uint8 masks) and as the drafter's full block, against the reference on fresh random inputs; every other case with
    the block's q, K and V strided, as the serving path passes them."""
    script = """
import torch
from dflash_sglang.kernels import split_attention
from tests.test_split_attention import CASES, attention_inputs, fused_views, tree_mask
for seed, (heads, kv_heads, dim, block, lengths) in enumerate(CASES):
    inputs = attention_inputs(heads, kv_heads, dim, block, lengths, seed=100 + seed)
    if seed % 2:  # every other case reads q and the block's K/V as strided views of one fused tensor
        inputs = (*fused_views(*inputs[:3]), *inputs[3:])
        assert not inputs[1].is_contiguous()
    scale = dim ** -0.5
    _, mask, mask_indptr = tree_mask(lengths, block, seed=200 + seed)
    for how in ((None, None, True), (mask, mask_indptr, True), (mask.to(torch.uint8), mask_indptr, True),
                (None, None, False)):
        got = split_attention.verify_attention_triton(*inputs, block, scale, torch.empty_like(inputs[0]), *how)
        want = split_attention.verify_attention_reference(*inputs, block, scale, torch.empty_like(inputs[0]), *how)
        assert torch.allclose(got, want, atol=1e-5), (seed, how[0] is not None, how[2], (got - want).abs().max())
print("ok", len(CASES))
"""
    assert triton_interpreter(script).split() == ["ok", str(len(CASES))]


@pytest.mark.gpu
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("mode", ["chain", "tree", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout,lengths", [((64, 8, 128, 16), [37, 1024, 4100]),
                                            ((9, 3, 64, 16), [0, 200, 511, 64] * 8),
                                            ((32, 8, 128, 1), [5, 3000]),
                                            ((64, 8, 128, 64), [300, 2000])])
def test_kernel_matches_its_reference_on_cuda(dtype, layout, lengths, mode, fused):
    """On the GPU at Qwen3-32B's and SmolLM2's head layouts (a one-row verify, a 64-node tree's width), chains,
    trees and the drafter's full block, against the float32 reference; q and the block's K/V contiguous, or strided
    views of one fused tensor as the serving path passes them."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    heads, kv_heads, dim, block = layout
    inputs = attention_inputs(heads, kv_heads, dim, block, lengths, seed=5, dtype=dtype, device="cuda")
    if fused:
        inputs = (*fused_views(*inputs[:3]), *inputs[3:])
    how = (None, None, mode == "chain")
    if mode == "tree":
        _, mask, mask_indptr = tree_mask(lengths, block, seed=6)
        how = (mask.to(device="cuda", dtype=torch.uint8), mask_indptr.cuda(), True)
    scale = dim ** -0.5
    got = split_attention.verify_attention(*inputs, block, scale, None, *how)
    floats = [t.float() if t.is_floating_point() else t for t in inputs]
    want = split_attention.verify_attention_reference(*floats, block, scale, torch.empty(inputs[0].shape,
                                                      device="cuda"), *how)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(got.float(), want, atol=tol), (got.float() - want).abs().max()
