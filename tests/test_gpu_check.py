"""experiments/gpu_check.py on a test double of NVML: both NVML paths agree over the same windows."""

import importlib.util
import pathlib

import pytest
from fake_nvml import FakeDevice, make_fake_nvml

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "experiments" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_check_counter_and_power_agree_on_a_steady_device(tmp_path):
    gpu_check = _load()
    fake = make_fake_nvml([FakeDevice(power_mw=250_000, clock_driven=True)])
    out = gpu_check.main(
        [
            "--windows",
            "2",
            "--window-seconds",
            "0.3",
            "--idle-seconds",
            "0.2",
            "--trials",
            "2",
            "--width",
            "2",
            "--model",
            '{"name": "mlp", "hidden": [16]}',
            "--digits-model",
            '{"name": "mlp", "hidden": [8]}',
            "--json",
            str(tmp_path / "g.json"),
        ],
        nvml=fake,
        gpus="all",
    )
    assert out["methods"]["nvml-counter"]["method"] == "nvml-counter"
    assert out["methods"]["nvml-power"]["method"] == "nvml-power"
    assert out["idle"]["nvml-counter"] == pytest.approx(250.0, rel=0.05)
    for w in out["windows"]:
        assert w["counter_j"] == pytest.approx(250.0 * w["seconds"], rel=0.05)
        assert w["ratio_power_over_counter"] == pytest.approx(1.0, rel=0.05) and abs(w["agreement_percent"]) < 5
        assert sum(w["shares_j"]) == pytest.approx(w["counter_j"])
    for span in out["whole_span"].values():  # the windows and the host work between them make the span
        assert span["windows_j"] + span["between_j"] == pytest.approx(span["span_j"]) and span["between_j"] > 0
    assert (tmp_path / "g.json").exists()
    for name in ("digits-mlp", "resnet18-cifar"):
        w = out["workloads"][name]
        assert w["vmap_over_loop_speedup"] > 0 and w["vmap_samples_per_s"] > 0 and w["loop_seconds"] > 0
    # The quick digits study, planned then run on the same (double's) counter: every line measured.
    rows = {r["name"]: r for r in out["plan"]}
    assert {"compile", "explore", "between windows", "total"} <= set(rows)
    assert (
        rows["total"]["joules"] > 0
        and rows["total"]["plan"]["joules"]["hi"] >= rows["total"]["plan"]["joules"]["lo"] > 0
    )


def test_gpu_check_without_nvml_reports_unavailable():
    gpu_check = _load()
    fake = make_fake_nvml([FakeDevice()], init_error=RuntimeError("NVML Shared Library Not Found"))
    out = gpu_check.run(
        windows=1,
        window_seconds=0.05,
        idle_seconds=0.05,
        trials=2,
        width=2,
        model={"name": "mlp", "hidden": [8]},
        nvml=fake,
        gpus="all",
        workloads=False,
    )
    assert out["idle"] == {"nvml-counter": None, "nvml-power": None}
    assert out["windows"][0]["counter_j"] is None and out["windows"][0]["shares_j"] == [None, None]
