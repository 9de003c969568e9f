"""Training data for a drafter: the target's own greedy answers to a prompt set (`dflash-sglang regenerate`).

A drafter learns to predict what its target will say, so its training answers must be the target's, not a
dataset's reference answers. Two generators, same records: batched greedy decoding with the reference engine in
`ar` mode, or a running SGLang server of the target (`--server`, much faster for large prompt sets): prompts are
tokenized here and sent as `input_ids` to its native `/generate`, greedy, stopping at the tokenizer's EOS.
"""

from __future__ import annotations

import http.client
import json
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dflash_sglang.engine import DFlashEngine
from dflash_sglang.prompts import parse_jsonl, prompt_ids


def read_prompts(path: str | Path) -> list[list[int] | str]:
    """Prompts as token-id lists or text: a JSON list of either, or JSONL rows with `prompt_ids` or `prompt`
    (the shipped prompt sets' format)."""
    path = Path(path)
    text = path.read_text()
    if path.suffix == ".jsonl":
        rows = parse_jsonl(text)
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
    return [list(p) if isinstance(p, list) else prompt_ids(tok, p, chat) for p in prompts]


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


@dataclass
class ServerRun:
    """What `regenerate_server` did: records in prompt order (failed and skipped prompts have none) and stats."""

    records: list[dict | None]
    failed: dict[int, str] = field(default_factory=dict)  # prompt index -> last error, after the retry
    skipped: list[int] = field(default_factory=list)  # never sent: the deadline had passed
    seconds: float = 0.0
    finish_reasons: dict[str, int] = field(default_factory=dict)

    def stats(self) -> dict:
        prompts = len(self.records)
        done = [r for r in self.records if r is not None]
        tokens = sum(len(r["output_ids"]) for r in done)
        return {"prompts": prompts, "records": len(done), "failed": len(self.failed), "skipped": len(self.skipped),
                "prompt_tokens": sum(len(r["prompt_ids"]) for r in done), "output_tokens": tokens,
                "seconds": round(self.seconds, 2),
                "output_tok_s": round(tokens / self.seconds, 1) if self.seconds else None,
                "finish_reasons": self.finish_reasons,
                "errors": {str(i): e for i, e in sorted(self.failed.items())[:20]}}


