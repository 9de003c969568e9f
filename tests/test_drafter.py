"""Reference drafter semantics (attention pattern, context injection, norms, RoPE) and target feature capture."""

import dataclasses

import pytest
import torch

from dflash_sglang.config import RopeConfig, parse_drafter_config
from dflash_sglang.drafter import ContextCache, DFlashDrafter, RMSNorm, rope_inv_freq
from dflash_sglang.target import TargetModel
from dflash_sglang.tiny import drafter_config_dict, random_drafter_state

H, FEATURES, BLOCK = 32, 2, 6


def make_drafter(layer_types, window=4, causal=None, seed=0):
    raw = drafter_config_dict("qwen3", hidden=H, vocab=64, num_target_layers=4, draft_layers=len(layer_types),
                              block_size=BLOCK, mask_token_id=63, window=window, num_features=FEATURES)
    raw.update(layer_types=layer_types, sliding_window=window)
    if causal is not None:
        raw["is_causal"] = causal
    cfg = parse_drafter_config(raw)
    drafter = DFlashDrafter(cfg)
    drafter.load_state_dict(random_drafter_state(raw, seed, std=0.2))
    return drafter.double().eval()


def run(drafter, features, block, start):
    """Context = `features` at positions 0..start-1; block at start..start+B-1."""
    cache = ContextCache.empty(drafter.cfg, 1, "cpu", torch.float64)
    positions = torch.arange(start)[None]
    cache.append(*drafter.context_kv(features, positions), positions, torch.ones(1, start, dtype=torch.bool))
    return drafter(block, start + torch.arange(BLOCK)[None], cache)


@pytest.fixture
def inputs():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 10, FEATURES * H, generator=g, dtype=torch.float64),
            torch.randn(1, BLOCK, H, generator=g, dtype=torch.float64))


def test_full_layers_are_bidirectional_in_the_block(inputs):
    features, block = inputs
    drafter = make_drafter(["full_attention"] * 2)
    changed = block.clone()
    changed[:, -1] += 1.0
    assert not torch.allclose(run(drafter, features, block, 10)[:, 0], run(drafter, features, changed, 10)[:, 0])


def test_sliding_layers_are_causal_unless_configured(inputs):
    features, block = inputs
    changed = block.clone()
    changed[:, -1] += 1.0
    causal = make_drafter(["sliding_attention"] * 2, window=64)
    assert torch.allclose(run(causal, features, block, 10)[:, :-1], run(causal, features, changed, 10)[:, :-1])
    bidirectional = make_drafter(["sliding_attention"] * 2, window=64, causal=False)
    assert not torch.allclose(run(bidirectional, features, block, 10)[:, 0],
                              run(bidirectional, features, changed, 10)[:, 0])


def test_window_hides_old_context_only_in_sliding_layers(inputs):
    features, block = inputs
    old_changed = features.clone()
    old_changed[:, 0] += 1.0  # position 0; block starts at 10, window 4 -> invisible
    sliding = make_drafter(["sliding_attention"] * 2, window=4)
    assert torch.allclose(run(sliding, features, block, 10), run(sliding, old_changed, block, 10))
    full = make_drafter(["full_attention"] * 2)
    assert not torch.allclose(run(full, features, block, 10), run(full, old_changed, block, 10))


def test_context_enters_every_layer_and_increments_match_one_shot(inputs):
    features, block = inputs
    drafter = make_drafter(["sliding_attention", "full_attention"], window=8)
    one_shot = run(drafter, features, block, 10)
    cache = ContextCache.empty(drafter.cfg, 1, "cpu", torch.float64)
    for lo, hi in ((0, 3), (3, 4), (4, 10)):
        pos = torch.arange(lo, hi)[None]
        # pad each chunk with an invalid row, as the engine does for rejected nodes
        feats = torch.cat([features[:, lo:hi], torch.randn(1, 1, FEATURES * H, dtype=torch.float64)], dim=1)
        pos = torch.cat([pos, torch.tensor([[99]])], dim=1)
        valid = torch.tensor([[True] * (hi - lo) + [False]])
        cache.append(*drafter.context_kv(feats, pos), pos, valid)
    assert cache.positions.tolist() == [list(range(10))]
    assert torch.allclose(drafter(block, 10 + torch.arange(BLOCK)[None], cache), one_shot)


