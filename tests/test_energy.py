"""Energy meters against a test double of NVML and a fake powercap tree; attribution; the ledger."""

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import pytest
from fake_nvml import FakeDevice, make_card, make_fake_nvml

from sm2jax.energy import (
    EnergyLedger,
    EnergyMonitor,
    EstimateMeter,
    IdleBaseline,
    WindowReading,
    attribute,
    find_rapl_zones,
    hardware_profile,
    make_meter,
    measure_idle,
    read_ledger,
    summarize,
    trial_totals,
)
from sm2jax.energy.gpus import jax_gpus
from sm2jax.energy.ledger import scan_ledger
from sm2jax.energy.metering import Metering
from sm2jax.energy.meters import RaplMeter


def test_counter_path_sums_devices_in_joules():
    devices = [FakeDevice(energy_mj=1_000), FakeDevice(energy_mj=5_000)]
    monitor = EnergyMonitor(make_meter("auto", nvml=make_fake_nvml(devices), gpus="all"))
    assert monitor.method == "nvml-counter"
    window = monitor.begin("train")
    devices[0].energy_mj += 2_500  # 2.5 J
    devices[1].energy_mj += 1_500  # 1.5 J
    reading = monitor.end(window, jnp.ones(3))  # blocks on JAX outputs, then reads
    assert reading.valid and reading.method == "nvml-counter"
    assert reading.joules == pytest.approx(4.0)
    assert reading.per_device == pytest.approx({"gpu0": 2.5, "gpu1": 1.5})
    assert reading.note.startswith("short window")  # valid, but flagged as coarse


def test_counter_going_backwards_invalidates_the_window():
    devices = [FakeDevice(energy_mj=10_000)]
    monitor = EnergyMonitor(make_meter("nvml-counter", nvml=make_fake_nvml(devices), gpus="all"))
    window = monitor.begin("train")
    devices[0].energy_mj = 200  # driver reloaded: counter restarted
    reading = monitor.end(window)
    assert not reading.valid and reading.joules is None
    assert "backwards" in reading.note


def test_an_unchanged_counter_in_a_short_window_is_not_a_zero():
    monitor = EnergyMonitor(
        make_meter("nvml-counter", nvml=make_fake_nvml([FakeDevice(energy_mj=7)]), gpus="all"),
        counter_resolution_s=10.0,
    )
    reading = monitor.end(monitor.begin("tiny"))
    assert reading.joules is None and not reading.valid and "update period" in reading.note


def test_not_supported_counter_falls_back_to_power_polling():
    device = FakeDevice(counter_supported=False, power_mw=200_000)  # 200 W
    meter = make_meter("auto", nvml=make_fake_nvml([device]), interval_s=0.01, gpus="all")
    try:
        assert meter.method == "nvml-power" and "not supported" in meter.reason
        monitor = EnergyMonitor(meter)
        window = monitor.begin("train")
        time.sleep(0.2)
        reading = monitor.end(window)
    finally:
        meter.close()
    assert reading.valid and reading.method == "nvml-power"
    assert reading.joules == pytest.approx(200.0 * reading.seconds, rel=1e-6)  # constant power: exact trapezoid


def test_power_polling_integrates_a_step_change():
    """A card that reports its power averaged over the last second, as recent GPUs do: each
    reading is placed at the middle of its average, so the step is not smeared a second late."""
    device = FakeDevice(counter_supported=False, power_mw=100_000)
    device.average_s = 1.0
    meter = make_meter("nvml-power", nvml=make_fake_nvml([device]), interval_s=0.005, gpus="all")
    try:
        first = meter.sample()
        time.sleep(0.3)
        changed_at = time.perf_counter()
        device.power_mw = 300_000
        time.sleep(1.2)
        second = meter.sample()
    finally:
        meter.close()
    joules = second.joules["gpu0"] - first.joules["gpu0"]
    exact = 100 * (changed_at - first.time) + 300 * (second.time - changed_at)
    assert 100 * (second.time - first.time) < joules < 300 * (second.time - first.time)
    # The trapezoid misplaces the step by at most one polling gap (5 ms nominal; 50 ms allowed
    # for a loaded machine): 200 W x 0.05 s.
    assert joules == pytest.approx(exact, abs=10.0)


