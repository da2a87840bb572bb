"""The cohort runner: padding rows, width decisions that pay for their compilation, energy per trial."""

import jax
import numpy as np
import pytest

from sm2jax.cohort import group_into_cohorts
from sm2jax.energy import EnergyLedger, EnergyMonitor, make_meter, read_ledger
from sm2jax.energy.metering import Metering
from sm2jax.execute.rows import chunk_rows, gather_rows
from sm2jax.execute.runner import CohortRunner
from sm2jax.execute.trainer import CohortTrainer
from sm2jax.execute.width_policy import WidthPolicy, probe_candidates
from sm2jax.space import LogUniform, SearchSpace

MODEL = {"name": "mlp", "hidden": [16]}


def _runner(digits, tmp_path, trials, model=MODEL, planned=None, **policy):
    configs = SearchSpace(
        {"model": model, "learning_rate": LogUniform(1e-3, 1e-1, num=trials), "batch_size": 32}
    ).grid()
    (cohort,) = group_into_cohorts(configs)
    trainer = CohortTrainer(cohort, digits, schedule_steps=200)
    ledger = EnergyLedger(tmp_path / f"ledger-{trials}-{policy.get('max_width')}.jsonl")
    metering = Metering(EnergyMonitor(make_meter("estimated")), ledger, attempt=1)
    runner, notes = CohortRunner.create(
        cohort,
        trainer,
        metering,
        WidthPolicy(**{"probe": False, "start": "widest", **policy}),
        planned_trial_steps=planned,
    )
    assert runner is not None and notes == []
    return runner, ledger


@pytest.mark.slow
def test_padding_rows_get_no_energy_and_do_not_change_results(digits, tmp_path):
    padded, ledger = _runner(digits, tmp_path, 3, max_width=2)  # chunks of 2: the second holds one padding row
    assert padded.width == 2 and len(padded.chunks) == 2
    whole, _ = _runner(digits, tmp_path, 3)
    assert whole.width == 3 and len(whole.chunks) == 1
    record = padded.train_to(20, "rung-1", planned_trial_steps=60, steps_per_window=7)
    whole.train_to(20, "rung-1", planned_trial_steps=60, steps_per_window=7)
    assert record.steps == {0: 20, 1: 20, 2: 20}
    np.testing.assert_array_equal(padded.field("step"), [20, 20, 20])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), padded.rows().params, whole.rows().params)
    evaluation = padded.evaluate("rung-1")
    assert evaluation.scores.shape == (3,)
    records = read_ledger(ledger.path)
    assert {r["trial_id"] for r in records if r["type"] == "trial"} == {0, 1, 2}  # never the padding id
    for w in (r for r in records if r["type"] == "window" and r["phase"] == "rung-1"):
        shares = [r for r in records if r["type"] == "trial" and r["window"] == w["window"] and r["time"] == w["time"]]
        assert len(shares) == 3 and sum(s["joules"] for s in shares) == pytest.approx(w["joules"])


@pytest.mark.slow
def test_the_probe_runs_only_when_predicted_training_pays_for_its_compilation(digits, tmp_path):
    runner, _ = _runner(digits, tmp_path, 6, probe=True)
    assert runner.probe_pending
    runner.train_to(4, "explore", planned_trial_steps=6 * 10)  # a study too small to pay for it
    assert not runner.probe_pending and runner.width == 6
    assert runner.choices[-1]["reason"].startswith("probe skipped") and runner.choices[-1]["predicted_compile_s"] > 0

    runner, _ = _runner(digits, tmp_path, 6, probe=True)
    runner.train_to(4, "explore", planned_trial_steps=1e9)  # a long study: measuring widths pays
    choice = runner.choices[-1]
    assert choice["reason"] == "fastest measured width" and set(choice["samples_per_second"]) == {"1", "4", "6"}
    rates = choice["samples_per_second"]
    assert runner.width == int(max(rates, key=rates.get))
    assert runner.is_compiled()  # training and evaluation at the chosen width, outside any training window


@pytest.mark.slow
def test_fewer_survivors_get_a_narrower_program_only_when_it_pays(digits, tmp_path):
    runner, _ = _runner(digits, tmp_path, 8, model={"name": "mlp", "hidden": [12]})  # no narrower program compiled yet
    runner.train_to(2, "rung-1", planned_trial_steps=16)
    runner.select([5, 2])
    assert runner.trial_ids == [5, 2] and runner.width == 8 and len(runner.chunks) == 1  # padding, same program
    runner.narrow_for_survivors(planned_trial_steps=2 * 3)
    assert runner.width == 8 and runner.choices[-1]["reason"].startswith("kept for 2 survivors")
    runner.narrow_for_survivors(planned_trial_steps=2 * 10**7)
    assert runner.width == 2 and runner.choices[-1]["reason"].startswith("narrowed for 2 survivors")
    assert [int(t) for t in np.asarray(runner.rows().trial_id)] == [5, 2]


