"""Tiny target/drafter pairs in the real published layouts, random weights (for tests, demos, device runs).

Targets are built by transformers' own classes and saved with `save_pretrained`, so their layout is the real
one (Gemma 4: `Gemma4ForConditionalGeneration`, `text_config` with `global_head_dim`, weights under
`model.language_model.*`). Drafters are written in the z-lab `DFlashDraftModel` format. With the full vocab the
real tokenizer ships alongside (Qwen3's for qwen3/llama, Gemma 4's for gemma4).
"""

from __future__ import annotations

import lzma
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from dflash_sglang.config import FULL_ATTENTION, SLIDING_ATTENTION, build_target_layer_ids, parse_drafter_config
from dflash_sglang.drafter import DFlashDrafter
from dflash_sglang.loader import save_drafter

ARCHS = ("qwen3", "llama", "gemma4")
TARGET_HEAD_SCALE = 10.0


@dataclass(frozen=True)
class TokenizerSpec:
    folder: str
    vocab_size: int
    mask_token_id: int
    eos_token_id: int
    bos_token_id: int | None
    pad_token_id: int


# Qwen3: 151669 is the first padded (unused) row after `</think>`, the id z-lab's Qwen3 drafters use.
QWEN3_TOKENIZER = TokenizerSpec("qwen3", 151936, 151669, 151645, None, 151643)
GEMMA4_TOKENIZER = TokenizerSpec("gemma-4", 262144, 4, 1, 2, 0)
TOKENIZERS = {"qwen3": QWEN3_TOKENIZER, "llama": QWEN3_TOKENIZER, "gemma4": GEMMA4_TOKENIZER}


def tiny_target_layer_ids(num_target_layers: int, num_features: int) -> list[int]:
    """The published rule when it gives distinct ids; tiny targets are too shallow for it, so spread evenly over
    all but the last layer (serving engines capture layer k's output before layer k+1: the last has none)."""
    ids = build_target_layer_ids(num_target_layers, num_features)
    if len(set(ids)) == len(ids):
        return ids
    last = num_target_layers - 2
    return sorted({round(i * last / max(num_features - 1, 1)) for i in range(num_features)})


def _target_config(arch: str, vocab: int, hidden: int, layers: int, window: int, tok: TokenizerSpec):
    from transformers import Gemma4Config, LlamaConfig, Qwen3Config

    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=hidden // 4, max_position_embeddings=4096,
                  rms_norm_eps=1e-6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                  bos_token_id=tok.bos_token_id)
    if arch == "qwen3":
        return Qwen3Config(**common, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
                           tie_word_embeddings=False)
    if arch == "llama":
        return LlamaConfig(**common, rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
                           tie_word_embeddings=False)
    text = dict(common, global_head_dim=2 * (hidden // 4), num_global_key_value_heads=1, attention_k_eq_v=True,
                sliding_window=window, final_logit_softcapping=30.0, hidden_size_per_layer_input=0,
                vocab_size_per_layer_input=vocab, num_kv_shared_layers=0, enable_moe_block=False,
                tie_word_embeddings=True)
    # The published checkpoint has a vision tower and SGLang's Gemma 4 model always builds one: keep a tiny one.
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=16, position_embedding_size=1024, pooling_kernel_size=3)
    return Gemma4Config(text_config=text, vision_config=vision, audio_config=None, tie_word_embeddings=True)


def drafter_config_dict(arch: str, hidden: int, vocab: int, num_target_layers: int, draft_layers: int,
                        block_size: int, mask_token_id: int, window: int, num_features: int | None = None) -> dict:
    """A z-lab style drafter config.json (Gemma 4 drafters: sliding layers + one full layer, softcap 30)."""
    gemma = arch == "gemma4"
    layer_types = ([SLIDING_ATTENTION] * (draft_layers - 1) + [FULL_ATTENTION]) if gemma else [FULL_ATTENTION] * draft_layers
    cfg = {
        "architectures": ["DFlashDraftModel"],
        "auto_map": {"AutoModel": "dflash.DFlashDraftModel"},
        "model_type": "qwen3",
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": draft_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": hidden // 4,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_scaling": None,
        "max_position_embeddings": 4096,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "layer_types": layer_types,
        "sliding_window": window if gemma else None,
        "use_sliding_window": gemma,
        "tie_word_embeddings": True,
        "vocab_size": vocab,
        "block_size": block_size,
        "num_target_layers": num_target_layers,
        "dflash_config": {
            "mask_token_id": mask_token_id,
            "target_layer_ids": tiny_target_layer_ids(num_target_layers, num_features or draft_layers),
        },
        "dtype": "float32",
    }
    if gemma:
        cfg["final_logit_softcapping"] = 30.0
    return cfg


def random_drafter_state(cfg: dict, seed: int, std: float = 0.02) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    drafter = DFlashDrafter(parse_drafter_config(cfg))
    for name, param in drafter.named_parameters():
        if param.dim() > 1:
            torch.nn.init.normal_(param, std=std)
    return drafter.state_dict()


def install_tokenizer(spec: TokenizerSpec, out: Path) -> None:
    """The real tokenizer; for Gemma 4 also the multimodal processor config its published layout implies
    (SGLang loads a processor for Gemma4ForConditionalGeneration targets)."""
    src = resources.files("dflash_sglang") / "data" / "tokenizers" / spec.folder
    (out / "tokenizer.json").write_bytes(lzma.decompress((src / "tokenizer.json.xz").read_bytes()))
    for name in ("tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        if (src / name).is_file():
            with resources.as_file(src / name) as f:
                shutil.copyfile(f, out / name)


def make_tiny(arch: str, out: str | Path, seed: int = 0, block_size: int = 16, draft_layers: int = 2,
              vocab_size: int | None = None, hidden_size: int = 64, target_layers: int | None = None,
              sliding_window: int = 8) -> tuple[Path, Path]:
    """Write OUT/target and OUT/drafter; returns their paths. Full vocab => the real tokenizer is included."""
    from transformers import AutoModelForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"--arch must be one of {ARCHS}, got {arch!r}")
    vocab = vocab_size or TOKENIZERS[arch].vocab_size
    real_vocab = vocab == TOKENIZERS[arch].vocab_size
    # Without the real tokenizer, special ids move into the small vocab (mask: its last row).
    tok = TOKENIZERS[arch] if real_vocab else TokenizerSpec("", vocab, vocab - 1, 1, 2, 0)
    layers = target_layers or (6 if arch == "gemma4" else 4)
    out = Path(out)
    target_dir, drafter_dir = out / "target", out / "drafter"
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_target_config(arch, vocab, hidden_size, layers, sliding_window, tok))
    with torch.no_grad():
        # Random init gives near-flat logits (std ~0.16), where exact greedy ties are common and any rounding
        # difference flips them; a trained LM's top-2 gaps are far wider. Scale the head to get real gaps.
        model.get_output_embeddings().weight.mul_(TARGET_HEAD_SCALE)
    model.save_pretrained(str(target_dir))
    if real_vocab:
        install_tokenizer(tok, target_dir)
    cfg = drafter_config_dict(arch, hidden_size, vocab, layers, draft_layers, block_size, tok.mask_token_id,
                              sliding_window)
    save_drafter(drafter_dir, cfg, random_drafter_state(cfg, seed + 1))
    return target_dir, drafter_dir
