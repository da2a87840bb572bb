r"""Yardsticks for a forecast: what a trained model must beat to be worth its energy.

For a data set of windows whose target continues one input feature one step later
(``ArrayDataset.forecast_feature``, e.g. next-hour household power from 24 hours of history), two
models that need no hyperparameter search, each scored with the task's metric (mean squared error)
on the validation and test splits:

* **persistence**: tomorrow is today, :math:`\hat y = x_{T, f}` (the last step's value of the
  forecast feature);
* **ridge regression** on the flattened window plus a bias, :math:`\hat w = (X^\top X + \lambda I)^{-1}
  X^\top y` (the bias unpenalised), with :math:`\lambda` chosen on the validation split from
  :math:`10^{-3} \ldots 10^{4}`; its test figure is never used to choose anything.

A study of such a data set reports both beside its selection (``results.json`` ``yardsticks``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

RIDGE_LAMBDAS = tuple(10.0**k for k in range(-3, 5))


def _mse(pred: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean((pred.reshape(y.shape) - y) ** 2))


def forecast_yardsticks(ds) -> dict[str, Any] | None:
    """Persistence and ridge-regression mean squared errors on the validation and test splits of
    ``ds`` (``None`` unless ``ds.forecast_feature`` is set and the targets are one number)."""
    feature = getattr(ds, "forecast_feature", None)
    if feature is None or ds.y_train.reshape(len(ds.y_train), -1).shape[1] != 1:
        return None
    splits = {"val": (ds.x_val, ds.y_val)}
    if ds.has_test:
        splits["test"] = (ds.x_test, ds.y_test)

    def design(x):
        flat = np.asarray(x, np.float64).reshape(len(x), -1)
        return np.concatenate([flat, np.ones((len(x), 1))], axis=1)

    x, y = design(ds.x_train), np.asarray(ds.y_train, np.float64).reshape(-1, 1)
    gram, moment = x.T @ x, x.T @ y
    penalty = np.eye(len(gram))
    penalty[-1, -1] = 0.0  # the bias is not shrunk
    fits = {lam: np.linalg.solve(gram + lam * penalty, moment) for lam in RIDGE_LAMBDAS}
    xv, yv = design(ds.x_val), np.asarray(ds.y_val, np.float64).reshape(-1, 1)
    lam = min(fits, key=lambda k: _mse(xv @ fits[k], yv))
    out: dict[str, Any] = {
        "metric": "mse",
        "persistence": {},
        "ridge": {"lambda": lam},
    }
    for split, (xs, ys) in splits.items():
        ys = np.asarray(ys, np.float64).reshape(-1, 1)
        out["persistence"][split] = _mse(np.asarray(xs, np.float64)[:, -1, feature], ys)
        out["ridge"][split] = _mse(design(xs) @ fits[lam], ys)
    return out
