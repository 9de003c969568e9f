"""scripts/device/profile_step.py's trace summary on a synthetic chrome trace."""

import gzip
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "device" / "profile_step.py"
spec = importlib.util.spec_from_file_location("profile_step", SCRIPT)
profile_step = importlib.util.module_from_spec(spec)
spec.loader.exec_module(profile_step)


def event(name, ts, dur, cat, tid=1, pid=7):
    return {"ph": "X", "name": name, "ts": ts, "dur": dur, "cat": cat, "pid": pid, "tid": tid}


def launch(ts, correlation, tid=1):
    return {**event("cudaLaunchKernel", ts, 2, "cuda_runtime", tid=tid), "args": {"correlation": correlation}}


def kernel(name, ts, correlation):
    return {**event(name, ts, 3, "kernel", tid=7, pid=0), "args": {"correlation": correlation}}


def test_counts_only_what_happens_inside_the_decode_ranges(tmp_path):
    events = [
        event("dflash_sglang.decode", 100, 50, "user_annotation"),
        launch(110, 1),
        launch(120, 2),
        kernel("argmax_kernel", 140, 1),
        kernel("cat_kernel", 145, 2),
        event("cudaGraphLaunch", 130, 5, "cuda_runtime"),
        event("aten::argmax", 112, 6, "cpu_op"),
        event("dflash_sglang.decode", 300, 30, "user_annotation"),
        launch(305, 3),
        kernel("argmax_kernel", 340, 3),
        event("cudaStreamSynchronize", 310, 9, "cuda_runtime"),
        event("cudaMemcpyAsync", 320, 1, "cuda_runtime"),
        event("cudaStreamSynchronize", 200, 9, "cuda_runtime"),  # between steps: the scheduler's, not ours
        launch(115, 4, tid=2),  # another thread
        kernel("other_kernel", 150, 4),
        # The GPU copies of the two ranges (torch's profiler with CUDA activities): not steps of their own.
        event("dflash_sglang.decode", 140, 12, "gpu_user_annotation", tid=7, pid=0),
        event("dflash_sglang.decode", 330, 20, "gpu_user_annotation", tid=7, pid=0),
    ]
    path = tmp_path / "trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    summary = profile_step.summarize(profile_step.load_events(path))
    assert summary["steps"] == 2
    assert summary["kernel_launches_per_step"] == 1.5
    assert summary["graph_launches_per_step"] == 0.5
    assert summary["host_syncs_per_step"] == 0.5 and summary["host_syncs"] == {"cudaStreamSynchronize": 1}
    assert summary["copies_per_step"] == 0.5
    assert summary["host_ms_per_step_mean"] == 0.04
    assert summary["gpu_span_ms_per_step_median"] == 0.02
    assert summary["top_ops_by_host_time"] == [{"op": "aten::argmax", "calls_per_step": 0.5, "us_per_step": 3.0}]
    assert summary["top_kernels_by_launches"] == [{"kernel": "argmax_kernel", "launches_per_step": 1.0},
                                                  {"kernel": "cat_kernel", "launches_per_step": 0.5}]
    # Runtime calls by host time: the two synchronizations inside the steps, not the one between them.
    assert summary["top_runtime_by_host_time"][0] == {"call": "cudaStreamSynchronize", "calls_per_step": 0.5,
                                                      "us_per_step": 4.5, "max_us": 9}
    launches = next(c for c in summary["top_runtime_by_host_time"] if c["call"] == "cudaLaunchKernel")
    assert (launches["calls_per_step"], launches["us_per_step"], launches["max_us"]) == (1.5, 3.0, 2)
    # GPU time per kernel: the three launched kernels (3 us each); the other thread's is not the step's.
    assert summary["gpu_kernel_us_per_step"] == 4.5
    assert summary["top_kernels_by_gpu_time"] == [{"kernel": "argmax_kernel", "runs_per_step": 1.0, "us_per_step": 3.0},
                                                  {"kernel": "cat_kernel", "runs_per_step": 0.5, "us_per_step": 1.5}]


