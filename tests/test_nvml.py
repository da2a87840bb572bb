"""GPU energy on a mixed node, against the NVML test double: the right card, a method per card,
errors survived, honest net energy and stated uncertainty."""

import time

import pytest
from fake_nvml import FakeDevice, jax_gpu, make_card, make_fake_nvml

from sm2jax.energy import EnergyLedger, EnergyMonitor, IdleBaseline, Metering, make_meter
from sm2jax.energy.gpus import jax_gpus
from sm2jax.energy.nvml import make_nvml_meter


def _node():
    """An A100 and an H100 with energy counters, a P100 without one, all stepping every 100 ms."""
    return [
        make_card(0, name="NVIDIA A100-SXM4-40GB", power_mw=90_000),
        make_card(1, name="NVIDIA H100 80GB HBM3", power_mw=73_000),
        make_card(2, name="Tesla P100-PCIE-16GB", power_mw=40_000, counter_supported=False),
    ]


def _measure(meter, seconds):
    monitor = EnergyMonitor(meter)
    window = monitor.begin("w")
    time.sleep(seconds)
    return monitor.end(window)


def test_each_card_is_metered_by_its_own_method_and_nvml_is_shut_down():
    cards = _node()
    nvml = make_fake_nvml(cards)
    meter = make_meter("auto", nvml=nvml, gpus="all", backend="gpu", interval_s=0.02)
    try:
        assert meter.method == "nvml-mixed"
        assert [d["method"] for d in meter.devices] == ["nvml-counter", "nvml-counter", "nvml-power"]
        assert "not supported on " + cards[2].pci_bus_id in meter.reason
        reading = _measure(meter, 1.2)
    finally:
        meter.close()
    assert reading.valid
    # The H100 by its counter (steps of 100 ms), the P100 by polled power: each near its true power.
    for card in cards:
        assert reading.per_device[card.pci_bus_id] == pytest.approx(card.power_mw / 1e3 * reading.seconds, rel=0.15)
    assert nvml.calls.count("init") == nvml.calls.count("shutdown") == 1


def test_a_transient_counter_error_is_retried_and_a_lasting_one_invalidates_only_its_windows():
    card = make_card(0, power_mw=100_000)
    meter = make_meter("nvml-counter", nvml=make_fake_nvml([card]), gpus="all", backend="gpu")
    monitor = EnergyMonitor(meter)
    try:
        card.counter_errors = 2  # fewer than the retries: nobody notices
        assert _measure(meter, 0.3).valid
        window = monitor.begin("w")
        card.counter_errors = -1  # the card stops answering: the window ends without a figure
        reading = monitor.end(window)
        assert not reading.valid and reading.joules is None and "counter read failed" in reading.note
        card.counter_errors = 0  # and comes back: later windows measure again
        assert _measure(meter, 0.3).valid
    finally:
        meter.close()


def test_the_power_poller_survives_nvml_errors_and_says_when_a_gap_is_too_long():
    card = FakeDevice(counter_supported=False, power_mw=200_000)
    meter = make_meter("auto", nvml=make_fake_nvml([card]), gpus="all", backend="gpu", interval_s=0.01)
    try:
        card.power_errors = 5  # a few failed polls, bridged by the trapezoid rule
        reading = _measure(meter, 0.5)
        assert reading.valid and meter._poller._thread.is_alive()
        assert reading.joules == pytest.approx(200.0 * reading.seconds, rel=0.02) and "failed" in reading.note
        monitor = EnergyMonitor(meter)
        window = monitor.begin("w")
        card.power_errors = -1  # no good reading for longer than the meter's resolution
        time.sleep(1.2)
        reading = monitor.end(window)
        assert not reading.valid and reading.joules is None and "no good power reading" in reading.note
        assert meter._poller._thread.is_alive()
    finally:
        meter.close()


