"""The width and quick-program policy as numbers in, decision out (no training, no clock)."""

import pytest

from sm2jax.execute.width_policy import (
    CPU_FLOPS_PER_DEVICE,
    OPTIMISED_COMPILE_RATIO,
    QUICK_COMPILE_SAVING,
    QUICK_SLOWDOWN,
    WidthPolicy,
    narrowing,
    optimise_decision,
    predicted_training,
    probe_candidates,
    probe_decision,
    probe_steps,
    probe_widths,
    quick_start,
    start_widths,
)


def _round(devices):
    return lambda w: max(devices, -(-int(w) // devices) * devices)


def test_start_widths_are_one_row_per_device_or_the_widest_halving():
    assert start_widths(16, 2, True, _round(2)) == [2]
    assert start_widths(16, 1, False, _round(1)) == [16, 8, 4, 2, 1]
    assert start_widths(12, 4, False, _round(4)) == [12, 8, 4]  # multiples of the device count
    assert WidthPolicy(max_width=6).widest(10, _round(4)) == 8 and WidthPolicy().widest(3, _round(1)) == 3


def test_a_cohort_starts_quick_only_when_its_predicted_training_is_short():
    # Seconds of training at which the quick build's slower steps cost exactly what it saves.
    break_even = QUICK_COMPILE_SAVING / (QUICK_SLOWDOWN - 1.0)
    flops_for = lambda seconds: seconds * CPU_FLOPS_PER_DEVICE / 3.0  # 1 trial-step, batch 1, 1 device
    quick, predicted = quick_start(1, flops_for(0.9 * break_even), 1, 1)
    assert quick and predicted == pytest.approx(0.9 * break_even)
    assert not quick_start(1, flops_for(1.1 * break_even), 1, 1)[0]
    assert quick_start(2, flops_for(1.1 * break_even), 1, 2)[0] is False  # two devices halve it: same
    assert quick_start(1, flops_for(1.1 * break_even), 1, 2)[0]


def test_the_optimised_program_is_compiled_once_the_saving_pays_its_compile():
    quick_compile = 0.5
    threshold = OPTIMISED_COMPILE_RATIO * quick_compile / (1.0 - 1.0 / QUICK_SLOWDOWN)
    switch, saving, cost = optimise_decision(1.01 * threshold, quick_compile)
    assert switch and saving > cost == pytest.approx(OPTIMISED_COMPILE_RATIO * quick_compile)
    assert not optimise_decision(0.99 * threshold, quick_compile)[0]
    assert predicted_training(1000, 0.002, 4) == pytest.approx(0.5)


def test_the_probe_runs_only_when_training_exceeds_payoff_times_its_compiles():
    assert probe_candidates(64) == [1, 4, 16, 64] and probe_candidates(1) == [1]
    assert probe_widths(1, 16, 1) == [4, 16]
    assert probe_widths(2, 16, 2) == [8, 16]  # 2 x [1, 4, 8] within 16, the current width left out
    run, cost = probe_decision(10.0, 2, 1.0, 0.5, payoff=3.0)
    assert cost == 2.5 and run
    assert not probe_decision(10.0, 2, 1.0, 0.5, payoff=4.0)[0]  # 10 s is not more than 4 x 2.5 s
    assert WidthPolicy(start="narrowest").probe_payoff() == 10.0 and WidthPolicy(start="widest").probe_payoff() == 5.0
    steps = probe_steps(0.001, 4, [1, 4, 16])  # ~0.2 s per call predicted from the 4-wide step
    assert steps == {1: 800, 4: 200, 16: 50}
    assert probe_steps(1.0, 1, [1])[1] == 3  # at least three steps


def test_survivors_get_a_narrower_program_only_when_it_saves_more_than_it_costs():
    rates = {8: 0.008}  # seconds per step of the 8-wide chunk; narrower widths unmeasured
    free = lambda c: 0.0
    width, saving, cost = narrowing(3, 8, rates, planned_trial_steps=3000, compile_cost=free, round_width=_round(1))
    # 1000 steps each: one 8-wide chunk (8 ms) against one 3-wide chunk (3 ms, scaled by width).
    assert width == 3 and saving == pytest.approx(1000 * (0.008 - 0.003)) and cost == 0.0
    width, saving, cost = narrowing(3, 8, rates, 3000, lambda c: 10.0, _round(1))
    assert saving < cost  # a 10 s compile for a 5 s saving: the caller keeps the width
    measured = {8: 0.008, 1: 0.0005}  # the probe measured width 1 fast: three 1-wide chunks win
    assert narrowing(3, 8, measured, 3000, free, _round(1))[0] == 1


def test_memory_fit_and_start_validation():
    policy = WidthPolicy(memory_limit=100)
    assert policy.fits(100) and not policy.fits(101) and policy.fits(None)
    with pytest.raises(ValueError, match="width start"):
        WidthPolicy(start="sideways")
