"""Benchmark prompt sets shipped with the package (built by scripts/build_prompt_sets.py from their PyPI packages)."""

from __future__ import annotations

import json
from importlib import resources

PROMPT_SETS = ("math500", "humaneval", "mtbench", "gsm8k")


def load_prompt_set(name: str, limit: int | None = None) -> list[dict]:
    """[{"id", "prompt"}, ...] in a fixed order; `limit` takes the first N."""
    if name not in PROMPT_SETS:
        raise ValueError(f"prompt set must be one of {PROMPT_SETS}, got {name!r}")
    text = (resources.files("dflash_sglang") / "data" / "prompts" / f"{name}.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    return rows[:limit] if limit is not None else rows


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of one user prompt: rendered as a one-turn chat by the tokenizer's template (whose special tokens
    are then not added twice) with `chat`, else tokenized as is."""
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
