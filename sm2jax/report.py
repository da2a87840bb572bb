"""A study's results: assembled from its state and ledger (:func:`assemble_results`, one row per
configuration in :func:`trial_table`), read back (:func:`load_results`) and printed as plain text
(:func:`sm2jax.report_text.format_results`, what ``sm2jax report`` prints)."""

from __future__ import annotations

import json
import os
from typing import Any

from sm2jax.cohort import group_into_cohorts
from sm2jax.energy.ledger import add_known, sum_known, summarize, trial_totals, whole_span
from sm2jax.phases import StudyState
from sm2jax.plan import plan_vs_actual
from sm2jax.report_text import format_results as format_results  # what `sm2jax report` prints, importable here
from sm2jax.rounds import parse_label
from sm2jax.space import Config
from sm2jax.store.folder import StudyDir


class Results(dict):
    """A study's results (the mapping ``results.json`` holds), with a table of its configurations."""

    def trials_dataframe(self):
        """One row per configuration (pandas), as Optuna's ``Study.trials_dataframe``: ``trial_id``,
        ``cohort``, ``status`` (``selected``, ``finalist``, the reason code it was dropped for,
        ``infeasible``, ``running``), ``phase_reached``, ``reason``; its last ``score``,
        ``score_se`` and ``metric``; ``samples`` trained; ``score_<phase>`` at every phase it
        reached (each phase's budget); its energy (``energy_joules``, ``kwh``, ``gco2e``) and by kind
        of window (``energy_train_j``, ``energy_eval_j``, ``energy_compile_j`` ...: compilation is
        its share of its cohort's); ``params_<name>`` for every hyperparameter (a mapping such as the
        model as JSON text); ``replicate_of`` for a seed replicate; ``round`` (Hyperband's bracket:
        the report's ``rounds``). A Hyperband run of the earlier layout's rows carry their ``bracket``."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("trials_dataframe needs pandas: pip install pandas") from None
        if "brackets" in self:  # a Hyperband run of the earlier layout: a study per bracket
            folder = StudyDir(self["study"])
            frames = [
                load_results(folder.bracket(b["s"])).trials_dataframe().assign(bracket=b["s"]) for b in self["brackets"]
            ]
            return pd.concat(frames, ignore_index=True)
        curves = self.get("curves") or {}
        rows = []
        for t in self.get("trials", []):
            row = {k: v for k, v in t.items() if k not in ("config", "energy_by_kind", "last_phase")}
            row["phase_reached"] = t["last_phase"]
            row["energy_method"] = self.get("energy_method")  # how every energy figure of the row was obtained
            for _, score, phase in curves.get(str(t["trial_id"]), {}).get("val", []):
                row[f"score_{phase}"] = score
            for kind, joules in (t.get("energy_by_kind") or {}).items():
                row[f"energy_{kind.replace('-', '_')}_j"] = joules
            for name, value in t["config"].items():
                row[f"params_{name}"] = json.dumps(value, sort_keys=True) if isinstance(value, (dict, list)) else value
            rows.append(row)
        frame = pd.DataFrame(rows)
        phases = list(dict.fromkeys(d["phase"] for d in self.get("decisions", []) if d["phase"] != "hardware"))
        scores = [f"score_{p}" for p in phases if f"score_{p}" in frame]
        energy = sorted(c for c in frame if c.startswith("energy_") and c != "energy_joules")
        params = [c for c in frame if c.startswith("params_")]
        first = [c for c in frame if c not in {*scores, *energy, *params}]
        return frame[first + scores + energy + params]


def load_results(directory: str | os.PathLike) -> Results:
    """The ``results.json`` of the study in ``directory`` (one-line errors for a missing study); a
    study still running, or interrupted, gets :func:`partial_results`. ``.trials_dataframe()``
    tabulates its configurations."""
    folder = StudyDir(directory)
    if not folder.exists("results.json") and folder.spec_blob() is not None and not folder.bracket_run():
        return Results(partial_results(folder))
    return Results(folder.results())


def partial_results(folder: StudyDir) -> dict[str, Any]:
    """What a study running (or interrupted) in ``folder`` has decided so far: its last committed
    phase's decisions, curves and best score, the energy measured so far (the phase in flight
    included, on the interrupted line), and a rough ETA from the rate so far. Reads only."""
    from sm2jax.energy.ledger import read_ledger
    from sm2jax.phases import planned_trial_steps
    from sm2jax.proposals import study_proposals
    from sm2jax.rounds import schedule
    from sm2jax.spec import read_spec

    spec = read_spec(folder.path)
    proposals, _ = study_proposals(folder, spec)
    configs, replicate_of = proposals.all(), proposals.replicate_of
    saved = folder.saved_phases()
    state = StudyState.from_json(folder.load_progress(saved[-1])) if saved else StudyState()
    records = read_ledger(folder.ledger_path)
    unmeasured = {"idle": {"watts": None, "seconds": 0.0, "method": "unavailable"}}
    hardware = folder.read_hardware() if folder.exists("hardware.json") else unmeasured
    methods = sorted({r["method"] for r in records if r["type"] == "window"})
    holder = folder.holder()
    results = assemble_results(
        state,
        records,
        running_attempt=max((r.get("attempt", 0) for r in records), default=None) if holder else None,
        study=folder.path,
        spec=spec,
        configs={c.trial_id: c for c in configs},
        replicate_of=replicate_of,
        hardware=hardware,
        energy_method=hardware.get("energy_method") or (methods[0] if methods else "unavailable"),
        intensity_label=next((r["intensity_label"] for r in records if "intensity_label" in r), ""),
        metric_name=state.metric_name,
        placement={},
        wall_seconds=None,
        plan=folder.read_plan(spec.to_json()),
    )
    results["note"] = "not selected yet: the study has not finished"
    phases = [(s.label, s.budget) for s in schedule(spec)]
    done = len(saved)
    results["partial"] = {
        "status": "running" if holder else "interrupted",
        "holder": holder,
        "phases_done": [name for name, _ in phases[:done]],
        "phases_left": [name for name, _ in phases[done:]],
        "in_progress": phases[done][0] if holder and done < len(phases) else None,
        "best_score": state.best_score_text(),
    }
    # Rough ETA: wall seconds per trial-budget so far, times the trial-budget successive halving plans.
    times = [r["time"] for r in records if r["type"] == "window"]
    budgets = dict(phases)
    work = sum(budgets[c["val"][-1][2]] for c in state.curves.values() if c.get("val"))
    alive = sum(len(ids) for ids in state.alive.values())
    if len(times) > 1 and work > 0 and alive and 0 < done < len(phases):
        left = planned_trial_steps(phases, lambda b: b, alive, phases[done - 1][1], done, spec.eta)
        results["partial"]["eta_seconds"] = (max(times) - min(times)) / work * left
    return results


def load_comparable(directory: str | os.PathLike) -> dict[str, Any]:
    """:func:`load_results`, where a Hyperband run of the earlier layout gains its brackets'
    energy by phase, configurations and metric name, so that it compares like any study."""
    folder = StudyDir(directory)
    results = folder.results()
    if not folder.bracket_run():
        return results
    brackets = [folder.bracket(b["s"]).results() for b in results["brackets"]]
    by_phase: dict[str, dict[str, Any]] = {}
    for r in brackets:
        for phase, g in r["energy_by_phase"].items():
            total = by_phase.setdefault(phase, {"joules": 0.0})
            total["joules"] = add_known(total["joules"], g["joules"])
    trials = [t for r in brackets for t in r.get("trials", [])]
    return {
        **results,
        "energy_by_phase": by_phase,
        "trials": trials,
        "metric_name": brackets[0].get("metric_name") if brackets else None,
    }


def trial_table(
    progress: StudyState,
    records: list[dict[str, Any]],
    configs: dict[int, Config],
    replicate_of: dict[int, int] | None = None,
) -> list[dict[str, Any]]:
    """One row per configuration: its cohort and values, how far it got (the last phase it
    trained in and why it stopped there), its last score, and the energy attributed to it by
    the ledger (finished attempts only; ``None`` when any share was unavailable). A seed replicate's
    row names the configuration it replicates (``replicate_of``); ``round``: the round that proposed
    it (``None``: it never trained, e.g. infeasible)."""
    replicate_of = replicate_of or {}
    cohort_of = {
        c.trial_id: cohort.name for cohort in group_into_cohorts(list(configs.values())) for c in cohort.configs
    }
    joules, kwh, gco2e = (trial_totals(records, field=f) for f in ("joules", "kwh", "gco2e"))
    kinds = sorted({r.get("kind", "train") for r in records if r["type"] == "trial"})
    by_kind = {k: trial_totals([r for r in records if r.get("kind", "train") == k]) for k in kinds}
    times: dict[int, list[float]] = {}  # its first window's start, its last window's end (from the ledger)
    for r in records:
        if r["type"] == "trial" and "time" in r:
            t0, t1 = times.setdefault(r["trial_id"], [r["time"] - r["seconds"], r["time"]])
            times[r["trial_id"]] = [min(t0, r["time"] - r["seconds"]), max(t1, r["time"])]
    last: dict[int, dict[str, Any]] = {}
    for d in progress.decisions:
        last[d["trial_id"]] = d
    finalists = {f["trial_id"] for f in progress.finalists}
    rows = []
    for t, config in sorted(configs.items()):
        record = progress.trials.get(str(t), {})
        d = last.get(t)
        if str(t) in progress.infeasible:
            status, phase, reason = "infeasible", None, progress.infeasible[str(t)]
        elif t == progress.selected:
            status, phase, reason = "selected", d["phase"] if d else None, d["reason"] if d else ""
        elif d is None:
            status, phase, reason = "running", None, ""
        elif d["kept"]:
            status, phase, reason = ("finalist" if t in finalists else "running"), d["phase"], d.get("reason", "")
        else:
            status, phase, reason = d.get("reason_code") or "dropped", d["phase"], d.get("reason", "")
        rows.append(
            {
                "trial_id": t,
                "cohort": record.get("cohort") or cohort_of[t],  # (as its round grouped it)
                "round": parse_label(record["history"][0]["phase"])[0] if record.get("history") else None,
                "config": config.to_json()["values"],
                "status": status,
                "last_phase": phase,
                "reason": reason,
                "score": record.get("score"),
                "score_se": record.get("score_se"),
                "metric": record.get("metric"),
                "samples": record.get("samples_spent", 0),
                "energy_joules": joules.get(t),
                "kwh": kwh.get(t),
                "gco2e": gco2e.get(t),
                "energy_by_kind": {k: v[t] for k, v in by_kind.items() if t in v},
                "time_start": times.get(t, [None, None])[0],
                "time_end": times.get(t, [None, None])[1],
                **({"replicate_of": replicate_of[t]} if t in replicate_of else {}),
            }
        )
    return rows


def sort_records(
    done: dict[str, int], everything: list[dict[str, Any]], running_attempt: int | None
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """A ledger's window and trial records as ``(finished, in_flight, lost)``: the work of the
    attempt that committed each phase (``done``: phase -> attempt), the ``running_attempt``'s work
    not committed yet, and killed attempts' work (repeated later). Span records are left to
    :func:`sm2jax.energy.ledger.whole_span`."""
    finishers = set(done.values())

    def interrupted(r: dict[str, Any]) -> bool:
        """Work of an attempt that was killed before it recorded the phase (repeated later)."""
        if r["phase"] in done:
            return r.get("attempt") != done[r["phase"]]
        if r["phase"] in ("compile", "probe", "oom-retry"):
            return r.get("attempt") not in finishers
        return True

    records, in_flight, lost = [], [], []  # finished work, the running attempt's, killed attempts'
    for r in everything:
        if r["type"] == "span":  # a whole attempt's reading: counted by whole_span alone
            continue
        if not interrupted(r):
            records.append(r)
        elif running_attempt is not None and r.get("attempt") == running_attempt:
            in_flight.append(r)
        else:
            lost.append(r)
    return records, in_flight, lost


def _selected(
    progress: StudyState,
    selected: int,
    records: list[dict[str, Any]],
    lost: list[dict[str, Any]],
    configs: dict[int, Config],
    energy_method: str,
) -> dict[str, Any]:
    """The selected configuration's record: its values, scores, test and the energy charged to it."""
    trial = progress.trials[str(selected)]
    joules = [r["joules"] for r in records if r["type"] == "trial" and r["trial_id"] == selected]
    trained = [
        r["joules"] for r in records if r["type"] == "trial" and r["trial_id"] == selected and r.get("kind") == "train"
    ]
    lost_joules = [r["joules"] for r in lost if r["type"] == "trial" and r["trial_id"] == selected]
    return {
        "trial_id": selected,
        "config": configs[selected].to_json()["values"],
        "score": trial["score"],
        "score_se": trial.get("score_se"),
        "metric": trial["metric"],
        "samples": trial["samples_spent"],
        "test": progress.test,
        "attributed_joules": sum_known(joules),  # measured: its share of every window, compilation included
        "training_joules": sum_known(trained),
        "interrupted_joules": sum_known(lost_joules),
        "energy_method": energy_method,
    }


