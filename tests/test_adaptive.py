"""The adaptive width's controller (dflash_sglang.adaptive) against a simulated server: each width's step time and
tokens per step are known, the controller only sees the wall clock and the committed counts, one step in flight
as under SGLang's overlap scheduler."""

import pytest

from dflash_sglang.adaptive import PLAIN_WIDTH, WidthController, batch_group, group_range

SPEC = 16


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def serve(controller, clock, batch_sizes, step_seconds, tokens_per_step):
    """Run one decode step per entry of batch_sizes; the result of step i is observed after step i + 1 is issued.
    step_seconds(width, bs) and tokens_per_step(width) describe the simulated server. Returns the widths run."""
    widths, pending = [], None
    for bs in batch_sizes:
        width = controller.choose(bs)
        widths.append(width)
        if pending is not None:
            clock.now += step_seconds(*pending)
            controller.observe([tokens_per_step(pending[0])] * pending[1], pending[1])
        pending = (width, bs)
    return widths


def tiny_target(width, bs):
    """Speculation costs 2 ms + 0.2 ms per request, a plain step 1 ms + 0.02 ms per request."""
    return (2e-3 + 2e-4 * bs) if width == SPEC else (1e-3 + 2e-5 * bs)


def tokens(width):
    return 3 if width == SPEC else 1  # tau 3


def test_batch_groups_are_powers_of_two():
    assert [batch_group(b) for b in (1, 2, 3, 4, 7, 8, 64, 127, 128)] == [1, 2, 2, 3, 3, 4, 7, 7, 8]
    assert [group_range(g) for g in (1, 2, 4, 7)] == ["1", "2-3", "8-15", "64-127"]


def test_each_batch_size_runs_the_width_that_delivers_more():
    # tau 3: speculation wins while 3 / (2 + 0.2 bs) > 1 / (1 + 0.02 bs), i.e. below bs ~ 2.3; at 1 it is 1.36x,
    # at 32 plain steps are 2.56x faster.
    for bs, best in ((1, SPEC), (32, PLAIN_WIDTH)):
        clock = Clock()
        controller = WidthController((SPEC, PLAIN_WIDTH), clock=clock)
        widths = serve(controller, clock, [bs] * 20000, tiny_target, tokens)
        assert controller.choice.get(batch_group(bs), SPEC) == best
        rates = controller.rates[batch_group(bs)]
        for width in (SPEC, PLAIN_WIDTH):
            expected = tokens(width) / tiny_target(width, bs)
            assert rates[width].rate == pytest.approx(expected, rel=1e-6)
        # After the first choice, the other width runs only in probes, which take about probe_share of the time
        # whatever they cost per step (a speculative step at 32 requests costs 5x a plain one).
        settled = widths[100:]
        seconds = {w: sum(tiny_target(w, bs) for x in settled if x == w) for w in (SPEC, PLAIN_WIDTH)}
        other = 1 - seconds[best] / sum(seconds.values())
        assert 0.015 < other < 0.04, (bs, other)
def test_a_batch_size_change_switches_at_once_and_keeps_what_each_group_learned():
    clock = Clock()
    controller = WidthController((SPEC, PLAIN_WIDTH), clock=clock)
    serve(controller, clock, [1] * 600 + [32] * 600, tiny_target, tokens)
    assert controller.choice[batch_group(32)] == PLAIN_WIDTH
    widths = serve(controller, clock, [1] * 40, tiny_target, tokens)
    assert widths[0] == SPEC  # the small-batch group's choice, not the phase the large batch was in
    assert "batch 32-63" in controller.summary() and "runs width 1" in controller.summary()
    # Each width's rate with its step time (tiny_target: a plain step at 32 requests takes 1 + 0.02 x 32 ms).
    plain = controller.rates[batch_group(32)][PLAIN_WIDTH]
    assert f"width 1: {plain.rate:.1f}/s at 1.64 ms/step (" in controller.summary()


def test_acceptance_that_drops_is_noticed_by_the_probes():
    clock = Clock()
    controller = WidthController((SPEC, PLAIN_WIDTH), clock=clock)
    serve(controller, clock, [1] * 500, tiny_target, tokens)
    assert controller.choice.get(1, SPEC) == SPEC
    serve(controller, clock, [1] * 3000, tiny_target, lambda width: 1)  # the drafter stops being right
    assert controller.choice[1] == PLAIN_WIDTH


def test_samples_straddling_a_switch_are_not_used():
    clock = Clock()
    controller = WidthController((SPEC, PLAIN_WIDTH), clock=clock, min_samples=3, phase_steps=4, probe_share=0.4,
                                 probe_steps=2)
    pending, switches = None, 0
    for _ in range(1000):
        width = controller.choose(8)
        if pending is not None:
            # The interval a result is timed over also holds the launch of the step issued just before it: 1 ms
            # for a speculative step, nothing for a plain one. Across a switch it mixes the two widths.
            clock.now += (5e-3 if pending == SPEC else 1e-3) + (1e-3 if width == SPEC else 0.0)
            controller.observe([1] * 8, 8)
            switches += width != pending
        pending = width
    assert switches > 20
    rates = controller.rates[batch_group(8)]
    assert rates[SPEC].rate == pytest.approx(1 / 6e-3) and rates[PLAIN_WIDTH].rate == pytest.approx(1 / 1e-3)


