"""Build one broken target/drafter pair per failure mode and record the message each gets.

    python scripts/bad_inputs_report.py > docs/reliability-bad-inputs.md

Every case goes through `dflash-sglang check` (exit code and stderr); cases that only the SGLang startup path can
see (its layer-capture limit, an unsupported SGLang version) go through `dflash_sglang.sglang` when SGLang is
importable. Runs on CPU in about a minute.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

from dflash_sglang.tiny import make_tiny


def edit_config(drafter: Path, change) -> None:
    cfg = json.loads((drafter / "config.json").read_text())
    change(cfg)
    (drafter / "config.json").write_text(json.dumps(cfg))


def truncate_weights(drafter: Path) -> None:
    weights = drafter / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def wrong_fc_width(drafter: Path) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(drafter / "model.safetensors"))
    tensors["fc.weight"] = tensors["fc.weight"][:, :64].contiguous()
    save_file(tensors, str(drafter / "model.safetensors"))


CASES = [
    ("hidden size differs from the target's", lambda d: edit_config(d, lambda c: c.update(hidden_size=96))),
    ("vocab size differs from the target's", lambda d: edit_config(d, lambda c: c.update(vocab_size=1000))),
    ("trained for a target with another depth", lambda d: edit_config(d, lambda c: c.update(num_target_layers=8))),
    ("target layer id out of range", lambda d: edit_config(d, lambda c: c["dflash_config"].update(target_layer_ids=[0, 9]))),
    ("mask token id missing", lambda d: edit_config(d, lambda c: c["dflash_config"].pop("mask_token_id"))),
    ("mask token id >= vocab", lambda d: edit_config(d, lambda c: c["dflash_config"].update(mask_token_id=512))),
    ("block size < 2", lambda d: edit_config(d, lambda c: c.update(block_size=1))),
    ("fc width != K x hidden (weights)", wrong_fc_width),
    ("corrupt safetensors", truncate_weights),
    ("unsupported drafter architecture", lambda d: edit_config(d, lambda c: c.update(architectures=["DFlash2DraftModel"]))),
    ("unsupported activation", lambda d: edit_config(d, lambda c: c.update(hidden_act="gelu"))),
    ("layer_types length != layers", lambda d: edit_config(d, lambda c: c.update(layer_types=["full_attention"]))),
    ("sliding layers without a window", lambda d: edit_config(
        d, lambda c: c.update(layer_types=["sliding_attention"] * c["num_hidden_layers"], sliding_window=None))),
    ("unsupported RoPE scaling", lambda d: edit_config(d, lambda c: c.update(rope_scaling={"rope_type": "dynamic"}))),
    ("config.json is not JSON", lambda d: (d / "config.json").write_text("{not json")),
]


def check(target: Path, drafter: Path) -> tuple[int, str]:
    run = subprocess.run([sys.executable, "-m", "dflash_sglang", "check", "--target", str(target), "--drafter",
                          str(drafter)], capture_output=True, text=True)
    return run.returncode, run.stderr.strip()


def sglang_only_cases(target: Path, drafter: Path, work: Path) -> list[tuple[str, str]]:
    try:
        from dflash_sglang.config import DFlashConfigError
        from dflash_sglang.sglang.compat import UnsupportedSGLangVersion, check_sglang_version
        from dflash_sglang.sglang.worker import check_startup
    except ImportError:
        return []
    rows = []
    last = work / "last-layer"
    shutil.copytree(drafter, last)
    edit_config(last, lambda c: c["dflash_config"].update(target_layer_ids=[0, 3]))
    args = SimpleNamespace(speculative_num_draft_tokens=16, speculative_draft_model_path=str(last),
                           speculative_draft_model_revision=None, model_path=str(target), revision=None,
                           speculative_draft_window_size=None)
    from transformers import AutoConfig
    import torch

    runner = SimpleNamespace(model_config=SimpleNamespace(hf_config=AutoConfig.from_pretrained(target),
                                                          is_draft_model=False, linear_attn_registry_result=None),
                             model=SimpleNamespace(lm_head=SimpleNamespace(weight=torch.zeros(4, 4))))
    try:
        check_startup(args, runner)
    except DFlashConfigError as e:
        rows.append(("target's last layer as a feature (SGLang cannot capture it)", e.messages[0]))
    try:
        check_sglang_version("0.5.23")
    except UnsupportedSGLangVersion as e:
        rows.append(("unsupported SGLang version", str(e)))
    from dflash_sglang.sglang.tree_mode import TreeSettings, check_tree

    # Tree-mode flags against a B=16 drafter: check_startup raises exactly these lines.
    for name, settings, width, backend in [
        ("tree mode on a target backend without custom verify masks", TreeSettings(31, 4), 32, "fa3"),
        ("tree mode with a conflicting --speculative-num-draft-tokens", TreeSettings(31, 4), 16, "triton"),
        ("tree budget beyond the nodes top-1 can hold", TreeSettings(20, 1), 21, "triton"),
        ("tree budget too small for the drafter's block", TreeSettings(3, 4), 4, "triton"),
    ]:
        rows.append((name, check_tree(settings, 16, width, backend)[0]))
    from dflash_sglang.sglang.adaptive_width import check_adaptive

    rows.append(("adaptive width with tensor parallelism",
                 check_adaptive(SimpleNamespace(tp_size=2, pp_size=1, dp_size=1))[0]))
    from dflash_sglang.sglang.verify_attention import check_splitkv

    rows.append(("split-KV verify on another target backend",
                 check_splitkv(SimpleNamespace(attention_backend="fa3", decode_attention_backend=None))[0]))
    return rows


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        target, drafter = make_tiny("qwen3", work / "pair", vocab_size=512)
        print("# Bad inputs and the messages they get\n")
        print("Generated by `python scripts/bad_inputs_report.py` from real broken checkpoints (a tiny Qwen3 pair, "
              "hidden 64, vocab 512, 4 target layers, 2 drafter features). `dflash-sglang check` exits 2 with "
              "these lines; the SGLang worker raises the same messages at startup, before any GPU allocation.\n")
        print("| bad input | exit | message |\n|---|---:|---|")
        for name, breaker in CASES:
            broken = work / name.replace(" ", "_").replace("/", "_")
            shutil.copytree(drafter, broken)
            breaker(broken)
            code, err = check(target, broken)
            err = err.replace(str(broken), "<drafter>").replace("|", "/").replace("\n", "<br>")
            print(f"| {name} | {code} | {err} |")
        for name, message in sglang_only_cases(target, drafter, work):
            print(f"| {name} | startup | {message.replace('|', '/')} |")


if __name__ == "__main__":
    main()
