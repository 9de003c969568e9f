"""Config parsing never fails with anything but DFlashConfigError, whatever a config.json holds."""

import copy

from hypothesis import given, settings
from hypothesis import strategies as st

from dflash_sglang.config import DFlashConfig, DFlashConfigError, parse_drafter_config, validate_pair
from test_config import GEMMA4_31B, GEMMA4_31B_TARGET, QWEN3_8B, QWEN3_8B_TARGET

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 300000) | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10,
)
TOP_KEYS = sorted(set(QWEN3_8B) | set(GEMMA4_31B) | {"is_causal", "rope_parameters", "use_sliding_window"})
DFLASH_KEYS = ["mask_token_id", "target_layer_ids", "block_size", "causal", "final_logit_softcapping",
               "input_embedding_scale", "output_multiplier", "use_gemma_norm"]


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([(QWEN3_8B, QWEN3_8B_TARGET), (GEMMA4_31B, GEMMA4_31B_TARGET)]),
       st.dictionaries(st.sampled_from(TOP_KEYS), json_values, max_size=3),
       st.dictionaries(st.sampled_from(DFLASH_KEYS), json_values, max_size=3),
       st.lists(st.sampled_from(TOP_KEYS), max_size=2))
def test_any_mutation_parses_or_raises_config_error(base, top, dflash, removed):
    raw = copy.deepcopy(base[0])
    raw.update(top)
    if isinstance(raw.get("dflash_config"), dict):
        raw["dflash_config"].update(dflash)
    for key in removed:
        raw.pop(key, None)
    try:
        cfg = parse_drafter_config(raw)
    except DFlashConfigError as e:
        assert e.messages and all(isinstance(m, str) and m for m in e.messages)
        return
    assert isinstance(cfg, DFlashConfig)
    assert all(isinstance(m, str) for m in validate_pair(cfg, base[1]))
