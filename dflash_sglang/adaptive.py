"""Adaptive verify width: each decode step either speculates (the drafter's block; in tree mode the tree or the
block as a chain) or verifies the anchor alone (a plain decoding step), whichever has been delivering more tokens
per request per second at the running batch size.

Why measured rates and not a cost model: what makes speculation lose at high concurrency on a small target is
mostly host time (launches, planning) and a verify that stops being free once the GPU is busy; both depend on
the machine, the model, the backend and what else runs, and the step's own wall time sees all of it. A step's
sample is (tokens committed per request, time since the previous step's result), taken where SGLang's scheduler
hands the worker each step's acceptance on the host (no extra sync); a width's rate is the ratio of the two
smoothed means (WidthRate says why not the mean of per-step rates). Batch sizes are grouped by powers of two; each
group keeps a rate per width.

Policy, per batch-size group: run each width until it has `min_samples` usable samples; then run the best in
phases of `phase_steps`, switching only when another width's rate beats it by `margin` and by `switch_z` standard
errors of the difference (a probe of a few steps at one request is noisy). Now and then a short
probe of another width measures it again (acceptance changes with the text, the load changes), spaced so that
probes take about `probe_share` of the time: a probe of a width whose steps cost 5x the best's waits 5x longer
(at 64 requests a 65-node tree verify costs several plain steps; probing it as often as a cheap width would cost
the plain steps' throughput what the probes are meant to protect).

A sample is usable when the step it times and its neighbours ran the same width at the same batch size (a switch
or a request joining or leaving makes a step's wall time describe something else), when no prefill ran in its
interval (`interrupt`), and when it is not an outlier (a gap, e.g. idle time). Plain steps keep writing the
drafter's context, so speculation can resume at any step.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

logger = logging.getLogger(__name__)

PLAIN_WIDTH = 1  # the anchor alone: a plain decoding step
# A step's wall time above this many times its width's mean is not a step's (a gap, a prefill); the result after
# it is not used either, since a late result's successor comes at once (the GPU finished it meanwhile).
OUTLIER_FACTOR = 3.0
MAX_STEP_SECONDS = 1.0
# Samples after a switch whose timing straddles the old width (the in-flight step, the next one's launch).
SETTLE_STEPS = 2
# Results after other work on the GPU (a prefill) whose interval holds it: the next one without overlap
# scheduling, the one after with it (the prefill runs between the in-flight step and the next).
INTERRUPTED_RESULTS = 2


def batch_group(batch_size: int) -> int:
    """Batch sizes grouped by powers of two: 1 | 2-3 | 4-7 | 8-15 | ..."""
    return max(1, int(batch_size)).bit_length()


def group_range(group: int) -> str:
    low, high = 1 << (group - 1), (1 << group) - 1
    return str(low) if low == high else f"{low}-{high}"


@dataclass
class WidthRate:
    """One width's throughput at one batch-size group, smoothed: tokens committed per request per step over seconds
    per step. A ratio of the two means, not a mean of per-step rates: under overlap scheduling a result the host
    reaches late is followed by one it reaches at once (the GPU finished that step meanwhile), and a mean of
    per-step rates would read that short interval as a burst of speed."""
    tokens: float | None = None  # tokens committed per request per step
    step_seconds: float | None = None  # wall time per step
    spread: float = 0.0  # mean square of (tokens - rate x seconds): the steps' scatter about the rate
    samples: int = 0

    @property
    def rate(self) -> float | None:
        """Tokens per request per second."""
        return None if self.tokens is None else self.tokens / self.step_seconds

    def add(self, tokens: float, step_seconds: float, smoothing: float) -> None:
        # The first samples weigh equally (a plain mean), later ones as the smoothing says.
        weight = max(smoothing, 1.0 / (self.samples + 1))
        if self.tokens is None:
            self.tokens, self.step_seconds = tokens, step_seconds
        else:
            self.tokens += weight * (tokens - self.tokens)
            self.step_seconds += weight * (step_seconds - self.step_seconds)
        self.spread += weight * ((tokens - self.rate * step_seconds) ** 2 - self.spread)
        self.samples += 1

    def standard_error(self, smoothing: float) -> float:
        """The rate's standard error (delta method for a ratio), over the samples its smoothing remembers."""
        remembered = min(self.samples, (2.0 - smoothing) / smoothing)
        return (self.spread / remembered) ** 0.5 / self.step_seconds if self.samples else float("inf")


