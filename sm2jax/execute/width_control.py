"""The width controller of a cohort's runner: the width policy's decisions carried out on its
rows -- the quick program traded for the optimised one once it pays, the vmap-width probe, and
narrowing for fewer survivors (the policy itself, numbers in and a decision out, is
:mod:`sm2jax.execute.width_policy`)."""

from __future__ import annotations

import time

from sm2jax.execute.programs import program_bytes
from sm2jax.execute.rows import chunk_rows, take_rows
from sm2jax.execute.width_policy import (
    QUICK_SLOWDOWN,
    narrowing,
    optimise_decision,
    predicted_training,
    probe_decision,
    probe_steps,
    probe_widths,
)


class WidthControl:
    """Mixed into :class:`~sm2jax.execute.runner.CohortRunner`: it reads the runner's rows, width,
    measured rates and metering, and sets its width through ``_set_width`` and ``_choose``."""

    def _maybe_optimise(self, planned_trial_steps: float) -> None:
        """Trades the quick training program for the optimised one once the predicted saving on the
        cohort's remaining training exceeds the optimised program's predicted compile time."""
        w = self.width
        predicted = predicted_training(planned_trial_steps, self.step_seconds[w], w)
        switch, saving, cost = optimise_decision(predicted, self.compile_seconds("train"))
        details = {"predicted_train_s": predicted, "predicted_saving_s": saving, "predicted_compile_s": cost}
        if not switch:
            if not self._quick_noted:
                self._quick_noted = True
                self._choose(
                    w,
                    f"quick program kept: predicted saving {saving:.2f} s <= optimised compile {cost:.2f} s",
                    quick=True,
                    **details,
                )
            return
        self.quick = False
        record = self.compile()
        # Rates of the quick program, scaled until the next window measures the optimised one.
        self.step_seconds = {c: t / QUICK_SLOWDOWN for c, t in self.step_seconds.items()}
        self._choose(
            w,
            f"optimised program: predicted saving {saving:.2f} s > compile {cost:.2f} s",
            quick=False,
            compile_seconds=record.seconds,
            **details,
        )

    def _maybe_probe(self, planned_trial_steps: float) -> None:
        """Step 2 of the policy, once: probe other widths if predicted training time pays for it."""
        self.probe_pending = False
        w, n = self.width, self.placement.size
        t_w = self.step_seconds[w]
        predicted = predicted_training(planned_trial_steps, t_w, w)
        candidates = probe_widths(w, self.policy.widest(self.k, self.placement.round_width), n)
        payoff = self.policy.probe_payoff()
        run, cost = probe_decision(
            predicted, len(candidates), self.compile_seconds("train"), self.compile_seconds("eval"), payoff
        )
        if not run:
            self._choose(
                w,
                f"probe skipped: predicted training {predicted:.2f} s <= {payoff:g} x predicted compile {cost:.2f} s",
                predicted_train_s=predicted,
                predicted_compile_s=cost,
            )
            return
        rows = self.rows()
        with self._compile_window():
            t0 = time.perf_counter()
            by_width = {c: chunk_rows(take_rows(rows, c), c, self.placement)[0] for c in [*candidates, w]}
            for c in candidates:
                if not self.policy.fits(program_bytes(lambda c=c: self.trainer.compile_train(by_width[c], self.quick))):
                    del by_width[c]  # a wider candidate that does not fit is not measured
        if len(by_width) == 1:
            self._choose(w, "probe skipped: no other candidate width fits in memory", predicted_train_s=predicted)
            return
        compile_s = time.perf_counter() - t0
        # The probe trains (and discards) a few steps per width: its energy is its own line.
        with self.metering.window(
            f"probe:{self.spec.name}", phase="probe", cohort=self.spec.name, trial_ids=self.trial_ids, kind="probe"
        ):
            steps = probe_steps(t_w, w, list(by_width))
            probe = self.trainer.probe_width(by_width, steps=steps, repeats=3, quick=self.quick)
        for c, rate in probe.samples_per_second.items():  # seconds per step of a c-wide chunk
            self.step_seconds.setdefault(c, min(c, self.k) * self.spec.signature.batch_size / rate)
        self._set_width(probe.chosen)
        rates = {str(c): r for c, r in probe.samples_per_second.items()}
        self._choose(
            probe.chosen,
            "fastest measured width",
            samples_per_second=rates,
            compile_seconds=compile_s,
            predicted_train_s=predicted,
        )
        self.compile()  # evaluation at the chosen width

    def narrow_for_survivors(self, planned_trial_steps: float) -> None:
        """Step 3 of the policy: a narrower program for fewer survivors, only if it pays."""
        k, w = self.k, self.width
        if self.placement.round_width(k) >= w or not self.policy.narrow or w not in self.step_seconds:
            return

        def compile_cost(c: int) -> float:
            return sum(0.0 if self._is_compiled(kind, c) else self.compile_seconds(kind) for kind in ("train", "eval"))

        narrow, saving, cost = narrowing(
            k, w, self.step_seconds, planned_trial_steps, compile_cost, self.placement.round_width
        )
        if saving > cost:
            self._set_width(narrow)
            self._choose(
                narrow,
                f"narrowed for {k} survivors: predicted saving {saving:.2f} s > compile {cost:.2f} s",
                predicted_saving_s=saving,
                predicted_compile_s=cost,
            )
            self.compile()
        else:
            self.choices.append(
                {
                    "width": w,
                    "reason": f"kept for {k} survivors: predicted saving {saving:.2f} s <= compile {cost:.2f} s",
                    "predicted_saving_s": saving,
                    "predicted_compile_s": cost,
                }
            )

    # ---------------------------------------------------------------------------------- eval
