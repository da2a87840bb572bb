"""A study's results as the plain text ``sm2jax report`` prints (:func:`format_results`), one
section after another."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from sm2jax.energy.ledger import sum_known
from sm2jax.plan import format_plan_vs_actual
from sm2jax.rounds import phase_order


def _joules(value: float | None, method: str | list[str]) -> str:
    label = ",".join(method) if isinstance(method, list) else method
    if value is None:
        return f"unavailable ({label})"
    return f"{value:,.1f} J [{label}]"


def _span_line(span: dict[str, Any]) -> str:
    """The whole span: windows plus the time between them (see :func:`sm2jax.energy.ledger.whole_span`)."""
    if span.get("running") is not None:
        return f"whole span: known when the running attempt ({span['running']}) ends and records it"
    if span["missing"]:
        return f"whole span: unknown (attempt(s) {', '.join(map(str, span['missing']))} ended without recording theirs: killed)"
    if span["joules"] is None:
        return "whole span: unavailable (the meter had no figure for it)"
    carbon = "" if span["kwh"] is None else f"; {span['kwh']:.3g} kWh, {span['gco2e']:.3g} gCO2e"
    head = f"whole span (first to last reading, {span['attempts']} attempt(s), {span['seconds']:,.1f} s): {_joules(span['joules'], span['methods'])}"
    if span["windows_joules"] is None:  # a window without a figure: the split is unknown, the span is not
        return f"{head}; its split into windows and the time between them is unknown (a window had no figure){carbon}"
    return (
        f"{head} = windows {span['windows_joules']:,.1f} J + between windows {span['between_joules']:,.1f} J over"
        f" {span['between_seconds']:,.1f} s (host work, checkpoints, Python, the idle baseline){carbon}"
    )


def format_results(results: dict[str, Any]) -> str:
    """The selected configuration, its metric and energy, energy by phase, and the decisions: what
    ``sm2jax report`` prints, one section after another."""
    lines = [f"study: {results['study']}  mode: {results['mode']}"]
    for section in (
        _status,
        _meter,
        _hyperband,
        _budget,
        _selection,
        _rounds,
        _phases,
        _totals,
        _hardware,
        _finalists,
        _decisions,
    ):
        lines += section(results)
    return "\n".join(lines)


def _status(results: dict[str, Any]) -> list[str]:
    """A study still running or interrupted: its status, phases done and left, ETA."""
    lines: list[str] = []
    partial = results.get("partial")
    if partial:
        holder = partial.get("holder") or {}
        who = f" (pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')})" if holder else ""
        resume = "" if holder else f"; `sm2jax resume {results['study']}` continues it"
        lines.append(
            f"status: {partial['status']}{who}, phases done: {', '.join(partial['phases_done']) or 'none'}{resume}"
            + (f"; in progress: {partial['in_progress']}" if partial.get("in_progress") else "")
        )
        eta = partial.get("eta_seconds")
        lines.append(
            f"  phases left: {', '.join(partial['phases_left']) or 'none'}; best validation score so far: {partial['best_score']}"
            + ("" if eta is None else f"; ETA ~{eta:,.0f} s (rough: the rate so far)")
        )
    return lines


def _rounds(results: dict[str, Any]) -> list[str]:
    """A study of several rounds: what each proposed, from how much, and what it selected."""
    rounds = results.get("rounds") or []
    if len(rounds) < 2:
        return []
    selected = (results.get("selected") or {}).get("trial_id")
    learned = any(r["observations"] for r in rounds)
    how = "round k proposed from every result of the rounds before it" if learned else "each drawn afresh"
    lines = [f"rounds: {len(rounds)} ({how})"]
    for r in rounds:
        best = next((f for f in r["finalists"] if f["trial_id"] == r["selected"]), None)
        score = "" if best is None else f": score {best['score']:.4g} +- {best['score_se']:.2g}"
        source = "at the start" if r["round"] == 1 else f"from {r['observations']} observations"
        source = source if r["round"] == 1 or r["observations"] else "independently of earlier results"
        mark = "  <- the study's selection" if r["selected"] == selected and selected is not None else ""
        bracket = f" (Hyperband bracket s={r['bracket']}, from budget {r['r']:g})" if "bracket" in r else ""
        lines.append(
            f"  round {r['round']}{bracket}: {r['configs']} configurations proposed {source}; selected trial {r['selected']}{score}{mark}"
        )
    return lines


def _meter(results: dict[str, Any]) -> list[str]:
    """How energy was obtained: the method, its note, each metered card, what changed while metering."""
    lines: list[str] = []
    method = results.get("energy_method") or "unavailable"
    if method == "estimated":
        lines.append("energy: ESTIMATED from process CPU time (no GPU counter, no readable RAPL) -- not a measurement")
    if results.get("energy_note"):
        lines.append(f"energy note: {results['energy_note']}")
    for d in results.get("metered_devices") or []:
        how = d.get("by", "")
        lines.append(f"  metered {d['nvml']}: {d.get('method', method)}" + (f" ({how})" if how else ""))
    for e in results.get("meter_events") or []:
        lines.append(f"  while metering (attempt {e.get('attempt', '?')}): {e['note']}")
    return lines


def _hyperband(results: dict[str, Any]) -> list[str]:
    """The brackets of a Hyperband run of the earlier layout (one study per bracket; a Hyperband
    study's brackets are its rounds: :func:`_rounds`)."""
    lines: list[str] = []
    if "brackets" in results:
        lines.append("brackets (s, n, r):")
        for b in results["brackets"]:
            s = b["selected"]
            best = "none" if s is None else f"trial {s['trial_id']} score {s['score']:.4f}"
            lines.append(
                f"  s={b['s']} n={b['n']} r={b['r']:.4g}: {best}, {_joules(b['total_joules'], b['energy_method'])}"
            )
    return lines


def _budget(results: dict[str, Any]) -> list[str]:
    """A budget's stops."""
    lines: list[str] = []
    for stop in results.get("stops") or []:
        lines.append(
            f"budget: stopped after {stop['phase']} ({stop['reason']}); continued by attempt {stop['continued_by']} with a raised budget"
        )
    stopped = results.get("stopped")
    if stopped:
        lines.append(
            f"STOPPED BY THE BUDGET after {stopped['phase']}: {stopped['reason']}. The selection is the best "
            f"configuration of {stopped['phase']}; `sm2jax resume {results['study']} --budget-kwh N` (or --budget-hours) continues with {stopped['before']}"
        )
    return lines


def _selection(results: dict[str, Any]) -> list[str]:
    """The selected configuration: its values, scores and yardsticks, and the energy attributed to it."""
    lines: list[str] = []
    method = results.get("energy_method") or "unavailable"
    sel = results.get("selected")
    if sel is None:
        lines.append("selected: none -- " + results.get("note", "no configuration survived"))
    else:
        cfg = sel["config"]
        keys = (
            "model",
            "optimizer",
            "batch_size",
            "learning_rate",
            "weight_decay",
            "schedule",
            "warmup_fraction",
            "dropout",
            "seed",
        )
        desc = " ".join(f"{k}={json.dumps(cfg[k]) if isinstance(cfg[k], dict) else cfg[k]}" for k in keys if k in cfg)
        lines.append(f"selected: trial {sel['trial_id']}: {desc}")
        metric_name = results.get("metric_name", "metric")
        se = f" (score +- {sel['score_se']:.4f})" if sel.get("score_se") is not None else ""
        lines.append(
            f"  validation {metric_name}: {sel['metric']:.4f}{se}"
            if sel.get("metric") is not None
            else f"  validation {metric_name}: n/a"
        )
        test = sel.get("test")
        if test and test.get("metric") is not None:
            lines.append(
                f"  test {metric_name}: {test['metric']:.4f} (score +- {test['score_se']:.4f}; held out, never used to select)"
            )
        elif "test" in sel:
            lines.append(f"  test {metric_name}: n/a (the data set has no test split)")
        yard = results.get("yardsticks")
        if yard:
            for name, label in (
                ("persistence", "persistence (the last hour)"),
                ("ridge", f"ridge regression (lambda {yard['ridge']['lambda']:g})"),
            ):
                figures = ", ".join(
                    f"{split} {yard[name][split]:.4f}" for split in ("val", "test") if split in yard[name]
                )
                lines.append(f"  yardstick {label}: {yard['metric']} {figures}")
        attributed = sel.get("attributed_joules", sel.get("energy_to_train_joules"))  # (the name before 2026-12)
        if "attributed_joules" in sel or "energy_to_train_joules" in sel:
            lines.append(
                f"  energy attributed to it: {_joules(attributed, method)} (its share of compile, exploration, rungs and evaluation)"
            )
            if sel.get("training_joules") is not None:
                lines.append(f"  of which training: {_joules(sel['training_joules'], method)} (exploration and rungs)")
            if sel.get("interrupted_joules"):
                lines.append(
                    f"  plus its share of interrupted attempts: {_joules(sel['interrupted_joules'], method)} (work repeated after a kill)"
                )
    return lines


def _phases(results: dict[str, Any]) -> list[str]:
    """Energy by phase, the idle baseline, host-only, interrupted and in-progress energy."""
    lines: list[str] = []
    method = results.get("energy_method") or "unavailable"
    if "energy_by_phase" in results:
        idle = results["idle"]
        net_known = idle["watts"] is not None
        lines.append(
            f"energy by phase:  {'gross':>30}  " + (f"{'above idle':>12}  " if net_known else "") + f"{'seconds':>8}"
        )
        order = sorted(results["energy_by_phase"], key=phase_order)
        idle_joules = 0.0
        for phase in order:
            g = results["energy_by_phase"][phase]
            net = "unavailable" if g["net_joules"] is None else f"{g['net_joules']:,.1f} J"
            lines.append(
                f"  {phase:<14} {_joules(g['joules'], g['methods']):>30}  "
                + (f"{net:>12}  " if net_known else "")
                + f"{g['seconds']:8.2f}"
            )
            if g["joules"] is not None and g["net_joules"] is not None and idle_joules is not None:
                idle_joules += g["joules"] - g["net_joules"]
            else:
                idle_joules = None
        if not net_known:
            lines.append(f"  idle baseline: unavailable ({idle.get('note') or idle['method']}): gross figures only")
        else:
            share = "unavailable" if idle_joules is None else f"{idle_joules:,.1f} J"
            lines.append(
                f"  idle baseline: {idle['watts']:.2f} W [{idle['method']}], measured over {idle['seconds']:.1f} s before the study;"
                f" idle share of the windows: {share}"
            )
        host = [(p, g) for p, g in results["energy_by_phase"].items() if "host_method" in g]
        if host:
            hj = [g["host_joules"] for _, g in host]
            total = "unavailable" if None in hj else f"{sum(hj):,.1f} J"
            lines.append(
                f"  host only (the accelerator is unmetered; not the study's energy): {total} [{host[0][1]['host_method']}]"
            )
        lost = results.get("interrupted_energy_by_phase") or {}
        if lost:
            parts = ", ".join(f"{p} {_joules(g['joules'], g['methods'])}" for p, g in sorted(lost.items()))
            lines.append(
                f"  interrupted attempts (killed runs; their work was repeated): {_joules(results.get('interrupted_joules'), method)} -- {parts}"
            )
        flight = results.get("in_progress_energy_by_phase") or {}
        if flight:
            parts = ", ".join(f"{p} {_joules(g['joules'], g['methods'])}" for p, g in sorted(flight.items()))
            lines.append(
                f"  in progress (the running attempt, phases not committed yet): {_joules(results.get('in_progress_joules'), method)} -- {parts}"
            )
    return lines


def _totals(results: dict[str, Any]) -> list[str]:
    """Ledger damage, the total, the whole span, plan against actual and the training line."""
    lines: list[str] = []
    method = results.get("energy_method") or "unavailable"
    for d in results.get("ledger_damage") or []:
        joules = "unknown joules" if d["joules"] is None else f"{d['joules']:,.1f} J"
        lines.append(
            f"  ledger damage: line {d['line']} ({d['reason']}; {joules}) moved to ledger.jsonl.damaged, not counted"
        )
    if results.get("total_joules") is not None or "energy_by_phase" in results:
        label = "total of the committed phases" if results.get("partial") else "total"
        lines.append(f"{label}: {_joules(results.get('total_joules'), method)}")
        span = results.get("whole_span")
        if span is not None:
            lines.append(_span_line(span))
        if results.get("plan"):
            lines += format_plan_vs_actual(results["plan"])
        by_phase = results.get("energy_by_phase") or {}
        training = [g["joules"] for p, g in by_phase.items() if p not in ("compile", "probe")]
        samples = sum(t.get("samples") or 0 for t in results.get("trials", []))
        if training and samples:
            joules = sum_known(training)
            lines.append(
                f"training: {_joules(joules, method)} for {samples:,} samples trained in all (exploration, rungs and"
                " evaluation; compare studies by these: compilation depends on what the compile cache held)"
            )
    return lines


def _hardware(results: dict[str, Any]) -> list[str]:
    """Compilation, the trials axis and each cohort's vmap width."""
    lines: list[str] = []
    comp = results.get("compilation")
    if comp:
        cache = comp.get("cache_dir") or "off"
        attempt = f"attempt {comp['attempt']}" if "attempt" in comp else "this attempt"
        lines.append(
            f"compilation ({attempt}): {comp['backend_compiles']} XLA compiles, {comp['cache_hits']} programs loaded from"
            f" the persistent cache ({cache}), saving ~{comp['cache_saved_seconds']:.1f} s of compilation"
        )
    widths = {name: hw["choices"] for name, hw in (results.get("hardware") or {}).items() if hw.get("choices")}
    where = results.get("placement")
    if where and (len(where["devices"]) > 1 or where["processes"] > 1):
        lines.append(
            f"trials axis: {len(where['devices'])} {where['platform']} devices"
            + (f" over {where['processes']} processes" if where["processes"] > 1 else "")
            + " (each trial's rows on one device)"
        )
    if widths:
        lines.append("vmap widths:")
        for name, choices in widths.items():
            last, build = choices[-1], [c["quick"] for c in choices if "quick" in c]
            program = "" if not build else "; quick training program" if build[-1] else "; optimised training program"
            lines.append(f"  {name}: width {last['width']} ({last['reason']}){program}")
    return lines


def _finalists(results: dict[str, Any]) -> list[str]:
    """The finalists with their scores and energy to train."""
    lines: list[str] = []
    method = results.get("energy_method") or "unavailable"
    sel = results.get("selected")
    if results.get("finalists"):
        lines.append(
            "finalists (score, energy to train; * = on the score/energy Pareto front; selection is by score, near-ties by energy to train):"
        )
        for f in results["finalists"]:
            mark = "*" if f["pareto"] else " "
            projected = f.get("projected_train_joules", f.get("energy_to_train_j"))  # (the name before 2026-12)
            energy = "unavailable" if projected is None else f"{projected:,.1f} J +- {f['energy_noise']:.0%} [{method}]"
            chosen = "  <- selected" if sel and f["trial_id"] == sel["trial_id"] else ""
            lines.append(
                f"  {mark} trial {f['trial_id']:>4} {f['cohort']:<40} score {f['score']:.4f} +- {f['score_se']:.4f}  {energy}{chosen}"
            )
    return lines


def _decisions(results: dict[str, Any]) -> list[str]:
    """Each phase's decisions: kept, dropped and why."""
    lines: list[str] = []
    if results.get("decisions"):
        lines.append(
            "decisions:"
            + (f" (seed replicates: {results['replicates']}, never selected)" if results.get("replicates") else "")
        )
        decisions = [d for d in results["decisions"] if d.get("reason_code") != "replicate"]
        noise = {n["phase"]: n for n in results.get("seed_noise") or []}
        by_phase: dict[str, Counter] = {}
        for d in decisions:
            by_phase.setdefault(d["phase"], Counter())["kept" if d["kept"] else "dropped"] += 1
        for phase, c in by_phase.items():
            dropped = [d for d in decisions if d["phase"] == phase and not d["kept"]]
            why = Counter(d.get("reason_code") or d["reason"].split(":")[0] for d in dropped)
            detail = ", ".join(f"{n} {r}" for r, n in why.items())
            seed = ""
            if phase in noise:
                n = noise[phase]
                seed = f"; seed noise +-{n['seed_se']:.4f} " + (
                    f"({n['pairs']} pairs)" if n["measured"] else f"(too few pairs: {n['pairs']}, none added)"
                )
            lines.append(
                f"  {phase:<10} kept {c['kept']}, dropped {c['dropped']}" + (f" ({detail})" if detail else "") + seed
            )
    return lines
