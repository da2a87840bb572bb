"""Data sets as in-memory arrays, read through ``tfds.data_source`` + ``grain`` (no TensorFlow).

All of the paper's data sets fit in device memory (CIFAR-10 is 150 MB as uint8), so a cohort keeps
the training arrays on the device and every trial draws its own batches *inside* the jitted step:
:func:`sm2jax.execute.batches.batch_indices` maps (per-trial data key, per-trial step) to example indices. The data
position of a trial is therefore just its step counter, which makes survivor gathering and resuming
exact with no iterator state to checkpoint.

Sources:

* ``digits`` -- the 8x8 digits shipped inside scikit-learn (offline default);
* ``mnist``, ``cifar10`` -- the TFDS catalogue;
* ``household_power``, ``wikitext2`` -- TFDS builders of our own in :mod:`sm2jax.datasets`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
from collections.abc import Callable
from typing import Any

import numpy as np

from sm2jax.registry import Registry
from sm2jax.tasks import get_task

BUILTIN_DATASETS = ("digits", "mnist1d", "mnist", "cifar10", "household_power", "wikitext2")


@dataclasses.dataclass(frozen=True)
class ArrayDataset:
    """A training, a validation and (where the data set has one) a held-out test split as numpy arrays.

    A study selects on the validation split only; the test split is evaluated once, for the selected
    configuration, so the reported test metric is never tuned on.

    Attributes:
      name: data set name.
      task: the name of a registered :class:`sm2jax.tasks.Task` (``classification``,
        ``regression``, ``language_model`` or your own); selects the loss and the metric.
      x_train, y_train, x_val, y_val: examples along axis 0.
      num_outputs: classes, regression targets or vocabulary size.
      x_test, y_test: the held-out test split, or ``None``.
      forecast_feature: for windows ``[N, T, F]`` whose target is input feature ``forecast_feature``
        one step after the window (a forecast), its index: a study then reports the persistence
        and ridge-regression yardsticks (:mod:`sm2jax.yardsticks`); ``None`` otherwise.
    """

    name: str
    task: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_val: np.ndarray
    y_val: np.ndarray
    num_outputs: int
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    forecast_feature: int | None = None

    def __post_init__(self):
        get_task(self.task)  # one-line error naming the known tasks
        if len(self.x_train) != len(self.y_train) or len(self.x_val) != len(self.y_val):
            raise ValueError(f"{self.name}: inputs and targets differ in length")
        if len(self.x_train) == 0 or len(self.x_val) == 0:
            raise ValueError(f"{self.name}: empty training or validation split")
        if (self.x_test is None) != (self.y_test is None) or (
            self.x_test is not None and (len(self.x_test) != len(self.y_test) or len(self.x_test) == 0)
        ):
            raise ValueError(
                f"{self.name}: the test split needs inputs and targets of one non-zero length (or neither)"
            )

    def fingerprint(self) -> str:
        """A SHA-1 of the splits' bytes, shapes and dtypes (plus task and outputs): what a study
        records to refuse resuming on different data."""
        h = hashlib.sha1(f"{self.task}|{self.num_outputs}".encode())
        for a in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test):
            if a is None:
                h.update(b"none")
                continue
            a = np.ascontiguousarray(a)
            h.update(f"{a.shape}{a.dtype}".encode())
            h.update(memoryview(a).cast("B"))
        return h.hexdigest()[:16]

    @property
    def has_test(self) -> bool:
        return self.x_test is not None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @property
    def num_train(self) -> int:
        return len(self.x_train)

    def subset(self, num_train: int | None = None, num_val: int | None = None) -> ArrayDataset:
        """The first ``num_train``/``num_val`` examples (for quick runs and tests)."""
        return dataclasses.replace(
            self,
            x_train=self.x_train[:num_train],
            y_train=self.y_train[:num_train],
            x_val=self.x_val[:num_val],
            y_val=self.y_val[:num_val],
        )


def load_digits(val_fraction: float = 0.2, test_fraction: float = 0.2, seed: int = 0) -> ArrayDataset:
    """The 1797 8x8 digit images that ship inside scikit-learn: offline, ~1 s to load.

    Images are ``float32[8, 8, 1]`` scaled to [0, 1]; validation and test splits are seeded
    ``val_fraction`` and ``test_fraction`` hold-outs (359 examples each by default).
    """
    from sklearn.datasets import load_digits as sk_digits

    if not (0 < val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(
            f"digits: need 0 < val_fraction, 0 <= test_fraction, sum < 1 (got {val_fraction}, {test_fraction})"
        )
    bunch = sk_digits()
    x = (bunch.images.astype(np.float32) / 16.0)[..., None]
    y = bunch.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    n_val, n_test = round(len(x) * val_fraction), round(len(x) * test_fraction)
    val, test, train = order[:n_val], order[n_val : n_val + n_test], order[n_val + n_test :]
    held = (x[test], y[test]) if n_test else (None, None)
    return ArrayDataset("digits", "classification", x[train], y[train], x[val], y[val], 10, *held)


def source_to_arrays(source: Any, to_example, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Reads a random-access source (e.g. ``tfds.data_source``) into two stacked arrays with grain.

    Args:
      source: anything with ``__len__`` and ``__getitem__``.
      to_example: maps one record to an ``(x, y)`` pair of arrays.
      chunk: records per grain batch.
    """
    import grain

    if len(source) == 0:
        raise ValueError("empty data source")
    batches = grain.MapDataset.source(source).map(to_example).batch(chunk)
    xs, ys = zip(*(batches[i] for i in range(len(batches))))
    return np.concatenate(xs), np.concatenate(ys)


