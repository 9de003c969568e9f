"""Soak: waves of streaming requests against our DFLASH server, every greedy output checked against a plain server.

Standard library only (the GPU box has no package registry), plus NEAR_TIE from this repo's dflash_sglang.bench;
loopback only; bounded in count and time.

  python3 scripts/device/soak.py --port 30000 --ref-port 30001 --out DIR [--requests 500] [--max-concurrency 64]
      [--waves 1 8 32 64 64] [--abort-fraction 0.1] [--sampled-fraction 0.1] [--seed 0] [--time-budget 300]
      [--allow-near-ties] [--log SERVER.log ...] [--kv-settle 30] [--gpu-mem-tolerance-mib 256] [--no-gpu-mem]

Each request carries a unique rid (also written into its prompt) and streams through /v1/completions or SGLang's
/generate, at random prompt length and max_tokens. Of the greedy ones, --abort-fraction is cut short: half by the
client closing the socket after a random number of chunks, half through SGLang's POST /abort_request {"rid"}.
Afterwards, per wave:
  - every completed greedy output equals the AR server's (text; output ids too on /generate), and every cut-short
    one is a prefix of it; a divergence is reported with AR's top-2 logprob margin at the first divergent token.
    Default (float32): any divergence fails. --allow-near-ties (bf16): only divergences with margin >= NEAR_TIE fail;
  - lost: a request that got an HTTP error, an error chunk, or a stream that ended without a finish_reason or
    without [DONE] (other than those we cut); duplicated: a chunk carrying another request's id, two finish_reasons,
    or chunks after [DONE];
  - KV: /v1/loads (SGLang 0.5.16; /metrics `sglang:num_used_tokens` with --enable-metrics as the fallback) must show
    no running or waiting request and num_used_tokens back at its value before the first wave, within --kv-settle;
  - GPU memory (nvidia-smi memory.used, summed over GPUs): no wave after the first one at the largest concurrency may
    end above that wave's value + --gpu-mem-tolerance-mib (the allocator legitimately grows up to the largest batch);
  - --log FILE: no new "memory leak detected" line (SGLang's idle self-check) in the server log; new Traceback
    lines are reported in summary.json (not gating: a crash already shows up as lost requests).
Writes DIR/requests.jsonl (one line per request) and DIR/summary.json, prints a table last; exit 1 on any failure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import random
import shlex
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

# The near-tie tolerance of every GPU check (docs/reliability.md says why this value); the device scripts run with
# the repo on PYTHONPATH.
from dflash_sglang.bench import NEAR_TIE

LEAK_LINE = "memory leak detected"  # SGLang's idle self-check (scheduler on_idle)
TRACEBACK_LINE = "Traceback (most recent call last)"
WORDS = ("river", "stone", "lamp", "window", "garden", "engine", "paper", "cloud", "number", "return", "value",
         "list", "index", "while", "print", "orange", "silver", "market", "letter", "bridge", "signal", "table",
         "def", "class", "import", "yield", "lambda", "node", "tree", "graph", "matrix", "vector", "quiet", "rapid")


@dataclass
class Plan:
    rid: str
    wave: int
    concurrency: int
    endpoint: str  # "completions" (OpenAI) or "generate" (SGLang native)
    prompt: str
    max_tokens: int
    ignore_eos: bool
    sampled: bool
    action: str  # "complete", "disconnect" (client closes the socket) or "abort" (POST /abort_request)
    after_chunks: int


@dataclass
class Outcome:
    state: str = "not_issued"  # finished | disconnected | aborted | lost | not_issued
    http_status: int | None = None
    chunks: int = 0
    finish_reasons: list = field(default_factory=list)
    text: str = ""
    output_ids: list | None = None
    completion_tokens: int | None = None
    foreign_ids: list = field(default_factory=list)
    after_done: int = 0
    done: bool = False
    abort_status: int | None = None
    error: str | None = None
    seconds: float = 0.0


def plan_requests(args, context_len: int) -> list[Plan]:
    rng = random.Random(args.seed)
    waves = [min(c, args.max_concurrency) for c in args.waves]
    weights = sum(waves)
    sizes = [max(4, round(args.requests * c / weights)) for c in waves[:-1]]
    sizes.append(max(1, args.requests - sum(sizes)))
    longest = max(1, min(args.max_prompt_words, (context_len - args.max_new_tokens - 64) // 3))
    plans = []
    for wave, (concurrency, size) in enumerate(zip(waves, sizes)):
        for _ in range(size):
            rid = f"soak-{args.seed}-{len(plans):05d}"
            words = int(round(longest ** rng.random()))  # log-uniform: many short prompts, some long ones
            body = " ".join(rng.choice(WORDS) for _ in range(words))
            if args.mask_text and rng.random() < 0.05:
                body = f"{body} {args.mask_text} {body}"
            sampled = rng.random() < args.sampled_fraction
            cut = not sampled and rng.random() < args.abort_fraction
            plans.append(Plan(
                rid=rid, wave=wave, concurrency=concurrency, endpoint=rng.choice(("completions", "generate")),
                prompt=f"[{rid}] {body}", max_tokens=rng.choice((1, 2, rng.randint(3, args.max_new_tokens))),
                ignore_eos=rng.random() < 0.5, sampled=sampled,
                action=rng.choice(("disconnect", "abort")) if cut else "complete", after_chunks=rng.randint(1, 3)))
    return plans


def request_body(plan: Plan) -> tuple[str, dict]:
    sampling = {"temperature": 0.8, "top_p": 0.95} if plan.sampled else {"temperature": 0.0}
    if plan.endpoint == "completions":
        return "/v1/completions", {"prompt": plan.prompt, "max_tokens": plan.max_tokens, "ignore_eos": plan.ignore_eos,
                                   "stream": True, "stream_options": {"include_usage": True}, "rid": plan.rid,
                                   **sampling}
    return "/generate", {"text": plan.prompt, "rid": plan.rid, "stream": True,
                         "sampling_params": {"max_new_tokens": plan.max_tokens, "ignore_eos": plan.ignore_eos,
                                             **sampling}}


def post_json(port: int, path: str, body: dict, timeout: float) -> tuple[int, object]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(raw) if raw else None
    except json.JSONDecodeError:
        return resp.status, raw.decode(errors="replace")


def get_text(port: int, path: str, timeout: float = 10) -> tuple[int, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode(errors="replace")
    finally:
        conn.close()


def read_event(plan: Plan, event: dict, out: Outcome) -> None:
    """Fold one SSE chunk into the outcome: id, text/ids so far, finish reason, usage."""
    if plan.endpoint == "completions":
        chunk_id = event.get("id")
        for choice in event.get("choices") or []:
            out.text += choice.get("text") or ""
            if choice.get("finish_reason"):
                out.finish_reasons.append(choice["finish_reason"])
        if event.get("usage"):
            out.completion_tokens = event["usage"]["completion_tokens"]
    else:
        meta = event.get("meta_info") or {}
        chunk_id = meta.get("id")
        out.output_ids = list(event.get("output_ids") or [])  # cumulative (SGLang's default streaming)
        if event.get("text") is not None:
            out.text = event["text"]
        out.completion_tokens = meta.get("completion_tokens", out.completion_tokens)
        if meta.get("finish_reason"):
            out.finish_reasons.append(meta["finish_reason"]["type"])
    if chunk_id is not None and chunk_id != plan.rid:
        out.foreign_ids.append(chunk_id)


def run_request(port: int, plan: Plan, timeout: float, deadline: float) -> Outcome:
    out = Outcome()
    if time.monotonic() > deadline:
        return out
    start = time.monotonic()
    path, body = request_body(plan)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
        sock = conn.sock
        resp = conn.getresponse()
        out.http_status = resp.status
        if resp.status != 200:
            out.state, out.error = "lost", resp.read().decode(errors="replace")[:300]
            return out
        aborting = False
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if out.done:
                out.after_done += 1
                continue
            if payload == b"[DONE]":
                out.done = True
                continue
            event = json.loads(payload)
            if "error" in event:
                out.error = json.dumps(event["error"])[:300]
                continue
            out.chunks += 1
            read_event(plan, event, out)
            if out.finish_reasons or out.chunks < plan.after_chunks:
                continue
            if plan.action == "disconnect":
                sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                out.state = "disconnected"
                return out
            if plan.action == "abort" and not aborting:
                aborting = True
                out.abort_status, _ = post_json(port, "/abort_request", {"rid": plan.rid}, timeout)
        if aborting and (out.done or out.finish_reasons):
            out.state = "aborted"
        elif out.finish_reasons and out.done and out.error is None:
            out.state = "finished"
        else:
            out.state = "lost"
            out.error = out.error or f"stream ended without {'[DONE]' if out.finish_reasons else 'a finish_reason'}"
    except (OSError, http.client.HTTPException, json.JSONDecodeError) as e:
        out.state, out.error = "lost", f"{type(e).__name__}: {e}"
    finally:
        conn.close()
        out.seconds = time.monotonic() - start
    return out


def reference(port: int, plan: Plan, timeout: float) -> dict:
    """AR's greedy answer with its top-2 logprobs at every position (for the margin at a divergence)."""
    body = {"text": plan.prompt, "return_logprob": True, "top_logprobs_num": 2, "return_text_in_logprobs": True,
            "sampling_params": {"max_new_tokens": plan.max_tokens, "ignore_eos": plan.ignore_eos,
                                "temperature": 0.0}}
    try:
        status, data = post_json(port, "/generate", body, timeout)
    except (OSError, http.client.HTTPException) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    if status != 200 or not isinstance(data, dict):
        return {"error": f"reference answered {status}: {str(data)[:200]}"}
    meta = data["meta_info"]
    tops = meta.get("output_top_logprobs") or []
    return {"text": data["text"], "output_ids": data["output_ids"],
            "token_texts": [t[2] or "" for t in meta.get("output_token_logprobs") or []],
            "margins": [t[0][0] - t[1][0] if t and len(t) > 1 else None for t in tops]}


