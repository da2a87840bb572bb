"""Tables (CSV) and figures (PNG) of a finished study: what ``sm2jax report DIR`` writes.

Tables, loadable with ``pandas.read_csv`` or the standard ``csv`` module:

* ``trials.csv``: one row per configuration -- its values, cohort, status (``selected``,
  ``finalist``, the reason code it was dropped for, ``infeasible``), the last phase it trained in,
  its last score and metric, samples trained, and the energy attributed to it (J, kWh, gCO2e);
* ``decisions.csv``: every keep/drop decision with its scores, errors, energies and reason;
* ``energy.csv``: energy by phase (compilation, probe, exploration, each rung) with kWh and gCO2e.

Figures (matplotlib, the optional ``[plot]`` extra; without it the tables are still written):

* ``score_vs_energy.png``: every configuration's last metric against its training energy (compilation,
  a cohort's shared cost, in the title), the score/energy Pareto front of the configurations measured
  at the same budget, and the selection;
* ``survival.png``: one row per configuration, spanning the phases it trained in, ending with why it
  stopped; the selection highlighted;
* ``energy_by_phase.png``: energy of each phase, compilation and probe included (log scale where the
  phases differ by more than 10x);
* ``learning_curves.png``: every configuration's training loss per window and validation score per
  phase against samples trained.

Energy labelled ``estimated`` is an estimate, not a measurement; where energy is unavailable the
figures say so and plot samples trained instead.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
from collections.abc import Callable
from typing import Any

from sm2jax.energy.ledger import sum_known
from sm2jax.rounds import parse_label
from sm2jax.schedule.candidates import non_dominated
from sm2jax.store.files import write_atomic

PLOT_HINT = "plots need matplotlib: pip install 'sm2jax[plot]' (the CSV tables were written)"


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return value


def _write_csv(path: str, rows: list[dict[str, Any]], columns: list[str]) -> None:
    """Writes the table whole or not at all (a full disk leaves no truncated file)."""
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    write_atomic(path, text.getvalue().encode())


def trial_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """``results['trials']`` flattened: one column per configuration value."""
    rows = []
    for t in results.get("trials", []):
        row = {k: v for k, v in t.items() if k != "config"}
        row.update({f"config.{k}": v for k, v in t["config"].items()})
        rows.append(row)
    return rows


def energy_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """``results['energy_by_phase']`` as rows (kWh and gCO2e as the ledger converted them)."""
    return [
        {"phase": phase, **{k: v for k, v in g.items() if k != "methods"}, "methods": ",".join(g["methods"])}
        for phase, g in results.get("energy_by_phase", {}).items()
    ]


def write_tables(results: dict[str, Any], directory: str | os.PathLike) -> list[str]:
    """Writes ``trials.csv``, ``decisions.csv`` and ``energy.csv`` into ``directory``; returns the paths."""
    return _write_all(table_writers, results, directory)


def _write_all(writers: Callable, results: dict[str, Any], directory: str | os.PathLike) -> list[str]:
    """Runs every ``(path, write)`` of ``writers(results, directory)`` in turn; returns the paths."""
    os.makedirs(directory, exist_ok=True)
    paths = []
    for path, write in writers(results, directory):
        write()
        paths.append(path)
    return paths


def table_writers(results: dict[str, Any], directory: str | os.PathLike) -> list[tuple[str, Callable[[], None]]]:
    """``(path, write)`` for each table, so that a caller can write each on its own (one that
    fails does not stop the others)."""
    writers = []
    trials = trial_rows(results)
    config_cols = sorted({k for r in trials for k in r if k.startswith("config.")})
    base = [
        "trial_id",
        "cohort",
        "round",
        "status",
        "last_phase",
        "score",
        "score_se",
        "metric",
        "samples",
        "energy_joules",
        "kwh",
        "gco2e",
        "reason",
    ]
    writers.append((os.path.join(directory, "trials.csv"), (trials, base + config_cols)))
    decisions = results.get("decisions", [])
    first = [
        "phase",
        "trial_id",
        "cohort",
        "kept",
        "reason_code",
        "score",
        "score_se",
        "samples_spent",
        "energy_spent_j",
        "decision_energy_j",
        "reason",
    ]
    rest = sorted({k for d in decisions for k in d} - set(first))
    writers.append((os.path.join(directory, "decisions.csv"), (decisions, first + rest)))
    energy = ["phase", "joules", "net_joules", "seconds", "methods", "kwh", "gco2e", "windows"]
    writers.append((os.path.join(directory, "energy.csv"), (energy_rows(results), energy)))
    return [(path, functools.partial(_write_csv, path, *table)) for path, table in writers]


def compare_rows(studies: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per finished study (e.g. SM2, SH and full search on identical work): the selected
    configuration, its validation and test metric, samples trained, and energy split into training
    (exploration and rungs) and compilation (+ probe); ratios against the first study's samples and
    training energy. Samples trained do not depend on the hardware; an *estimated* energy of a tiny
    study is dominated by per-window overheads."""
    rows = []
    base = base_samples = None
    for r in studies:
        phases = r.get("energy_by_phase", {})

        def total(names):
            values = [g["joules"] for p, g in phases.items() if p in names]
            return sum_known(values)

        training = total([p for p in phases if parse_label(p)[1] == "explore" or parse_label(p)[1].startswith("rung-")])
        base = training if base is None else base
        samples = sum(t["samples"] for t in r["trials"]) if "trials" in r else None
        base_samples = samples if base_samples is None else base_samples
        sel = r.get("selected") or {}
        test = sel.get("test") or {}
        rows.append(
            {
                "study": os.path.basename(str(r.get("study", "")).rstrip("/")),
                "mode": r.get("mode"),
                "rounds": max(len(r.get("rounds") or []), 1),
                "selected_trial": sel.get("trial_id"),
                f"val_{r.get('metric_name', 'metric')}": sel.get("metric"),
                f"test_{r.get('metric_name', 'metric')}": test.get("metric"),
                "samples_trained": samples,
                "samples_vs_first": None if samples is None or not base_samples else samples / base_samples,
                "training_joules": training,
                "compile_joules": total(["compile", "probe"]),
                "programs_compiled": (r.get("compilation") or {}).get("backend_compiles"),
                "programs_loaded": (r.get("compilation") or {}).get("cache_hits"),
                "total_joules": r.get("total_joules"),
                "training_vs_first": None if training is None or not base else training / base,
                "energy_method": r.get("energy_method"),
            }
        )
    return rows


