"""Profiling this device: the class guess, and the cache that spares re-measuring."""

from __future__ import annotations

import os
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

    monkeypatch.setattr(prof, "measure_apart", fake_measure)
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


def _clock(monkeypatch: pytest.MonkeyPatch, *seconds: float) -> list[int]:
    """Replace the profiler's timer: each timed call still runs, and takes ``seconds`` in turn
    (round and round). Unit tests assert what is computed from timings, never a speed: how fast
    this machine is belongs in ``bench/profile_device.py``. Returns the count of timed calls."""
    calls = [0]

    def timed(fn, sync=lambda: None) -> float:  # type: ignore[no-untyped-def]
        fn()
        calls[0] += 1
        return seconds[(calls[0] - 1) % len(seconds)]

    monkeypatch.setattr(prof, "_timed", timed)
    return calls


def test_bandwidth_and_flops_are_computed_from_the_best_try(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A busy machine slows some tries: the best of them counts."""
    _clock(monkeypatch, 0.9, 0.2, 0.5)
    nbytes = 1 << 20
    # a copy reads and writes every byte: 2 * nbytes per try, best 0.2 s (numpy's and torch's)
    assert prof.measure_cpu_bandwidth(60.0, nbytes=nbytes) == pytest.approx(2 * nbytes / 0.2)
    calls = _clock(monkeypatch, 0.9, 0.25, 0.5)
    assert prof.measure_cpu_flops(60.0, n=64) == pytest.approx(2 * 64**3 / 0.25)
    assert calls[0] == prof.matmul_tries
    assert prof.cpu_cores() >= 1 and prof.ram_bytes() > 0


def test_linear_layers_by_rows_are_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    """One (rows, FLOP/s) per row count, in order: the FLOPs of every layer of the stack (as
    many n x n layers as fill ``stack_bytes``, at least 2) over the best of the tries."""
    _clock(monkeypatch, 0.5, 0.125, 0.25)
    n, stack_bytes = 128, 1 << 20
    layers = stack_bytes // (n * n * 4)  # 16
    rows = prof.measure_cpu_matmul_rows(60.0, rows=(1, 8), n=n, stack_bytes=stack_bytes)
    assert [r for r, _ in rows] == [1, 8]
    for r, flops in rows:
        assert flops == pytest.approx(2.0 * r * n * n * layers / 0.125)
    few = prof.measure_cpu_matmul_rows(60.0, rows=(2,), n=n, stack_bytes=1)  # stack of 2
    assert few[0][1] == pytest.approx(2.0 * 2 * n * n * 2 / 0.125)


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
    """Five terms, none negative, from real passes of the engine (how large they are on this
    machine is a measurement: bench/profile_device.py)."""
    terms = overhead.measure_engine_overhead(0.1)
    assert len(terms) == 5 and min(terms) >= 0.0


def _pid() -> int:
    return os.getpid()


def test_the_profile_is_measured_in_a_process_of_its_own() -> None:
    """torch's OpenMP threads, once started in a node's process, slowed its llama.cpp engine
    for the life of the process (docs/benchmarks.md, "OpenMP"): measuring runs elsewhere."""
    assert prof.in_a_process_of_its_own(_pid) != os.getpid()


def test_where_no_process_can_be_started_the_profile_is_measured_here(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(fn: object, /, **kw: object) -> None:
        raise OSError("no more processes")

    here = DeviceProfile("desktop", 2, 1 << 30, 1e10, 1e11)
    monkeypatch.setattr(prof, "in_a_process_of_its_own", refuse)
    monkeypatch.setattr(prof, "measure_profile", lambda **kw: here)
    assert prof.measure_apart(device="cpu") is here
