"""The node's energy meter: the estimate from the device profile, RAPL through a fake powercap
tree (including a wrapped counter and files only root may read), NVML through a fake module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparecycles.node.energy import EnergyMeter, EnergyReading
from sparecycles.scheduling.presets import DEVICE_PRESETS
from sparecycles.types import DeviceProfile

CPU = DEVICE_PRESETS["laptop-cpu"]  # 5 W idle, 45 W busy
GPU = DEVICE_PRESETS["gaming-pc"]  # cuda:NVIDIA GeForce RTX 3060, 250 W busy


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_estimate_without_counters(tmp_path: Path):
    clock = Clock()
    meter = EnergyMeter.detect(CPU, powercap_root=tmp_path / "none", clock=clock)
    assert meter.source == "estimated"
    r0 = meter.read()
    clock.t += 10.0
    r1 = meter.read()
    assert r0.counters_j is None
    assert meter.joules_between(r0, r1, busy_s=4.0) == (4.0 * 45.0, "estimated")
    assert meter.joules_between(r0, r1, busy_s=-1.0) == (0.0, "estimated")


def _domain(root: Path, name: str, label: str, uj: int, wrap: int | None = 2**32) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "name").write_text(label + "\n")
    (d / "energy_uj").write_text(f"{uj}\n")
    if wrap is not None:
        (d / "max_energy_range_uj").write_text(f"{wrap}\n")
    return d


def test_rapl_packages_summed_and_a_wrapped_counter_corrected(tmp_path: Path):
    clock = Clock()
    p0 = _domain(tmp_path, "intel-rapl:0", "package-0", 1_000_000_000, wrap=2_000_000_000)
    p1 = _domain(tmp_path, "intel-rapl:1", "package-1", 5_000_000)
    _domain(tmp_path, "intel-rapl:0:0", "core", 7)  # a subdomain of package 0: not counted twice
    meter = EnergyMeter.detect(CPU, powercap_root=tmp_path, clock=clock)
    assert meter.source == "rapl"
    r0 = meter.read()
    assert r0.counters_j == (1000.0, 5.0)
    (p0 / "energy_uj").write_text("100000000\n")  # wrapped: 1,000 J -> 2,000 J (max) -> 100 J
    (p1 / "energy_uj").write_text("25000000\n")  # 5 J -> 25 J
    clock.t += 20.0
    r1 = meter.read()
    # the span drew 1,100 + 20 = 1,120 J; busy 5 of its 20 s: a quarter of it is this job's
    joules, source = meter.joules_between(r0, r1, busy_s=5.0)
    assert (round(joules, 6), source) == (280.0, "rapl")
    assert meter.joules_between(r0, r1, busy_s=50.0)[0] == pytest.approx(1120.0)


def test_rapl_psys_is_used_alone(tmp_path: Path):
    _domain(tmp_path, "intel-rapl:0", "package-0", 1)
    psys = _domain(tmp_path, "intel-rapl:1", "psys", 2_000_000)
    clock = Clock()
    meter = EnergyMeter.detect(CPU, powercap_root=tmp_path, clock=clock)
    r0 = meter.read()
    (psys / "energy_uj").write_text("12000000\n")
    clock.t += 1.0
    assert meter.joules_between(r0, meter.read(), 1.0) == (pytest.approx(10.0), "rapl")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_rapl_readable_by_root_only_means_estimate(tmp_path: Path):
    d = _domain(tmp_path, "intel-rapl:0", "package-0", 1)
    (d / "energy_uj").chmod(0o000)
    assert EnergyMeter.detect(CPU, powercap_root=tmp_path).source == "estimated"


def test_unreadable_or_implausible_counters_fall_back_to_the_estimate(tmp_path: Path):
    d = _domain(tmp_path, "intel-rapl:0", "package-0", 1_000_000)
    clock = Clock()
    meter = EnergyMeter.detect(CPU, powercap_root=tmp_path, clock=clock)
    r0 = meter.read()
    (d / "energy_uj").write_text("garbage\n")
    clock.t += 2.0
    r1 = meter.read()
    assert r1.counters_j is None
    assert meter.joules_between(r0, r1, 2.0) == (90.0, "estimated")
    huge = EnergyReading(clock.t, (1e9,))  # a billion joules in two seconds: not a real reading
    assert meter.joules_between(r0, huge, 2.0) == (90.0, "estimated")
    backwards = EnergyReading(clock.t, (0.5,))  # went back, and the domain has no wrap range
    d2 = tmp_path / "nowrap"
    _domain(d2, "intel-rapl:0", "package-0", 1_000_000, wrap=None)
    nowrap = EnergyMeter.detect(CPU, powercap_root=d2, clock=clock)
    assert nowrap.joules_between(nowrap.read(), backwards, 2.0)[1] == "estimated"


class FakeNvml:
    """The few pynvml calls the meter makes; energy in millijoules per GPU."""

    def __init__(self, n: int = 1, supported: bool = True):
        self.mj = [1_000_000] * n
        self.supported = supported

    def nvmlInit(self) -> None:  # pynvml's names
        pass

    def nvmlDeviceGetCount(self) -> int:
        return len(self.mj)

    def nvmlDeviceGetHandleByIndex(self, i: int) -> int:
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, h: int) -> int:
        if not self.supported:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return self.mj[h]


def test_nvml_on_a_gpu_node(tmp_path: Path):
    nvml, clock = FakeNvml(n=2), Clock()
    meter = EnergyMeter.detect(GPU, nvml=nvml, powercap_root=tmp_path, clock=clock)
    assert meter.source == "nvml"
    r0 = meter.read()
    nvml.mj = [1_000_000 + 300_000, 1_000_000 + 100_000]  # 300 J and 100 J
    clock.t += 4.0
    assert meter.joules_between(r0, meter.read(), busy_s=2.0) == (pytest.approx(200.0), "nvml")


def test_a_gpu_node_without_nvml_is_estimated_not_metered_by_its_cpu(tmp_path: Path):
    _domain(tmp_path, "intel-rapl:0", "package-0", 1)
    old_gpu = EnergyMeter.detect(GPU, nvml=FakeNvml(supported=False), powercap_root=tmp_path)
    assert old_gpu.source == "estimated"
    assert old_gpu.joules_between(old_gpu.read(), old_gpu.read(), 2.0)[0] == 500.0  # 2 s x 250 W
    cpu_only = DeviceProfile("desktop", 8, 1, 1.0, 1.0, power_busy_w=100.0)
    assert EnergyMeter.detect(cpu_only, powercap_root=tmp_path).source == "rapl"
