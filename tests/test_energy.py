"""Energy counters: RAPL through a fake powercap folder (wrap-around included), NVML through a stand-in module,
and "not measured" (with the reason, never a number) where neither exists."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from benchmarks.energy import EnergyReading, NvmlCounter, RaplCounter, find_counter, measure_energy


def make_zone(root: Path, name: str, energy_uj: int, max_range: int = 1_000_000) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "energy_uj").write_text(f"{energy_uj}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    return zone


def test_rapl_sums_package_zones_and_handles_wrap_around(tmp_path):
    package0 = make_zone(tmp_path, "intel-rapl:0", 999_000)  # 1,000 µJ from the wrap
    package1 = make_zone(tmp_path, "intel-rapl:1", 10)
    make_zone(tmp_path, "intel-rapl:0:0", 5)  # a sub-zone (core): part of package 0, never counted twice
    counter = RaplCounter(tmp_path)
    assert [p.parent.name for p, _ in counter.zones] == ["intel-rapl:0", "intel-rapl:1"]

    def work():
        (package0 / "energy_uj").write_text("2000\n")  # wrapped: 1,000 + 2,000 µJ
        (package1 / "energy_uj").write_text("500010\n")  # +500,000 µJ
        (tmp_path / "intel-rapl:0:0" / "energy_uj").write_text("900000\n")
        return "done"

    value, reading = measure_energy(work, samples=500, counter=counter)
    assert value == "done"
    assert reading.joules == pytest.approx((3_000 + 500_000) / 1e6)
    assert reading.joules_per_1000 == pytest.approx(reading.joules * 2)
    assert reading.source.startswith("RAPL") and reading.reason == ""
    assert "J / 1,000 samples" in reading.describe()


def test_find_counter_reads_a_fake_powercap_root(tmp_path):
    make_zone(tmp_path, "intel-rapl:0", 100)
    counter, reason = find_counter("cpu", powercap_root=tmp_path)
    assert isinstance(counter, RaplCounter) and reason == ""


def test_no_rapl_means_not_measured_with_the_reason(tmp_path):
    counter, reason = find_counter("cpu", powercap_root=tmp_path / "missing")
    assert counter is None and "no RAPL package zone" in reason
    reading = EnergyReading(None, 10, 0.1, "", reason)
    assert reading.joules_per_1000 is None and reading.describe().startswith("not measured: no RAPL")
    assert reading.to_dict()["joules"] is None


def test_unreadable_rapl_is_not_measured(tmp_path, monkeypatch):
    zone = make_zone(tmp_path, "intel-rapl:0", 100)
    real_read = Path.read_text

    def deny(self, *args, **kwargs):
        if self == zone / "energy_uj":
            raise PermissionError("denied")
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", deny)
    counter, reason = find_counter("cpu", powercap_root=tmp_path)
    assert counter is None and "not readable" in reason


class FakeNvml(types.SimpleNamespace):
    """Stands in for `pynvml`: a total-energy counter in millijoules that advances on each read."""

    def __init__(self, supported: bool = True):
        super().__init__(reads=[1_000, 1_000, 4_500], initialised=False, supported=supported)

    def nvmlInit(self):
        self.initialised = True

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("gpu", index)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        if not self.supported:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return self.reads.pop(0) if len(self.reads) > 1 else self.reads[0]


def test_nvml_counter_through_a_stand_in_module():
    module = FakeNvml()
    counter, reason = find_counter("cuda:1", nvml_module=module)
    assert isinstance(counter, NvmlCounter) and reason == "" and module.initialised
    assert counter.handle == ("gpu", 1) and counter.source == "NVML (GPU 1)"
    _, reading = measure_energy(lambda: None, samples=2000, counter=counter)
    assert reading.joules == pytest.approx(3.5)  # 4,500 - 1,000 mJ
    assert reading.joules_per_1000 == pytest.approx(1.75)


def test_nvml_without_an_energy_counter_is_not_measured():
    counter, reason = find_counter("cuda", nvml_module=FakeNvml(supported=False))
    assert counter is None and "NVML energy counter unavailable" in reason and "NOT_SUPPORTED" in reason


def test_measure_energy_without_a_counter_returns_the_result_and_no_number(monkeypatch, tmp_path):
    import benchmarks.energy as energy

    monkeypatch.setattr(energy, "POWERCAP_ROOT", tmp_path)  # a machine without RAPL, like this CPU
    value, reading = measure_energy(lambda: 42, samples=10, device="cpu")
    assert value == 42
    assert reading.joules is None and reading.joules_per_1000 is None and reading.seconds >= 0
    assert "no RAPL package zone" in reading.reason and reading.describe().startswith("not measured")


def test_bad_input():
    with pytest.raises(ValueError, match="samples must be at least 1"):
        measure_energy(lambda: None, samples=0)
    counter, reason = find_counter("mps")
    assert counter is None and "no energy counter is known" in reason
