"""Hyperband (Li et al., JMLR 18(185), 2018): one successive-halving study per bracket."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from sm2jax.budgets import hyperband_brackets
from sm2jax.compile_cache import enable_compile_cache
from sm2jax.data import ArrayDataset
from sm2jax.energy.ledger import sum_known
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
    """Runs Hyperband with one :class:`Study` per bracket, in ``directory/bracket-S/``.

    ``spec.max_budget`` is R; bracket ``s`` samples ``n`` random configurations (seed ``spec.seed + s``)
    and runs Li et al.'s inner loop on them: rungs ``r_i = R * eta**(i - s)`` keeping ``floor(n_i / eta)``
    (:func:`sm2jax.budgets.hyperband_brackets`; integral budgets ``R * eta**i // eta**s`` when the unit
    is steps or samples). The winner is the best score over the brackets.
    Finished brackets are read back, so a killed Hyperband run resumes bracket by bracket. Brackets
    of one shape reuse each other's compiled programs (in-process and through the persistent cache).
    ``devices``: the trials axis of every bracket (see :class:`Study`).
    """
    enable_compile_cache()  # a bad cache path is one line before anything is written
    if spec.max_energy_joules is not None or spec.max_wall_seconds is not None:
        raise ValueError(
            "a budget (--budget-kwh, --budget-hours) caps one study, and Hyperband runs one per bracket: cap a study (--mode sm2 or sh) instead"
        )
    folder = StudyDir(directory)
    folder.claim({"hyperband": spec.to_json()}, normalise=_current_form)  # refuses a directory holding another study
    integral = spec.budget_unit in ("steps", "samples") and spec.max_budget == int(spec.max_budget)
    brackets, outcomes = hyperband_brackets(spec.max_budget, spec.eta, integral=integral), []
    for b in brackets:
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
            rounds=1,  # a bracket is one round of random configurations
            extensions=[],
            warm_start=None,
        )
        result = Study(
            folder.bracket(b["s"]),
            sub,
            progress=progress,
            nvml=nvml,
            dataset=dataset,
            devices=devices,
        ).run()
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
    totals = [o["total_joules"] for o in outcomes]
    results = {
        "study": folder.path,
        "mode": "hyperband",
        "brackets": outcomes,
        "selected": None if best is None else {**best["selected"], "bracket": best["s"]},
        "total_joules": sum_known(totals),
        "energy_method": outcomes[0]["energy_method"] if outcomes else None,
    }
    folder.write_results(results)
    return results


def _current_form(blob: dict[str, Any]) -> dict[str, Any]:
    """A stored Hyperband spec in this version's form (fields added since take their defaults, as
    ``sm2jax resume`` reads it), so that an older run resumes."""
    return {"hyperband": StudySpec(**blob["hyperband"]).to_json()}
