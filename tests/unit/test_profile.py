"""Profiling this device: the class guess, and the cache that spares re-measuring."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparecycles.node import profile as prof
from sparecycles.types import DeviceProfile


def test_guess_device_class() -> None:
    guess = prof.guess_device_class
    assert guess(8, "cuda:NVIDIA H100 80GB HBM3", battery=False, tegra=False) == "datacenter-gpu"
    assert guess(8, "cuda:NVIDIA GeForce RTX 3060", battery=False, tegra=False) == "gaming-pc"
    assert guess(8, "cuda:NVIDIA GeForce RTX 4060 Laptop", battery=True, tegra=False) == "laptop"
    assert guess(12, "cuda:Orin", battery=False, tegra=True) == "car"
    assert guess(64, None, battery=False, tegra=False) == "server"
    assert guess(4, None, battery=False, tegra=False) == "desktop"


def test_measures_once_then_reads_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_measure(**kw: object) -> DeviceProfile:
        calls.append(kw)
        return DeviceProfile(str(kw.get("device_class") or "desktop"), 2, 1 << 30, 1e10, 1e11)

    monkeypatch.setattr(prof, "measure_profile", fake_measure)
    cache = tmp_path / "node" / "profile.json"
    first = prof.profile_device(cache, device="cpu")
    again = prof.profile_device(cache, device="cpu")
    assert first == again and len(calls) == 1
    prof.profile_device(cache, device="cpu", refresh=True)
    assert len(calls) == 2
    prof.profile_device(cache, device="cpu", device_class="laptop")  # another class: measure
    assert len(calls) == 3 and prof.profile_device(cache, device="cpu").device_class == "laptop"
    cache.write_text("{not json")
    prof.profile_device(cache, device="cpu")
    assert len(calls) == 4


def test_cache_from_other_hardware_is_ignored(tmp_path: Path) -> None:
    cache = tmp_path / "profile.json"
    fp = prof._fingerprint("cpu")
    profile = DeviceProfile("desktop", 2, 1 << 30, 1e10, 1e11)
    prof.save_cached(cache, profile, fp)
    assert prof.load_cached(cache, fp) == profile
    assert prof.load_cached(cache, {**fp, "cpu_cores": fp["cpu_cores"] + 1}) is None


def test_real_measurement_is_plausible() -> None:
    """A short real run: bandwidth and FLOP/s of this machine's CPU, within broad bounds."""
    bandwidth = prof.measure_cpu_bandwidth(0.2, nbytes=32 * 1024 * 1024)
    flops = prof.measure_cpu_flops(0.2, n=256)
    assert 1e8 < bandwidth < 1e13
    assert 1e8 < flops < 1e15
    assert prof.cpu_cores() >= 1 and prof.ram_bytes() > 0
