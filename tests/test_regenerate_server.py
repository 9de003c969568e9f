"""`regenerate --server`: the SGLang client path, against stdlib HTTP servers that answer like SGLang's native
`/generate` (non-streaming: `output_ids` with the stop token kept, `meta_info.finish_reason`)."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from dflash_sglang.cli import main
from dflash_sglang.engine import DFlashEngine
from dflash_sglang.regenerate import regenerate, regenerate_server
from dflash_sglang.tiny import make_tiny

VOCAB = 96


class FakeSGLang:
    """Serves `answer(input_ids, sampling_params) -> (output_ids, finish_reason)` on 127.0.0.1; records requests.
    `flaky` prompts (first token) fail their first attempt with HTTP 500, `broken` ones every attempt."""

    def __init__(self, answer, flaky=(), broken=(), delay=0.0):
        self.answer, self.flaky, self.broken, self.delay = answer, set(flaky), set(broken), delay
        self.requests, self.in_flight, self.max_in_flight = [], 0, 0
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with fake.lock:
                    fake.requests.append(body)
                    fake.in_flight += 1
                    fake.max_in_flight = max(fake.max_in_flight, fake.in_flight)
                    first = body["input_ids"][0]
                    attempts = sum(r["input_ids"] == body["input_ids"] for r in fake.requests)
                time.sleep(fake.delay)
                try:
                    if self.path != "/generate" or first in fake.broken or (first in fake.flaky and attempts == 1):
                        self.send_response(500)
                        self.end_headers()
                        self.wfile.write(b'{"error": "boom"}')
                        return
                    output, finish = fake.answer(body["input_ids"], body["sampling_params"])
                    reply = {"text": "", "output_ids": output, "meta_info": {"finish_reason": finish}}
                    data = json.dumps(reply).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                finally:
                    with fake.lock:
                        fake.in_flight -= 1

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def serve():
    servers = []

    def start(*args, **kwargs):
        servers.append(FakeSGLang(*args, **kwargs))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_records_equal_the_reference_engine_path(serve, tmp_path):
    """A fake server whose model is the tiny target itself (reference engine, greedy, EOS kept as SGLang keeps it)
    gives the records the reference path writes."""
    target, _ = make_tiny("llama", tmp_path / "pair", seed=2, vocab_size=VOCAB)
    engine = DFlashEngine.load(target, None, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(2, 9, (12,), generator=g).tolist()
    prompts = [torch.randint(3, VOCAB - 1, (n,), generator=g).tolist() for n in lengths]
    # An EOS the tiny model does emit, so some answers stop early: the most common first answer token.
    firsts = [t[0] for t in engine.generate(prompts, 1, mode="ar").tokens]
    eos = max(set(firsts), key=firsts.count)
    lock = threading.Lock()

    def answer(ids, sampling):
        assert sampling["temperature"] == 0.0 and sampling["stop_token_ids"] == [eos]
        with lock:
            out = engine.generate([ids], sampling["max_new_tokens"], mode="ar", eos_token_id=eos).tokens[0]
        finish = {"type": "stop", "matched": eos} if out[-1] == eos else {"type": "length", "length": len(out)}
        return out, finish

    server = serve(answer)
    run = regenerate_server(server.url, prompts, 10, eos, concurrency=4, progress=False)
    reference = regenerate(engine, prompts, 10, 5, eos, progress=False)
    assert run.records == reference and not run.failed and not run.skipped
    assert any(r["output_ids"][-1] == eos and len(r["output_ids"]) < 10 for r in reference), "no early stop tested"
    assert run.stats()["output_tokens"] == sum(len(r["output_ids"]) for r in reference)


def test_eos_normalisation_retry_failures_and_concurrency(serve):
    eos = 7

    def answer(ids, sampling):
        n = ids[0]
        if n == 10:  # stop token present, with tokens after it (trimmed)
            return [1, 2, eos, 3], {"type": "stop", "matched": eos}
        if n == 11:  # stopped at EOS but the EOS left out of output_ids (appended)
            return [1, 2], {"type": "stop", "matched": eos}
        return [n] * sampling["max_new_tokens"], {"type": "length", "length": sampling["max_new_tokens"]}

    server = serve(answer, flaky={12}, broken={13}, delay=0.05)
    prompts = [[10], [11], [12], [13]] + [[20 + i] for i in range(12)]
    run = regenerate_server(server.url, prompts, 4, eos, concurrency=8, progress=False)
    assert run.records[0]["output_ids"] == [1, 2, eos] and run.records[1]["output_ids"] == [1, 2, eos]
    assert run.records[2] == {"prompt_ids": [12], "output_ids": [12] * 4}, "a failed first attempt is retried"
    assert run.records[3] is None and list(run.failed) == [3] and "500" in run.failed[3]
    assert sum(r["input_ids"] == [13] for r in server.requests) == 2, "retried exactly once"
    assert server.max_in_flight > 1
    stats = run.stats()
    assert stats["prompts"] == 16 and stats["records"] == 15 and stats["failed"] == 1
    assert stats["finish_reasons"] == {"stop": 2, "length": 13}


def test_deadline_skips_and_reports_unsent_prompts(serve):
    server = serve(lambda ids, sp: ([5], {"type": "length", "length": 1}), delay=0.2)
    run = regenerate_server(server.url, [[i + 1] for i in range(8)], 1, None, concurrency=2, deadline_seconds=0.1,
                            progress=False)
    assert server.requests[0]["sampling_params"]["ignore_eos"] is True
    assert len(run.skipped) == 6 and sum(r is not None for r in run.records) == 2
    assert run.stats()["skipped"] == 6


def test_cli_writes_records_and_stats_and_fails_loudly(serve, tmp_path, capsys):
    server = serve(lambda ids, sp: ([ids[0], 4], {"type": "length", "length": 2}), broken={9})
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([[1, 2], [3], [9]]))
    out, stats = tmp_path / "d.jsonl", tmp_path / "stats.json"
    args = ["regenerate", "--target", str(tmp_path), "--prompts", str(prompts), "--out", str(out), "--server",
            server.url, "--max-new-tokens", "2", "--concurrency", "2", "--stats", str(stats)]
    assert main(args) == 2
    assert "1 of 3 prompts got no answer after a retry" in capsys.readouterr().err
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt_ids": [1, 2], "output_ids": [1, 4]}, {"prompt_ids": [3], "output_ids": [3, 4]}]
    figures = json.loads(stats.read_text())
    assert figures["records"] == 2 and figures["failed"] == 1 and figures["output_tokens"] == 4
    prompts.write_text(json.dumps([[1, 2], [3]]))
    assert main(args) == 0


def test_several_servers_share_the_prompts(serve, tmp_path):
    first = serve(lambda ids, sp: ([ids[0], 1], {"type": "length", "length": 2}))
    second = serve(lambda ids, sp: ([ids[0], 2], {"type": "length", "length": 2}))
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([[n + 10] for n in range(6)]))
    out = tmp_path / "d.jsonl"
    assert main(["regenerate", "--target", str(tmp_path), "--prompts", str(prompts), "--out", str(out), "--server",
                 f"{first.url},{second.url}", "--max-new-tokens", "2", "--concurrency", "3"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["output_ids"] for r in rows] == [[n + 10, 1 + n % 2] for n in range(6)]
    assert len(first.requests) == len(second.requests) == 3
