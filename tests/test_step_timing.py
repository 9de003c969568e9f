"""Step timing (dflash_sglang/sglang/step_timing.py) with fake CUDA events: lazy reads, per-batch-size lines,
the pending cap, the env switch, and the worker's decode step recording one start and three marks."""

from __future__ import annotations

import pytest

from dflash_sglang.sglang.step_timing import (
    ENV_EVERY,
    ENV_FLAG,
    NO_STEP,
    NoStepTimer,
    StepTimer,
    format_line,
    parse_line,
    parse_log,
    timer_from_env,
)

try:  # the decode-step harness of the plugin tests, reused (it needs sglang)
    from test_sglang_plugin import markov_worker, run_decode  # noqa: F401
except pytest.skip.Exception:
    markov_worker = run_decode = None


class FakeGPU:
    """A stream whose events complete only when the test says so; `now` is the GPU clock in ms."""

    def __init__(self):
        self.now = 0.0
        self.recorded = 0
        self.completed = 0
        self.created = 0

    def event(self):
        self.created += 1
        return FakeEvent(self)

    def finish_all(self):
        self.completed = self.recorded


class FakeEvent:
    def __init__(self, gpu: FakeGPU):
        self.gpu = gpu
        self.seq = None
        self.time = None

    def record(self):
        self.gpu.recorded += 1
        self.seq, self.time = self.gpu.recorded, self.gpu.now

    def query(self) -> bool:
        return self.seq is not None and self.seq <= self.gpu.completed

    def elapsed_time(self, end: FakeEvent) -> float:
        # As CUDA: reading a pair that has not completed is an error (it would need a sync).
        if not (self.query() and end.query()):
            raise RuntimeError("elapsed_time on an incomplete event")
        return end.time - self.time


def run_step(timer, gpu, batch_size, draft=2.0, verify=10.0, rest=0.5):
    step = timer.begin(batch_size)
    gpu.now += draft
    step.mark()
    gpu.now += verify
    step.mark()
    gpu.now += rest
    timer.end(step)
    gpu.now += 1.0  # host gap between steps: in no phase


def test_steps_are_read_only_after_their_last_event_completes():
    gpu, lines = FakeGPU(), []
    timer = StepTimer(gpu.event, every=4, emit=lines.append)
    for _ in range(3):
        run_step(timer, gpu, batch_size=1)
    assert len(timer.pending) == 3 and lines == []  # nothing completed: nothing read, nothing waited on
    gpu.completed = 6  # the first step's 4 events and half of the second's
    run_step(timer, gpu, batch_size=1)
    assert len(timer.pending) == 3 and timer.read_since_emit == 1
    gpu.finish_all()
    run_step(timer, gpu, batch_size=1)  # begin() polls the 4 earlier steps -> one line; this one stays pending
    assert lines == ["dflash_sglang step timing: bs=1 steps=4 draft_ms=2.000 verify_ms=10.000 rest_ms=0.500 "
                     "step_ms=12.500"]
    assert len(timer.pending) == 1


def test_one_line_per_batch_size_with_its_own_means():
    gpu, lines = FakeGPU(), []
    timer = StepTimer(gpu.event, every=3, emit=lines.append)
    for batch_size, verify in ((4, 20.0), (1, 10.0), (4, 22.0)):
        run_step(timer, gpu, batch_size, verify=verify)
        gpu.finish_all()
        timer.poll()
    assert [parse_line(line) for line in lines] == [
        {"bs": 1, "steps": 1, "draft_ms": 2.0, "verify_ms": 10.0, "rest_ms": 0.5, "step_ms": 12.5},
        {"bs": 4, "steps": 2, "draft_ms": 2.0, "verify_ms": 21.0, "rest_ms": 0.5, "step_ms": 23.5},
    ]
    assert timer.sums == {} and timer.read_since_emit == 0


def test_events_are_reused_and_pending_steps_are_capped():
    gpu, lines = FakeGPU(), []
    timer = StepTimer(gpu.event, every=1000, emit=lines.append, max_pending=5)
    for _ in range(8):  # the GPU is stalled: 5 steps wait, 3 go untimed
        run_step(timer, gpu, batch_size=2)
    assert len(timer.pending) == 5 and timer.untimed_steps == 3 and gpu.created == 20
    gpu.finish_all()
    for _ in range(50):
        run_step(timer, gpu, batch_size=2)
        gpu.finish_all()
    assert gpu.created == 20  # read steps hand their events back
    assert timer.sums[2][0] == 54


def test_a_step_with_missing_marks_is_refused():
    gpu = FakeGPU()
    timer = StepTimer(gpu.event)
    step = timer.begin(1)
    step.mark()
    with pytest.raises(RuntimeError, match="recorded 3 events, expected 4"):
        timer.end(step)


def test_format_and_parse_round_trip_inside_sglang_log_lines():
    line = format_line(3, [8.0, 16.0, 80.0, 4.0, 104.0])
    assert parse_line(line) == {"bs": 3, "steps": 8, "draft_ms": 2.0, "verify_ms": 10.0, "rest_ms": 0.5,
                                "step_ms": 13.0}
    log = "\n".join([
        "[2026-11-30 10:00:00 TP0] Load weight end. elapsed=0.31 s, type=Gemma4ForConditionalGeneration",
        f"[2026-11-30 10:00:05 TP0] {line}",
        "[2026-11-30 10:00:06 TP0] Decode batch, #running-req: 1, #token: 140",
        f"[2026-11-30 10:00:07 TP0] {format_line(1, [2.0, 4.0, 40.0, 1.0, 45.0])}",
    ])
    assert [(p["bs"], p["steps"]) for p in parse_log(log)] == [(3, 8), (1, 2)]
    assert parse_line("dflash_sglang step timing: bs=1 steps=x") is None


