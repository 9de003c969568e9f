"""The bench client against a loopback double of SGLang's streaming /generate protocol."""

import json
import shutil
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from dflash_sglang.bench import NEAR_TIE, assemble_suite, check_level, fastest_contender, format_table, level_prompts, \
    render_prompts, run_bench
from dflash_sglang.cli import main

DEVICE = Path(__file__).resolve().parents[1] / "scripts" / "device"

VERIFY_STEPS = 3  # the double reports this many verify steps per request: tau = tokens / 3
TOP1 = -0.125  # the double's top-1 logprob; the second is TOP1 - margin(position), all exact in binary


def margin(position: int) -> float:
    return 0.03125 if position % 2 else 0.5  # odd positions are near-ties, even ones are not


class FakeSGLang(BaseHTTPRequestHandler):
    """Cumulative output_ids per chunk (SGLang's default), meta_info complete on the last chunk; with
    return_logprob and top_logprobs_num 2, meta_info also carries the cumulative output_top_logprobs. With EOS
    honoured, prompts whose seed is odd stop at half length. Class attributes switch on faults for one test (a
    subclass sets its own: a slower server, a non-speculative one); every request body is kept in `bodies`."""

    corrupt_every = 0
    corrupt_at = -1
    chunk_delay = 0.0
    spec = True
    top_logprobs = True
    busy = False  # /flush_cache answers as SGLang does while requests run
    bodies: list[dict] = []
    flushes: list[str] = []  # the class of each server that emptied its cache

    def do_POST(self):
        if self.path == "/flush_cache?timeout=10":  # bench.flush_cache waits up to 10 s for idle
            FakeSGLang.flushes.append(type(self).__name__)
            self.send_response(400 if self.busy else 200)
            self.end_headers()
            self.wfile.write(b"Cache not flushed: requests running.\n" if self.busy else b"Cache flushed.\n")
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakeSGLang.bodies.append(body)
        params = body["sampling_params"]
        assert body["stream"] is True and params["temperature"] == 0.0
        logprobs = body.get("return_logprob", False)
        assert not logprobs or body["top_logprobs_num"] == 2
        seed = len(body["text"]) if "text" in body else sum(body["input_ids"])
        n = params["max_new_tokens"]
        if not params["ignore_eos"] and seed % 2:
            n //= 2
        ids = [(seed + i) % 97 for i in range(n)]
        if self.corrupt_every and seed % self.corrupt_every == 0:
            ids[self.corrupt_at] += 1
        top = [[[TOP1, t, None], [TOP1 - margin(i), t + 1, None]] for i, t in enumerate(ids)]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for k in range(1, n + 1):
            meta = {"completion_tokens": k}
            if logprobs and self.top_logprobs:
                meta["output_top_logprobs"] = top[:k]
            if k == n:
                meta["finish_reason"] = {"type": "length" if n == params["max_new_tokens"] else "stop"}
                if self.spec:
                    meta.update(spec_verify_ct=VERIFY_STEPS, spec_accept_length=n / VERIFY_STEPS)
            self.wfile.write(f"data: {json.dumps({'output_ids': ids[:k], 'meta_info': meta})}\n\n".encode())
            self.wfile.flush()
            time.sleep(self.chunk_delay)
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
    FakeSGLang.corrupt_every, FakeSGLang.corrupt_at, FakeSGLang.chunk_delay, FakeSGLang.spec = 0, -1, 0.0, True
    FakeSGLang.top_logprobs = True
    FakeSGLang.bodies.clear()


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
    assert all(m["margin"] is None for m in level["mismatched"])  # the reference has no margins
    assert level["mismatch_max_margin"] is None and level["mismatches_above_tolerance"] is None
    assert differ["overall"][0]["mismatches"] == level["mismatches"]


def test_logprobs_record_top2_margins_with_the_same_sampling(server):
    report = run_bench(server, ["gsm8k"], [2], max_tokens=8, limit=3, warmup=1, logprobs=True, progress=False)
    level = report["sets"]["gsm8k"][0]
    assert report["logprobs"] is True and level["errors"] == 0
    assert all(r["margins"] == [margin(i) for i in range(8)] for r in level["per_request"])
    plain = run_bench(server, ["gsm8k"], [2], max_tokens=8, limit=3, progress=False)["sets"]["gsm8k"][0]
    assert all(r["margins"] is None for r in plain["per_request"])
    measured = FakeSGLang.bodies[1:]  # after the warm-up: 3 requests with logprobs, then the same 3 without
    for with_lp, without in zip(sorted(measured[:3], key=str), sorted(measured[3:], key=str)):
        assert (with_lp.pop("return_logprob"), with_lp.pop("top_logprobs_num")) == (True, 2)
        assert with_lp == without
    FakeSGLang.top_logprobs = False
    broken = run_bench(server, ["gsm8k"], [1], max_tokens=4, limit=1, logprobs=True, progress=False)
    assert "output_top_logprobs" in broken["sets"]["gsm8k"][0]["per_request"][0]["error"]


