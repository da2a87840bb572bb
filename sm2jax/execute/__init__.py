"""Where it trains: an executor trains a set of configurations to a budget on the devices and
reports what a decision needs (scores, steps, energy through the study's metering).

:class:`~sm2jax.execute.workload.Workload` is the study's executor: the data on the devices, what a
budget means in steps, and each cohort's :class:`~sm2jax.execute.runner.CohortRunner` -- one
jitted, vmapped program per cohort (:mod:`~sm2jax.execute.trainer`, :mod:`~sm2jax.execute.steps`,
:mod:`~sm2jax.execute.programs`), its rows (:mod:`~sm2jax.execute.rows`) on the ``trials`` mesh
axis (:mod:`~sm2jax.execute.placement`), at the width the pure policy of
:mod:`~sm2jax.execute.width_policy` chooses.
"""
