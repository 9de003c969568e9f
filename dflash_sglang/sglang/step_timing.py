"""GPU time of each DFLASH decode step, by phase, without host syncs (off unless DFLASH_SGLANG_STEP_TIMING=1).

The worker records a CUDA event on the current stream at each phase boundary of a step: start, after the drafter
forward, after the target verify forward, end (acceptance, commit, next draft input). Nothing waits on them: a
step is read once its last event has completed (`Event.query()`, a non-blocking poll) during a later step, so the
step keeps its no-sync property and overlap scheduling is unchanged. Events recorded around a CUDA-graph replay
time the replay. Every `every` read steps, rank 0 logs one line per batch size seen since the last line:

    dflash_sglang step timing: bs=1 steps=64 draft_ms=3.210 verify_ms=21.004 rest_ms=0.402 step_ms=24.616

(means over those steps; `step_ms` = start to end). `parse_log` reads such lines back.
"""

from __future__ import annotations

import logging
import os
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

logger = logging.getLogger(__name__)

ENV_FLAG = "DFLASH_SGLANG_STEP_TIMING"
ENV_EVERY = "DFLASH_SGLANG_STEP_TIMING_EVERY"
DEFAULT_EVERY = 64
# Steps recorded but not yet read; past this, new steps go untimed until the GPU catches up.
MAX_PENDING = 256
PHASES = ("draft", "verify", "rest")
LINE_PREFIX = "dflash_sglang step timing:"
LINE_PATTERN = re.compile(
    re.escape(LINE_PREFIX)
    + r" bs=(?P<bs>\d+) steps=(?P<steps>\d+) draft_ms=(?P<draft_ms>[0-9.]+) verify_ms=(?P<verify_ms>[0-9.]+)"
    r" rest_ms=(?P<rest_ms>[0-9.]+) step_ms=(?P<step_ms>[0-9.]+)"
)


@dataclass
class StepEvents:
    """The events of one step: `mark()` after each phase but the last; the timer records the last one."""

    batch_size: int
    events: list = field(default_factory=list)
    factory: Callable | None = None

    def mark(self) -> None:
        event = self.factory()
        event.record()
        self.events.append(event)


class NoStepEvents:
    def mark(self) -> None:
        pass


NO_STEP = NoStepEvents()


class NoStepTimer:
    """What the worker holds when timing is off: every call is a no-op."""

    def begin(self, batch_size: int) -> NoStepEvents:
        return NO_STEP

    def end(self, step) -> None:
        pass


class StepTimer:
    """Records step events, reads finished steps lazily, logs per-batch-size means every `every` steps."""

    def __init__(self, event_factory: Callable, every: int = DEFAULT_EVERY, emit: Callable[[str], None] = logger.info,
                 max_pending: int = MAX_PENDING):
        if every < 1:
            raise ValueError(f"step timing: `every` must be >= 1, got {every}")
        self.event_factory = event_factory
        self.every = every
        self.emit = emit
        self.max_pending = max_pending
        self.pending: deque[StepEvents] = deque()
        self.free_events: list = []
        # batch size -> [steps, draft, verify, rest, step] sums (ms) since the last logged line
        self.sums: dict[int, list[float]] = {}
        self.read_since_emit = 0
        self.untimed_steps = 0

    def new_event(self):
        return self.free_events.pop() if self.free_events else self.event_factory()

    def begin(self, batch_size: int) -> StepEvents | NoStepEvents:
        self.poll()
        if len(self.pending) >= self.max_pending:
            self.untimed_steps += 1
            return NO_STEP
        step = StepEvents(batch_size, factory=self.new_event)
        step.mark()
        return step

    def end(self, step: StepEvents | NoStepEvents) -> None:
        if step is NO_STEP:
            return
        step.mark()
        if len(step.events) != len(PHASES) + 1:
            raise RuntimeError(
                f"step timing: a step recorded {len(step.events)} events, expected {len(PHASES) + 1} "
                f"(start, then one mark after each of {PHASES})"
            )
        self.pending.append(step)
        self.poll()

    def poll(self) -> None:
        """Read every leading pending step whose last event has completed (events on one stream complete in order)."""
        while self.pending and self.pending[0].events[-1].query():
            self.read(self.pending.popleft())

    def read(self, step: StepEvents) -> None:
        events = step.events
        phases = [events[i].elapsed_time(events[i + 1]) for i in range(len(PHASES))]
        sums = self.sums.setdefault(step.batch_size, [0.0] * (len(PHASES) + 2))
        sums[0] += 1
        for i, ms in enumerate(phases):
            sums[1 + i] += ms
        sums[-1] += events[0].elapsed_time(events[-1])
        self.free_events.extend(events)
        self.read_since_emit += 1
        if self.read_since_emit >= self.every:
            self.flush()

    def flush(self) -> None:
        for batch_size in sorted(self.sums):
            self.emit(format_line(batch_size, self.sums[batch_size]))
        self.sums.clear()
        self.read_since_emit = 0


def format_line(batch_size: int, sums: list[float]) -> str:
    steps = int(sums[0])
    draft, verify, rest, whole = (s / steps for s in sums[1:])
    return (f"{LINE_PREFIX} bs={batch_size} steps={steps} draft_ms={draft:.3f} verify_ms={verify:.3f} "
            f"rest_ms={rest:.3f} step_ms={whole:.3f}")


def parse_line(line: str) -> dict | None:
    """One logged line -> {bs, steps, draft_ms, verify_ms, rest_ms, step_ms}; None if the line is not one."""
    match = LINE_PATTERN.search(line)
    if match is None:
        return None
    fields = match.groupdict()
    return {name: (int(value) if name in ("bs", "steps") else float(value)) for name, value in fields.items()}


def parse_log(text: str) -> list[dict]:
    return [parsed for parsed in map(parse_line, text.splitlines()) if parsed is not None]


def timer_from_env(rank: int, environ=os.environ) -> StepTimer | NoStepTimer:
    """A StepTimer on rank 0 when DFLASH_SGLANG_STEP_TIMING=1 (every DFLASH_SGLANG_STEP_TIMING_EVERY steps)."""
    flag = environ.get(ENV_FLAG, "0")
    if flag not in ("0", "1"):
        raise ValueError(f"{ENV_FLAG} must be 0 or 1, got {flag!r}")
    if flag == "0" or rank != 0:
        return NoStepTimer()
    every_text = environ.get(ENV_EVERY, str(DEFAULT_EVERY))
    if not every_text.isdigit() or int(every_text) < 1:
        raise ValueError(f"{ENV_EVERY} must be a positive integer, got {every_text!r}")
    import torch

    every = int(every_text)
    logger.info("dflash_sglang: step timing on (CUDA events, read lazily), one line per batch size every %d steps",
                every)
    return StepTimer(lambda: torch.cuda.Event(enable_timing=True), every=every)
