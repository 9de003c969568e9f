"""Training data for a drafter: the target's own greedy answers to a prompt set (`dflash-sglang regenerate`).

A drafter learns to predict what its target will say, so its training answers must be the target's, not a
dataset's reference answers. Batched greedy decoding with the reference engine in `ar` mode.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dflash_sglang.engine import DFlashEngine


def read_prompts(path: str | Path) -> list[list[int] | str]:
    """Prompts as token-id lists or text: a JSON list of either, or JSONL rows with `prompt_ids` or `prompt`
    (the shipped prompt sets' format)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        prompts = []
        for n, row in enumerate(rows):
            if "prompt_ids" not in row and "prompt" not in row:
                raise ValueError(f"{path}:{n + 1}: a row needs `prompt_ids` or `prompt`")
            prompts.append(row["prompt_ids"] if "prompt_ids" in row else row["prompt"])
        return prompts
    prompts = json.loads(text)
    if not isinstance(prompts, list):
        raise ValueError(f"{path}: expected a JSON list of prompts (token-id lists or strings)")
    return prompts


def tokenize_prompts(prompts: list[list[int] | str], target: str | Path, chat: bool) -> list[list[int]]:
    """Token ids pass through; text goes through the target's tokenizer (its chat template with `chat`)."""
    if all(isinstance(p, list) for p in prompts):
        return [list(p) for p in prompts]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(target))
    ids = []
    for p in prompts:
        if isinstance(p, list):
            ids.append(list(p))
        elif chat:
            text = tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
            ids.append(tok(text, add_special_tokens=False)["input_ids"])
        else:
            ids.append(tok(p)["input_ids"])
    return ids


def target_eos(target: str | Path) -> int | None:
    """The tokenizer's EOS id (answers end where the target would stop), or None without a tokenizer."""
    from transformers import AutoTokenizer

    path = Path(target)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        return None
    return AutoTokenizer.from_pretrained(str(target)).eos_token_id


def regenerate(engine: DFlashEngine, prompts: list[list[int]], max_new_tokens: int, batch_size: int,
               eos_token_id: int | None, progress: bool = True) -> list[dict]:
    """`[{"prompt_ids", "output_ids"}]` in prompt order; prompts are batched by length to limit padding."""
    from tqdm.auto import tqdm

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    outputs: dict[int, list[int]] = {}
    batches = [order[lo: lo + batch_size] for lo in range(0, len(order), batch_size)]
    for batch in tqdm(batches, desc="regenerate", disable=not progress, dynamic_ncols=True):
        result = engine.generate([prompts[i] for i in batch], max_new_tokens, mode="ar", eos_token_id=eos_token_id)
        outputs.update(zip(batch, result.tokens))
    return [{"prompt_ids": prompts[i], "output_ids": outputs[i]} for i in range(len(prompts))]


def regenerate_file(target: str | Path, prompts_path: str | Path, out: str | Path, max_new_tokens: int,
                    batch_size: int, chat: bool = False, ignore_eos: bool = False, dtype: torch.dtype = torch.float32,
                    device: str = "cpu", progress: bool = True) -> int:
    """Write one JSONL record per prompt; returns the number written."""
    prompts = tokenize_prompts(read_prompts(prompts_path), target, chat)
    empty = [n for n, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"{prompts_path}: prompts {empty[:5]} are empty after tokenization")
    engine = DFlashEngine.load(target, None, dtype=dtype, device=device)
    eos = None if ignore_eos else target_eos(target)
    records = regenerate(engine, prompts, max_new_tokens, batch_size, eos, progress)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return len(records)
