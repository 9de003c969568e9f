"""Drafter checkpoints in the z-lab layout: single or sharded safetensors, keys with or without `model.`.

Shapes are checked against the config before any tensor reaches a module, so a wrong pair fails with the
key, the expected and the found shape instead of a matmul error deep in a forward.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dflash_sglang.config import DFlashConfig, DFlashConfigError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
OPTIONAL_PREFIX = "model."


def expected_drafter_shapes(cfg: DFlashConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a DFlash v1 drafter, `[out, in]` for linears, without the optional `model.` prefix."""
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    shapes: dict[str, tuple[int, ...]] = {
        "fc.weight": (h, cfg.num_target_features * h),
        "hidden_norm.weight": (h,),
        "norm.weight": (h,),
    }
    for n in range(cfg.num_hidden_layers):
        p = f"layers.{n}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, q),
            p + "self_attn.q_norm.weight": (d,),
            p + "self_attn.k_norm.weight": (d,),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
        })
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return shapes


def _checkpoint_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise DFlashConfigError([f"{index}: not a safetensors index ({e}); re-export the sharded checkpoint"]) from e
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DFlashConfigError([f"{index} names shards that are missing: {missing}; download all shards"])
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        return [single]
    raise DFlashConfigError([f"drafter {path}: no {SINGLE_FILE} or {INDEX_FILE}; pass the drafter checkpoint directory"])


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, `model.` prefix stripped."""
    tensors: dict[str, torch.Tensor] = {}
    for f in _checkpoint_files(Path(path)):
        try:
            part = load_file(str(f))
        except (SafetensorError, OSError) as e:
            raise DFlashConfigError([f"{f}: cannot read safetensors ({e}); the file is corrupt or truncated"]) from e
        for key, value in part.items():
            tensors[key.removeprefix(OPTIONAL_PREFIX)] = value
    return tensors


def load_drafter_state_dict(path: str | Path, cfg: DFlashConfig) -> dict[str, torch.Tensor]:
    """Read and shape-check a drafter checkpoint; extra tensors (e.g. a shipped lm_head) are ignored."""
    tensors = read_safetensors(path)
    errors = []
    for key, shape in expected_drafter_shapes(cfg).items():
        if key not in tensors:
            errors.append(f"drafter weights: tensor `{key}` is missing; the checkpoint does not match its config.json")
        elif tuple(tensors[key].shape) != shape:
            hint = ""
            if key == "fc.weight":
                hint = (f" (fc maps {cfg.num_target_features} target features x hidden {cfg.hidden_size}; "
                        f"check `dflash_config.target_layer_ids` and `hidden_size`)")
            errors.append(f"drafter weights: `{key}` has shape {tuple(tensors[key].shape)}, expected {shape}{hint}")
    if errors:
        raise DFlashConfigError(errors)
    return {k: tensors[k] for k in expected_drafter_shapes(cfg)}


def save_drafter(path: str | Path, config: dict, state_dict: dict[str, torch.Tensor], max_shard_bytes: int | None = None) -> None:
    """Write config.json + safetensors in the z-lab layout (no prefix); sharded with an index if asked."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    if max_shard_bytes is None:
        save_file(tensors, str(out / SINGLE_FILE), metadata={"format": "pt"})
        return
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    weight_map = {}
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in tensors.values())
    (out / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