@pytest.mark.parametrize("position, near_tie", [(5, True), (4, False)])
def test_mismatches_carry_the_reference_margin_at_the_first_difference(server, tmp_path, position, near_tie):
    ref = tmp_path / "ref.json"
    ref.write_text(json.dumps(run_bench(server, ["gsm8k"], [1], max_tokens=8, limit=12, logprobs=True,
                                        progress=False)))
    FakeSGLang.corrupt_every, FakeSGLang.corrupt_at = 2, position
    level = run_bench(server, ["gsm8k"], [4], max_tokens=8, limit=12, reference=[str(ref)],
                      progress=False)["sets"]["gsm8k"][0]
    assert level["mismatches"] > 0
    assert all((m["index"], m["margin"]) == (position, margin(position)) for m in level["mismatched"])
    assert level["mismatch_max_margin"] == margin(position) and (margin(position) < NEAR_TIE) == near_tie
    assert level["mismatches_above_tolerance"] == (0 if near_tie else level["mismatches"])


def test_margin_past_the_reference_output_is_inf_and_unknown_is_not_a_near_tie():
    reference = {"a|8|True": {"output_ids": [1, 2], "margins": [0.5, 0.01]},
                 "b|8|True": {"output_ids": [1, 2], "margins": [0.5, 0.01]},
                 "c|8|True": {"output_ids": [1, 2], "margins": [0.01, None]}}
    level = {"max_tokens": 8, "ignore_eos": True, "skipped": None,
             "per_request": [{"id": "a", "error": None, "output_ids": [1, 2, 3]},
                             {"id": "b", "error": None, "output_ids": [1, 3]},
                             {"id": "c", "error": None, "output_ids": [1, 3]}]}
    check_level(level, reference)
    assert [(m["index"], m["margin"]) for m in level["mismatched"]] == [(2, float("inf")), (1, 0.01), (1, None)]
    assert level["mismatch_max_margin"] == float("inf") and level["mismatches_above_tolerance"] == 2


def test_e2e_client_shares_the_near_tie_constant():
    sys.path.insert(0, str(DEVICE))
    try:
        import e2e_client
    finally:
        sys.path.remove(str(DEVICE))
    assert e2e_client.NEAR_TIE == NEAR_TIE


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


def test_time_limit_starts_after_the_prompts_are_rendered(server, monkeypatch):
    import dflash_sglang.bench as bench

    slow = bench.render_prompts

    def render_slowly(rows, tokenizer):  # a first tokenizer load on a busy host
        time.sleep(0.6)
        return slow(rows, tokenizer)

    monkeypatch.setattr(bench, "render_prompts", render_slowly)
    report = run_bench(server, ["gsm8k"], [1], max_tokens=4, limit=1, warmup=1, time_limit=0.5, progress=False)
    level = report["sets"]["gsm8k"][0]
    assert level["skipped"] is None and level["errors"] == 0
    assert report["prepare_seconds"] >= 1.2


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
                 "--concurrency", "1", "--max-tokens", "4", "--warmup", "0", "--no-progress", "--logprobs",
                 "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["logprobs"] is True
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
    run("ar", "sets", sets=["gsm8k", "mtbench"], conc=[1], limit=3, ignore_eos=False, logprobs=True)
    run("ar", "sweep", sets=["math500"], conc=[1, 4], rounds=2, min_requests=2)
    FakeSGLang.corrupt_every, FakeSGLang.corrupt_at = 2, 2  # the timed sweep differs from the margins stage,
    run("ar", "margins", sets=["math500"], conc=[1, 4], rounds=2, min_requests=2, logprobs=True)  # the reference
    FakeSGLang.corrupt_every, FakeSGLang.corrupt_at = 3, -1
    run("ours", "sets", sets=["gsm8k", "mtbench"], conc=[1], limit=3, ignore_eos=False)
    run("ours", "sweep", sets=["math500"], conc=[1, 4], rounds=2, min_requests=2)
    (tmp_path / "ar.status").write_text("ok\n")
    (tmp_path / "ours.status").write_text("ok\n")
    (tmp_path / "ours-tree.status").write_text("skipped: no tree option\n")

    suite = assemble_suite(str(tmp_path))
    assert suite["date"] == "2026-12-01" and suite["reference"] == "ar" and "contenders" in suite
    ar, ours, tree = suite["contenders"]
    assert (tree["status"], tree["reason"], tree["runs"]) == ("skipped", "no tree option", {})
    assert set(ar["runs"]) == {"sets", "sweep", "margins"} and ar["status"] == "ok"
    assert suite["near_tie_tolerance"] == NEAR_TIE
    for stage in ("sets", "margins"):
        assert all(lv["mismatches"] == 0 and lv["mismatches_above_tolerance"] == 0
                   for lvs in ar["runs"][stage]["sets"].values() for lv in lvs)
    ar_timed = [m for lv in ar["runs"]["sweep"]["sets"]["math500"] for m in lv["mismatched"]]
    assert ar_timed and all((m["index"], m["margin"]) == (2, margin(2)) for m in ar_timed)
    sweep = ours["runs"]["sweep"]["sets"]["math500"]
    assert sum(lv["mismatches"] for lv in sweep) > 0 and all(lv["unchecked"] == 0 for lv in sweep)
    # ours differs from the margins stage at 2 (where the timed AR sweep does) or at its last token, 7
    assert {(m["index"], m["margin"]) for lv in sweep for m in lv["mismatched"]} <= {(2, margin(2)), (7, margin(7))}
    assert all(lv["mismatches_above_tolerance"] == sum(m["margin"] >= NEAR_TIE for m in lv["mismatched"])
               for lv in sweep)
    assert ours["runs"]["sweep"]["overall"][1]["mismatches"] == sweep[1]["mismatches"]
    assert ours["runs"]["sweep"]["overall"][1]["mismatch_max_margin"] == sweep[1]["mismatch_max_margin"]
    sets = [lv for lvs in ours["runs"]["sets"]["sets"].values() for lv in lvs]
    assert all(m["margin"] is not None for lv in sets for m in lv["mismatched"])
    request = sweep[0]["per_request"][0]
    assert "output_ids" not in request and "margins" not in request and request["tokens"] == 8
    json.dumps(suite)


