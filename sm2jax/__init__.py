"""sm2jax: energy-aware hyperparameter optimisation (SM2) over vmapped cohorts in JAX."""

import importlib
import importlib.util
from typing import Any

# Names resolve on first use (PEP 562): `import sm2jax` and the command line's --help import no JAX.
_WHERE = {
    "sm2jax.cohort": ("CohortSpec", "group_into_cohorts"),
    "sm2jax.data": ("BUILTIN_DATASETS", "ArrayDataset", "load_dataset", "register_dataset"),
    "sm2jax.handback": ("TrainedModel", "export", "load_selected"),
    "sm2jax.hyperband": ("run_hyperband",),
    "sm2jax.models": ("dropout", "register_model"),
    "sm2jax.execute.placement": ("Placement", "request_cpu_devices"),
    "sm2jax.report": ("Results", "load_results"),
    "sm2jax.execute.rows": ("CohortState",),
    "sm2jax.sampling": ("cohort_sample",),
    "sm2jax.space": (
        "Categorical",
        "Config",
        "Fixed",
        "IntUniform",
        "LogUniform",
        "SearchSpace",
        "Uniform",
        "make_config",
    ),
    "sm2jax.spec": ("StudySpec",),
    "sm2jax.study": ("Study",),
    "sm2jax.tasks": ("Task", "register_task"),
    "sm2jax.execute.trainer": ("CohortTrainer",),
    "sm2jax.vocabulary": ("register_hyperparameter", "register_optimizer"),
}
_MODULE_OF = {name: module for module, names in _WHERE.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:  # a submodule (sm2jax.report ...), as an eager package would have it
        if importlib.util.find_spec(f"sm2jax.{name}") is None:
            raise AttributeError(f"module 'sm2jax' has no attribute {name!r}")
        return importlib.import_module(f"sm2jax.{name}")
    value = getattr(importlib.import_module(_MODULE_OF[name]), name)
    globals()[name] = value  # once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_MODULE_OF})


__version__ = "0.1.0"

__all__ = [
    "BUILTIN_DATASETS",
    "ArrayDataset",
    "Categorical",
    "CohortSpec",
    "CohortState",
    "CohortTrainer",
    "Config",
    "Fixed",
    "IntUniform",
    "LogUniform",
    "Placement",
    "Results",
    "SearchSpace",
    "Study",
    "StudySpec",
    "Task",
    "TrainedModel",
    "Uniform",
    "cohort_sample",
    "dropout",
    "export",
    "group_into_cohorts",
    "load_dataset",
    "load_results",
    "load_selected",
    "make_config",
    "register_dataset",
    "register_hyperparameter",
    "register_model",
    "register_optimizer",
    "register_task",
    "request_cpu_devices",
    "run_hyperband",
]
