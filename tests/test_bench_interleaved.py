"""The interleaved sweep (`dflash-sglang bench --interleave`): rotation, medians and paired ratios, the time limit on
a fake clock, and three loopback doubles of SGLang's /generate at different speeds."""

import json
import subprocess
import threading
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from test_bench import VERIFY_STEPS, FakeSGLang

import dflash_sglang.bench as bench
from dflash_sglang.bench import STOPPED_AT_TIME_LIMIT, RequestResult, assemble_suite, interleaved_summary, \
    next_repeat_fits, paired_ratios, rotated, run_interleaved
from dflash_sglang.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_rotation_gives_every_contender_every_place():
    names = ["A", "B", "C", "D"]
    assert [rotated(names, r) for r in range(5)] == [list("ABCD"), list("BCDA"), list("CDAB"), list("DABC"),
                                                     list("ABCD")]
    assert rotated(["ar", "ours"], 3) == ["ours", "ar"] and rotated([], 2) == []


def test_paired_ratios_and_medians_from_canned_numbers():
    ratios = paired_ratios([300.0, None, 100.0, 240.0], [150.0, 100.0, 200.0, 0.0])
    assert ratios == {"ratios": [2.0, None, 0.5, None], "median": 1.25, "min": 0.5, "max": 2.0}
    assert paired_ratios([None], [1.0]) == {"ratios": [None], "median": None, "min": None, "max": None}

    def level(tok_s, tau=None, mismatches=0):
        return {"output_tok_s": tok_s, "mean_tpot_ms": 1000 / tok_s, "mean_ttft_ms": 5.0, "tau": tau,
                "requests": 4, "errors": 0, "mismatches": mismatches, "unchecked": 0}

    # The machine slows down and speeds up between repeats; ours stays 1.5x the builtin and 2x AR in each repeat.
    drift = [1.0, 0.6, 0.9]
    runs = [{"results": {"ar": level(100 * d), "builtin": level(400 / 3 * d, 2.0), "ours": level(200 * d, 2.5, r)}}
            for r, d in enumerate(drift)]
    summary = interleaved_summary(runs, ["ar", "builtin", "ours"])
    ours = summary["ours"]
    assert ours["tok_s"] == pytest.approx([200.0, 120.0, 180.0]) and ours["median_tok_s"] == pytest.approx(180.0)
    assert ours["median_tau"] == 2.5 and summary["ar"]["median_tau"] is None
    assert ours["median_tpot_ms"] == pytest.approx(1000 / 180)
    assert ours["vs"]["ar"]["ratios"] == pytest.approx([2.0] * 3)
    assert (ours["vs"]["builtin"]["median"], ours["vs"]["builtin"]["min"], ours["vs"]["builtin"]["max"]) == \
        pytest.approx((1.5, 1.5, 1.5))
    assert set(summary["ar"]["vs"]) == {"builtin"} and set(summary["builtin"]["vs"]) == {"ar"}  # never itself
    assert (ours["requests"], ours["errors"], ours["mismatches"], ours["unchecked"]) == (12, 0, 3, 0)
    # Medians of the tok/s alone keep the drift: ours' median over the builtin's median is not what was paired.
    assert summary["builtin"]["median_tok_s"] == pytest.approx(120.0)


def test_next_repeat_fits_its_level_share():
    assert next_repeat_fits(100.0, None, None, 50.0)  # no time limit
    assert next_repeat_fits(10.0, 20.0, 12.0, None)  # a first repeat runs whenever time is left
    assert not next_repeat_fits(20.0, 20.0, 25.0, None)  # not at the deadline
    assert next_repeat_fits(10.0, 20.0, 14.0, 4.0) and not next_repeat_fits(10.0, 20.0, 14.0, 4.5)