def first_divergence(plan: Plan, out: Outcome, ref: dict, whole: bool) -> int | None:
    """Token index of the first difference from AR (None: none). whole=False: ours may stop early (cut short)."""
    if plan.endpoint == "generate" and out.output_ids is not None:
        ours, theirs = out.output_ids, ref["output_ids"]
        k = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        if k is None and (len(ours) > len(theirs) or (whole and len(ours) != len(theirs))):
            k = min(len(ours), len(theirs))
        if k is None and whole and out.text != ref["text"]:
            k = len(ours)  # same ids, different text: a detokenization fault, no margin to excuse it
        return k
    ours, theirs = out.text, ref["text"]
    if (ours == theirs) if whole else theirs.startswith(ours):
        return None
    c = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    consumed = 0  # map the character to AR's token covering it (per-token texts, approximate for split characters)
    for k, piece in enumerate(ref["token_texts"]):
        consumed += len(piece)
        if consumed > c:
            return k
    return len(ref["token_texts"])


def judge(plan: Plan, out: Outcome, ref: dict | None, allow_near_ties: bool) -> dict:
    """The verdict on one request: problems (strings) and, on a divergence, where and AR's margin there."""
    problems, divergence = [], None
    if out.state == "lost":
        problems.append("lost")
    if out.foreign_ids or len(out.finish_reasons) > 1 or out.after_done:
        problems.append("duplicated")
    if plan.sampled and out.state == "finished":
        n = out.completion_tokens if out.completion_tokens is not None else len(out.output_ids or [])
        if n > plan.max_tokens or (plan.ignore_eos and n != plan.max_tokens):
            problems.append(f"sampled output has {n} tokens for max_tokens {plan.max_tokens}")
    if not plan.sampled and out.state in ("finished", "disconnected", "aborted"):
        if ref is None or "error" in ref:
            problems.append(f"no reference: {(ref or {}).get('error')}")
        else:
            # An /abort_request that lost the race with the last token leaves a whole answer: compare all of it.
            whole = bool(out.finish_reasons) and out.finish_reasons[-1] != "abort"
            k = first_divergence(plan, out, ref, whole)
            if k is not None:
                margin = ref["margins"][k] if k < len(ref["margins"]) else None
                near = margin is not None and margin < NEAR_TIE
                divergence = {"token": k, "ar_top2_margin": margin, "near_tie": near}
                if not (allow_near_ties and near):
                    problems.append("mismatch")
    return {"problems": problems, "divergence": divergence}


