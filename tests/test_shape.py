"""scripts/device/shape.sh and shape.py (the published-shape runs) and scripts/shape_report.py: SGLang 0.5.16's
startup lines and our step-timing lines into the summary, the step / AR ratios against issue 8's bars, tree stages,
the GPU nvidia-smi is asked about, and the whole script on CPU against a stand-in for SGLang's server."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dflash_sglang.sglang.step_timing import format_line

REPO = Path(__file__).resolve().parents[1]


def load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sys.path.insert(0, str(REPO / "scripts" / "device"))  # as when shape.py runs: its folder's modules import
shape = load("shape", REPO / "scripts" / "device" / "shape.py")
shape_stages = load("shape_stages", REPO / "scripts" / "device" / "shape_stages.py")

PREFIX = "[2026-11-30 10:00:00 TP0] "
GEMMA_STARTUP = [
    "Load weight end. elapsed=0.31 s, type=Gemma4ForConditionalGeneration, avail mem=80.90 GB, mem usage=58.30 GB.",
    "KV Cache is allocated. dtype: torch.bfloat16, #tokens: 50000, K size: 10.00 GB, V size: 10.00 GB",
    "KV Cache is allocated. dtype: torch.bfloat16, #tokens: 200000, K size: 5.00 GB, V size: 5.00 GB",
    "SWAKVPool mem usage: 30.00 GB, swa size: 50000, full size: 200000",
]
QWEN_STARTUP = [
    "Load weight end. elapsed=0.29 s, type=Qwen3ForCausalLM, avail mem=75.10 GB, mem usage=65.53 GB.",
    "KV Cache is allocated. dtype: torch.bfloat16, #tokens: 180000, K size: 22.00 GB, V size: 22.00 GB",
]


def ours_lines(*timing, tree: tuple[int, int] | None = None) -> list[str]:
    lines = [shape.SERVING_OURS,
             "Load weight end. elapsed=0.02 s, type=DFlashSGLangDrafter, avail mem=47.90 GB, mem usage=2.96 GB.",
             "KV Cache is allocated. dtype: torch.bfloat16, #tokens: 200000, KV size: 4.00 GB",
             "Capture target verify CUDA graph end. elapsed=12.50 s, mem usage=1.20 GB, avail mem=40.00 GB.",
             "Capture draft verify CUDA graph end. elapsed=3.10 s, mem usage=0.40 GB, avail mem=39.60 GB.",
             "max_total_num_tokens=200000, chunked_prefill_size=8192, max_running_requests=48, "
             "available_gpu_mem=39.50 GB",
             "dflash_sglang: step timing on (CUDA events, read lazily), one line per batch size every 32 steps"]
    if tree:
        budget, topk = tree
        lines.append(f"dflash_sglang: tree mode, {budget} draft nodes (top-{topk} per position) verified in one pass "
                     f"of {budget + 1} tokens")
    return lines + [format_line(*t) for t in timing]


def write_stage(out: Path, name: str, log: list[str] | None, client: dict | None, status: str = "ok", **record):
    if log is not None:
        (out / f"{name}.log").write_text("\n".join(PREFIX + line for line in log))
    if client is not None:
        (out / f"{name}.json").write_text(json.dumps(client))
    (out / f"{name}.stage.json").write_text(json.dumps({"status": status, "startup_s": 90, **record}))


def test_gemma_summary_reads_memory_timing_and_the_bound(tmp_path):
    """No run.json (a run killed before it): every stage listed, the Gemma bound at the published tau."""
    ours = ours_lines((1, [32, 320.0, 640.0, 32.0, 992.0]),  # warm-up window: dropped
                      (1, [32, 64.0, 480.0, 16.0, 560.0]),
                      (1, [16, 32.0, 240.0, 8.0, 280.0]),
                      (2, [4, 8.0, 80.0, 4.0, 92.0]))  # not batch size 1: ignored
    write_stage(tmp_path, "ar", GEMMA_STARTUP, {"ms_per_token": 15.0})
    write_stage(tmp_path, "b16", GEMMA_STARTUP + ours, {"ms_per_token": 20.0, "ms_per_step": 20.0})

    summary = shape.summarize(tmp_path)
    stages = summary["stages"]
    assert summary["shape"] == "gemma-4-31b" and summary["bars"] is None and list(stages) == list(shape.STAGES)
    b16 = stages["b16"]
    assert b16["memory"]["weights_gb"] == {"target": 58.30, "draft": 2.96}
    assert b16["memory"]["kv_total_gb"] == 34.0 and b16["memory"]["graph_gb"] == {"target": 1.2, "draft": 0.4}
    assert b16["memory"]["available_after_startup_gb"] == 39.5 and stages["ar"]["memory"]["kv_total_gb"] == 30.0
    assert b16["served_by_ours"] and b16["step_timing_on"] and b16["tree_mode_seen"] is None
    assert b16["step_timing"] == {"lines": 2, "steps": 48, "draft_ms": 2.0, "verify_ms": 15.0, "rest_ms": 0.5,
                                  "step_ms": 17.5}
    assert b16["step_ratio_gpu"] == pytest.approx(17.5 / 15.0) and b16["step_ratio_e2e"] == pytest.approx(20 / 15)
    assert b16["break_even_tau_gpu"] == pytest.approx(17.0 / 15.0) and "bar" not in b16
    assert b16["bounds"]["math500"]["gpu"] == pytest.approx(8.59 * 15.0 / 17.0)
    assert b16["bounds"]["math500"]["e2e"] == pytest.approx(8.59 * 15.0 / 20.0)
    assert stages["b32"]["status"] == "not run" and stages["t32"]["status"] == "not run"
    assert shape.bar_lines(summary) == [] and shape.bound_lines(summary)[0].startswith("bound at B=16, math500")


def qwen_run(out: Path, stages=("ar", "b16", "t32", "t64")) -> None:
    (out / "run.json").write_text(json.dumps({"started_utc": "2026-11-30T10:00:00+00:00", "shape": "qwen3-32b",
                                              "stages": list(stages), "draft_backend": "fa4", "prompts": 4,
                                              "max_tokens": 128, "mem_fraction_static": 0.8, "tree_topk": 4}))
    write_stage(out, "ar", QWEN_STARTUP, {"ms_per_token": 20.0})
    chain = ours_lines((1, [32, 99.0, 99.0, 99.0, 999.0]), (1, [64, 128.0, 1216.0, 64.0, 1408.0]))  # 22 ms step
    write_stage(out, "b16", QWEN_STARTUP + chain, {"ms_per_token": 23.0, "ms_per_step": 23.5,
                                                   "accept_length": 1.02})
    tree = ours_lines((1, [32, 1.0, 1.0, 1.0, 3.0]), (1, [32, 96.0, 640.0, 32.0, 768.0]), tree=(32, 4))  # 24 ms
    write_stage(out, "t32", QWEN_STARTUP + tree, {"ms_per_token": 26.0, "ms_per_step": 25.0, "accept_length": 1.1})
    write_stage(out, "t64", None, None, status="skipped", reason="time: 80s left")


def test_qwen_summary_sets_each_step_against_the_ar_step_and_issue_8s_bars(tmp_path):
    qwen_run(tmp_path)
    summary = shape.summarize(tmp_path)
    stages = summary["stages"]
    assert summary["shape"] == "qwen3-32b" and summary["published_tau_b16"] == {}
    assert summary["bars"] == {"source": "issue 8", "chain": 1.10, "tree": 1.20, "tree_max_budget": 64}
    assert list(stages) == ["ar", "b16", "t32", "t64"]  # only what the run asked for
    b16, t32, t64 = stages["b16"], stages["t32"], stages["t64"]
    assert (b16["mode"], b16["block"], b16["tree_budget"]) == ("chain", 16, None)
    assert (t32["mode"], t32["block"], t32["tree_budget"], t32["tree_topk"]) == ("tree", 16, 32, 4)
    assert t32["tree_mode_seen"] == {"budget": 32, "topk": 4} and t32["step_timing"]["step_ms"] == 24.0
    assert b16["step_ratio_gpu"] == pytest.approx(22.0 / 20.0) and b16["bar"] == 1.10 and b16["bar_met_gpu"]
    assert b16["step_ratio_e2e"] == pytest.approx(23.5 / 20.0) and not b16["bar_met_e2e"]
    assert t32["step_ratio_gpu"] == pytest.approx(1.2) and t32["bar"] == 1.20 and t32["bar_met_gpu"]
    assert t32["step_ratio_e2e"] == pytest.approx(1.25) and not t32["bar_met_e2e"]
    assert "bounds" not in b16 and shape.bound_lines(summary) == []
    assert t64["status"] == "skipped" and t64["bar"] == 1.20 and "step_ratio_gpu" not in t64

    lines = shape.bar_lines(summary)
    assert lines[0].startswith("qwen3-32b bars (issue 8): chain step <= 1.10x") and "t_AR = AR ms/token at c1 = 20.00"
    assert lines[1] == ("  b16 (chain B=16): GPU step 22.00 ms / 20.00 = 1.100x [met]; end-to-end step 23.50 ms / "
                        "20.00 = 1.175x [NOT met]; bar <= 1.10x")
    assert lines[2].startswith("  t32 (tree N=32 top-4 B=16): GPU step 24.00 ms / 20.00 = 1.200x [met]")
    assert lines[3] == "  t64 (tree N=64 top-4 B=16): not measured (skipped)"
    assert shape.warnings(summary) == []
    rows = shape.table_rows(summary)
    assert rows[0][-3:] == ("step/AR (GPU)", "step/AR (e2e)", "bar")
    assert rows[3][:2] == ("t32", "tree N=32 top-4 B=16") and rows[3][-3:] == ("1.200", "1.250", "<= 1.20x")


def test_summary_warns_when_a_tree_stage_was_not_served_as_a_tree(tmp_path):
    qwen_run(tmp_path)
    chain_log = QWEN_STARTUP + ours_lines((1, [32, 96.0, 640.0, 32.0, 768.0]))  # no tree-mode line
    write_stage(tmp_path, "t32", chain_log, {"ms_per_token": 26.0, "ms_per_step": 25.0})
    write_stage(tmp_path, "b16", QWEN_STARTUP, {"ms_per_token": 23.0, "ms_per_step": 23.5})  # builtin served it
    assert shape.warnings(shape.summarize(tmp_path)) == [
        "warning: b16 served but our worker line is missing from b16.log",
        "warning: t32 asked for tree mode {'budget': 32, 'topk': 4}, its log says None"]


def test_no_ratio_without_a_measured_ar_stage(tmp_path):
    qwen_run(tmp_path)
    write_stage(tmp_path, "ar", QWEN_STARTUP, None, status="failed", reason="server exited")
    summary = shape.summarize(tmp_path)
    assert all("step_ratio_gpu" not in s and "step_ratio_e2e" not in s for s in summary["stages"].values())
    assert shape.bar_lines(summary)[1] == "  b16 (chain B=16): not measured (ok, no AR reference)"


def test_the_tree_bar_holds_up_to_64_nodes_only():
    assert shape.stage_bar({"mode": "tree", "tree_budget": 64}, "qwen3-32b") == 1.20
    assert shape.stage_bar({"mode": "tree", "tree_budget": 65}, "qwen3-32b") is None
    assert shape.stage_bar({"mode": "chain", "tree_budget": None}, "qwen3-32b") == 1.10
    assert shape.stage_bar({"mode": "chain", "tree_budget": None}, "gemma-4-31b") is None


@pytest.mark.parametrize("visible, index", [(None, "0"), ("", "0"), ("3", "3"), ("2,0", "2"), (" 1 , 0", "1"),
                                            ("GPU-8f3c2a", "GPU-8f3c2a")])
def test_nvidia_smi_is_asked_about_the_first_visible_gpu(visible, index):
    environ = {} if visible is None else {"CUDA_VISIBLE_DEVICES": visible}
    assert shape.visible_gpu(environ) == index


def test_report_renders_the_bars_and_merges_runs(tmp_path):
    report = load("shape_report", REPO / "scripts" / "shape_report.py")
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    qwen_run(first)
    qwen_run(second, stages=("ar", "t64"))
    tree = ours_lines((1, [32, 1.0, 1.0, 1.0, 3.0]), (1, [32, 112.0, 704.0, 32.0, 832.0]), tree=(64, 4))  # 26 ms
    write_stage(second, "t64", QWEN_STARTUP + tree, {"ms_per_token": 28.0, "ms_per_step": 27.0})
    summaries = [shape.summarize(first), shape.summarize(second)]
    summaries[1]["run"]["started_utc"] = "2026-11-30T11:00:00+00:00"
    merged = report.merge(summaries)
    assert list(merged["stages"]) == ["ar", "b16", "t32", "t64"] and merged["stages"]["t64"]["status"] == "ok"
    assert merged["stages"]["t64"]["step_ratio_gpu"] == pytest.approx(1.3) and not merged["stages"]["t64"][
        "bar_met_gpu"]
    text = report.render(merged)
    assert text.startswith("# Qwen3-32B shape under dflash_sglang")
    assert '--shape qwen3-32b --stages "ar b16 t32 t64"`, merged from 2 runs' in text
    assert "| t32 | tree N=32 top-4 B=16 | ok |" in text and "| **1.200x** | **1.250x** (over) | <= 1.20x |" in text
    assert "**1.300x** (over)" in text and "## Step cost against the bars of issue 8" in text
    assert "published acceptance length" not in text

    with pytest.raises(ValueError, match="different shapes"):
        report.merge([summaries[0], dict(summaries[1], shape="gemma-4-31b")])

    (first / "summary.json").write_text(json.dumps(summaries[0]))
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "shape_report.py"), str(first / "summary.json"),
                          "--out-dir", str(tmp_path / "docs")], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == str(tmp_path / "docs" / "qwen3-32b-shape-2026-11-30.md")
    assert (tmp_path / "docs" / "qwen3-32b-shape-2026-11-30.json").exists()


# ------------------------------------------------------------------------------------------- the script on CPU

# A stand-in for `python -m sglang.launch_server`: logs what SGLang and our worker would (memory lines, our worker,
# tree mode from its flags, step timing lines: 20 ms + 1 ms per 16 verify tokens), answers /health, /v1/models and
# a streaming /generate of exactly max_new_tokens tokens.
FAKE_SERVER = r'''
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
sys.path.insert(0, os.environ["DFLASH_REPO"])
from dflash_sglang.sglang.step_timing import format_line

argv = sys.argv[1:]
print("argv " + " ".join(argv))
print("env DFLASH_SGLANG_STEP_TIMING=%s CUDA_VISIBLE_DEVICES=%s" % (
    os.environ.get("DFLASH_SGLANG_STEP_TIMING"), os.environ.get("CUDA_VISIBLE_DEVICES")))
port = int(argv[argv.index("--port") + 1])
spec = "--speculative-algorithm" in argv
print("Load weight end. elapsed=0.29 s, type=Qwen3ForCausalLM, avail mem=75.10 GB, mem usage=65.53 GB.")
if spec:
    print("dflash_sglang: DFLASH is served by dflash_sglang.sglang.worker.DFlashWorker")
    if os.environ.get("DFLASH_SGLANG_STEP_TIMING") == "1":
        print("dflash_sglang: step timing on (CUDA events, read lazily), one line per batch size every 32 steps")
    if "--speculative-dflash-tree-budget" in argv:
        n = int(argv[argv.index("--speculative-dflash-tree-budget") + 1])
        k = int(argv[argv.index("--speculative-dflash-topk") + 1])
        print("dflash_sglang: tree mode, %d draft nodes (top-%d per position) verified in one pass of %d tokens"
              % (n, k, n + 1))
        width = n + 1
    else:
        width = int(argv[argv.index("--speculative-num-draft-tokens") + 1])
    step = 20.0 + width / 16
    for _ in range(3):
        print(format_line(1, [32, 32 * 2.0, 32 * (step - 2.5), 32 * 0.5, 32 * step]))
else:
    width = 1
sys.stdout.flush()


class Handler(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/start_profile":  # a trace of one step: a graph replay whose kernel takes 100 us per row
            rows = width if spec else 1
            events = [{"ph": "X", "name": "scheduler.run_batch", "ts": 0, "dur": 900, "cat": "user_annotation",
                       "pid": 1, "tid": 1},
                      {"ph": "X", "name": "cudaGraphLaunch", "ts": 500, "dur": 5, "cat": "cuda_runtime", "pid": 1,
                       "tid": 1, "args": {"correlation": 1}},
                      {"ph": "X", "name": "gemm", "ts": 600, "dur": 100 * rows, "cat": "kernel", "pid": 0, "tid": 7,
                       "args": {"correlation": 1}}]
            if spec:
                events.append({"ph": "X", "name": "dflash_sglang.decode", "ts": 100, "dur": 700,
                               "cat": "user_annotation", "pid": 1, "tid": 1})
            with open(os.path.join(body["output_dir"], "trace.json"), "w") as f:
                json.dump({"traceEvents": events}, f)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"{}")
            return
        print("prompt %s" % (len(body["input_ids"]) if "input_ids" in body else "text"), flush=True)
        n = body["sampling_params"]["max_new_tokens"]
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for done in range(1, n + 1):
            time.sleep(0.002)
            meta = {"completion_tokens": done}
            if spec:
                meta["spec_verify_ct"] = done
            self.wfile.write(("data: %s\n\n" % json.dumps({"text": "x", "meta_info": meta})).encode())
        self.wfile.write(b"data: [DONE]\n\n")

    def log_message(self, *args):
        pass


ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''

# nvidia-smi: records its arguments, answers for one GPU (1000 MiB in use).
FAKE_NVIDIA_SMI = r'''#!/usr/bin/env bash
echo "$*" >> "$NVIDIA_SMI_CALLS"
case "$*" in
  *name*) echo "NVIDIA H200, 1000, 143771" ;;
  *) echo "1000" ;;
esac
'''


@pytest.mark.slow
def test_shape_sh_serves_the_qwen3_32b_stages_in_order_on_the_given_port_and_gpu(tmp_path):
    fake = tmp_path / "fake"
    (fake / "sglang").mkdir(parents=True)
    (fake / "sglang" / "__init__.py").write_text('__version__ = "0.5.16"\n')
    (fake / "sglang" / "launch_server.py").write_text(FAKE_SERVER)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    calls, out = tmp_path / "smi-calls.txt", tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHONPATH": str(fake), "DFLASH_REPO": str(REPO),
           "NVIDIA_SMI_CALLS": str(calls), "CUDA_VISIBLE_DEVICES": "3,1",
           "PATH": f"{bin_dir}:{Path(sys.executable).parent}:{os.environ['PATH']}"}
    cmd = ["bash", str(REPO / "scripts" / "device" / "shape.sh"), "--shape", "qwen3-32b", "--port", "30217",
           "--prompts", "2", "--prompt-tokens", "40", "--max-tokens", "12", "--draft-backend", "triton",
           "--stages", "ar b16 t16 t64 t63fp8 b8fp8 b16fp8sk b16fp8fhsk",
           "--profile"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = out / "shape-qwen3-32b"
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["shape"] == "qwen3-32b" and summary["run"]["port"] == 30217
    stages = ["ar", "b16", "t16", "t64", "t63fp8", "b8fp8", "b16fp8sk", "b16fp8fhsk"]
    assert summary["run"]["stages"] == stages and summary["run"]["gpu"]["index"] == "3"
    assert list(summary["stages"]) == ["ar", "b16", "b8fp8", "b16fp8sk", "t16", "t64", "t63fp8",
                                       "b16fp8fhsk"]  # shape.py's order
    assert summary["run"]["prompt_tokens"] == 40
    assert all(s["status"] == "ok" for s in summary["stages"].values()), summary["stages"]
    assert summary["stages"]["t64"]["tree_mode_seen"] == {"budget": 64, "topk": 4}
    assert summary["stages"]["t64"]["step_timing"]["step_ms"] == pytest.approx(20.0 + 65 / 16, abs=1e-3)
    assert summary["stages"]["b16"]["step_timing"]["step_ms"] == pytest.approx(21.0)
    assert all("step_ratio_gpu" in s and "bar" in s for n, s in summary["stages"].items() if n != "ar")

    def argv(name):
        line = next(x for x in (folder / f"{name}.log").read_text().splitlines() if x.startswith("argv "))
        return line.split()[1:]

    for name in ("ar", "b16", "t16", "t64"):
        args = argv(name)
        assert args[args.index("--port") + 1] == "30217" and "--mm-attention-backend" not in args
        assert args[args.index("--attention-backend") + 1] == "triton"
    assert "--speculative-algorithm" not in argv("ar")
    b16 = argv("b16")
    assert b16[b16.index("--speculative-num-draft-tokens") + 1] == "16"
    assert "--speculative-dflash-tree-budget" not in b16
    # --profile: each stage's step, its kernels' GPU time (the fake's: 100 us per verify row).
    for name, rows in (("ar", 1), ("b16", 16), ("t16", 17), ("t64", 65), ("t63fp8", 64), ("b8fp8", 8)):
        profile = summary["stages"][name]["profile"]
        assert profile["steps"] == 1 and profile["gpu_kernel_us_per_step"] == 100 * rows, name
    assert "--speculative-draft-model-quantization" not in argv("t64")
    for name in ("t63fp8", "b8fp8", "b16fp8sk", "b16fp8fhsk"):
        args = argv(name)
        assert args[args.index("--speculative-draft-model-quantization") + 1] == "fp8"
    # Only the sk stages ask for the split-KV verify, only the fh one for the FP8 head; every stage's requests are
    # the 40-token prompts.
    assert [name for name in stages if "--speculative-dflash-verify-splitkv" in argv(name)] == ["b16fp8sk",
                                                                                              "b16fp8fhsk"]
    assert [name for name in stages if "--no-speculative-dflash-verify-splitkv" in argv(name)] == [
        name for name in stages if name != "ar" and not name.endswith("sk")]
    assert [name for name in stages if "--speculative-dflash-draft-head-fp8" in argv(name)] == ["b16fp8fhsk"]
    assert shape.mode_label(summary["stages"]["b16fp8fhsk"]) == "chain B=16, fp8 drafter, fp8 head, split-KV verify"
    sk = argv("b16fp8sk")
    assert sk[sk.index("--speculative-num-draft-tokens") + 1] == "16" and sk[sk.index("--context-length") + 1] == "8192"
    assert summary["stages"]["b16fp8sk"]["verify_splitkv"] is True
    for name in stages:
        prompts = [x for x in (folder / f"{name}.log").read_text().splitlines() if x.startswith("prompt ")]
        # The warm-up, then the long prompts (then the profiler's own requests).
        assert prompts[:3] == ["prompt text"] + ["prompt 40"] * 2, name
    b8 = argv("b8fp8")
    assert b8[b8.index("--speculative-num-draft-tokens") + 1] == "8"
    assert b8[b8.index("--speculative-draft-model-path") + 1].endswith("/drafter-b8")
    assert summary["stages"]["t63fp8"]["tree_mode_seen"] == {"budget": 63, "topk": 4}
    for name, budget in (("t16", "16"), ("t64", "64"), ("t63fp8", "63")):
        args = argv(name)
        assert args[args.index("--speculative-dflash-tree-budget") + 1] == budget
        assert args[args.index("--speculative-dflash-topk") + 1] == "4"
        assert "--speculative-num-draft-tokens" not in args  # the plugin sets it to N + 1
        assert args[args.index("--speculative-draft-model-path") + 1].endswith("/drafter-b16")
    target = json.loads((folder / "configs" / "target.json").read_text())
    assert target["architectures"] == ["Qwen3ForCausalLM"] and target["num_hidden_layers"] == 64

    # nvidia-smi was asked about GPU 3 only: CUDA_VISIBLE_DEVICES' first entry.
    smi = calls.read_text().splitlines()
    assert smi and all(line.startswith("-i 3 ") for line in smi)
    assert "qwen3-32b bars (issue 8)" in run.stdout and "  t64 (tree N=64 top-4 B=16): GPU step" in run.stdout
    assert "qwen3-32b shape, bf16, dummy weights" in run.stdout and "GPU 3, port 30217" in run.stdout


def test_shape_sh_refuses_bad_arguments(tmp_path):
    script = str(REPO / "scripts" / "device" / "shape.sh")
    env = {**os.environ, "OUT": str(tmp_path)}
    for args, message in ((["--shape", "llama-70b"], "--shape must be gemma-4-31b or qwen3-32b"),
                          (["--stages", "ar t48"], f"--stages takes {' '.join(shape.STAGES)}, got t48"),
                          (["--stages", "ar b16 ar"], "--stages lists ar twice"),
                          (["--port", "x"], "--port must be a number"),
                          (["--prompt-tokens", "4k"], "--prompt-tokens must be a number")):
        run = subprocess.run(["bash", script, "--draft-backend", "triton", *args], env=env, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr)
    assert not list(tmp_path.iterdir())  # refused before anything was written


def test_report_sets_each_profiled_step_against_ar_kernel_by_kernel(tmp_path):
    report = load("shape_report", REPO / "scripts" / "shape_report.py")
    qwen_run(tmp_path, stages=("ar", "b16"))

    def profile(steps, kernels):
        return {"steps": steps, "gpu_kernel_us_per_step": sum(us for _, us in kernels),
                "top_kernels_by_gpu_time": [{"kernel": k, "runs_per_step": 64.0, "us_per_step": us}
                                            for k, us in kernels]}

    # profile_step.py's summaries: AR's decode graph steps under scheduler_graph_step, ours at the top level.
    (tmp_path / "ar.profile.json").write_text(json.dumps({"steps": 0, "scheduler_step": profile(12, []),
                                                          "scheduler_graph_step": profile(11, [("gemv", 17000.0)])}))
    (tmp_path / "b16.profile.json").write_text(json.dumps({**profile(12, [("gemm", 17500.0), ("attn", 900.0)]),
                                                           "scheduler_graph_step": profile(12, [])}))
    summary = shape.summarize(tmp_path)
    assert summary["stages"]["ar"]["profile"]["steps"] == 11
    assert summary["stages"]["b16"]["profile"]["gpu_kernel_us_per_step"] == 18400.0
    lines = report.render(summary).splitlines()
    assert "## GPU time of one decode step by kernel (`shape.sh --profile`)" in lines
    assert "- **ar** (AR): 17.000 ms of kernels per step, 11 steps:" in lines
    assert f"- **b16** (chain B=16): 18.400 ms of kernels per step, {18400 / 17000:.3f}x AR's, 12 steps:" in lines
    assert "  - `attn`: 900.0 us, 64.0 runs" in lines
    # An AR trace that recorded no kernels gives no ratio rather than a division by zero.
    summary["stages"]["ar"]["profile"] = {**summary["stages"]["ar"]["profile"], "gpu_kernel_us_per_step": 0,
                                          "top_kernels_by_gpu_time": []}
    assert "- **b16** (chain B=16): 18.400 ms of kernels per step, 12 steps:" in report.render(summary).splitlines()


def test_shape_sh_reads_the_stages_and_their_flags_from_the_one_table():
    """shape_stages.py, stdlib only, as shape.sh calls it: every stage name in shape.py's order, and a DFLASH
    stage's mode, size and suffix flags; ar and unknown names are refused."""
    def cli(*args):
        return subprocess.run([sys.executable, str(REPO / "scripts" / "device" / "shape_stages.py"), *args],
                              capture_output=True, text=True, timeout=60, env={"PATH": os.environ["PATH"]})

    assert cli("names").stdout.split() == list(shape.STAGES)
    assert cli("flags", "b16").stdout.splitlines() == ["chain 16", "--no-speculative-dflash-verify-splitkv"]
    assert cli("flags", "t31fp8fhsk").stdout.splitlines() == [
        "tree 31", "--speculative-dflash-topk 4 --speculative-dflash-verify-splitkv "
        "--speculative-dflash-draft-head-fp8 --speculative-draft-model-quantization fp8"]
    for bad in (("flags", "ar"), ("flags", "t48"), ("stages",)):
        run = cli(*bad)
        assert run.returncode == 2 and "usage: shape_stages.py" in run.stderr


