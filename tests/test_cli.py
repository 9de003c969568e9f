"""The CLI contracts: make-tiny layouts, check exit codes and messages, generate --json, no tracebacks."""

import json
import subprocess
import sys

import pytest

from dflash_sglang.cli import main


def test_make_tiny_writes_published_layouts(tmp_path, capsys):
    assert main(["make-tiny", "--arch", "gemma4", "--out", str(tmp_path), "--vocab-size", "300", "--block-size", "10",
                 "--draft-layers", "3"]) == 0
    paths = json.loads(capsys.readouterr().out)
    target = json.loads((tmp_path / "target" / "config.json").read_text())
    drafter = json.loads((tmp_path / "drafter" / "config.json").read_text())
    assert target["architectures"] == ["Gemma4ForConditionalGeneration"] and "global_head_dim" in target["text_config"]
    assert target["vision_config"]["patch_size"] == 16, "SGLang builds the vision tower of this layout"
    assert drafter["architectures"] == ["DFlashDraftModel"] and drafter["block_size"] == 10
    assert drafter["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention"]
    assert set(drafter["dflash_config"]) == {"mask_token_id", "target_layer_ids"}
    assert paths == {"target": str(tmp_path / "target"), "drafter": str(tmp_path / "drafter")}


def test_check_ok_and_mismatch(tiny_pairs, capsys):
    (qt, qd), (_, gd) = tiny_pairs["qwen3"], tiny_pairs["gemma4"]
    assert main(["check", "--target", str(qt), "--drafter", str(qd)]) == 0
    assert main(["check", "--target", str(qt), "--drafter", str(gd)]) == 2
    err = capsys.readouterr().err
    assert "error: drafter `num_target_layers` = 6 but the target has 4 layers" in err
    assert "Traceback" not in err


def test_check_missing_paths_exit_2(tmp_path, capsys):
    assert main(["check", "--target", str(tmp_path / "nope"), "--drafter", str(tmp_path / "nada")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["ar", "chain", "tree"])
def test_generate_json(tiny_pairs, capsys, mode):
    target, drafter = tiny_pairs["llama"]
    assert main(["generate", "--target", str(target), "--drafter", str(drafter), "--prompt-ids", "5,6,7",
                 "--max-new-tokens", "12", "--mode", mode, "--json", "--dtype", "float64"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["tokens"]) == 12 and out["text"] is None
    assert {"acceptance_lengths", "mean_acceptance"} <= out.keys()


def test_generate_text_prompt_uses_the_real_tokenizer(tmp_path, capsys):
    """Full-vocab pair: the real Qwen3 tokenizer ships with make-tiny; chat template applied with --chat."""
    assert main(["make-tiny", "--arch", "qwen3", "--out", str(tmp_path), "--hidden-size", "32"]) == 0
    capsys.readouterr()
    assert main(["generate", "--target", str(tmp_path / "target"), "--drafter", str(tmp_path / "drafter"),
                 "--prompt", "Hello there", "--chat", "--max-new-tokens", "6", "--ignore-eos", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert isinstance(out["text"], str) and len(out["tokens"]) == 6


def test_module_entry_point_runs():
    result = subprocess.run([sys.executable, "-m", "dflash_sglang", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "make-tiny" in result.stdout


@pytest.mark.parametrize("shape", ["gemma-4-31b", "qwen3-32b"])
def test_make_shape_configs_are_a_valid_pair(tmp_path, capsys, shape):
    from dflash_sglang.config import TargetInfo, load_drafter_config, validate_pair

    assert main(["make-shape", "--shape", shape, "--out", str(tmp_path)]) == 0
    paths = json.loads(capsys.readouterr().out)
    assert validate_pair(load_drafter_config(paths["drafter"]), TargetInfo.from_path(paths["target"])) == []
    assert (tmp_path / "target" / "tokenizer.json").is_file()


def test_gemma4_target_loads_its_processor_as_sglang_does(tmp_path, capsys):
    """SGLang loads AutoProcessor for the published (multimodal) Gemma 4 layout; make-tiny must satisfy it."""
    from transformers import AutoProcessor

    assert main(["make-tiny", "--arch", "gemma4", "--out", str(tmp_path), "--hidden-size", "32"]) == 0
    processor = AutoProcessor.from_pretrained(str(tmp_path / "target"))
    assert type(processor).__name__ == "Gemma4Processor"
    assert processor.tokenizer.image_token_id == 258880 and processor.tokenizer.mask_token_id == 4
