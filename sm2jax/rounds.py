"""Rounds of proposals: a study runs its schedule over rounds, each proposed from what came before.

A study of ``rounds = R`` splits ``num_samples`` over R rounds (``sm2jax extend`` adds more: the
spec's ``extensions``). Each round runs the whole schedule (SM2's exploration and rungs, plain
successive halving's rungs, ...) on its own configurations; round ``k``'s configurations are
proposed by the study's searcher from every result of rounds ``< k`` at every budget reached (a
model-based searcher picks its budget: :mod:`sm2jax.search.tpe`), and from a warm start's results.
The proposals of each round are written to ``proposals.json`` when made, before anything of the
round trains, so a resume takes them back and never proposes again.

The study's selection is decided over the final rungs of every round as the final rung decides
(:func:`select_across_rounds`): a configuration trained to the full budget in round 1 competes with
round 3's on the same terms. Round 1's phases keep their names (``explore``, ``rung-1``, ...; a
study of one round is exactly what it was before rounds); round ``k > 1``'s are ``rK.explore``, ...

Everything here is pure, or reads a folder; nothing trains.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from sm2jax.phases import cohort_rate
from sm2jax.schedule import RoundPlan, get_scheduler
from sm2jax.search import Observation, SearchContext, get_searcher
from sm2jax.space import Config, SearchSpace


@dataclasses.dataclass(frozen=True)
class Step:
    """One phase of a study's whole schedule: its ``round``, its ``index`` inside the round, the
    scheduler's ``name`` for it (``explore``, ``rung-2``), its ``label`` in the study's records
    (unique over rounds) and its cumulative ``budget``; ``round_end``: the last phase of its round."""

    round: int
    index: int
    name: str
    label: str
    budget: float
    round_end: bool


def split(total: int, parts: int) -> list[int]:
    """``total`` configurations over ``parts`` rounds, as evenly as can be (earlier rounds first)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def requested_sizes(spec: Any) -> list[int]:
    """The rounds the spec asks for: ``num_samples`` over ``rounds``, then each extension's
    ``samples`` over its ``rounds``."""
    sizes = split(spec.num_samples, spec.rounds)
    for ext in spec.extensions:
        sizes += split(int(ext["samples"]), int(ext.get("rounds", 1)))
    return sizes


def round_plans(spec: Any) -> list[RoundPlan]:
    """Every round as the study's scheduler runs it (its size and phases): by default the
    requested sizes, each with the same phases; Hyperband's brackets (:mod:`sm2jax.schedule`)."""
    return get_scheduler(spec.mode).rounds(spec, requested_sizes(spec))


def round_sizes(spec: Any) -> list[int]:
    """How many configurations each round proposes."""
    return [plan.size for plan in round_plans(spec)]


def several_rounds(spec: Any) -> bool:
    """Whether ``spec`` runs more than one round (its own, or an extension's)."""
    return len(round_sizes(spec)) > 1


def label(round_: int, name: str) -> str:
    return name if round_ == 1 else f"r{round_}.{name}"


def parse_label(text: str) -> tuple[int, str]:
    """``(round, name)`` of a phase label (:func:`label`'s inverse; a plain name is round 1's)."""
    head, dot, rest = text.partition(".")
    if dot and head[:1] == "r" and head[1:].isdigit():
        return int(head[1:]), rest
    return 1, text


def phase_order(text: str) -> tuple:
    """A sort key for phase labels and the ledger's other phases: compilation, the probe, then
    each round's phases in the order they run (exploration first, rungs by number)."""
    round_, name = parse_label(text)
    number = name.rpartition("-")[2]
    return (text != "compile", text != "probe", round_, name != "explore", int(number) if number.isdigit() else 0, name)


def schedule(spec: Any) -> list[Step]:
    """Every phase of every round, in the order the study runs them."""
    return [
        Step(k, i, name, label(k, name), budget, i == len(plan.phases) - 1)
        for k, plan in enumerate(round_plans(spec), start=1)
        for i, (name, budget) in enumerate(plan.phases)
    ]


def round_phases(steps: Sequence[Step], round_: int) -> list[tuple[str, float]]:
    """Round ``round_``'s phases, ``(name, cumulative budget)``, from a study's ``steps``."""
    return [(s.name, s.budget) for s in steps if s.round == round_]


