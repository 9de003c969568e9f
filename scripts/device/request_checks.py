"""Request-level checks against a running SGLang server (ours with DFLASH), optionally next to a plain-decoding one.

Standard library only (the GPU box has no package registry); loopback only. Every case sends real requests through
the OpenAI routes (/v1/completions, /v1/chat/completions) or SGLang's native /generate, checks the documented
expectation, and compares greedy outputs with the reference (AR) server when --ref-port is given. After every case
/health must still answer; if it stops answering the run ends there.

  python3 scripts/device/request_checks.py --port 30000 [--ref-port 30001] --out checks.json
      [--mask-text "<|mask|>"] [--context-len N]

Writes a JSON list of {case, request, status, expectation, observed, passed, health} (passed: true, false, or null
for a case that could not be built, e.g. the model stopped at EOS too early) and prints a table last. Exit 1 if any
case failed or the server stopped answering.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

# float32 logprobs of the same greedy token from a verify-shaped and a decode-shaped forward agree far closer.
LOGPROB_TOL = 1e-3
PROMPTS = ['def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
           "The history of the printing press begins",
           "import os\nimport sys\n\n\ndef main(argv):\n"]
UNICODE_PROMPT = "Übersetze: 日本語のテキスト, ελληνικά, עברית, emoji 🚀🧪, combining e\u0301, ZWJ 👩\u200d💻 ->"


@dataclass
class Reply:
    status: int
    data: object
    text: str

    def message(self) -> str:
        """The error text, whichever envelope SGLang used ({message}, {error: {message}}, {detail}) or the raw body."""
        if isinstance(self.data, dict):
            error = self.data.get("error")
            if isinstance(error, dict) and error.get("message"):
                return str(error["message"])
            for key in ("message", "detail", "error"):
                if self.data.get(key):
                    return str(self.data[key])
        return self.text


@dataclass
class Stream:
    status: int
    events: list = field(default_factory=list)
    done: bool = False
    reply: Reply | None = None  # the body when the server answered with an error instead of a stream


class Server:
    def __init__(self, port: int, timeout: float):
        self.port, self.timeout = port, timeout

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)

    def request(self, method: str, path: str, body=None, *, raw: bytes | None = None,
                content_type: str = "application/json") -> Reply:
        conn = self._connect()
        try:
            payload = raw if raw is not None else (None if body is None else
                                                   json.dumps(body, ensure_ascii=False).encode())
            conn.request(method, path, body=payload, headers={"Content-Type": content_type} if payload else {})
            resp = conn.getresponse()
            text = resp.read().decode("utf-8", errors="replace")
        finally:
            conn.close()
        try:
            data = json.loads(text) if text else None
        except json.JSONDecodeError:
            data = None
        return Reply(resp.status, data, text)

    def post(self, path: str, body) -> Reply:
        return self.request("POST", path, body)

    def get(self, path: str) -> Reply:
        return self.request("GET", path)

    def stream(self, path: str, body: dict) -> Stream:
        conn = self._connect()
        try:
            conn.request("POST", path, body=json.dumps({**body, "stream": True}, ensure_ascii=False).encode(),
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                text = resp.read().decode("utf-8", errors="replace")
                try:
                    data = json.loads(text)
                except json.JSONDecodeError:
                    data = None
                return Stream(resp.status, reply=Reply(resp.status, data, text))
            out = Stream(200)
            for line in resp:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    out.done = True
                else:
                    out.events.append(json.loads(payload))
            return out
        finally:
            conn.close()


def summarize(value):
    """The request as recorded: long token lists and strings shortened."""
    if isinstance(value, dict):
        return {k: summarize(v) for k, v in value.items()}
    if isinstance(value, list) and len(value) > 16:
        return f"[{len(value)} items: {value[:4]}...]"
    if isinstance(value, str) and len(value) > 200:
        return value[:200] + f"... ({len(value)} chars)"
    return value


@dataclass
class Ctx:
    ours: Server
    ref: Server | None
    model: str
    context_len: int
    max_input: int
    mask_text: str
    results: list = field(default_factory=list)
    current: str = ""

    def check(self, name: str, request, status, expectation: str, observed, passed: bool | None) -> None:
        self.results.append({"case": name, "group": self.current, "request": summarize(request), "status": status,
                             "expectation": expectation, "observed": observed, "passed": passed})

    def completion_body(self, prompt, **fields) -> dict:
        return {"model": self.model, "prompt": prompt, **fields}

    def ref_match(self, path: str, body: dict, pick, ours_value):
        """(matches, reference value) for a value picked from both answers; matches is True without --ref-port."""
        if self.ref is None:
            return True, None
        reply = self.ref.post(path, body)
        if reply.status != 200:
            return False, f"reference answered {reply.status}: {reply.message()[:200]}"
        value = pick(reply)
        return value == ours_value, value


def choice_text(reply: Reply) -> str:
    return reply.data["choices"][0]["text"]


def completion_tokens(reply: Reply) -> int:
    return reply.data["usage"]["completion_tokens"]


def chat_content(reply: Reply) -> str:
    return reply.data["choices"][0]["message"]["content"]


def stream_text(stream: Stream, chat: bool = False) -> str:
    parts = []
    for event in stream.events:
        for choice in event.get("choices") or []:
            piece = (choice.get("delta") or {}).get("content") if chat else choice.get("text")
            parts.append(piece or "")
    return "".join(parts)


def stream_finishes(stream: Stream) -> list:
    return [c["finish_reason"] for e in stream.events for c in e.get("choices") or [] if c.get("finish_reason")]


def is_4xx_saying(reply: Reply, *words: str) -> bool:
    message = reply.message().lower()
    return 400 <= reply.status < 500 and bool(message.strip()) and all(w.lower() in message for w in words)


CASES = []


def case(fn):
    CASES.append(fn)
    return fn


def greedy_completion(ctx: Ctx, name: str, prompt, max_tokens: int, expectation: str, extra: dict | None = None,
                      exact_tokens: int | None = None, finish: str | None = None) -> Reply:
    """One greedy /v1/completions request: 200, AR's text, and the token count and finish_reason if given."""
    body = ctx.completion_body(prompt, max_tokens=max_tokens, temperature=0.0, **(extra or {}))
    reply = ctx.ours.post("/v1/completions", body)
    if reply.status != 200:
        ctx.check(name, body, reply.status, expectation, reply.message()[:300], False)
        return reply
    text, tokens, reason = choice_text(reply), completion_tokens(reply), reply.data["choices"][0]["finish_reason"]
    same, ref_text = ctx.ref_match("/v1/completions", body, choice_text, text)
    ok = same and exact_tokens in (None, tokens) and finish in (None, reason)
    ctx.check(name, body, 200, expectation, {"text": text, "completion_tokens": tokens, "finish_reason": reason,
                                               "ref_text": ref_text}, ok)
    return reply


