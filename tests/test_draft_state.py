"""DraftState.prepare_for_decode (dflash_sglang/sglang/draft_state.py) against SGLang 0.5.16's own method.

Both run SGLang's real alloc_for_spec_decode over a fake pool (page size 1) and a real req_to_token table. With
its top-up set to SGLang's floor, ours must leave exactly what SGLang's leaves; with the top-up, every step must
still find 2W slots reserved past each committed length, with distinct slots that came from the pool, while
allocating on a fraction of the steps; a pool without room for the top-up gets SGLang's floor."""

import random
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("sglang.srt.speculative.dflash_info_v2")

import sglang.srt.mem_cache.allocation as allocation  # noqa: E402
import sglang.srt.speculative.dflash_info_v2 as dflash_info_v2  # noqa: E402

import dflash_sglang.sglang.draft_state as draft_state  # noqa: E402
from dflash_sglang.sglang.worker import next_draft_state  # noqa: E402

WIDTH = 16
POOL_LEN = 4096


class FakeAllocator:
    """Page size 1: hands out free slots in order, counts the calls."""

    page_size = 1

    def __init__(self, size: int):
        self.free = list(range(1, size + 1))  # slot 0 is SGLang's padding slot
        self.calls = 0

    def available_size(self) -> int:
        return len(self.free)

    def alloc(self, n: int):
        if n > len(self.free):
            return None
        self.calls += 1
        out, self.free = self.free[:n], self.free[n:]
        return torch.tensor(out, dtype=torch.int64)


class FakeTreeCache:
    def __init__(self, allocator):
        self.token_to_kv_pool_allocator = allocator

    def is_chunk_cache(self) -> bool:
        return True  # nothing to evict


def assign_reference(req_pool_indices, req_to_token, start, end, out_cache_loc, batch_size):
    """SGLang's req_to_token write (a Triton kernel there), in torch: each request's new slots, in order."""
    offset = 0
    for i in range(batch_size):
        n = int(end[i] - start[i])
        req_to_token[int(req_pool_indices[i]), int(start[i]) : int(end[i])] = out_cache_loc[offset : offset + n]
        offset += n


@pytest.fixture(autouse=True)
def sglang_on_cpu(monkeypatch):
    args = SimpleNamespace(speculative_num_draft_tokens=WIDTH)
    monkeypatch.setattr(allocation, "assign_req_to_token_pool_func", assign_reference)
    monkeypatch.setattr(dflash_info_v2, "get_server_args", lambda: args)
    monkeypatch.setattr(draft_state, "get_server_args", lambda: args)


def make_batch(committed: list[int], pool_size: int):
    allocator = FakeAllocator(pool_size)
    reqs = [SimpleNamespace(kv_committed_len=c, kv=SimpleNamespace(kv_allocated_len=c),
                            sampling_params=SimpleNamespace(top_k=1)) for c in committed]
    req_to_token = torch.zeros((len(reqs) + 1, POOL_LEN), dtype=torch.int32)
    for i, c in enumerate(committed):  # the prompt's slots, as prefill left them
        req_to_token[i + 1, :c] = allocator.alloc(c).to(torch.int32)
    allocator.calls = 0
    return SimpleNamespace(
        reqs=reqs, device="cpu", token_to_kv_pool_allocator=allocator, tree_cache=FakeTreeCache(allocator),
        req_to_token_pool=SimpleNamespace(req_to_token=req_to_token),
        req_pool_indices=torch.arange(1, len(reqs) + 1, dtype=torch.int64), seq_lens_cpu=None, seq_lens_sum=None,
        batch_size=lambda: len(reqs),
    )


def sglangs_state():
    """SGLang's own class, as its builtin worker relays it."""
    empty = torch.empty((0,), dtype=torch.int64)
    return dflash_info_v2.DFlashDraftInputV2(topk_p=empty, topk_index=empty, bonus_tokens=empty,
                                             new_seq_lens=empty, hidden_states=empty)


def ours():
    empty = torch.empty((0,), dtype=torch.int64)
    return next_draft_state(empty, empty)


def commit(batch, rng):
    for req in batch.reqs:
        req.kv_committed_len += rng.randint(1, WIDTH)  # at most a block per step, as the worker commits