def compile_warning(rows: list[dict[str, Any]]) -> str | None:
    """A warning when the studies compared differ in compilation: some compiled their programs,
    others loaded them from the persistent cache, or their compilation energies differ more than
    2x (their total energies are not comparable; their training energies are)."""
    compiled = [r["study"] for r in rows if r.get("programs_compiled")]
    loaded = [r["study"] for r in rows if not r.get("programs_compiled") and r.get("programs_loaded")]
    if compiled and loaded:
        return (
            f"note: {', '.join(compiled)} compiled programs while {', '.join(loaded)} loaded them from the compile cache:"
            " compare training_joules (compile_joules is shown apart), not total_joules"
        )
    joules = {r["study"]: r["compile_joules"] for r in rows if r.get("compile_joules")}
    if len(joules) > 1 and max(joules.values()) > 2 * min(joules.values()):
        spread = ", ".join(f"{s} {j:,.1f} J" for s, j in joules.items())
        return f"note: compilation cost differs more than 2x ({spread}): compare training_joules (compile_joules is shown apart), not total_joules"
    return None


# ----------------------------------------------------------------------------------------- plots


def _phases(results: dict[str, Any]) -> list[str]:
    seen: list[str] = []
    for d in results.get("decisions", []):
        if d["phase"] not in seen:
            seen.append(d["phase"])
    return seen