def test_env_switch():
    assert isinstance(timer_from_env(0, environ={}), NoStepTimer)
    assert isinstance(timer_from_env(0, environ={ENV_FLAG: "0"}), NoStepTimer)
    assert isinstance(timer_from_env(1, environ={ENV_FLAG: "1"}), NoStepTimer)  # rank 0 only
    timer = timer_from_env(0, environ={ENV_FLAG: "1", ENV_EVERY: "16"})
    assert isinstance(timer, StepTimer) and timer.every == 16
    with pytest.raises(ValueError, match=ENV_FLAG):
        timer_from_env(0, environ={ENV_FLAG: "yes"})
    with pytest.raises(ValueError, match=ENV_EVERY):
        timer_from_env(0, environ={ENV_FLAG: "1", ENV_EVERY: "0"})
    off = NoStepTimer()
    assert off.begin(4) is NO_STEP
    off.end(NO_STEP)


def test_worker_decode_records_start_three_marks_per_step(request):
    if run_decode is None:
        pytest.skip("sglang is not installed")
    worker, world = request.getfixturevalue("markov_worker")
    gpu, lines = FakeGPU(), []
    worker.step_timer = StepTimer(gpu.event, every=4, emit=lines.append)
    run_decode(worker, world, steps=8)
    assert gpu.recorded == 8 * 4 and len(worker.step_timer.pending) == 8
    gpu.finish_all()
    worker.step_timer.poll()
    assert [(p["bs"], p["steps"]) for p in map(parse_line, lines)] == [(3, 4), (3, 4)]


def test_shape_run_summary_from_sglang_log_lines(tmp_path):
    """scripts/device/gemma4_shape.py reads SGLang 0.5.16's startup lines and our timing lines into the bound."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "device" / "gemma4_shape.py"
    spec = importlib.util.spec_from_file_location("gemma4_shape", path)
    shape = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shape)

    prefix = "[2026-11-30 10:00:00 TP0] "
    startup = [
        "Load weight end. elapsed=0.31 s, type=Gemma4ForConditionalGeneration, avail mem=80.90 GB, mem usage=58.30 GB.",
        "KV Cache is allocated. dtype: torch.bfloat16, #tokens: 50000, K size: 10.00 GB, V size: 10.00 GB",
        "KV Cache is allocated. dtype: torch.bfloat16, #tokens: 200000, K size: 5.00 GB, V size: 5.00 GB",
        "SWAKVPool mem usage: 30.00 GB, swa size: 50000, full size: 200000",
    ]
    ours = [
        shape.SERVED_BY_OURS,
        "Load weight end. elapsed=0.02 s, type=DFlashSGLangDrafter, avail mem=47.90 GB, mem usage=2.96 GB.",
        "KV Cache is allocated. dtype: torch.bfloat16, #tokens: 200000, KV size: 4.00 GB",
        "Capture target verify CUDA graph end. elapsed=12.50 s, mem usage=1.20 GB, avail mem=40.00 GB.",
        "Capture draft verify CUDA graph end. elapsed=3.10 s, mem usage=0.40 GB, avail mem=39.60 GB.",
        "max_total_num_tokens=200000, chunked_prefill_size=8192, max_running_requests=48, available_gpu_mem=39.50 GB",
        format_line(1, [32, 320.0, 640.0, 32.0, 992.0]),  # warm-up window: dropped
        format_line(1, [32, 64.0, 480.0, 16.0, 560.0]),
        format_line(1, [16, 32.0, 240.0, 8.0, 280.0]),
        format_line(2, [4, 8.0, 80.0, 4.0, 92.0]),  # not batch size 1: ignored
    ]
    (tmp_path / "ar.log").write_text("\n".join(prefix + line for line in startup))
    (tmp_path / "b16.log").write_text("\n".join(prefix + line for line in startup + ours))
    for name, client in (("ar", {"ms_per_token": 15.0}), ("b16", {"ms_per_token": 20.0, "ms_per_step": 20.0})):
        (tmp_path / f"{name}.json").write_text(json.dumps(client))
        (tmp_path / f"{name}.stage.json").write_text(json.dumps({"status": "ok", "startup_s": 90}))

    stages = shape.summarize(tmp_path)["stages"]
    b16 = stages["b16"]
    assert b16["memory"]["weights_gb"] == {"target": 58.30, "draft": 2.96}
    assert b16["memory"]["kv_total_gb"] == 34.0 and b16["memory"]["graph_gb"] == {"target": 1.2, "draft": 0.4}
    assert b16["memory"]["available_after_startup_gb"] == 39.5 and stages["ar"]["memory"]["kv_total_gb"] == 30.0
    assert b16["served_by_ours"] and b16["step_timing"] == {
        "lines": 2, "steps": 48, "draft_ms": 2.0, "verify_ms": 15.0, "rest_ms": 0.5, "step_ms": 17.5}
    assert b16["bounds"]["math500"]["gpu"] == pytest.approx(8.59 * 15.0 / 17.0)
    assert b16["bounds"]["math500"]["e2e"] == pytest.approx(8.59 * 15.0 / 20.0)
    assert stages["b32"]["status"] == "not run"