class FakeClock:
    """`time` for the bench module: perf_counter is a number that the fake run_requests moves on."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


@pytest.fixture
def canned(monkeypatch):
    """run_requests replaced: a batch takes SECONDS[url] on the fake clock (stopped at the deadline, each request
    then failing as the real one does), every request returns 8 tokens; each call is recorded."""
    clock, calls = FakeClock(), []
    seconds = {}

    def run_requests(url, prompts, concurrency, sampling, timeout, deadline, progress, logprobs=False):
        start, duration = clock.now, seconds[url]
        stopped = deadline is not None and start + duration > deadline
        clock.now = deadline if stopped else start + duration
        calls.append({"url": url, "ids": [p["id"] for p in prompts], "concurrency": concurrency, "start": start})
        results = [RequestResult(p["id"], [] if stopped else [7] * 8, 0.01, duration, None if url == "ar" else 4,
                                 error=STOPPED_AT_TIME_LIMIT if stopped else None) for p in prompts]
        return results, clock.now - start

    def flush_cache(url):
        calls.append({"url": url, "flush": True, "start": clock.now})
        return None

    monkeypatch.setattr(bench, "time", clock)
    monkeypatch.setattr(bench, "run_requests", run_requests)
    monkeypatch.setattr(bench, "flush_cache", flush_cache)
    return seconds, calls


def runs_of(calls):
    """The recorded request batches, without the cache flushes."""
    return [call for call in calls if not call.get("flush")]


def test_order_rotates_and_prompts_are_shared_within_a_repeat(canned):
    seconds, calls = canned
    seconds.update(ar=1.0, builtin=0.5, ours=0.25, tree=0.2)
    report = run_interleaved({"ar": "ar", "builtin": "builtin", "ours": "ours", "tree": "tree"}, [1, 4, 8], 3,
                             contender_levels={"tree": [1, 8, 16]}, max_tokens=8, rounds=1, min_requests=2,
                             progress=False)
    assert report["contender_levels"] == {"ar": [1, 4, 8], "builtin": [1, 4, 8], "ours": [1, 4, 8], "tree": [1, 8]}
    c1, c4, c8 = report["levels"]
    assert c1["contenders"] == ["ar", "builtin", "ours", "tree"] and c4["contenders"] == ["ar", "builtin", "ours"]
    assert [run["order"] for run in c4["runs"]] == [["ar", "builtin", "ours"], ["builtin", "ours", "ar"],
                                                    ["ours", "ar", "builtin"]]
    assert [call.get("flush", False) for call in calls[:4]] == [True, False, True, False]
    assert all(flush["url"] == run["url"] for flush, run in zip(calls[::2], calls[1::2]))  # each run right after
    calls = runs_of(calls)
    assert [call["url"] for call in calls[:8]] == ["ar", "builtin", "ours", "tree", "builtin", "ours", "tree", "ar"]
    by_repeat = [calls[i:i + 4] for i in range(0, 12, 4)] + [calls[12 + i:15 + i] for i in range(0, 9, 3)] \
        + [calls[21 + i:25 + i] for i in range(0, 12, 4)]
    assert len(calls) == 33
    for repeat in by_repeat:
        assert len({tuple(call["ids"]) for call in repeat}) == 1  # the same prompts for every contender
    first_prompts = [tuple(repeat[0]["ids"]) for repeat in by_repeat]
    assert len(set(first_prompts)) == 9  # fresh prompts per level and repeat
    assert [len(p) for p in first_prompts] == [2, 2, 2, 4, 4, 4, 8, 8, 8]  # max(rounds x c, min_requests)
    assert all(level["repeats"] == 3 and level["stopped"] is None and level["skipped"] is None
               for level in report["levels"])
    ours = c4["summary"]["ours"]
    assert ours["median_tok_s"] == pytest.approx(4 * 8 / 0.25)
    assert ours["vs"]["ar"]["median"] == pytest.approx(4.0) and ours["vs"]["builtin"]["median"] == pytest.approx(2.0)
    assert c1["summary"]["tree"]["vs"]["builtin"]["ratios"] == pytest.approx([2.5] * 3)
    assert ours["mismatches"] == 0 and ours["median_tau"] == pytest.approx(2.0)  # 8 tokens in 4 verify steps


def test_time_limit_stops_repeats_and_drops_an_incomplete_one(canned):
    seconds, calls = canned
    seconds.update(a=1.0, b=1.0)
    # 9 s over two levels: the first gets 4.5 s and fits two 2 s repeats; the second gets the 5 s left, two more.
    report = run_interleaved({"a": "a", "b": "b"}, [1, 4], 5, time_limit=9.0, rounds=1, progress=False,
                             max_tokens=8)
    first, second = report["levels"]
    assert (first["repeats"], second["repeats"]) == (2, 2)
    assert first["stopped"] == "after 2 of 5 repeats: a repeat takes ~2.0s, 0.5s of this level's share left"
    assert second["stopped"] == "after 2 of 5 repeats: a repeat takes ~2.0s, 1.0s of this level's share left"
    assert len(first["summary"]["a"]["tok_s"]) == 2

    calls.clear()
    # 3 s over three levels: the first's one repeat (2 s) overruns its 1 s share and runs all the same; the
    # second's first repeat reaches the deadline after its first contender and is dropped; the third never starts.
    report = run_interleaved({"a": "a", "b": "b"}, [1, 4, 8], 5, time_limit=3.0, rounds=1, progress=False,
                             max_tokens=8)
    first, second, third = report["levels"]
    assert first["repeats"] == 1 and first["stopped"].endswith("0.0s of this level's share left")
    assert (second["repeats"], [run["complete"] for run in second["runs"]]) == (0, [False])
    assert list(second["runs"][0]["results"]) == ["a"] and second["summary"]["a"]["median_tok_s"] is None
    assert third["skipped"] == "time limit (3s) reached before this level" and third["runs"] == []
    assert [call["url"] for call in runs_of(calls)] == ["a", "b", "a"]

    calls.clear()
    seconds.update(b=5.0)  # the deadline stops b's requests mid-repeat: that repeat is not counted
    report = run_interleaved({"a": "a", "b": "b"}, [1], 5, time_limit=4.0, rounds=1, progress=False,
                             max_tokens=8)
    (level,) = report["levels"]
    assert [run["complete"] for run in level["runs"]] == [False] and level["repeats"] == 0
    assert level["runs"][0]["results"]["b"]["errors"] == 1


def test_each_run_starts_from_an_empty_cache_unless_told_otherwise(canned, monkeypatch):
    seconds, calls = canned
    seconds.update(a=1.0, b=1.0)
    run_interleaved({"a": "a", "b": "b"}, [1], 2, rounds=1, progress=False, max_tokens=8, flush=False)
    assert calls and not any(call.get("flush") for call in calls)

    monkeypatch.setattr(bench, "flush_cache", lambda url: "HTTP 400: Cache not flushed" if url == "b" else None)
    report = run_interleaved({"a": "a", "b": "b"}, [1], 2, rounds=1, progress=False, max_tokens=8)
    (level,) = report["levels"]
    assert report["flush"] and [run.get("flush_errors") for run in level["runs"]] == [
        {"b": "HTTP 400: Cache not flushed"}] * 2
    assert level["repeats"] == 2  # a refused flush is recorded, the run still measured


# Delays well above a request's own overhead (a few ms, more on a loaded 2-core machine: at 12/6/4 ms the
# ours/AR ratio came out 2.3 instead of 3 while another job held both cores).
class SlowAR(FakeSGLang):
    chunk_delay = 0.036
    spec = False


class Builtin(FakeSGLang):
    chunk_delay = 0.018


class Ours(FakeSGLang):
    chunk_delay = 0.012
    corrupt_every = 2  # prompts with an even seed get a wrong last token


@pytest.fixture
def three_servers():
    servers = {name: ThreadingHTTPServer(("127.0.0.1", 0), handler)
               for name, handler in (("ar", SlowAR), ("builtin", Builtin), ("ours", Ours))}
    for httpd in servers.values():
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield {name: f"http://127.0.0.1:{httpd.server_address[1]}" for name, httpd in servers.items()}
    for httpd in servers.values():
        httpd.shutdown()


def test_flush_cache_reports_a_refusal(three_servers):
    server = three_servers["ar"]
    FakeSGLang.flushes.clear()
    assert bench.flush_cache(server) is None
    FakeSGLang.busy = True
    try:
        assert bench.flush_cache(server) == "HTTP 400: Cache not flushed: requests running."
    finally:
        FakeSGLang.busy = False
    assert FakeSGLang.flushes == ["SlowAR", "SlowAR"]
    assert bench.flush_cache("http://127.0.0.1:9").startswith("URLError")


def test_three_servers_at_different_speeds(three_servers, tmp_path, capsys):
    FakeSGLang.flushes.clear()
    out = tmp_path / "interleaved.json"
    assert main(["bench", "--interleave", *(f"{name}={url}" for name, url in three_servers.items()),
                 "--contender-concurrency", "ar=1,2", "--concurrency", "1", "2", "--repeats", "3", "--sets", "gsm8k",
                 "--max-tokens", "8", "--rounds", "1", "--min-requests", "2", "--warmup", "2", "--no-progress",
                 "--time-limit", "60", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report["warmup"]) == {"ar", "builtin", "ours"}
    assert all(w["requests"] == 2 and w["errors"] == 0 for w in report["warmup"].values())
    for level in report["levels"]:
        assert level["repeats"] == 3 and level["skipped"] is None
        summary = level["summary"]
        # tok/s goes as 1 / chunk delay, up to each request's own overhead of a few milliseconds
        assert summary["ours"]["vs"]["ar"]["median"] == pytest.approx(3.0, rel=0.2)
        assert summary["ours"]["vs"]["builtin"]["median"] == pytest.approx(1.5, rel=0.2)
        assert summary["builtin"]["vs"]["ar"]["median"] == pytest.approx(2.0, rel=0.2)
        assert summary["ar"]["median_tau"] is None and summary["ours"]["median_tau"] == pytest.approx(8 / VERIFY_STEPS)
        assert summary["ar"]["mismatches"] == 0 and summary["builtin"]["mismatches"] == 0
        assert summary["ours"]["mismatches"] > 0 and summary["ours"]["unchecked"] == 0
        assert all(m["index"] == 7 and m["margin"] is None for run in level["runs"]
                   for m in run["results"]["ours"]["mismatched"])
    runs = [run for level in report["levels"] for run in level["runs"]]
    assert not any("flush_errors" in run for run in runs)
    assert sorted(FakeSGLang.flushes) == sorted({"ar": "SlowAR", "builtin": "Builtin", "ours": "Ours"}[name]
                                                for run in runs for name in run["order"])
    assert [run["order"] for run in report["levels"][0]["runs"]] == [["ar", "builtin", "ours"],
                                                                     ["builtin", "ours", "ar"],
                                                                     ["ours", "ar", "builtin"]]
    table = capsys.readouterr().out
    assert "vs builtin" in table and table.count("\n") >= 6


def test_cli_refuses_what_it_cannot_pair(capsys):
    assert main(["bench", "--interleave", "ar=http://127.0.0.1:9", "--no-progress"]) == 2
    assert "at least two contenders" in capsys.readouterr().err
    assert main(["bench", "--interleave", "ar=http://x", "b=http://y", "--repeats", "0"]) == 2
    assert "--repeats" in capsys.readouterr().err
    assert main(["bench", "--interleave", "ar=http://x", "b=http://y", "--sets", "gsm8k", "mtbench"]) == 2
    assert "one prompt set" in capsys.readouterr().err
    assert main(["bench", "--interleave", "ar=http://x", "http://y"]) == 2
    assert "NAME=VALUE" in capsys.readouterr().err
    assert main(["bench", "--interleave", "ar=http://x", "b=http://y", "--contender-concurrency", "b=1,x"]) == 2
    assert "integers" in capsys.readouterr().err
    assert main(["bench", "--interleave", "ar=http://x", "b=http://y", "--contender-concurrency", "c=1"]) == 2
    assert "not a contender" in capsys.readouterr().err


def test_assemble_suite_carries_the_interleaved_stage(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"date": "2026-12-01", "settings": {}, "contenders": ["ar"]}))
    assert assemble_suite(str(tmp_path))["interleaved"] is None
    (tmp_path / "interleaved.status").write_text("skipped: time budget spent (12s for it)\n")
    assert assemble_suite(str(tmp_path))["interleaved"] == {"status": "skipped",
                                                           "reason": "time budget spent (12s for it)", "report": None}
    request = {"id": "math500-3", "output_ids": [1, 2, 3], "margins": None, "error": None}
    report = {"repeats": 1, "levels": [{"concurrency": 1, "summary": {}, "runs": [
        {"repeat": 1, "results": {"ar": {"per_request": [request]}}}]}]}
    (tmp_path / "interleaved.json").write_text(json.dumps(report))
    (tmp_path / "interleaved.status").write_text("ok\n")
    stage = assemble_suite(str(tmp_path))["interleaved"]
    assert (stage["status"], stage["reason"]) == ("ok", None)
    assert stage["report"]["levels"][0]["runs"][0]["results"]["ar"]["per_request"] == [
        {"id": "math500-3", "error": None, "tokens": 3}]


def test_bench_sh_parses():
    subprocess.run(["bash", "-n", str(REPO / "scripts" / "device" / "bench.sh")], check=True)


def test_assemble_suite_counts_each_servers_prefill_batches(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"date": "2026-12-01", "settings": {}, "contenders": ["ar",
                                                                                                        "ours"]}))
    (tmp_path / "ar.log").write_text(
        "[2026-11-30 11:41:10] Prefill batch, #new-seq: 20, #new-token: 20, #cached-token: 1829, token usage: 0.03, "
        "#running-req: 44, #queue-req: 0, #pending-token: 0, cuda graph: True, input throughput (token/s): 1943.38\n"
        "[2026-11-30 11:41:10] Decode batch, #running-req: 8, #token: 3225, cuda graph: True\n"
        "[2026-11-30 11:41:11] Prefill batch, #new-seq: 1, #new-token: 1, #cached-token: 136, token usage: 0.02, "
        "#running-req: 0, #queue-req: 0, #pending-token: 0, cuda graph: False, input throughput (token/s): 1.07\n"
        "[2026-11-30 11:41:12] Prefill batch, #new-seq: 1, #new-token: 34, #cached-token: 0, token usage: 0.00, "
        "#running-req: 0, #queue-req: 0, #pending-token: 0, cuda graph: True, input throughput (token/s): 0.33\n")
    suite = assemble_suite(str(tmp_path))
    ar, ours = suite["contenders"]
    assert ar["prefills"] == {"batches": 3, "single_request": 2, "eager": 1, "one_token": 1}
    assert ours["prefills"] is None  # no log
