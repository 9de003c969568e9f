"""scripts/tau_sets.py: tau per prompt set from the reference engine, each request's tokens over its verify steps,
the same for a prompt whatever batch it runs in."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from dflash_sglang.engine import DFlashEngine
from dflash_sglang.prompts import load_prompt_set, prompt_ids

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "dflash_sglang" / "data" / "pairs" / "demo"
SCRIPT = REPO / "scripts" / "tau_sets.py"
spec = importlib.util.spec_from_file_location("tau_sets", SCRIPT)
tau_sets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tau_sets)


def run(tmp_path: Path, monkeypatch, batch_size: int) -> dict:
    out = tmp_path / f"tau-{batch_size}.json"
    monkeypatch.setattr(sys, "argv", [
        str(SCRIPT), "--target", str(DEMO / "target"), "--drafter", str(DEMO / "drafter"), "--sets", "humaneval",
        "--limit", "3", "--modes", "chain", "tree", "--tree-budget", "8", "--max-new-tokens", "24",
        "--batch-size", str(batch_size), "--out", str(out)])
    tau_sets.main()
    return json.loads(out.read_text())["results"]


def test_tau_is_the_mean_over_requests_of_tokens_per_verify_step(tmp_path, monkeypatch, capsys):
    batched = run(tmp_path, monkeypatch, batch_size=2)
    table = capsys.readouterr().out
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(DEMO / "target")
    engine = DFlashEngine.load(DEMO / "target", DEMO / "drafter", dtype=torch.float32)
    for mode, budget in (("chain", None), ("tree", 8)):
        taus = []
        for row in load_prompt_set("humaneval", 3):
            result = engine.generate([prompt_ids(tokenizer, row["prompt"], chat=True)], 24, mode=mode,
                                     tree_budget=budget, eos_token_id=tokenizer.eos_token_id)
            taus.append(len(result.tokens[0]) / len(result.acceptance_lengths[0]))
        entry = batched[mode]["humaneval"]
        assert entry["requests"] == 3 and entry["tau"] == pytest.approx(sum(taus) / 3)
        assert entry["tau"] > 1.2  # the demo drafter drafts Python, HumanEval's language
    assert "| chain |" in table and "| tree of 8 (top-4) |" in table
