"""CIFAR-10 (Krizhevsky 2009) from the original binary archive, prepared without TensorFlow.

The TFDS catalogue's ``cifar10`` builder extracts its archive with TFDS's extractor, which imports
TensorFlow. This builder reads ``cifar-10-binary.tar.gz`` with the standard library instead: each
record is one label byte and 3,072 pixel bytes (1,024 red, then green, then blue, row-major 32x32).
Splits: ``train`` (``data_batch_1.bin`` .. ``data_batch_5.bin``, 50,000 images) and ``test``
(``test_batch.bin``, 10,000), as in the catalogue.
"""

from __future__ import annotations

import tarfile
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE = "cifar-10-binary.tar.gz"
FILES = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
RECORD = 1 + 32 * 32 * 3


def read_records(blob: bytes) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8[N, 32, 32, 3], labels int64[N])`` from the bytes of one ``.bin`` file."""
    if len(blob) % RECORD:
        raise ValueError(f"a CIFAR-10 batch file holds whole {RECORD}-byte records; got {len(blob)} bytes")
    raw = np.frombuffer(blob, np.uint8).reshape(-1, RECORD)
    return raw[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), raw[:, 0].astype(np.int64)


class Cifar10Binary(tfds.core.GeneratorBasedBuilder):
    """CIFAR-10 images and labels from the binary archive."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "The original binary archive, read with the standard library."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Optionally place {ARCHIVE} (from {URL}) in manual_dir."

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            # Raw uint8 tensors: TFDS's Image feature PNG-encodes with TensorFlow.
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Tensor(shape=(32, 32, 3), dtype=np.uint8),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
        )

    def _split_generators(self, dl_manager):
        from sm2jax.datasets._common import archive_path

        path = archive_path(dl_manager, URL, ARCHIVE)
        return {split: self._generate_examples(path, names) for split, names in FILES.items()}

    def _generate_examples(self, path, names):
        with tarfile.open(path, "r:gz") as tar:
            members = {m.name.rsplit("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
            for name in names:
                if name not in members:
                    raise ValueError(f"{path} has no {name}: is it the binary CIFAR-10 archive ({URL})?")
                images, labels = read_records(tar.extractfile(members[name]).read())
                for i, (image, label) in enumerate(zip(images, labels)):
                    yield f"{name}-{i}", {"image": image, "label": int(label)}
