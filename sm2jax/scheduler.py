r"""SM2 decisions: candidates, the exploration filter and successive halving (objectives: :mod:`sm2jax.objectives`).

Everything here is pure logic over :class:`Candidate` records, so it is tested without training.

SM2 (Geissler et al., "Spend More to Save More", arXiv 2412.08526) is successive halving (SH) made
energy-aware: every configuration first gets a short *exploratory* budget with its energy measured;
configurations that are hopeless are dropped before the first rung; the rest go through SH rungs.
SM2 must find a configuration as good as plain SH finds, for less energy. Our rule (the paper's exact
formula is not available to us) is an **epsilon-constraint with noise-derived epsilon**: energy
decides only among configurations whose scores cannot be told apart.

**Noise.** Candidate :math:`i` has score :math:`s_i` (higher is better) with standard error
:math:`\sigma_i` (the validation split's sampling noise, e.g. binomial for accuracy). At a
significance multiplier :math:`z`, :math:`i` is *clearly better* than :math:`j` when

.. math::  s_i - s_j > z \sqrt{\sigma_i^2 + \sigma_j^2},

and otherwise the two are *tied*, where :math:`\sigma_i^2 = \sigma_{\text{split},i}^2 +
\sigma_{\text{seed}}^2` adds the **seed noise**: configurations also differ by initialisation and data
order, which moves a score by more than the split's sampling noise early in training. SM2 measures it
at exploration with seed replicates (:func:`seed_noise`): a few configurations of each cohort explore
twice, with different keys, side by side in the same vmapped program, and the pooled differences of
their scores, beyond what sampling noise explains, give :math:`\hat\sigma_{\text{seed}}^2`. It widens exploration's "clearly worse", where a false drop loses a configuration for
good; the rungs rank on the split's noise as successive halving does (a wider tie there would let
energy decide between configurations that differ by more than the split's noise). Replicates are
never selected and stop after exploration.

Energy per step is equal inside a cohort by construction, so energy separates cohorts only. A
candidate's decision energy is what it still costs, :math:`F_i = \hat\jmath_c \, (N - n_i)`, with
:math:`\hat\jmath_c` its cohort's joules per training sample smoothed over every phase so far (total
joules / total samples), :math:`N` the samples of the full budget and :math:`n_i` those already spent
(energy already spent is sunk and never traded for accuracy). At the final rung nothing remains, and
:math:`F_i = \hat\jmath_c N`: what the configuration costs to train. Each cohort rate carries a
relative uncertainty :math:`\rho_c` (``energy_noise``, 20% by default);
:math:`i` is *clearly cheaper* than :math:`j` when

.. math::  F_j - F_i > z_E \sqrt{(\rho_i F_i)^2 + (\rho_j F_j)^2},

with :math:`z_E = 2` by default: energy figures have heavier tails than a binomial score (identical
runs' windows spread widely), so an energy gap must be wide to count.

**Rungs** (objective ``sm2``). Candidates are ordered in score tiers (``noise_z``; 0 by default, see
:data:`DEFAULT_NOISE_Z`: then a tier holds exact ties only and the rungs rank as SH's do): the first
tier is everyone tied with the best score; inside a tier, candidates that fewer tier-mates are clearly cheaper than come
first (ties broken by score, then trial id); the next tier starts from the best remaining score.
SH's count is kept (``ceil(n / eta)``), so energy only ever chooses among configurations whose scores
are tied within the noise, and a clearly better configuration always outranks a cheaper one. The final
rung keeps one, by score: energy spent is sunk, so its tie width is narrower (``final_z = 0.5``; at
one standard error the better-scoring configuration is truly better with probability ~0.84) and only
near-ties go to the configuration cheaper to train. The trade-off is shown apart
(:func:`finalist_front`).

**Exploration** (:func:`exploration_filter`) drops, with a *clear* margin ``explore_z``:

* diverged configurations and non-finite scores;
* configurations that have not learned: score not clearly above the larger of their own score
  before exploration and chance (the majority-class rate; a study evaluates the untrained models
  only where chance is undefined, e.g. regression, since an untrained classifier scores about chance);
* configurations clearly worse than the best of their own cohort: same model, batch size and
  energy per step, so the score alone decides (Pareto dominance where the energies are equal);
* then each cohort is halved: of its :math:`k` configurations at most
  :math:`\lceil \kappa k \rceil` go on (``explore_keep`` :math:`\kappa = 1/2` by default), best
  score first. This is successive halving's rank decision, made inside a cohort -- like against like,
  one program, equal energy per step -- at the exploration budget. It is where SM2 saves: the
  clear-margin test alone kept 5 of 6 learning rates of a cohort whose quarter-epoch scores sat
  within the seed noise, and every one of them then trained to the first rung. Across cohorts no
  rank decision is made at exploration (other models learn at other speeds).

**Slow starters.** A cohort is a family (same model and batch size): its best configuration is
always kept to the first rung, also when nothing in it has learned yet -- a recurrent model or a small
learning rate may sit at chance after a quarter epoch and still win at nine. Its best is the one with
the lowest validation loss, which moves before a 0/1 metric does (the score where no loss is known).
If nothing has learned (exploration too short), nothing is dropped for not learning. Exploration
never compares across cohorts: after the same number of samples, different batch sizes have taken
different numbers of steps, and a quarter epoch's energy gaps are the noisiest figures of a study.
Across cohorts, energy acts at the rungs, among tied scores. Exploration decisions therefore do not
depend on energy at all.

The alpha/beta blend of earlier versions stays available as objective ``blend``:
:math:`f = \alpha \hat P + \beta (1 - \hat E) + (1 - \alpha - \beta) \hat G` (min-max normalised score,
projected energy and progress per joule); it discards magnitudes and noise, and is not the default.

References:
  Jamieson & Talwalkar, "Non-stochastic best arm identification and hyperparameter optimization",
  AISTATS 2016 (successive halving). Li et al., "Hyperband", JMLR 18(185), 2018. Haimes et al., "On a
  bicriterion formulation of the problems of integrated system identification and system
  optimization", IEEE SMC 1(3), 1971 (epsilon-constraint). Deb et al., "A fast and elitist
  multiobjective genetic algorithm: NSGA-II", IEEE TEC 6(2), 2002 (non-dominated sorting).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

DEFAULT_ENERGY_NOISE = 0.2
"""Relative uncertainty of a cohort's energy rate, at least (the run-to-run spread of identical runs' windows)."""
DEFAULT_NOISE_Z = 0.0
"""Scores within this many standard errors of their difference are tied at a rung before the last,
where a cheaper tier-mate goes first. 0: the rungs rank by score as successive halving does (energy
breaks exact ties only). A drop there is for good, and the configurations that lose a tie on energy
are the large models that learn slower: at 1 and at 0.5 standard errors a cheaper tier-mate took the
place of successive halving's winner, a 1024x1024 MLP 0.45 standard errors behind at 3 epochs that
won at 9, on one MNIST-1D seed of five (-5.4 points each time)."""
DEFAULT_FINAL_Z = 0.5
"""The tie width at the final rung, where energy is sunk: only near-ties go to the cheaper configuration."""
DEFAULT_ENERGY_Z = 2.0
"""Energies are told apart at this many standard errors (their noise has heavier tails than scores')."""
DEFAULT_EXPLORE_Z = 2.0
"""The clear margin, in standard errors, exploration needs to drop a configuration."""

DEFAULT_EXPLORE_KEEP = 0.5
"""The fraction of each cohort exploration keeps at most (successive halving inside a cohort)."""


@dataclasses.dataclass
class Candidate:
    """What a decision knows about one configuration at the end of a phase.

    Attributes:
      trial_id: the configuration's id.
      cohort: its cohort's name.
      score: validation score, higher is better (NaN if it cannot be evaluated).
      gain: score improvement over the last budget (``None`` with no earlier score, e.g. at the
        first rung of plain successive halving: undefined, never a stand-in 0).
      energy_spent: joules attributed so far (training and evaluation, without compilation);
        ``None`` when energy is unavailable.
      energy_last: joules attributed over the last budget (``None`` when unavailable).
      samples_spent: training samples consumed so far.
      samples_last: training samples consumed over the last budget.
      samples_total: training samples at the full budget.
      diverged: the trial produced a non-finite loss or gradient and is frozen.
      diverged_at: step of divergence (-1 if finite).
      plateau_tolerance: gain at or below which the candidate counts as plateaued.
      score_se: standard error of ``score`` (0: noise unknown, every difference counts).
      start_score, start_se: score and its error before exploration (``None`` if not measured).
      chance_score: score of guessing (majority-class rate), ``None`` where undefined.
      cohort_rate: the cohort's joules per training sample, smoothed over its phases (``None``:
        fall back to this candidate's last budget).
      energy_noise: relative uncertainty of the energy rate.
      seed_se: the seed noise of a score (initialisation and data order) measured by replicates
        (:func:`seed_noise`; 0: not measured).
      val_loss: the validation loss (``None``: unknown), which ranks a family's slow starters.
    """

    trial_id: int
    cohort: str
    score: float
    gain: float | None
    energy_spent: float | None
    energy_last: float | None
    samples_spent: int
    samples_last: int
    samples_total: int
    diverged: bool = False
    diverged_at: int = -1
    plateau_tolerance: float = 0.005
    score_se: float = 0.0
    start_score: float | None = None
    start_se: float = 0.0
    chance_score: float | None = None
    cohort_rate: float | None = None
    energy_noise: float = DEFAULT_ENERGY_NOISE
    seed_se: float = 0.0
    val_loss: float | None = None

    @property
    def noise(self) -> float:
        """The score's standard error: the split's sampling noise and the seed noise together."""
        return math.hypot(self.score_se, self.seed_se)

    @property
    def healthy(self) -> bool:
        return not self.diverged and math.isfinite(self.score)

    @property
    def plateaued(self) -> bool | None:
        """Learning-rate behaviour: no meaningful score gain over the last budget (``None``: no gain)."""
        if self.gain is None:
            return None
        return not self.diverged and self.gain <= self.plateau_tolerance

    @property
    def joules_per_sample(self) -> float | None:
        """The energy rate decisions use: the cohort's smoothed rate, else this trial's last budget's."""
        if self.cohort_rate is not None:
            return self.cohort_rate
        if self.energy_last is None or self.samples_last <= 0:
            return None
        return self.energy_last / self.samples_last

    @property
    def samples_remaining(self) -> int:
        return max(self.samples_total - self.samples_spent, 0)

    @property
    def projected_energy(self) -> float | None:
        """Joules to reach the full budget: spent so far plus the rate times the samples still to train."""
        rate = self.joules_per_sample
        if self.energy_spent is None or rate is None:
            return self.energy_spent
        return self.energy_spent + rate * self.samples_remaining

    @property
    def decision_energy(self) -> float | None:
        """Joules still to spend (``rate x remaining samples``); at the full budget, the joules to
        train it (``rate x total samples``). Sunk energy never enters a decision."""
        rate = self.joules_per_sample
        if rate is None or self.energy_spent is None:
            return None
        return rate * (self.samples_remaining or self.samples_total)

    @property
    def progress_per_joule(self) -> float | None:
        if self.gain is None or self.energy_last is None or self.energy_last <= 0:
            return None
        return self.gain / self.energy_last

    def terms(self) -> dict[str, Any]:
        return {
            "trial_id": self.trial_id,
            "cohort": self.cohort,
            "score": self.score,
            "score_se": self.score_se,
            "seed_se": self.seed_se,
            "val_loss": self.val_loss,
            "gain": self.gain,
            "energy_spent_j": self.energy_spent,
            "energy_last_j": self.energy_last,
            "projected_energy_j": self.projected_energy,
            "decision_energy_j": self.decision_energy,
            "joules_per_sample": self.joules_per_sample,
            "energy_noise": self.energy_noise,
            "progress_per_joule": self.progress_per_joule,
            "samples_spent": self.samples_spent,
            "samples_total": self.samples_total,
            "start_score": self.start_score,
            "start_se": self.start_se,
            "chance_score": self.chance_score,
            "diverged": self.diverged,
            "diverged_at": self.diverged_at,
            "plateaued": self.plateaued,
        }

    @classmethod
    def from_terms(cls, record: dict[str, Any]) -> Candidate:
        """Rebuilds a candidate from a decision record's terms (to replay recorded decisions)."""
        spent, last, rate = record["energy_spent_j"], record["energy_last_j"], record["joules_per_sample"]
        return cls(
            trial_id=record["trial_id"],
            cohort=record["cohort"],
            score=math.nan if record["score"] is None else record["score"],
            gain=record["gain"],
            energy_spent=spent,
            energy_last=last,
            samples_spent=record["samples_spent"],
            samples_last=record["samples_spent"],
            samples_total=record["samples_total"],
            diverged=record["diverged"],
            diverged_at=record["diverged_at"],
            score_se=record["score_se"],
            start_score=record["start_score"],
            start_se=record["start_se"],
            chance_score=record["chance_score"],
            cohort_rate=rate,
            energy_noise=record["energy_noise"],
            seed_se=record.get("seed_se", 0.0),
            val_loss=record.get("val_loss"),
        )


def score_margin(a: Candidate, b: Candidate, z: float) -> float:
    """``z`` standard errors of the difference of two scores (sampling and seed noise)."""
    return z * math.hypot(a.noise, b.noise)


def seed_noise(pairs: Sequence[tuple[float, float, float, float]]) -> float | None:
    r"""The seed noise of one score from ``m`` replicate pairs ``(s, s', se, se')`` (a configuration's
    score and its replicate's, with their sampling errors): the variance of their differences beyond
    what the split's sampling noise already explains,

    .. math:: \hat\sigma_{\text{seed}}^2 = \max\Big(0,\ \frac{1}{2m}\sum_k (s_k - s'_k)^2
              - \frac{1}{2m}\sum_k (\sigma_k^2 + \sigma_k'^2)\Big),

    so that a score's total error :math:`\sqrt{\sigma^2 + \hat\sigma_{\text{seed}}^2}` is what the
    replicates show (non-finite pairs left out); ``None`` with fewer than 2 pairs (too few)."""
    finite = [p for p in pairs if all(math.isfinite(v) for v in p)]
    if len(finite) < 2:
        return None
    m = len(finite)
    excess = sum((a - b) ** 2 - sa**2 - sb**2 for a, b, sa, sb in finite) / (2 * m)
    return math.sqrt(max(excess, 0.0))


def clearly_better(a: Candidate, b: Candidate, z: float) -> bool:
    """``a``'s score exceeds ``b``'s by more than the noise (module docstring)."""
    return a.score - b.score > score_margin(a, b, z)


def clearly_cheaper(a: Candidate, b: Candidate, z: float) -> bool:
    """``a`` still costs less than ``b`` by more than the noise; never with energy unavailable."""
    ea, eb = a.decision_energy, b.decision_energy
    if ea is None or eb is None:
        return False
    return eb - ea > z * math.hypot(a.energy_noise * ea, b.energy_noise * eb)


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """Pareto dominance for (performance up, energy down)."""
    return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])


