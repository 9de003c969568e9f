"""scripts/device/bench.sh end to end on CPU, against a stand-in for `python -m sglang.launch_server`: a tree budget
sweep with the profile stage, and a single tree budget in the interleaved stage, checked through bench.json, the
server logs and the files left in $OUT."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dflash_sglang.bench import fastest_contender
from dflash_sglang.tiny import TOKENIZERS, install_tokenizer, make_tiny

REPO = Path(__file__).resolve().parents[1]

# The stand-in: /health, a streaming (or not) /generate whose output ids depend on the prompt only (so every
# contender matches AR), top-2 logprobs when asked, a speculative server's verify steps (tau grows with the tree
# budget, and so does the step time), and /start_profile, which writes a chrome trace of `num_steps` scheduler steps
# (with our decode range inside on our worker's servers) into the requested folder as SGLang's profiler does.
FAKE_SERVER = r'''
import gzip, json, math, os, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

argv = sys.argv[1:]
TREE_FLAG = "--speculative-dflash-tree-budget"
if "--help" in argv:
    print("--model-path --port " + TREE_FLAG)
    sys.exit(0)
port = int(argv[argv.index("--port") + 1])
spec = "--speculative-algorithm" in argv
budget = int(argv[argv.index(TREE_FLAG) + 1]) if TREE_FLAG in argv else 0
print("argv " + " ".join(argv))
print("env SGLANG_PROFILE_WITH_STACK=%s SGLANG_PROFILE_RECORD_SHAPES=%s" % (
    os.environ.get("SGLANG_PROFILE_WITH_STACK"), os.environ.get("SGLANG_PROFILE_RECORD_SHAPES")))
ours = spec and os.environ.get("DFLASH_SGLANG_DISABLE") != "1"
if spec:
    if not ours:
        print("dflash_sglang: DFLASH is served by SGLang's builtin DFlashWorkerV2 because DFLASH_SGLANG_DISABLE=1")
    else:
        print("dflash_sglang: DFLASH is served by dflash_sglang.sglang.worker.DFlashWorker")
sys.stdout.flush()
accept = 1 + (2 + math.log2(budget) / 2 if budget else 2) * spec
step_s = 0.001 * (1 + budget / 16)


def trace(folder, steps):
    time.sleep(0.2)
    events = []
    for i in range(steps):
        ts = 1000 * i
        events += [{"ph": "X", "name": "scheduler.run_batch", "ts": ts - 100, "dur": 600 + budget,
                    "cat": "user_annotation", "pid": 1, "tid": 1},
                   {"ph": "X", "name": "cudaGraphLaunch", "ts": ts + 10, "dur": 5, "cat": "cuda_runtime", "pid": 1,
                    "tid": 1}]
        if ours:
            events.append({"ph": "X", "name": "dflash_sglang.decode", "ts": ts, "dur": 400 + budget,
                           "cat": "user_annotation", "pid": 1, "tid": 1})
        events += [{"ph": "X", "name": "cudaLaunchKernel", "ts": ts + 20 + k, "dur": 1, "cat": "cuda_runtime",
                    "pid": 1, "tid": 1} for k in range(3 + (budget > 0))]
    os.makedirs(folder, exist_ok=True)
    with gzip.open(os.path.join(folder, "%s-TP-0.trace.json.gz" % time.time()), "wt") as f:
        json.dump({"traceEvents": events}, f)


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def do_POST(self):
        if self.path == "/flush_cache?timeout=10":  # bench.flush_cache waits up to 10 s for idle
            print("flush_cache", flush=True)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"Cache flushed.\n")
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/start_profile":
            threading.Thread(target=trace, args=(body["output_dir"], body["num_steps"])).start()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"Start profiling.\n")
            return
        params = body["sampling_params"]
        seed = len(body["text"]) if "text" in body else sum(body["input_ids"])
        n = params["max_new_tokens"] if params.get("ignore_eos") or seed % 2 == 0 else params["max_new_tokens"] // 2
        ids = [(seed + i) % 1000 for i in range(n)]
        top = [[[-0.125, t, None], [-0.625, t + 1, None]] for t in ids]
        steps = math.ceil(n / accept)
        meta = {"completion_tokens": n, "finish_reason": {"type": "length"}}
        if spec:
            meta["spec_verify_ct"] = steps
        if body.get("return_logprob"):
            meta["output_top_logprobs"] = top
        if not body.get("stream"):
            time.sleep(steps * step_s)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(json.dumps({"text": "x", "output_ids": ids, "meta_info": meta}).encode())
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for k in range(1, steps + 1):
            time.sleep(step_s)
            done = min(n, round(k * accept))
            chunk = {"output_ids": ids[:done], "meta_info": meta if k == steps else {"completion_tokens": done}}
            self.wfile.write(("data: %s\n\n" % json.dumps(chunk)).encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


@pytest.fixture
def fake_sglang(tmp_path):
    package = tmp_path / "fake" / "sglang"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text('__version__ = "0.5.16"\n')
    (package / "launch_server.py").write_text(FAKE_SERVER)
    return tmp_path / "fake"


def server_lines(log: Path, prefix: str) -> str:
    return next(line for line in log.read_text().splitlines() if line.startswith(prefix))


def run_bench_sh(tmp_path: Path, fake_sglang: Path, *flags: str, timeout: float) -> tuple[subprocess.CompletedProcess,
                                                                                         Path]:
    """bench.sh on a tiny pair against the stand-in: the finished process and its bench folder."""
    target, drafter = make_tiny("qwen3", tmp_path / "pair", vocab_size=512, block_size=16)
    install_tokenizer(TOKENIZERS["qwen3"], target)
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(fake_sglang),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = ["bash", str(REPO / "scripts" / "device" / "bench.sh"), "--target", str(target), "--drafter", str(drafter),
           *flags]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run, out / "bench"


@pytest.mark.slow
def test_tree_budget_sweep_and_profile_stage(tmp_path, fake_sglang):
    run, bench_dir = run_bench_sh(tmp_path, fake_sglang, "--sets", "gsm8k mtbench", "--set-prompts", "2",
                                  "--concurrency", "1 4", "--max-tokens", "16", "--budget", "540", "--tree-budget",
                                  "8 16", "--tree-topk", "3", "--profile", "--profile-concurrency", "2 3", timeout=620)
    out = bench_dir.parent
    bench = json.loads((bench_dir / "bench.json").read_text())

    names = ["ar", "builtin", "ours", "ours-tree-8", "ours-tree-16"]
    assert [c["name"] for c in bench["contenders"]] == names
    assert all(c["status"] == "ok" for c in bench["contenders"]), [c["reason"] for c in bench["contenders"]]
    settings = bench["settings"]
    assert settings["tree_budget"] == [8, 16] and settings["tree_concurrency"] == [1] and settings["profile"]
    assert settings["tree_contenders"] == {"ours-tree-8": 8, "ours-tree-16": 16}
    # Graphs up to the largest batch each server sees: its sweep levels, and the profile's for the profiled ones.
    assert settings["cuda_graph_max_bs"] == {"ar": 4, "builtin": 4, "ours": 4, "ours-tree-8": 2, "ours-tree-16": 2}
    by_name = {c["name"]: c for c in bench["contenders"]}
    for name in names:
        sweep = by_name[name]["runs"]["sweep"]["sets"]["math500"]
        assert [lv["concurrency"] for lv in sweep] == ([1] if "tree" in name else [1, 4])
        assert all(lv["mismatches"] == 0 and not lv["skipped"] for lv in sweep)
        sets = by_name[name]["runs"]["sets"]["sets"]
        assert set(sets) == {"gsm8k", "mtbench"} and all(not lv["skipped"] for lvs in sets.values() for lv in lvs)

    # The tree servers got their budget and top-k; only the profiled servers got the profiler settings.
    for name, port in (("ours-tree-8", 30003), ("ours-tree-16", 30004)):
        argv = server_lines(bench_dir / f"{name}.log", "argv ").split()
        assert argv[argv.index("--speculative-dflash-tree-budget") + 1] == str(settings["tree_contenders"][name])
        assert argv[argv.index("--speculative-dflash-topk") + 1] == "3"
        assert argv[argv.index("--port") + 1] == str(port) and argv[argv.index("--cuda-graph-max-bs") + 1] == "2"
    # Every server runs its largest level at once (SGLang caps speculative ones at 48), and bench.json says so.
    assert settings["max_running_requests"] == settings["cuda_graph_max_bs"]
    for name in names:
        argv = server_lines(bench_dir / f"{name}.log", "argv ").split()
        assert argv[argv.index("--max-running-requests") + 1] == str(settings["max_running_requests"][name])
    for name in names:  # prefill graphs off by default, and said so in the report
        assert "--disable-prefill-cuda-graph" in server_lines(bench_dir / f"{name}.log", "argv ").split()
    assert "prefill CUDA graphs off" in run.stdout
    for name in names:
        assert server_lines(bench_dir / f"{name}.log", "env ") == (
            "env SGLANG_PROFILE_WITH_STACK=false SGLANG_PROFILE_RECORD_SHAPES=false")

    # Profiles: AR, the builtin, ours and the tree with the best c1 tok/s; ours at each profile concurrency, the others
    # at the first; summaries kept, traces gone. Every server has scheduler steps, only ours decode ranges.
    best = fastest_contender(str(bench_dir), ["ours-tree-8", "ours-tree-16"])
    profiles = bench["profiles"]
    assert [(p["contender"], p["concurrency"], p["status"]) for p in profiles] == [
        ("ar", 2, "ok"), ("builtin", 2, "ok"), ("ours", 2, "ok"), ("ours", 3, "ok"), (best, 2, "ok")]
    for p in profiles:
        ours = p["contender"] not in ("ar", "builtin")
        launches = 4.0 if "tree" in p["contender"] else 3.0
        assert p["summary"]["steps"] == (40 if ours else 0)
        scheduler = p["summary"]["scheduler_step"]
        assert scheduler["steps"] == 40 and scheduler["graph_launches_per_step"] == 1.0
        assert scheduler["kernel_launches_per_step"] == launches
        if ours:
            assert p["summary"]["graph_launches_per_step"] == 1.0
            assert p["summary"]["kernel_launches_per_step"] == launches
        assert "traces" not in p["summary"]
    assert not [p for p in out.rglob("*") if ".trace.json" in p.name]
    assert sorted(p.name for p in (bench_dir / "profile").iterdir()) == sorted(
        f"{p['contender']}-c{p['concurrency']}.{ext}" for p in profiles for ext in ("status", "summary.json", "txt"))

    # The interleaved stage: AR, the builtin and ours again, kept up through the tree profile (a budget sweep's trees
    # stay out), on MATH-500 from its first prompt (each run flushes the radix cache the earlier stages filled).
    stage = bench["interleaved"]
    assert stage["status"] == "ok" and "interleave_skip" not in settings
    report = stage["report"]
    assert list(report["contenders"]) == ["ar", "builtin", "ours"] and report["skip"] == 0 and report["flush"]
    assert [(lv["concurrency"], lv["repeats"]) for lv in report["levels"]] == [(1, 5), (4, 5)]
    for level in report["levels"]:
        assert all(e["mismatches"] == 0 and e["errors"] == 0 for e in level["summary"].values())
        assert level["summary"]["ours"]["vs"]["builtin"]["median"] > 0
        assert all(len(run_["order"]) == 3 for run_ in level["runs"])

    # The printed report has the sweep, interleaved and profile tables.
    assert "## Tree budget sweep" in run.stdout and "## Per-step host cost" in run.stdout
    assert "## Interleaved sweep (median of 5 repeats, paired ratios)" in run.stdout
    assert "| AR | 2 | scheduler step | 40 |" in run.stdout
    assert "| ours (tree, 16 nodes) | 1 |" in run.stdout


@pytest.mark.slow
def test_single_tree_and_the_adaptive_contender_join_the_interleaved_stage(tmp_path, fake_sglang):
    run, bench_dir = run_bench_sh(tmp_path, fake_sglang, "--sets", "gsm8k", "--set-prompts", "1", "--concurrency",
                                  "1 2", "--max-tokens", "8", "--budget", "300", "--tree-budget", "8",
                                  "--tree-concurrency", "1", "--interleave-repeats", "2", "--adaptive",
                                  "--interleave-rounds", "3", "--prefill-graphs", "--interleave-stop-at-eos",
                                  "--server-args", "--enable-prefill-delayer --prefill-delayer-max-delay-passes 8",
                                  "--spec-server-args", "--schedule-conservativeness 0.5", timeout=400)
    bench = json.loads((bench_dir / "bench.json").read_text())
    assert all(c["status"] == "ok" for c in bench["contenders"]), [c["reason"] for c in bench["contenders"]]
    everyone = ["ar", "builtin", "ours", "ours-tree", "ours-adaptive"]
    assert bench["settings"]["interleaved"] == everyone and bench["settings"]["adaptive"] is True
    # The adaptive contender is the tree of the first budget with our adaptive flag, on its own port.
    argv = next(line for line in (bench_dir / "ours-adaptive.log").read_text().splitlines() if line.startswith("argv"))
    assert "--speculative-dflash-tree-budget 8" in argv and "--speculative-dflash-adaptive" in argv
    assert "--port 30020" in argv
    # By default every server of ours, and only ours, asks for the split-KV verify and the verify-graph prefill; the
    # report says so.
    ours_flags = "--speculative-dflash-verify-splitkv --speculative-dflash-verify-prefill"
    for flag in ours_flags.split():
        asked = {name: flag in server_lines(bench_dir / f"{name}.log", "argv ").split() for name in everyone}
        assert asked == {"ar": False, "builtin": False, "ours": True, "ours-tree": True, "ours-adaptive": True}
    assert bench["settings"]["ours_flags"] == ours_flags
    assert f"our servers with `{ours_flags}`" in run.stdout
    # --server-args: every server, AR's included, gets them; the report says so.
    delayer = "--enable-prefill-delayer --prefill-delayer-max-delay-passes 8"
    assert all(delayer in server_lines(bench_dir / f"{name}.log", "argv ") for name in everyone)
    assert bench["settings"]["all_flags"] == delayer
    assert f"every server (AR's too) with `{delayer}`" in run.stdout
    # --spec-server-args: the speculative servers get them, AR does not; the report says so.
    spec_only = {name: "--schedule-conservativeness 0.5" in server_lines(bench_dir / f"{name}.log", "argv ")
                 for name in everyone}
    assert spec_only == {"ar": False, "builtin": True, "ours": True, "ours-tree": True, "ours-adaptive": True}
    assert bench["settings"]["spec_flags"] == "--schedule-conservativeness 0.5"
    assert ("the speculative servers (the builtin's and ours, not AR) with `--schedule-conservativeness 0.5`"
            in run.stdout)
    # --prefill-graphs: no server is told to skip them, and the report says they were on.
    assert not any("--disable-prefill-cuda-graph" in server_lines(bench_dir / f"{name}.log", "argv ")
                   for name in everyone)
    assert "prefill CUDA graphs on" in run.stdout
    report = bench["interleaved"]["report"]
    assert list(report["contenders"]) == everyone
    assert report["contender_levels"]["ours-tree"] == [1]
    c1, c2 = report["levels"]
    assert c1["contenders"] == everyone and c2["contenders"] == ["ar", "builtin", "ours", "ours-adaptive"]
    assert (c1["repeats"], c2["repeats"]) == (2, 2)
    # Three rounds: max(3 x c, 4) prompts per run, each run after its server emptied its radix cache.
    assert bench["settings"]["interleave_rounds"] == 3
    runs = [run_ for level in report["levels"] for run_ in level["runs"]]
    assert report["flush"] and not any("flush_errors" in run_ for run_ in runs)
    flushes = {name: (bench_dir / f"{name}.log").read_text().splitlines().count("flush_cache") for name in everyone}
    assert flushes == {name: sum(name in run_["order"] for run_ in runs) for name in everyone}
    # --interleave-stop-at-eos: the stage's requests stop at EOS (the fake's odd prompts end at half length).
    assert report["ignore_eos"] is False and "at most; stopping at EOS" in run.stdout
    assert {r["results"]["ours"]["requests"] for r in c1["runs"]} == {4}
    assert {r["results"]["ours"]["requests"] for r in c2["runs"]} == {6}
    assert [run_["order"] for run_ in c1["runs"]] == [everyone, everyone[1:] + everyone[:1]]
    tree = c1["summary"]["ours-tree"]
    assert tree["mismatches"] == 0 and tree["vs"]["builtin"]["median"] > 0 and tree["vs"]["ar"]["median"] > 0
    assert "| ours (tree) | 1 | 2/2 |" in run.stdout
    assert "| ours (tree, adaptive) | 2 | 2/2 |" in run.stdout


@pytest.mark.slow
def test_servers_whose_own_stages_found_no_time_still_join_the_interleaved_stage(tmp_path, fake_sglang):
    # A budget whose even split leaves the first contenders under the 30 s an own stage needs (the later ones get
    # the skipped ones' time).
    run, bench_dir = run_bench_sh(tmp_path, fake_sglang, "--sets", "gsm8k", "--set-prompts", "1", "--concurrency",
                                  "1 2", "--max-tokens", "8", "--budget", "120", "--interleave-share", "50",
                                  "--tree-budget", "8", "--tree-concurrency", "1", "--interleave-repeats", "1",
                                  "--adaptive", "--no-verify-splitkv", "--no-verify-prefill", timeout=300)
    bench = json.loads((bench_dir / "bench.json").read_text())
    everyone = ["ar", "builtin", "ours", "ours-tree", "ours-adaptive"]
    # --no-verify-splitkv: our servers keep SGLang's verify attention; --no-verify-prefill: SGLang's prefill.
    argv = {name: server_lines(bench_dir / f"{name}.log", "argv ").split() for name in everyone}
    for flag in ("--no-speculative-dflash-verify-splitkv", "--no-speculative-dflash-verify-prefill"):
        assert {name: flag in line for name, line in argv.items()} == {
            "ar": False, "builtin": False, "ours": True, "ours-tree": True, "ours-adaptive": True}
    statuses = {c["name"]: c["status"] for c in bench["contenders"]}
    assert statuses["ar"] == "skipped" and set(statuses.values()) == {"skipped", "ok"}, statuses
    assert bench["interleaved"]["status"] == "ok"
    report = bench["interleaved"]["report"]
    assert list(report["contenders"]) == everyone
    assert [(lv["concurrency"], lv["repeats"]) for lv in report["levels"]] == [(1, 1), (2, 1)]
    assert "## Interleaved sweep" in run.stdout