def test_gemma_norm_is_one_plus_weight():
    x = torch.randn(3, 8, dtype=torch.float64)
    gemma, plain = RMSNorm(8, 1e-6, gemma=True).double(), RMSNorm(8, 1e-6).double()
    assert torch.allclose(gemma(x), plain(x))
    with torch.no_grad():
        gemma.weight.fill_(1.0)
        plain.weight.fill_(2.0)
    assert torch.allclose(gemma(x), plain(x))


def test_yarn_with_factor_one_is_plain_rope():
    base = rope_inv_freq(RopeConfig(theta=1e6), 64, 4096)
    yarn = rope_inv_freq(RopeConfig(theta=1e6, rope_type="yarn", factor=1.0), 64, 4096)
    assert torch.allclose(base[0], yarn[0]) and base[1] == yarn[1] == 1.0
    scaled = rope_inv_freq(RopeConfig(theta=1e6, rope_type="yarn", factor=4.0), 64, 4096)
    assert scaled[0][-1] < base[0][-1] and scaled[1] > 1.0 and torch.isclose(scaled[0][0], base[0][0])


def test_softcap_and_output_multiplier(inputs):
    drafter = make_drafter(["full_attention"])
    head = torch.nn.Linear(H, 64, bias=False).double()
    torch.nn.init.normal_(head.weight, std=5.0)
    hidden = inputs[1]
    assert drafter.logits(hidden, head, 3.0).abs().max() <= 3.0
    drafter.cfg = dataclasses.replace(drafter.cfg, output_multiplier=0.5)
    assert torch.allclose(drafter.logits(hidden, head, None), 0.5 * head(hidden))


@pytest.mark.parametrize("arch", ["qwen3", "llama", "gemma4"])
def test_features_are_decoder_layer_outputs(tiny_pairs, arch):
    """Feature of layer l == HF hidden_states[l + 1]; the last layer's is the pre-norm residual."""
    target_dir, _ = tiny_pairs[arch]
    probe = TargetModel.load(target_dir, dtype=torch.float64)
    n = probe.text_config.num_hidden_layers
    target = TargetModel(probe.model, [0, n - 2, n - 1])
    ids = torch.tensor([[5, 9, 11, 13, 17]])
    cache = target.new_cache(1)
    _, features = target.forward(cache, ids, torch.arange(5)[None], torch.ones(5, 5, dtype=torch.bool).tril()[None])
    hidden = target.model(input_ids=ids, output_hidden_states=True).hidden_states
    feats = features.split(target.text_config.hidden_size, dim=-1)
    assert torch.allclose(feats[0], hidden[1]) and torch.allclose(feats[1], hidden[n - 1])
    assert not torch.allclose(feats[2], hidden[n]), "HF's last hidden state is normed; ours is the raw residual"


@pytest.mark.parametrize("arch", ["qwen3", "llama", "gemma4"])
def test_causal_forward_features_equal_the_masked_forward_on_real_tokens(tiny_pairs, arch):
    """Training's mask-free forward gives every real token of right-padded rows the features the engine's masked
    forward gives it, and final states whose head logits are the engine's (Gemma 4's sliding layers included: the
    rows are longer than its window)."""
    target_dir, _ = tiny_pairs[arch]
    probe = TargetModel.load(target_dir, dtype=torch.float64)
    n = probe.text_config.num_hidden_layers
    target = TargetModel(probe.model, [0, n // 2, n - 1])
    lengths = torch.tensor([23, 9, 17])
    width = 24
    ids = torch.randint(3, 200, (3, width), generator=torch.Generator().manual_seed(5))
    real = torch.arange(width)[None] < lengths[:, None]
    ids = ids * real
    intra = (torch.ones(width, width, dtype=torch.bool).tril() & real[:, None, :]) | torch.eye(width, dtype=torch.bool)
    logits, masked = target.forward(target.new_cache(3), ids, torch.arange(width).expand(3, -1), intra)
    causal, final_hidden = target.causal_forward(ids)
    assert torch.allclose(causal[real], masked[real], atol=1e-10)
    head_logits = target.lm_head(final_hidden)
    if target.softcap:
        head_logits = target.softcap * torch.tanh(head_logits / target.softcap)
    assert torch.allclose(head_logits[real].float(), logits[real], atol=1e-5)  # the engine returns float32 logits