@case
def greedy_matches_reference(ctx: Ctx):
    for i, prompt in enumerate(PROMPTS):
        greedy_completion(ctx, f"greedy_matches_reference_{i}", prompt, 48,
                          "200; greedy text equals the AR server's")


@case
def stream_equals_nonstream(ctx: Ctx):
    body = ctx.completion_body(PROMPTS[0], max_tokens=40, temperature=0.0, ignore_eos=True,
                               stream_options={"include_usage": True})
    whole = ctx.ours.post("/v1/completions", body)
    stream = ctx.ours.stream("/v1/completions", body)
    ids = {e.get("id") for e in stream.events}
    usage = [e["usage"] for e in stream.events if e.get("usage")]
    observed = {"stream_text": stream_text(stream), "nonstream_text": choice_text(whole) if whole.status == 200 else
                whole.message(), "finishes": stream_finishes(stream), "done": stream.done, "chunk_ids": sorted(ids),
                "usage": usage[-1] if usage else None}
    ok = (whole.status == 200 and stream.status == 200 and stream.done and observed["stream_text"] == choice_text(whole)
          and observed["finishes"] == ["length"] and len(ids) == 1 and bool(usage)
          and usage[-1]["completion_tokens"] == 40)
    ctx.check("stream_equals_nonstream", body, stream.status,
              "streamed chunks concatenate to the non-streamed text; one id, one finish_reason 'length', [DONE], "
              "usage.completion_tokens == 40", observed, ok)


@case
def max_tokens_1(ctx: Ctx):
    expectation = "exactly 1 completion token, finish_reason 'length', AR's text"
    greedy_completion(ctx, "max_tokens_1", PROMPTS[0], 1, expectation, {"ignore_eos": True}, exact_tokens=1,
                      finish="length")
    body = {"text": PROMPTS[1], "sampling_params": {"max_new_tokens": 1, "temperature": 0.0, "ignore_eos": True}}
    gen = ctx.ours.post("/generate", body)
    ids = gen.data.get("output_ids") if gen.status == 200 else None
    same, ref_ids = ctx.ref_match("/generate", body, lambda r: r.data.get("output_ids"), ids)
    ctx.check("max_tokens_1_generate", body, gen.status, "/generate max_new_tokens=1: one output id, AR's",
              {"output_ids": ids, "ref_output_ids": ref_ids}, gen.status == 200 and len(ids or []) == 1 and same)


@case
def ignore_eos_exact_lengths(ctx: Ctx):
    for n in (2, 15, 16, 17, 33, 100):
        greedy_completion(ctx, f"ignore_eos_max_tokens_{n}", PROMPTS[n % len(PROMPTS)], n,
                          f"ignore_eos: exactly {n} tokens (no overshoot past a verify block), "
                          "finish_reason 'length', AR's text", {"ignore_eos": True}, exact_tokens=n, finish="length")


