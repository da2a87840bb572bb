"""UCI "Individual household electric power consumption" (Hebrail & Berard, 2012), hourly means.

The source has one row per minute from Dec 2006 to Nov 2010 (2,075,259 rows, '?' where missing) with
7 measurements. We store hourly means of the measurements present in each hour (about 34.6k
records); hours with no measurement are dropped.
"""

from __future__ import annotations

import datetime
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from sm2jax.datasets._common import fetch_archive

URL = "https://archive.ics.uci.edu/static/public/235/individual+household+electric+power+consumption.zip"
ARCHIVE = "individual+household+electric+power+consumption.zip"
FILE = "household_power_consumption.txt"
COLUMNS = (
    "Global_active_power",
    "Global_reactive_power",
    "Voltage",
    "Global_intensity",
    "Sub_metering_1",
    "Sub_metering_2",
    "Sub_metering_3",
)


class HouseholdPower(tfds.core.GeneratorBasedBuilder):
    """Hourly means of the 7 household power measurements."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Hourly means of the UCI minute data."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = f"Optionally place {ARCHIVE} (from {URL}) in manual_dir."

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "hour": np.int64,  # hours since 1970-01-01
                    "values": tfds.features.Tensor(shape=(len(COLUMNS),), dtype=np.float32),
                }
            ),
            homepage="https://archive.ics.uci.edu/dataset/235",
        )

    def _split_generators(self, dl_manager):
        path = fetch_archive(dl_manager, URL, ARCHIVE)
        return {"train": self._generate_examples(path / FILE)}

    def _generate_examples(self, path):
        with path.open("r") as f:
            yield from hourly_means(f)


def hourly_means(lines):
    """Yields ``(key, record)`` hourly means from the semicolon-separated minute rows."""
    epoch = datetime.datetime(1970, 1, 1)
    current, sums, counts = None, np.zeros(len(COLUMNS)), np.zeros(len(COLUMNS))

    def flush():
        present = counts > 0
        if present.all():
            return current, {"hour": current, "values": (sums / counts).astype(np.float32)}
        return None

    for line in lines:
        fields = line.strip().split(";")
        if len(fields) != 2 + len(COLUMNS) or fields[0] == "Date":
            continue
        stamp = datetime.datetime.strptime(fields[0] + " " + fields[1][:2], "%d/%m/%Y %H")
        hour = int((stamp - epoch).total_seconds() // 3600)
        if hour != current:
            if current is not None and (record := flush()):
                yield record
            current, sums, counts = hour, np.zeros(len(COLUMNS)), np.zeros(len(COLUMNS))
        for i, text in enumerate(fields[2:]):
            if text not in ("?", ""):
                sums[i] += float(text)
                counts[i] += 1
    if current is not None and (record := flush()):
        yield record
