"""SM2 over architectures on MNIST-1D (generated offline by the ``mnist1d`` package): MLP, 1D CNN, GRU.

Run::

    pip install -e '.[test]'            # mnist1d comes with the test extra
    sm2jax run --preset mnist1d         # SM2 (= sm2jax run --config experiments/mnist1d/config.py)
    sm2jax run --config experiments/mnist1d/config.py --quick --set dataset_options.num_samples=1000
    sm2jax run --preset mnist1d --mode sh --dir runs/mnist1d-sh && sm2jax compare runs/mnist1d-sm2 runs/mnist1d-sh

Expected: about 40 s on a 2-core CPU with a cold compilation cache (6 cohorts; compilation ~22 s);
SM2 selects the 1D CNN at ~0.85 validation / ~0.87 test accuracy after 9 epochs of 4,000 sequences,
dropping the MLPs and GRUs that have not learned or are clearly worse in their cohort at exploration.
Energy is labelled ``estimated`` on CPU-only machines.
"""

from sm2jax.presets import mnist1d


def get_config(quick: bool = False):
    return mnist1d(quick=quick)
