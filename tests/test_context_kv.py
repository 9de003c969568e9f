"""The drafter's context K/V op (csrc/context_kv.cu, dflash_sglang/kernels/context_kv.py) and its reference.

CPU (CI): the reference is, bit for bit, the torch path `DFlashSGLangDrafter.write_context_kv` ran before the
kernel (a frozen copy below), and means what it should (per-row float64 recomputation); the op runs the
reference for CPU tensors. The nvcc build of csrc/ is tests/test_kernels.py's.

GPU (`pytest -m gpu`, on the box through scripts/device/kernel_tests.sh): the kernel against the reference on
fresh random inputs with NaN-poisoned outputs over N x L x H x D x dtype, odd head dims and unaligned caches (the
per-element path), float16, and CUDA-graph capture. Values must match bit for bit; keys within the one rounding
step the reference's float32 `1 / rms` (another summation order) can move.

The pool op (`context_kv_to_pool`, the same kernel storing rows straight into per-layer KV buffers): on CPU its
reference stores what `context_kv_norm_rope` followed by one indexed store per layer stores, and nothing else; on
the GPU the kernel does the same into pools of every dtype, padded slot strides and unaligned buffers (the
per-element path), rows sharing the padding slot 0, and inside a CUDA graph.
"""

from __future__ import annotations

import itertools
import math
import subprocess
import sys
import textwrap
import types

import pytest
import torch

from dflash_sglang.kernels import (ContextKV, context_kv_norm_rope, context_kv_to_pool, jit, pool_layers,
                                   reference)
from dflash_sglang.kernels.buffers import empty_context_kv

EPS = 1e-6
MAX_POSITION = 32_768


