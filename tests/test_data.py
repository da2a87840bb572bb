"""Data loading, offline: scikit-learn digits, TFDS mock data and our builders on generated archives."""

import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from sm2jax.data import (
    load_dataset,
    load_digits,
    load_tfds_images,
    source_to_arrays,
    text_to_dataset,
    windows_to_dataset,
)
from sm2jax.execute.batches import batch_indices


@pytest.mark.slow
@pytest.mark.parametrize("n, b", [(64, 16), (1437, 32), (10, 3), (2, 2)])
def test_batch_indices_visit_every_example_once_per_epoch(n, b):
    key = jax.random.PRNGKey(3)
    per_epoch = n // b
    epochs = [
        np.concatenate([batch_indices(key, jnp.int32(s), n, b) for s in range(e * per_epoch, (e + 1) * per_epoch)])
        for e in range(2)
    ]
    for seen in epochs:
        assert len(set(seen.tolist())) == per_epoch * b and seen.min() >= 0 and seen.max() < n
    if n > 2:
        assert epochs[0].tolist() != epochs[1].tolist()  # reshuffled every epoch
        other = np.concatenate([batch_indices(jax.random.PRNGKey(4), jnp.int32(s), n, b) for s in range(per_epoch)])
        assert other.tolist() != epochs[0].tolist()  # another key, another order


def test_digits_default(digits):
    assert digits.input_shape == (8, 8, 1) and digits.num_outputs == 10
    assert (
        len(digits.x_train) + len(digits.x_val) + len(digits.x_test) == 1797
        and len(digits.x_test) == len(digits.x_val) == 359
    )
    np.testing.assert_array_equal(
        load_digits(test_fraction=0.0).y_val, digits.y_val
    )  # the test split is carved after the validation split
    assert 0.0 <= digits.x_train.min() and digits.x_train.max() <= 1.0
    again = load_digits()
    np.testing.assert_array_equal(again.y_val, digits.y_val)  # seeded split


def test_tfds_images_through_data_source_and_grain(tmp_path):
    with tfds.testing.mock_data(num_examples=50, data_dir=str(tmp_path)):
        ds = load_tfds_images("mnist", data_dir=str(tmp_path))
    assert ds.input_shape == (28, 28, 1) and ds.x_train.dtype == np.float32
    assert len(ds.x_train) + len(ds.x_val) > 0 and ds.task == "classification"


def test_source_to_arrays_rejects_empty_sources():
    with pytest.raises(ValueError, match="empty"):
        source_to_arrays([], lambda r: r)


def test_windows_and_text_datasets():
    series = np.stack([np.arange(100, dtype=np.float32), np.ones(100, np.float32)], 1)
    ds = windows_to_dataset(series, window=8, val_fraction=0.2)
    assert ds.x_train.shape[1:] == (8, 2) and ds.y_train.shape[1:] == (1,)
    # Target is the standardised next value of feature 0.
    z = (series[:, 0] - series[:80, 0].mean()) / (series[:80, 0].std() + 1e-6)
    np.testing.assert_allclose(ds.y_train[0, 0], z[8], rtol=1e-5)
    lm = text_to_dataset(b"abcdefghij" * 10, b"0123456789" * 3, context=8)
    assert lm.x_train.shape == (12, 8) and lm.num_outputs == 256
    np.testing.assert_array_equal(lm.y_train[0, :-1], lm.x_train[0, 1:])


def _household_zip(path):
    from sm2jax.datasets.household_power import ARCHIVE, COLUMNS, FILE

    rows = ["Date;Time;" + ";".join(COLUMNS)]
    for hour in range(40):
        for minute in (0, 30):
            day, h = 16 + hour // 24, hour % 24
            sub3 = "?" if minute == 30 else "17.0"
            rows.append(f"{day}/12/2006;{h:02d}:{minute:02d}:00;{hour + minute / 30:.1f};0.1;240.0;4.0;0.0;1.0;{sub3}")
    with zipfile.ZipFile(path / ARCHIVE, "w") as z:
        z.writestr(FILE, "\n".join(rows) + "\n")