def pick_stop(text: str, fraction: float) -> str | None:
    """A 3-5 character non-blank piece of text starting near `fraction` of it."""
    start = max(1, int(len(text) * fraction))
    for p in range(start, len(text) - 3):
        piece = text[p:p + 4]
        if piece.strip() and "\ufffd" not in piece and text.find(piece) > 0:
            return piece
    return None


@case
def stop_strings(ctx: Ctx):
    base_body = ctx.completion_body(PROMPTS[0], max_tokens=64, temperature=0.0, ignore_eos=True)
    base = ctx.ours.post("/v1/completions", base_body)
    if base.status != 200:
        ctx.check("stop_string", base_body, base.status, "base completion for picking stop strings",
                  base.message(), False)
        return
    full = choice_text(base)
    early, late = pick_stop(full, 0.25), pick_stop(full, 0.7)
    if early is None or late is None:
        ctx.check("stop_string", base_body, 200, "a base text long enough to pick stop strings from",
                  {"text": full}, None)
        return
    for name, stops in (("stop_string_early", early), ("stop_string_late", [late]),
                        ("stop_string_list_earliest_wins", [late, early])):
        listed = stops if isinstance(stops, list) else [stops]
        cut = min(full.find(s) for s in listed)
        want = full[:cut]
        body = {**base_body, "stop": stops}
        reply = ctx.ours.post("/v1/completions", body)
        if reply.status != 200:
            ctx.check(name, body, reply.status, "200", reply.message()[:300], False)
            continue
        choice = reply.data["choices"][0]
        same, ref_text = ctx.ref_match("/v1/completions", body, choice_text, choice["text"])
        ok = (choice["text"] == want and choice["finish_reason"] == "stop" and choice.get("matched_stop") in listed
              and not any(s in choice["text"] for s in listed) and same)
        ctx.check(name, body, 200, f"text == the unstopped text up to the first stop ({cut} chars), no stop string "
                  "in it, finish_reason 'stop', matched_stop one of the stops, AR's text",
                  {"text": choice["text"], "want": want, "finish_reason": choice["finish_reason"],
                   "matched_stop": choice.get("matched_stop"), "ref_text": ref_text}, ok)
        stream = ctx.ours.stream("/v1/completions", body)
        streamed = stream_text(stream)
        ok = (stream.status == 200 and stream.done and streamed.startswith(want)
              and not any(s in streamed for s in listed) and len(streamed) < cut + max(map(len, listed))
              and stream_finishes(stream) == ["stop"])
        ctx.check(name + "_stream", body, stream.status, "streamed: starts with the expected text, never contains "
                  "a whole stop string, at most a stop string's partial prefix past it, one finish_reason 'stop'",
                  {"text": streamed, "want": want, "finishes": stream_finishes(stream)}, ok)