def rope_cache(head_dim: int, max_position: int, base: float = 1e6, device="cpu") -> torch.Tensor:
    """[max_position, head_dim] float32 in SGLang's layout: cos of every frequency, then sin (neox halves)."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim)
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32, device=device), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


def context_inputs(num_tokens: int, num_layers: int, heads: int, head_dim: int, dtype, g: torch.Generator,
                   gemma: bool, max_position: int = MAX_POSITION):
    """kv [N, L, 2, H, D] with per-row magnitudes spread over 1e-2..1e2 (the norm must cancel them), per-layer
    scales (Gemma's `1 + w` of weights around 0, or plain weights in [0, 2)), positions anywhere in the cache;
    on the generator's device."""
    device = g.device
    magnitude = 10.0 ** (4 * torch.rand(num_tokens, num_layers, 2, heads, 1, generator=g, device=device) - 2)
    kv = (torch.randn(num_tokens, num_layers, 2, heads, head_dim, generator=g, device=device) * magnitude).to(dtype)
    if gemma:
        scale = 1.0 + 0.3 * torch.randn(num_layers, head_dim, generator=g, device=device)
    else:
        scale = 2 * torch.rand(num_layers, head_dim, generator=g, device=device)
    positions = torch.randint(0, max_position, (num_tokens,), generator=g, device=device)
    return kv, scale, positions


def drafter_path_before_the_kernel(kv, scale, eps, positions, cos_sin_cache):
    """`write_context_kv` between its GEMM and the pool stores, as it was before the kernel (frozen copy)."""
    num_tokens, num_layers, _, kv_heads, head_dim = kv.shape
    x = kv[:, :, 0]
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    keys = (normed * scale[None, :, None, :]).to(x.dtype)
    keys = keys.reshape(num_tokens, num_layers * kv_heads, head_dim)
    cos, sin = cos_sin_cache.index_select(0, positions).float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    k32 = keys.float()
    first, second = k32.chunk(2, dim=-1)
    keys = torch.cat([first * cos - second * sin, second * cos + first * sin], dim=-1).to(keys.dtype)
    keys = keys.view(num_tokens, num_layers, kv_heads, head_dim).transpose(0, 1).contiguous()
    values = kv[:, :, 1].transpose(0, 1).contiguous()
    return keys, values


def assert_keys_close(got: torch.Tensor, expected: torch.Tensor) -> None:
    """Keys within what a last-bit change of a row's float32 `1 / rms` can do.

    Such a change moves float32 keys by a few units in their last place. In a 16-bit dtype it can move a normed
    value across a rounding boundary, rarely: one unit in the last place of that value (at most sqrt(2) x the
    row's largest key, as rotation keeps pair norms), rotated, plus one of the result. A missing or extra rounding
    step, a wrong half, position, scale or layout breaks these bounds.
    """
    assert got.dtype == expected.dtype and got.shape == expected.shape
    sixteen_bit = got.element_size() == 2
    spacing = torch.finfo(got.dtype).eps if sixteen_bit else 8 * torch.finfo(torch.float32).eps
    got, expected = got.float(), expected.float()
    assert not got.isnan().any(), "unwritten (poisoned) keys"
    row_max = expected.abs().amax(dim=-1, keepdim=True)
    diff = (got - expected).abs()
    assert bool((diff <= 4 * spacing * row_max).all()), f"max diff {float(diff.max()):.3g}"
    if sixteen_bit:
        differing = int((diff > 0).sum())
        assert differing <= max(4, got.numel() // 1000), f"{differing} of {got.numel()} keys differ"


def assert_bitwise(got: torch.Tensor, expected: torch.Tensor) -> None:
    assert got.dtype == expected.dtype and got.shape == expected.shape
    bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    assert torch.equal(got.view(bits), expected.view(bits))


# ---------------------------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("cache_dtype", ["float32", "kv"])
def test_reference_is_the_drafter_path_before_the_kernel(dtype, gemma, cache_dtype):
    g = torch.Generator().manual_seed(1)
    for num_tokens, num_layers, heads, head_dim in [(1, 1, 1, 2), (7, 3, 2, 64), (33, 5, 4, 128), (5, 2, 3, 512)]:
        kv, scale, positions = context_inputs(num_tokens, num_layers, heads, head_dim, dtype, g, gemma, 4096)
        cache = rope_cache(head_dim, 4096)
        cache = cache if cache_dtype == "float32" else cache.to(dtype)
        got = reference.context_kv_norm_rope(kv, scale, EPS, positions, cache)
        expected = drafter_path_before_the_kernel(kv, scale, EPS, positions, cache)
        for a, b in zip(got, expected, strict=True):
            assert a.is_contiguous() and a.dtype == dtype
            assert_bitwise(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_reference_normalizes_rotates_and_lays_out_each_row(dtype):
    """Per (layer, token, head) row in float64: RMSNorm with the layer's scale, rounding to the kv dtype, then
    [a * cos - b * sin, b * cos + a * sin] with the cache row of the token's position; values copied."""
    g = torch.Generator().manual_seed(2)
    num_tokens, num_layers, heads, head_dim = 5, 3, 2, 16
    kv, scale, positions = context_inputs(num_tokens, num_layers, heads, head_dim, dtype, g, True, 1000)
    cache = rope_cache(head_dim, 1000)
    got = reference.context_kv_norm_rope(kv, scale, EPS, positions, cache)
    expected_keys = torch.empty(num_layers, num_tokens, heads, head_dim, dtype=dtype)
    half = head_dim // 2
    for layer, token, head in itertools.product(range(num_layers), range(num_tokens), range(heads)):
        x = kv[token, layer, 0, head].double()
        normed = (x / (x.pow(2).mean() + EPS).sqrt() * scale[layer].double()).to(dtype).double()
        cos, sin = cache[positions[token]].double().split(half)
        a, b = normed[:half], normed[half:]
        expected_keys[layer, token, head] = torch.cat([a * cos - b * sin, b * cos + a * sin]).to(dtype)
        assert torch.equal(got.values[layer, token, head], kv[token, layer, 1, head])
    assert_keys_close(got.keys, expected_keys)


def test_op_runs_the_reference_on_cpu_and_fills_out(caplog, monkeypatch):
    monkeypatch.setattr(jit, "_logged", set())
    g = torch.Generator().manual_seed(3)
    kv, scale, positions = context_inputs(4, 2, 2, 8, torch.bfloat16, g, False, 64)
    cache = rope_cache(8, 64)
    out = empty_context_kv(2, 4, 2, 8, torch.bfloat16, "cpu")
    with caplog.at_level("INFO", logger="dflash_sglang.kernels"):
        got = context_kv_norm_rope(kv, scale, EPS, positions, cache, out=out)
    assert [r.getMessage() for r in caplog.records] == ["context_kv_norm_rope: torch reference (inputs on cpu)"]
    assert isinstance(got, ContextKV) and got.keys is out.keys and got.values is out.values
    expected = reference.context_kv_norm_rope(kv, scale, EPS, positions, cache)
    assert_bitwise(got.keys, expected.keys)
    assert_bitwise(got.values, expected.values)


def random_pool(num_layers: int, slots: int, heads: int, head_dim: int, dtype, g: torch.Generator,
                pad: int = 0, offset: int = 0):
    """Per-layer key and value buffers [S, H, D] filled with random content (what a store must leave alone), each
    slot `pad` elements past H x D and each buffer `offset` elements into its storage."""
    def buffer():
        row = heads * head_dim + pad
        flat = torch.randn(offset + slots * row, generator=g, device=g.device).to(dtype)
        return flat[offset:].as_strided((slots, heads, head_dim), (row, head_dim, 1))

    return [buffer() for _ in range(num_layers)], [buffer() for _ in range(num_layers)]


def slot_indices(num_tokens: int, num_slots: int, g: torch.Generator) -> torch.Tensor:
    """Distinct slots in 1..S-1, a few rows dropped onto the padding slot 0 as the worker drops them."""
    slots = torch.randperm(num_slots - 1, generator=g, device=g.device)[:num_tokens] + 1
    dropped = torch.rand(num_tokens, generator=g, device=g.device) < 0.2
    return torch.where(dropped, torch.zeros_like(slots), slots)


def stored_per_layer(keys, values, kv, scale, positions, cache, slots):
    """The path the pool op replaces: layer-major keys and values, then one indexed store per layer (copies)."""
    keys, values = [k.clone() for k in keys], [v.clone() for v in values]
    context = context_kv_norm_rope(kv, scale, EPS, positions, cache)
    for layer in range(len(keys)):
        keys[layer][slots] = context.keys[layer]
        values[layer][slots] = context.values[layer]
    return keys, values


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("pad, offset", [(0, 0), (8, 0), (0, 1)])
def test_pool_reference_stores_what_the_per_layer_stores_store(dtype, pad, offset):
    g = torch.Generator().manual_seed(pad * 10 + offset)
    num_tokens, num_layers, heads, head_dim, num_slots = 24, 3, 2, 16, 64
    kv, scale, positions = context_inputs(num_tokens, num_layers, heads, head_dim, dtype, g, True, 1000)
    cache = rope_cache(head_dim, 1000)
    slots = slot_indices(num_tokens, num_slots, g)
    keys, values = random_pool(num_layers, num_slots, heads, head_dim, dtype, g, pad, offset)
    expected_keys, expected_values = stored_per_layer(keys, values, kv, scale, positions, cache, slots)
    before = [t.clone() for t in keys + values]
    context_kv_to_pool(kv, scale, EPS, positions, cache, slots, pool_layers(keys, values))
    untouched = torch.ones(num_slots, dtype=torch.bool)
    untouched[slots] = False
    for got, want, old in zip(keys + values, expected_keys + expected_values, before):
        assert_bitwise(got[1:], want[1:])  # slot 0 holds any one of the rows dropped there
        assert_bitwise(got[untouched], old[untouched])


def test_pool_layers_checks_the_buffers_and_builds_the_address_tables():
    g = torch.Generator().manual_seed(4)
    keys, values = random_pool(2, 10, 2, 8, torch.bfloat16, g, pad=8)
    pool = pool_layers(keys, values)
    assert pool.key_addresses.tolist() == [t.data_ptr() for t in keys]
    assert pool.value_addresses.tolist() == [t.data_ptr() for t in values]
    assert pool.slot_stride == 24 and pool.alignment % 2 == 0
    assert pool.alignment == math.gcd(24 * 2, *(t.data_ptr() for t in keys + values))
    with pytest.raises(ValueError, match="as many key buffers as value buffers"):
        pool_layers(keys, values[:1])
    with pytest.raises(ValueError, match="every buffer must be"):
        pool_layers(keys, [values[0], values[1].float()])
    with pytest.raises(ValueError, match="contiguous at one slot stride"):
        pool_layers(keys, [values[0], values[1].transpose(1, 2).contiguous().transpose(1, 2)])
    other_stride, _ = random_pool(1, 10, 2, 8, torch.bfloat16, g, pad=0)
    with pytest.raises(ValueError, match="contiguous at one slot stride"):
        pool_layers([keys[0], other_stride[0]], values)


def test_pool_op_refuses_kv_that_does_not_fit_the_pool():
    g = torch.Generator().manual_seed(5)
    kv, scale, positions = context_inputs(4, 2, 2, 8, torch.bfloat16, g, False, 64)
    cache, slots = rope_cache(8, 64), torch.arange(1, 5)
    keys, values = random_pool(3, 10, 2, 8, torch.bfloat16, g)
    with pytest.raises(ValueError, match="does not fit the pool's 3 layers"):
        context_kv_to_pool(kv, scale, EPS, positions, cache, slots, pool_layers(keys, values))
    keys, values = random_pool(2, 10, 2, 8, torch.float32, g)
    with pytest.raises(ValueError, match="does not fit"):
        context_kv_to_pool(kv, scale, EPS, positions, cache, slots, pool_layers(keys, values))
    keys, values = random_pool(2, 10, 2, 8, torch.bfloat16, g)
    with pytest.raises(ValueError, match="slots must be"):
        context_kv_to_pool(kv, scale, EPS, positions, cache, slots[:3], pool_layers(keys, values))


# ---------------------------------------------------------------------------------------------------- GPU


_CACHES: dict[tuple, torch.Tensor] = {}


def cuda_cache(head_dim: int, dtype, device) -> torch.Tensor:
    key = (head_dim, dtype)
    if key not in _CACHES:
        _CACHES[key] = rope_cache(head_dim, MAX_POSITION, device=device).to(dtype)
    return _CACHES[key]


def check_kernel(kv, scale, positions, cache, device):
    """Kernel (outputs poisoned with NaN) == reference, both on the GPU."""
    num_tokens, num_layers, _, heads, head_dim = kv.shape
    expected = reference.context_kv_norm_rope(kv, scale, EPS, positions, cache)
    out = empty_context_kv(num_layers, num_tokens, heads, head_dim, kv.dtype, device)
    for t in out:
        t.fill_(float("nan"))
    got = context_kv_norm_rope(kv, scale, EPS, positions, cache, out=out)
    assert got.keys is out.keys and got.values is out.values
    assert_bitwise(got.values, expected.values)
    assert_keys_close(got.keys, expected.keys)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 256, 512])
@pytest.mark.parametrize("num_tokens", [1, 7, 64, 1000])
def test_kernel_matches_reference(cuda, dtype, head_dim, num_tokens):
    g = torch.Generator(device=cuda).manual_seed(num_tokens * 1000 + head_dim)
    for (num_layers, heads), gemma in zip(itertools.product((1, 3, 5), (1, 2, 8)), itertools.cycle((False, True))):
        kv, scale, positions = context_inputs(num_tokens, num_layers, heads, head_dim, dtype, g, gemma)
        check_kernel(kv, scale, positions, cuda_cache(head_dim, torch.float32, cuda), cuda)
    # SGLang can also hand over its cache in the model dtype.
    kv, scale, positions = context_inputs(num_tokens, 5, 8, head_dim, dtype, g, True)
    check_kernel(kv, scale, positions, cuda_cache(head_dim, dtype, cuda), cuda)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [2, 16, 72, 100, 510])