def _energy_label(results: dict[str, Any], what: str = "energy attributed to it") -> str:
    method = results.get("energy_method") or "unavailable"
    return f"{what} (J, {method}{': not a measurement' if method == 'estimated' else ''})"


def training_joules(trial: dict[str, Any]) -> float | None:
    """A configuration's training energy (its training windows: exploration and rungs), or, for
    results from before energy was kept by kind, everything attributed to it."""
    kinds = trial.get("energy_by_kind")
    return trial["energy_joules"] if kinds is None else kinds.get("train")


def pareto_front(points: list[tuple[float, float, int]]) -> list[int]:
    """Ids of the points ``(energy, score, id)`` that no other point beats on both (less or equal
    energy and higher or equal score, one strictly: :func:`~sm2jax.schedule.candidates.non_dominated`),
    in increasing energy."""
    front = [points[k] for k in non_dominated([(score, energy) for energy, score, _ in points])]
    return [i for _, _, i in sorted(front, key=lambda p: (p[0], -p[1]))]


def plot_score_vs_energy(results: dict[str, Any]):
    """Every configuration's last metric against its training energy (samples trained where energy
    is unavailable; compilation, a cohort's cost shared by its configurations, is in the title), the
    Pareto front (score up, energy down) among the configurations measured at the same budget -- the
    furthest phase reached -- and the selection."""
    from matplotlib.figure import Figure

    trials = [t for t in results.get("trials", []) if t["score"] is not None]
    by_kind = bool(trials) and all("energy_by_kind" in t for t in trials)
    have_energy = bool(trials) and all(training_joules(t) is not None for t in trials)
    x_of = training_joules if have_energy else (lambda t: t["samples"])
    fig = Figure(figsize=(6.4, 4.4), layout="constrained")
    ax = fig.add_subplot()
    by_status: dict[str, list[dict[str, Any]]] = {}
    for t in trials:
        by_status.setdefault(
            "selected"
            if t["status"] == "selected"
            else "finalist"
            if t["status"] == "finalist"
            else f"stopped at {t['last_phase']}",
            [],
        ).append(t)
    order = sorted(by_status, key=lambda s: (s == "selected", s == "finalist", s))
    for status in order:
        group = by_status[status]
        style = (
            {"marker": "*", "s": 220, "color": "crimson", "zorder": 4}
            if status == "selected"
            else {"s": 28, "alpha": 0.8}
        )
        ax.scatter([x_of(t) for t in group], [t["metric"] for t in group], label=status, **style)
    phases = _phases(results)
    furthest = max((t["last_phase"] for t in trials if t["last_phase"] in phases), key=phases.index, default=None)
    peers = [t for t in trials if t["last_phase"] == furthest]  # one budget: their scores compare
    front = pareto_front([(x_of(t), t["score"], t["trial_id"]) for t in peers])
    by_id = {t["trial_id"]: t for t in trials}
    if len(front) > 1:
        ax.plot(
            [x_of(by_id[i]) for i in front],
            [by_id[i]["metric"] for i in front],
            "k--",
            lw=1,
            label=f"Pareto front at {furthest} (score, energy)",
        )
    sel = results.get("selected")
    if sel is not None and sel["trial_id"] in by_id:
        t = by_id[sel["trial_id"]]
        ax.annotate(
            f"selected: trial {t['trial_id']}",
            (x_of(t), t["metric"]),
            textcoords="offset points",
            xytext=(-10, -16),
            ha="right",  # inside the axes: the selection is often the rightmost point
            color="crimson",
        )
    if trials and min(x_of(t) for t in trials) > 0:
        from matplotlib.ticker import LogLocator, NullFormatter

        ax.set_xscale("log")  # labels on a few ticks only: minor labels within a decade overlap
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(lambda x, _: f"{x:g}")
        ax.xaxis.set_minor_formatter(NullFormatter())
    what = "training energy" if by_kind else "energy attributed to it, compilation included"
    ax.set_xlabel(_energy_label(results, what) if have_energy else "samples trained (energy unavailable)")
    ax.set_ylabel(f"validation {results.get('metric_name', 'metric')} (last phase reached)")
    compile_j = sum(
        (g["joules"] or 0.0) for p, g in results.get("energy_by_phase", {}).items() if p in ("compile", "probe")
    )
    note = f"; compilation {compile_j:,.3g} J apart, not on this axis" if by_kind and compile_j else ""
    ax.set_title(f"{len(trials)} configurations, mode {results.get('mode')}{note}", fontsize=9)
    ax.legend(fontsize=7, loc="best")
    return fig


