"""dflash_sglang.prefill_rows: a prefill laid out as verify rows computes what one causal pass computes."""

import pytest
import torch

from dflash_sglang.prefill_rows import prefill_rows, rows_needed


def test_rows_cover_each_extend_in_order_with_pads_last():
    rows = prefill_rows([3, 0, 10], [5, 8, 1], width=4)
    assert rows.request.tolist() == [0, 0, 1, 1, 2]
    assert rows.seq_lens.tolist() == [3, 7, 0, 4, 10]
    assert rows.token_index.tolist() == [[0, 1, 2, 3], [4, -1, -1, -1], [5, 6, 7, 8], [9, 10, 11, 12],
                                         [13, -1, -1, -1]]
    assert rows.last_index.tolist() == [4, 15, 16]
    assert rows.row_ends().tolist() == [7, 11, 4, 8, 14]
    assert (rows.num_rows, int(rows.row_ends().max())) == rows_needed([3, 0, 10], [5, 8, 1], 4) == (5, 14)
    assert rows.width == 4


@pytest.mark.parametrize("prefix_lens, extend_lens, width", [([0, 0], [0, 2], 2), ([1], [2, 3], 2), ([0], [4], 0)])
def test_bad_layouts_are_refused(prefix_lens, extend_lens, width):
    with pytest.raises(ValueError, match="one prefix per extend"):
        prefill_rows(prefix_lens, extend_lens, width)


class TinyCausalModel:
    """Two attention layers with residuals (float64): layer 2 reads layer 1's outputs of earlier tokens through the
    cache, so rows only match one pass if every row's K/V of a layer is stored before any row of it attends."""

    def __init__(self, dim=8, vocab=20, layers=2, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.randn(vocab, dim, generator=g, dtype=torch.float64)
        self.qkv = [torch.randn(3, dim, dim, generator=g, dtype=torch.float64) / dim ** 0.5 for _ in range(layers)]

    def positions_mix(self, x, positions):
        return x + 0.1 * torch.sin(positions.double())[:, None]  # position-dependent, like RoPE

    def one_pass(self, tokens):
        """Every token of one sequence, causally."""
        x = self.positions_mix(self.embed[tokens], torch.arange(len(tokens)))
        mask = torch.ones(len(tokens), len(tokens), dtype=torch.bool).tril()
        for wq, wk, wv in self.qkv:
            scores = (x @ wq) @ (x @ wk).T
            x = x + torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ (x @ wv)
        return x

    def rows_pass(self, tokens, positions, slots, seq_lens, req_slots, cache):
        """Verify rows [R, W]: per layer, store every row's K/V at its slots, then each row attends to its request's
        cache up to its length (`req_slots[r]`: the row's request's slot per position) and causally to itself."""
        rows, width = tokens.shape
        x = self.positions_mix(self.embed[tokens.reshape(-1)], positions.reshape(-1)).view(rows, width, -1)
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        for layer, (wq, wk, wv) in enumerate(self.qkv):
            k, v = x @ wk, x @ wv
            cache[layer][0][slots.reshape(-1)] = k.reshape(-1, k.shape[-1])
            cache[layer][1][slots.reshape(-1)] = v.reshape(-1, v.shape[-1])
            out = torch.empty_like(x)
            for r in range(rows):
                prefix = req_slots[r][: int(seq_lens[r])]
                keys = torch.cat([cache[layer][0][prefix], k[r]])
                values = torch.cat([cache[layer][1][prefix], v[r]])
                visible = torch.cat([torch.ones(width, len(prefix), dtype=torch.bool), causal], 1)
                scores = (x[r] @ wq) @ keys.T
                out[r] = torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ values
            x = x + out
        return x


@pytest.mark.parametrize("seed", range(4))
def test_rows_compute_what_one_causal_pass_computes(seed):
    g = torch.Generator().manual_seed(100 + seed)
    model, width, num_slots = TinyCausalModel(seed=seed), int(torch.randint(1, 7, (1,), generator=g)), 400
    batch = int(torch.randint(1, 4, (1,), generator=g))
    prefix_lens = torch.randint(0, 12, (batch,), generator=g).tolist()
    extend_lens = torch.randint(1, 30, (batch,), generator=g).tolist()
    prompts = [torch.randint(0, 20, (p + e,), generator=g) for p, e in zip(prefix_lens, extend_lens)]
    # Each request's slots, position by position (a shuffled pool), slot 0 kept for pads as in SGLang.
    order = torch.randperm(num_slots - 1, generator=g) + 1
    req_to_token, used = [], 0
    for p in prompts:
        req_to_token.append(order[used : used + len(p)])
        used += len(p)
    cache = [[torch.zeros(num_slots, 8, dtype=torch.float64) for _ in range(2)] for _ in model.qkv]
    # The cached prefixes, as a radix-cache hit left them: computed by one pass, stored at their slots.
    for p, prefix, slots in zip(prompts, prefix_lens, req_to_token):
        if prefix:
            x = model.positions_mix(model.embed[p[:prefix]], torch.arange(prefix))
            mask = torch.ones(prefix, prefix, dtype=torch.bool).tril()
            for layer, (wq, wk, wv) in enumerate(model.qkv):
                cache[layer][0][slots[:prefix]], cache[layer][1][slots[:prefix]] = x @ wk, x @ wv
                scores = (x @ wq) @ (x @ wk).T
                x = x + torch.softmax(scores.masked_fill(~mask, float("-inf")), -1) @ (x @ wv)

    rows = prefill_rows(prefix_lens, extend_lens, width)
    extend_tokens = torch.cat([p[prefix:] for p, prefix in zip(prompts, prefix_lens)])
    extend_slots = torch.cat([s[prefix:] for s, prefix in zip(req_to_token, prefix_lens)])
    valid = rows.token_index >= 0
    index = rows.token_index.clamp(min=0)
    tokens = torch.where(valid, extend_tokens[index], 0)
    slots = torch.where(valid, extend_slots[index], 0)
    positions = rows.seq_lens[:, None] + torch.arange(width)
    out = model.rows_pass(tokens, positions, slots, rows.seq_lens, [req_to_token[i] for i in rows.request], cache)
    flat = out.reshape(-1, out.shape[-1])
    for i, (p, prefix, extend) in enumerate(zip(prompts, prefix_lens, extend_lens)):
        want = model.one_pass(p)[prefix:]
        got = flat[(rows.request[:, None].expand(-1, width) == i).reshape(-1) & valid.reshape(-1)]
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(flat[rows.last_index[i]], want[-1], rtol=1e-12, atol=1e-12)
