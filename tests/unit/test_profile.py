"""Profiling this device: the class guess, and the cache that spares re-measuring."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparecycles.node import overhead
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


def test_linear_layers_by_rows_are_measured() -> None:
    rows = prof.measure_cpu_matmul_rows(0.2, rows=(1, 8), n=128, stack_bytes=1 << 20)
    assert [r for r, _ in rows] == [1, 8]
    assert all(1e7 < flops < 1e15 for _, flops in rows)


def test_overhead_terms_are_recovered_from_step_times() -> None:
    terms = step, layer, seq, seq_layer, ctx_layer = 0.001, 0.0002, 0.0003, 0.00002, 1e-7
    new = overhead.overhead_new_tokens
    times = {
        (n, b, p): step + n * layer + b * (seq + n * (seq_layer + (p + new / 2) * ctx_layer))
        for n in overhead.overhead_layers
        for b in overhead.overhead_batches
        for p in overhead.overhead_prompts
    }
    assert overhead.fit_overhead(times) == pytest.approx(terms)
    # noise that would make a term negative leaves it at zero instead
    noisy = {**times, (2, 1, 16): times[8, 1, 16] + 0.01}
    assert min(overhead.fit_overhead(noisy)) >= 0.0


def test_engine_overhead_is_measured_on_the_real_engine() -> None:
    terms = overhead.measure_engine_overhead(0.1)
    assert min(terms) >= 0.0
    step, layer, seq, seq_layer, ctx_layer = terms
    per_pass_s = step + 8 * layer + seq + 8 * (seq_layer + 100 * ctx_layer)  # 8 layers, 1 seq
    assert 1e-5 < per_pass_s < 1.0