def generate_once(url: str, prompt_ids: list[int], max_new_tokens: int, eos_token_id: int | None,
                  timeout: float) -> tuple[list[int], str]:
    """One greedy non-streaming request to SGLang's native `/generate`: (output ids, finish reason type). The
    output ends with the EOS when the answer stopped there (as the reference engine's do)."""
    sampling = {"temperature": 0.0, "max_new_tokens": max_new_tokens, "skip_special_tokens": False}
    if eos_token_id is None:
        sampling["ignore_eos"] = True
    else:
        sampling["stop_token_ids"] = [eos_token_id]
    body = json.dumps({"input_ids": prompt_ids, "sampling_params": sampling, "stream": False}).encode()
    request = urllib.request.Request(f"{url.rstrip('/')}/generate", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        reply = json.loads(response.read())
    if isinstance(reply, list):
        reply = reply[0]
    if "output_ids" not in reply:
        raise ValueError(f"the server's reply has no `output_ids`: {str(reply)[:200]}")
    output = [int(t) for t in reply["output_ids"]][:max_new_tokens]
    finish = (reply.get("meta_info") or {}).get("finish_reason") or {}
    reason = finish.get("type", "unknown") if isinstance(finish, dict) else str(finish)
    if eos_token_id is not None:
        if eos_token_id in output:
            del output[output.index(eos_token_id) + 1:]
        elif reason == "stop" and finish.get("matched") == eos_token_id and len(output) < max_new_tokens:
            output.append(eos_token_id)
    return output, reason


def regenerate_server(urls: str | list[str], prompts: list[list[int]], max_new_tokens: int, eos_token_id: int | None,
                      concurrency: int, timeout: float = 600.0, deadline_seconds: float | None = None,
                      progress: bool = True, progress_every: float = 10.0) -> ServerRun:
    """Greedy answers from running SGLang servers of the same target, `concurrency` requests in flight over all of
    them (prompt i goes to server i mod n: a small target's decode is bound by its scheduler's host time, so
    several servers on one GPU answer faster than one). A failed request is retried once, then reported in
    `failed`; prompts not yet sent when `deadline_seconds` have passed are reported in `skipped`. A progress
    line goes to stderr every `progress_every` seconds."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    started = time.perf_counter()
    records: list[dict | None] = [None] * len(prompts)
    run = ServerRun(records)
    lock = threading.Lock()
    counters = {"done": 0, "tokens": 0, "last": started}

    def one(index: int) -> None:
        if deadline_seconds is not None and time.perf_counter() - started > deadline_seconds:
            with lock:
                run.skipped.append(index)
            return
        error = None
        for _ in range(2):
            try:
                output, reason = generate_once(urls[index % len(urls)], prompts[index], max_new_tokens, eos_token_id,
                                               timeout)
                break
            except (OSError, ValueError, http.client.HTTPException) as e:
                error = f"{type(e).__name__}: {e}"
        else:
            with lock:
                run.failed[index] = error
            print(f"regenerate: prompt {index} failed twice: {error}", file=sys.stderr, flush=True)
            return
        with lock:
            records[index] = {"prompt_ids": prompts[index], "output_ids": output}
            run.finish_reasons[reason] = run.finish_reasons.get(reason, 0) + 1
            counters["done"] += 1
            counters["tokens"] += len(output)
            now = time.perf_counter()
            if progress and (now - counters["last"] >= progress_every or counters["done"] == len(prompts)):
                counters["last"] = now
                print(f"regenerate: {counters['done']}/{len(prompts)} answers, {counters['tokens']} tokens, "
                      f"{counters['tokens'] / (now - started):.0f} tok/s, {now - started:.0f}s", file=sys.stderr,
                      flush=True)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(one, range(len(prompts))))
    run.skipped.sort()
    run.seconds = time.perf_counter() - started
    return run


def _write_records(out: str | Path, records: list[dict | None]) -> int:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    written = 0
    with open(out, "w") as f:
        for record in records:
            if record is not None:
                f.write(json.dumps(record) + "\n")
                written += 1
    return written


def regenerate_file(target: str | Path, prompts_path: str | Path, out: str | Path, max_new_tokens: int,
                    batch_size: int, chat: bool = False, ignore_eos: bool = False, dtype: torch.dtype = torch.float32,
                    device: str = "cpu", progress: bool = True, server: list[str] | None = None, concurrency: int = 64,
                    timeout: float = 600.0, deadline_seconds: float | None = None) -> dict:
    """Write one JSONL record per answered prompt (all of them with the reference engine); returns the stats.
    With `server` (one URL or several), the answers come from SGLang servers of `target` (which then only gives the
    tokenizer)."""
    prompts = tokenize_prompts(read_prompts(prompts_path), target, chat)
    empty = [n for n, p in enumerate(prompts) if not p]
    if empty:
        raise ValueError(f"{prompts_path}: prompts {empty[:5]} are empty after tokenization")
    eos = None if ignore_eos else target_eos(target)
    if server is not None:
        run = regenerate_server(server, prompts, max_new_tokens, eos, concurrency, timeout, deadline_seconds, progress)
        _write_records(out, run.records)
        return run.stats()
    started = time.perf_counter()
    engine = DFlashEngine.load(target, None, dtype=dtype, device=device)
    records = regenerate(engine, prompts, max_new_tokens, batch_size, eos, progress)
    seconds = time.perf_counter() - started
    tokens = sum(len(r["output_ids"]) for r in records)
    return {"prompts": len(prompts), "records": _write_records(out, records), "failed": 0, "skipped": 0,
            "prompt_tokens": sum(len(p) for p in prompts), "output_tokens": tokens, "seconds": round(seconds, 2),
            "output_tok_s": round(tokens / seconds, 1) if seconds else None}