def test_missing_library_means_unavailable_not_an_exception(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    meter = make_meter("nvml-counter", gpus="all")
    assert meter.method == "unavailable" and "not installed" in meter.reason
    reading = EnergyMonitor(meter).end(EnergyMonitor(meter).begin("x"))
    assert reading.joules is None and reading.method == "unavailable"
    # auto falls through to what this machine can do instead
    assert make_meter("auto", rapl_root="/nonexistent").method == "estimated"


def test_nvml_init_failure_means_unavailable():
    fake = make_fake_nvml([FakeDevice()], init_error=RuntimeError("driver not loaded"))
    meter = make_meter("nvml-counter", nvml=fake, gpus="all")
    assert meter.method == "unavailable" and "driver not loaded" in meter.reason


def test_hardware_profile_reads_but_never_sets_limits():
    fake = make_fake_nvml([FakeDevice(name="NVIDIA H200", name_as_bytes=True)])
    profile = hardware_profile(nvml=fake)
    (gpu,) = profile["gpus"]
    assert gpu["name"] == "NVIDIA H200"  # bytes decoded
    assert gpu["power_limit_w"] == 700.0 and gpu["power_limit_range_w"] == [200.0, 700.0]
    assert gpu["memory_total_bytes"] == 141 * 2**30
    no_gpu = hardware_profile(nvml=make_fake_nvml([]))
    assert no_gpu["gpus"] == [] and "no GPU" in no_gpu["gpu_note"]


def _powercap(root, zones):
    for name, (energy, max_range, mode) in zones.items():
        d = root / name
        d.mkdir(parents=True)
        (d / "name").write_text("package-0\n" if "dram" not in name else "dram\n")
        (d / "energy_uj").write_text(f"{energy}\n")
        (d / "max_energy_range_uj").write_text(f"{max_range}\n")
        os.chmod(d / "energy_uj", mode)
    return root


def test_rapl_unwraps_at_max_energy_range(tmp_path):
    root = _powercap(tmp_path, {"intel-rapl:0": (900_000, 1_000_000, 0o644)})
    meter = make_meter("rapl", rapl_root=str(root))
    assert isinstance(meter, RaplMeter)
    monitor = EnergyMonitor(meter)
    window = monitor.begin("w")
    (root / "intel-rapl:0" / "energy_uj").write_text("950000\n")
    meter.sample()  # an intermediate read, as at every window boundary
    (root / "intel-rapl:0" / "energy_uj").write_text("100000\n")  # wrapped past 1_000_000
    reading = monitor.end(window)
    assert reading.valid and reading.method == "rapl"
    assert reading.joules == pytest.approx((1_000_000 - 900_000 + 100_000) / 1e6)


def test_rapl_permission_denied_is_unavailable(tmp_path, monkeypatch):
    root = _powercap(tmp_path, {"intel-rapl:0": (1, 10, 0o000)})
    real_open = open

    def deny(path, *args, **kwargs):  # the kernel's answer to a non-root reader since CVE-2020-8694
        if str(path).endswith("energy_uj"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    zones, reason = find_rapl_zones(str(root))
    assert zones == {} and "CVE-2020-8694" in reason
    meter = make_meter("rapl", rapl_root=str(root))
    assert meter.method == "unavailable"


def test_estimate_meter_is_labelled_estimated():
    cpu = iter([1.0, 3.5])
    meter = EstimateMeter(watts_per_core=8.0, cpu_time=lambda: next(cpu))
    monitor = EnergyMonitor(meter)
    reading = monitor.end(monitor.begin("w"))
    assert reading.method == "estimated" and reading.joules == pytest.approx(20.0)


@pytest.mark.slow
def test_idle_baseline_and_nested_windows():
    device = FakeDevice(energy_mj=0)
    monitor = EnergyMonitor(
        make_meter("nvml-counter", nvml=make_fake_nvml([device]), gpus="all"), counter_resolution_s=0.0
    )
    outer = monitor.begin("outer")
    inner = monitor.begin("inner")
    device.energy_mj += 1_000
    inner_reading = monitor.end(inner)
    device.energy_mj += 3_000
    window = monitor.begin("ctx")
    window.cover(jnp.zeros(2))
    device.energy_mj += 500
    reading = monitor.end(window)
    outer_reading = monitor.end(outer)
    assert inner_reading.joules == pytest.approx(1.0)
    assert reading.joules == pytest.approx(0.5)
    assert outer_reading.joules == pytest.approx(4.5)
    idle = measure_idle(monitor, seconds=0.05)
    assert idle.watts == 0.0 and idle.method == "nvml-counter"  # counter did not move while idle


def test_attribution_sums_to_the_total_and_skips_frozen_trials():
    total = 10.0 / 3.0
    shares, unattributed = attribute(total, [5.0, 5.0, 0.0, 5.0])  # trial 2 frozen: took no steps
    assert shares[2] == 0.0 and unattributed == 0.0
    assert sum(shares) == total
    assert shares[0] == pytest.approx(total / 3)
    uneven, _ = attribute(7.0, [1e9, 3e9])  # by FLOPs where shapes differ
    assert uneven == pytest.approx([1.75, 5.25]) and sum(uneven) == 7.0
    assert attribute(None, [1.0, 1.0]) == ([None, None], None)
    assert attribute(2.0, [0.0, 0.0]) == ([0.0, 0.0], 2.0)
    with pytest.raises(ValueError):
        attribute(1.0, [-1.0])


def test_ledger_records_gross_net_carbon_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "ledger.jsonl"
    idle = IdleBaseline(watts=50.0, seconds=3.0, method="nvml-counter")
    ledger = EnergyLedger(path, idle=idle)
    monitor = EnergyMonitor(
        make_meter("nvml-counter", nvml=make_fake_nvml([d := FakeDevice()]), gpus="all"), counter_resolution_s=0.0
    )
    window = monitor.begin("explore")
    d.energy_mj += 360_000  # 360 J
    reading = monitor.end(window)
    records = ledger.record(
        reading,
        phase="explore",
        cohort="c0",
        trial_ids=[4, 7, 9],
        work=[2.0, 1.0, 0.0],
        steps=[10, 5, 0],
        samples=[320, 160, 0],
    )
    window_rec, *trials = records
    assert window_rec["joules"] == pytest.approx(360.0) and window_rec["kwh"] == pytest.approx(1e-4)
    assert window_rec["gco2e"] == pytest.approx(0.0475) and "world-average default" in window_rec["intensity_label"]
    assert window_rec["net_joules"] == pytest.approx(360.0 - 50.0 * reading.seconds)
    assert [t["joules"] for t in trials] == pytest.approx([240.0, 120.0, 0.0])
    assert sum(t["net_joules"] for t in trials) == pytest.approx(window_rec["net_joules"])
    with open(path, "a") as f:
        f.write('{"type": "trial", "torn')  # a kill in the middle of a write
    again = ledger.records()
    assert len(again) == 4
    assert summarize(again)["explore"]["joules"] == pytest.approx(360.0)
    assert trial_totals(again) == pytest.approx({4: 240.0, 7: 120.0, 9: 0.0})
    unit = json.loads(path.read_text().splitlines()[0])  # a window and its shares: one line
    assert unit["method"] == "nvml-counter" and [t["trial_id"] for t in unit["trials"]] == [4, 7, 9]

    # The next run (a resume) repairs the torn tail before appending: nothing glued, nothing lost.
    resumed = EnergyLedger(path, idle=idle)
    assert resumed.open() == [] and resumed.repaired == len('{"type": "trial", "torn')
    assert (tmp_path / "ledger.jsonl.torn").read_text() == '{"type": "trial", "torn\n'
    resumed.record(reading, phase="rung-1", cohort="c0", trial_ids=[4], work=[1.0], steps=[1], samples=[32])
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and all(json.loads(line) for line in lines)
    assert summarize(resumed.records())["rung-1"]["joules"] == pytest.approx(360.0)


def test_unavailable_windows_stay_none_in_the_ledger(tmp_path):
    ledger = EnergyLedger(tmp_path / "l.jsonl", idle=IdleBaseline(None, 1.0, "unavailable"))
    meter = make_meter("rapl", rapl_root=str(tmp_path / "none"))
    monitor = EnergyMonitor(meter)
    records = ledger.record(
        monitor.end(monitor.begin("w")), phase="explore", cohort="c", trial_ids=[1], work=[1.0], steps=[1], samples=[8]
    )
    assert records[0]["joules"] is None and records[0]["method"] == "unavailable"
    assert records[1]["joules"] is None and records[1]["kwh"] is None
    assert summarize(records)["explore"]["joules"] is None


@pytest.mark.slow
def test_only_the_gpus_jax_uses_are_metered_found_by_pci_bus_id_or_uuid():
    cards = [make_card(i, power_mw=100_000 * (i + 1)) for i in range(4)]  # 100, 200, 300, 400 W
    nvml = make_fake_nvml(cards)
    for target in ({"pci_bus_id": cards[2].pci_bus_id}, {"uuid": cards[2].uuid}):
        meter = make_meter("auto", nvml=nvml, gpus=[target], backend="gpu")
        assert meter.method == "nvml-counter" and [d["nvml"] for d in meter.devices] == [cards[2].pci_bus_id]
        monitor = EnergyMonitor(meter)
        window = monitor.begin("w")
        time.sleep(1.05)
        reading = monitor.end(window)
        assert list(reading.per_device) == [cards[2].pci_bus_id]
        assert reading.joules == pytest.approx(300.0 * reading.seconds, rel=0.15)  # one 300 W card, not all four (1 kW)
    # A JAX on the CPU backend never charges its trials for the machine's GPUs.
    assert make_meter("auto", nvml=nvml, backend="cpu", rapl_root="/nonexistent").method == "estimated"
    assert jax_gpus() == [] or jax.default_backend() == "gpu"  # no GPU device in a CPU process


def test_an_accelerator_that_cannot_be_metered_is_unavailable_with_the_host_on_its_own_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # a GPU container without NVML
    for backend, gpus, words in (("tpu", None, "tpu"), ("gpu", [{"index": 0}], "not installed")):
        meter = make_meter("auto", backend=backend, gpus=gpus, rapl_root="/nonexistent")
        assert meter.method == "unavailable" and words in meter.reason
        monitor = EnergyMonitor(meter)
        window = monitor.begin("w")
        sum(i * i for i in range(200_000))  # host work
        reading = monitor.end(window)
        assert reading.joules is None and reading.host_method == "estimated" and reading.host_joules > 0
        records = EnergyLedger(tmp_path / f"{backend}.jsonl").record(
            reading, phase="explore", cohort="c", trial_ids=[0], work=[1.0], steps=[1], samples=[1]
        )
        group = summarize(records)["explore"]
        assert group["joules"] is None and group["host_joules"] > 0 and group["host_method"] == "estimated"


@pytest.mark.slow
def test_windows_shorter_than_the_counter_resolution_are_merged_never_none(tmp_path):
    """A 100 ms-tick counter read over 20 ms windows: merged until they span the meter's 1 s
    resolution, split by busy time, every window with a figure; flush waits out a short tail."""
    card = make_card(0, power_mw=200_000)
    monitor = EnergyMonitor(make_meter("auto", nvml=make_fake_nvml([card]), gpus="all", backend="gpu"))
    ledger = EnergyLedger(tmp_path / "l.jsonl")
    metering = Metering(monitor, ledger, attempt=1)
    assert metering.resolution_s == 1.0
    t0 = time.perf_counter()
    for i in range(60):
        with metering.window("rung-1", phase="rung-1", cohort=f"c{i % 2}", trial_ids=[i % 2]) as w:
            time.sleep(0.02)
            w.steps, w.batch_size = [1], 8
    metering.flush()
    elapsed = time.perf_counter() - t0
    windows = [r for r in ledger.records() if r["type"] == "window"]
    assert len(windows) == 60 and all(w["joules"] is not None and w["joules"] > 0 for w in windows)
    assert any(w["merged_windows"] > 1 and "merged" in w["note"] for w in windows)
    total = sum(w["joules"] for w in windows)
    assert total == pytest.approx(200.0 * elapsed, rel=0.15)  # the whole span, gaps included
    joules = metering.trial_joules("rung-1", [0, 1])
    assert joules[0] + joules[1] == pytest.approx(total) and joules[0] == pytest.approx(joules[1], rel=0.3)
    # A lone short window at a decision point: the flush waits the rest of the resolution.
    with metering.window("rung-2", phase="rung-2", cohort="c0", trial_ids=[0], kind="eval"):
        pass
    metering.flush()
    last = ledger.records()[-2]
    assert last["joules"] > 0 and "waited" in last["note"]
    # What holds: each end of a window may lag by one 100 ms update, at up to the card's 700 W limit.
    assert last["uncertainty"] == pytest.approx(0.1 * 700.0 / last["joules"])


def test_jax_gpus_are_identified_the_way_nvml_can_find_them(monkeypatch):
    """NVML numbering ignores CUDA_VISIBLE_DEVICES: a device is named by its PCI bus id when JAX
    reports one, else by the UUID or index CUDA_VISIBLE_DEVICES gives its ordinal."""
    import types

    def device(ordinal, bus=None, platform="gpu"):
        return types.SimpleNamespace(
            platform=platform,
            id=ordinal,
            local_hardware_id=ordinal,
            pci_bus_id=bus,
            __str__=lambda self: f"cuda:{ordinal}",
        )

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-aaaa,GPU-bbbb")
    assert jax_gpus([device(0, bus="00000000:3B:00.0")])[0]["pci_bus_id"] == "00000000:3B:00.0"
    assert jax_gpus([device(1)])[0]["uuid"] == "GPU-bbbb"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5,7")
    assert jax_gpus([device(1)])[0]["index"] == 7  # the 2nd visible device is NVML's index 7
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert jax_gpus([device(0)])[0]["index"] == 0
    assert jax_gpus([device(0, platform="cpu")]) == []
    second_process = types.SimpleNamespace(
        platform="gpu", id=9, local_hardware_id=0, pci_bus_id=None
    )  # global id 9, local ordinal 0
    assert jax_gpus([second_process])[0]["index"] == 0
    cards = [make_card(i) for i in range(8)]
    meter = make_meter(
        "auto", nvml=make_fake_nvml(cards), gpus=jax_gpus([device(0, bus=cards[5].pci_bus_id)]), backend="gpu"
    )
    assert [d["nvml"] for d in meter.devices] == [cards[5].pci_bus_id]


def _two_windows(path):
    ledger = EnergyLedger(path)
    reading = WindowReading("w", 0.0, 1.0, 6.0, None, "estimated", True)
    for phase in ("explore", "rung-1"):
        ledger.record(reading, phase=phase, cohort="c", trial_ids=[1, 2], work=[1.0, 2.0], steps=[1, 1], samples=[8, 8])
    return ledger


@pytest.mark.parametrize(
    "damage, reason",
    [(b"{garbage\n", "not a ledger record"), (b'{"type": "window", "x": "\xff"}\n', "UnicodeDecodeError")],
)
def test_a_damaged_line_is_moved_out_and_reported_never_dropped_silently(tmp_path, damage, reason):
    path = tmp_path / "ledger.jsonl"
    _two_windows(path)
    lines = path.read_bytes().split(b"\n")
    path.write_bytes(lines[0] + b"\n" + damage + lines[1] + b"\n")  # damage in the middle
    records, found = scan_ledger(path)
    assert len(records) == 6 and [d["line"] for d in found] == [2] and reason in found[0]["reason"]
    with pytest.warns(RuntimeWarning, match=r"ledger\.jsonl line 2: .*unknown joules.*moved to ledger\.jsonl\.damaged"):
        report = EnergyLedger(path).open()
    assert report == found and (tmp_path / "ledger.jsonl.damaged").read_bytes() == damage
    assert scan_ledger(path) == (records, [])  # repaired: the whole records stay, in order


def test_a_window_whose_shares_do_not_add_up_is_reported_with_its_joules(tmp_path):
    """An earlier version wrote a window's trial records on lines of their own: a full disk between
    them left a window whose shares do not add up. It is reported (and moved out) with its joules."""
    path = tmp_path / "ledger.jsonl"
    _two_windows(path)
    legacy = []
    for line in path.read_text().splitlines():
        unit = json.loads(line)
        trials = unit.pop("trials")
        legacy += [json.dumps(unit), *(json.dumps(t) for t in trials)]
    path.write_text("\n".join(legacy[:5]) + "\n")  # the last trial line never written
    records, found = scan_ledger(path)
    assert [d["line"] for d in found] == [4, 5] and found[0]["joules"] == pytest.approx(6.0)
    assert "add up to 2 J of 6 J" in found[0]["reason"]
    assert summarize(records) == summarize(read_ledger(path)) and set(summarize(records)) == {"explore"}


@pytest.mark.slow
def test_the_whole_span_is_its_windows_plus_the_time_between_them(tmp_path):
    """A 200 W card, windows with host work between them: the span from the attempt's first reading
    to its last is counted whole, the gaps on their own line (windows + between = span)."""
    from sm2jax.energy.ledger import whole_span

    card = make_card(0, power_mw=200_000)
    monitor = EnergyMonitor(make_meter("auto", nvml=make_fake_nvml([card]), gpus="all", backend="gpu"))
    ledger = EnergyLedger(tmp_path / "l.jsonl")
    metering = Metering(monitor, ledger, attempt=1)
    t0, gaps = time.perf_counter(), 0.0
    for _ in range(3):
        with metering.window("rung-1", phase="rung-1", cohort="c", trial_ids=[0]) as w:
            time.sleep(1.05)  # each window spans the meter's 1 s resolution: written on its own
            w.steps, w.batch_size = [1], 8
        g = time.perf_counter()
        time.sleep(0.6)  # host work between windows: no window covers it
        gaps += time.perf_counter() - g
    metering.flush()
    span = metering.close_span()
    elapsed = time.perf_counter() - t0
    windows = sum(r["joules"] for r in ledger.records() if r["type"] == "window")
    assert span["windows_joules"] == pytest.approx(windows)
    assert span["windows_joules"] + span["between_joules"] == pytest.approx(span["joules"])
    assert span["joules"] == pytest.approx(200.0 * elapsed, rel=0.1)
    assert span["between_joules"] == pytest.approx(200.0 * gaps, rel=0.35)  # each end within one 100 ms update
    assert metering.close_span() is None  # once per attempt
    study = whole_span(ledger.records(), attempts=1)
    assert study["joules"] == span["joules"] and study["kwh"] == pytest.approx(span["joules"] / 3.6e6)
    assert whole_span(ledger.records(), attempts=2)["missing"] == [2]  # a killed attempt: no figure
    assert whole_span(ledger.records(), attempts=2)["joules"] is None
    assert whole_span(ledger.records(), attempts=2, running=2)["missing"] == []  # a running one: not yet
