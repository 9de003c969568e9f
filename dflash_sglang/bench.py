"""`dflash-sglang bench`: a prompt set against a running SGLang server, at several concurrencies, greedy.

Talks to SGLang's native streaming `/generate` (it carries `meta_info`, where the OpenAI routes do not):
TTFT is the first chunk with output, TPOT the rest of the latency over the remaining tokens, acceptance length
`meta_info.spec_accept_length` (completion tokens per verify step). Output ids are compared with a reference run
(e.g. the same prompts through plain decoding) so a speed figure never comes without its losslessness check.
Standard library only on the client side; loopback servers only.
"""

from __future__ import annotations

import json
import statistics
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dflash_sglang.prompts import load_prompt_set


@dataclass
class RequestResult:
    id: str
    output_ids: list[int]
    ttft: float
    latency: float
    accept_length: float | None
    error: str | None = None

    @property
    def tpot(self) -> float | None:
        n = len(self.output_ids)
        return (self.latency - self.ttft) / (n - 1) if n > 1 else None


@dataclass
class LevelResult:
    concurrency: int
    requests: int
    errors: int
    output_tokens: int
    seconds: float
    output_tok_s: float
    mean_ttft_ms: float
    mean_tpot_ms: float | None
    mean_accept_length: float | None
    mismatches: int | None
    per_request: list[dict] = field(default_factory=list, repr=False)


def render_prompts(rows: list[dict], tokenizer_dir: str | None) -> list[dict]:
    """Chat-templated input_ids when a tokenizer is given (instruct targets), raw text otherwise."""
    if tokenizer_dir is None:
        return [{"id": r["id"], "text": r["prompt"]} for r in rows]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    out = []
    for r in rows:
        text = tok.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                       tokenize=False)
        out.append({"id": r["id"], "input_ids": tok(text, add_special_tokens=False)["input_ids"]})
    return out


def send(url: str, prompt: dict, max_tokens: int, timeout: float) -> RequestResult:
    body = {k: v for k, v in prompt.items() if k != "id"}
    body.update(stream=True, sampling_params={"temperature": 0.0, "max_new_tokens": max_tokens, "ignore_eos": True})
    req = urllib.request.Request(f"{url}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    ttft, last = None, None
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data:"):])
                if ttft is None and chunk.get("output_ids"):
                    ttft = time.perf_counter() - start
                last = chunk
    except OSError as e:
        return RequestResult(prompt["id"], [], 0.0, time.perf_counter() - start, None, error=str(e))
    latency = time.perf_counter() - start
    if last is None:
        return RequestResult(prompt["id"], [], 0.0, latency, None, error="empty stream")
    meta = last.get("meta_info", {})
    return RequestResult(prompt["id"], list(last.get("output_ids", [])), ttft or latency, latency,
                         meta.get("spec_accept_length"))


def run_level(url: str, prompts: list[dict], concurrency: int, max_tokens: int, reference: dict[str, list[int]] | None,
              timeout: float = 600.0, progress: bool = True) -> LevelResult:
    from tqdm import tqdm

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(send, url, p, max_tokens, timeout) for p in prompts]
        results = [f.result() for f in tqdm(futures, desc=f"c={concurrency}", disable=not progress)]
    seconds = time.perf_counter() - started
    ok = [r for r in results if r.error is None]
    tokens = sum(len(r.output_ids) for r in ok)
    tpots = [r.tpot for r in ok if r.tpot is not None]
    accepts = [r.accept_length for r in ok if r.accept_length is not None]
    mismatches = None
    if reference is not None:
        mismatches = sum(1 for r in ok if reference.get(r.id) != r.output_ids)
    return LevelResult(
        concurrency=concurrency, requests=len(results), errors=len(results) - len(ok), output_tokens=tokens,
        seconds=seconds, output_tok_s=tokens / seconds if seconds else 0.0,
        mean_ttft_ms=1000 * statistics.fmean(r.ttft for r in ok) if ok else 0.0,
        mean_tpot_ms=1000 * statistics.fmean(tpots) if tpots else None,
        mean_accept_length=statistics.fmean(accepts) if accepts else None,
        mismatches=mismatches, per_request=[asdict(r) for r in results])


def run_bench(url: str, prompt_set: str, concurrencies: list[int], max_tokens: int, limit: int | None,
              tokenizer_dir: str | None, reference_path: str | None, out_path: str | None) -> list[LevelResult]:
    prompts = render_prompts(load_prompt_set(prompt_set, limit), tokenizer_dir)
    reference = None
    if reference_path:
        levels = json.loads(Path(reference_path).read_text())["levels"]
        reference = {r["id"]: r["output_ids"] for r in levels[0]["per_request"] if r["error"] is None}
    results = [run_level(url, prompts, c, max_tokens, reference) for c in concurrencies]
    if out_path:
        Path(out_path).write_text(json.dumps({"url": url, "prompt_set": prompt_set, "max_tokens": max_tokens,
                                              "levels": [asdict(r) for r in results]}, indent=1))
    return results


def format_table(results: list[LevelResult]) -> str:
    lines = [f"{'conc':>5} {'req':>5} {'err':>4} {'tok/s':>9} {'TTFT ms':>8} {'TPOT ms':>8} {'accept':>7} {'mismatch':>8}"]
    for r in results:
        lines.append(f"{r.concurrency:>5} {r.requests:>5} {r.errors:>4} {r.output_tok_s:>9.1f} {r.mean_ttft_ms:>8.1f} "
                     f"{'-' if r.mean_tpot_ms is None else f'{r.mean_tpot_ms:.2f}':>8} "
                     f"{'-' if r.mean_accept_length is None else f'{r.mean_accept_length:.2f}':>7} "
                     f"{'-' if r.mismatches is None else r.mismatches:>8}")
    return "\n".join(lines)
