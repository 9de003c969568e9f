"""Test-harness SGLang plugin for the equality runs (not part of the product): the AR reference of a sliding-window
target decodes with the window its model defines.

SGLang 0.5.16's triton backend gathers `min(seq_len, W)` keys for a decode query on a sliding layer (W = the
backend's sliding_window_size, i.e. config sliding_window - 1), and seq_len already counts the query: it reads
[p - W + 1, p], one key fewer than the model's [p - W, p], which prefill and TARGET_VERIFY (a per-query mask in the
extend kernel), HF, flashinfer and FA3 all use. Plain decoding of a Gemma 4 target therefore drifts from the model
after its first decoded token, while DFLASH, which never runs a decode forward, does not: on the H200 49/64 prompts
of the tiny Gemma 4 pair diverged, builtin and ours alike, exactly where a float64 emulation of the short decode
window says (upstream: sgl-project/sglang PR #32087). With DFLASH_E2E_TRITON_SWA_FIX=1 the backend's window buffers
hold W + 1 keys: decode reads the model's window; extend and verify keep masking each query with the layer's own W,
so they read exactly the keys they read before. e2e.sh sets it for every contender.
"""

import os

TARGET = "sglang.srt.layers.attention.triton_backend.TritonAttnBackend.__init__"


def register() -> None:
    if os.environ.get("DFLASH_E2E_TRITON_SWA_FIX") != "1":
        return
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(TARGET, widen_decode_window, HookType.AROUND)


def widen_decode_window(original, backend, *args, **kwargs) -> None:
    original(backend, *args, **kwargs)
    window = getattr(backend, "sliding_window_size", None)
    # Once per backend: a subclass whose __init__ runs the hooked one through super() must not widen twice.
    if window is not None and window > 0 and not getattr(backend, "_decode_window_widened", False):
        backend.sliding_window_size = window + 1
        backend._decode_window_widened = True