def assemble_results(
    progress: StudyState,
    everything: list[dict[str, Any]],
    *,
    study: str,
    spec: Any,
    configs: dict[int, Config],
    replicate_of: dict[int, int],
    hardware: dict[str, Any],
    energy_method: str,
    intensity_label: str,
    metric_name: str,
    placement: dict[str, Any],
    wall_seconds: float,
    ledger_damage: list[dict[str, Any]] | None = None,
    running_attempt: int | None = None,
    plan: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The results of a study from its state and ledger records. Energy of phases no attempt
    committed is the interrupted attempts' (killed, their work repeated), except that of
    ``running_attempt`` (a study running now), which is in progress."""
    records, in_flight, lost = sort_records(progress.completed_by, everything, running_attempt)
    by_phase = summarize(records)
    selected = progress.selected
    out: dict[str, Any] = {
        "study": study,
        "mode": spec.mode,
        "objective": spec.effective().objective,
        "space": spec.space,
        "energy_method": energy_method,
        "energy_note": hardware.get("energy_note", ""),
        "metered_devices": hardware.get("metered_devices"),
        "meter_events": hardware.get("meter_events", []),
        "intensity_label": intensity_label,
        "idle": hardware["idle"],
        "energy_by_phase": by_phase,
        "interrupted_energy_by_phase": summarize(lost),
        "in_progress_energy_by_phase": summarize(in_flight),
        "wall_seconds_this_attempt": wall_seconds,
        "attempts": max((r.get("attempt", 0) for r in everything), default=0),
        "decisions": progress.decisions,
        "finalists": progress.finalists,
        "infeasible": progress.infeasible,
        "hardware": progress.hardware,
        "metric_name": metric_name,
        "num_configs": len(configs) - len(replicate_of),
        "replicates": len(replicate_of),
        "seed_noise": progress.seed_noise,
        "placement": placement,
        "ledger_damage": ledger_damage or [],
        "curves": progress.curves,
        "yardsticks": progress.yardsticks,
        "rounds": [{k: v for k, v in r.items() if k != "alive"} for r in progress.rounds],
    }
    totals = [g["joules"] for g in by_phase.values()]
    out["total_joules"] = sum_known(totals)
    lost_totals = [g["joules"] for g in out["interrupted_energy_by_phase"].values()]
    out["interrupted_joules"] = sum_known(lost_totals)
    out["whole_span"] = whole_span(everything, out["attempts"], running_attempt)
    out["plan"] = plan_vs_actual(plan, by_phase, out["whole_span"])
    out["stopped"], out["stops"], out["budget_checks"] = progress.stopped, progress.stops, progress.budget_checks
    flight_totals = [g["joules"] for g in out["in_progress_energy_by_phase"].values()]
    out["in_progress_joules"] = sum_known(flight_totals)
    out["trials"] = trial_table(progress, records, configs, replicate_of)
    if selected is None:
        out["selected"] = None
        out["note"] = "no configuration survived (all diverged or infeasible)"
        return out
    out["selected"] = _selected(progress, selected, records, lost, configs, energy_method)
    return out
