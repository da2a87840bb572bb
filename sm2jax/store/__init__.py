"""What is kept: a study's folder and nothing else writes it.

:class:`~sm2jax.store.folder.StudyDir` owns the folder's layout (``spec.json`` and its seal,
``proposals.json``, ``plan.json``, ``hardware.json``, ``progress/``, ``checkpoints/``, the ledger's
path, ``results.json``), claiming and locking it, and committing a phase;
:mod:`sm2jax.store.checkpoint` its Orbax checkpoints (survivors' rows, gathered on the host);
:mod:`sm2jax.store.files` durable atomic writes (a temporary of its own, renamed, the folder
fsync-ed), which the energy ledger's repair uses too.
"""

TENSORBOARD = "tensorboard"
"""The folder of a study's TensorBoard runs (in the study folder, or a report's ``--out``)."""

OPTUNA = "optuna.db"
"""A study's Optuna storage (in the study folder, or a report's ``--out``)."""
