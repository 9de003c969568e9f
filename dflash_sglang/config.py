"""DFlash drafter configuration: every published v1 `config.json` form, validated against the target.

A drafter config is the z-lab `DFlashDraftModel` layout (Qwen3-style layer fields at top level plus a
`dflash_config` dict). Fields that moved between releases (`block_size`, `causal`, softcapping, embedding and
output scales) are read from either place. Every problem found is reported as one message that names the
field and the fix; all problems are collected before raising, so a user fixes a config in one pass.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_ARCHITECTURES = ("DFlashDraftModel",)
SUPPORTED_ACTIVATIONS = ("silu",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "yarn")
FULL_ATTENTION = "full_attention"
SLIDING_ATTENTION = "sliding_attention"


class DFlashConfigError(ValueError):
    """One or more configuration problems; `messages` holds one line per problem."""

    def __init__(self, messages: list[str]):
        self.messages = list(messages)
        super().__init__("\n".join(f"- {m}" for m in self.messages))


def build_target_layer_ids(num_target_layers: int, num_draft_layers: int) -> list[int]:
    """The published default: one layer -> the middle one; else evenly spread over [1, L-3]."""
    if num_draft_layers == 1:
        return [num_target_layers // 2]
    start, end = 1, num_target_layers - 3
    span = end - start
    return [int(round(start + i * span / (num_draft_layers - 1))) for i in range(num_draft_layers)]


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None


@dataclass(frozen=True)
class DFlashConfig:
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int | None
    max_position_embeddings: int
    attention_bias: bool
    layer_types: tuple[str, ...]
    sliding_window: int | None
    block_size: int
    num_target_layers: int | None
    target_layer_ids: tuple[int, ...]
    mask_token_id: int | None
    mask_token: str | None
    causal: bool | None
    final_logit_softcapping: float | None
    input_embedding_scale: float
    output_multiplier: float
    use_gemma_norm: bool
    rope: RopeConfig
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def num_target_features(self) -> int:
        return len(self.target_layer_ids)

    def is_layer_causal(self, layer_idx: int) -> bool:
        """Block-internal causality: explicit config wins, else sliding layers are causal (legacy default)."""
        if self.causal is not None:
            return self.causal
        return self.layer_types[layer_idx] == SLIDING_ATTENTION

    def layer_window(self, layer_idx: int) -> int | None:
        """Sliding window (HF convention: the window includes the query token) or None for full attention."""
        return self.sliding_window if self.layer_types[layer_idx] == SLIDING_ATTENTION else None


@dataclass(frozen=True)
class TargetInfo:
    """What the drafter must agree with, read from the target's config.json (text part for multimodal)."""

    hidden_size: int
    vocab_size: int
    num_hidden_layers: int
    model_type: str
    final_logit_softcapping: float | None = None
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> TargetInfo:
        text = cfg.get("text_config") or cfg
        missing = [k for k in ("hidden_size", "vocab_size", "num_hidden_layers") if k not in text]
        if missing:
            raise DFlashConfigError(
                [f"target config.json: field `{k}` is missing; point --target at a causal-LM checkpoint directory"
                 for k in missing]
            )
        return cls(
            hidden_size=int(text["hidden_size"]),
            vocab_size=int(text["vocab_size"]),
            num_hidden_layers=int(text["num_hidden_layers"]),
            model_type=str(text.get("model_type", cfg.get("model_type", ""))),
            final_logit_softcapping=text.get("final_logit_softcapping"),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
        )

    @classmethod
    def from_path(cls, path: str | Path) -> TargetInfo:
        return cls.from_dict(read_json(Path(path) / "config.json", "target"))


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise DFlashConfigError([f"{what} {path} not found; pass the checkpoint directory that holds config.json"])
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DFlashConfigError([f"{what} {path} is not valid JSON ({e}); re-download or re-export it"]) from e


