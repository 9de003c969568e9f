"""The draft state SGLang relays between our decode steps, with a KV reservation that allocates in chunks.

SGLang's `DFlashDraftInputV2.prepare_for_decode` runs before every decode step. It keeps each request's KV slots
reserved 2W tokens past its committed length (W: the verify width, `--speculative-num-draft-tokens`), so the
worker can take a step's slots straight from `req_to_token`. Every step commits a few tokens, so every step
allocates a few more: per step it makes fresh pinned and device scratch buffers, copies both length vectors to
the GPU and launches the req_to_token write, with a Python loop over the requests around it. On the H200 with a
135M target that was ~0.4 ms of host time per step at one request and ~1.2 ms at 32
(scripts/device/host_profile.sh, 2026-11-30), where AR's whole step is ~1.8 ms.

`DraftState` keeps SGLang's guarantee (at least 2W reserved past the committed length before each step), but when
a request falls short it tops every request up to 4W at once, memory permitting, so a chain that commits ~3 tokens
a step allocates every ~8 steps. Steps in between only read the lengths. The allocation itself is SGLang's
(`alloc_for_spec_decode`); page sizes above 1, sliding-window pools and SGLang's overlap plan stream keep SGLang's
own method.
"""

from __future__ import annotations

import torch
from sglang.srt.environ import envs
from sglang.srt.mem_cache.allocation import alloc_for_spec_decode
from sglang.srt.mem_cache.allocator.swa import SWATokenToKVPoolAllocator
from sglang.srt.runtime_context import get_server_args
from sglang.srt.speculative.dflash_info_v2 import DFlashDraftInputV2

# SGLang's floor: slots reserved past the committed length before a step, in verify widths.
RESERVED_WIDTHS = 2
# What a request short of the floor is topped up to, when the pool has room for it.
TOPPED_UP_WIDTHS = 4


class DraftState(DFlashDraftInputV2):
    """DFlashDraftInputV2 with a chunked KV reservation; everything else (relay, filter, merge) is SGLang's."""

    def prepare_for_decode(self, batch) -> None:
        allocator = batch.token_to_kv_pool_allocator
        if (allocator.page_size != 1 or isinstance(allocator, SWATokenToKVPoolAllocator)
                or envs.SGLANG_ENABLE_OVERLAP_PLAN_STREAM.get()):
            return super().prepare_for_decode(batch)
        reqs = batch.reqs
        if not reqs:
            return None
        width = int(get_server_args().speculative_num_draft_tokens)
        committed = [req.kv_committed_len for req in reqs]
        allocated = [req.kv.kv_allocated_len for req in reqs]
        row_length = batch.req_to_token_pool.req_to_token.shape[1]
        reserved = reservation(committed, allocated, width, allocator.available_size(), row_length)
        needed = sum(reserved) - sum(allocated)
        reserved_cpu = torch.tensor(reserved, dtype=torch.int32)
        if needed > 0:
            allocated_cpu = torch.tensor(allocated, dtype=torch.int32)
            alloc_for_spec_decode(
                batch.tree_cache,
                batch.req_to_token_pool,
                reqs=reqs,
                req_pool_indices=batch.req_pool_indices,
                cur_kv_lens=to_device(allocated_cpu, batch.device),
                cur_kv_lens_cpu=allocated_cpu,
                nxt_kv_lens=to_device(reserved_cpu, batch.device),
                nxt_kv_lens_cpu=reserved_cpu,
                num_needed_tokens=needed,
                batch=batch,
            )
        # What SGLang's method leaves behind: the committed lengths on the host (overlap scheduling overwrites
        # them with the published ones) and the reservation, the upper bound the worker plans attention with.
        batch.seq_lens_cpu = torch.tensor(committed, dtype=torch.int64)
        batch.seq_lens_sum = sum(committed)
        self.reserved_seq_lens_cpu = reserved_cpu
        self.reserved_seq_lens_sum = sum(reserved)
        return None


def reservation(committed: list[int], allocated: list[int], width: int, available: int,
                row_length: int) -> list[int]:
    """Each request's KV length after this step's allocation.

    While every request has RESERVED_WIDTHS * width slots past its committed length, nothing changes. Once one
    falls short, every request is topped up to TOPPED_UP_WIDTHS * width in the same allocation (topping up only
    the short one would have requests, which commit at different rates, fall short on different steps: an
    allocation nearly every step again). A top-up stops at the end of the request's `req_to_token` row
    (`row_length`: the plugin's row headroom holds the floor past the context length, not the top-up). When the
    pool's free slots (`available`) cannot cover the top-ups, each request gets just the floor (SGLang's scheduler
    checked the floor's slots before the step, not the top-up's).
    """
    floor = [max(a, c + RESERVED_WIDTHS * width) for c, a in zip(committed, allocated)]
    if floor == allocated:
        return allocated
    topped = [max(f, min(c + TOPPED_UP_WIDTHS * width, row_length)) for c, f in zip(committed, floor)]
    return topped if sum(topped) - sum(allocated) <= available else floor


def to_device(values: torch.Tensor, device) -> torch.Tensor:
    """An asynchronous copy from a fresh pinned tensor: the caching host allocator does not hand its block out again
    before the copy has run (a buffer reused across steps could be rewritten under a copy still queued)."""
    if torch.device(device).type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)
