"""`dflash-sglang bench`: prompt sets against a running SGLang server, at several concurrencies, greedy.

Talks to SGLang's native streaming `/generate` (it carries `meta_info`, where the OpenAI routes do not). Per
level (one prompt set at one concurrency): output tok/s = output tokens / wall time of the level; TTFT = time to
the first chunk with output; TPOT = the rest of a request's latency over its remaining tokens; tau (acceptance
length) = completion tokens / verify steps (`meta_info.spec_verify_ct`, bonus token included), as the mean over
requests and as the aggregate. Output ids are compared with a reference run (e.g. plain decoding) keyed by
prompt id, max tokens and EOS handling, so a speed figure never comes without its losslessness check. A reference
run with `logprobs` also records its top-2 log-probability margin at every output position, and each mismatch
against it carries the margin at the first differing position (the near-tie rule of docs/reliability.md).
The interleaved sweep (`run_interleaved`) measures several servers in turn, level by level and repeat by repeat,
in an order rotated each repeat, and reports per-repeat tok/s ratios to the baselines with their medians: the
machine's speed drifts over tens of seconds, and a ratio of two runs seconds apart cancels it where a ratio of two
sweeps minutes apart does not.
Client side needs the standard library only, plus transformers when prompts are chat-templated; loopback servers.
"""

from __future__ import annotations

import functools
import http.client
import json
import re
import statistics
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dflash_sglang.prompts import load_prompt_set, prompt_ids

# Warm-up prompts (the first requests compile kernels); none of them is in a prompt set, so they leave nothing in
# the radix cache that a measured prompt could hit.
WARMUP_PROMPTS = ["Name three colours.", "Count from one to ten in words.", "Say hello in French.",
                  "What is two plus two?", "Write one sentence about the sea.", "List four animals."]
WARMUP_MAX_TOKENS = 32

# The error of a request still running at the time limit (`send` stops it).
STOPPED_AT_TIME_LIMIT = "stopped at the time limit"

# The interleaved sweep divides every contender's tok/s by these contenders', repeat by repeat.
BASELINES = ("ar", "builtin")

# A divergence is a near-tie when the reference's top-2 log-probabilities at the first divergent token differ by
# less than this: bf16 verify- and decode-shaped kernels round differently, and only such ties may flip
# (docs/reliability.md, "The near-tie rule"; scripts/device/e2e_client.py uses this one).
NEAR_TIE = 0.05


@dataclass
class RequestResult:
    id: str
    output_ids: list[int]
    ttft: float
    latency: float
    verify_ct: int | None
    finish: str | None = None
    error: str | None = None
    margins: list[float | None] | None = None

    @property
    def tpot(self) -> float | None:
        n = len(self.output_ids)
        return (self.latency - self.ttft) / (n - 1) if n > 1 else None

    @property
    def accept_length(self) -> float | None:
        return len(self.output_ids) / self.verify_ct if self.verify_ct else None


@dataclass
class LevelResult:
    prompt_set: str
    concurrency: int
    max_tokens: int
    ignore_eos: bool
    requests: int = 0
    errors: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    output_tok_s: float | None = None
    mean_ttft_ms: float | None = None
    mean_tpot_ms: float | None = None
    tau: float | None = None
    tau_aggregate: float | None = None
    mismatches: int | None = None
    unchecked: int | None = None
    mismatch_max_margin: float | None = None
    mismatches_above_tolerance: int | None = None
    mismatched: list[dict] = field(default_factory=list)
    skipped: str | None = None
    per_request: list[dict] = field(default_factory=list, repr=False)


class Progress:
    """One stderr line per level: a bar redrawn in place on a terminal, a single summary line otherwise."""

    def __init__(self, label: str, total: int, enabled: bool = True):
        self.label, self.total, self.done, self.enabled = label, total, 0, enabled
        self.tty = sys.stderr.isatty()
        self.start = time.perf_counter()

    def step(self) -> None:
        self.done += 1
        if self.enabled and self.tty:
            filled = 30 * self.done // max(self.total, 1)
            sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total}")
            sys.stderr.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        line = f"{self.label}: {self.done}/{self.total} requests in {time.perf_counter() - self.start:.1f}s"
        sys.stderr.write(f"\r{line}\n" if self.tty else f"{line}\n")
        sys.stderr.flush()


