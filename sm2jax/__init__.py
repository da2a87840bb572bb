"""sm2jax: energy-aware hyperparameter optimisation (SM2) over vmapped cohorts in JAX."""

from sm2jax.cohort import CohortSpec, group_into_cohorts
from sm2jax.data import BUILTIN_DATASETS, ArrayDataset, load_dataset, register_dataset
from sm2jax.handback import TrainedModel, export, load_selected
from sm2jax.hyperband import run_hyperband
from sm2jax.models import dropout, register_model
from sm2jax.placement import Placement, request_cpu_devices
from sm2jax.report import Results, load_results
from sm2jax.rows import CohortState
from sm2jax.sampling import cohort_sample
from sm2jax.space import Categorical, Config, Fixed, IntUniform, LogUniform, SearchSpace, Uniform, make_config
from sm2jax.spec import StudySpec
from sm2jax.study import Study
from sm2jax.tasks import Task, register_task
from sm2jax.trainer import CohortTrainer
from sm2jax.vocabulary import register_hyperparameter, register_optimizer

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
