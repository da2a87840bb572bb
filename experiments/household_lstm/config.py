"""SM2 for an LSTM forecasting household power (UCI), as in the paper's second experiment.

Run (downloads the UCI archive through our TFDS builder, or reads it from
``~/tensorflow_datasets/downloads/manual/``)::

    sm2jax run --preset household_power --dir runs/household-sm2

Expected: minutes on a GPU, tens of minutes on a CPU. The metric is validation MSE on standardised
next-hour global active power (lower is better). Not yet run by us: no figures are claimed.
"""

from sm2jax.presets import household_lstm


def get_config():
    return household_lstm()