def plot_learning_curves(results: dict[str, Any]):
    """Per configuration, its mean training loss per energy window (top) and its validation score
    per phase (bottom) against samples trained: one line each, coloured by cohort, ending where the
    configuration was dropped; the selection drawn bold."""
    from matplotlib.figure import Figure

    curves = results.get("curves") or {}
    trials = {t["trial_id"]: t for t in results.get("trials", [])}
    cohorts = sorted({t["cohort"] for t in trials.values()})
    colors = {c: f"C{i % 10}" for i, c in enumerate(cohorts)}
    sel = (results.get("selected") or {}).get("trial_id")
    fig = Figure(figsize=(7.2, 6.4), layout="constrained")
    loss_ax, val_ax = fig.subplots(2, 1, sharex=True)
    for key, curve in sorted(curves.items(), key=lambda kv: int(kv[0])):
        t = trials.get(int(key), {})
        style = {"color": colors.get(t.get("cohort"), "grey"), "alpha": 0.55, "lw": 1.0}
        if int(key) == sel:
            style.update(alpha=1.0, lw=2.6, zorder=5)
        train = [p for p in curve.get("train", []) if p[1] is not None]
        val = [p for p in curve.get("val", []) if p[1] is not None]
        if train:
            loss_ax.plot([p[0] for p in train], [p[1] for p in train], **style)
        if val:
            val_ax.plot([p[0] for p in val], [p[1] for p in val], marker="o", ms=2.5, **style)
    for cohort in cohorts:  # one legend entry per cohort
        val_ax.plot([], [], color=colors[cohort], label=cohort)
    if sel is not None:  # the legend draws it as the figure does: bold, in its cohort's colour
        color = colors.get(trials.get(sel, {}).get("cohort"), "grey")
        val_ax.plot([], [], color=color, lw=2.6, label=f"selected: trial {sel}")
    loss_ax.set_ylabel("training loss (mean per window)")
    loss_ax.set_yscale(
        "log" if any(p[1] and p[1] > 0 for c in curves.values() for p in c.get("train", [])) else "linear"
    )
    val_ax.set_ylabel(f"validation score ({results.get('metric_name', 'metric')}, higher is better)")
    val_ax.set_xlabel("training samples")
    val_ax.legend(fontsize=6, loc="best")
    loss_ax.set_title(f"learning curves: {len(curves)} configurations (lines end where dropped)")
    return fig