def kv_state(port: int) -> dict:
    """Running/waiting requests and KV tokens in use, from /v1/loads, else /metrics (needs --enable-metrics)."""
    status, text = get_text(port, "/v1/loads?include=core")
    loads = json.loads(text).get("loads") if status == 200 else None
    if loads:
        load = loads[0]
        return {"source": "/v1/loads", "running": load["num_running_reqs"], "waiting": load["num_waiting_reqs"],
                "used_tokens": load["num_used_tokens"]}
    status, text = get_text(port, "/metrics")
    if status != 200:
        raise RuntimeError(f"neither /v1/loads nor /metrics answers (status {status})")
    gauges = {}
    for line in text.splitlines():
        if line.startswith("sglang:") and " " in line:
            name, value = line.split("{")[0], line.rsplit(" ", 1)[1]
            gauges[name] = gauges.get(name, 0.0) + float(value)
    return {"source": "/metrics", "running": int(gauges["sglang:num_running_reqs"]),
            "waiting": int(gauges["sglang:num_queue_reqs"]), "used_tokens": int(gauges["sglang:num_used_tokens"])}


def settle(port: int, idle_tokens: int | None, seconds: float) -> dict:
    """Poll until nothing runs or waits and the KV usage is back at idle_tokens (None: just quiet)."""
    start = time.monotonic()
    while True:
        try:
            state = kv_state(port)
        except (OSError, RuntimeError, KeyError, ValueError, http.client.HTTPException) as e:
            state = {"error": f"{type(e).__name__}: {e}"}
        quiet = state.get("running") == 0 and state.get("waiting") == 0
        if quiet and idle_tokens in (None, state["used_tokens"]):
            return {**state, "settled": True, "seconds": round(time.monotonic() - start, 2)}
        if time.monotonic() - start > seconds:
            return {**state, "settled": False, "seconds": round(time.monotonic() - start, 2)}
        time.sleep(0.2)