def test_merged_windows_subtract_idle_power_over_their_whole_span(tmp_path):
    """Short busy windows with gaps between them, merged to the counter's 1 s resolution: their
    net energy is the span's gross minus idle power x the span, and their seconds add up to it."""
    card = make_card(0, power_mw=73_000)
    monitor = EnergyMonitor(make_meter("auto", nvml=make_fake_nvml([card]), gpus="all", backend="gpu"))
    ledger = EnergyLedger(tmp_path / "l.jsonl", idle=IdleBaseline(73.0, 2.0, "nvml-counter"))
    metering = Metering(monitor, ledger, attempt=1)
    t0 = time.perf_counter()
    for _ in range(10):
        with metering.window("rung-1", phase="rung-1", cohort="c", trial_ids=[0]):
            time.sleep(0.005)  # 5 ms of work, then 100 ms of gap
        time.sleep(0.1)
    metering.flush()
    span = time.perf_counter() - t0
    windows = [r for r in ledger.records() if r["type"] == "window"]
    gross, net, seconds = (sum(w[k] for w in windows) for k in ("joules", "net_joules", "seconds"))
    assert seconds == pytest.approx(span, rel=0.15)  # the windows' seconds cover the span, gaps included
    assert net == pytest.approx(gross - 73.0 * seconds)
    assert abs(net) < 0.15 * gross  # a card drawing its idle power: nothing above idle (up to a tick)
    assert all(w["busy_seconds"] < w["seconds"] for w in windows if w["merged_windows"] > 1)


def test_the_stated_uncertainty_bounds_the_counter_lag_at_both_ends():
    """Windows of about a second on a card that steps every 100 ms: the error against the true
    energy stays within the stated bound (one update at the card's power limit)."""
    card = make_card(0, power_mw=300_000)
    card.power_limit_mw = 400_000
    meter = make_meter("nvml-counter", nvml=make_fake_nvml([card]), gpus="all", backend="gpu")
    try:
        for seconds in (1.0, 1.05, 1.15):
            reading = _measure(meter, seconds)
            true = 300.0 * reading.seconds
            assert reading.uncertainty == pytest.approx(0.1 * 400.0 / reading.joules)
            assert abs(reading.joules - true) <= reading.uncertainty * reading.joules + 1e-6
    finally:
        meter.close()


def test_the_card_jax_uses_is_found_on_a_mixed_node(monkeypatch):
    cards = _node()
    nvml = make_fake_nvml(cards)

    def mapped(devices):
        meter = make_nvml_meter(nvml, gpus=jax_gpus(devices))
        try:
            return meter.method, [d["nvml"] for d in meter.devices or []], meter.reason
        finally:
            meter.close()

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    # CUDA numbers the H100 first (fastest first): ordinal 0 is found by its kind, not as NVML's 0.
    h100 = jax_gpu(0, kind="NVIDIA H100 80GB HBM3")
    assert mapped([h100])[1] == [cards[1].pci_bus_id]
    # Without a kind nothing can decide on a mixed node: unmetered, saying how to fix it.
    method, _, reason = mapped([jax_gpu(0)])
    assert method == "unavailable" and "CUDA_DEVICE_ORDER=PCI_BUS_ID" in reason
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")  # then an index is NVML's index
    assert mapped([jax_gpu(1)])[1] == [cards[1].pci_bus_id]
    # A bus id written with a 4-digit lower-case domain, and a UUID prefix (MIG: test_energy_round3.py).
    assert mapped([jax_gpu(0, bus="0000:" + cards[2].pci_bus_id[9:].lower())])[1] == [cards[2].pci_bus_id]
    cards[0].uuid = "GPU-8932f937-aaaa-bbbb"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8932f937")
    assert mapped([jax_gpu(0)])[1] == [cards[0].pci_bus_id]


def test_a_card_shared_with_another_tenant_says_so():
    card = make_card(0, processes=[123456])
    meter = make_meter("auto", nvml=make_fake_nvml([card]), gpus="all", backend="gpu")
    try:
        assert meter.devices[0]["other_pids"] == [123456] and "its energy includes theirs" in meter.reason
    finally:
        meter.close()


def test_the_report_prints_the_meters_note_and_each_cards_method():
    from sm2jax.report import format_results

    results = {
        "study": "s",
        "mode": "sm2",
        "energy_method": "nvml-mixed",
        "energy_note": "energy counter not supported on 00000000:19:00.0: power polled every 0.1 s",
        "metered_devices": [
            {"nvml": "00000000:17:00.0", "method": "nvml-counter", "by": "PCI bus id reported by JAX"},
            {"nvml": "00000000:19:00.0", "method": "nvml-power", "by": "PCI bus id reported by JAX"},
        ],
    }
    text = format_results(results)
    assert "energy note: energy counter not supported on 00000000:19:00.0" in text
    assert "metered 00000000:19:00.0: nvml-power (PCI bus id reported by JAX)" in text
