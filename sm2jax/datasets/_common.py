"""Shared download logic for our builders."""

from __future__ import annotations

import zipfile

import tensorflow_datasets as tfds
from etils import epath


def archive_path(dl_manager: tfds.download.DownloadManager, url: str, archive_name: str) -> epath.Path:
    """``archive_name`` from ``manual_dir`` if it is there, else downloaded from ``url``.

    (TFDS's ``manual_dir`` property raises when the folder is missing or empty; that only means
    "download it".)"""
    try:
        manual = dl_manager.manual_dir / archive_name
    except AssertionError:
        manual = None
    return manual if manual is not None and manual.exists() else dl_manager.download(url)


def fetch_archive(dl_manager: tfds.download.DownloadManager, url: str, archive_name: str) -> epath.Path:
    """Returns the folder holding the extracted ``archive_name`` (:func:`archive_path`). We unzip
    with the standard library: the TFDS extractor needs TensorFlow, which this project does not
    install."""
    archive = archive_path(dl_manager, url, archive_name)
    target = epath.Path(dl_manager.download_dir) / "extracted" / archive_name
    if not (target / ".complete").exists():
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(target)
        (target / ".complete").touch()
    return target