def _image_example(record):
    image = np.asarray(record["image"], dtype=np.float32) / 255.0
    return image, np.int32(record["label"])


def load_tfds_images(
    name: str, *, data_dir: str | None = None, val_percent: int = 10, download: bool = True
) -> ArrayDataset:
    """CIFAR-10 (our builder on the original binary archive, prepared without TensorFlow: see
    :mod:`sm2jax.prepare`) or MNIST (the TFDS catalogue).

    The validation split is the last ``val_percent`` % of ``train``; the test split stays untouched
    so that a study's selection is never tuned on it.
    """
    import tensorflow_datasets as tfds

    splits = [f"train[:{100 - val_percent}%]", f"train[{100 - val_percent}%:]", "test"]
    if name == "cifar10":
        from sm2jax.prepare import default_data_dir, prepare

        prepare("cifar10", data_dir=data_dir, download=download)
        train, val, test = tfds.data_source(
            "cifar10_binary", split=splits, data_dir=default_data_dir(data_dir), download=False
        )
    else:
        try:
            train, val, test = tfds.data_source(name, split=splits, data_dir=data_dir, download=download)
        except Exception as err:
            # Reading needs no TensorFlow, but TFDS's archive extractor (used once, when a catalogue
            # data set is prepared) does: say so instead of surfacing a bare ModuleNotFoundError.
            if "tensorflow" in str(err).lower():
                raise RuntimeError(
                    f"preparing {name!r} with TFDS needs TensorFlow once (its archive extractor imports it): "
                    f"`pip install tensorflow-cpu`, run again, then uninstall it if you like; or copy an already "
                    f"prepared array_record {name} folder into data_dir"
                ) from err
            raise
    x_train, y_train = source_to_arrays(train, _image_example)
    x_val, y_val = source_to_arrays(val, _image_example)
    x_test, y_test = source_to_arrays(test, _image_example)
    classes = int(max(y_train.max(), y_val.max())) + 1
    return ArrayDataset(name, "classification", x_train, y_train, x_val, y_val, classes, x_test, y_test)


def load_household_power(
    *,
    data_dir: str | None = None,
    window: int = 24,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    download: bool = True,
) -> ArrayDataset:
    """Next-hour global active power from the previous ``window`` hours of all 7 measurements.

    Reads the hourly means prepared by :class:`sm2jax.datasets.household_power.HouseholdPower`;
    features are standardised with training-split statistics. The splits are chronological: the
    last ``test_fraction`` of the hours is the held-out test split, the ``val_fraction`` before it
    the validation split (a forecast is judged on hours after everything it was trained or selected
    on). The persistence and ridge-regression yardsticks come with it (``forecast_feature=0``).
    """
    import tensorflow_datasets as tfds

    from sm2jax.prepare import default_data_dir, prepare

    prepare("household_power", data_dir=data_dir, download=download)  # registers the builder; one-line error offline
    source = tfds.data_source("household_power", split="train", data_dir=default_data_dir(data_dir), download=False)
    hours, values = source_to_arrays(source, lambda r: (np.int64(r["hour"]), np.asarray(r["values"], np.float32)))
    values = values[np.argsort(hours)]
    return windows_to_dataset(values, window, val_fraction, test_fraction)


