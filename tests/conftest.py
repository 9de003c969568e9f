from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

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


@pytest.fixture(scope="session")
def sglang_tp1():
    """A one-process gloo TP group and published server args: what SGLang layers need to be built on CPU. Once per
    session: SGLang's parallel groups can be initialized only once in a process."""
    from sglang.srt.distributed.parallel_state import init_distributed_environment, initialize_model_parallel
    from sglang.srt.runtime_context import get_context

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel(1)
    override = get_context().override_server_args()
    override.install()
    yield
    override.restore()


@pytest.fixture
def triton_interpreter():
    """Runs a Python script under Triton's CPU interpreter and returns what it printed. A subprocess: the interpreter
    is chosen when triton is first imported. The script imports from the repo (tests included)."""
    pytest.importorskip("triton")
    repo = Path(__file__).resolve().parents[1]

    def run(script: str, timeout: float = 900) -> str:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(repo)}, cwd=repo)
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout

    return run