Objective = Callable[[Sequence[Candidate]], list[dict[str, Any]]]
"""Scores candidates: one record per candidate with at least an ``objective`` term (higher is better)."""


# -------------------------------------------------------------------------------------- decisions


def rank(candidates: Sequence[Candidate], objective: Objective) -> list[tuple[Candidate, dict[str, Any]]]:
    """Candidates with their objective terms, best first. Diverged or unscorable candidates rank
    last; ties break by trial id so decisions are deterministic."""
    healthy = [c for c in candidates if not c.diverged and math.isfinite(c.score)]
    broken = [c for c in candidates if c not in healthy]
    terms = objective(healthy) if healthy else []
    if len(terms) != len(healthy):
        raise ValueError(f"objective returned {len(terms)} records for {len(healthy)} candidates")
    ranked = sorted(zip(healthy, terms), key=lambda ct: (-ct[1]["objective"], ct[0].trial_id))
    return ranked + [(c, {"objective": -math.inf}) for c in sorted(broken, key=lambda c: c.trial_id)]


KEEP_RULES = ("ceil", "floor")


def halve(
    candidates: Sequence[Candidate], objective: Objective, eta: int, keep: str = "ceil"
) -> tuple[list[int], list[dict[str, Any]]]:
    """Successive-halving step: keep the best ``ceil(n / eta)`` healthy candidates (``keep="ceil"``),
    or ``floor(n / eta)`` as Hyperband's inner loop does (Li et al. 2018, Algorithm 1; ``"floor"``);
    at least one either way.

    Returns the kept trial ids and one decision record per candidate (with its terms and reason).
    """
    if keep not in KEEP_RULES:
        raise ValueError(f"keep: unknown rule {keep!r}; known: {KEEP_RULES}")
    ranked = rank(candidates, objective)
    keep_n = max(1, math.ceil(len(candidates) / eta) if keep == "ceil" else len(candidates) // eta)
    kept, records = [], []
    for position, (c, terms) in enumerate(ranked):
        healthy = terms["objective"] != -math.inf
        keep = healthy and len(kept) < keep_n
        why = f" ({terms['why']})" if terms.get("why") else ""
        if keep:
            kept.append(c.trial_id)
            code, reason = "top_k", f"rank {position + 1} of {len(ranked)}: in the top {keep_n}{why}"
        elif not healthy:
            code, reason = (
                ("diverged", f"diverged at step {c.diverged_at}")
                if c.diverged
                else ("score_not_finite", "score is not finite")
            )
        else:
            code, reason = "outside_top_k", f"rank {position + 1} of {len(ranked)}: outside the top {keep_n}{why}"
        records.append(
            {
                **c.terms(),
                **terms,
                "objective": terms["objective"] if healthy else None,
                "kept": keep,
                "reason_code": code,
                "reason": reason,
            }
        )
    return kept, records


def drop_clearly_worse(
    candidates: Sequence[Candidate], kept: list[int], records: list[dict[str, Any]], *, z: float, seed_se: float = 0.0
) -> list[int]:
    """SM2 at a rung before the last: of the ``kept`` top ``1/eta``, those whose score is clearly worse
    than the best kept score -- by more than ``z`` standard errors of the difference, counting the
    split's sampling noise and the seed noise exploration measured (``seed_se``; conservative later
    in training, where seeds matter less) -- go no further. Successive halving carries them because
    of their rank alone; SM2 saves their next rung. Updates their ``records``; returns the kept ids."""
    by_id = {c.trial_id: c for c in candidates}
    scored = [by_id[t] for t in kept if by_id[t].healthy]
    if len(scored) < 2:
        return kept
    best = max(scored, key=lambda c: (c.score, -c.trial_id))
    noise = lambda c: math.hypot(c.score_se, seed_se)
    out = []
    for t in kept:
        c = by_id[t]
        margin = z * math.hypot(noise(best), noise(c))
        if c is not best and c.healthy and best.score - c.score > margin:
            record = next(r for r in records if r["trial_id"] == t)
            record.update(
                kept=False,
                reason_code="clearly_worse",
                reason=(
                    f"in the top by rank, but clearly worse than trial {best.trial_id}: {c.score:.4g} vs {best.score:.4g} "
                    f"(difference {best.score - c.score:.3g} > {margin:.3g}, sampling and seed noise at z={z:g})"
                ),
            )
            continue
        out.append(t)
    return out


def exploration_filter(
    candidates: Sequence[Candidate], *, z: float = DEFAULT_EXPLORE_Z, keep: float = 1.0
) -> tuple[list[int], list[dict[str, Any]]]:
    """SM2's "save more" step after exploratory pretraining (module docstring).

    Drops, in this order of reasons: divergence, a non-finite score, not having learned, being
    clearly worse than the best of its own cohort ("clearly": by more than ``z`` standard errors of
    the difference), and being outside the best ``ceil(keep * k)`` of its cohort's ``k``
    configurations (``keep`` 1: no halving; a slow starter is its cohort's only survivor). The best
    configuration of every cohort that learned is always kept. Energy is equal inside a cohort, so
    no decision here depends on an energy figure.
    """
    if z < 0:
        raise ValueError(f"noise multiplier z must be >= 0 (got {z})")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1] (got {keep})")
    healthy = [c for c in candidates if c.healthy]

    def learned(c: Candidate) -> tuple[bool, str]:
        refs = []
        if c.start_score is not None and math.isfinite(c.start_score):
            refs.append((c.start_score, c.start_se, "its score before exploration"))
        if c.chance_score is not None:
            refs.append((c.chance_score, 0.0, "chance"))
        if not refs:
            return True, ""
        ref, se, what = max(refs, key=lambda r: r[0])
        margin = z * math.hypot(c.score_se, se)
        return (
            c.score - ref > margin,
            f"score {c.score:.4g} is not clearly above {what} {ref:.4g} (difference {c.score - ref:.3g} <= {margin:.3g})",
        )

    verdicts = {c.trial_id: learned(c) for c in healthy}
    nothing_learned = bool(healthy) and not any(ok for ok, _ in verdicts.values())
    learners = [c for c in healthy if verdicts[c.trial_id][0] or nothing_learned]
    # Each family (cohort) keeps its best to the first rung, learned or not: a slow starter.
    slow_starters = set()
    for cohort in dict.fromkeys(c.cohort for c in healthy):
        family = [c for c in healthy if c.cohort == cohort]
        if not any(verdicts[c.trial_id][0] for c in family) and not nothing_learned:
            slow_starters.add(min(family, key=_progress_key).trial_id)
    drops: dict[int, tuple[str, str, Candidate | None]] = {}
    for c in candidates:
        code, reason, by = "", "", None
        if c.diverged:
            code, reason = "diverged", f"diverged at step {c.diverged_at}"
        elif not math.isfinite(c.score):
            code, reason = "score_not_finite", "score is not finite"
        elif c.trial_id in slow_starters:
            pass
        elif not verdicts[c.trial_id][0] and not nothing_learned:
            code, reason = "not_learned", f"not learned: {verdicts[c.trial_id][1]}"
        else:
            mates = [o for o in learners if o is not c and o.cohort == c.cohort and clearly_better(o, c, z)]
            if mates:
                by = max(mates, key=lambda o: (o.score, -o.trial_id))
                code, reason = (
                    "dominated_in_cohort",
                    (
                        f"clearly worse than trial {by.trial_id} of its cohort: {c.score:.4g} vs {by.score:.4g} "
                        f"(difference {by.score - c.score:.3g} > {score_margin(by, c, z):.3g}; energy per step is equal in a cohort)"
                    ),
                )
        drops[c.trial_id] = (code, reason, by)
    # Successive halving inside each cohort: the best ceil(keep * k) of its k configurations go on.
    for cohort in dict.fromkeys(c.cohort for c in candidates):
        family = [c for c in candidates if c.cohort == cohort]
        passed = sorted((c for c in family if not drops[c.trial_id][0]), key=_rank_key)
        n = max(1, math.ceil(keep * len(family) - 1e-9))
        for position, c in enumerate(passed[n:], start=n + 1):
            drops[c.trial_id] = (
                "outside_cohort_half",
                f"rank {position} of its cohort's {len(passed)} survivors of the clear-margin test: outside the best "
                f"{n} of {len(family)} (exploration halves each cohort, explore_keep={keep:g}; score {c.score:.4g})",
                None,
            )
    kept, records = [], []
    for c in candidates:
        code, reason, by = drops[c.trial_id]
        survives = not code
        if survives:
            kept.append(c.trial_id)
            code, reason = "not_dominated", "learned and not clearly worse than the best of its cohort"
            if c.trial_id in slow_starters:
                loss = "" if c.val_loss is None else f", validation loss {c.val_loss:.4g}"
                code, reason = (
                    "slow_starter",
                    f"nothing in its cohort has learned yet: its best (score {c.score:.4g}{loss}) is kept to the first rung",
                )
            if nothing_learned:
                code, reason = (
                    "nothing_learned",
                    "no configuration learned clearly during exploration: none dropped for not learning",
                )
        records.append(
            {
                **c.terms(),
                "kept": survives,
                "reason_code": code,
                "reason": reason,
                "dominated_by": None if by is None else by.trial_id,
                "z": z,
            }
        )
    return kept, records


