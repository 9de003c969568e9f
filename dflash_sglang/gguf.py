"""GGUF -> plain HF checkpoint (`dflash-sglang convert-gguf`), for targets that ship only as GGUF files.

transformers reads a GGUF file (dequantizing every tensor to float32) but refuses to `save_pretrained` the result,
and SGLang and our trainer want an ordinary safetensors checkpoint. So the GGUF-loaded model's weights are moved into
a freshly built model of the same architecture, which saves normally, next to the tokenizer and its chat template.

One fix-up: some transformers versions take the GGUF's BOS for its EOS (SmolLM2's GGUF tokenizer reports
`<|im_start|>` on 5.12/5.17), so answers would never stop. The EOS token is set explicitly (`--eos-token`, default
the ChatML end-of-turn `<|im_end|>`) in config.json, generation_config.json and the tokenizer's config.
Needs the `gguf` and `accelerate` packages (transformers' GGUF reader imports both).
"""

from __future__ import annotations

from pathlib import Path

import torch

DEFAULT_EOS_TOKEN = "<|im_end|>"
# Architectures whose GGUF-loaded model is the plain transformers class of the same name (checked: Llama).
SUPPORTED_MODEL_TYPES = ("llama",)


def _require_gguf_readers() -> None:
    missing = []
    for name in ("gguf", "accelerate"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ValueError(f"reading a GGUF file needs the packages {missing}: pip install {' '.join(missing)} "
                         f"(gguf==0.19.0 and accelerate==1.15.0 are known to work)")


def load_gguf(path: str | Path):
    """(model in float32, tokenizer) as transformers reads the GGUF file."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--gguf {path}: no such file")
    _require_gguf_readers()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    return model.eval(), tokenizer


def rebuild_plain(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A fresh, serializable model of the same architecture holding `model`'s weights in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type = model.config.model_type
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"convert-gguf supports {SUPPORTED_MODEL_TYPES} models; this GGUF holds {model_type!r}")
    settings = {k: v for k, v in model.config.to_dict().items()
                if not k.startswith("_") and k not in ("quantization_config", "model_type", "transformers_version")}
    config = AutoConfig.for_model(model_type, **settings)
    config.dtype = dtype
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(model.state_dict(), assign=True)
    if config.tie_word_embeddings:
        plain.tie_weights()
    return plain.to(dtype).eval()


def set_eos(model: torch.nn.Module, tokenizer, eos_token: str) -> int:
    """Make `eos_token` the EOS of the model config, its generation config and the tokenizer; returns its id."""
    eos_id = tokenizer.convert_tokens_to_ids(eos_token)
    if eos_id is None or eos_id == tokenizer.unk_token_id or tokenizer.convert_ids_to_tokens(eos_id) != eos_token:
        raise ValueError(f"--eos-token {eos_token!r} is not a token of this tokenizer; pass the token that ends the "
                         f"model's answers (e.g. its chat template's end-of-turn token)")
    tokenizer.eos_token = eos_token
    if tokenizer.pad_token is None:
        tokenizer.pad_token = eos_token
    model.config.eos_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return eos_id


def save_converted(model: torch.nn.Module, tokenizer, out: str | Path, dtype: torch.dtype,
                   eos_token: str = DEFAULT_EOS_TOKEN) -> dict:
    """Write `out` as an ordinary checkpoint: config.json, generation_config.json, model.safetensors, tokenizer
    files with the chat template. Returns a summary."""
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template; convert-gguf is for instruct models that carry one")
    plain = rebuild_plain(model, dtype)
    eos_id = set_eos(plain, tokenizer, eos_token)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return {"out": str(out), "model_type": plain.config.model_type, "dtype": str(dtype).removeprefix("torch."),
            "parameters": sum(p.numel() for p in plain.parameters()), "eos_token": eos_token, "eos_token_id": eos_id}


def convert_gguf(gguf: str | Path, out: str | Path, dtype: torch.dtype = torch.bfloat16,
                 eos_token: str = DEFAULT_EOS_TOKEN) -> dict:
    model, tokenizer = load_gguf(gguf)
    return save_converted(model, tokenizer, out, dtype, eos_token)