class _Fields:
    """Typed reads of config.json fields; a wrongly typed value becomes one message, never an exception.

    `dflash_config` overrides the top level for the fields newer releases moved there.
    """

    WHERE = "drafter config.json"

    def __init__(self, cfg: dict, dcfg: dict, errors: list[str]):
        self.cfg, self.dcfg, self.errors = cfg, dcfg, errors

    def raw(self, key: str, moved: bool = False):
        if moved and self.dcfg.get(key) is not None:
            return self.dcfg[key]
        return self.cfg.get(key)

    def _name(self, key: str, moved: bool) -> str:
        return f"dflash_config.{key}" if moved and self.dcfg.get(key) is not None else key

    def integer(self, key: str, default=None, minimum: int | None = None, moved: bool = False, hint: str = ""):
        value = self.raw(key, moved)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
            bound = "" if minimum is None else f" >= {minimum}"
            self.errors.append(f"{self.WHERE}: `{self._name(key, moved)}` must be an integer{bound}, got {value!r}{hint}")
            return default
        return value

    def number(self, key: str, default=None, moved: bool = False, source: dict | None = None, name: str | None = None):
        value = (source if source is not None else {}).get(key) if source is not None else self.raw(key, moved)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.errors.append(f"{self.WHERE}: `{name or self._name(key, moved)}` must be a number, got {value!r}")
            return default
        return float(value)

    def flag(self, key: str, default=None, moved: bool = False):
        value = self.raw(key, moved)
        if value is None:
            return default
        if not isinstance(value, bool):
            self.errors.append(f"{self.WHERE}: `{self._name(key, moved)}` must be true or false, got {value!r}")
            return default
        return value

    def mapping(self, key: str) -> dict:
        value = self.cfg.get(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.errors.append(f"{self.WHERE}: `{key}` must be an object or null, got {value!r}")
            return {}
        return value


def _parse_rope(fields: _Fields) -> RopeConfig:
    params, scaling = fields.mapping("rope_parameters"), fields.mapping("rope_scaling")
    merged = {**params, **scaling}
    theta = fields.number("rope_theta", None)
    if theta is None:
        theta = fields.number("rope_theta", 1_000_000.0, source=params, name="rope_parameters.rope_theta")
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        fields.errors.append(
            f"{fields.WHERE}: `rope_scaling.rope_type` = {rope_type!r} is not supported; "
            f"use one of {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
        rope_type = "default"
    original = merged.get("original_max_position_embeddings")
    if original is not None and (isinstance(original, bool) or not isinstance(original, int) or original <= 0):
        fields.errors.append(f"{fields.WHERE}: `rope_scaling.original_max_position_embeddings` must be a positive "
                             f"integer, got {original!r}")
        original = None

    def scaling_number(key: str, default):
        return fields.number(key, default, source=merged, name=f"rope_scaling.{key}")

    return RopeConfig(
        theta=theta,
        rope_type=rope_type,
        factor=scaling_number("factor", 1.0),
        original_max_position_embeddings=original,
        beta_fast=scaling_number("beta_fast", 32.0),
        beta_slow=scaling_number("beta_slow", 1.0),
        attention_factor=scaling_number("attention_factor", None),
    )


def _parse_layer_types(fields: _Fields, n_layers: int) -> list[str]:
    layer_types = fields.cfg.get("layer_types")
    if layer_types is None:
        sliding = fields.flag("use_sliding_window", False)
        return [SLIDING_ATTENTION if sliding else FULL_ATTENTION] * n_layers
    if not isinstance(layer_types, list):
        fields.errors.append(f"{fields.WHERE}: `layer_types` must be a list, got {layer_types!r}")
        return [FULL_ATTENTION] * n_layers
    if len(layer_types) != n_layers:
        fields.errors.append(
            f"{fields.WHERE}: `layer_types` has {len(layer_types)} entries but `num_hidden_layers` is {n_layers}; "
            f"give one entry per draft layer"
        )
    unknown = sorted({repr(t) for t in layer_types if t not in (FULL_ATTENTION, SLIDING_ATTENTION)})
    if unknown:
        fields.errors.append(f"{fields.WHERE}: `layer_types` has unknown entries [{', '.join(unknown)}]; use "
                             f"'full_attention' or 'sliding_attention'")
    return [t if t in (FULL_ATTENTION, SLIDING_ATTENTION) else FULL_ATTENTION for t in layer_types]


def _parse_target_layer_ids(fields: _Fields, num_target_layers: int | None, n_layers: int) -> list[int]:
    where = fields.WHERE
    ids = fields.dcfg.get("target_layer_ids", fields.cfg.get("target_layer_ids"))
    if ids is None:
        if num_target_layers is None:
            fields.errors.append(f"{where}: neither `dflash_config.target_layer_ids` nor `num_target_layers` is set; "
                                 f"add the target layer ids the drafter was trained on")
            return []
        return build_target_layer_ids(num_target_layers, n_layers)
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        fields.errors.append(f"{where}: `dflash_config.target_layer_ids` must be a non-empty list of integers, got {ids!r}")
        return []
    if len(set(ids)) != len(ids):
        fields.errors.append(f"{where}: `dflash_config.target_layer_ids` {ids} has duplicates; each target layer once")
    return ids


def parse_drafter_config(cfg: dict[str, Any]) -> DFlashConfig:
    """Parse a drafter config.json dict; raises DFlashConfigError listing every problem."""
    errors: list[str] = []
    where = _Fields.WHERE
    if not isinstance(cfg, dict):
        raise DFlashConfigError([f"{where}: must be a JSON object, got {type(cfg).__name__}"])
    dcfg = cfg.get("dflash_config") or {}
    if not isinstance(dcfg, dict):
        raise DFlashConfigError([f"{where}: `dflash_config` must be an object, got {type(dcfg).__name__}"])
    fields = _Fields(cfg, dcfg, errors)

    archs = cfg.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else archs
    if archs and arch not in SUPPORTED_ARCHITECTURES:
        errors.append(f"{where}: `architectures` = {archs!r} is not a DFlash v1 drafter; this package loads "
                      f"{', '.join(SUPPORTED_ARCHITECTURES)} checkpoints")

    fix = "; copy it from the checkpoint's config"
    hidden = fields.integer("hidden_size", minimum=1, hint=fix)
    intermediate = fields.integer("intermediate_size", minimum=1, hint=fix)
    n_layers = fields.integer("num_hidden_layers", minimum=1, hint=fix)
    n_heads = fields.integer("num_attention_heads", minimum=1, hint=fix)
    for key, value in (("hidden_size", hidden), ("intermediate_size", intermediate), ("num_hidden_layers", n_layers),
                       ("num_attention_heads", n_heads)):
        if value is None and cfg.get(key) is None:
            errors.append(f"{where}: `{key}` is missing{fix}")
    if None in (hidden, intermediate, n_layers, n_heads):
        raise DFlashConfigError(errors)

    n_kv = fields.integer("num_key_value_heads", n_heads, minimum=1)
    head_dim = fields.integer("head_dim", hidden // n_heads, minimum=1)
    if n_heads % n_kv:
        errors.append(f"{where}: `num_attention_heads` ({n_heads}) must be a multiple of `num_key_value_heads` ({n_kv})")
    act = cfg.get("hidden_act", "silu")
    if act not in SUPPORTED_ACTIVATIONS:
        errors.append(f"{where}: `hidden_act` = {act!r} is not supported; DFlash v1 drafters use 'silu'")

    layer_types = _parse_layer_types(fields, n_layers)
    sliding_window = cfg.get("sliding_window")
    if SLIDING_ATTENTION in layer_types and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                             or sliding_window <= 0):
        errors.append(f"{where}: sliding_attention layers need a positive `sliding_window` (got {sliding_window!r})")
    block_size = fields.integer("block_size", 16, moved=True)
    if block_size is not None and block_size < 2:
        errors.append(f"{where}: `block_size` must be an integer >= 2 (anchor + at least one draft), got {block_size!r}")
    num_target_layers = fields.integer("num_target_layers", None, minimum=1, moved=True)
    ids = _parse_target_layer_ids(fields, num_target_layers, n_layers)

    mask_token_id = dcfg.get("mask_token_id", cfg.get("mask_token_id"))
    if mask_token_id is None:
        errors.append(f"{where}: `dflash_config.mask_token_id` is missing; set it to the id of an unused row of the "
                      f"target's embedding table (the token the drafter was trained with, e.g. 151669 for Qwen3)")
    elif isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or mask_token_id < 0:
        errors.append(f"{where}: `dflash_config.mask_token_id` must be a non-negative integer, got {mask_token_id!r}")
    mask_token = dcfg.get("mask_token", cfg.get("mask_token"))

    causal = fields.flag("is_causal", None)
    if dcfg.get("causal") is not None:
        causal = fields.flag("causal", None, moved=True)
    vocab_size = fields.integer("vocab_size", None, minimum=1)
    values = dict(
        rms_norm_eps=fields.number("rms_norm_eps", 1e-6),
        max_position_embeddings=fields.integer("max_position_embeddings", 32768, minimum=1),
        attention_bias=fields.flag("attention_bias", False),
        final_logit_softcapping=fields.number("final_logit_softcapping", None, moved=True),
        input_embedding_scale=fields.number("input_embedding_scale", 1.0, moved=True),
        output_multiplier=fields.number("output_multiplier", 1.0, moved=True),
        use_gemma_norm=fields.flag("use_gemma_norm", False, moved=True),
    )
    rope = _parse_rope(fields)
    if errors:
        raise DFlashConfigError(errors)
    return DFlashConfig(
        hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=n_layers, num_attention_heads=n_heads,
        num_key_value_heads=n_kv, head_dim=head_dim, vocab_size=vocab_size, layer_types=tuple(layer_types),
        sliding_window=sliding_window if SLIDING_ATTENTION in layer_types else None, block_size=block_size,
        num_target_layers=num_target_layers, target_layer_ids=tuple(ids), mask_token_id=mask_token_id,
        mask_token=mask_token if isinstance(mask_token, str) else None, causal=causal, rope=rope, raw=cfg, **values,
    )


def load_drafter_config(path: str | Path) -> DFlashConfig:
    return parse_drafter_config(read_json(Path(path) / "config.json", "drafter"))


def validate_pair(draft: DFlashConfig, target: TargetInfo, block_size: int | None = None) -> list[str]:
    """Everything that makes a drafter unusable with this target; empty list when compatible."""
    errors: list[str] = []
    if draft.hidden_size != target.hidden_size:
        errors.append(
            f"drafter `hidden_size` = {draft.hidden_size} but the target's is {target.hidden_size}; "
            f"a DFlash drafter must be trained for this target (its width equals the target's)"
        )
    if draft.vocab_size is not None and draft.vocab_size != target.vocab_size:
        errors.append(
            f"drafter `vocab_size` = {draft.vocab_size} but the target's is {target.vocab_size}; "
            f"the drafter borrows the target's embedding and head, so they must match (wrong target/drafter pair?)"
        )
    if draft.num_target_layers is not None and draft.num_target_layers != target.num_hidden_layers:
        errors.append(
            f"drafter `num_target_layers` = {draft.num_target_layers} but the target has "
            f"{target.num_hidden_layers} layers; use the drafter trained for this target"
        )
    bad = [i for i in draft.target_layer_ids if not 0 <= i < target.num_hidden_layers]
    if bad:
        errors.append(
            f"drafter `dflash_config.target_layer_ids` {list(draft.target_layer_ids)} has ids {bad} outside "
            f"the target's layers 0..{target.num_hidden_layers - 1}"
        )
    if draft.mask_token_id is not None and draft.mask_token_id >= target.vocab_size:
        errors.append(
            f"drafter `dflash_config.mask_token_id` = {draft.mask_token_id} is not below the target vocab size "
            f"{target.vocab_size}; pick an unused row of the target's embedding table"
        )
    if block_size is not None and block_size < 2:
        errors.append(f"block size {block_size} must be >= 2 (the anchor plus at least one draft token)")
    return errors


def check_pair(draft: DFlashConfig, target: TargetInfo, block_size: int | None = None) -> None:
    errors = validate_pair(draft, target, block_size)
    if errors:
        raise DFlashConfigError(errors)


def default_softcap(draft: DFlashConfig, target: TargetInfo) -> float | None:
    return draft.final_logit_softcapping if draft.final_logit_softcapping is not None else target.final_logit_softcapping


def yarn_mscale(scale: float) -> float:
    return 1.0 if scale <= 1 else 0.1 * math.log(scale) + 1.0
