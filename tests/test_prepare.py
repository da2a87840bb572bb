"""`sm2jax prepare` on each paper data set, offline, from a small generated archive placed where its
one-line message says."""

import io
import re
import tarfile
import zipfile

import numpy as np
import pytest

from sm2jax.cli import main
from sm2jax.data import load_dataset


def _household(path):
    from sm2jax.datasets.household_power import COLUMNS, FILE

    rows = ["Date;Time;" + ";".join(COLUMNS)]
    for hour in range(40):
        day, h = 16 + hour // 24, hour % 24
        rows.append(f"{day}/12/2006;{h:02d}:00:00;{hour:.1f};0.1;240.0;4.0;0.0;1.0;17.0")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(FILE, "\n".join(rows) + "\n")


def _wikitext(path, lines=30):
    from sm2jax.datasets.wikitext2 import FILES

    with zipfile.ZipFile(path, "w") as z:
        for name in FILES.values():
            z.writestr(f"wikitext-2-raw/{name}", " = Title = \n\n" + " the quick brown fox jumps\n" * lines)


def _cifar(path, per_file=10):
    from sm2jax.datasets.cifar10_binary import FILES

    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:
        for name in FILES["train"] + FILES["test"]:
            labels = np.arange(per_file, dtype=np.uint8) % 10
            pixels = rng.integers(0, 256, (per_file, 3 * 32 * 32), dtype=np.uint8)
            pixels[:, 0] = labels * 20  # red of pixel (0, 0) encodes the label: checks the layout
            blob = np.concatenate([labels[:, None], pixels], axis=1).tobytes()
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


@pytest.mark.parametrize(
    "name, make, options",
    [
        ("household_power", _household, {"window": 6}),
        ("wikitext2", _wikitext, {"context": 16}),
        ("cifar10", _cifar, {}),
    ],
)
def test_prepare_offline_from_the_archive_the_message_names(tmp_path, capsys, name, make, options):
    data_dir = tmp_path / "tfds"
    assert main(["prepare", name, "--data-dir", str(data_dir), "--no-download"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "download" in err and "Traceback" not in err
    archive, folder = re.search(r"place (\S+) in (\S+), then run", err).groups()
    assert folder == str(data_dir / "downloads" / "manual")
    with pytest.raises(
        FileNotFoundError, match="place"
    ):  # the data set cannot be loaded either: same message, no retries
        load_dataset(name, data_dir=str(data_dir), download=False, **options)

    (data_dir / "downloads" / "manual").mkdir(parents=True)
    make(data_dir / "downloads" / "manual" / archive)
    assert main(["prepare", name, "--data-dir", str(data_dir), "--no-download"]) == 0
    assert "is prepared" in capsys.readouterr().out
    assert main(["prepare", name, "--data-dir", str(data_dir), "--no-download"]) == 0  # idempotent

    ds = load_dataset(name, data_dir=str(data_dir), download=False, **options)
    assert len(ds.x_train) > 0 and len(ds.x_val) > 0
    if name == "cifar10":
        assert ds.input_shape == (32, 32, 3) and ds.num_outputs == 10 and len(ds.x_test) == 10
        np.testing.assert_allclose(
            ds.x_test[:, 0, 0, 0] * 255, ds.y_test * 20, atol=1e-3
        )  # record layout: label, R, G, B planes
    elif name == "wikitext2":
        assert ds.task == "language_model" and ds.x_train.shape[1] == 16
    else:
        assert ds.task == "regression" and ds.x_train.shape[1:] == (6, 7)


def test_prepare_takes_the_archive_from_a_folder_the_user_names(tmp_path, capsys):
    manual = tmp_path / "my-downloads"
    manual.mkdir()
    from sm2jax.datasets.wikitext2 import ARCHIVE

    _wikitext(manual / ARCHIVE)
    assert (
        main(
            ["prepare", "wikitext2", "--data-dir", str(tmp_path / "tfds"), "--manual-dir", str(manual), "--no-download"]
        )
        == 0
    )
    assert load_dataset("wikitext2", data_dir=str(tmp_path / "tfds"), context=8, download=False).num_outputs == 256


@pytest.mark.parametrize(
    "folder, name, make",
    [
        ("cifar10_resnet18", "cifar10", lambda p: _cifar(p, per_file=30)),
        ("household_lstm", "household_power", None),
        ("wikitext2_transformer", "wikitext2", lambda p: _wikitext(p, lines=400)),  # > 32 chunks of 64 bytes
    ],
)
@pytest.mark.slow
def test_paper_configs_run_quick_from_the_command_line_on_generated_data(tmp_path, capsys, folder, name, make):
    import json
    import pathlib

    from sm2jax.datasets import household_power  # noqa: F401

    data_dir = tmp_path / "tfds"
    manual = data_dir / "downloads" / "manual"
    manual.mkdir(parents=True)
    module = __import__(f"sm2jax.datasets.{ {'cifar10': 'cifar10_binary'}.get(name, name) }", fromlist=["ARCHIVE"])
    if make is None:  # enough hours for 24-hour windows
        from sm2jax.datasets.household_power import COLUMNS, FILE

        rows = ["Date;Time;" + ";".join(COLUMNS)] + [
            f"{1 + h // 24}/1/2007;{h % 24:02d}:00:00;{1 + np.sin(h / 5):.3f};0.1;240.0;4.0;0.0;1.0;17.0"
            for h in range(24 * 20)
        ]
        with zipfile.ZipFile(manual / module.ARCHIVE, "w") as z:
            z.writestr(FILE, "\n".join(rows) + "\n")
    else:
        make(manual / module.ARCHIVE)
    config = pathlib.Path(__file__).resolve().parents[1] / "experiments" / folder / "config.py"
    study = tmp_path / "study"
    argv = [
        "run",
        "--config",
        str(config),
        "--quick",
        "--data-dir",
        str(data_dir),
        "--dir",
        str(study),
        "--no-progress",
        "--idle-seconds",
        "0",
        "--energy",
        "estimated",
        "--set",
        "max_budget=2",
        "--set",
        "min_budget=1",
        "--json",
    ]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    results = json.loads(capsys.readouterr().out)  # stdout holds the results only
    assert results["selected"] is not None and len(results["trials"]) == 2  # the quick variant is small
    spec = json.loads((study / "spec.json").read_text())
    assert spec["max_budget"] == 2 and spec["dataset_options"]["data_dir"] == str(data_dir)


def test_run_config_overrides_are_checked(tmp_path, capsys):
    import pathlib

    config = pathlib.Path(__file__).resolve().parents[1] / "experiments" / "mnist1d" / "config.py"
    assert (
        main(["run", "--config", str(config), "--quick", "--set", "no_such_field=1", "--dir", str(tmp_path / "s")]) == 2
    )
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unknown field 'no_such_field'" in err
    assert main(["run", "--config", str(tmp_path / "missing.py")]) == 2
    assert "no config file" in capsys.readouterr().err
