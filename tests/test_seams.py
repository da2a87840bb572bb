"""The seams a newcomer adds to, used from outside the package: a searcher (what to try) and a
scheduler (when to stop), each defined in this file alone and run in a real study."""

import functools
import json

import pytest
from conftest import quick_spec

from sm2jax import Study
from sm2jax.report import format_results
from sm2jax.schedule import PhaseDecision, Scheduler, register_scheduler
from sm2jax.schedule.halving import finalist_front
from sm2jax.search import Searcher, register_searcher
from sm2jax.space import LogUniform, make_config


class Ends(Searcher):
    """The two ends of the learning-rate domain and their geometric middle."""

    name = "ends"
    calls = 0

    def propose(self, space, n, *, seed, first_id=0, history=(), multiple=8):
        Ends.calls += 1
        lr = space.domains["learning_rate"]
        rates = [lr.low, (lr.low * lr.high) ** 0.5, lr.high]
        return [make_config(first_id + i, learning_rate=r, batch_size=64) for i, r in enumerate(rates)]


class KeepTwo(Scheduler):
    """A warm-up at the smallest budget keeps the best two; the final phase selects one."""

    name = "keep-two"

    def phases(self, spec):
        return [("warm-up", spec.min_budget), ("final", spec.max_budget)]

    def decide(self, phase, candidates, rules, *, last, seed_se=0.0):
        order = sorted(candidates, key=lambda c: (-c.score, c.trial_id))
        kept = [c.trial_id for c in order[: 1 if last else 2]]
        records = [
            {
                "trial_id": c.trial_id,
                "score": c.score,
                "kept": c.trial_id in kept,
                "reason_code": "best" if c.trial_id in kept else "below",
                "reason": f"rank {order.index(c) + 1} of {len(order)}",
            }
            for c in candidates
        ]
        return PhaseDecision(kept, records, kept[0] if last else None, finalist_front(candidates) if last else [])


register_searcher(Ends())
register_scheduler(KeepTwo())


@pytest.mark.slow  # a whole study
def test_a_searcher_and_a_scheduler_from_outside_run_a_study(tmp_path):
    spec = quick_spec(
        {"learning_rate": LogUniform(1e-3, 1e-1)}, sampler="ends", mode="keep-two", explore_budget=0.0, replicates=0
    )
    before = Ends.calls
    results = Study(tmp_path / "s", spec, progress=False).run()
    phases = [d["phase"] for d in results["decisions"]]
    assert phases.count("warm-up") == 3 and phases.count("final") == 2
    final = {d["trial_id"]: d["score"] for d in results["decisions"] if d["phase"] == "final"}
    assert results["selected"]["trial_id"] == max(final, key=final.get)
    assert set(results["energy_by_phase"]) >= {"warm-up", "final"}
    proposed = json.loads((tmp_path / "s" / "proposals.json").read_text())
    assert [c["values"]["learning_rate"] for c in proposed["configs"]] == [1e-3, 1e-2, 1e-1]
    assert "test_seams" in json.loads((tmp_path / "s" / "spec.json").read_text())["imports"]
    # What the searcher proposed is kept: running the finished study again, or reporting it,
    # proposes nothing again.
    again = Study(tmp_path / "s", progress=False).run()
    assert again["selected"]["trial_id"] == results["selected"]["trial_id"] and Ends.calls == before + 1
    assert "final" in format_results(again)


def _registries():
    """Every kind a study names by a string: its registry, a built-in name, and how to register one."""
    import optax

    import sm2jax
    from sm2jax.data import DATASETS, load_digits
    from sm2jax.models import MODELS, model_builder
    from sm2jax.schedule import _SCHEDULERS, HalvingScheduler
    from sm2jax.search import _SEARCHERS, RandomSearcher
    from sm2jax.tasks import TASKS, Task, get_task
    from sm2jax.vocabulary import HYPERPARAMETERS, OPTIMIZERS

    mse = get_task("regression")
    task = lambda n: Task(n, mse.loss, mse.metric, mse.metric_name, mse.higher_is_better)
    return [
        (MODELS, "mlp", lambda n: sm2jax.register_model(n, model_builder("mlp"))),
        (TASKS, "classification", lambda n: sm2jax.register_task(task(n))),
        (DATASETS, "digits", lambda n: sm2jax.register_dataset(n, functools.partial(load_digits))),
        (OPTIMIZERS, "adam", lambda n: sm2jax.register_optimizer(n, optax.lion)),
        (HYPERPARAMETERS, "weight_decay", lambda n: sm2jax.register_hyperparameter(n, 0.5)),
        (_SEARCHERS, "sobol", lambda n: register_searcher(_named(RandomSearcher(), n))),
        (_SCHEDULERS, "sh", lambda n: register_scheduler(_named(HalvingScheduler("sh"), n))),
    ]


def _named(obj, name):
    obj.name = name
    return obj


def test_every_kind_a_study_names_is_one_registry_with_one_behaviour():
    """Models, tasks, data sets, optimizers, hyperparameters, searchers and schedulers: a built-in
    name is never replaced, an unknown name is one line naming the known ones and how to register
    yours, a name registered again replaces the earlier entry, and each reads as a mapping."""
    for registry, builtin, register in _registries():
        assert builtin in registry.builtin() and registry.names()[0] in registry.builtin()
        before = registry[builtin]
        with pytest.raises(ValueError, match=rf"{registry.kind} {builtin!r} is built in and cannot be replaced") as err:
            register(builtin)
        assert "\n" not in str(err.value) and registry[builtin] is before
        with pytest.raises(
            ValueError, match=rf"unknown {registry.kind} 'nope'; known: .*{builtin}.*register yours with"
        ):
            registry.get("nope")
        assert registry.get("nope", None) is None and "nope" not in registry and {"a": 1} not in registry
        name = "my_" + registry.kind.replace(" ", "_")
        try:
            register(name)
            first = registry[name]
            register(name)  # a re-run notebook cell replaces it
            assert (
                registry[name] is not first
                and registry.names()[-1] == name
                and dict(registry.items())[name] is registry[name]
            )
        finally:
            registry.pop(name)
        assert name not in registry
        with pytest.raises(ValueError, match="built in"):
            registry.pop(builtin)