def test_fastest_contender_is_the_best_measured_c1(tmp_path):
    def sweep(name, rates, skipped=()):
        levels = [{"concurrency": c, "skipped": "time limit" if c in skipped else None, "output_tok_s": rate}
                  for c, rate in rates.items()]
        (tmp_path / f"{name}.sweep.json").write_text(json.dumps({"sets": {"math500": levels}}))

    sweep("ours-tree-8", {1: 900.0, 8: 5000.0})
    sweep("ours-tree-16", {1: 1000.0})
    sweep("ours-tree-32", {1: 2000.0}, skipped=(1,))
    sweep("ours-tree-64", {1: None})  # every request failed
    names = ["ours-tree-8", "ours-tree-16", "ours-tree-32", "ours-tree-64", "ours-tree-128"]  # 128: no sweep file
    assert fastest_contender(str(tmp_path), names) == "ours-tree-16"
    assert fastest_contender(str(tmp_path), names, concurrency=8) == "ours-tree-8"
    assert fastest_contender(str(tmp_path), ["ours-tree-32", "ours-tree-64", "ours-tree-128"]) is None


def test_assemble_suite_carries_the_profile_summaries(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"date": "2026-12-01", "settings": {},
                                                   "contenders": ["ar", "ours", "ours-tree-16"]}))
    profile = tmp_path / "profile"
    profile.mkdir()
    summary = {"traces": ["/tmp/x/trace.json.gz"], "concurrency": 32, "steps": 40, "host_ms_per_step_mean": 1.5}
    (profile / "ours-tree-16-c1.status").write_text("failed: profile_step.py exited with 1: no trace found\n")
    (profile / "ours-c32.status").write_text("ok\n")
    (profile / "ours-c32.summary.json").write_text(json.dumps(summary))
    (profile / "ours-c1.status").write_text("skipped: time budget spent (12s for it)\n")
    (profile / "ours-c1.txt").write_text("whatever profile_step printed\n")
    suite = assemble_suite(str(tmp_path))
    assert [(p["contender"], p["concurrency"], p["status"]) for p in suite["profiles"]] == [
        ("ours", 1, "skipped"), ("ours", 32, "ok"), ("ours-tree-16", 1, "failed")]
    assert (suite["profiles"][0]["reason"], suite["profiles"][0]["summary"]) == ("time budget spent (12s for it)", None)
    assert suite["profiles"][1]["summary"] == {k: v for k, v in summary.items() if k != "traces"}
    assert suite["profiles"][2]["reason"] == "profile_step.py exited with 1: no trace found"
    shutil.rmtree(profile)
    assert assemble_suite(str(tmp_path))["profiles"] == []