def windows_to_dataset(
    values: np.ndarray, window: int, val_fraction: float, test_fraction: float = 0.0
) -> ArrayDataset:
    """Sliding windows over a ``[T, F]`` series; the target is feature 0 of the next step.

    Chronological splits by the target's step: the first ``1 - val_fraction - test_fraction`` of the
    steps train (and fix the standardisation), the next ``val_fraction`` validate, the last
    ``test_fraction`` test (none at 0). A window's history may reach back into the split before.
    """
    if len(values) <= window + 1:
        raise ValueError(f"series of {len(values)} steps is too short for window {window}")
    if not (0 < val_fraction and 0 <= test_fraction and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction {val_fraction} and test_fraction {test_fraction} must be >= 0 (val > 0) and sum below 1"
        )
    n_train_steps = int(len(values) * (1 - val_fraction - test_fraction))
    n_val_end = int(len(values) * (1 - test_fraction))
    mean, std = values[:n_train_steps].mean(0), values[:n_train_steps].std(0) + 1e-6
    z = ((values - mean) / std).astype(np.float32)
    starts = np.arange(len(z) - window)
    x = np.stack([z[s : s + window] for s in starts])
    y = z[starts + window, :1]
    cut, val_end = max(n_train_steps - window, 1), max(n_val_end - window, 2)
    test = (x[val_end:], y[val_end:]) if test_fraction > 0 and val_end < len(x) else (None, None)
    return ArrayDataset(
        "household_power",
        "regression",
        x[:cut],
        y[:cut],
        x[cut:val_end],
        y[cut:val_end],
        1,
        *test,
        forecast_feature=0,
    )


def load_wikitext2(*, data_dir: str | None = None, context: int = 64, download: bool = True) -> ArrayDataset:
    """Byte-level language modelling on WikiText-2 (raw): vocabulary 256, ``context``-token chunks.

    Bytes need no tokenizer download; perplexities are per byte, not per word.
    """
    import tensorflow_datasets as tfds

    from sm2jax.prepare import default_data_dir, prepare

    prepare("wikitext2", data_dir=data_dir, download=download)  # registers the builder; one-line error offline
    train, val = tfds.data_source(
        "wikitext2", split=["train", "validation"], data_dir=default_data_dir(data_dir), download=False
    )
    return text_to_dataset(_join_lines(train), _join_lines(val), context)


def _join_lines(source) -> bytes:
    lines = [source[i]["text"] for i in range(len(source))]
    return b"\n".join(line if isinstance(line, bytes) else line.encode() for line in lines)


def text_to_dataset(train_text: bytes, val_text: bytes, context: int) -> ArrayDataset:
    """Cuts byte strings into non-overlapping ``context + 1`` chunks: inputs and shifted targets."""

    def chunks(text: bytes) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.frombuffer(text, dtype=np.uint8).astype(np.int32)
        n = (len(tokens) - 1) // context
        if n < 1:
            raise ValueError(f"text of {len(tokens)} bytes is shorter than one context of {context}")
        x = tokens[: n * context].reshape(n, context)
        y = tokens[1 : n * context + 1].reshape(n, context)
        return x, y

    (xt, yt), (xv, yv) = chunks(train_text), chunks(val_text)
    return ArrayDataset("wikitext2", "language_model", xt, yt, xv, yv, 256)