def gpu_memory_mib(command: str) -> float | None:
    """memory.used summed over the GPUs the command lists; None when it cannot be read."""
    try:
        output = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=30, check=True).stdout
        return sum(float(v) for v in output.split())
    except (OSError, subprocess.SubprocessError, ValueError):
        return None


def log_alarms(paths: list[str], offsets: dict) -> list[str]:
    found = []
    for path in paths:
        with open(path, "rb") as f:
            f.seek(offsets.get(path, 0))
            for line in f.read().decode(errors="replace").splitlines():
                if LEAK_LINE in line or TRACEBACK_LINE in line:
                    found.append(f"{path}: {line.strip()[:200]}")
    return found


def print_table(summary: dict) -> None:
    rows = [("wave", "conc", "issued", "finished", "cut", "lost", "dup", "mismatch", "near-tie", "KV idle", "GPU MiB")]
    for w in summary["waves"]:
        kv = w["kv"]
        rows.append((str(w["wave"]), str(w["concurrency"]), str(w["issued"]), str(w["finished"]), str(w["cut"]),
                     str(w["lost"]), str(w["duplicated"]), str(w["mismatches"]), str(w["near_ties"]),
                     f"{'yes' if kv.get('settled') else 'NO'} ({kv.get('used_tokens')}/{summary['kv_idle_tokens']})",
                     "-" if w["gpu_mem_mib"] is None else f"{w['gpu_mem_mib']:.0f}"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print()
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    t = summary["totals"]
    print(f"\n{t['issued']}/{summary['requests_planned']} issued, {t['finished']} finished, {t['cut']} cut short "
          f"({t['disconnected']} disconnected, {t['aborted']} via /abort_request), {t['lost']} lost, "
          f"{t['duplicated']} duplicated, {t['mismatches']} mismatches ({t['near_ties']} near-ties, tolerance "
          f"{NEAR_TIE}, {'allowed' if summary['allow_near_ties'] else 'not allowed'}), max margin at a divergence "
          f"{summary['max_divergence_margin']}; KV via {summary['kv_source']}; {summary['seconds']:.0f}s")
    for failure in summary["failures"]:
        print(f"FAIL: {failure}")
    print("PASS" if summary["ok"] else "FAIL")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="our DFLASH server")
    parser.add_argument("--ref-port", type=int, required=True, help="plain-decoding server of the same target")
    parser.add_argument("--out", required=True, help="folder for requests.jsonl and summary.json")
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--max-concurrency", type=int, default=64)
    parser.add_argument("--waves", type=int, nargs="+", default=[1, 8, 32, 64, 64],
                        help="concurrency per wave (capped at --max-concurrency); requests split in proportion")
    parser.add_argument("--abort-fraction", type=float, default=0.1)
    parser.add_argument("--sampled-fraction", type=float, default=0.1, help="requests sampled at temperature 0.8")
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--max-prompt-words", type=int, default=600)
    parser.add_argument("--mask-text", default="", help="put the drafter's mask token text into ~5%% of prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--time-budget", type=float, default=300, help="seconds: stop issuing, drain, report")
    parser.add_argument("--request-timeout", type=float, default=120)
    parser.add_argument("--allow-near-ties", action="store_true",
                        help="bf16: a divergence whose AR top-2 margin is below NEAR_TIE does not fail")
    parser.add_argument("--log", action="append", default=[], help="server log to scan for leak/traceback lines")
    parser.add_argument("--kv-settle", type=float, default=30, help="seconds for KV usage to return to idle")
    parser.add_argument("--gpu-mem-cmd", default="nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits")
    parser.add_argument("--gpu-mem-tolerance-mib", type=float, default=256)
    parser.add_argument("--no-gpu-mem", action="store_true", help="skip the GPU memory check (reported as skipped)")
    args = parser.parse_args(argv)

    started = time.monotonic()
    deadline = started + args.time_budget
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    status, models = get_text(args.port, "/v1/models")
    context_len = int(json.loads(models)["data"][0]["max_model_len"]) if status == 200 else 4096
    plans = plan_requests(args, context_len)
    log_offsets = {p: Path(p).stat().st_size for p in args.log}
    idle = settle(args.port, None, args.kv_settle)
    failures = [] if idle["settled"] else [f"server not idle before the first wave: {idle}"]
    idle_tokens = idle.get("used_tokens")
    waves, records = [], []
    for wave in sorted({p.wave for p in plans}):
        batch = [p for p in plans if p.wave == wave]
        concurrency = batch[0].concurrency
        with ThreadPoolExecutor(max_workers=concurrency) as pool:
            outcomes = list(pool.map(lambda p: run_request(args.port, p, args.request_timeout, deadline), batch))
        kv = settle(args.port, idle_tokens, args.kv_settle)
        gpu = None if args.no_gpu_mem else gpu_memory_mib(args.gpu_mem_cmd)
        to_check = [(p, o) for p, o in zip(batch, outcomes) if o.state != "not_issued" and not p.sampled]
        with ThreadPoolExecutor(max_workers=32) as pool:
            refs = dict(zip([p.rid for p, _ in to_check],
                            pool.map(lambda po: reference(args.ref_port, po[0], args.request_timeout), to_check)))
        counts = {"wave": wave, "concurrency": concurrency, "issued": 0, "finished": 0, "cut": 0, "lost": 0,
                  "duplicated": 0, "mismatches": 0, "near_ties": 0, "other_problems": 0, "kv": kv, "gpu_mem_mib": gpu}
        for plan, outcome in zip(batch, outcomes):
            verdict = judge(plan, outcome, refs.get(plan.rid), args.allow_near_ties)
            records.append({**asdict(plan), **asdict(outcome), **verdict})
            if outcome.state == "not_issued":
                continue
            counts["issued"] += 1
            counts["finished"] += outcome.state == "finished"
            counts["cut"] += outcome.state in ("disconnected", "aborted")
            counts["lost"] += "lost" in verdict["problems"]
            counts["duplicated"] += "duplicated" in verdict["problems"]
            if verdict["divergence"]:
                counts["mismatches"] += 1
                counts["near_ties"] += verdict["divergence"]["near_tie"]
            counts["other_problems"] += any(p not in ("lost", "duplicated", "mismatch") for p in verdict["problems"])
        waves.append(counts)
        if not kv["settled"]:
            failures.append(f"wave {wave}: KV/requests not back to idle after {args.kv_settle}s: {kv}")
        if time.monotonic() > deadline:
            break

    with open(out_dir / "requests.jsonl", "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    totals = {key: sum(w[key] for w in waves) for key in ("issued", "finished", "cut", "lost", "duplicated",
                                                         "mismatches", "near_ties", "other_problems")}
    issued = [r for r in records if r["state"] != "not_issued"]
    totals["disconnected"] = sum(r["state"] == "disconnected" for r in issued)
    totals["aborted"] = sum(r["state"] == "aborted" for r in issued)
    margins = [r["divergence"]["ar_top2_margin"] for r in records if r["divergence"]]
    bad = [r for r in records if r["problems"]]
    if totals["issued"] < args.requests:
        failures.append(f"time budget ({args.time_budget}s) ended after {totals['issued']} of {args.requests} requests")
    for key in ("lost", "duplicated", "other_problems"):
        if totals[key]:
            failures.append(f"{totals[key]} {key.replace('_', ' ')} (see requests.jsonl)")
    hard = sum("mismatch" in r["problems"] for r in records)
    if hard:
        failures.append(f"{hard} greedy outputs differ from AR" + (" by more than a near-tie" if args.allow_near_ties
                                                                   else " (float32: none allowed)"))
    gpu_note = "skipped (--no-gpu-mem)"
    if not args.no_gpu_mem:
        top = max(w["concurrency"] for w in waves)
        first = next(i for i, w in enumerate(waves) if w["concurrency"] == top)
        base = waves[first]["gpu_mem_mib"]
        later = [w["gpu_mem_mib"] for w in waves[first + 1:]]
        if base is None or None in later:
            gpu_note = f"not measurable with {args.gpu_mem_cmd!r}"
            failures.append(f"GPU memory {gpu_note} (--no-gpu-mem to skip)")
        elif not later:
            gpu_note = "not compared: no wave after the first one at the largest concurrency"
        else:
            gpu_note = (f"after the first wave at concurrency {top}: {base:.0f} MiB; later waves "
                        f"{[round(m) for m in later]} (tolerance {args.gpu_mem_tolerance_mib} MiB)")
            if any(m > base + args.gpu_mem_tolerance_mib for m in later):
                failures.append(f"GPU memory grew across waves: {gpu_note}")
    alarms = log_alarms(args.log, log_offsets)
    failures += [f"server log: {a}" for a in alarms if LEAK_LINE in a]
    summary = {"ok": not failures, "failures": failures, "requests_planned": len(plans), "totals": totals,
               "waves": waves, "kv_source": idle.get("source"), "kv_idle_tokens": idle_tokens,
               "allow_near_ties": args.allow_near_ties, "near_tie_tolerance": NEAR_TIE,
               "max_divergence_margin": max((m for m in margins if m is not None), default=None),
               "gpu_memory": gpu_note, "log_alarms": alarms, "seed": args.seed,
               "seconds": time.monotonic() - started, "problem_rids": [r["rid"] for r in bad][:50]}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    print_table(summary)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
