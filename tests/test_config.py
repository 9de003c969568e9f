import copy

import pytest

from dflash_sglang.config import (DFlashConfigError, TargetInfo, build_target_layer_ids, parse_drafter_config,
                                  validate_pair)

# z-lab/Qwen3-8B-DFlash-b16 (v1: block_size and num_target_layers at top level).
QWEN3_8B = {
    "architectures": ["DFlashDraftModel"], "auto_map": {"AutoModel": "dflash.DFlashDraftModel"}, "model_type": "qwen3",
    "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 5, "num_attention_heads": 32,
    "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 1000000,
    "rope_scaling": None, "max_position_embeddings": 40960, "attention_bias": False, "tie_word_embeddings": True,
    "layer_types": ["full_attention"] * 5, "sliding_window": None, "vocab_size": 151936, "block_size": 16,
    "num_target_layers": 36, "dflash_config": {"mask_token_id": 151669, "target_layer_ids": [1, 9, 17, 25, 33]},
}
# z-lab/gemma-4-31B-it-DFlash (4 sliding + 1 full, softcap, 6 features for 5 layers).
GEMMA4_31B = {
    "architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": 5376, "intermediate_size": 10752,
    "num_hidden_layers": 5, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
    "layer_types": ["sliding_attention"] * 4 + ["full_attention"], "sliding_window": 2048, "use_sliding_window": True,
    "rope_theta": 1000000.0, "rope_scaling": None, "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
    "final_logit_softcapping": 30.0, "tie_word_embeddings": True, "vocab_size": 262144, "block_size": 16,
    "num_target_layers": 60, "dflash_config": {"mask_token_id": 4, "target_layer_ids": [1, 12, 23, 35, 46, 57]},
}
QWEN3_8B_TARGET = TargetInfo(hidden_size=4096, vocab_size=151936, num_hidden_layers=36, model_type="qwen3")
GEMMA4_31B_TARGET = TargetInfo(hidden_size=5376, vocab_size=262144, num_hidden_layers=60, model_type="gemma4_text",
                               final_logit_softcapping=30.0)


def test_published_rule_for_target_layer_ids():
    assert build_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]
    assert build_target_layer_ids(32, 5) == [1, 8, 15, 22, 29]
    assert build_target_layer_ids(48, 5) == [1, 12, 23, 34, 45]
    assert build_target_layer_ids(24, 1) == [12]


def test_qwen3_8b_v1_config():
    cfg = parse_drafter_config(QWEN3_8B)
    assert cfg.block_size == 16 and cfg.target_layer_ids == (1, 9, 17, 25, 33) and cfg.mask_token_id == 151669
    assert cfg.num_target_features == 5 and not any(cfg.is_layer_causal(i) for i in range(5))
    assert cfg.layer_window(0) is None
    assert validate_pair(cfg, QWEN3_8B_TARGET) == []


def test_gemma4_31b_config_sliding_layers_are_causal_by_default():
    cfg = parse_drafter_config(GEMMA4_31B)
    assert [cfg.is_layer_causal(i) for i in range(5)] == [True] * 4 + [False]
    assert [cfg.layer_window(i) for i in range(5)] == [2048] * 4 + [None]
    assert cfg.final_logit_softcapping == 30.0 and cfg.num_target_features == 6
    assert validate_pair(cfg, GEMMA4_31B_TARGET) == []


def test_newer_forms_block_size_and_causal_inside_dflash_config():
    raw = copy.deepcopy(GEMMA4_31B)
    del raw["block_size"]
    raw["dflash_config"].update(block_size=8, causal=False, input_embedding_scale=2.0, output_multiplier=0.5,
                                use_gemma_norm=True)
    cfg = parse_drafter_config(raw)
    assert cfg.block_size == 8 and cfg.input_embedding_scale == 2.0 and cfg.output_multiplier == 0.5
    assert cfg.use_gemma_norm and not any(cfg.is_layer_causal(i) for i in range(5))
    raw["is_causal"] = True
    del raw["dflash_config"]["causal"]
    assert all(parse_drafter_config(raw).is_layer_causal(i) for i in range(5))


