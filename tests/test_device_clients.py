"""scripts/device/request_checks.py and soak.py against a loopback double of SGLang 0.5.16's HTTP surface.

The double speaks the routes and shapes the clients rely on (OpenAI completions/chat incl. SSE, /generate with
cumulative streaming, /abort_request, /v1/tokenize, /v1/loads, /v1/models, /server_info, /health) over a
character-level "model". Honest doubles must pass; each injected fault must make the client fail where it should.
"""

from __future__ import annotations

import json
import random
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

DEVICE = Path(__file__).resolve().parents[1] / "scripts" / "device"
MASK, MASK_ID = "<|mask|>", 7
CONTEXT = 256
MAX_REQ_LEN = CONTEXT - 1
MAX_INPUT = MAX_REQ_LEN - 5


def tokenize(text: str) -> list[int]:
    ids = []
    for i, piece in enumerate(text.split(MASK)):
        ids += [MASK_ID] * (i > 0) + [ord(c) for c in piece]
    return ids


def detokenize(ids: list[int], skip_special: bool = True) -> str:
    return "".join(("" if skip_special else MASK) if t == MASK_ID else chr(t) for t in ids)


def next_token(context: list[int]) -> int:
    """Greedy 'model': lowercase letters and spaces, a deterministic function of the context."""
    if len(context) % 6 == 0:
        return 32
    return 97 + (sum(context[-3:]) * 7 + len(context)) % 26


class Engine:
    """Generation with SGLang's finish rules: max tokens, stop strings (trimmed), stop token ids (kept in ids)."""

    def __init__(self, server, prompt_ids, params, marker):
        self.server, self.prompt, self.params, self.marker = server, prompt_ids, params, marker
        self.ids, self.finish = [], None
        self.rng = random.Random()

    def sampled(self) -> bool:
        p = self.params
        return p.get("temperature", 1.0) > 0 and p.get("top_k", -1) != 1 and p.get("min_p", 0.0) < 1.0

    def steps(self):
        """Yield after each committed token; sets self.finish at the end."""
        p = self.params
        limit = min(p.get("max_new_tokens", 16), MAX_REQ_LEN - len(self.prompt) - 1)
        stops = p.get("stop") or []
        stops = [stops] if isinstance(stops, str) else stops
        while True:
            if len(self.ids) >= limit:
                self.finish = {"type": "length", "length": limit}
                return
            token = self.rng.randint(97, 122) if self.sampled() else next_token(self.prompt + self.ids)
            fault = self.server.fault
            wrong = fault == "mismatch_all" or (fault == "mismatch" and self.marker.endswith("7"))
            if wrong and len(self.ids) == 1 and not self.sampled():
                token = 33
            self.ids.append(token)
            if self.server.fault == "overshoot" and p.get("ignore_eos") and limit % 16 == 1 and len(self.ids) == limit:
                self.ids.append(next_token(self.prompt + self.ids))
                self.finish = {"type": "length", "length": limit}
                yield
                return
            text = detokenize(self.ids)
            hit = [s for s in stops if s in text]
            if hit:
                self.finish = {"type": "stop", "matched": hit[0]}
                yield
                return
            if not p.get("ignore_eos") and token in (p.get("stop_token_ids") or []):
                self.finish = {"type": "stop", "matched": token}
                yield
                return
            yield

    def text(self) -> str:
        text = detokenize(self.ids, self.params.get("skip_special_tokens", True))
        matched = (self.finish or {}).get("matched")
        if isinstance(matched, str):
            return text[:text.find(matched)]
        if isinstance(matched, int):
            return detokenize(self.ids[:-1], self.params.get("skip_special_tokens", True))
        return text

    def top2(self, k: int) -> list:
        chosen = self.ids[k]
        margin = 0.01 if self.server.fault == "near_tie" else 2.0
        return [[-0.1, chosen, chr(chosen)], [-0.1 - margin, 120 if chosen != 120 else 121, "x"]]