def survival_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The survival chart's rows, top to bottom: configurations that got furthest first (then by
    score); each with its label, the index of the last phase it trained in and why it stopped."""
    phases = _phases(results)
    rows = []
    for t in results.get("trials", []):
        last = phases.index(t["last_phase"]) if t["last_phase"] in phases else -1
        lr = t["config"].get("learning_rate")
        label = f"trial {t['trial_id']} ({t['cohort'].rsplit('-', 1)[0]}" + (
            f", lr {lr:.3g})" if isinstance(lr, (int, float)) else ")"
        )
        rows.append(
            {"trial_id": t["trial_id"], "label": label, "last": last, "status": t["status"], "score": t["score"]}
        )
    rows.sort(key=lambda r: (-r["last"], -(r["score"] if r["score"] is not None else -float("inf")), r["trial_id"]))
    return rows


def plot_survival(results: dict[str, Any]):
    """One bar per configuration over the phases it trained in, ending with why it stopped."""
    from matplotlib.figure import Figure

    phases = _phases(results)
    rows = survival_rows(results)
    fig = Figure(figsize=(7.5, max(2.5, 0.22 * len(rows) + 1.2)), layout="constrained")
    ax = fig.add_subplot()
    for y, r in enumerate(rows):
        color = "crimson" if r["status"] == "selected" else "tab:green" if r["status"] == "finalist" else "tab:gray"
        if r["last"] >= 0:
            ax.barh(y, r["last"] + 1, left=-0.5, height=0.6, color=color, alpha=0.85)
        ax.text(max(r["last"], 0) + 0.6, y, r["status"], va="center", fontsize=7)
    ax.set_yticks(range(len(rows)), [r["label"] for r in rows], fontsize=7)
    ax.invert_yaxis()
    ax.set_xticks(range(len(phases)), phases)
    ax.set_xlim(-0.5, len(phases) + 1.5)
    ax.set_xlabel("phase (bar: trained in it; text: status after its last phase)")
    ax.set_title("which configuration was dropped where, and why")
    return fig


def plot_energy_by_phase(results: dict[str, Any]):
    """Energy of each phase (compilation and probe included); unavailable phases say so."""
    from matplotlib.figure import Figure

    rows = energy_rows(results)
    fig = Figure(figsize=(6.4, 3.6), layout="constrained")
    ax = fig.add_subplot()
    names = [r["phase"] for r in rows]
    known = [r["joules"] for r in rows if r["joules"]]
    floor = min(known) / 3 if known else 1.0
    values = [r["joules"] if r["joules"] else floor for r in rows]
    colors = ["tab:orange" if n in ("compile", "probe") else "tab:blue" for n in names]
    bars = ax.bar(names, values, color=[c if r["joules"] else "none" for c, r in zip(colors, rows)])
    if known and max(known) > 10 * min(known):  # training beside compilation spans orders of magnitude
        ax.set_yscale("log")
    for bar, r in zip(bars, rows):
        ax.text(
            bar.get_x() + bar.get_width() / 2,
            bar.get_height(),
            "unavailable" if r["joules"] is None else f"{r['joules']:.3g} J",
            ha="center",
            va="bottom",
            fontsize=7,
        )
    idle = results.get("idle") or {}
    note = f"idle baseline {idle['watts']:.2f} W" if idle.get("watts") is not None else "idle baseline: not measured"
    ax.set_ylabel(f"joules ({results.get('energy_method')}{', log scale' if ax.get_yscale() == 'log' else ''})")
    ax.set_title(f"energy by phase ({note})")
    return fig


def write_plots(results: dict[str, Any], directory: str | os.PathLike) -> list[str]:
    """Writes the four PNGs into ``directory``; raises ``ImportError`` (with :data:`PLOT_HINT`)
    when matplotlib is not installed."""
    return _write_all(plot_writers, results, directory)


def plot_writers(results: dict[str, Any], directory: str | os.PathLike) -> list[tuple[str, Callable[[], None]]]:
    """``(path, write)`` for each figure (see :func:`table_writers`); raises ``ImportError`` (with
    :data:`PLOT_HINT`) when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError(PLOT_HINT) from None

    def write(path: str, make: Callable) -> None:
        png = io.BytesIO()
        make(results).savefig(png, dpi=110, format="png")  # a Figure of its own (no pyplot state to close)
        write_atomic(path, png.getvalue())  # whole or not at all

    makers = {
        "score_vs_energy": plot_score_vs_energy,
        "survival": plot_survival,
        "energy_by_phase": plot_energy_by_phase,
        "learning_curves": plot_learning_curves,
    }
    paths = {name: os.path.join(os.fspath(directory), f"{name}.png") for name in makers}
    return [(paths[name], functools.partial(write, paths[name], make)) for name, make in makers.items()]
