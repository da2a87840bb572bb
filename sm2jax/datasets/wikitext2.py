"""WikiText-2 (raw), Merity et al. 2016: Wikipedia articles, one record per line of text."""

from __future__ import annotations

from typing import ClassVar

import tensorflow_datasets as tfds

from sm2jax.datasets._common import fetch_archive

URL = "https://wikitext.smerity.com/wikitext-2-raw-v1.zip"
ARCHIVE = "wikitext-2-raw-v1.zip"
FILES = {"train": "wiki.train.raw", "validation": "wiki.valid.raw", "test": "wiki.test.raw"}


class Wikitext2(tfds.core.GeneratorBasedBuilder):
    """WikiText-2 raw text lines (empty lines dropped)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Raw WikiText-2 lines."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Optionally place {ARCHIVE} (from {URL}) in manual_dir."

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            homepage="https://blog.salesforceairesearch.com/the-wikitext-long-term-dependency-language-modeling-dataset/",
        )

    def _split_generators(self, dl_manager):
        root = fetch_archive(dl_manager, URL, ARCHIVE) / "wikitext-2-raw"
        return {split: self._generate_examples(root / name) for split, name in FILES.items()}

    def _generate_examples(self, path):
        with path.open("r") as f:
            for i, line in enumerate(f):
                if line.strip():
                    yield i, {"text": line.rstrip("\n")}