def check_rounds(spec: Any) -> None:
    """One line for rounds a spec cannot run (called by :class:`~sm2jax.spec.StudySpec`)."""
    get_scheduler(spec.mode).check(spec)  # (Hyperband's brackets are its rounds)
    searcher = get_searcher(spec.effective().sampler)
    grown = several_rounds(spec)
    if grown and searcher.fixed_size:
        raise ValueError(
            f"sampler {spec.sampler!r} proposes its whole set at once, so it cannot run in rounds: use --set rounds=1, or a sampler that proposes (tpe learns from earlier rounds; sobol, random)"
        )
    if spec.num_samples < spec.rounds:
        raise ValueError(
            f"num_samples ({spec.num_samples}) is below rounds ({spec.rounds}): each round proposes at least one configuration; raise --samples or lower --set rounds"
        )
    for ext in spec.extensions:
        if (
            not isinstance(ext, dict)
            or int(ext.get("samples", 0)) < int(ext.get("rounds", 1))
            or int(ext.get("rounds", 1)) < 1
        ):
            raise ValueError(
                f"extensions: {ext!r} must be {{'samples': N, 'rounds': R}} with N >= R >= 1 (sm2jax extend writes them)"
            )
    if spec.warm_start is not None and not searcher.learns:
        raise ValueError(
            f"warm_start seeds a searcher's model, and sampler {spec.sampler!r} learns nothing: use --set sampler=tpe, or drop warm_start"
        )
    if grown and (spec.max_energy_joules is not None or spec.max_wall_seconds is not None):
        raise ValueError(
            "a budget (--budget-kwh, --budget-hours) caps a study of one round: run the rounds without one, or --set rounds=1"
        )


# ------------------------------------------------------------------------------------ proposals


@dataclasses.dataclass
class Proposals:
    """What a study's searcher proposed, by round (``proposals.json``): round 1's configurations
    (seed replicates included) and ``replicate_of`` where they always were, and each later round's
    configurations with what they were proposed from (``rounds``)."""

    first: list[Config]
    replicate_of: dict[int, int]
    later: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @classmethod
    def from_json(cls, blob: dict[str, Any]) -> Proposals:
        later = [{**r, "configs": [Config.from_json(c) for c in r["configs"]]} for r in blob.get("rounds", [])]
        first = [Config.from_json(c) for c in blob["configs"]]
        return cls(first, {int(k): int(v) for k, v in blob["replicate_of"].items()}, later)

    def to_json(self) -> dict[str, Any]:
        blob = {
            "configs": [c.to_json() for c in self.first],
            "replicate_of": {str(k): v for k, v in self.replicate_of.items()},
        }
        if self.later:
            blob["rounds"] = [{**r, "configs": [c.to_json() for c in r["configs"]]} for r in self.later]
        return blob

    def rounds(self) -> int:
        return 1 + len(self.later)

    def of_round(self, round_: int) -> list[Config]:
        return self.first if round_ == 1 else self.later[round_ - 2]["configs"]

    def all(self) -> list[Config]:
        return [c for k in range(1, self.rounds() + 1) for c in self.of_round(k)]

    def round_of(self) -> dict[int, int]:
        return {c.trial_id: k for k in range(1, self.rounds() + 1) for c in self.of_round(k)}

    def add(self, round_: int, configs: list[Config], **about: Any) -> None:
        if round_ != self.rounds() + 1:
            raise ValueError(f"round {round_} proposed after round {self.rounds()}")
        self.later.append({"round": round_, **about, "configs": configs})


def observations(
    trials: dict[str, dict[str, Any]],
    configs: dict[int, Config],
    budgets: dict[str, float],
    cohort_energy: dict[str, list[dict[str, Any]]],
    *,
    replicate_of: dict[int, int],
    round_of: dict[int, int],
) -> list[Observation]:
    """Every result a study has: one :class:`Observation` per trial and phase it was scored in
    (``trials``: :attr:`~sm2jax.phases.StudyState.trials`; ``budgets``: phase label -> budget).
    Seed replicates are left out (they measure the noise: their configuration is observed)."""
    out = []
    for key, record in trials.items():
        t = int(key)
        if t in replicate_of or t not in configs:
            continue
        rate = cohort_rate(cohort_energy.get(record.get("cohort", ""), []))
        total = record.get("samples_total")
        train = rate * total if rate is not None and total else None
        for h in record["history"]:
            if h["phase"] in budgets:
                out.append(
                    Observation(
                        trial_id=t,
                        values=dict(configs[t].values),
                        budget=budgets[h["phase"]],
                        score=h["score"],
                        joules=h["energy_spent"],
                        score_se=h.get("score_se"),
                        train_joules=train,
                        round=round_of.get(t, 1),
                    )
                )
    return out


