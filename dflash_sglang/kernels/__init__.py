"""CUDA kernels for DDTree speculative decoding (tree build, the verify's slots and mask, greedy and sampling
verify, commit), the chain step's block and greedy acceptance, and the drafter's context K/V (key norm, RoPE,
layer-major layout, or straight into the KV pool), with their torch references. Each op runs its kernel for CUDA tensors when the library builds
or loads (`jit.py`), else the reference; the choice is logged once per op. No op synchronizes with the host;
outputs are fixed-size and padded.
"""

from dflash_sglang.kernels.buffers import (ChainBlock, ChainStep, ContextKV, TreeBuffers, TreeCommit, VerifyInputs,
                                          VerifyResult)
from dflash_sglang.kernels.chain import chain_accept_greedy, chain_block, chain_step
from dflash_sglang.kernels.commit import commit_tree
from dflash_sglang.kernels.context_kv import PoolLayers, context_kv_norm_rope, context_kv_to_pool, pool_layers
from dflash_sglang.kernels.reference import tree_links
from dflash_sglang.kernels.tree_build import build_draft_tree
from dflash_sglang.kernels.tree_verify import (draw_verify_randoms, tree_verify_inputs, verify_tree_greedy,
                                               verify_tree_sampling)

__all__ = [
    "ChainBlock",
    "ChainStep",
    "ContextKV",
    "PoolLayers",
    "TreeBuffers",
    "TreeCommit",
    "VerifyInputs",
    "VerifyResult",
    "build_draft_tree",
    "chain_accept_greedy",
    "chain_block",
    "chain_step",
    "commit_tree",
    "context_kv_norm_rope",
    "context_kv_to_pool",
    "draw_verify_randoms",
    "pool_layers",
    "tree_links",
    "tree_verify_inputs",
    "verify_tree_greedy",
    "verify_tree_sampling",
]