def test_a_programs_first_call_runs_one_step_apart_and_changes_no_bit(digits, tmp_path, monkeypatch):
    runner, _ = _runner(digits, tmp_path, 4, model={"name": "mlp", "hidden": [14]}, max_width=2)  # two chunks
    start = runner.rows()
    calls = []
    train = runner.trainer.train
    monkeypatch.setattr(
        runner.trainer, "train", lambda chunk, n, quick=False: calls.append(n) or train(chunk, n, quick)
    )  # a spy
    runner.train_to(12, "rung-1", planned_trial_steps=48, steps_per_window=12)
    runner.train_to(24, "rung-1", planned_trial_steps=48, steps_per_window=12)
    # A fresh executable's first call pays one-time costs (~30 ms on 2 CPU cores, against ~0.1 ms
    # for a step here), so the first window of a build runs chunk 0's first step alone and leaves
    # it out of the rate; later windows are one call per chunk.
    assert calls == [1, 11, 12, 12, 12]
    monkeypatch.undo()
    # The same 24 steps, one call per chunk: the same bits.
    direct = [runner.trainer.train(c, 24, runner.quick)[0] for c in chunk_rows(start, 2, runner.placement)]
    for a, b in zip(
        jax.tree.leaves(gather_rows(direct, [0, 1, 2, 3], runner.placement).params),
        jax.tree.leaves(runner.rows().params),
        strict=True,
    ):
        np.testing.assert_array_equal(a, b)


def test_probe_candidates():
    assert probe_candidates(1) == [1]
    assert probe_candidates(6) == [1, 4, 6]
    assert probe_candidates(16) == [1, 4, 16]
    assert probe_candidates(54) == [1, 4, 16, 54]


@pytest.mark.slow
def test_the_probe_measures_only_widths_within_the_memory_limit(digits, tmp_path):
    """The spec's memory limit binds the probe too: no candidate above it is compiled and run, and
    nothing raises out of the study (issue 11, item 8)."""
    from sm2jax.execute.programs import compiled_memory_bytes
    from sm2jax.execute.rows import chunk_rows

    model = {"name": "cnn", "channels": [32, 64]}  # activation-dominated: memory grows with the width
    configs = SearchSpace({"model": model, "learning_rate": LogUniform(1e-3, 1e-2, num=4), "batch_size": 512}).grid()
    (cohort,) = group_into_cohorts(configs)
    trainer = CohortTrainer(cohort, digits, schedule_steps=10)
    rows = trainer.init_rows()
    need = {
        w: compiled_memory_bytes(trainer.compile_train(chunk_rows(jax.tree.map(lambda a: a[:w], rows), w)[0]))
        for w in (1, 2, 4)
    }
    limit = (need[2] + need[4]) // 2
    metering = Metering(EnergyMonitor(make_meter("estimated")), EnergyLedger(tmp_path / "l.jsonl"), attempt=1)
    runner, notes = CohortRunner.create(
        cohort, trainer, metering, WidthPolicy(memory_limit=limit, probe=True, start="widest")
    )
    assert runner.width == 2 and "width 4 needs" in notes[0]
    runner.train_to(1, "explore", planned_trial_steps=1e9)
    probed = runner.choices[-1]["samples_per_second"]
    assert set(probed) == {"1", "2"} and all(need[int(w)] <= limit for w in probed)
    assert runner.width in (1, 2)


@pytest.mark.slow
def test_a_narrow_start_compiles_one_program_for_every_survivor_count(digits, tmp_path):
    assert WidthPolicy().starts_narrow() == (jax.default_backend() == "cpu")  # auto: narrow on CPU backends
    runner, _ = _runner(digits, tmp_path, 6, start="narrowest")
    assert runner.width == 1 and len(runner.chunks) == 6 and "narrowest width" in runner.choices[0]["reason"]
    runner.train_to(10, "rung-1", planned_trial_steps=60)
    runner.select([4, 1])  # survivors: fewer chunks of the same program, no padding
    runner.narrow_for_survivors(planned_trial_steps=1e9)
    assert runner.width == 1 and len(runner.chunks) == 2
    assert {c["width"] for c in runner.choices} == {1} and not any("survivors" in c["reason"] for c in runner.choices)
    # A long study probes the wider widths instead.
    runner, _ = _runner(digits, tmp_path, 6, start="narrowest", probe=True)
    assert runner.probe_pending
    runner.train_to(4, "explore", planned_trial_steps=1e9)
    assert set(runner.choices[-1]["samples_per_second"]) == {"1", "4", "6"}


