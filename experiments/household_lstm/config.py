"""SM2 for an LSTM forecasting household power (UCI), as in the paper's second experiment.

Run::

    sm2jax prepare household_power    # once: downloads, or says where to place the UCI zip
    sm2jax run --config experiments/household_lstm/config.py --dir runs/household-sm2
    sm2jax run --config experiments/household_lstm/config.py --quick   # small: about a minute on a CPU

Expected: minutes on a GPU, tens of minutes on a CPU. The metric is validation MSE on standardised
next-hour global active power (lower is better). Not yet run by us: no figures are claimed.
"""

from sm2jax.presets import household_lstm


def get_config(quick: bool = False):
    return household_lstm(quick=quick)