def test_defaulted_target_layer_ids_and_rope_parameters():
    raw = copy.deepcopy(QWEN3_8B)
    del raw["dflash_config"]["target_layer_ids"], raw["rope_theta"]
    raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5e6, "factor": 4.0, "original_max_position_embeddings": 32768}
    cfg = parse_drafter_config(raw)
    assert cfg.target_layer_ids == (1, 9, 17, 25, 33)
    assert cfg.rope.rope_type == "yarn" and cfg.rope.theta == 5e6 and cfg.rope.factor == 4.0


def _errors(raw=None, target=QWEN3_8B_TARGET, **changes):
    raw = copy.deepcopy(raw or QWEN3_8B)
    for key, value in changes.items():
        if key.startswith("dflash_"):
            raw["dflash_config"][key[len("dflash_"):]] = value
        elif value is None:
            raw.pop(key, None)
        else:
            raw[key] = value
    try:
        return validate_pair(parse_drafter_config(raw), target)
    except DFlashConfigError as e:
        return e.messages


# (changes, a fragment of the one message it must produce)
BAD_CONFIGS = {
    "hidden size mismatch": (dict(hidden_size=2560), "`hidden_size` = 2560 but the target's is 4096"),
    "vocab mismatch": (dict(vocab_size=32000), "`vocab_size` = 32000 but the target's is 151936"),
    "target layer count": (dict(num_target_layers=28), "`num_target_layers` = 28 but the target has 36"),
    "layer id out of range": (dict(dflash_target_layer_ids=[1, 9, 17, 25, 40]), "ids [40] outside the target's layers"),
    "duplicate layer ids": (dict(dflash_target_layer_ids=[1, 9, 9, 25, 33]), "has duplicates"),
    "mask id missing": (dict(dflash_mask_token_id=None), "`dflash_config.mask_token_id` is missing"),
    "mask id >= vocab": (dict(dflash_mask_token_id=151936), "is not below the target vocab size 151936"),
    "block size too small": (dict(block_size=1), "`block_size` must be an integer >= 2"),
    "layer_types length": (dict(layer_types=["full_attention"] * 4), "`layer_types` has 4 entries but"),
    "sliding without window": (dict(layer_types=["sliding_attention"] * 5, sliding_window=None), "need a positive `sliding_window`"),
    "activation": (dict(hidden_act="gelu"), "`hidden_act` = 'gelu' is not supported"),
    "architecture": (dict(architectures=["DFlash2DraftModel"]), "is not a DFlash v1 drafter"),
    "rope type": (dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "`rope_scaling.rope_type` = 'dynamic'"),
    "gqa": (dict(num_key_value_heads=5), "must be a multiple of `num_key_value_heads`"),
    "missing hidden size": (dict(hidden_size=None), "`hidden_size` is missing"),
    "hidden size as text": (dict(hidden_size="4096"), "`hidden_size` must be an integer >= 1, got '4096'"),
    "epsilon as text": (dict(rms_norm_eps="1e-6"), "`rms_norm_eps` must be a number, got '1e-6'"),
    "rope_scaling not an object": (dict(rope_scaling=True), "`rope_scaling` must be an object or null, got True"),
}


@pytest.mark.parametrize("name", BAD_CONFIGS)
def test_each_bad_config_gets_its_message(name):
    changes, fragment = BAD_CONFIGS[name]
    errors = _errors(**changes)
    assert len(errors) == 1, errors
    assert fragment in errors[0]


def test_all_problems_of_a_level_are_reported_together():
    assert len(_errors(hidden_act="gelu", layer_types=["full_attention"], dflash_mask_token_id=None)) == 3
    assert len(_errors(hidden_size=2560, vocab_size=1000, dflash_mask_token_id=200000)) == 3


def test_target_info_reads_multimodal_text_config():
    info = TargetInfo.from_dict({"model_type": "gemma4", "text_config": {"hidden_size": 5376, "vocab_size": 262144,
                                 "num_hidden_layers": 60, "final_logit_softcapping": 30.0}})
    assert info.num_hidden_layers == 60 and info.final_logit_softcapping == 30.0
    with pytest.raises(DFlashConfigError, match="`vocab_size` is missing"):
        TargetInfo.from_dict({"hidden_size": 8, "num_hidden_layers": 2})