@pytest.mark.slow
def test_a_cpu_cohort_trains_quick_only_while_its_training_is_short(digits, tmp_path):
    """Quick programs (CPU backends): a cohort whose planned training is predicted short from FLOPs
    starts quick and never compiles the optimised training program; one predicted long starts
    optimised; one that trains longer than planned compiles the optimised program after its first
    window, in a compile window, and trains on to the same results as a cohort optimised from the
    start (float rounding apart)."""
    model = {"name": "mlp", "hidden": [20]}  # a model no other test compiles at width 1
    cpu = jax.default_backend() == "cpu"
    short, _ = _runner(digits, tmp_path, 4, model=model, planned=4 * 12, start="narrowest")
    assert short.quick == cpu and short.choices[0]["quick"] == cpu
    short.train_to(12, "rung-1", planned_trial_steps=4 * 12)  # milliseconds of training
    assert short.quick == cpu
    if cpu:
        assert short.choices[0]["predicted_train_s"] < 0.01 and "quick program" in short.choices[0]["reason"]
        assert not short.trainer.is_compiled("train", 1) and short.trainer.is_compiled("train", 1, quick=True)
        assert (
            short.choices[-1]["reason"].startswith("quick program kept")
            and short.choices[-1]["predicted_compile_s"] > 0
        )

    (tmp_path / "long").mkdir()
    long, ledger = _runner(digits, tmp_path / "long", 4, model=model, planned=4 * 12, start="narrowest")
    long.train_to(12, "rung-1", planned_trial_steps=1e9)  # trains far longer than it was created for
    assert not long.quick and long.trainer.is_compiled("train", 1)
    if cpu:
        switch = next(c for c in long.choices if c["reason"].startswith("optimised program: predicted saving"))
        assert switch["predicted_saving_s"] > switch["predicted_compile_s"] > 0
        kinds = [r["kind"] for r in read_ledger(ledger.path) if r["type"] == "window"]
        assert kinds[:3] == ["compile", "train", "compile"]  # created, a first short window, then the switch
    np.testing.assert_array_equal(long.field("step"), [12] * 4)

    planned_long, _ = _runner(digits, tmp_path, 4, model=model, planned=1e9, start="narrowest")
    assert not planned_long.quick
    if cpu:
        assert "optimised program: predicted training" in planned_long.choices[0]["reason"]
    planned_long.train_to(12, "rung-1", planned_trial_steps=1e9)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), long.rows().params, planned_long.rows().params
    )


def test_a_swallowed_ctrl_c_stops_at_the_next_window(tmp_path):
    from sm2jax.interrupts import request_interrupt

    metering = Metering(EnergyMonitor(make_meter("estimated")), EnergyLedger(tmp_path / "l.jsonl"), attempt=1)
    try:  # what Python does with an exception raised inside a gc callback: prints it, carries on
        request_interrupt()
    except KeyboardInterrupt:
        pass
    window = lambda: metering.window("rung-1", phase="rung-1", cohort="c", trial_ids=[0])
    with pytest.raises(KeyboardInterrupt), window():
        pass
    with window() as w:  # the request is spent: later windows run
        pass
    assert w.reading is not None


def test_an_interrupt_inside_deferred_interrupts_is_raised_when_the_block_ends():
    """SIGTERM landing in TensorBoard's writer hung the process: the writers run with interrupts
    held back, and the request is raised, with its signal, once they are done."""
    import signal

    from sm2jax.interrupts import deferred_interrupts, interrupt_signal, request_interrupt

    done = []
    with pytest.raises(KeyboardInterrupt), deferred_interrupts():
        with deferred_interrupts():  # nested: raised only when the outer block ends
            request_interrupt(signal.SIGTERM)  # what the handler does on SIGTERM: here, no raise
            done.append("inner")
        done.append("outer")
    assert done == ["inner", "outer"] and interrupt_signal() == signal.SIGTERM
    with deferred_interrupts():  # the request is spent: a later block ends normally
        done.append("later")
    with pytest.raises(KeyboardInterrupt):  # outside a block the handler raises at once
        request_interrupt(signal.SIGINT)
    # Had that exception been swallowed (a gc callback), the next block raises it, as a window would.
    with pytest.raises(KeyboardInterrupt), deferred_interrupts():
        pass
    with deferred_interrupts():  # spent
        done.append("spent")
    assert done[-2:] == ["later", "spent"]
