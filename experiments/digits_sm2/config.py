"""SM2 on the offline digits default: the README's main job.

Run::

    sm2jax run                      # = sm2jax run --preset digits --mode sm2
    sm2jax run --mode sh            # plain successive halving on identical work
    sm2jax run --mode full          # every configuration to the full budget

Expected: about 10 s on a 2-core CPU with a cold compilation cache (5 XLA programs, most of the
time), about 5 s once the cache is warm; the selected MLP reaches ~0.96-0.98 validation accuracy. Energy is labelled ``estimated`` on CPU-only
machines (``nvml-counter`` on a Volta+ GPU).
"""

from sm2jax.presets import digits


def get_config(quick: bool = False):
    return digits(quick=quick)