@case
def stop_token_ids(ctx: Ctx):
    sampling = {"max_new_tokens": 48, "temperature": 0.0}
    full = []
    for prompt in PROMPTS:
        base = ctx.ours.post("/generate", {"text": prompt, "sampling_params": sampling})
        if base.status == 200 and len(base.data["output_ids"]) >= 6:
            full = base.data["output_ids"]
            break
    k = next((j for j in range(len(full) // 3, len(full) - 1) if full[j] not in full[:j]), None)
    if k is None:
        ctx.check("stop_token_ids", {"sampling_params": sampling}, None,
                  "a greedy output of >= 6 tokens with a token first seen after its first third", {"ids": full}, None)
        return
    stop_id = full[k]
    body = {"text": prompt, "sampling_params": {**sampling, "stop_token_ids": [stop_id]}}
    reply = ctx.ours.post("/generate", body)
    ids = reply.data.get("output_ids") if reply.status == 200 else reply.message()
    finish = reply.data["meta_info"].get("finish_reason") if reply.status == 200 else None
    same, ref_ids = ctx.ref_match("/generate", body, lambda r: r.data.get("output_ids"), ids)
    ctx.check("stop_token_ids_generate", body, reply.status,
              f"output_ids == the unstopped ids through the first {stop_id} (k={k}, {k + 1} ids), finish 'stop' "
              "matched on it, AR's ids", {"output_ids": ids, "finish_reason": finish, "ref_output_ids": ref_ids},
              reply.status == 200 and ids == full[:k + 1] and (finish or {}).get("matched") == stop_id and same)
    body = ctx.completion_body(prompt, max_tokens=48, temperature=0.0, stop_token_ids=[stop_id])
    reply = ctx.ours.post("/v1/completions", body)
    ok = reply.status == 200
    observed = reply.message()[:300]
    if ok:
        choice = reply.data["choices"][0]
        observed = {"completion_tokens": completion_tokens(reply), "finish_reason": choice["finish_reason"],
                    "matched_stop": choice.get("matched_stop"), "text": choice["text"]}
        same, observed["ref_text"] = ctx.ref_match("/v1/completions", body, choice_text, choice["text"])
        ok = (observed["completion_tokens"] == k + 1 and choice["finish_reason"] == "stop"
              and choice.get("matched_stop") == stop_id and same)
    ctx.check("stop_token_ids_completions", body, reply.status,
              f"{k + 1} completion tokens, finish_reason 'stop', matched_stop {stop_id}, AR's text", observed, ok)


def finite_logprob(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value <= 1e-6


@case
def logprobs_completions(ctx: Ctx):
    body = ctx.completion_body(PROMPTS[0], max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2)
    reply = ctx.ours.post("/v1/completions", body)
    expectation = ("either 200 with logprobs for each of the 8 tokens (token_logprobs finite <= 0, top_logprobs "
                   f"<= 2 entries whose max is the chosen token's, within {LOGPROB_TOL} of AR's) or a 4xx saying "
                   "logprobs are unsupported")
    if reply.status != 200:
        ctx.check("logprobs_completions", body, reply.status, expectation, reply.message()[:300],
                  is_4xx_saying(reply, "logprob"))
        return
    lp = reply.data["choices"][0].get("logprobs") or {}
    values, tops = lp.get("token_logprobs") or [], lp.get("top_logprobs") or []
    ok = (len(values) == 8 == len(tops) == len(lp.get("tokens") or []) and all(map(finite_logprob, values))
          and all(t and 1 <= len(t) <= 2 and abs(max(t.values()) - v) <= LOGPROB_TOL for t, v in zip(tops, values)))
    close, ref_values = True, None
    if ctx.ref is not None:
        ref = ctx.ref.post("/v1/completions", body)
        ref_values = ref.data["choices"][0]["logprobs"]["token_logprobs"] if ref.status == 200 else ref.message()
        close = (isinstance(ref_values, list) and len(ref_values) == len(values)
                 and all(abs(a - b) <= LOGPROB_TOL for a, b in zip(values, ref_values)))
    ctx.check("logprobs_completions", body, 200, expectation,
              {"token_logprobs": values, "top_logprobs": tops, "ref_token_logprobs": ref_values}, ok and close)


@case
def logprobs_generate(ctx: Ctx):
    body = {"text": PROMPTS[2], "return_logprob": True, "top_logprobs_num": 2,
            "sampling_params": {"max_new_tokens": 12, "temperature": 0.0, "ignore_eos": True}}
    reply = ctx.ours.post("/generate", body)
    expectation = ("200 with meta_info.output_token_logprobs [logprob, id, ...] for each output id (the id is the "
                   f"output id, top-1 of output_top_logprobs), within {LOGPROB_TOL} of AR's; or a 4xx saying why")
    if reply.status != 200:
        ctx.check("logprobs_generate", body, reply.status, expectation, reply.message()[:300],
                  is_4xx_saying(reply, "logprob"))
        return
    meta, ids = reply.data["meta_info"], reply.data["output_ids"]
    lps, tops = meta.get("output_token_logprobs") or [], meta.get("output_top_logprobs") or []
    ok = (len(lps) == len(ids) == len(tops) == 12 and [e[1] for e in lps] == ids
          and all(finite_logprob(e[0]) for e in lps) and all(t and t[0][1] == i for t, i in zip(tops, ids)))
    close, ref_lps = True, None
    if ctx.ref is not None:
        ref = ctx.ref.post("/generate", body)
        ref_lps = ref.data["meta_info"]["output_token_logprobs"] if ref.status == 200 else ref.message()
        close = (isinstance(ref_lps, list) and [e[1] for e in ref_lps] == ids
                 and all(abs(a[0] - b[0]) <= LOGPROB_TOL for a, b in zip(lps, ref_lps)))
    ctx.check("logprobs_generate", body, 200, expectation,
              {"output_ids": ids, "output_token_logprobs": lps, "ref_output_token_logprobs": ref_lps}, ok and close)


@case
def logprobs_chat(ctx: Ctx):
    body = {"model": ctx.model, "messages": [{"role": "user", "content": "Write a haiku about rivers."}],
            "temperature": 0.0, "max_completion_tokens": 8, "ignore_eos": True, "logprobs": True, "top_logprobs": 2}
    reply = ctx.ours.post("/v1/chat/completions", body)
    expectation = "200 with logprobs.content for each of the 8 tokens (top_logprobs <= 2), or a 4xx saying why"
    if reply.status != 200:
        ctx.check("logprobs_chat", body, reply.status, expectation, reply.message()[:300], 400 <= reply.status < 500
                  and bool(reply.message().strip()))
        return
    content = (reply.data["choices"][0].get("logprobs") or {}).get("content") or []
    ok = len(content) == 8 and all(finite_logprob(c["logprob"]) and len(c["top_logprobs"]) <= 2 for c in content)
    ctx.check("logprobs_chat", body, 200, expectation, {"content": content}, ok)


@case
def chat_greedy(ctx: Ctx):
    body = {"model": ctx.model, "messages": [{"role": "user", "content": "Explain recursion in one sentence."}],
            "temperature": 0.0, "max_completion_tokens": 32}
    reply = ctx.ours.post("/v1/chat/completions", body)
    expectation = ("200 with a message whose content is AR's, and streamed deltas concatenating to it; or the same "
                   "4xx as AR (e.g. a tokenizer without a chat template)")
    if reply.status != 200:
        ref_status = ctx.ref.post("/v1/chat/completions", body).status if ctx.ref else None
        ok = 400 <= reply.status < 500 and bool(reply.message().strip()) and ref_status in (None, reply.status)
        ctx.check("chat_greedy", body, reply.status, expectation, {"message": reply.message()[:300],
                                                                    "ref_status": ref_status}, ok)
        return
    text = chat_content(reply)
    same, ref_text = ctx.ref_match("/v1/chat/completions", body, chat_content, text)
    stream = ctx.ours.stream("/v1/chat/completions", body)
    streamed = stream_text(stream, chat=True)
    ctx.check("chat_greedy", body, 200, expectation, {"content": text, "streamed": streamed, "ref_content": ref_text},
              same and stream.done and streamed == text)


def sampled(ctx: Ctx, name: str, params: dict, stream: bool = False):
    body = ctx.completion_body(PROMPTS[1], max_tokens=24, ignore_eos=True, **params)
    expectation = "200, exactly 24 tokens, finish_reason 'length', a string"
    if stream:
        s = ctx.ours.stream("/v1/completions", {**body, "stream_options": {"include_usage": True}})
        usage = [e["usage"] for e in s.events if e.get("usage")]
        ok = s.status == 200 and s.done and stream_finishes(s) == ["length"] and usage and \
            usage[-1]["completion_tokens"] == 24
        ctx.check(name, body, s.status, expectation, {"text": stream_text(s), "usage": usage[-1] if usage else None,
                                                      "finishes": stream_finishes(s)}, bool(ok))
        return
    reply = ctx.ours.post("/v1/completions", body)
    ok = (reply.status == 200 and completion_tokens(reply) == 24 and isinstance(choice_text(reply), str)
          and reply.data["choices"][0]["finish_reason"] == "length")
    ctx.check(name, body, reply.status, expectation, reply.data if reply.status == 200 else reply.message()[:300], ok)


@case
def sampling_parameters(ctx: Ctx):
    sampled(ctx, "sampling_temperature", {"temperature": 0.8})
    sampled(ctx, "sampling_top_p", {"temperature": 0.8, "top_p": 0.9})
    sampled(ctx, "sampling_top_k", {"temperature": 0.8, "top_k": 20})
    sampled(ctx, "sampling_min_p", {"temperature": 0.8, "min_p": 0.05})
    sampled(ctx, "sampling_all_stream", {"temperature": 0.7, "top_p": 0.9, "top_k": 20, "min_p": 0.05}, stream=True)


@case
def sampling_degenerate_is_greedy(ctx: Ctx):
    greedy_body = ctx.completion_body(PROMPTS[2], max_tokens=32, temperature=0.0, ignore_eos=True)
    ref_server = ctx.ref or ctx.ours
    greedy = ref_server.post("/v1/completions", greedy_body)
    for name, params in (("sampling_top_k_1_is_greedy", {"temperature": 1.0, "top_k": 1}),
                         ("sampling_min_p_1_is_greedy", {"temperature": 1.0, "min_p": 1.0})):
        body = {**greedy_body, **params}
        reply = ctx.ours.post("/v1/completions", body)
        ok = reply.status == 200 and greedy.status == 200 and choice_text(reply) == choice_text(greedy)
        ctx.check(name, body, reply.status, "sampling that keeps only the argmax reproduces greedy text "
                  f"({'AR' if ctx.ref else 'ours'}), i.e. the sampling path is lossless too",
                  {"text": choice_text(reply) if reply.status == 200 else reply.message()[:300],
                   "greedy": choice_text(greedy) if greedy.status == 200 else greedy.message()[:300]}, ok)


@case
def invalid_parameters(ctx: Ctx):
    for name, params, word in (("invalid_top_p_0", {"top_p": 0.0}, "top_p"),
                               ("invalid_negative_temperature", {"temperature": -1.0}, "temperature"),
                               ("invalid_top_k_0", {"top_k": 0}, "top_k"),
                               ("invalid_min_p_1.5", {"min_p": 1.5}, "min_p"),
                               ("invalid_max_tokens_0", {"max_tokens": 0}, "max_tokens")):
        body = ctx.completion_body(PROMPTS[0], **{"max_tokens": 8, **params})
        reply = ctx.ours.post("/v1/completions", body)
        ctx.check(name, body, reply.status, f"4xx whose message names {word}", reply.message()[:300],
                  is_4xx_saying(reply, word))


@case
def malformed_requests(ctx: Ctx):
    reply = ctx.ours.request("POST", "/v1/completions", raw=b'{"prompt": "x", "max_tokens": ')
    ctx.check("malformed_json", "<truncated JSON>", reply.status, "4xx with a message", reply.message()[:300],
              400 <= reply.status < 500 and bool(reply.message().strip()))
    reply = ctx.ours.post("/v1/completions", {"model": ctx.model, "max_tokens": 4})
    ctx.check("missing_prompt", {"max_tokens": 4}, reply.status, "4xx whose message names prompt",
              reply.message()[:300], is_4xx_saying(reply, "prompt"))
    reply = ctx.ours.request("POST", "/v1/completions", raw=b"prompt=x", content_type="text/plain")
    ctx.check("wrong_content_type", "prompt=x as text/plain", reply.status, "4xx with a message",
              reply.message()[:300], 400 <= reply.status < 500 and bool(reply.message().strip()))


@case
def n_choices(ctx: Ctx):
    body = ctx.completion_body(PROMPTS[0], max_tokens=16, temperature=0.0, n=3, ignore_eos=True)
    reply = ctx.ours.post("/v1/completions", body)
    single = {**body, "n": 1}
    texts = [c["text"] for c in reply.data["choices"]] if reply.status == 200 else []
    same, ref_text = ctx.ref_match("/v1/completions", single, choice_text, texts[0] if texts else None)
    ctx.check("n_3_greedy", body, reply.status, "3 choices (indices 0,1,2), identical texts, equal to AR's n=1 text",
              {"texts": texts, "indices": [c["index"] for c in reply.data["choices"]] if texts else None,
               "ref_text": ref_text},
              reply.status == 200 and len(texts) == 3 and len(set(texts)) == 1 and same
              and sorted(c["index"] for c in reply.data["choices"]) == [0, 1, 2])
    body = ctx.completion_body(PROMPTS[1], max_tokens=16, temperature=1.0, n=3, ignore_eos=True)
    reply = ctx.ours.post("/v1/completions", body)
    ok = (reply.status == 200 and sorted(c["index"] for c in reply.data["choices"]) == [0, 1, 2]
          and all(c["finish_reason"] == "length" for c in reply.data["choices"]) and completion_tokens(reply) == 48)
    ctx.check("n_3_sampled", body, reply.status, "3 choices, each finish_reason 'length', usage 3 x 16 tokens",
              reply.data if reply.status == 200 else reply.message()[:300], ok)


def not_5xx(ctx: Ctx, name: str, path: str, body: dict, valid):
    reply = ctx.ours.post(path, body)
    ok = (400 <= reply.status < 500 and bool(reply.message().strip())) or (reply.status == 200 and valid(reply))
    ctx.check(name, body, reply.status, "a 4xx with a message or a valid answer; never a 5xx",
              reply.data if reply.status == 200 else reply.message()[:300], ok)


@case
def empty_prompts(ctx: Ctx):
    def valid_completion(r):
        return isinstance(choice_text(r), str)
    not_5xx(ctx, "empty_prompt_string", "/v1/completions", ctx.completion_body("", max_tokens=4), valid_completion)
    not_5xx(ctx, "empty_prompt_ids", "/v1/completions", ctx.completion_body([], max_tokens=4), valid_completion)
    not_5xx(ctx, "empty_prompt_generate", "/generate", {"text": "", "sampling_params": {"max_new_tokens": 4}},
            lambda r: isinstance(r.data.get("text"), str))
    not_5xx(ctx, "empty_chat_message", "/v1/chat/completions",
            {"model": ctx.model, "messages": [{"role": "user", "content": ""}], "max_completion_tokens": 4},
            lambda r: isinstance(chat_content(r), str))


def filler_ids(ctx: Ctx, count: int) -> list[int]:
    reply = ctx.ours.post("/v1/tokenize", {"model": ctx.model, "prompt": " the river runs past the old mill",
                                           "add_special_tokens": False})
    base = reply.data["tokens"]
    return (base * (count // len(base) + 1))[:count]


def names_limit(ctx: Ctx, reply: Reply) -> bool:
    message = reply.message()
    return 400 <= reply.status < 500 and (str(ctx.context_len) in message or str(ctx.max_input) in message)


@case
def context_length(ctx: Ctx):
    limit_note = f"4xx whose message names the limit ({ctx.context_len} or {ctx.max_input})"
    for name, count in (("prompt_at_context_len", ctx.context_len), ("prompt_over_context_len", ctx.context_len + 16)):
        body = ctx.completion_body(filler_ids(ctx, count), max_tokens=4)
        reply = ctx.ours.post("/v1/completions", body)
        ctx.check(name, body, reply.status, limit_note, reply.message()[:300], names_limit(ctx, reply))
    body = {"input_ids": filler_ids(ctx, ctx.context_len + 16), "sampling_params": {"max_new_tokens": 4}}
    reply = ctx.ours.post("/generate", body)
    ctx.check("prompt_over_context_len_generate", body, reply.status, limit_note, reply.message()[:300],
              names_limit(ctx, reply))
    prompt_len = ctx.context_len - 32
    body = ctx.completion_body(filler_ids(ctx, prompt_len), max_tokens=64, ignore_eos=True, temperature=0.0)
    reply = ctx.ours.post("/v1/completions", body)
    ok = names_limit(ctx, reply) or (reply.status == 200 and completion_tokens(reply) <= ctx.context_len - prompt_len)
    ctx.check("prompt_plus_max_tokens_over_context_len", body, reply.status,
              f"{limit_note}, or 200 with max_tokens cut to fit ({ctx.context_len - prompt_len} tokens at most)",
              reply.data if reply.status == 200 else reply.message()[:300], ok)


@case
def near_context_length(ctx: Ctx):
    # The largest prompt SGLang 0.5.16 admits with all 8 new tokens: its scheduler caps max_new_tokens at
    # max_req_len - input_len - 1, and max_req_input_len = max_req_len - 5. The last verify block of a DFLASH
    # step then reaches past the last position the request may write.
    max_tokens = 8
    prompt_len = ctx.max_input - 4
    ids = filler_ids(ctx, prompt_len)
    for name, extra in (("near_context_len", {}), ("near_context_len_stream", {"stream": True})):
        body = ctx.completion_body(ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        if extra:
            s = ctx.ours.stream("/v1/completions", {**body, "stream_options": {"include_usage": True}})
            usage = [e["usage"] for e in s.events if e.get("usage")]
            text = stream_text(s)
            ok = s.status == 200 and s.done and bool(usage) and usage[-1]["completion_tokens"] == max_tokens
            status, observed = s.status, {"text": text, "usage": usage[-1] if usage else None}
        else:
            reply = ctx.ours.post("/v1/completions", body)
            status = reply.status
            text = choice_text(reply) if status == 200 else None
            ok = status == 200 and completion_tokens(reply) == max_tokens
            observed = {"text": text} if status == 200 else reply.message()[:300]
        same, ref_text = ctx.ref_match("/v1/completions", body, choice_text, text)
        if isinstance(observed, dict):
            observed["ref_text"] = ref_text
        ctx.check(name, body, status, f"a {prompt_len}-token prompt (context {ctx.context_len}) gets exactly "
                  f"{max_tokens} tokens, AR's text", observed, ok and same)


@case
def unicode(ctx: Ctx):
    tok = ctx.ours.post("/v1/tokenize", {"model": ctx.model, "prompt": UNICODE_PROMPT, "add_special_tokens": False})
    detok = ctx.ours.post("/v1/detokenize", {"model": ctx.model, "tokens": tok.data["tokens"]}) \
        if tok.status == 200 else tok
    round_trip = detok.data.get("text") if detok.status == 200 else detok.message()
    ctx.check("unicode_tokenize_round_trip", {"prompt": UNICODE_PROMPT}, detok.status,
              "tokenize then detokenize gives the prompt back", {"text": round_trip}, round_trip == UNICODE_PROMPT)
    reply = greedy_completion(ctx, "unicode_completion", UNICODE_PROMPT, 48, "200; greedy text equals AR's",
                              {"ignore_eos": True}, exact_tokens=48)
    if reply.status == 200:
        stream = ctx.ours.stream("/v1/completions", ctx.completion_body(UNICODE_PROMPT, max_tokens=48,
                                                                        temperature=0.0, ignore_eos=True))
        ctx.check("unicode_stream_equals_nonstream", {"prompt": UNICODE_PROMPT}, stream.status,
                  "multi-token commits never split a character: streamed text == non-streamed text",
                  {"streamed": stream_text(stream), "nonstream": choice_text(reply)},
                  stream.done and stream_text(stream) == choice_text(reply))
    body = {"model": ctx.model, "messages": [{"role": "user", "content": UNICODE_PROMPT}], "temperature": 0.0,
            "max_completion_tokens": 24}
    not_5xx(ctx, "unicode_chat", "/v1/chat/completions", body, lambda r: isinstance(chat_content(r), str))


@case
def mask_token_in_prompt(ctx: Ctx):
    mask = ctx.mask_text
    tok = ctx.ours.post("/v1/tokenize", {"model": ctx.model, "prompt": mask, "add_special_tokens": False})
    mask_ids = tok.data["tokens"] if tok.status == 200 else []
    ctx.check("mask_text_tokenizes", {"prompt": mask}, tok.status, "the mask text is one token, the mask id (skip: "
              "this tokenizer splits it, so text cannot reach the mask id; the cases below still run)",
              {"ids": mask_ids}, True if len(mask_ids) == 1 else None)
    mask_id = mask_ids[0] if len(mask_ids) == 1 else None
    for name, prompt in (("mask_in_prompt", f"x = 1\n{mask}\ny = "), ("mask_only_prompt", mask),
                         ("mask_block_in_prompt", "def f():\n" + mask * 20 + "\n    return")):
        body = {"text": prompt, "sampling_params": {"max_new_tokens": 32, "temperature": 0.0, "ignore_eos": True,
                                                    "skip_special_tokens": False}}
        reply = ctx.ours.post("/generate", body)
        if reply.status != 200:
            ctx.check(name, body, reply.status, "200", reply.message()[:300], False)
            continue
        ids, prompt_tokens = reply.data["output_ids"], reply.data["meta_info"]["prompt_tokens"]
        observed = {"output_ids": ids, "text": reply.data["text"], "prompt_tokens": prompt_tokens}
        if ctx.ref is not None:
            ref = ctx.ref.post("/generate", body)
            observed.update(ref_output_ids=ref.data.get("output_ids") if ref.status == 200 else ref.message()[:300],
                            ref_prompt_tokens=ref.data["meta_info"]["prompt_tokens"] if ref.status == 200 else None,
                            ref_text=ref.data.get("text") if ref.status == 200 else None)
            ok = (ids == observed["ref_output_ids"] and prompt_tokens == observed["ref_prompt_tokens"]
                  and reply.data["text"] == observed["ref_text"])
        else:
            ok = len(ids) == 32 and (mask_id is None or mask_id not in ids)
        ctx.check(name, body, 200, "32 tokens; prompt token count, output ids and text (special tokens kept) equal "
                  "AR's, so the mask token is neither stripped from the prompt nor injected into the output "
                  "(without --ref-port: the mask id is absent from the output)", observed, ok)
    greedy_completion(ctx, "mask_in_prompt_completions", f"# note {mask} here\nprint(", 24,
                      "OpenAI route: 24 tokens, AR's text", {"ignore_eos": True}, exact_tokens=24, finish="length")


def health(server: Server) -> tuple[bool, str]:
    try:
        reply = server.get("/health")
        return reply.status == 200, f"/health {reply.status}"
    except OSError as e:
        return False, f"/health unreachable: {e}"


def server_limits(server: Server, forced_context: int | None) -> tuple[str, int, int]:
    """Model name, context length (/v1/models max_model_len) and SGLang's max_req_input_len (/server_info)."""
    card = server.get("/v1/models").data["data"][0]
    context_len = forced_context or int(card["max_model_len"])
    info = server.get("/server_info")
    if info.status != 200:
        info = server.get("/get_server_info")
    max_input = (info.data or {}).get("max_req_input_len") if info.status == 200 else None
    return card["id"], context_len, int(max_input) if max_input else context_len - 6


def print_table(results: list[dict]) -> None:
    rows = [("case", "status", "result", "observed")]
    for r in results:
        verdict = {True: "pass", False: "FAIL", None: "skip"}[r["passed"]]
        observed = json.dumps(r["observed"], ensure_ascii=False)
        rows.append((r["case"], str(r["status"]), verdict, observed[:70] + ("..." if len(observed) > 70 else "")))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True, help="the server under test (DFLASH)")
    parser.add_argument("--ref-port", type=int, help="a plain-decoding server of the same target, for greedy cases")
    parser.add_argument("--out", required=True, help="JSON list of case results")
    parser.add_argument("--mask-text", default="<|mask|>", help="the text of the drafter's mask token")
    parser.add_argument("--context-len", type=int, help="override the context length read from /v1/models")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per request")
    args = parser.parse_args(argv)
    ours = Server(args.port, args.timeout)
    ref = Server(args.ref_port, args.timeout) if args.ref_port else None
    model, context_len, max_input = server_limits(ours, args.context_len)
    ctx = Ctx(ours, ref, model, context_len, max_input, args.mask_text)
    ctx.check("server_limits", "GET /v1/models, /server_info", 200,
              "model name, context length and max input length read", {"model": model, "context_len": context_len,
                                                                       "max_req_input_len": max_input}, True)
    alive = True
    for fn in CASES:
        ctx.current, first = fn.__name__, len(ctx.results)
        try:
            fn(ctx)
        except Exception as e:  # a case that cannot even read its answer is a failed case, not a crashed run
            ctx.check(fn.__name__, None, None, "the case runs to its end", f"{type(e).__name__}: {e}", False)
        alive, note = health(ours)
        for r in ctx.results[first:]:
            r["health"] = note
        if not alive:
            ctx.check(f"health_after_{fn.__name__}", "GET /health", None, "the server still answers /health",
                      note, False)
            break
    Path(args.out).write_text(json.dumps(ctx.results, indent=1, ensure_ascii=False))
    print_table(ctx.results)
    failed = [r["case"] for r in ctx.results if r["passed"] is False]
    skipped = sum(r["passed"] is None for r in ctx.results)
    print(f"\n{'PASS' if not failed and alive else 'FAIL'}: {len(ctx.results) - len(failed) - skipped} passed, "
          f"{len(failed)} failed, {skipped} skipped{'' if alive else ', server stopped answering'}"
          + (f" ({', '.join(failed)})" if failed else ""))
    return 0 if not failed and alive else 1


if __name__ == "__main__":
    sys.exit(main())