def test_kernel_matches_reference_on_odd_head_dims_and_unaligned_caches(cuda, dtype, head_dim):
    """Head halves that no 16-byte access divides, and a cache starting one element into its buffer, take the
    per-element path; float16 runs with a float16 cache too."""
    g = torch.Generator(device=cuda).manual_seed(head_dim)
    kv, scale, positions = context_inputs(37, 3, 5, head_dim, dtype, g, True)
    check_kernel(kv, scale, positions, cuda_cache(head_dim, torch.float32, cuda), cuda)
    check_kernel(kv, scale, positions, cuda_cache(head_dim, dtype, cuda), cuda)
    flat = torch.empty(MAX_POSITION * head_dim + 1, dtype=torch.float32, device=cuda)
    shifted = flat[1:].view(MAX_POSITION, head_dim)
    shifted.copy_(cuda_cache(head_dim, torch.float32, cuda))
    check_kernel(kv, scale, positions, shifted, cuda)


@pytest.mark.gpu
def test_head_dims_the_kernel_cannot_run_take_the_reference(cuda, monkeypatch):
    """Past MAX_HEAD_DIM the op runs the reference (logged once); with DFLASH_KERNELS=cuda it refuses instead, in
    Python, before the library sees the inputs."""
    g = torch.Generator(device=cuda).manual_seed(11)
    kv, scale, positions = context_inputs(3, 1, 1, 514, torch.bfloat16, g, True, max_position=8)
    cache = rope_cache(514, 8, device=cuda)
    with pytest.raises(RuntimeError, match="head_dim 514"):
        context_kv_norm_rope(kv, scale, EPS, positions, cache)
    monkeypatch.setenv("DFLASH_KERNELS", "auto")
    got = context_kv_norm_rope(kv, scale, EPS, positions, cache)
    want = reference.context_kv_norm_rope(kv, scale, EPS, positions, cache)
    assert all(torch.equal(a, b) for a, b in zip(got, want))