def check_reserved(batch, state, pool_size):
    """Every request has 2W slots past its committed length, distinct across requests, taken from the pool."""
    rows = []
    for i, req in enumerate(batch.reqs):
        assert req.kv.kv_allocated_len >= req.kv_committed_len + 2 * WIDTH
        rows.append(batch.req_to_token_pool.req_to_token[i + 1, : req.kv.kv_allocated_len])
    slots = torch.cat(rows)
    assert len(set(slots.tolist())) == slots.numel() and int(slots.min()) >= 1 and int(slots.max()) <= pool_size
    assert state.reserved_seq_lens_cpu.tolist() == [r.kv.kv_allocated_len for r in batch.reqs]
    assert state.reserved_seq_lens_sum == sum(r.kv.kv_allocated_len for r in batch.reqs)
    assert batch.seq_lens_cpu.tolist() == [r.kv_committed_len for r in batch.reqs]
    assert batch.seq_lens_cpu.dtype == torch.int64 and batch.seq_lens_sum == sum(batch.seq_lens_cpu.tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_with_sglangs_floor_as_top_up_it_leaves_what_sglang_leaves(monkeypatch, seed):
    monkeypatch.setattr(draft_state, "TOPPED_UP_WIDTHS", draft_state.RESERVED_WIDTHS)
    rng = random.Random(seed)
    prompts = [rng.randint(1, 300) for _ in range(rng.randint(1, 40))]
    theirs_batch, ours_batch = make_batch(prompts, 100_000), make_batch(prompts, 100_000)
    theirs_state, ours_state = sglangs_state(), ours()
    for step in range(12):
        step_rng = random.Random(seed * 100 + step)
        commit(theirs_batch, step_rng)
        commit(ours_batch, random.Random(seed * 100 + step))
        theirs_state.prepare_for_decode(theirs_batch)
        ours_state.prepare_for_decode(ours_batch)
        assert ours_batch.seq_lens_cpu.tolist() == theirs_batch.seq_lens_cpu.tolist()
        assert ours_batch.seq_lens_sum == theirs_batch.seq_lens_sum
        assert ours_state.reserved_seq_lens_cpu.tolist() == theirs_state.reserved_seq_lens_cpu.tolist()
        assert ours_state.reserved_seq_lens_sum == theirs_state.reserved_seq_lens_sum
        assert [r.kv.kv_allocated_len for r in ours_batch.reqs] == [r.kv.kv_allocated_len for r in theirs_batch.reqs]
        assert torch.equal(ours_batch.req_to_token_pool.req_to_token, theirs_batch.req_to_token_pool.req_to_token)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_top_up_keeps_the_floor_and_allocates_on_few_steps(seed):
    rng = random.Random(seed)
    prompts = [rng.randint(1, 300) for _ in range(32)]
    batch, state, steps = make_batch(prompts, 200_000), ours(), 60
    for _ in range(steps):
        for req in batch.reqs:
            req.kv_committed_len += rng.randint(1, 5)  # ~3 tokens a step, a chain's acceptance
        state.prepare_for_decode(batch)
        check_reserved(batch, state, 200_000)
    # Every step would allocate under SGLang's floor (each request commits >= 1 token); a top-up of every request
    # (2W more) lasts until the fastest one has committed 2W: at <= 5 tokens a step, >= 7 steps.
    assert batch.token_to_kv_pool_allocator.calls <= steps // 7 + 1


def test_the_top_up_stays_inside_the_req_to_token_row():
    row_end = POOL_LEN - 1  # the last column a request may use
    batch, state = make_batch([row_end - 40, 100], 100_000), ours()
    batch.req_to_token_pool.req_to_token = batch.req_to_token_pool.req_to_token[:, :row_end]
    state.prepare_for_decode(batch)
    check_reserved(batch, state, 100_000)
    assert [r.kv.kv_allocated_len for r in batch.reqs] == [row_end, 100 + 4 * WIDTH]


def test_a_pool_without_room_for_the_top_up_gets_the_floor():
    prompts = [100] * 8
    floor_need = 8 * 2 * WIDTH
    batch = make_batch(prompts, 800 + floor_need + 10)  # room for the floor, not for 4W each
    state = ours()
    state.prepare_for_decode(batch)
    check_reserved(batch, state, 800 + floor_need + 10)
    assert [r.kv.kv_allocated_len for r in batch.reqs] == [100 + 2 * WIDTH] * 8
    assert batch.token_to_kv_pool_allocator.available_size() == 10


def test_reservation_policy():
    # all at or above the floor -> unchanged; one short -> all topped up to 4W; no room for that -> the floor
    assert draft_state.reservation([10, 10], [10 + 32, 10 + 40], 16, 0, 4096) == [42, 50]
    assert draft_state.reservation([10, 10], [10 + 32, 10 + 31], 16, 1000, 4096) == [10 + 64, 10 + 64]
    assert draft_state.reservation([10, 10], [10 + 32, 10 + 31], 16, 40, 4096) == [42, 42]
    assert draft_state.reservation([5, 10], [200, 10], 16, 1000, 4096) == [200, 10 + 64]
    # near the end of the req_to_token row the top-up stops there; the floor stays (the row headroom holds it)
    assert draft_state.reservation([2030, 10], [2060, 10], 16, 1000, 2084) == [2084, 10 + 64]
    assert draft_state.reservation([2050, 10], [2060, 10], 16, 1000, 2084) == [2084, 10 + 64]