def test_samples_across_a_batch_size_change_are_not_used():
    clock = Clock()
    controller = WidthController((SPEC, PLAIN_WIDTH), clock=clock, min_samples=10_000)
    sizes = [4, 4, 4, 5, 5, 5] * 200  # one group; a request joins or leaves every third step
    serve(controller, clock, sizes, lambda width, bs: 1e-3 * bs, lambda width: 1)
    rates = controller.rates[batch_group(4)]
    # The step after each change is timed across it; the other two of every three are used (the last result is
    # never observed).
    assert rates[SPEC].samples == 2 * len(sizes) // 3 - 1
    assert 1 / 5e-3 < rates[SPEC].rate < 1 / 4e-3


def test_results_around_a_prefill_are_not_used():
    """At one request a new request starts with a prefill and no batch change: the two results after it (overlap
    scheduling puts the prefill in the second one's interval) would time the prefill too."""
    clock = Clock()
    controller = WidthController((SPEC,), clock=clock)
    pending = None
    for step in range(300):
        if step % 30 == 0:
            controller.interrupt()  # a prefill between decode steps, 5 ms on the GPU
        width = controller.choose(1)
        if pending is not None:
            clock.now += 1e-3 + (5e-3 if step % 30 == 1 else 0.0)  # the result after the next launch holds it
            controller.observe([2], 1)
        pending = width
    stats = controller.rates[1][SPEC]
    assert stats.rate == pytest.approx(2000.0)
    assert stats.samples == 299 - 2 * 10  # every result but the two after each of the 10 prefills


def test_a_gap_is_an_outlier_not_a_slow_step():
    clock = Clock()
    controller = WidthController((SPEC,), clock=clock)
    serve(controller, clock, [1] * 50, lambda w, bs: 1e-3, lambda w: 2)
    clock.now += 0.5  # an idle half second, or a prefill with no batch change
    serve(controller, clock, [1] * 5, lambda w, bs: 1e-3, lambda w: 2)
    assert controller.rates[1][SPEC].rate == pytest.approx(2000.0)


def test_results_out_of_step_with_the_issued_steps_start_over():
    clock = Clock()
    controller = WidthController((SPEC, PLAIN_WIDTH), clock=clock)
    controller.choose(3)
    clock.now += 1e-3
    controller.observe([1, 1], 2)  # a result of a batch this controller did not issue
    assert not controller.rates or all(r.samples == 0 for g in controller.rates.values() for r in g.values())
    serve(controller, clock, [3] * 100, tiny_target, tokens)
    assert controller.rates[batch_group(3)][SPEC].samples > 0


def test_a_late_result_and_the_one_at_once_after_it_time_two_steps_not_a_burst():
    """Under overlap scheduling, when the host reaches a result late the next one is already done: the intervals
    come as a long and a nearly empty one. The rate is tokens over the time they took, not a mean of per-step
    rates (which read the short interval as 10x the speed: on the H200, 2026-11-30, the chain's rate at one request
    implied 4.5 tokens a step at a tau under 3)."""
    clock = Clock()
    controller = WidthController((SPEC,), clock=clock)
    pending = None
    for step in range(400):
        width = controller.choose(1)
        if pending is not None:
            clock.now += (4e-3 if step % 2 else 0.4e-3)  # 2.2 ms a step on average
            controller.observe([3], 1)
        pending = width
    assert controller.rates[1][SPEC].rate == pytest.approx(3 / 2.2e-3, rel=0.1)


def test_a_width_no_better_than_the_current_one_is_not_switched_to_on_noise(caplog):
    """Two widths with the same throughput and noisy acceptance at one request: the choice holds instead of
    following each lucky probe (each change of choice is a log line)."""
    import logging
    import random

    rng = random.Random(7)
    clock = Clock()
    controller = WidthController((SPEC, 64), clock=clock)
    with caplog.at_level(logging.INFO, logger="dflash_sglang.adaptive"):
        serve(controller, clock, [1] * 20000, lambda width, bs: 2e-3 if width == SPEC else 3e-3,
              lambda width: rng.choice((1, 1, 2, 3, 5, 6)) * (1.0 if width == SPEC else 1.5))
    switches = [r.getMessage() for r in caplog.records if "adaptive width" in r.getMessage()]
    # Mean-of-rates estimates with the switch on the margin alone made 61-70 switches here (five seeds).
    assert len(switches) <= 20, switches


@pytest.mark.parametrize("widths", [(), (16, 16), (0, 1)])
def test_bad_widths_are_refused(widths):
    with pytest.raises(ValueError, match="distinct positive"):
        WidthController(widths)