class WidthController:
    """Chooses the verify width of each decode step (`choose`) from the rates it observes (`observe`).

    widths: the widths it may pick; the first is where every batch-size group starts (the speculative one).
    clock: seconds, monotonic (time.perf_counter; tests pass their own).
    """

    def __init__(self, widths: Sequence[int], *, phase_steps: int = 32, probe_steps: int = 6,
                 probe_share: float = 0.03, min_samples: int = 4, margin: float = 0.05, smoothing: float = 0.2,
                 switch_z: float = 2.0, clock: Callable[[], float] = time.perf_counter):
        if len(set(widths)) != len(widths) or not widths or min(widths) < 1:
            raise ValueError(f"widths must be distinct positive integers, got {list(widths)}")
        self.widths = tuple(int(w) for w in widths)
        self.phase_steps, self.probe_steps, self.probe_share = phase_steps, probe_steps, probe_share
        self.min_samples, self.margin, self.smoothing, self.switch_z = min_samples, margin, smoothing, switch_z
        self.clock = clock
        self.rates: dict[int, dict[int, WidthRate]] = {}
        self.choice: dict[int, int] = {}  # per group: the width its exploiting phases run
        self.steps: dict[int, dict[int, int]] = {}  # per group, per width: steps run (for the log and tests)
        self._since_probe: dict[int, int] = {}  # per group: exploiting steps since its last probe
        self._probed: dict[int, int] = {}  # per group: probes run (they cycle through the other widths)
        self._group = self._width = None
        self._left = 0
        self._issued: deque[tuple[int, int]] = deque()  # (width, batch size) of steps whose results are pending
        self._previous: tuple[int, int] | None = None  # the last observed step's (width, batch size)
        self._interrupted = 0  # results still to come whose interval holds other work
        self._last_time: float | None = None

    # ------------------------------------------------------------------------------------------ per step

    def choose(self, batch_size: int) -> int:
        """The width of the step about to run for a batch of this size."""
        group = batch_group(batch_size)
        if self._left <= 0 or group != self._group:
            self._group = group
            self._width, self._left = self._next_phase(group)
        self._left -= 1
        self.steps.setdefault(group, {}).setdefault(self._width, 0)
        self.steps[group][self._width] += 1
        self._issued.append((self._width, int(batch_size)))
        return self._width

    def interrupt(self) -> None:
        """Other work ran on the GPU between decode steps (a prefill): the next results do not time a step."""
        self._interrupted = INTERRUPTED_RESULTS

    def observe(self, committed_per_request: Sequence[int], batch_size: int) -> None:
        """One step's result, in issue order: tokens committed per request (SGLang reports accepted drafts, the
        caller adds the bonus)."""
        now = self.clock()
        if not self._issued:
            self._previous, self._last_time = None, now
            return
        width, issued_size = self._issued.popleft()
        if issued_size != batch_size or not committed_per_request:
            # Out of step with the results (a result this controller did not issue): start over.
            self._issued.clear()
            self._previous, self._last_time = None, now
            return
        elapsed = None if self._last_time is None else now - self._last_time
        steady = self._previous == (width, batch_size) and all(w == width for w, _ in self._issued)
        if self._interrupted:
            self._interrupted -= 1
            steady = False
        self._previous, self._last_time = (width, batch_size), now
        if not steady or elapsed is None or not 0 < elapsed <= MAX_STEP_SECONDS:
            return
        per_request = sum(committed_per_request) / len(committed_per_request)
        stats = self._rates(batch_group(batch_size))[width]
        if stats.samples >= self.min_samples and elapsed > OUTLIER_FACTOR * stats.step_seconds:
            self._interrupted = max(self._interrupted, 1)
            return
        stats.add(per_request, elapsed, self.smoothing)

    # ------------------------------------------------------------------------------------------ policy

    def _rates(self, group: int) -> dict[int, WidthRate]:
        if group not in self.rates:
            self.rates[group] = {w: WidthRate() for w in self.widths}
        return self.rates[group]

    def _next_phase(self, group: int) -> tuple[int, int]:
        rates = self._rates(group)
        for width in self.widths:
            if rates[width].samples < self.min_samples:
                return width, self.min_samples + SETTLE_STEPS
        best = self._best(group)
        others = [w for w in self.widths if w != best]
        if others:
            probe = others[self._probed.get(group, 0) % len(others)]
            probe_steps = self.probe_steps + SETTLE_STEPS
            # Exploiting steps worth (1 - share) / share of the probe's time: its steps cost this many of the best's.
            cost = rates[probe].step_seconds / rates[best].step_seconds
            if self._since_probe.get(group, 0) >= probe_steps * cost * (1 - self.probe_share) / self.probe_share:
                self._since_probe[group] = 0
                self._probed[group] = self._probed.get(group, 0) + 1
                return probe, probe_steps
        self._since_probe[group] = self._since_probe.get(group, 0) + self.phase_steps
        return best, self.phase_steps

    def _best(self, group: int) -> int:
        rates = self._rates(group)
        current = self.choice.get(group, self.widths[0])
        challenger = max(self.widths, key=lambda w: rates[w].rate)
        # Beaten by the margin, and by more than the two rates' noise: otherwise a lucky probe of a few steps wins
        # a switch that the next phase takes back (2026-11-30: 50 switches in a run, most reversed within a second).
        noise = self.switch_z * (rates[challenger].standard_error(self.smoothing) ** 2
                                 + rates[current].standard_error(self.smoothing) ** 2) ** 0.5
        if challenger != current and rates[challenger].rate > (1 + self.margin) * rates[current].rate + noise:
            logger.info(
                "dflash_sglang: adaptive width %d -> %d at batch sizes %s (%.1f vs %.1f tokens per request per s)",
                current, challenger, group_range(group), rates[challenger].rate, rates[current].rate,
            )
            self.choice[group] = current = challenger
        return current

    def summary(self) -> str:
        """One line per batch-size group: each width's rate and step time (their product is its tokens per step),
        samples and steps run."""
        lines = []
        for group in sorted(self.rates):
            cells = []
            for width in self.widths:
                stats = self.rates[group][width]
                rate = "-" if stats.rate is None else f"{stats.rate:.1f}/s at {1e3 * stats.step_seconds:.2f} ms/step"
                cells.append(f"width {width}: {rate} ({stats.samples} samples, "
                             f"{self.steps.get(group, {}).get(width, 0)} steps)")
            lines.append(f"batch {group_range(group)}: " + ", ".join(cells)
                         + f"; runs width {self.choice.get(group, self.widths[0])}")
        return "\n".join(lines)
