"""Config-only checkpoints at real model shapes, for `--load-format dummy` scale measurements.

No hub here: these are the published config layouts with the published dimensions (notes/data.md §2.2 for
Gemma-4-31B; z-lab's gemma-4-31B-it-DFlash drafter config; Qwen3-32B with a z-lab 5-layer drafter mirroring the
target's widths, as z-lab's Qwen3 drafters do) plus the real tokenizer, so SGLang builds random weights on the GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

from dflash_sglang.tiny import GEMMA4_TOKENIZER, QWEN3_TOKENIZER, install_tokenizer


def gemma4_31b_target() -> dict:
    from transformers import Gemma4Config

    layers = 60
    text = dict(vocab_size=262144, hidden_size=5376, intermediate_size=21504, num_hidden_layers=layers,
                num_attention_heads=32, num_key_value_heads=16, head_dim=256, global_head_dim=512,
                num_global_key_value_heads=4, attention_k_eq_v=True, sliding_window=1024,
                final_logit_softcapping=30.0, hidden_size_per_layer_input=0, vocab_size_per_layer_input=262144,
                num_kv_shared_layers=0, enable_moe_block=False, tie_word_embeddings=True,
                max_position_embeddings=262144, rms_norm_eps=1e-6, pad_token_id=0, eos_token_id=1, bos_token_id=2,
                use_bidirectional_attention="vision",
                layer_types=["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)])
    # SGLang's Gemma 4 model always builds the vision tower. The 26B/31B tower is 1152 wide with 16 heads of 72
    # (public configs); 27 layers with a 4304-wide MLP (SigLIP-so400m) is inferred from its ~550M-parameter size.
    vision = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  num_key_value_heads=16, head_dim=72, standardize=True, use_clipped_linears=False)
    cfg = Gemma4Config(text_config=text, vision_config=vision, audio_config=None, tie_word_embeddings=True).to_dict()
    cfg.update(architectures=["Gemma4ForConditionalGeneration"], dtype="bfloat16")
    return cfg


def gemma4_31b_drafter() -> dict:
    return {
        "architectures": ["DFlashDraftModel"], "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "model_type": "qwen3", "hidden_size": 5376, "intermediate_size": 10752, "num_hidden_layers": 5,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
        "layer_types": ["sliding_attention"] * 4 + ["full_attention"], "sliding_window": 2048,
        "use_sliding_window": True, "rope_theta": 1000000.0, "rope_scaling": None,
        "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "final_logit_softcapping": 30.0,
        "attention_bias": False, "tie_word_embeddings": True, "vocab_size": 262144, "block_size": 16,
        "num_target_layers": 60, "dtype": "bfloat16",
        "dflash_config": {"mask_token_id": 4, "target_layer_ids": [1, 12, 23, 35, 46, 57]},
    }


def qwen3_32b_target() -> dict:
    return {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "vocab_size": 151936, "hidden_size": 5120,
        "intermediate_size": 25600, "num_hidden_layers": 64, "num_attention_heads": 64, "num_key_value_heads": 8,
        "head_dim": 128, "hidden_act": "silu", "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "rope_scaling": None, "tie_word_embeddings": False, "attention_bias": False,
        "bos_token_id": 151643, "eos_token_id": 151645, "dtype": "bfloat16",
    }


def qwen3_32b_drafter() -> dict:
    return {
        "architectures": ["DFlashDraftModel"], "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "model_type": "qwen3", "hidden_size": 5120, "intermediate_size": 25600, "num_hidden_layers": 5,
        "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
        "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "max_position_embeddings": 40960,
        "attention_bias": False, "tie_word_embeddings": True, "layer_types": ["full_attention"] * 5,
        "sliding_window": None, "vocab_size": 151936, "block_size": 16, "num_target_layers": 64, "dtype": "bfloat16",
        "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 16, 32, 47, 61]},
    }


SHAPES: dict[str, tuple] = {
    "gemma-4-31b": (gemma4_31b_target, gemma4_31b_drafter, GEMMA4_TOKENIZER),
    "qwen3-32b": (qwen3_32b_target, qwen3_32b_drafter, QWEN3_TOKENIZER),
}


def write_shape(name: str, out: str | Path) -> tuple[Path, Path]:
    """OUT/target and OUT/drafter with config.json only (+ the real tokenizer beside the target)."""
    if name not in SHAPES:
        raise ValueError(f"shape must be one of {sorted(SHAPES)}, got {name!r}")
    target_cfg, drafter_cfg, tok = SHAPES[name]
    out = Path(out)
    target_dir, drafter_dir = out / "target", out / "drafter"
    for path, cfg in ((target_dir, target_cfg()), (drafter_dir, drafter_cfg())):
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    install_tokenizer(tok, target_dir)
    return target_dir, drafter_dir
