"""convert-gguf: the rebuilt checkpoint's layout, its EOS fix-up and chat template (tiny random Llama, no GGUF
needed), and, where the SmolLM2 GGUF and the `gguf` package are present, equality with the GGUF-loaded model."""

import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dflash_sglang.cli import main
from dflash_sglang.gguf import convert_gguf, load_gguf, save_converted
from dflash_sglang.tiny import make_tiny

SMOLLM2_GGUF = Path(os.environ.get("DFLASH_SMOLLM2_GGUF", "/tmp/smol/smollm2.gguf"))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    target, _ = make_tiny("llama", tmp_path_factory.mktemp("tiny-llama"), seed=5, vocab_size=None, hidden_size=32)
    return target


def _loaded_with_wrong_eos(target):
    """The state a GGUF load can leave: EOS pointing at the wrong token everywhere."""
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(target)
    tok.eos_token = "<|endoftext|>"
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    return model, tok


def test_save_converted_fixes_eos_everywhere_and_keeps_weights(tiny_llama, tmp_path):
    model, tok = _loaded_with_wrong_eos(tiny_llama)
    out = tmp_path / "converted"
    summary = save_converted(model, tok, out, torch.bfloat16)
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert summary["eos_token_id"] == im_end and summary["dtype"] == "bfloat16"
    config = json.loads((out / "config.json").read_text())
    assert config["eos_token_id"] == im_end and config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == "bfloat16" and "quantization_config" not in config
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == im_end
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    assert (out / "model.safetensors").is_file()
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    assert reloaded_tok.eos_token_id == im_end and reloaded_tok.chat_template == tok.chat_template
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    for name, value in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], value.to(torch.bfloat16)), name


def test_unknown_eos_token_and_other_architectures_are_refused(tiny_llama, tmp_path):
    model, tok = _loaded_with_wrong_eos(tiny_llama)
    with pytest.raises(ValueError, match="--eos-token '<\\|nope\\|>' is not a token"):
        save_converted(model, tok, tmp_path / "a", torch.float32, eos_token="<|nope|>")
    model.config.model_type = "qwen3"
    with pytest.raises(ValueError, match="convert-gguf supports"):
        save_converted(model, tok, tmp_path / "b", torch.float32)


def test_cli_missing_gguf_is_one_error_line(tmp_path, capsys):
    assert main(["convert-gguf", "--gguf", str(tmp_path / "x.gguf"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "x.gguf: no such file" in err and "Traceback" not in err


def test_real_smollm2_gguf_converts_exactly(tmp_path):
    if not SMOLLM2_GGUF.is_file():
        pytest.skip(f"{SMOLLM2_GGUF} absent (scripts/prepare_smollm2.sh; or set DFLASH_SMOLLM2_GGUF)")
    pytest.importorskip("gguf", reason="reading a GGUF needs the gguf package")
    pytest.importorskip("accelerate", reason="reading a GGUF needs the accelerate package")
    summary = convert_gguf(SMOLLM2_GGUF, tmp_path / "t", torch.float32)
    assert summary["eos_token_id"] == 2 and summary["parameters"] == 134_515_008
    reference, _ = load_gguf(SMOLLM2_GGUF)
    converted = AutoModelForCausalLM.from_pretrained(tmp_path / "t", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(tmp_path / "t")
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                   tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.equal(reference(ids).logits, converted(ids).logits)
        out = converted.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=16, do_sample=False)
    assert "5" in tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
