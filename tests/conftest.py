from __future__ import annotations

import pytest
import torch

from dflash_sglang.engine import DFlashEngine
from dflash_sglang.kernels import jit
from dflash_sglang.tiny import make_tiny

SMALL_VOCAB = 512


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory):
    """arch -> (target dir, drafter dir) for every supported architecture, small vocab, block size 16."""
    root = tmp_path_factory.mktemp("pairs")
    return {arch: make_tiny(arch, root / arch, seed=3, vocab_size=SMALL_VOCAB, block_size=16)
            for arch in ("qwen3", "llama", "gemma4")}


@pytest.fixture(scope="session")
def engines(tiny_pairs):
    """Float64 engines: rounding can never flip an argmax between verify- and decode-shaped forwards."""
    return {arch: DFlashEngine.load(t, d, dtype=torch.float64) for arch, (t, d) in tiny_pairs.items()}


@pytest.fixture
def cuda(monkeypatch):
    """The CUDA device for the kernel tests, with every op forced onto its kernel (an unavailable kernel fails
    instead of falling back to the reference)."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    monkeypatch.setenv("DFLASH_KERNELS", "cuda")
    available, why = jit.kernel_status()
    assert available, why
    return torch.device("cuda")
