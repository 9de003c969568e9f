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
    from test_sglang_plugin import in_tree_mode, markov_worker, run_decode  # noqa: F401
except pytest.skip.Exception:
    in_tree_mode = run_decode = None

    @pytest.fixture
    def markov_worker():
        pytest.skip("sglang is not installed")


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


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_worker_step_records_start_and_three_marks(markov_worker, tree):
    """Chain and tree steps log the same line format (a tree's draft = drafter + tree build), so shape.sh reads
    both alike."""
    worker, world = in_tree_mode(*markov_worker) if tree else markov_worker
    gpu, lines = FakeGPU(), []
    worker.step_timer = StepTimer(gpu.event, every=4, emit=lines.append)
    run_decode(worker, world, steps=8)
    assert gpu.recorded == 8 * 4 and len(worker.step_timer.pending) == 8
    gpu.finish_all()
    worker.step_timer.poll()
    assert [(p["bs"], p["steps"]) for p in parse_log("\n".join(lines))] == [(3, 4), (3, 4)]