def _loss(c: Candidate) -> float:
    """The validation loss, ``inf`` where it is unknown or not finite (it sorts last)."""
    return c.val_loss if c.val_loss is not None and math.isfinite(c.val_loss) else math.inf


def _rank_key(c: Candidate) -> tuple:
    """Best first inside a cohort: the score, then the lowest validation loss, then the trial id."""
    return (-c.score, _loss(c), c.trial_id)


def _progress_key(c: Candidate) -> tuple:
    """Best first: the lowest validation loss (it moves before a 0/1 metric), else the score."""
    return (_loss(c), -c.score, c.trial_id)


def finalist_front(candidates: Sequence[Candidate]) -> list[dict[str, Any]]:
    """The final rung's healthy candidates with their score, energy to train and Pareto membership
    on (score up, energy to train down), best score first: the trade-off shown beside the selection,
    which is made on the score alone (ties within the noise broken by energy)."""
    healthy = sorted((c for c in candidates if c.healthy), key=lambda c: (-c.score, c.trial_id))
    points = {c.trial_id: (c.score, c.decision_energy) for c in healthy}
    known = all(e is not None for _, e in points.values())
    return [
        {
            "trial_id": c.trial_id,
            "cohort": c.cohort,
            "score": c.score,
            "score_se": c.score_se,
            "energy_to_train_j": c.decision_energy,
            "energy_noise": c.energy_noise,
            "pareto": None
            if not known
            else not any(dominates(points[o.trial_id], points[c.trial_id]) for o in healthy if o is not c),
        }
        for c in healthy
    ]