def test_the_fp8_drafter_stage_is_a_chain_step_held_to_the_chain_bar(tmp_path):
    qwen_run(tmp_path, stages=("ar", "b16", "b16fp8"))
    chain = ours_lines((1, [32, 99.0, 99.0, 99.0, 999.0]), (1, [64, 64.0, 1216.0, 64.0, 1344.0]))  # 21 ms step
    write_stage(tmp_path, "b16fp8", QWEN_STARTUP + chain, {"ms_per_token": 22.0, "ms_per_step": 22.0})
    summary = shape.summarize(tmp_path)
    fp8 = summary["stages"]["b16fp8"]
    assert (fp8["mode"], fp8["block"], fp8["draft_quantization"]) == ("chain", 16, "fp8")
    assert fp8["bar"] == 1.10 and fp8["step_ratio_gpu"] == pytest.approx(21.0 / 20.0) and fp8["bar_met_gpu"]
    assert "draft_quantization" not in summary["stages"]["b16"]
    assert shape.mode_label(fp8) == "chain B=16, fp8 drafter"
    assert any(line.startswith("  b16fp8 (chain B=16, fp8 drafter): GPU step 21.00 ms") for line in
               shape.bar_lines(summary))


def test_long_prompts_are_distinct_token_ids_inside_every_shapes_vocabulary():
    prompts = [shape.long_prompt(i, 4096) for i in range(4)]
    assert all(len(p) == 4096 for p in prompts)
    assert len({tuple(p) for p in prompts}) == 4 and len({p[0] for p in prompts}) == 4  # no shared prefix
    assert min(min(p) for p in prompts) >= 1000 and max(max(p) for p in prompts) < 31000


def test_a_stage_name_is_read_by_one_rule():
    assert shape_stages.stage_from_name("t31fp8fhsk") == {
        "mode": "tree", "block": shape_stages.TREE_BLOCK, "tree_budget": 31, "draft_quantization": "fp8",
        "draft_head": "fp8", "verify_splitkv": True}
    assert shape_stages.stage_from_name("b32") == {"mode": "chain", "block": 32, "tree_budget": None}
    for name in ("b16skfp8", "x16", "b", "t31fh8", "arsk"):
        with pytest.raises(ValueError, match=f"stage '{name}': not ar, bN or tN"):
            shape_stages.stage_from_name(name)


def test_the_split_kv_stage_is_a_chain_step_labelled_as_such():
    assert shape.mode_label(shape.STAGES["b16fp8sk"]) == "chain B=16, fp8 drafter, split-KV verify"
    assert shape.mode_label(shape.STAGES["b16sk"]) == "chain B=16, split-KV verify"