class FakeSGLang(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # a listen backlog of 5 would stall concurrent clients on SYN retries

    def __init__(self, fault: str = ""):
        super().__init__(("127.0.0.1", 0), Handler)
        self.fault, self.dead, self.lock = fault, False, threading.Lock()
        self.active, self.leaked, self.aborted, self.counter = {}, 0, set(), 0

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients hanging up mid-stream is the point
            super().handle_error(request, client_address)

    @property
    def port(self) -> int:
        return self.server_address[1]


class BadRequest(Exception):
    pass


def validate(params: dict, prompt_ids: list[int]) -> None:
    if not 0.0 < params.get("top_p", 1.0) <= 1.0:
        raise BadRequest(f"top_p must be in (0, 1], got {params['top_p']}.")
    if params.get("temperature", 1.0) < 0:
        raise BadRequest(f"temperature must be a non-negative finite number, got {params['temperature']}.")
    if params.get("top_k", -1) < 1 and params.get("top_k", -1) != -1:
        raise BadRequest(f"top_k must be -1 (disable) or at least 1, got {params['top_k']}.")
    if not 0.0 <= params.get("min_p", 0.0) <= 1.0:
        raise BadRequest(f"min_p must be in [0, 1], got {params['min_p']}.")
    if len(prompt_ids) >= CONTEXT:
        raise BadRequest(f"The input ({len(prompt_ids)} tokens) is longer than the model's context length "
                         f"({CONTEXT} tokens).")
    if len(prompt_ids) + params.get("max_new_tokens", 16) > CONTEXT:
        raise BadRequest(f"Requested token count exceeds the model's maximum context length of {CONTEXT} tokens.")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: FakeSGLang

    def setup(self):
        super().setup()
        self.request.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no delayed-ACK stalls per chunk

    def log_message(self, *args):
        pass

    def reply(self, status: int, data) -> None:
        raw = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)

    def error(self, status: int, message: str) -> None:
        self.reply(status, {"object": "error", "message": message, "type": "BadRequest", "code": status})

    def do_GET(self):
        s = self.server
        if s.dead:
            return self.error(503, "dead")
        if self.path == "/health":
            return self.reply(200, {})
        if self.path == "/v1/models":
            return self.reply(200, {"data": [{"id": "fake", "max_model_len": CONTEXT}]})
        if self.path == "/server_info":
            return self.reply(200, {"max_req_input_len": MAX_INPUT})
        if self.path.startswith("/v1/loads"):
            with s.lock:
                used = sum(s.active.values()) + s.leaked
                return self.reply(200, {"loads": [{"num_running_reqs": len(s.active), "num_waiting_reqs": 0,
                                                   "num_used_tokens": used}]})
        self.error(404, "not found")

    def do_POST(self):
        s = self.server
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if s.dead:
            return self.error(503, "dead")
        if self.headers.get("Content-Type") != "application/json":
            return self.error(400, "Unsupported Media Type: Only 'application/json' is allowed")
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as e:
            return self.error(400, f"JSON decode error: {e}")
        routes = {"/v1/completions": self.completions, "/v1/chat/completions": self.chat, "/generate": self.generate,
                  "/v1/tokenize": self.tokenize, "/v1/detokenize": self.detokenize, "/abort_request": self.abort}
        try:
            routes[self.path](body)
        except BadRequest as e:
            self.error(400, str(e))

    def tokenize(self, body):
        ids = tokenize(body["prompt"])
        self.reply(200, {"tokens": ids, "count": len(ids), "max_model_len": CONTEXT})

    def detokenize(self, body):
        self.reply(200, {"text": detokenize(body["tokens"], False)})

    def abort(self, body):
        self.server.aborted.add(body["rid"])
        self.reply(200, {})

    def engines(self, prompt, params, n, rid):
        ids = prompt if isinstance(prompt, list) else tokenize(prompt)
        validate(params, ids)
        marker = rid or (prompt if isinstance(prompt, str) else "")
        return ids, [Engine(self.server, ids, params, marker) for _ in range(n)]

    def run(self, rid, engines, on_step):
        """Drive the engines, registering KV use while they run; on_step(engine) after each token (streaming)."""
        s = self.server
        key = rid or f"anon-{id(engines)}"
        with s.lock:
            s.active[key] = len(engines[0].prompt)
            if s.fault == "leak":
                s.leaked += 1
        try:
            for engine in engines:
                for _ in engine.steps():
                    if rid in s.aborted:
                        engine.finish = {"type": "abort", "message": "Abort in waiting queue"}
                        break
                    if on_step:
                        on_step(engine)
                        time.sleep(0.002)
        finally:
            with s.lock:
                s.active.pop(key, None)

    def sse_start(self):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def sse(self, data) -> None:
        self.wfile.write(b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n")
        self.wfile.flush()

    def completions(self, body):
        if "prompt" not in body:
            raise BadRequest("1 validation error: prompt Field required")
        if body.get("max_tokens", 16) <= 0:
            raise BadRequest("max_tokens must be positive")
        prompt = body["prompt"]
        if not prompt:
            if self.server.fault == "crash_on_empty":
                self.server.dead = True
                return self.error(500, "Internal server error: index out of range")
            raise BadRequest("Prompt cannot be empty")
        params = {k: body[k] for k in ("temperature", "top_p", "top_k", "min_p", "stop", "stop_token_ids",
                                       "ignore_eos") if k in body}
        params.update(max_new_tokens=body.get("max_tokens", 16), skip_special_tokens=body.get("skip_special_tokens",
                                                                                              True))
        rid = body.get("rid")
        ids, engines = self.engines(prompt, params, body.get("n", 1), rid)
        self.openai(body, rid, engines, chat=False)

    def chat(self, body):
        content = " ".join(m["content"] for m in body["messages"])
        params = {k: body[k] for k in ("temperature", "top_p", "top_k", "min_p", "ignore_eos") if k in body}
        params["max_new_tokens"] = body.get("max_completion_tokens") or body.get("max_tokens") or 16
        ids, engines = self.engines(f"user: {content}\nassistant:", params, body.get("n", 1), None)
        self.openai(body, None, engines, chat=True)

    def openai(self, body, rid, engines, chat):
        s = self.server
        rid = rid or f"cmpl-{id(engines)}"
        if body.get("stream"):
            self.sse_start()
            sent = {}
            fault_marker = body.get("prompt", "") if isinstance(body.get("prompt"), str) else ""

            def on_step(engine):
                if s.fault == "drop" and "3] " in fault_marker[:20]:
                    raise ConnectionAbortedError
                text = engine.text() if engine.finish else detokenize(engine.ids)
                delta, sent[id(engine)] = text[sent.get(id(engine), 0):], len(text)
                chunk_id = "someone-else" if s.fault == "duplicate" and "5] " in fault_marker[:20] else rid
                piece = {"delta": {"content": delta}} if chat else {"text": delta}
                self.sse({"id": chunk_id, "choices": [{"index": 0, **piece, "finish_reason": None}]})

            try:
                self.run(rid, engines, on_step)
            except (ConnectionAbortedError, BrokenPipeError, ConnectionResetError):
                return
            engine = engines[0]
            piece = {"delta": {"content": ""}} if chat else {"text": ""}
            self.sse({"id": rid, "choices": [{"index": 0, **piece, "finish_reason": engine.finish["type"],
                                              "matched_stop": engine.finish.get("matched")}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                self.sse({"id": rid, "choices": [], "usage": {"completion_tokens": len(engine.ids)}})
            self.sse(b"[DONE]")
            return
        self.run(rid, engines, None)
        choices = []
        for i, engine in enumerate(engines):
            choice = {"index": i, "finish_reason": engine.finish["type"], "matched_stop": engine.finish.get("matched")}
            if chat:
                choice["message"] = {"role": "assistant", "content": engine.text()}
                if body.get("logprobs"):
                    choice["logprobs"] = {"content": [{"token": chr(t), "logprob": -0.1, "top_logprobs": [
                        {"token": chr(t), "logprob": -0.1}]} for t in engine.ids]}
            else:
                choice["text"] = engine.text()
                if body.get("logprobs") is not None:
                    choice["logprobs"] = {"tokens": [chr(t) for t in engine.ids],
                                          "token_logprobs": [-0.1] * len(engine.ids),
                                          "top_logprobs": [{chr(t): -0.1, "x" if t != 120 else "y": -2.1}
                                                           for t in engine.ids]}
            choices.append(choice)
        self.reply(200, {"id": rid, "choices": choices,
                         "usage": {"completion_tokens": sum(len(e.ids) for e in engines)}})

    def generate(self, body):
        prompt = body.get("input_ids", body.get("text"))
        if not prompt:
            raise BadRequest("Prompt cannot be empty")
        params = dict(body.get("sampling_params") or {})
        rid = body.get("rid")
        ids, (engine,) = self.engines(prompt, params, 1, rid or (prompt if isinstance(prompt, str) else ""))
        rid = rid or f"gen-{id(engine)}"

        def payload():
            meta = {"id": rid, "finish_reason": engine.finish, "prompt_tokens": len(ids),
                    "completion_tokens": len(engine.ids)}
            if body.get("return_logprob"):
                meta["output_token_logprobs"] = [[-0.1, t, chr(t)] for t in engine.ids]
                meta["output_top_logprobs"] = [engine.top2(k) for k in range(len(engine.ids))]
            return {"text": engine.text(), "output_ids": list(engine.ids), "meta_info": meta}

        if body.get("stream"):
            self.sse_start()
            marker = rid if body.get("rid") else ""
            if self.server.fault == "drop" and marker.endswith("3"):
                return
            try:
                self.run(body.get("rid"), [engine], lambda e: self.sse(payload()))
            except (BrokenPipeError, ConnectionResetError):
                return
            self.sse(payload())
            self.sse(b"[DONE]")
            return
        self.run(body.get("rid"), [engine], None)
        self.reply(200, payload())


def serve(fault: str = "") -> FakeSGLang:
    server = FakeSGLang(fault)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server


@pytest.fixture
def servers(request):
    started = []

    def start(fault: str = "", ref_fault: str = ""):
        pair = serve(fault), serve(ref_fault)
        started.extend(pair)
        return pair

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def run_script(name: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DEVICE / name), *map(str, args)], capture_output=True, text=True,
                          timeout=60)


def checks(servers, tmp_path, fault: str = "", ref_fault: str = ""):
    ours, ref = servers(fault, ref_fault)
    out = tmp_path / "checks.json"
    proc = run_script("request_checks.py", "--port", ours.port, "--ref-port", ref.port, "--out", out)
    return proc, {r["case"]: r for r in json.loads(out.read_text())}


def test_request_checks_pass_on_an_honest_server(servers, tmp_path):
    proc, results = checks(servers, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(r["passed"] is True for r in results.values()), [c for c, r in results.items() if not r["passed"]]
    assert {"max_tokens_1", "stop_string_early_stream", "stop_token_ids_generate", "logprobs_completions",
            "n_3_greedy", "near_context_len", "prompt_over_context_len", "mask_block_in_prompt",
            "unicode_stream_equals_nonstream", "invalid_top_p_0"} <= set(results)
    assert all(r["health"] == "/health 200" for c, r in results.items() if c != "server_limits")
    assert proc.stdout.strip().splitlines()[-1].startswith("PASS")


def test_request_checks_catch_overshoot_past_max_tokens(servers, tmp_path):
    proc, results = checks(servers, tmp_path, fault="overshoot")
    assert proc.returncode == 1
    assert not results["ignore_eos_max_tokens_17"]["passed"] and not results["ignore_eos_max_tokens_33"]["passed"]
    assert results["ignore_eos_max_tokens_16"]["passed"]


def test_request_checks_catch_a_greedy_mismatch_with_the_reference(servers, tmp_path):
    proc, results = checks(servers, tmp_path, fault="mismatch_all")
    assert proc.returncode == 1
    assert results["greedy_matches_reference_0"]["passed"] is False
    assert results["mask_in_prompt"]["passed"] is False and results["near_context_len"]["passed"] is False
    assert results["sampling_temperature"]["passed"] is True  # sampled outputs have nothing to match


def test_request_checks_stop_when_the_server_dies(servers, tmp_path):
    proc, results = checks(servers, tmp_path, fault="crash_on_empty")
    assert proc.returncode == 1
    assert results["empty_prompt_string"]["passed"] is False and results["empty_prompt_string"]["status"] == 500
    assert results["health_after_empty_prompts"]["passed"] is False
    assert "unicode_completion" not in results  # the run stopped at the first dead /health
    assert "server stopped answering" in proc.stdout


SOAK = ("--requests", 48, "--waves", 1, 4, 8, 8, "--max-new-tokens", 12, "--max-prompt-words", 20,
        "--time-budget", 30, "--kv-settle", 1, "--gpu-mem-cmd", "echo 1000", "--abort-fraction", 0.3)


def soak(servers, tmp_path, fault="", ref_fault="", *extra):
    ours, ref = servers(fault, ref_fault)
    proc = run_script("soak.py", "--port", ours.port, "--ref-port", ref.port, "--out", tmp_path, *SOAK, *extra)
    return proc, json.loads((tmp_path / "summary.json").read_text())


def test_soak_passes_on_an_honest_server(servers, tmp_path):
    proc, summary = soak(servers, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    t = summary["totals"]
    assert t["issued"] == 48 and t["lost"] == t["duplicated"] == t["mismatches"] == 0
    assert t["disconnected"] > 0 and t["aborted"] > 0
    records = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    assert len({r["rid"] for r in records}) == 48
    assert any(r["state"] == "aborted" and r["finish_reasons"] == ["abort"] for r in records)
    assert summary["kv_source"] == "/v1/loads" and all(w["kv"]["settled"] for w in summary["waves"])
    assert proc.stdout.strip().splitlines()[-1] == "PASS"


def test_soak_reports_a_mismatch_with_its_margin(servers, tmp_path):
    proc, summary = soak(servers, tmp_path, "mismatch")
    assert proc.returncode == 1
    records = [json.loads(line) for line in (tmp_path / "requests.jsonl").read_text().splitlines()]
    diverged = [r for r in records if r["divergence"]]
    assert diverged and all(r["divergence"]["token"] == 1 and r["divergence"]["ar_top2_margin"] == 2.0
                            for r in diverged)
    assert summary["totals"]["mismatches"] == len(diverged) and summary["totals"]["near_ties"] == 0


def test_soak_near_ties_pass_only_when_allowed(servers, tmp_path):
    proc, summary = soak(servers, tmp_path / "strict", "mismatch", "near_tie")
    assert proc.returncode == 1 and summary["totals"]["near_ties"] == summary["totals"]["mismatches"] > 0
    proc, summary = soak(servers, tmp_path / "bf16", "mismatch", "near_tie", "--allow-near-ties")
    assert proc.returncode == 0, proc.stdout
    assert summary["max_divergence_margin"] == pytest.approx(0.01)


def test_soak_detects_lost_and_duplicated_requests(servers, tmp_path):
    proc, summary = soak(servers, tmp_path / "lost", "drop")
    assert proc.returncode == 1 and summary["totals"]["lost"] > 0
    assert any("lost" in f for f in summary["failures"])
    proc, summary = soak(servers, tmp_path / "dup", "duplicate")
    assert proc.returncode == 1 and summary["totals"]["duplicated"] > 0


def test_soak_detects_kv_that_does_not_return_to_idle(servers, tmp_path):
    proc, summary = soak(servers, tmp_path, "leak", "", "--kv-settle", 0.3, "--waves", 2, 2)
    assert proc.returncode == 1
    assert not summary["waves"][0]["kv"]["settled"]
    assert any("KV" in f for f in summary["failures"])


def test_soak_detects_gpu_memory_growth(servers, tmp_path):
    counter = tmp_path / "n"
    grow = f"sh -c 'n=$(cat {counter} 2>/dev/null || echo 0); echo $((n+1)) > {counter}; echo $((1000+n*512))'"
    proc, summary = soak(servers, tmp_path, "", "", "--gpu-mem-cmd", grow)
    assert proc.returncode == 1
    assert any("GPU memory grew" in f for f in summary["failures"])


def test_soak_time_budget_stops_issuing(servers, tmp_path):
    proc, summary = soak(servers, tmp_path, "", "", "--time-budget", 0)
    assert proc.returncode == 1
    assert summary["totals"]["issued"] < 48 and any("time budget" in f for f in summary["failures"])


def test_soak_near_tie_constant_matches_the_e2e_client():
    sys.path.insert(0, str(DEVICE))
    try:
        import e2e_client
        import soak as soak_module
    finally:
        sys.path.remove(str(DEVICE))
    assert soak_module.NEAR_TIE == e2e_client.NEAR_TIE
