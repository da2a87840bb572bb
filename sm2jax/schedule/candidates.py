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


def non_dominated(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the ``(score, energy)`` points no other point dominates (:func:`dominates`): the
    score/energy Pareto front, the one front the finalists, the ``pareto`` objective and the
    figures draw on."""
    return [i for i, p in enumerate(points) if not any(dominates(q, p) for j, q in enumerate(points) if j != i)]


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