@functools.cache
def _tokenizer(tokenizer_dir: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def render_prompts(rows: list[dict], tokenizer_dir: str | None) -> list[dict]:
    """Chat-templated input_ids when a tokenizer is given (instruct targets), raw text otherwise."""
    if tokenizer_dir is None:
        return [{"id": r["id"], "text": r["prompt"]} for r in rows]
    tok = _tokenizer(tokenizer_dir)
    return [{"id": r["id"], "input_ids": prompt_ids(tok, r["prompt"], chat=True)} for r in rows]


def _sse_payloads(resp):
    """The payload of every `data:` line of a server-sent-event stream, as bytes."""
    pending = b""
    while True:
        data = resp.read1(1 << 16)
        if not data:
            return
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()


def top2_margins(top_logprobs: list) -> list[float | None]:
    """Per output position, log-prob of the top token minus the second's, from SGLang's `output_top_logprobs`
    (one [[logprob, token id, text], ...] list per position, best first; None where the server had none)."""
    return [top[0][0] - top[1][0] if top and len(top) > 1 else None for top in top_logprobs]


def send(url: str, prompt: dict, sampling: dict, timeout: float, deadline: float | None = None,
         logprobs: bool = False) -> RequestResult:
    """One streamed greedy request. Only the first chunk with output (TTFT) and the last one (SGLang streams
    cumulative output_ids, meta_info complete at the end) are decoded, so the client keeps up at high concurrency.
    With `logprobs`, the top-2 log-probabilities of every output position are asked for too (same sampling)."""
    body = {k: v for k, v in prompt.items() if k != "id"}
    body.update(stream=True, sampling_params=sampling)
    if logprobs:
        body.update(return_logprob=True, top_logprobs_num=2)
    req = urllib.request.Request(f"{url}/generate", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    ttft, last = None, None

    def failed(message: str) -> RequestResult:
        return RequestResult(prompt["id"], [], 0.0, time.perf_counter() - start, None, error=message)

    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            for payload in _sse_payloads(resp):
                if payload == b"[DONE]":
                    break
                if ttft is None and json.loads(payload).get("output_ids"):
                    ttft = time.perf_counter() - start
                last = payload
                if deadline is not None and time.perf_counter() > deadline:
                    return failed(STOPPED_AT_TIME_LIMIT)
    except urllib.error.HTTPError as e:
        return failed(f"HTTP {e.code}: {e.read()[:300].decode(errors='replace')}")
    except (OSError, http.client.HTTPException, ValueError) as e:
        return failed(f"{type(e).__name__}: {e}")
    latency = time.perf_counter() - start
    if last is None:
        return failed("empty stream")
    chunk = json.loads(last)
    meta = chunk.get("meta_info", {})
    ids = list(chunk.get("output_ids", []))
    if meta.get("completion_tokens", len(ids)) > len(ids):
        return failed("the server streams incremental output (--incremental-streaming-output); run it without")
    finish = (meta.get("finish_reason") or {}).get("type")
    if finish == "abort":
        return failed(f"aborted by the server: {meta['finish_reason'].get('message')}")
    margins = None
    if logprobs:
        top = meta.get("output_top_logprobs") or []
        if len(top) != len(ids):
            return failed(f"meta_info.output_top_logprobs has {len(top)} entries for {len(ids)} output tokens")
        margins = top2_margins(top)
    return RequestResult(prompt["id"], ids, ttft or latency, latency, meta.get("spec_verify_ct"), finish,
                         margins=margins)


def run_requests(url: str, prompts: list[dict], concurrency: int, sampling: dict, timeout: float,
                 deadline: float | None, progress: Progress,
                 logprobs: bool = False) -> tuple[list[RequestResult], float]:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = {pool.submit(send, url, p, sampling, timeout, deadline, logprobs): i for i, p in enumerate(prompts)}
        results: list[RequestResult | None] = [None] * len(prompts)
        for f in as_completed(futures):
            results[futures[f]] = f.result()
            progress.step()
    progress.close()
    return results, time.perf_counter() - started


def flush_cache(url: str, idle_wait: float = 10.0) -> str | None:
    """Empty the server's radix cache (SGLang's /flush_cache): None when it did, else why not. SGLang flushes only
    when idle; the client can have every answer while the scheduler still finishes its last step, so the server
    waits up to `idle_wait` seconds for idle before refusing."""
    request = urllib.request.Request(f"{url}/flush_cache?timeout={idle_wait:g}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=idle_wait + 30):
            return None
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}: {e.read()[:300].decode(errors='replace').strip()}"
    except (OSError, http.client.HTTPException) as e:
        return f"{type(e).__name__}: {e}"


def _mean(values) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


def summarize(level: LevelResult, results: list[RequestResult], seconds: float) -> LevelResult:
    ok = [r for r in results if r.error is None]
    level.requests, level.errors = len(results), len(results) - len(ok)
    level.output_tokens = sum(len(r.output_ids) for r in ok)
    level.seconds = seconds
    level.output_tok_s = level.output_tokens / seconds if ok and seconds else None
    level.mean_ttft_ms = _mean(1000 * r.ttft for r in ok)
    tpot = _mean(r.tpot for r in ok if r.tpot is not None)
    level.mean_tpot_ms = None if tpot is None else 1000 * tpot
    level.tau = _mean(r.accept_length for r in ok if r.accept_length is not None)
    steps = sum(r.verify_ct for r in ok if r.verify_ct)
    level.tau_aggregate = sum(len(r.output_ids) for r in ok if r.verify_ct) / steps if steps else None
    level.per_request = [asdict(r) for r in results]
    return level


def _key(request_id: str, level: dict) -> str:
    return f"{request_id}|{level['max_tokens']}|{level['ignore_eos']}"


def reference_outputs(reports: list[dict]) -> dict[str, dict]:
    """(prompt id, max tokens, EOS handling) -> {"output_ids", "margins"} of one request: from the lowest
    concurrency that produced it, a run with top-2 margins first at the same concurrency."""
    found: dict[str, dict] = {}
    requests = [(level["concurrency"], r.get("margins") is None, _key(r["id"], level), r)
                for rep in reports for lvs in rep["sets"].values() for level in lvs if level["skipped"] is None
                for r in level["per_request"] if r["error"] is None]
    for _, _, key, r in sorted(requests, key=lambda item: item[:2]):
        found.setdefault(key, {"output_ids": r["output_ids"], "margins": r.get("margins")})
    return found


def _margin_at(margins: list[float | None] | None, index: int) -> float | None:
    """The reference's top-2 margin at `index`: None without margins, inf past its output (it has no token there
    to be a near-tie)."""
    if margins is None:
        return None
    return margins[index] if index < len(margins) else float("inf")


def check_level(level: dict, reference: dict[str, dict]) -> None:
    """Fill a level's mismatch figures: count, and per differing prompt the first differing output position with
    the reference's top-2 margin there. Where the reference has margins, the level also gets the largest margin
    and how many mismatches are not near-ties (margin >= NEAR_TIE, or unknown)."""
    if level["skipped"] is not None:
        return
    mismatched, unchecked, with_margins = [], 0, False
    for r in level["per_request"]:
        if r["error"] is not None:
            continue
        ref = reference.get(_key(r["id"], level))
        if ref is None:
            unchecked += 1
            continue
        with_margins |= ref["margins"] is not None
        want, got = ref["output_ids"], r["output_ids"]
        if want != got:
            index = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
            mismatched.append({"id": r["id"], "index": index, "margin": _margin_at(ref["margins"], index)})
    margins = [m["margin"] for m in mismatched if m["margin"] is not None]
    above = sum(m["margin"] is None or m["margin"] >= NEAR_TIE for m in mismatched) if with_margins else None
    level.update(mismatches=len(mismatched), unchecked=unchecked, mismatched=mismatched,
                 mismatch_max_margin=max(margins, default=None), mismatches_above_tolerance=above)


def overall(report: dict) -> list[dict]:
    """Per concurrency, every set's requests pooled: the figures of one level over all sets."""
    rows = []
    concurrencies = sorted({lv["concurrency"] for lvs in report["sets"].values() for lv in lvs})
    for c in concurrencies:
        levels = [lv for lvs in report["sets"].values() for lv in lvs if lv["concurrency"] == c and not lv["skipped"]]
        if not levels:
            continue
        reqs = [r for lv in levels for r in lv["per_request"] if r["error"] is None]
        results = [RequestResult(r["id"], r["output_ids"], r["ttft"], r["latency"], r["verify_ct"]) for r in reqs]
        row = summarize(LevelResult("all", c, levels[0]["max_tokens"], levels[0]["ignore_eos"]), results,
                        sum(lv["seconds"] for lv in levels))
        row.errors = sum(lv["errors"] for lv in levels)
        row.requests += row.errors
        checked = [lv for lv in levels if lv["mismatches"] is not None]
        if checked:
            row.mismatches = sum(lv["mismatches"] for lv in checked)
            row.unchecked = sum(lv["unchecked"] for lv in checked)
        margins = [lv["mismatch_max_margin"] for lv in checked if lv["mismatch_max_margin"] is not None]
        row.mismatch_max_margin = max(margins, default=None)
        above = [lv["mismatches_above_tolerance"] for lv in checked if lv["mismatches_above_tolerance"] is not None]
        row.mismatches_above_tolerance = sum(above) if above else None
        row.per_request = []
        rows.append(asdict(row))
    return rows


def level_prompts(prompts: list, concurrencies: list[int], rounds: int | None, min_requests: int) -> list[list]:
    """The prompts of each level. Without `rounds`: all of them at every level. With it: max(rounds x c,
    min_requests) per level, in consecutive slices so no level repeats an earlier level's prompt (a radix-cache
    hit would shorten its prefill); a set too small for that starts over from its first prompt."""
    if rounds is None:
        return [prompts] * len(concurrencies)
    batches, start = [], 0
    for c in concurrencies:
        n = min(len(prompts), max(rounds * c, min_requests))
        if start + n > len(prompts):
            start = 0
        batches.append(prompts[start:start + n])
        start += n
    return batches


def render_warmup_prompts(count: int, tokenizer: str | None) -> list[dict]:
    return render_prompts([{"id": f"warmup-{i}", "prompt": WARMUP_PROMPTS[i % len(WARMUP_PROMPTS)]}
                           for i in range(count)], tokenizer) if count else []


def run_warmup(url: str, prompts: list[dict], concurrency: int, sampling: dict, timeout: float,
               deadline: float | None, progress: Progress, logprobs: bool = False) -> dict:
    """Throw-away requests of WARMUP_MAX_TOKENS tokens (the first requests compile kernels): their count, errors,
    seconds and first error."""
    results, seconds = run_requests(url, prompts, concurrency,
                                    {**sampling, "max_new_tokens": WARMUP_MAX_TOKENS, "ignore_eos": True},
                                    timeout, deadline, progress, logprobs)
    return {"requests": len(prompts), "errors": sum(r.error is not None for r in results), "seconds": seconds,
            "first_error": next((r.error for r in results if r.error), None)}


def run_bench(url: str, sets: list[str], concurrencies: list[int], *, max_tokens: int = 256,
              skip: int = 0, limit: int | None = None, rounds: int | None = None, min_requests: int = 1,
              tokenizer: str | None = None, reference: list[str] | None = None, ignore_eos: bool = True,
              time_limit: float | None = None, warmup: int = 0, name: str | None = None, progress: bool = True,
              timeout: float = 600.0, logprobs: bool = False) -> dict:
    """Every set at every concurrency (sets outer), after `warmup` throw-away requests; each set's prompts are
    its `limit` prompts after the first `skip`, split over levels by `level_prompts`. Levels that would start
    after `time_limit` seconds are recorded as skipped; requests still running then are stopped and counted as
    errors. With `reference` (earlier reports), each level gets its mismatch count. With `logprobs` (for a
    reference run: the server streams every position's top-2 log-probabilities, which costs it time), each
    request records its top-2 margins."""
    # Prompts are rendered (tokenizer loaded, chat template applied) before the clock starts: the time limit is for
    # the requests, and a first tokenizer load on a busy host took most of a 16 s stage on the H200.
    preparing = time.perf_counter()
    rendered = {}
    for prompt_set in sets:
        rows = load_prompt_set(prompt_set)[skip:]
        rendered[prompt_set] = render_prompts(rows[:limit] if limit is not None else rows, tokenizer)
    warmup_prompts = render_warmup_prompts(warmup, tokenizer)
    started = time.perf_counter()
    deadline = started + time_limit if time_limit is not None else None
    sampling = {"temperature": 0.0, "max_new_tokens": max_tokens, "ignore_eos": ignore_eos}
    report = {"name": name, "url": url, "max_tokens": max_tokens, "ignore_eos": ignore_eos, "tokenizer": tokenizer,
              "skip": skip, "limit": limit, "rounds": rounds, "min_requests": min_requests, "time_limit": time_limit,
              "logprobs": logprobs, "prepare_seconds": started - preparing, "sets": {}}
    if warmup:
        report["warmup"] = run_warmup(url, warmup_prompts, min(warmup, max(concurrencies)), sampling, timeout,
                                      deadline, Progress("warm-up", warmup, progress), logprobs)
    for prompt_set, prompts in rendered.items():
        levels = report["sets"][prompt_set] = []
        for c, batch in zip(concurrencies, level_prompts(prompts, concurrencies, rounds, min_requests)):
            level = LevelResult(prompt_set, c, max_tokens, ignore_eos)
            if deadline is not None and time.perf_counter() >= deadline:
                level.skipped = f"time limit ({time_limit:g}s) reached before this level"
                levels.append(asdict(level))
                continue
            results, seconds = run_requests(url, batch, c, sampling, timeout, deadline,
                                            Progress(f"{name or url} {prompt_set} c={c}", len(batch), progress),
                                            logprobs)
            levels.append(asdict(summarize(level, results, seconds)))
    if reference:
        ref = reference_outputs([json.loads(Path(p).read_text()) for p in reference])
        for levels in report["sets"].values():
            for level in levels:
                check_level(level, ref)
    report["overall"] = overall(report)
    report["seconds"] = time.perf_counter() - started
    return report


# Per-repeat figures of the interleaved sweep: its summary's key -> the level figure it is read from.
SERIES = (("tok_s", "output_tok_s"), ("tpot_ms", "mean_tpot_ms"), ("ttft_ms", "mean_ttft_ms"), ("tau", "tau"))


def rotated(names: list[str], repeat: int) -> list[str]:
    """The order of the contenders at a repeat: rotated left by `repeat`, so each runs first, second, ... in turn
    and none is always measured right after the same neighbour."""
    shift = repeat % len(names) if names else 0
    return names[shift:] + names[:shift]


def _median(values) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def paired_ratios(tok_s: list[float | None], baseline: list[float | None]) -> dict:
    """A contender's tok/s over a baseline's, repeat by repeat (None where either has no figure), with the median,
    min and max of those known."""
    ratios = [a / b if a is not None and b else None for a, b in zip(tok_s, baseline)]
    known = [r for r in ratios if r is not None]
    return {"ratios": ratios, "median": _median(known), "min": min(known, default=None),
            "max": max(known, default=None)}


def interleaved_summary(runs: list[dict], names: list[str], baselines=BASELINES) -> dict[str, dict]:
    """One level of the interleaved sweep, from its complete repeats (`runs`, each with a level dict per contender
    in `results`): per contender, the per-repeat series of SERIES and their medians, requests, errors and
    mismatches over the repeats, and in `vs`, for each baseline among the contenders other than itself, the
    per-repeat tok/s ratios (`paired_ratios`)."""
    series = {name: {key: [run["results"][name][figure] for run in runs] for key, figure in SERIES} for name in names}
    summary = {}
    for name in names:
        levels = [run["results"][name] for run in runs]
        checked = [lv for lv in levels if lv["mismatches"] is not None]
        entry = {"requests": sum(lv["requests"] for lv in levels), "errors": sum(lv["errors"] for lv in levels),
                 "mismatches": sum(lv["mismatches"] for lv in checked) if checked else None,
                 "unchecked": sum(lv["unchecked"] for lv in checked) if checked else None}
        for key, _ in SERIES:
            entry[key] = series[name][key]
            entry[f"median_{key}"] = _median(series[name][key])
        entry["vs"] = {base: paired_ratios(series[name]["tok_s"], series[base]["tok_s"])
                       for base in baselines if base in names and base != name}
        summary[name] = entry
    return summary


def next_repeat_fits(now: float, deadline: float | None, level_end: float | None,
                     last_repeat_seconds: float | None) -> bool:
    """Whether a level starts another repeat at `now`: without a time limit, always; never at or past the
    deadline; its first repeat whenever time is left; a later one only when a repeat as long as its last one
    ends by `level_end`, the end of this level's share of the time."""
    if deadline is None:
        return True
    if now >= deadline:
        return False
    return last_repeat_seconds is None or now + last_repeat_seconds <= level_end


def run_interleaved(contenders: dict[str, str], concurrencies: list[int], repeats: int, *,
                    contender_levels: dict[str, list[int]] | None = None, prompt_set: str = "math500",
                    max_tokens: int = 256, skip: int = 0, limit: int | None = None, rounds: int | None = None,
                    min_requests: int = 1, tokenizer: str | None = None, reference: list[str] | None = None,
                    ignore_eos: bool = True, time_limit: float | None = None, warmup: int = 0, progress: bool = True,
                    timeout: float = 600.0, reference_contender: str = "ar", baselines=BASELINES,
                    flush: bool = True) -> dict:
    """Several servers (`contenders`: name -> URL) measured in turn: after `warmup` throw-away requests on each,
    for each concurrency, `repeats` times, one batch of the set's `limit` prompts after the first `skip`
    (`level_prompts`: fresh prompts per level and repeat while they last) on every contender of the level, in the
    order `rotated` by the repeat, the same prompts for all. A contender runs only at the concurrencies
    `contender_levels` lists for it (all when absent); a level with fewer than two contenders is skipped.

    With `flush`, each run starts from an empty radix cache (`flush_cache`; a refusal is kept in the run's
    `flush_errors`). Once the set starts over, a prompt an earlier repeat sent would prefill a single token, which
    SGLang's prefill graphs refuse (padded over 2x): an eager forward per request on a server whose requests
    finish, and so prefill, one at a time (a speculative one), one per batch on AR, whose requests finish together.

    With `time_limit`, each level gets an equal share of the time left when it starts (a level that ends early
    leaves its time to the next), starts a repeat only while `next_repeat_fits`, and requests still running at the
    limit are stopped; a repeat that did not run on every contender to the end is kept in `runs` as incomplete and
    left out of the summary. Outputs are checked against the `reference_contender`'s for the same prompt (and
    against the `reference` files' runs, e.g. one with top-2 margins), each level summarized by
    `interleaved_summary`."""
    unknown = set(contender_levels or {}) - set(contenders)
    if unknown:
        raise ValueError(f"levels given for {', '.join(sorted(unknown))}, which is not a contender")
    levels_of = {name: [c for c in concurrencies if c in (contender_levels or {}).get(name, concurrencies)]
                 for name in contenders}
    names_at = {c: [name for name in contenders if c in levels_of[name]] for c in concurrencies}
    runnable = [c for c in concurrencies if len(names_at[c]) >= 2]
    # As in run_bench, prompts are rendered before the clock starts.
    preparing = time.perf_counter()
    rows = load_prompt_set(prompt_set)[skip:]
    prompts = render_prompts(rows[:limit] if limit is not None else rows, tokenizer)
    if not prompts:
        raise ValueError(f"{prompt_set} has no prompts left after the first {skip}")
    batches = level_prompts(prompts, [c for c in runnable for _ in range(repeats)], rounds, min_requests)
    warmup_prompts = render_warmup_prompts(warmup, tokenizer)
    started = time.perf_counter()
    deadline = started + time_limit if time_limit is not None else None
    sampling = {"temperature": 0.0, "max_new_tokens": max_tokens, "ignore_eos": ignore_eos}
    report = {"contenders": contenders, "concurrency": concurrencies, "contender_levels": levels_of,
              "repeats": repeats, "prompt_set": prompt_set, "max_tokens": max_tokens, "ignore_eos": ignore_eos,
              "tokenizer": tokenizer, "skip": skip, "limit": limit, "rounds": rounds, "min_requests": min_requests,
              "time_limit": time_limit, "reference_contender": reference_contender, "baselines": list(baselines),
              "flush": flush,
              "prepare_seconds": started - preparing, "warmup": {}, "levels": []}
    if warmup:
        for name, url in contenders.items():
            report["warmup"][name] = run_warmup(url, warmup_prompts, min(warmup, max(concurrencies)), sampling,
                                                timeout, deadline, Progress(f"{name} warm-up", warmup, progress))
    for c in concurrencies:
        level = {"concurrency": c, "contenders": names_at[c], "repeats": 0, "skipped": None, "stopped": None,
                 "runs": []}
        report["levels"].append(level)
        if c not in runnable:
            level["skipped"] = "fewer than two contenders run at this concurrency"
            continue
        index = runnable.index(c)
        now = time.perf_counter()
        level_end = None if deadline is None else now + (deadline - now) / (len(runnable) - index)
        for r in range(repeats):
            now = time.perf_counter()
            last_repeat_seconds = level["runs"][-1]["seconds"] if level["runs"] else None
            if not next_repeat_fits(now, deadline, level_end, last_repeat_seconds):
                if r == 0:
                    level["skipped"] = f"time limit ({time_limit:g}s) reached before this level"
                else:
                    level["stopped"] = f"after {r} of {repeats} repeats: " + (
                        f"time limit ({time_limit:g}s) reached" if now >= deadline else
                        f"a repeat takes ~{last_repeat_seconds:.1f}s, {max(level_end - now, 0):.1f}s of this "
                        "level's share left")
                break
            run = {"repeat": r + 1, "order": rotated(level["contenders"], r), "results": {}}
            batch = batches[index * repeats + r]
            for name in run["order"]:
                if deadline is not None and time.perf_counter() >= deadline:
                    break
                if flush:
                    error = flush_cache(contenders[name])
                    if error is not None:
                        run.setdefault("flush_errors", {})[name] = error
                done, seconds = run_requests(contenders[name], batch, c, sampling, timeout, deadline,
                                             Progress(f"{name} c={c} repeat {r + 1}/{repeats}", len(batch), progress))
                run["results"][name] = asdict(summarize(LevelResult(prompt_set, c, max_tokens, ignore_eos), done,
                                                        seconds))
            run["seconds"] = time.perf_counter() - now
            run["complete"] = len(run["results"]) == len(run["order"]) and not any(
                request["error"] == STOPPED_AT_TIME_LIMIT for result in run["results"].values()
                for request in result["per_request"])
            level["runs"].append(run)
    reports = [json.loads(Path(p).read_text()) for p in reference or []]
    if reference_contender in contenders:
        reports.append({"sets": {prompt_set: [run["results"][reference_contender] for level in report["levels"]
                                              for run in level["runs"] if reference_contender in run["results"]]}})
    ref = reference_outputs(reports) if reports else None
    for level in report["levels"]:
        for run in level["runs"]:
            for result in run["results"].values():
                if ref is not None:
                    check_level(result, ref)
        complete = [run for run in level["runs"] if run["complete"]]
        level["repeats"] = len(complete)
        level["summary"] = interleaved_summary(complete, level["contenders"], baselines)
    report["seconds"] = time.perf_counter() - started
    return report


def _strip_level(level: dict) -> dict:
    """A level without its requests' output ids and margins, each request with its token count instead."""
    def request(r: dict) -> dict:
        return {**{k: v for k, v in r.items() if k not in ("output_ids", "margins")}, "tokens": len(r["output_ids"])}

    return {**level, "per_request": [request(r) for r in level["per_request"]]}


def strip_outputs(report: dict) -> dict:
    """The report without per-request output ids and margins (kept in the raw run files; the summary keeps the
    checks, each mismatch with its margin)."""
    sets = {s: [_strip_level(lv) for lv in levels] for s, levels in report["sets"].items()}
    return {**report, "sets": sets}


def strip_interleaved_outputs(report: dict) -> dict:
    """`strip_outputs` for a `run_interleaved` report."""
    levels = [{**level, "runs": [{**run, "results": {name: _strip_level(lv) for name, lv in run["results"].items()}}
                                 for run in level["runs"]]} for level in report["levels"]]
    return {**report, "levels": levels}


def fastest_contender(directory: str, names: list[str], concurrency: int = 1) -> str | None:
    """Of `names`, the one whose `<name>.sweep.json` in `directory` has the highest output tok/s at `concurrency`
    (bench.sh profiles that tree contender); None when none of them measured that level."""
    rates = {}
    for name in names:
        path = Path(directory) / f"{name}.sweep.json"
        if not path.exists():
            continue
        levels = [lv for lvs in json.loads(path.read_text())["sets"].values() for lv in lvs
                  if lv["concurrency"] == concurrency and not lv["skipped"] and lv["output_tok_s"] is not None]
        if levels:
            rates[name] = max(lv["output_tok_s"] for lv in levels)
    return max(rates, key=rates.get) if rates else None


def profile_runs(directory: Path, order: list[str]) -> list[dict]:
    """bench.sh's profile stage from `directory`: per `<name>-c<C>.status` (first line "ok" or "<status>: <reason>"),
    the contender, concurrency, status and scripts/device/profile_step.py's summary where it wrote one (without
    its trace paths: the traces are deleted once summarized). Sorted by contender order, then concurrency."""
    runs = []
    for path in sorted(directory.glob("*.status")) if directory.is_dir() else []:
        name, _, c = path.name[:-len(".status")].rpartition("-c")
        status, _, reason = path.read_text().strip().splitlines()[0].partition(": ")
        summary_path = path.with_name(f"{name}-c{c}.summary.json")
        summary = json.loads(summary_path.read_text()) if summary_path.exists() else None
        if summary is not None:
            summary.pop("traces", None)
        runs.append({"contender": name, "concurrency": int(c), "status": status, "reason": reason or None,
                     "summary": summary})
    rank = {name: i for i, name in enumerate(order)}
    return sorted(runs, key=lambda r: (rank.get(r["contender"], len(rank)), r["concurrency"]))


# SGLang 0.5.16's line for each prefill batch it runs (scheduler metrics, --log-level info).
PREFILL_LINE = re.compile(r"Prefill batch, #new-seq: (\d+), #new-token: (\d+),.*cuda graph: (True|False)")


def prefill_batches(log: str) -> dict:
    """The prefill batches of a server's log: how many, how many held a single request, how many ran eagerly (no
    prefill CUDA graph), and how many computed a single token (a prompt found whole in the radix cache). A
    speculative server's requests finish on different steps, so they reach prefill one at a time; each such
    batch is a scheduler step without decoding."""
    batches = [(int(seqs), int(tokens), graph == "True") for seqs, tokens, graph in PREFILL_LINE.findall(log)]
    return {"batches": len(batches), "single_request": sum(seqs == 1 for seqs, _, _ in batches),
            "eager": sum(not graph for _, _, graph in batches), "one_token": sum(t == 1 for _, t, _ in batches)}


def assemble_suite(directory: str, reference: str = "ar") -> dict:
    """bench.json of scripts/device/bench.sh from what it left in `directory`: meta.json (settings, versions,
    GPU, contender order), `<name>.status` (first line "ok" or "<status>: <reason>") and `<name>.<stage>.json`
    run reports, `profile/` (`profile_runs`) and the interleaved stage (`interleaved.status`, same form, and the
    `run_interleaved` report `interleaved.json`, already checked against AR's outputs; None when it left neither
    file). Every level is checked against the reference contender's outputs
    (its own too: a prompt it ran at several concurrencies is checked against the lowest, which shows bf16
    batch-shape noise), preferring at the same concurrency its runs with top-2 margins (bench.sh's `margins`
    stage: AR's sweep again, untimed). Each contender also gets its server log's `prefill_batches`."""
    root = Path(directory)
    meta = json.loads((root / "meta.json").read_text())
    runs = {name: {p.name[len(name) + 1:-len(".json")]: json.loads(p.read_text())
                   for p in sorted(root.glob(f"{name}.*.json"))} for name in meta["contenders"]}
    ref = reference_outputs(list(runs.get(reference, {}).values())) if runs.get(reference) else None
    contenders = []
    for name in meta["contenders"]:
        status_file = root / f"{name}.status"
        line = status_file.read_text().strip().splitlines()[0] if status_file.exists() else "failed: no status"
        status, _, reason = line.partition(": ")
        for report in runs[name].values():
            for levels in report["sets"].values():
                for level in levels:
                    if ref is not None:
                        check_level(level, ref)
            report["overall"] = overall(report)
        log = root / f"{name}.log"
        contenders.append({"name": name, "status": status, "reason": reason or None,
                           "runs": {stage: strip_outputs(r) for stage, r in runs[name].items()},
                           "prefills": prefill_batches(log.read_text(errors="replace")) if log.exists() else None})
    return {**{k: v for k, v in meta.items() if k != "contenders"}, "reference": reference,
            "near_tie_tolerance": NEAR_TIE, "contenders": contenders,
            "profiles": profile_runs(root / "profile", meta["contenders"]), "interleaved": interleaved_stage(root)}


def interleaved_stage(directory: Path) -> dict | None:
    """bench.sh's interleaved stage from `directory`: status and reason from `interleaved.status` ("failed: no
    status" without one) and the report of `interleaved.json` without output ids (None without one); None when
    neither file is there (a run from before the stage, or one with --interleave-share 0)."""
    status_file, report_file = directory / "interleaved.status", directory / "interleaved.json"
    if not status_file.exists() and not report_file.exists():
        return None
    line = status_file.read_text().strip().splitlines()[0] if status_file.exists() else "failed: no status"
    status, _, reason = line.partition(": ")
    report = strip_interleaved_outputs(json.loads(report_file.read_text())) if report_file.exists() else None
    return {"status": status, "reason": reason or None, "report": report}


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_table(report: dict) -> str:
    lines = [f"{'set':>10} {'conc':>5} {'req':>5} {'err':>4} {'tok/s':>9} {'TTFT ms':>8} {'TPOT ms':>8} "
             f"{'tau':>6} {'mismatch':>8}"]
    rows = [lv for lvs in report["sets"].values() for lv in lvs]
    if len(report["sets"]) > 1:
        rows += report["overall"]
    for r in rows:
        if r["skipped"]:
            lines.append(f"{r['prompt_set']:>10} {r['concurrency']:>5} skipped: {r['skipped']}")
            continue
        lines.append(f"{r['prompt_set']:>10} {r['concurrency']:>5} {r['requests']:>5} {r['errors']:>4} "
                     f"{_fmt(r['output_tok_s'], '.1f'):>9} {_fmt(r['mean_ttft_ms'], '.1f'):>8} "
                     f"{_fmt(r['mean_tpot_ms'], '.2f'):>8} {_fmt(r['tau'], '.2f'):>6} "
                     f"{_fmt(r['mismatches'], 'd'):>8}")
    return "\n".join(lines)


def _ratio_cell(vs: dict | None) -> str:
    if vs is None or vs["median"] is None:
        return "-"
    return f"{vs['median']:.2f}x ({vs['min']:.2f}..{vs['max']:.2f})"


def format_interleaved(report: dict) -> str:
    """The interleaved sweep's medians, one line per level and contender, each ratio with its min..max."""
    baselines = report["baselines"]
    lines = [f"{'conc':>5} {'contender':>14} {'reps':>5} {'tok/s':>9} {'TPOT ms':>8} {'tau':>6} {'mismatch':>8}"
             + "".join(f" {'vs ' + base:>22}" for base in baselines)]
    for level in report["levels"]:
        if level["skipped"]:
            lines.append(f"{level['concurrency']:>5} skipped: {level['skipped']}")
            continue
        for name, entry in level["summary"].items():
            lines.append(f"{level['concurrency']:>5} {name:>14} {level['repeats']:>5} "
                         f"{_fmt(entry['median_tok_s'], '.1f'):>9} {_fmt(entry['median_tpot_ms'], '.2f'):>8} "
                         f"{_fmt(entry['median_tau'], '.2f'):>6} {_fmt(entry['mismatches'], 'd'):>8}"
                         + "".join(f" {_ratio_cell(entry['vs'].get(base)):>22}" for base in baselines))
        if level["stopped"]:
            lines.append(f"{level['concurrency']:>5} stopped {level['stopped']}")
    return "\n".join(lines)
