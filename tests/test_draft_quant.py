"""The drafter's quantization: `--speculative-draft-model-quantization` (SGLang defaults it to the target's
`--quantization`) applies to the drafter's layer projections when it quantizes bf16 weights while loading (online
FP8), and leaves the drafter unquantized, with a warning, otherwise (draft_model.drafter_quant_config); and
`--speculative-dflash-draft-head-fp8`'s FP8 GEMM on the GPU (draft_head.Fp8HeadWeight; its CPU reference is tested
in test_sglang_plugin.py)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from test_sglang_plugin import assert_context_kv_matches_the_reference, drafter_configs, sglang_drafter


def drafter_linears(model):
    return [m for layer in model.layers
            for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)]


def test_online_fp8_quantizes_the_drafter_layers_and_leaves_the_context_path_exact(sglang_tp1, tmp_path,
                                                                                 monkeypatch):
    """--speculative-draft-model-quantization fp8 on a bf16 drafter: every layer projection takes SGLang's FP8
    method (it quantizes after loading, on the GPU); fc and the stacked context K/V stay in the drafter's dtype,
    built from the loaded weights, so the context matches the unquantized reference."""
    from sglang.srt.layers.quantization.fp8 import Fp8Config, Fp8LinearMethod

    raw = drafter_configs()["qwen3"]
    model, state = sglang_drafter(tmp_path, raw, monkeypatch, quant_config=Fp8Config())
    assert all(isinstance(m.quant_method, Fp8LinearMethod) for m in drafter_linears(model))
    assert not hasattr(model.fc, "quant_method")
    assert_context_kv_matches_the_reference(model, state, raw)


def quantization_needing_quantized_weights(name: str):
    from sglang.srt.layers.quantization import get_quantization_config
    from sglang.srt.layers.quantization.fp8 import Fp8Config

    if name == "fp8":  # a serialized FP8 checkpoint's config: it expects FP8 tensors and their scales
        return Fp8Config(is_checkpoint_fp8_serialized=True)
    if name == "mxfp8":
        return Fp8Config(use_mxfp8=True)
    return get_quantization_config(name)(weight_bits=4, group_size=32, zero_point=True)


@pytest.mark.parametrize("name", ["fp8", "mxfp8", "awq"])
def test_a_quantization_that_needs_quantized_weights_leaves_the_drafter_unquantized(sglang_tp1, tmp_path, monkeypatch,
                                                                                  caplog, name):
    from sglang.srt.layers.quantization.unquant import UnquantizedLinearMethod

    with caplog.at_level(logging.WARNING, logger="dflash_sglang.sglang.draft_model"):
        model, _ = sglang_drafter(tmp_path, drafter_configs()["qwen3"], monkeypatch,
                                  quant_config=quantization_needing_quantized_weights(name))
    assert all(isinstance(m.quant_method, UnquantizedLinearMethod) for m in drafter_linears(model))
    assert f"the drafter stays unquantized: {name} cannot" in caplog.text
    assert "--speculative-draft-model-quantization fp8" in caplog.text


@pytest.mark.gpu
@pytest.mark.usefixtures("sglang_tp1")
def test_fp8_drafter_projections_track_their_bf16_weights_on_the_gpu(tmp_path, monkeypatch):
    """On the GPU, after SGLang's post-load processing (what its loader runs once `load_weights` returns), each
    FP8 projection's output stays within FP8's rounding of the bf16 weights' output on random activations."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: FP8 projections run on Hopper or newer")
    from sglang.srt.layers.quantization.fp8 import Fp8Config

    from dflash_sglang.tiny import drafter_config_dict

    raw = drafter_config_dict("qwen3", hidden=256, vocab=512, num_target_layers=6, draft_layers=2, block_size=8,
                              mask_token_id=511, window=8)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        try:
            model, state = sglang_drafter(tmp_path, raw, monkeypatch, quant_config=Fp8Config())
        finally:
            torch.set_default_dtype(torch.float32)
    model.load_weights((name, tensor.to("cuda", torch.bfloat16)) for name, tensor in state.items())
    reference = {id(m): m.weight.detach().clone() for m in drafter_linears(model)}
    for module in model.modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            method.process_weights_after_loading(module)
    g = torch.Generator(device="cuda").manual_seed(0)
    for module in drafter_linears(model):
        assert module.weight.dtype == torch.float8_e4m3fn
        weight = reference[id(module)]
        x = torch.randn(16, weight.shape[1], generator=g, device="cuda", dtype=torch.bfloat16)
        out, _ = module(x)
        want = F.linear(x, weight)
        assert (out.float() - want.float()).norm() < 0.08 * want.float().norm()


@pytest.mark.gpu
def test_fp8_draft_head_gemm_matches_its_reference_on_the_gpu():
    """torch._scaled_mm with row scales against the float32 products of the same FP8 values, at Qwen3-32B's head
    shape and a chain step's 15 draft rows per request (padded to 16s), and the argmax they draft."""
    from dflash_sglang.sglang.draft_head import Fp8HeadWeight, fp8_gemm_available, quantize_rows_fp8

    if not torch.cuda.is_available() or not fp8_gemm_available(torch.device("cuda")):
        pytest.skip("needs a CUDA GPU with FP8 matrix products (sm89+)")
    torch.manual_seed(0)
    weight = (torch.randn(151936, 5120, device="cuda") * 0.02).to(torch.bfloat16)
    fp8 = Fp8HeadWeight.quantize(weight)
    for count in (15, 4 * 15, 64 * 15):
        rows = torch.randn(count, 5120, device="cuda").to(torch.bfloat16)
        got = fp8.logits(rows)
        q_rows, row_scale = quantize_rows_fp8(rows)
        want = (q_rows.float() * row_scale[:, None]) @ (fp8.qweight.float() * fp8.scale[:, None]).T
        assert got.shape == want.shape
        assert ((got - want).abs() <= want.abs() / 128 + 1e-2).all(), (got - want).abs().max()
        top2 = want.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 0.05  # rows whose best token is no bf16 near-tie
        assert torch.equal(got.argmax(-1)[clear], want.argmax(-1)[clear])