def load_mnist1d(num_samples: int = 5000, seed: int = 42, val_fraction: float = 0.2) -> ArrayDataset:
    """MNIST-1D (Greydanus & Kobak), generated offline by the ``mnist1d`` package's ``make_dataset``.

    ``num_samples`` sequences of length 40 (``float32[40, 1]``), 10 classes. The package's own test
    split (20%) is the held-out test split; the last ``val_fraction`` of its training split is the
    validation split (3,200 / 800 / 1,000 at the default 5,000 samples). Never calls
    ``get_dataset``, which downloads. Needs ``pip install mnist1d`` (the ``bench`` extra).
    """
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as err:
        raise ImportError("MNIST-1D needs the mnist1d package: pip install mnist1d (or sm2jax[bench])") from err
    args = get_dataset_args()
    args.num_samples, args.seed = int(num_samples), int(seed)
    d = make_dataset(args)
    as_x = lambda a: np.asarray(a, np.float32)[..., None]
    x, y = as_x(d["x"]), np.asarray(d["y"], np.int32)
    cut = len(x) - round(len(x) * val_fraction)
    return ArrayDataset(
        "mnist1d",
        "classification",
        x[:cut],
        y[:cut],
        x[cut:],
        y[cut:],
        10,
        as_x(d["x_test"]),
        np.asarray(d["y_test"], np.int32),
    )


def register_dataset(name: str, loader: Callable[..., ArrayDataset]) -> None:
    """Makes ``loader(**options) -> ArrayDataset`` available as data set ``name``
    (``StudySpec(dataset=name, dataset_options=options)``).

    A study records the name and options, and the loader's module when it is importable, so
    ``sm2jax resume`` can import it again; a loader defined in a notebook or script (``__main__``)
    has to be registered again before resuming. Registering a name again replaces the loader;
    built-in names cannot be replaced. For arrays already in memory, ``Study(..., dataset=ds)`` is
    the alternative (the study records their fingerprint and refuses to resume on other data).
    """
    DATASETS.refuse_builtin(name)
    if not callable(loader):
        raise TypeError(f"register_dataset({name!r}, ...): the loader must be callable")
    DATASETS.register(loader, name)


def registered_dataset(name: str) -> Callable[..., ArrayDataset] | None:
    """The loader you registered as ``name`` (``None``: a built-in name, or none registered)."""
    return None if name in DATASETS.builtin() else DATASETS.get(name, None)


def load_dataset(name: str, **kwargs) -> ArrayDataset:
    """Loads a data set by name: ``digits``, ``mnist1d``, ``mnist``, ``cifar10``, ``household_power``,
    ``wikitext2``, or one registered with :func:`register_dataset`. An option the loader does not
    take is a one-line error naming the options it does take."""
    check_dataset_options(name, kwargs)
    return _loader(name)(**kwargs)


def check_dataset_options(name: str, options: dict[str, Any]) -> None:
    """Raises a one-line ``ValueError`` for an unknown data set or an option its loader does not
    take (naming the options it does take), without loading anything."""
    loader = _loader(name)
    unknown = _unknown_options(loader, options)
    if unknown:
        takes = [p for p in inspect.signature(loader).parameters if p not in ("self", "name")]
        raise ValueError(
            f"dataset_options: data set {name!r} takes no option {', '.join(map(repr, unknown))}; it takes: {', '.join(takes) or 'none'} (e.g. --set dataset_options.{takes[0] if takes else 'OPTION'}=...)"
        )


def _unknown_options(loader: Callable[..., Any], options: dict[str, Any]) -> list[str]:
    params = inspect.signature(loader).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return []
    return sorted(set(options) - {p.name for p in params})


def _loader(name: str) -> Callable[..., ArrayDataset]:
    """The function that loads data set ``name``."""
    loader = DATASETS.get(name)
    return loader if name in DATASETS.builtin() else functools.partial(_registered, name)


def _registered(name: str, **kwargs) -> ArrayDataset:
    ds = DATASETS[name](**kwargs)
    if not isinstance(ds, ArrayDataset):
        raise TypeError(
            f"the loader registered as data set {name!r} returned {type(ds).__name__}, not sm2jax.data.ArrayDataset"
        )
    return ds


DATASETS: Registry[Callable[..., ArrayDataset]] = Registry(
    "data set", "sm2jax.register_dataset", hint="or pass Study(..., dataset=ArrayDataset(...))"
)
"""Every data set's loader by name (:mod:`sm2jax.registry`): the built-in ones, then yours."""
for _name, _load in zip(
    BUILTIN_DATASETS,
    (
        load_digits,
        load_mnist1d,
        functools.partial(load_tfds_images, "mnist"),
        functools.partial(load_tfds_images, "cifar10"),
        load_household_power,
        load_wikitext2,
    ),
    strict=True,
):
    DATASETS.register(_load, _name)
DATASETS.seal()
