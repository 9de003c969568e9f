"""Benchmark prompt sets shipped with the package (built by scripts/build_prompt_sets.py from their PyPI packages)."""

from __future__ import annotations

import json
from importlib import resources

PROMPT_SETS = ("math500", "humaneval", "mtbench", "gsm8k")


def parse_jsonl(text: str) -> list:
    """One JSON value per non-blank line. Lines end at "\\n" only: str.splitlines() also breaks at U+2028, U+0085
    and other separators that JSON strings may hold unescaped (json.dumps(..., ensure_ascii=False) writes them
    so), which cut a ShareGPT prompt in two on the H200 on 2026-11-29."""
    return [json.loads(line) for line in text.split("\n") if line.strip()]


def load_prompt_set(name: str, limit: int | None = None) -> list[dict]:
    """[{"id", "prompt"}, ...] in a fixed order; `limit` takes the first N."""
    if name not in PROMPT_SETS:
        raise ValueError(f"prompt set must be one of {PROMPT_SETS}, got {name!r}")
    text = (resources.files("dflash_sglang") / "data" / "prompts" / f"{name}.jsonl").read_text()
    rows = parse_jsonl(text)
    return rows[:limit] if limit is not None else rows


def prompt_ids(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of one user prompt: rendered as a one-turn chat by the tokenizer's template (whose special tokens
    are then not added twice) with `chat`, else tokenized as is."""
    if not chat:
        return list(tokenizer(prompt)["input_ids"])
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])
