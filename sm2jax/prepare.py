"""``sm2jax prepare``: the paper's data sets, prepared once (download, or an archive you place).

Each data set is a TFDS builder of ours that reads the original archive with the standard library
(no TensorFlow): ``cifar10`` (:mod:`sm2jax.datasets.cifar10_binary`), ``household_power`` and
``wikitext2``. The archive is taken from the manual folder (``<data_dir>/downloads/manual`` unless
``manual_dir`` names another) when it is there, else downloaded -- after a quick check that the
host answers, so that an offline machine gets one line saying which file to place where, not minutes
of connection retries. Preparing is idempotent: a prepared data set is left as it is.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import socket
import sys
import urllib.parse

from sm2jax._absl import quiet_absl

BUILDERS = {  # data set -> (module, builder class)
    "cifar10": ("sm2jax.datasets.cifar10_binary", "Cifar10Binary"),
    "household_power": ("sm2jax.datasets.household_power", "HouseholdPower"),
    "wikitext2": ("sm2jax.datasets.wikitext2", "Wikitext2"),
}


class ArchiveMissing(FileNotFoundError):
    """The archive is not in the manual folder and cannot be downloaded from here."""


def default_data_dir(data_dir: str | os.PathLike | None = None) -> str:
    """``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (TFDS's own default)."""
    return os.fspath(
        data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")
    )


def _reachable(url: str, timeout: float) -> bool:
    parts = urllib.parse.urlparse(url)
    try:
        with socket.create_connection(
            (parts.hostname, parts.port or (443 if parts.scheme == "https" else 80)), timeout=timeout
        ):
            return True
    except OSError:
        return False


def builder(name: str, data_dir: str | os.PathLike | None = None):
    """The TFDS builder behind data set ``name`` (one of :data:`BUILDERS`)."""
    if name not in BUILDERS:
        raise ValueError(
            f"unknown data set to prepare {name!r}; known: {', '.join(BUILDERS)} (digits and mnist1d need no preparation)"
        )
    module_name, class_name = BUILDERS[name]
    module = importlib.import_module(module_name)
    with _quiet_tfds():
        return getattr(module, class_name)(data_dir=default_data_dir(data_dir), file_format="array_record"), module


def _quiet_tfds():
    """Silences TFDS's "Variant folder ... has no dataset_info.json" (it looking for a prepared
    copy that is not there yet) so that a missing archive stays a one-line message."""
    return quiet_absl(logging.ERROR)


def prepare(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    manual_dir: str | os.PathLike | None = None,
    download: bool = True,
    timeout: float = 5.0,
) -> str:
    """Prepares data set ``name`` under ``data_dir``; returns the prepared folder.

    Raises:
      ArchiveMissing: the archive is not in the manual folder and ``download`` is off or the host
        does not answer within ``timeout`` seconds; the message names the file, its URL and the folder.
    """
    b, module = builder(name, data_dir)
    with _quiet_tfds():
        if b.is_prepared():
            return os.fspath(b.data_dir)
    manual = os.fspath(manual_dir or os.path.join(default_data_dir(data_dir), "downloads", "manual"))
    archive = os.path.join(manual, module.ARCHIVE)
    if not os.path.exists(archive):
        why = (
            "downloading is off"
            if not download
            else f"{urllib.parse.urlparse(module.URL).hostname} cannot be reached from here"
            if not _reachable(module.URL, timeout)
            else None
        )
        if why is not None:
            hint = (
                f"sm2jax prepare {name}"
                + (f" --data-dir {data_dir}" if data_dir else "")
                + (f" --manual-dir {manual_dir}" if manual_dir else "")
            )
            raise ArchiveMissing(
                f"{name} is not prepared and {why}: download {module.URL} and place {module.ARCHIVE} in {manual}, then run `{hint}`"
            )
    import tensorflow_datasets as tfds

    with contextlib.redirect_stdout(sys.stderr):  # TFDS prints "Dataset ... prepared"; stdout is for results (--json)
        b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    return os.fspath(b.data_dir)
