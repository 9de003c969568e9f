"""The bench client against a loopback double of SGLang's streaming /generate protocol."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dflash_sglang.bench import format_table, run_bench
from dflash_sglang.cli import main


class FakeSGLang(BaseHTTPRequestHandler):
    """Cumulative output_ids per chunk (SGLang's default), meta_info on every chunk; 3 tokens per verify step."""

    corrupt_every = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = body["sampling_params"]["max_new_tokens"]
        seed = len(body.get("text", ""))
        ids = [(seed + i) % 97 for i in range(n)]
        if FakeSGLang.corrupt_every and seed % FakeSGLang.corrupt_every == 0:
            ids[-1] += 1
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for k in range(1, n + 1):
            meta = {"completion_tokens": k, "spec_accept_length": 3.0}
            self.wfile.write(f"data: {json.dumps({'output_ids': ids[:k], 'meta_info': meta})}\n\n".encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeSGLang)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_levels_figures_and_reference_check(server, tmp_path):
    ref = tmp_path / "ref.json"
    base = run_bench(server, "gsm8k", [1, 4], 8, 12, None, None, str(ref))
    assert [r.requests for r in base] == [12, 12] and all(r.errors == 0 for r in base)
    assert all(r.output_tokens == 96 and r.mean_accept_length == 3.0 for r in base)
    assert base[0].mean_tpot_ms is not None and base[0].output_tok_s > 0
    same = run_bench(server, "gsm8k", [2], 8, 12, None, str(ref), None)
    assert same[0].mismatches == 0
    FakeSGLang.corrupt_every = 2
    try:
        differ = run_bench(server, "gsm8k", [2], 8, 12, None, str(ref), None)
    finally:
        FakeSGLang.corrupt_every = 0
    assert differ[0].mismatches > 0
    assert "mismatch" in format_table(differ)


def test_unreachable_server_counts_errors_not_crashes(capsys):
    assert main(["bench", "--url", "http://127.0.0.1:9", "--prompt-set", "mtbench", "--limit", "2",
                 "--concurrency", "1", "--max-tokens", "4"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == ["1", "2", "2"]
