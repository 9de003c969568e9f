"""The bench client against a loopback double of SGLang's streaming /generate protocol."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from dflash_sglang.bench import assemble_suite, format_table, level_prompts, render_prompts, run_bench
from dflash_sglang.cli import main

VERIFY_STEPS = 3  # the double reports this many verify steps per request: tau = tokens / 3


class FakeSGLang(BaseHTTPRequestHandler):
    """Cumulative output_ids per chunk (SGLang's default), meta_info complete on the last chunk. With EOS honoured,
    prompts whose seed is odd stop at half length. Class attributes switch on faults for one test."""

    corrupt_every = 0
    chunk_delay = 0.0
    spec = True

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        params = body["sampling_params"]
        assert body["stream"] is True and params["temperature"] == 0.0
        seed = len(body["text"]) if "text" in body else sum(body["input_ids"])
        n = params["max_new_tokens"]
        if not params["ignore_eos"] and seed % 2:
            n //= 2
        ids = [(seed + i) % 97 for i in range(n)]
        if FakeSGLang.corrupt_every and seed % FakeSGLang.corrupt_every == 0:
            ids[-1] += 1
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for k in range(1, n + 1):
            meta = {"completion_tokens": k}
            if k == n:
                meta["finish_reason"] = {"type": "length" if n == params["max_new_tokens"] else "stop"}
                if FakeSGLang.spec:
                    meta.update(spec_verify_ct=VERIFY_STEPS, spec_accept_length=n / VERIFY_STEPS)
            self.wfile.write(f"data: {json.dumps({'output_ids': ids[:k], 'meta_info': meta})}\n\n".encode())
            self.wfile.flush()
            time.sleep(FakeSGLang.chunk_delay)
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
    FakeSGLang.corrupt_every, FakeSGLang.chunk_delay, FakeSGLang.spec = 0, 0.0, True


def test_sets_levels_overall_and_figures(server):
    report = run_bench(server, ["gsm8k", "mtbench"], [1, 4], max_tokens=8, limit=6, warmup=3, progress=False)
    assert report["warmup"]["requests"] == 3 and report["warmup"]["errors"] == 0
    for levels in report["sets"].values():
        assert [lv["concurrency"] for lv in levels] == [1, 4]
        for lv in levels:
            assert (lv["requests"], lv["errors"], lv["output_tokens"]) == (6, 0, 48)
            assert lv["tau"] == pytest.approx(8 / VERIFY_STEPS) and lv["tau_aggregate"] == pytest.approx(8 / 3)
            assert lv["output_tok_s"] > 0 and lv["mean_ttft_ms"] > 0 and lv["mean_tpot_ms"] is not None
            assert lv["mismatches"] is None and lv["skipped"] is None
            assert all(r["finish"] == "length" and len(r["output_ids"]) == 8 for r in lv["per_request"])
    pooled = {row["concurrency"]: row for row in report["overall"]}
    assert set(pooled) == {1, 4} and all(row["requests"] == 12 and row["output_tokens"] == 96
                                         for row in pooled.values())
    table = format_table(report)
    assert "gsm8k" in table and "mtbench" in table and "all" in table


def test_reference_check_counts_mismatches_with_position(server, tmp_path):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(run_bench(server, ["gsm8k"], [1], max_tokens=8, limit=12, progress=False)))
    same = run_bench(server, ["gsm8k"], [2, 4], max_tokens=8, limit=12, reference=[str(ref)], progress=False)
    assert [lv["mismatches"] for lv in same["sets"]["gsm8k"]] == [0, 0]
    FakeSGLang.corrupt_every = 2
    differ = run_bench(server, ["gsm8k"], [2], max_tokens=8, limit=12, reference=[str(ref)], progress=False)
    level = differ["sets"]["gsm8k"][0]
    assert level["mismatches"] > 0 and level["unchecked"] == 0
    assert all(m["index"] == 7 for m in level["mismatched"])  # only the last token was changed
    assert differ["overall"][0]["mismatches"] == level["mismatches"]


def test_reference_is_keyed_by_eos_handling_and_length(server, tmp_path):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(run_bench(server, ["gsm8k"], [1], max_tokens=8, limit=4, progress=False)))
    natural = run_bench(server, ["gsm8k"], [1], max_tokens=8, limit=4, ignore_eos=False, reference=[str(ref)],
                        progress=False)
    level = natural["sets"]["gsm8k"][0]
    assert (level["mismatches"], level["unchecked"]) == (0, 4)
    assert {r["finish"] for r in level["per_request"]} <= {"length", "stop"}


def test_rounds_give_each_level_fresh_prompts(server):
    prompts = list(range(100))
    batches = level_prompts(prompts, [1, 8, 32], 2, 8)
    assert [len(b) for b in batches] == [8, 16, 64] and len({p for b in batches for p in b}) == 88
    assert level_prompts(prompts, [64], 2, 8) == [prompts]  # capped by the set
    assert level_prompts(prompts, [8, 32], 3, 1)[1][0] == 0  # 24 + 96 > 100: the second level starts over
    assert level_prompts(prompts, [1, 4], None, 1) == [prompts, prompts]
    report = run_bench(server, ["mtbench"], [1, 3], max_tokens=4, skip=5, rounds=2, min_requests=4, progress=False)
    first, second = report["sets"]["mtbench"]
    assert (first["requests"], second["requests"]) == (4, 6)
    ids = [r["id"] for lv in (first, second) for r in lv["per_request"]]
    assert len(set(ids)) == 10 and "mtbench-81" not in ids  # the first prompt is skipped


def test_time_limit_skips_later_levels_and_stops_running_requests(server):
    FakeSGLang.chunk_delay = 0.05
    report = run_bench(server, ["gsm8k"], [1, 2], max_tokens=40, limit=2, time_limit=0.5, progress=False)
    first, second = report["sets"]["gsm8k"]
    assert first["errors"] >= 1
    assert any(r["error"] == "stopped at the time limit" for r in first["per_request"])
    assert second["skipped"].startswith("time limit")
    assert "skipped" in format_table(report)


def test_plain_decoding_has_no_tau(server):
    FakeSGLang.spec = False
    level = run_bench(server, ["gsm8k"], [2], max_tokens=6, limit=2, progress=False)["sets"]["gsm8k"][0]
    assert level["tau"] is None and level["tau_aggregate"] is None and level["output_tokens"] == 12


def test_chat_template_prompts_are_token_ids(tmp_path):
    from dflash_sglang.tiny import TOKENIZERS, install_tokenizer

    install_tokenizer(TOKENIZERS["qwen3"], tmp_path)
    from transformers import AutoTokenizer

    rendered = render_prompts([{"id": "a", "prompt": "What is 2+3?"}], str(tmp_path))
    assert set(rendered[0]) == {"id", "input_ids"}
    text = AutoTokenizer.from_pretrained(tmp_path).decode(rendered[0]["input_ids"])
    assert "user" in text and "What is 2+3?" in text and text.rstrip().endswith("assistant")


def test_cli_writes_json_and_counts_unreachable_as_errors(capsys, tmp_path):
    out = tmp_path / "run.json"
    assert main(["bench", "--url", "http://127.0.0.1:9", "--sets", "mtbench", "gsm8k", "--limit", "2",
                 "--concurrency", "1", "--max-tokens", "4", "--warmup", "0", "--no-progress",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert all(lv["errors"] == 2 and lv["output_tok_s"] is None for lvs in report["sets"].values() for lv in lvs)
    assert report["sets"]["mtbench"][0]["per_request"][0]["error"].startswith("URLError")
    assert capsys.readouterr().out.splitlines()[1].split()[:4] == ["mtbench", "1", "2", "2"]


def test_cli_missing_reference_is_a_clear_error(capsys, tmp_path):
    assert main(["bench", "--url", "http://127.0.0.1:9", "--sets", "gsm8k", "--limit", "1", "--concurrency", "1",
                 "--warmup", "0", "--no-progress", "--reference", str(tmp_path / "nope.json")]) == 2
    assert "nope.json" in capsys.readouterr().err


def test_assemble_suite_checks_everyone_against_ar(server, tmp_path):
    def run(name, stage, **kw):
        report = run_bench(server, kw.pop("sets"), kw.pop("conc"), max_tokens=8, name=name, progress=False, **kw)
        (tmp_path / f"{name}.{stage}.json").write_text(json.dumps(report))

    (tmp_path / "meta.json").write_text(json.dumps({"date": "2026-12-01", "gpu": "fake", "settings": {"x": 1},
                                                   "contenders": ["ar", "ours", "ours-tree"]}))
    run("ar", "sets", sets=["gsm8k", "mtbench"], conc=[1], limit=3, ignore_eos=False)
    run("ar", "sweep", sets=["math500"], conc=[1, 4], rounds=2, min_requests=2)
    FakeSGLang.corrupt_every = 3
    run("ours", "sets", sets=["gsm8k", "mtbench"], conc=[1], limit=3, ignore_eos=False)
    run("ours", "sweep", sets=["math500"], conc=[1, 4], rounds=2, min_requests=2)
    (tmp_path / "ar.status").write_text("ok\n")
    (tmp_path / "ours.status").write_text("ok\n")
    (tmp_path / "ours-tree.status").write_text("skipped: no tree option\n")

    suite = assemble_suite(str(tmp_path))
    assert suite["date"] == "2026-12-01" and suite["reference"] == "ar" and "contenders" in suite
    ar, ours, tree = suite["contenders"]
    assert (tree["status"], tree["reason"], tree["runs"]) == ("skipped", "no tree option", {})
    assert set(ar["runs"]) == {"sets", "sweep"} and ar["status"] == "ok"
    assert all(lv["mismatches"] == 0 for run in ar["runs"].values() for lvs in run["sets"].values() for lv in lvs)
    sweep = ours["runs"]["sweep"]["sets"]["math500"]
    assert sum(lv["mismatches"] for lv in sweep) > 0 and all(lv["unchecked"] == 0 for lv in sweep)
    assert ours["runs"]["sweep"]["overall"][1]["mismatches"] == sweep[1]["mismatches"]
    request = sweep[0]["per_request"][0]
    assert "output_ids" not in request and request["tokens"] == 8
    json.dumps(suite)
