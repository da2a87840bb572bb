"""Shared download logic for our builders."""

from __future__ import annotations

import zipfile

import tensorflow_datasets as tfds
from etils import epath


def fetch_archive(dl_manager: tfds.download.DownloadManager, url: str, archive_name: str) -> epath.Path:
    """Returns the folder holding the extracted ``archive_name``.

    The archive is read from ``manual_dir`` if present, else downloaded from ``url``. We unzip with
    the standard library: the TFDS extractor needs TensorFlow, which this project does not install.
    """
    manual = dl_manager.manual_dir / archive_name if dl_manager.manual_dir else None
    archive = manual if manual is not None and manual.exists() else dl_manager.download(url)
    target = epath.Path(dl_manager.download_dir) / "extracted" / archive_name
    if not (target / ".complete").exists():
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(target)
        (target / ".complete").touch()
    return target