def propose(
    spec: Any,
    round_: int,
    history: Sequence[Observation],
    *,
    first_id: int,
    compiled: Sequence[Config] = (),
) -> list[Config]:
    """Round ``round_``'s configurations: the spec's searcher given ``history`` (and, if it learns,
    the study's objective and the static values of the ``compiled`` cohorts), seeded by the
    spec's seed and the round, numbered from ``first_id``."""
    from sm2jax.sampling import static_names

    searcher = get_searcher(spec.effective().sampler)
    space = SearchSpace.from_json(spec.space)
    plan = round_plans(spec)[round_ - 1]
    n, multiple = plan.size, 1 if plan.exact else spec.width or 8
    kwargs: dict[str, Any] = {}
    if searcher.learns:
        static = static_names(space)
        seen = {tuple(sorted((k, repr(c.values[k])) for k in static)): c for c in compiled}
        kwargs["context"] = SearchContext(
            objective=spec.effective().objective,
            final_z=spec.final_z,
            compiled=tuple({k: c.values[k] for k in static} for c in seen.values()),
        )
    seed = spec.seed + (round_ - 1) * 7919  # another stream per round (a prime stride)
    return searcher.propose(space, n, seed=seed, first_id=first_id, history=list(history), multiple=multiple, **kwargs)


# ------------------------------------------------------------------------------------ selection


def round_candidates(state: Any, round_record: dict[str, Any], energy_noise: float) -> list[Any]:
    """A finished round's selection as a candidate of the final rung, rebuilt from the study's
    trial record (score, its error, samples and energy, and its cohort's measured rate)."""
    from sm2jax.schedule.candidates import Candidate

    selected = round_record["selected"]
    record = state.trials.get(str(selected)) if selected is not None else None
    if record is None:
        return []
    score = record["score"]
    return [
        Candidate(
            trial_id=int(selected),
            cohort=record.get("cohort", ""),
            score=float("nan") if score is None else float(score),
            gain=None,
            energy_spent=record["energy_spent"],
            energy_last=None,
            samples_spent=record["samples_spent"],
            samples_last=0,
            samples_total=record.get("samples_total", record["samples_spent"]),
            score_se=record.get("score_se") or 0.0,
            cohort_rate=cohort_rate(state.cohort_energy.get(record.get("cohort", ""), [])),
            energy_noise=energy_noise,
        )
    ]


def select_across_rounds(state: Any, rules: Any, final_phase: str) -> None:
    """The study's selection over every finished round: each round's selection, decided together
    as one final rung decides (``final_phase``: the scheduler's name for it), so a configuration of
    round 1 and one of round 3, both at the full budget, compete on the same terms. Sets
    ``state.selected``, ``finalists`` (the rounds' selections, with their Pareto front) and ``test``
    (each round's selection is tested once, when its round ends; the study reports its selection's)."""
    candidates = [c for r in state.rounds for c in round_candidates(state, r, rules.energy_noise)]
    decision = rules.decide(final_phase, candidates, last=True)
    state.selected, state.finalists = decision.selected, decision.finalists
    state.test = next((r["test"] for r in state.rounds if r["selected"] == state.selected), None)


def check_extension(samples: Any, rounds: Any) -> None:
    """One line for an extension that adds nothing, or has more rounds than configurations."""
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"extend needs --samples >= 1 (got {samples!r}): how many configurations to add")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or not 1 <= rounds <= samples:
        raise ValueError(f"extend needs 1 <= --rounds <= --samples (got {rounds!r} rounds for {samples} samples)")


def round_record(step: Any, p: int, state: Any, proposals: Any, spec: Any) -> dict[str, Any]:
    """What :attr:`StudyState.rounds` keeps of a round that ended at phase ``p``: where its
    finalists are kept, its selection, finalists and test score, what it was proposed from, and
    what its scheduler says of it (Hyperband's ``bracket``)."""
    about = proposals.later[step.round - 2] if step.round > 1 else {}
    return {
        **dict(round_plans(spec)[step.round - 1].about),
        "round": step.round,
        "phase": p,
        "label": step.label,
        "alive": dict(state.alive),
        "configs": len(proposals.of_round(step.round)),
        "observations": about.get("observations", 0),
        "selected": state.selected,
        "finalists": state.finalists,
        "test": state.test,
    }
