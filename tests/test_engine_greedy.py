"""Greedy `chain` and `tree` outputs are token-for-token the target's own greedy decoding (`ar`)."""

import dataclasses

import pytest
import torch

from conftest import SMALL_VOCAB

ARCHS = ("qwen3", "llama", "gemma4")
SLIDING_WINDOW = 8  # tiny gemma4 target and drafter; prompts of 20 and 30 tokens exceed it


def prompts_for(seed: int, batch: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 20, 5, 30][:batch] if batch > 1 else [int(torch.randint(1, 30, (1,), generator=g))]
    return [torch.randint(3, SMALL_VOCAB - 1, (n,), generator=g).tolist() for n in lengths]


def install_oracle(engine, monkeypatch, truth: list[list[int]], accuracy: float, second_rank: float, seed: int):
    """Replace the drafter's logits: the true next tokens at rank 1 with prob `accuracy`, at rank 2 with prob
    `second_rank` (only a tree can recover those), else noise. Drives long accepted paths through commit."""
    g = torch.Generator().manual_seed(seed)

    def draft_logits(anchor, start, cache, block):
        bs = anchor.shape[0]
        logits = torch.randn(bs, block - 1, SMALL_VOCAB, generator=g, dtype=torch.float64)
        coins = torch.rand(bs, block - 1, generator=g)
        for b in range(bs):
            for j in range(1, block):
                pos = int(start[b]) + j
                if pos >= len(truth[b]):
                    continue
                tok = truth[b][pos]
                if coins[b, j - 1] < accuracy:
                    logits[b, j - 1, tok] = 20.0
                elif coins[b, j - 1] < accuracy + second_rank:
                    logits[b, j - 1, tok] = 19.0
                    logits[b, j - 1, (tok + 1) % SMALL_VOCAB] = 20.0
        return logits.to(anchor.device)

    monkeypatch.setattr(engine, "draft_logits", draft_logits)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("block_size", [8, 10, 16])
@pytest.mark.parametrize("batch", [1, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_drafter_chain_and_tree_equal_ar(engines, arch, block_size, batch, seed):
    engine = engines[arch]
    prompts = prompts_for(seed, batch)
    ar = engine.generate(prompts, 24, mode="ar").tokens
    chain = engine.generate(prompts, 24, mode="chain", block_size=block_size)
    tree = engine.generate(prompts, 24, mode="tree", block_size=block_size, tree_budget=2 * block_size, tree_topk=3)
    assert chain.tokens == ar
    assert tree.tokens == ar
    assert all(len(t) == 24 for t in ar)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("block_size", [8, 10, 16])
@pytest.mark.parametrize("mode", ["chain", "tree"])
def test_oracle_drafter_long_accepts_stay_lossless(engines, monkeypatch, arch, block_size, mode):
    engine = engines[arch]
    prompts = prompts_for(block_size, 4)
    max_new = 40
    ar = engine.generate(prompts, max_new + block_size, mode="ar").tokens
    truth = [p + a for p, a in zip(prompts, ar)]
    install_oracle(engine, monkeypatch, truth, accuracy=0.8, second_rank=0.15, seed=block_size)
    out = engine.generate(prompts, max_new, mode=mode, block_size=block_size, tree_budget=3 * block_size, tree_topk=2)
    assert out.tokens == [a[:max_new] for a in ar]
    assert out.mean_acceptance > 2.5, "the oracle should make several drafts per step accepted"


def test_tree_recovers_second_ranked_tokens(engines, monkeypatch):
    """With the truth always at rank 2, a chain accepts nothing; a top-2 tree accepts long paths."""
    engine = engines["qwen3"]
    prompts = prompts_for(7, 4)
    ar = engine.generate(prompts, 60, mode="ar").tokens
    truth = [p + a for p, a in zip(prompts, ar)]
    install_oracle(engine, monkeypatch, truth, accuracy=0.0, second_rank=1.0, seed=0)
    chain = engine.generate(prompts, 40, mode="chain", block_size=8)
    tree = engine.generate(prompts, 40, mode="tree", block_size=8, tree_budget=32, tree_topk=2)
    assert chain.tokens == tree.tokens == [a[:40] for a in ar]
    assert chain.mean_acceptance == 1.0
    assert tree.mean_acceptance > 2.0


def test_eos_stops_each_row_where_ar_does(engines):
    engine = engines["gemma4"]
    prompts = prompts_for(3, 4)
    ar = engine.generate(prompts, 30, mode="ar").tokens
    eos = ar[0][10]
    expected = [a[: a.index(eos) + 1] if eos in a else a for a in ar]
    for mode in ("ar", "chain", "tree"):
        assert engine.generate(prompts, 30, mode=mode, eos_token_id=eos).tokens == expected


def test_tokens_equal_to_the_mask_id_are_kept(engines, monkeypatch):
    """z-lab bug #76 stripped generated tokens equal to mask_token_id; output is cut by position only."""
    engine = engines["llama"]
    prompts = prompts_for(5, 2)
    ar = engine.generate(prompts, 20, mode="ar").tokens
    mask_like = ar[0][3]
    monkeypatch.setattr(engine.drafter, "cfg", dataclasses.replace(engine.drafter.cfg, mask_token_id=mask_like))
    assert engine.generate(prompts, 20, mode="chain").tokens == ar
    assert mask_like in engine.generate(prompts, 20, mode="tree").tokens[0]


def test_prefix_is_never_recomputed(engines):
    """Each target forward sees only new tokens: the cache keeps the committed prefix."""
    engine = engines["qwen3"]
    seen = []
    handle = engine.target.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["input_ids"].shape[1]),
                                                           with_kwargs=True)
    try:
        out = engine.generate([list(range(3, 40))], 20, mode="chain", block_size=8)
    finally:
        handle.remove()
    assert seen[0] == 37 and all(w == 8 for w in seen[1:])
    assert len(seen) == out.target_forwards
