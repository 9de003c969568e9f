"""Sampled `chain` and `tree` outputs have the target's distribution (chi-square against the exact one).

Setup: a tiny target with an 8-token vocabulary whose head is scaled up so its distributions are peaked,
the drafter sharing that head (so q differs from p but is far from uniform). 8,000 independent samples of
the first three generated tokens (one batch row each; the first from prefill, the next two from one
speculative step with block size 4) are compared with the exact joint law computed by enumerating all
8^2 prefixes through the target. Cells with expected count < 5 are pooled. The test fails at
significance ALPHA = 1e-3; a sampler with a known bias is shown to be rejected at the same level.
"""

import pytest
import scipy.stats
import torch

import dflash_sglang.engine as engine_module
import dflash_sglang.verify as verify_module
from dflash_sglang.engine import DFlashEngine
from dflash_sglang.tiny import make_tiny
from dflash_sglang.verify import SamplingParams, sampling_probs

VOCAB = 8
PROMPT = [3, 4, 5]
SAMPLES = 8_000
ALPHA = 1e-3
PARAMS = {
    "t1": SamplingParams(temperature=1.0),
    "t0.7-topk5": SamplingParams(temperature=0.7, top_k=5),
    "t1.3-topp0.85": SamplingParams(temperature=1.3, top_p=0.85),
}


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    target, drafter = make_tiny("qwen3", tmp_path_factory.mktemp("vocab8"), seed=11, vocab_size=VOCAB, block_size=4)
    eng = DFlashEngine.load(target, drafter, dtype=torch.float64)
    with torch.no_grad():
        eng.target.lm_head.weight.mul_(2.0)  # x10 already by make_tiny
    return eng


def exact_joint(engine, params) -> torch.Tensor:
    """P(t1, t2, t3) for every cell, flattened [VOCAB^3]."""
    pairs = torch.cartesian_prod(torch.arange(VOCAB), torch.arange(VOCAB))
    ids = torch.cat([torch.tensor(PROMPT).expand(len(pairs), -1), pairs], dim=1)
    with torch.no_grad():
        logits = engine.target.model(input_ids=ids).logits.double()
    probs = sampling_probs(logits[:, -3:], params).double()
    p1 = probs[0, 0]
    joint = torch.zeros(VOCAB, VOCAB, VOCAB, dtype=torch.float64)
    for row, (a, b) in enumerate(pairs.tolist()):
        joint[a, b] = p1[a] * probs[row, 1, b] * probs[row, 2]
    return joint.flatten()


def chi_square_pvalue(engine, params, mode, seed=0) -> float:
    g = torch.Generator().manual_seed(seed)
    out = engine.generate([PROMPT] * SAMPLES, 3, mode=mode, params=params, block_size=4, tree_budget=6, tree_topk=2,
                          generator=g)
    cells = torch.tensor([a * VOCAB * VOCAB + b * VOCAB + c for a, b, c in out.tokens])
    observed = torch.bincount(cells, minlength=VOCAB ** 3).double()
    expected = exact_joint(engine, params) * SAMPLES
    impossible = expected == 0
    if observed[impossible].sum() > 0:
        return 0.0
    small = (expected < 5) & ~impossible
    obs, exp = observed[~small & ~impossible], expected[~small & ~impossible]
    if small.any():
        obs = torch.cat([obs, observed[small].sum()[None]])
        exp = torch.cat([exp, expected[small].sum()[None]])
    return float(scipy.stats.chisquare(obs.numpy(), exp.numpy() * obs.sum().item() / exp.sum().item()).pvalue)


@pytest.mark.parametrize("params", PARAMS, ids=list(PARAMS))
@pytest.mark.parametrize("mode", ["ar", "chain", "tree"])
def test_sampled_outputs_follow_the_target_distribution(engine, mode, params):
    assert chi_square_pvalue(engine, PARAMS[params], mode) > ALPHA


def test_the_harness_rejects_a_chain_sampler_that_ignores_q(engine, monkeypatch):
    """Bug: accept a sampled draft whenever p(d) > 0 (q treated as 0)."""
    real = engine_module.sampling_verify_chain
    monkeypatch.setattr(engine_module, "sampling_verify_chain",
                        lambda tree, q, p, g: real(tree, torch.zeros_like(q), p, g))
    assert chi_square_pvalue(engine, PARAMS["t1"], "chain") < ALPHA


def test_the_harness_rejects_a_tree_sampler_with_a_biased_coin(engine, monkeypatch):
    """Bug: the acceptance coin is drawn from [0, 0.5) instead of [0, 1), so candidates win too often."""
    real = verify_module._uniform
    monkeypatch.setattr(verify_module, "_uniform", lambda g: 0.5 * real(g))
    assert chi_square_pvalue(engine, PARAMS["t1"], "tree") < ALPHA


def test_draft_acceptance_is_real_under_sampling(engine):
    """Lossless but not trivial: some drafts are accepted (the acceptance path is exercised)."""
    g = torch.Generator().manual_seed(1)
    for mode in ("chain", "tree"):
        out = engine.generate([PROMPT] * 200, 12, mode=mode, params=PARAMS["t1"], block_size=4, tree_budget=6,
                              tree_topk=2, generator=g)
        assert out.mean_acceptance > 1.05