def test_household_power_builder_offline(tmp_path):
    from sm2jax.data import load_household_power
    from sm2jax.datasets.household_power import HouseholdPower

    manual = tmp_path / "manual"
    manual.mkdir()
    _household_zip(manual)
    builder = HouseholdPower(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    assert builder.info.splits["train"].num_examples == 40
    source = tfds.data_source("household_power", split="train", data_dir=str(tmp_path))
    hours, values = source_to_arrays(source, lambda r: (np.int64(r["hour"]), r["values"]))
    first = values[np.argmin(hours)]
    np.testing.assert_allclose(first, [0.5, 0.1, 240.0, 4.0, 0.0, 1.0, 17.0], rtol=1e-6)  # '?' skipped in the mean
    ds = load_household_power(data_dir=str(tmp_path), window=6, download=False)
    assert ds.task == "regression" and ds.x_train.shape[1:] == (6, 7)


def test_wikitext2_builder_offline(tmp_path):
    from sm2jax.data import load_wikitext2
    from sm2jax.datasets.wikitext2 import ARCHIVE, FILES

    manual = tmp_path / "manual"
    manual.mkdir()
    with zipfile.ZipFile(manual / ARCHIVE, "w") as z:
        for name in FILES.values():
            z.writestr(f"wikitext-2-raw/{name}", " = Title = \n\n" + " the quick brown fox\n" * 20)
    from sm2jax.datasets.wikitext2 import Wikitext2

    builder = Wikitext2(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual)))
    assert builder.info.splits["validation"].num_examples == 21
    ds = load_wikitext2(data_dir=str(tmp_path), context=16, download=False)
    assert ds.task == "language_model" and ds.x_train.shape[1] == 16
    assert bytes(ds.x_train[0].astype(np.uint8)).isascii()


def test_mnist1d_is_generated_offline_with_its_own_split():
    ds = load_dataset("mnist1d", num_samples=300)  # make_dataset only: no download
    assert ds.name == "mnist1d" and ds.task == "classification" and ds.num_outputs == 10
    assert (
        ds.x_train.shape == (192, 40, 1)
        and ds.x_val.shape == (48, 40, 1)
        and ds.x_test.shape == (60, 40, 1)
        and ds.x_train.dtype == np.float32
    )
    assert set(np.unique(ds.y_train).tolist()) <= set(range(10)) and ds.y_train.dtype == np.int32
    again = load_dataset("mnist1d", num_samples=300)
    np.testing.assert_array_equal(ds.x_train, again.x_train)  # seeded: the same data every time


def test_forecast_splits_are_chronological_and_come_with_yardsticks():
    from sm2jax.yardsticks import forecast_yardsticks

    rng = np.random.default_rng(0)
    steps = 2000
    level = np.zeros(steps)
    for t in range(1, steps):  # AR(1) around 0 plus a daily cycle: persistence is beatable
        level[t] = 0.8 * level[t - 1] + np.sin(2 * np.pi * t / 24) + rng.normal(0, 0.3)
    series = np.stack([level, np.arange(steps, dtype=np.float64)], 1).astype(np.float32)  # feature 1: time
    ds = windows_to_dataset(series, window=24, val_fraction=0.1, test_fraction=0.1)
    time = lambda x: x[:, -1, 1]  # the window's last step, standardised time: increasing
    assert time(ds.x_train).max() < time(ds.x_val).min() and time(ds.x_val).max() < time(ds.x_test).min()
    assert len(ds.x_test) == pytest.approx(200, abs=2) and ds.forecast_feature == 0
    yard = forecast_yardsticks(ds)
    persistence = float(np.mean((ds.x_test[:, -1, 0] - ds.y_test[:, 0]) ** 2))
    assert yard["persistence"]["test"] == pytest.approx(persistence, rel=1e-6)
    assert yard["ridge"]["test"] < 0.5 * yard["persistence"]["test"]  # the cycle is linear in the window
    assert yard["ridge"]["lambda"] in (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4)
    assert forecast_yardsticks(windows_to_dataset(series, 24, 0.2)).keys() >= {"persistence", "ridge"}
    with pytest.raises(ValueError, match="sum below 1"):
        windows_to_dataset(series, 24, 0.6, 0.5)