@pytest.mark.gpu
def test_library_errors_reach_python_as_exceptions(cuda):
    """The op's own input checks raise RuntimeError: called past the wrapper with a head dim it cannot run, in a
    child process, because on the H200 on 2026-11-29 this call killed the pytest process with a segfault."""
    code = textwrap.dedent("""
        import torch
        from dflash_sglang.kernels import jit
        assert jit.kernel_status()[0]
        kv = torch.zeros(2, 1, 2, 1, 514, dtype=torch.bfloat16, device="cuda")
        keys = torch.empty(1, 2, 1, 514, dtype=torch.bfloat16, device="cuda")
        try:
            torch.ops.dflash_sglang.context_kv_norm_rope(
                kv, torch.ones(1, 514, device="cuda"), 1e-6, torch.zeros(2, dtype=torch.long, device="cuda"),
                torch.zeros(8, 514, device="cuda"), keys, torch.empty_like(keys))
        except RuntimeError as e:
            print("raised:", str(e).splitlines()[0])
    """)
    # Unbuffered, with faulthandler: if the child dies, its output says whether the call raised first (a crash at
    # exit) and where it died.
    run = subprocess.run([sys.executable, "-u", "-X", "faulthandler", "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, f"exit {run.returncode}; stdout: {run.stdout[-500:]!r}; stderr: {run.stderr[-3000:]}"
    assert "raised: head_dim must be even" in run.stdout


@pytest.mark.gpu
def test_kernel_captures_in_a_cuda_graph(cuda):
    g = torch.Generator(device=cuda).manual_seed(5)
    kv, scale, positions = context_inputs(64, 5, 8, 128, torch.bfloat16, g, True)
    cache = cuda_cache(128, torch.float32, cuda)
    out = empty_context_kv(5, 64, 8, 128, torch.bfloat16, cuda)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        context_kv_norm_rope(kv, scale, EPS, positions, cache, out=out)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        context_kv_norm_rope(kv, scale, EPS, positions, cache, out=out)
    expected = context_kv_norm_rope(kv, scale, EPS, positions, cache)
    for t in out:
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert_bitwise(out.keys, expected.keys)
    assert_bitwise(out.values, expected.values)


def check_pool_kernel(dtype, num_tokens, num_layers, heads, head_dim, g, cuda, pad=0, offset=0, cache_dtype=None):
    """The kernel's pool against the reference's pool, from the same random content: keys within the rounding
    bound and values bit for bit at the written slots (slot 0 aside), everything else untouched."""
    num_slots = 2 * num_tokens + 8
    kv, scale, positions = context_inputs(num_tokens, num_layers, heads, head_dim, dtype, g, True)
    cache = cuda_cache(head_dim, cache_dtype or torch.float32, cuda)
    slots = slot_indices(num_tokens, num_slots, g)
    keys, values = random_pool(num_layers, num_slots, heads, head_dim, dtype, g, pad, offset)
    before = [t.clone() for t in keys + values]
    expected = reference.context_kv_norm_rope(kv, scale, EPS, positions, cache)
    context_kv_to_pool(kv, scale, EPS, positions, cache, slots, pool_layers(keys, values))
    written = slots[slots > 0]
    untouched = torch.ones(num_slots, dtype=torch.bool, device=cuda)
    untouched[slots] = False
    rows = slots > 0
    for layer in range(num_layers):
        assert_keys_close(keys[layer][written], expected.keys[layer][rows])
        assert_bitwise(values[layer][written], expected.values[layer][rows])
    for got, old in zip(keys + values, before):
        assert_bitwise(got[untouched], old[untouched])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("head_dim", [64, 128, 72])
@pytest.mark.parametrize("num_tokens", [1, 37, 1000])
def test_pool_kernel_matches_reference(cuda, dtype, head_dim, num_tokens):
    g = torch.Generator(device=cuda).manual_seed(num_tokens * 1000 + head_dim)
    for num_layers, heads in ((1, 1), (5, 3), (3, 8)):
        check_pool_kernel(dtype, num_tokens, num_layers, heads, head_dim, g, cuda)
    check_pool_kernel(dtype, num_tokens, 5, 3, head_dim, g, cuda, cache_dtype=dtype)
    # A padded slot stride keeps the 16-byte path when it is a multiple of 16 bytes; a buffer one element into its
    # storage takes the per-element one.
    check_pool_kernel(dtype, num_tokens, 5, 3, head_dim, g, cuda, pad=16)
    check_pool_kernel(dtype, num_tokens, 5, 3, head_dim, g, cuda, offset=1)


@pytest.mark.gpu
def test_pool_kernel_captures_in_a_cuda_graph(cuda):
    g = torch.Generator(device=cuda).manual_seed(6)
    kv, scale, positions = context_inputs(64, 5, 8, 128, torch.bfloat16, g, True)
    cache = cuda_cache(128, torch.float32, cuda)
    slots = torch.randperm(200, generator=g, device=cuda)[:64] + 1
    keys, values = random_pool(5, 256, 8, 128, torch.bfloat16, g)
    pool = pool_layers(keys, values)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        context_kv_to_pool(kv, scale, EPS, positions, cache, slots, pool)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        context_kv_to_pool(kv, scale, EPS, positions, cache, slots, pool)
    expected = [t.clone() for t in keys + values]
    for t in keys + values:
        t.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    for got, want in zip(keys + values, expected):
        assert_bitwise(got[slots], want[slots])


def test_inputs_the_kernel_does_not_take_run_the_reference(monkeypatch):
    """use_kernel's `unsupported`: with the library available, such inputs take the reference (auto) or are refused
    (DFLASH_KERNELS=cuda) with the reason."""
    monkeypatch.setattr(jit, "kernel_status", lambda: (True, "built"))
    on_gpu = types.SimpleNamespace(is_cuda=True, device=torch.device("cuda"))
    monkeypatch.setenv("DFLASH_KERNELS", "auto")
    assert jit.use_kernel("op_under_test", on_gpu) is True
    assert jit.use_kernel("op_under_test", on_gpu, "head_dim 514: too wide") is False
    monkeypatch.setenv("DFLASH_KERNELS", "cuda")
    with pytest.raises(RuntimeError, match="head_dim 514: too wide"):
        jit.use_kernel("op_under_test", on_gpu, "head_dim 514: too wide")
