"""Studies end to end on small digits data: lifecycle, hardware filter, kill-and-resume."""

import dataclasses
import json
import logging
import os

import jax
import pytest
from conftest import quick_spec
from fake_nvml import make_card, make_fake_nvml
from kill import kill_mid_phase

from sm2jax.budgets import hyperband_brackets
from sm2jax.cohort import group_into_cohorts
from sm2jax.energy import read_ledger
from sm2jax.execute.programs import compiled_memory_bytes

# The method is pinned: the suite behaves the same on machines with and without a GPU.
from sm2jax.execute.rows import chunk_rows
from sm2jax.execute.trainer import CohortTrainer
from sm2jax.handback import load_selected
from sm2jax.hyperband import run_hyperband
from sm2jax.presets import digits as digits_preset
from sm2jax.report import format_results
from sm2jax.space import Categorical, LogUniform
from sm2jax.study import Study


def _spec(space, **overrides):
    return quick_spec(space, **{"idle_seconds": 0.1, **overrides})


def _decisions(results):
    return [(d["phase"], d["trial_id"], d["kept"]) for d in results["decisions"]]


@pytest.mark.slow
def test_sm2_study_selects_a_config_and_labels_cpu_energy_honestly(tmp_path):
    space = {
        "learning_rate": LogUniform(3e-3, 3e-2, num=2),
        "batch_size": Categorical([32, 64]),
        "optimizer": Categorical(["adam", "sgd"]),
    }
    results = Study(tmp_path / "s", _spec(space, energy_method="auto"), progress=False).run()
    sel = results["selected"]
    assert sel is not None and 0.5 < sel["metric"] <= 1.0
    # auto meters what JAX computes on: the host on the CPU backend (never a GPU figure), NVML on GPUs.
    expected = (
        ("estimated", "rapl") if jax.default_backend() == "cpu" else ("nvml-counter", "nvml-power", "unavailable")
    )
    assert results["energy_method"] in expected
    ledger = read_ledger(tmp_path / "s" / "ledger.jsonl")
    assert ledger and all(r["method"] == results["energy_method"] for r in ledger)
    phases = set(results["energy_by_phase"])
    assert {"compile", "explore", "rung-1", "rung-2"} <= phases
    # Every trial of every training window has its share; shares add up to the window.
    windows = [r for r in ledger if r["type"] == "window" and r["phase"] == "rung-1"]
    for w in windows:
        shares = [
            r["joules"]
            for r in ledger
            if r["type"] == "trial" and r["window"] == w["window"] and r["time"] == w["time"]
        ]
        assert sum(shares) == pytest.approx(w["joules"])
    assert sel["attributed_joules"] > 0
    # Decisions: every config appears in exploration, with its terms and reason.
    explore = [d for d in results["decisions"] if d["phase"] == "explore"]
    assert len(explore) == 8 and all("reason" in d and "projected_energy_j" in d for d in explore)
    assert all(d["energy_method"] == results["energy_method"] for d in explore)  # every figure says how it was obtained
    # SH keeps ceil(n / 3) at rung 1.
    rung1 = [d for d in results["decisions"] if d["phase"] == "rung-1"]
    assert sum(d["kept"] for d in rung1) == -(-len(rung1) // 3)
    # Every score a decision used carries its noise; energy a smoothed cohort rate with its noise.
    assert all(0 < d["score_se"] < 0.1 and d["joules_per_sample"] > 0 and d["energy_noise"] >= 0.2 for d in rung1)
    assert all("tier" in d and d["reason_code"] in ("top_k", "outside_top_k") for d in rung1)
    # The selection's held-out test metric is reported beside its validation metric; the finalists'
    # score/energy trade-off is shown apart.
    assert 0.5 < sel["test"]["metric"] <= 1.0 and sel["test"]["trial_id"] == sel["trial_id"]
    assert sel["trial_id"] in [f["trial_id"] for f in results["finalists"]]
    assert any(f["pareto"] for f in results["finalists"])


@pytest.mark.slow  # a whole study
def test_diverging_config_is_dropped_in_exploration_and_infeasible_batch_is_recorded(tmp_path):
    space = {"learning_rate": Categorical([1e-2, 1e20]), "optimizer": "sgd", "batch_size": Categorical([32, 100_000])}
    results = Study(tmp_path / "s", _spec(space), progress=False).run()
    infeasible, n = results["infeasible"], results["num_configs"]
    assert {t for t in infeasible if int(t) < n} == {"1", "3"} and all("exceeds" in r for r in infeasible.values())
    replicas = {t["trial_id"]: t["replicate_of"] for t in results["trials"] if "replicate_of" in t}
    assert {replicas[int(t)] for t in infeasible if int(t) >= n} <= {1, 3}  # a replicate is infeasible with it
    explore = {d["trial_id"]: d for d in results["decisions"] if d["phase"] == "explore"}
    assert explore[2]["kept"] is False and explore[2]["reason"].startswith("diverged at step")
    assert results["selected"]["trial_id"] == 0


@pytest.mark.slow  # a whole study
def test_a_study_whose_every_config_diverges_ends_without_a_selection(tmp_path):
    results = Study(
        tmp_path / "s", _spec({"learning_rate": Categorical([1e20, 1e25]), "optimizer": "sgd"}), progress=False
    ).run()
    assert results["selected"] is None and "no configuration survived" in results["note"]
    decisions = [d for d in results["decisions"] if d["reason_code"] != "replicate"]
    assert decisions and all(d["reason"].startswith("diverged at step") for d in decisions)
    assert all("stops (not healthy)" in d["reason"] for d in results["decisions"] if d["reason_code"] == "replicate")


@pytest.mark.slow
def test_memory_cap_narrows_the_width_or_marks_infeasible(tmp_path, digits):
    # Activation-dominated (small convolution weights, large batch), so memory grows with the width.
    space = {
        "model": {"name": "cnn", "channels": [32, 64]},
        "learning_rate": LogUniform(1e-3, 1e-2, num=4),
        "batch_size": 512,
    }
    spec = _spec(space, max_budget=1, min_budget=1, explore_budget=0.0, width_start="widest")  # the accelerator policy
    (cohort,) = group_into_cohorts(spec.configs())
    trainer = CohortTrainer(cohort, digits, schedule_steps=10)
    rows = trainer.init_rows()
    need = {
        w: compiled_memory_bytes(trainer.compile_train(chunk_rows(jax.tree.map(lambda a: a[:w], rows), w)[0]))
        for w in (1, 2, 4)
    }
    assert need[4] > need[2] > need[1]
    narrowed = Study(
        tmp_path / "a", dataclasses.replace(spec, memory_limit_bytes=(need[2] + need[4]) // 2), progress=False
    ).run()
    assert narrowed["infeasible"] == {} and narrowed["selected"] is not None
    assert narrowed["hardware"][cohort.name]["width"] == 2
    assert "width 4 needs" in narrowed["hardware"][cohort.name]["notes"][0]
    none_fit = Study(tmp_path / "b", dataclasses.replace(spec, memory_limit_bytes=need[1] // 2), progress=False).run()
    assert set(none_fit["infeasible"]) == {"0", "1", "2", "3"} and none_fit["selected"] is None
    assert "does not fit in device memory even alone" in none_fit["infeasible"]["0"]


@pytest.mark.slow
def test_out_of_memory_during_training_narrows_the_width_and_retries(tmp_path, monkeypatch):
    """The device running out of memory mid-study (simulated at the hardware boundary: the compiled
    program raises XLA's RESOURCE_EXHAUSTED above width 2) halves the width and retries the window."""
    real_train = CohortTrainer.train

    def train_on_a_small_device(self, state, num_steps, quick=False):
        if state.step.shape[0] > 2:
            raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1.00GiB")
        return real_train(self, state, num_steps, quick)

    monkeypatch.setattr(CohortTrainer, "train", train_on_a_small_device)
    space = {"learning_rate": LogUniform(1e-3, 3e-2, num=8), "batch_size": 64}
    with pytest.warns(RuntimeWarning, match="out of memory; retrying at vmap width") as caught:
        # No seed replicates: the cohort is exactly 8 trials wide (8 -> 4 -> 2).
        results = Study(tmp_path / "s", _spec(space, width_start="widest", replicates=0), progress=False).run()
    assert [str(w.message)[-7:] for w in caught] == ["width 4", "width 2"]
    assert results["selected"] is not None and results["infeasible"] == {}
    retries = [
        r for r in read_ledger(tmp_path / "s" / "ledger.jsonl") if r["phase"] == "oom-retry" and r["type"] == "window"
    ]
    assert len(retries) == 2  # the failed attempts' energy is kept on its own line


@pytest.mark.slow
def test_kill_mid_rung_and_resume_reaches_the_same_decisions(tmp_path, caplog):
    # Two models at one batch size: two cohorts that differ only in model options (their names and
    # so their progress, checkpoints and restore must not collide).
    models = Categorical([{"name": "mlp", "hidden": [256, 256]}, {"name": "mlp", "hidden": [32]}])
    space = {"model": models, "learning_rate": LogUniform(1e-3, 1e-1, num=4), "batch_size": 16}
    spec = _spec(space, steps_per_window=2, energy_method="estimated")
    reference = Study(tmp_path / "ref", spec, progress=False).run()

    killed = tmp_path / "killed"
    Study(killed, spec, progress=False)  # writes spec.json
    kill_mid_phase(killed)
    ledger = killed / "ledger.jsonl"
    assert (killed / "progress" / "phase-1.json").exists() and not (
        killed / "progress" / "phase-2.json"
    ).exists()  # mid rung-2

    resumed = Study(killed, progress=False).run()
    assert resumed["attempts"] == 2
    assert resumed["selected"]["trial_id"] == reference["selected"]["trial_id"]
    assert resumed["selected"]["metric"] == pytest.approx(reference["selected"]["metric"], abs=1e-6)
    assert _decisions(resumed) == _decisions(reference)
    attempts = {r.get("attempt") for r in read_ledger(ledger)}
    assert attempts == {1, 2}  # both attempts' energy is in the ledger: nothing is lost
    # The killed attempt's rung-2 work was repeated: on its own line, not in the phase totals.
    assert "rung-2" in resumed["interrupted_energy_by_phase"] and resumed["interrupted_joules"] > 0
    rung2 = [r for r in read_ledger(ledger) if r["type"] == "window" and r["phase"] == "rung-2" and r["attempt"] == 2]
    assert resumed["energy_by_phase"]["rung-2"]["joules"] == pytest.approx(sum(r["joules"] for r in rung2))
    assert "interrupted attempts" in format_results(resumed)

    # A corrupt latest checkpoint falls back to the previous phase, with a warning.
    last = max(int(p) for p in os.listdir(tmp_path / "ref" / "checkpoints") if p.isdigit())
    for root, _, files in os.walk(tmp_path / "ref" / "checkpoints" / str(last)):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\x00garbage")
    caplog.clear()
    with pytest.warns(RuntimeWarning, match="falling back"):
        again = Study(tmp_path / "ref", progress=False).run()
    noise = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not noise and "Event loop is closed" not in caplog.text  # one warning, no Orbax error spam
    assert _decisions(again)[: len(_decisions(reference))] == _decisions(reference)
    assert again["selected"]["trial_id"] == reference["selected"]["trial_id"]


@pytest.mark.slow
def test_baselines_on_identical_work(tmp_path):
    space = {"learning_rate": LogUniform(3e-3, 3e-2, num=3), "batch_size": 64}
    sh = Study(tmp_path / "sh", _spec(space, mode="sh"), progress=False).run()
    assert sh["objective"] == "performance" and "explore" not in sh["energy_by_phase"]
    first_rung = [d for d in sh["decisions"] if d["phase"] == "rung-1"]
    assert all(
        d["gain"] is None and d["plateaued"] is None and d["progress_per_joule"] is None for d in first_rung
    )  # no earlier score
    assert all(d["gain"] is not None for d in sh["decisions"] if d["phase"] == "rung-2")
    assert all(d["reason_code"] for d in sh["decisions"])
    full = Study(tmp_path / "full", _spec(space, mode="full"), progress=False).run()
    assert [d["phase"] for d in full["decisions"]] == ["rung-1"] * 3  # everyone trained to the full budget
    best = max((d for d in full["decisions"]), key=lambda d: d["score"])
    assert full["selected"]["trial_id"] == best["trial_id"]
    pareto = Study(tmp_path / "pareto", _spec(space, objective="pareto"), progress=False).run()
    assert all(
        "front" in d for d in pareto["decisions"] if d["phase"].startswith("rung") and d["objective"] is not None
    )
    hb = run_hyperband(tmp_path / "hb", _spec(space, max_budget=3, eta=3), progress=False)
    assert [(r["bracket"], r["configs"]) for r in hb["rounds"]] == [(1, 3), (0, 2)]
    best = max((r["finalists"][0] for r in hb["rounds"]), key=lambda f: f["score"])
    assert hb["selected"]["trial_id"] == best["trial_id"]  # the best score over the brackets


@pytest.mark.slow
def test_hyperband_runs_li_et_al_rungs_and_keeps_floor(tmp_path):
    """R = 27 steps, eta = 3: one study whose rounds are the brackets; every bracket trains n_i
    configurations to r_i steps and keeps floor(n_i / eta), ending with exactly one configuration
    at the full budget; the selection is the best score over the brackets."""
    space = {"learning_rate": LogUniform(1e-3, 1e-1, num=3), "batch_size": 64}
    spec = _spec(space, budget_unit="steps", max_budget=27, eta=3, explore_budget=0.0, idle_seconds=0.0)
    hb = Study(tmp_path / "hb", dataclasses.replace(spec, mode="hyperband"), progress=False).run()
    brackets = hyperband_brackets(27, 3, integral=True)
    assert [(r["round"], r["bracket"], r["configs"]) for r in hb["rounds"]] == [
        (1, 3, 27),
        (2, 2, 12),
        (3, 1, 6),
        (4, 0, 4),
    ]
    assert [b["s"] for b in brackets] == [3, 2, 1, 0]
    for k, b in enumerate(brackets, start=1):
        for i, rung in enumerate(b["rungs"]):
            label = f"rung-{i + 1}" if k == 1 else f"r{k}.rung-{i + 1}"
            decided = [d for d in hb["decisions"] if d["phase"] == label]
            assert len(decided) == rung["n"], (b["s"], i)
            assert {d["samples_spent"] for d in decided} == {int(rung["r"]) * 64}  # r_i steps of batch 64
            assert sum(d["kept"] for d in decided) == (b["rungs"][i + 1]["n"] if i < b["s"] else 1)
    selections = [next(t for t in hb["trials"] if t["trial_id"] == r["selected"]) for r in hb["rounds"]]
    assert hb["selected"]["trial_id"] == max(selections, key=lambda t: t["score"])["trial_id"]
    assert sorted({t["round"] for t in hb["trials"]}) == [1, 2, 3, 4]
    assert len({json.dumps(t["config"], sort_keys=True) for t in hb["trials"]}) > 27  # brackets draw anew
    loaded = load_selected(tmp_path / "hb")  # the winner loads as any study's
    assert loaded.trial_id == hb["selected"]["trial_id"]


@pytest.mark.slow  # a whole study
def test_a_different_spec_in_an_existing_directory_is_refused(tmp_path):
    first = _spec({"learning_rate": 1e-3}, idle_seconds=0.0)
    Study(tmp_path / "s", first, progress=False).run()
    spec_file = (tmp_path / "s" / "spec.json").read_text()
    with pytest.raises(ValueError, match="different spec"):
        Study(tmp_path / "s", _spec({"learning_rate": 2e-3}), progress=False)
    with pytest.raises(ValueError, match="different spec"):  # Hyperband into it: refused before writing anything
        run_hyperband(tmp_path / "s", _spec({"learning_rate": 2e-3}), progress=False)
    assert (tmp_path / "s" / "spec.json").read_text() == spec_file
    with pytest.raises(FileNotFoundError, match=r"spec\.json missing"):
        Study(tmp_path / "nothing")


@pytest.mark.slow  # a whole study
def test_a_failed_first_start_does_not_block_the_corrected_spec(tmp_path):
    with pytest.raises(ValueError, match="unknown data set"):
        Study(tmp_path / "s", _spec({"learning_rate": 1e-3}, dataset="no-such-data"), progress=False).run()
    with pytest.raises(ValueError, match="num_samples must be >= 1"):  # fails before anything is written
        Study(
            tmp_path / "t",
            _spec({"learning_rate": LogUniform(1e-3, 1e-1, num=2)}, sampler="random", num_samples=0),
            progress=False,
        )
    assert not (tmp_path / "t").exists()
    results = Study(
        tmp_path / "s",
        _spec({"learning_rate": 1e-3}, idle_seconds=0.0, explore_budget=0.0, max_budget=1),
        progress=False,
    ).run()
    assert results["selected"] is not None


@pytest.mark.slow  # a whole study
def test_a_checkpoint_without_its_progress_record_is_discarded_with_a_warning(tmp_path):
    spec = _spec({"learning_rate": 1e-3}, idle_seconds=0.0)
    reference = Study(tmp_path / "s", spec, progress=False).run()
    last = len(spec.phases()) - 1
    os.remove(tmp_path / "s" / "progress" / f"phase-{last}.json")  # as if killed after the checkpoint committed
    os.remove(tmp_path / "s" / "results.json")
    with pytest.warns(RuntimeWarning, match=f"checkpoint of phase {last} has no progress record"):
        again = Study(tmp_path / "s", progress=False).run()
    assert again["selected"]["trial_id"] == reference["selected"]["trial_id"]


@pytest.mark.slow
def test_a_study_metered_by_a_100ms_counter_decides_with_energy(tmp_path):
    """On a GPU the counter steps every ~100 ms while a digits window lasts milliseconds: windows are
    merged to the meter's 1 s resolution, so every window has a figure and no decision falls back
    to performance only. Two of four cards are JAX's; only they are charged."""
    cards = [make_card(i, power_mw=150_000) for i in range(4)]
    mine = [{"pci_bus_id": cards[1].pci_bus_id}, {"pci_bus_id": cards[3].pci_bus_id}]
    spec = dataclasses.replace(
        digits_preset(), energy_method="auto", idle_seconds=0.1
    )  # the default study (its idle window is stretched to 1 s)
    study = Study(tmp_path / "s", spec, nvml=make_fake_nvml(cards), gpus=mine, progress=False)
    results = study.run()
    assert results["energy_method"] == "nvml-counter"
    hardware = json.loads((tmp_path / "s" / "hardware.json").read_text())
    assert [d["nvml"] for d in hardware["metered_devices"]] == [cards[1].pci_bus_id, cards[3].pci_bus_id]
    assert hardware["idle"]["watts"] == pytest.approx(300.0, rel=0.15)  # idle over >= 1 s: two 150 W cards
    windows = [r for r in read_ledger(tmp_path / "s" / "ledger.jsonl") if r["type"] == "window"]
    assert windows and all(w["joules"] is not None and w["valid"] for w in windows)
    assert all(sorted(w["per_device"]) == sorted(d["pci_bus_id"] for d in mine) for w in windows)
    assert any(w["merged_windows"] > 1 for w in windows)
    decisions = [d for d in results["decisions"] if d["phase"] != "hardware"]
    assert decisions and all(d["energy_last_j"] is not None and d["energy_last_j"] > 0 for d in decisions)
    assert not any("unavailable" in (d.get("note") or "") + d["reason"] for d in decisions)
    assert all(d["joules_per_sample"] > 0 for d in decisions if d["phase"].startswith("rung"))


@pytest.mark.slow  # a whole study
def test_a_study_written_by_an_earlier_version_resumes(tmp_path):
    """spec.json written before fields were added (here: width_start, imports, dataset_fingerprint)
    is the same study: the new fields take their defaults, nothing is refused or rewritten."""
    space = {"learning_rate": LogUniform(3e-3, 3e-2, num=2), "batch_size": 64}
    first = Study(tmp_path / "s", _spec(space), progress=False).run()
    path = tmp_path / "s" / "spec.json"
    blob = json.loads(path.read_text())
    for field in ("width_start", "imports", "dataset_fingerprint"):
        del blob[field]
    path.write_text(json.dumps(blob))
    again = Study(tmp_path / "s", progress=False).run()
    assert again["selected"]["trial_id"] == first["selected"]["trial_id"]
    assert json.loads(path.read_text()) == blob  # the study's own file is left as it was
    with pytest.raises(ValueError, match=r"differs in: max_budget"):  # a real difference is still refused
        Study(tmp_path / "s", _spec(space, max_budget=9), progress=False)
