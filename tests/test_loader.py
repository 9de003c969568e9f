import json

import pytest
import torch
from safetensors.torch import save_file

from dflash_sglang.config import DFlashConfigError, load_drafter_config
from dflash_sglang.loader import (INDEX_FILE, SINGLE_FILE, expected_drafter_shapes, load_drafter_state_dict,
                                  save_drafter)
from dflash_sglang.tiny import drafter_config_dict, random_drafter_state


@pytest.fixture
def drafter_cfg():
    return drafter_config_dict("gemma4", hidden=32, vocab=300, num_target_layers=6, draft_layers=3, block_size=8,
                               mask_token_id=299, window=8, num_features=4)


def test_real_layout_key_names_and_count(drafter_cfg, tmp_path):
    save_drafter(tmp_path, drafter_cfg, random_drafter_state(drafter_cfg, 0))
    cfg = load_drafter_config(tmp_path)
    shapes = expected_drafter_shapes(cfg)
    assert len(shapes) == 11 * 3 + 3
    assert shapes["fc.weight"] == (32, 4 * 32)
    assert "layers.2.self_attn.k_norm.weight" in shapes and "layers.0.mlp.gate_proj.weight" in shapes


@pytest.mark.parametrize("prefix", ["", "model."])
def test_round_trip_single_file_with_or_without_prefix(drafter_cfg, tmp_path, prefix):
    state = random_drafter_state(drafter_cfg, 1)
    (tmp_path / "config.json").write_text(json.dumps(drafter_cfg))
    save_file({prefix + k: v.contiguous() for k, v in state.items()}, str(tmp_path / SINGLE_FILE))
    loaded = load_drafter_state_dict(tmp_path, load_drafter_config(tmp_path))
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_round_trip_sharded(drafter_cfg, tmp_path):
    state = random_drafter_state(drafter_cfg, 2)
    save_drafter(tmp_path, drafter_cfg, state, max_shard_bytes=20_000)
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert len(set(index["weight_map"].values())) > 1
    loaded = load_drafter_state_dict(tmp_path, load_drafter_config(tmp_path))
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_shape_mismatch_names_key_and_shapes(drafter_cfg, tmp_path):
    state = random_drafter_state(drafter_cfg, 3)
    state["fc.weight"] = torch.zeros(32, 3 * 32)
    save_drafter(tmp_path, drafter_cfg, state)
    with pytest.raises(DFlashConfigError, match=r"`fc.weight` has shape \(32, 96\), expected \(32, 128\)"):
        load_drafter_state_dict(tmp_path, load_drafter_config(tmp_path))


def test_missing_tensor_and_missing_shard(drafter_cfg, tmp_path):
    state = random_drafter_state(drafter_cfg, 4)
    del state["norm.weight"]
    save_drafter(tmp_path / "a", drafter_cfg, state)
    with pytest.raises(DFlashConfigError, match="tensor `norm.weight` is missing"):
        load_drafter_state_dict(tmp_path / "a", load_drafter_config(tmp_path / "a"))
    save_drafter(tmp_path / "b", drafter_cfg, random_drafter_state(drafter_cfg, 4), max_shard_bytes=20_000)
    next((tmp_path / "b").glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(DFlashConfigError, match="names shards that are missing"):
        load_drafter_state_dict(tmp_path / "b", load_drafter_config(tmp_path / "b"))


def test_corrupt_safetensors(drafter_cfg, tmp_path):
    save_drafter(tmp_path, drafter_cfg, random_drafter_state(drafter_cfg, 5))
    data = (tmp_path / SINGLE_FILE).read_bytes()
    (tmp_path / SINGLE_FILE).write_bytes(data[: len(data) // 2])
    with pytest.raises(DFlashConfigError, match="corrupt or truncated"):
        load_drafter_state_dict(tmp_path, load_drafter_config(tmp_path))


def test_no_weights_file(drafter_cfg, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(drafter_cfg))
    with pytest.raises(DFlashConfigError, match="no model.safetensors"):
        load_drafter_state_dict(tmp_path, load_drafter_config(tmp_path))
