"""Hyperband (Li et al., JMLR 18(185), 2018) from Python: a study of ``mode="hyperband"``, whose
brackets are its rounds (:class:`sm2jax.schedule.HyperbandScheduler`), in one folder with one
ledger, one report and one selection -- and the runs of the earlier layout, one study per bracket
in ``bracket-S/``, finished as they were begun."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from sm2jax.compile_cache import enable_compile_cache
from sm2jax.data import ArrayDataset
from sm2jax.energy.ledger import sum_known
from sm2jax.schedule import get_scheduler
from sm2jax.spec import StudySpec
from sm2jax.store.folder import StudyDir
from sm2jax.study import Study


def run_hyperband(
    directory: str | os.PathLike,
    spec: StudySpec,
    *,
    progress: bool = True,
    nvml: Any = None,
    dataset: ArrayDataset | None = None,
    devices: Any = None,
) -> dict[str, Any]:
    """Runs (or resumes) Hyperband on ``spec``'s space in ``directory``: ``Study(directory,
    replace(spec, mode="hyperband")).run()``, whose brackets ``s = s_max .. 0`` are its rounds
    (``spec.max_budget`` is R; see :class:`~sm2jax.schedule.HyperbandScheduler`). A folder holding
    a Hyperband run of the earlier layout (:meth:`~sm2jax.store.folder.StudyDir.bracket_run`) is
    finished bracket by bracket, as it was begun. ``devices``: see :class:`Study`."""
    enable_compile_cache()  # a bad cache path is one line before anything is written
    folder = StudyDir(directory)
    options = dict(progress=progress, nvml=nvml, dataset=dataset, devices=devices)
    if folder.bracket_run():
        held = folder.spec_blob()["hyperband"]
        return finish_bracket_run(folder, dataclasses.replace(spec, mode=held.get("mode", spec.mode)), **options)
    return Study(folder.path, dataclasses.replace(spec, mode="hyperband"), **options).run()


def finish_bracket_run(folder: StudyDir, spec: StudySpec, **options: Any) -> dict[str, Any]:
    """A Hyperband run of the earlier layout (``spec.json`` = ``{"hyperband": spec}``): one
    successive-halving :class:`Study` per bracket in ``bracket-S/`` (bracket ``s`` samples ``n``
    random configurations with seed ``spec.seed + s``; rungs ``r_i = R * eta**(i - s)`` keeping
    ``floor(n_i / eta)``), the winner the best score over the brackets. Finished brackets are read
    back, so such a run resumes bracket by bracket where it stopped. Kept so that runs begun by
    an earlier version finish and report; a new run is one study (:func:`run_hyperband`)."""
    if spec.max_energy_joules is not None or spec.max_wall_seconds is not None:
        raise ValueError(
            "a budget (--budget-kwh, --budget-hours) caps one study, and Hyperband runs one per bracket: cap a study (--mode sm2 or sh) instead"
        )
    folder.claim({"hyperband": spec.to_json()}, normalise=_current_form)  # refuses an edited spec
    outcomes = []
    for b in get_scheduler("hyperband").brackets(spec):  # the same brackets as a Hyperband study's rounds
        rungs = [r["r"] for r in b["rungs"]]
        sub = dataclasses.replace(
            spec,
            mode="sh",
            sampler="random",
            num_samples=int(b["n"]),
            seed=spec.seed + int(b["s"]),
            min_budget=rungs[0],
            rungs=rungs,
            keep_rule="floor",
            explore_budget=0.0,
            objective="performance",
            rounds=1,
            extensions=[],
            warm_start=None,
        )
        result = Study(folder.bracket(b["s"]), sub, **options).run()
        outcomes.append(
            {
                **{k: b[k] for k in ("s", "n", "r")},
                "rungs": b["rungs"],
                "selected": result["selected"],
                "total_joules": result["total_joules"],
                "energy_method": result["energy_method"],
            }
        )
    scored = [o for o in outcomes if o["selected"] is not None and o["selected"]["score"] is not None]
    best = max(scored, key=lambda o: o["selected"]["score"]) if scored else None
    results = {
        "study": folder.path,
        "mode": "hyperband",
        "brackets": outcomes,
        "selected": None if best is None else {**best["selected"], "bracket": best["s"]},
        "total_joules": sum_known([o["total_joules"] for o in outcomes]),
        "energy_method": outcomes[0]["energy_method"] if outcomes else None,
    }
    folder.write_results(results)
    return results


def _current_form(blob: dict[str, Any]) -> dict[str, Any]:
    """A stored Hyperband spec of the earlier layout in this version's form (fields added since
    take their defaults, as ``sm2jax resume`` reads it), so that an older run resumes."""
    return {"hyperband": StudySpec(**blob["hyperband"]).to_json()}