def test_scheduler_steps_are_summarized_for_any_server(tmp_path):
    """SGLang's scheduler.run_batch ranges: present in every server's trace (AR and the builtin have no decode
    range of ours); a decode range nests inside one."""
    events = [
        event("scheduler.run_batch", 90, 80, "user_annotation"),
        event("dflash_sglang.decode", 100, 50, "user_annotation"),
        event("cudaLaunchKernel", 95, 2, "cuda_runtime"),
        event("cudaLaunchKernel", 110, 2, "cuda_runtime"),
        event("cudaGraphLaunch", 160, 5, "cuda_runtime"),
        event("scheduler.run_batch", 300, 20, "user_annotation"),
        event("cudaGraphLaunch", 305, 5, "cuda_runtime"),
        event("scheduler.run_batch", 150, 30, "gpu_user_annotation", tid=7, pid=0),
    ]
    scheduler = profile_step.summarize(events, profile_step.SCHEDULER_RANGE)
    assert scheduler["steps"] == 2 and scheduler["host_ms_per_step_mean"] == 0.05
    assert scheduler["kernel_launches_per_step"] == 1.0 and scheduler["graph_launches_per_step"] == 1.0
    assert scheduler["gpu_span_ms_per_step_median"] == 0.03
    decode = profile_step.summarize(events)
    assert decode["steps"] == 1 and decode["kernel_launches_per_step"] == 1.0 and decode["graph_launches_per_step"] == 0


def test_graph_replays_count_their_kernels_gpu_time():
    """A cudaGraphLaunch's kernels carry its correlation id: they are the step's GPU time, not launches."""
    graph = {**event("cudaGraphLaunch", 105, 4, "cuda_runtime"), "args": {"correlation": 9}}
    events = [
        event("dflash_sglang.decode", 100, 50, "user_annotation"),
        graph,
        launch(120, 10),
        {**event("gemm", 200, 40, "kernel", tid=7, pid=0), "args": {"correlation": 9}},
        {**event("gemm", 240, 40, "kernel", tid=7, pid=0), "args": {"correlation": 9}},
        {**event("attention", 280, 20, "kernel", tid=7, pid=0), "args": {"correlation": 9}},
        kernel("argmax_kernel", 300, 10),
    ]
    summary = profile_step.summarize(events)
    assert summary["kernel_launches_per_step"] == 1.0 and summary["graph_launches_per_step"] == 1.0
    assert summary["gpu_kernel_us_per_step"] == 103
    assert summary["top_kernels_by_gpu_time"] == [{"kernel": "gemm", "runs_per_step": 2.0, "us_per_step": 80.0},
                                                  {"kernel": "attention", "runs_per_step": 1.0, "us_per_step": 20.0},
                                                  {"kernel": "argmax_kernel", "runs_per_step": 1.0, "us_per_step": 3.0}]
    assert summary["top_kernels_by_launches"] == [{"kernel": "argmax_kernel", "launches_per_step": 1.0}]


def test_graph_steps_only_leaves_out_the_eager_prefill():
    events = [
        event("scheduler.run_batch", 0, 100, "user_annotation"),  # an eager prefill: kernel launches only
        launch(10, 1),
        kernel("prefill_kernel", 20, 1),
        event("scheduler.run_batch", 200, 50, "user_annotation"),  # a decode step: one graph replay
        {**event("cudaGraphLaunch", 210, 4, "cuda_runtime"), "args": {"correlation": 2}},
        {**event("decode_kernel", 220, 30, "kernel", tid=7, pid=0), "args": {"correlation": 2}},
    ]
    every = profile_step.summarize(events, profile_step.SCHEDULER_RANGE)
    decode = profile_step.summarize(events, profile_step.SCHEDULER_RANGE, graph_steps_only=True)
    assert every["steps"] == 2 and every["gpu_kernel_us_per_step"] == 16.5
    assert decode["steps"] == 1 and decode["gpu_kernel_us_per_step"] == 30
    assert [k["kernel"] for k in decode["top_kernels_by_gpu_time"]] == ["decode_kernel"]
