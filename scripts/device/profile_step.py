"""Profile our decode step inside a live SGLang server: the host-side work that CUDA graphs do not hide.

    python3 scripts/device/profile_step.py --port P --out DIR [--steps 40] [--concurrency 1] [--max-tokens 256]
    python3 scripts/device/profile_step.py --summarize DIR        # an existing trace folder

Starts SGLang's torch profiler (POST /start_profile: CPU + GPU activities, `num_steps` scheduler steps), drives
`concurrency` greedy requests through /generate while it records, waits for the trace, and reads the
`dflash_sglang.decode` ranges our worker marks (worker.DECODE_RANGE), and SGLang's own `scheduler.run_batch`
ranges, which every server has (plain decoding and the builtin DFLASH worker too), so the scheduler steps of all
contenders compare side by side. Per step: host time, CUDA kernel launches, CUDA graph replays, memory copies,
and host synchronizations (cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize / blocking
cudaMemcpy) inside the step -- a step that overlaps with the next one must have none; plus the host-heaviest
operators. Writes DIR/profile-summary.json (the decode ranges' figures at the top level, the scheduler steps'
under `scheduler_step`) and prints a table last.
Standard library only (the GPU box has no package registry).
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
import urllib.request
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

DECODE_RANGE = "dflash_sglang.decode"
SCHEDULER_RANGE = "scheduler.run_batch"  # SGLang's record_function span around each batch it runs
GPU_RANGE_CATEGORY = "gpu_user_annotation"
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy",
              "cuStreamSynchronize", "cuCtxSynchronize", "cuEventSynchronize")
KERNEL_LAUNCHES = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
GRAPH_LAUNCHES = ("cudaGraphLaunch", "cuGraphLaunch")
COPIES = ("cudaMemcpyAsync", "cudaMemsetAsync", "cuMemcpyAsync", "cuMemsetAsync")


def post(port: int, path: str, body: dict, timeout: float) -> dict:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        raw = response.read()
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return {"text": raw.decode(errors="replace")}


def trace_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and (p.name.endswith(".json.gz") or p.name.endswith(".json"))
                  and "summary" not in p.name)


def wait_for_trace(folder: Path, timeout: float) -> list[Path]:
    """Trace files once their sizes stop changing (the profiler writes them after its last step)."""
    deadline, last = time.time() + timeout, None
    while time.time() < deadline:
        sizes = [(p, p.stat().st_size) for p in trace_files(folder)]
        if sizes and sizes == last:
            return [p for p, _ in sizes]
        last = sizes
        time.sleep(3)
    return [p for p, _ in last or []]


def load_events(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def summarize(events: list[dict], range_name: str = DECODE_RANGE, graph_steps_only: bool = False) -> dict:
    """Per-step counts inside every `range_name` range (same host thread, nested in time); with `graph_steps_only`,
    only the ranges that replayed a CUDA graph (a scheduler's decode steps, not its eager prefills)."""
    complete = [e for e in events if e.get("ph") == "X" and "dur" in e]
    # With GPU activities on, each range is in the trace twice: on its host thread, and as a gpu_user_annotation
    # on the stream (pid = device, tid = stream) spanning the step's GPU work. The GPU copy holds no runtime calls,
    # so counting it as a step halved every per-step figure (and mixed GPU spans into the host times).
    ranges = [e for e in complete if e.get("name") == range_name]
    steps = [e for e in ranges if e.get("cat") != GPU_RANGE_CATEGORY]
    gpu_us = sorted(e["dur"] for e in ranges if e.get("cat") == GPU_RANGE_CATEGORY)
    # A launch's kernel: the GPU event with the same correlation id (what the launch ran, not who asked for it). A
    # graph replay's kernels all carry its cudaGraphLaunch's id.
    kernels_of = defaultdict(list)
    for e in complete:
        if e.get("cat") == "kernel" and "correlation" in e.get("args", {}):
            kernels_of[e["args"]["correlation"]].append((e["name"], e["dur"]))
    by_thread = defaultdict(list)
    for e in complete:
        if e.get("name") != range_name and e.get("cat") in ("cuda_runtime", "cuda_driver", "cpu_op"):
            by_thread[(e.get("pid"), e.get("tid"))].append(e)
    if graph_steps_only:
        steps = [step for step in steps if any(
            e["name"] in GRAPH_LAUNCHES and step["ts"] <= e["ts"] and e["ts"] + e["dur"] <= step["ts"] + step["dur"]
            for e in by_thread[(step.get("pid"), step.get("tid"))])]
    runtime, runtime_time, runtime_max, ops, op_time = Counter(), Counter(), Counter(), Counter(), Counter()
    kernels, kernel_runs, kernel_time = Counter(), Counter(), Counter()
    for step in steps:
        start, end = step["ts"], step["ts"] + step["dur"]
        for e in by_thread[(step.get("pid"), step.get("tid"))]:
            if start <= e["ts"] and e["ts"] + e["dur"] <= end:
                if e.get("cat") == "cpu_op":
                    ops[e["name"]] += 1
                    op_time[e["name"]] += e["dur"]
                else:
                    runtime[e["name"]] += 1
                    runtime_time[e["name"]] += e["dur"]
                    runtime_max[e["name"]] = max(runtime_max[e["name"]], e["dur"])
                    launched = kernels_of.get(e.get("args", {}).get("correlation"), [])
                    if e["name"] in KERNEL_LAUNCHES:
                        kernels[launched[-1][0] if launched else "(no kernel event)"] += 1
                    for name, dur in launched:
                        kernel_runs[name] += 1
                        kernel_time[name] += dur
    n = max(len(steps), 1)

    def per_step(names) -> float:
        return sum(runtime[name] for name in names) / n

    host_us = sorted(s["dur"] for s in steps)
    return {
        "steps": len(steps),
        "host_ms_per_step_mean": sum(host_us) / n / 1000,
        "host_ms_per_step_median": host_us[len(host_us) // 2] / 1000 if host_us else 0.0,
        # the ranges' GPU copies: from the step's first to its last GPU activity on the stream
        "gpu_span_ms_per_step_median": gpu_us[len(gpu_us) // 2] / 1000 if gpu_us else None,
        "kernel_launches_per_step": per_step(KERNEL_LAUNCHES),
        "graph_launches_per_step": per_step(GRAPH_LAUNCHES),
        "copies_per_step": per_step(COPIES),
        "host_syncs_per_step": per_step(SYNC_CALLS),
        "host_syncs": {name: runtime[name] for name in SYNC_CALLS if runtime[name]},
        "top_ops_by_host_time": [
            {"op": name, "calls_per_step": ops[name] / n, "us_per_step": op_time[name] / n}
            for name, _ in op_time.most_common(15)
        ],
        # A runtime call that waits (a launch behind a full queue, a copy into pageable memory) shows here as
        # host time far above its few microseconds, where the operator table only shows its caller.
        "top_runtime_by_host_time": [
            {"call": name, "calls_per_step": runtime[name] / n, "us_per_step": runtime_time[name] / n,
             "max_us": runtime_max[name]}
            for name, _ in runtime_time.most_common(10)
        ],
        # GPU time of what the step launched, graph replays included: where a step's GPU time goes.
        "gpu_kernel_us_per_step": sum(kernel_time.values()) / n,
        "top_kernels_by_gpu_time": [
            {"kernel": name[:120], "runs_per_step": kernel_runs[name] / n, "us_per_step": kernel_time[name] / n}
            for name, _ in kernel_time.most_common(25)
        ],
        "top_kernels_by_launches": [
            {"kernel": name[:120], "launches_per_step": count / n} for name, count in kernels.most_common(25)
        ],
    }


def drive(port: int, concurrency: int, max_tokens: int, timeout: float) -> None:
    prompts = [f"{i}. Explain, step by step, how a compiler turns source code into machine code." for i in
               range(concurrency)]
    body = {"sampling_params": {"max_new_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}}
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(lambda p: post(port, "/generate", {"text": p, **body}, timeout), prompts))


def print_table(summary: dict, title: str) -> None:
    print(title)
    rows = [("steps profiled", summary["steps"]),
            ("host ms / step (mean, median)",
             f"{summary['host_ms_per_step_mean']:.3f}, {summary['host_ms_per_step_median']:.3f}"),
            ("GPU span ms / step (median)", "-" if summary["gpu_span_ms_per_step_median"] is None
             else f"{summary['gpu_span_ms_per_step_median']:.3f}"),
            ("kernel launches / step", f"{summary['kernel_launches_per_step']:.1f}"),
            ("CUDA graph replays / step", f"{summary['graph_launches_per_step']:.1f}"),
            ("async copies+memsets / step", f"{summary['copies_per_step']:.1f}"),
            ("host syncs / step", f"{summary['host_syncs_per_step']:.2f} {summary['host_syncs'] or ''}")]
    for name, value in rows:
        print(f"{name:<32} {value}")
    print("top operators inside the step (inclusive host us / step, calls / step):")
    for op in summary["top_ops_by_host_time"][:10]:
        print(f"  {op['op'][:60]:<60} {op['us_per_step']:9.1f} {op['calls_per_step']:6.1f}")
    print("CUDA runtime calls inside the step (host us / step, calls / step, longest call us):")
    for call in summary["top_runtime_by_host_time"][:8]:
        print(f"  {call['call'][:60]:<60} {call['us_per_step']:9.1f} {call['calls_per_step']:6.1f} "
              f"{call['max_us']:9.1f}")
    print(f"GPU time of the kernels the step ran, graphs included ({summary['gpu_kernel_us_per_step']:.1f} us / step;"
          " us / step, runs / step):")
    for kernel in summary["top_kernels_by_gpu_time"][:12]:
        print(f"  {kernel['kernel'][:80]:<80} {kernel['us_per_step']:9.1f} {kernel['runs_per_step']:6.1f}")
    print("kernels launched inside the step (launches / step):")
    for kernel in summary["top_kernels_by_launches"][:15]:
        print(f"  {kernel['kernel'][:80]:<80} {kernel['launches_per_step']:6.1f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int)
    parser.add_argument("--out", help="folder for the trace and profile-summary.json")
    parser.add_argument("--summarize", help="summarize the traces already in this folder")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--timeout", type=float, default=180)
    args = parser.parse_args()
    if args.summarize:
        folder = Path(args.summarize)
        files = trace_files(folder)
    else:
        if args.port is None or args.out is None:
            parser.error("--port and --out are needed to record a profile")
        folder = Path(args.out).resolve()
        folder.mkdir(parents=True, exist_ok=True)
        drive(args.port, 1, 8, args.timeout)  # warm: graphs captured, first-use compilation done
        started = post(args.port, "/start_profile", {"output_dir": str(folder), "num_steps": args.steps,
                                                      "activities": ["CPU", "GPU"]}, args.timeout)
        print(f"start_profile: {started}", file=sys.stderr)
        drive(args.port, args.concurrency, args.max_tokens, args.timeout)
        files = wait_for_trace(folder, args.timeout)
    if not files:
        print(f"no trace found under {folder}", file=sys.stderr)
        return 1
    events = [e for path in files for e in load_events(path)]
    summary = {"traces": [str(p) for p in files], "concurrency": args.concurrency, **summarize(events),
               "scheduler_step": summarize(events, SCHEDULER_RANGE),
               "scheduler_graph_step": summarize(events, SCHEDULER_RANGE, graph_steps_only=True)}
    (folder / "profile-summary.json").write_text(json.dumps(summary, indent=1))
    if summary["steps"]:
        print_table(summary, f"== {DECODE_RANGE} (our worker's decode step)")
    print_table(summary["scheduler_step"], f"== {SCHEDULER_RANGE} (every server's scheduler step)")
    return 0 if summary["scheduler_step"]["steps"] else 1


if __name__ == "__main__":
    sys.exit(main())
