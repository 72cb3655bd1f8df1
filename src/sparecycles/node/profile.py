"""Profile this device: what the performance model needs to know, measured where it can be.

Cores and memory are read from the operating system; a CUDA GPU is found through torch when torch
and a GPU are present. Memory bandwidth and peak FLOP/s are *measured*, because decode speed
follows the bandwidth a program actually gets, not the datasheet's:

- bandwidth: copy a buffer much larger than the caches, best of a few tries, counting the bytes
  read plus the bytes written (as STREAM's "copy" does);
- FLOP/s: a square matrix multiply in the precision inference uses (fp32 on a CPU, fp16 on a GPU),
  best of a few tries;
- on a CPU, the FLOP/s of linear layers at the shapes inference gives them: weights streamed from
  memory (a stack larger than the caches) times an input of 1, 2, 4 ... 256 rows. One row is a
  matrix-vector product, which streams the weights at the rate decode at batch 1 gets; a few rows
  is what batched decode does, and BLAS libraries handle them far below the square matmul's rate
  (on the 2-vCPU VM of docs/benchmarks.md, 8 rows cost 1.5x one row, not the same);
- the inference engine's own cost per forward pass outside the maths (node/overhead.py);
- where the node runs llama.cpp (``llamacpp_types``: the tensor types of the GGUF files it
  serves), llama.cpp itself: the rate its kernels read each of those types in a decode step by
  rows, and its engine's own cost per pass (node/llamacpp_profile.py). A node without torch
  measures this, the copy bandwidth and numpy's matmul, nothing else.

Together they take a few seconds, so the result is cached as JSON and a node does not measure
again on every start unless asked to (or unless its hardware changed).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import numpy as np

from sparecycles.node.overhead import NO_OVERHEAD, measure_engine_overhead
from sparecycles.types import DeviceProfile

log = logging.getLogger(__name__)

# bump when what is measured changes, so cached profiles are redone (4: llama.cpp's narrow probe;
# 5: a 64-token prompt pass on its probes)
PROFILE_VERSION = 5
copy_bytes = 256 * 1024 * 1024  # far beyond any last-level cache (tens to hundreds of MiB)
copy_tries = 5
matmul_tries = 3
cpu_matmul_n = 2048  # 2 * 2048^3 = 17 GFLOP: ~20-200 ms on a laptop's cores
gpu_matmul_n = 8192  # 1.1 TFLOP: a few ms on a data-centre GPU, long enough to time
# Rows of input at which a CPU's linear layers are timed: decode batches, then prompt-sized
# passes; the square matmul above adds the last point (cpu_matmul_n rows).
matmul_rows = (1, 2, 4, 8, 16, 32, 64, 256)
matmul_stack_bytes = 256 * 1024 * 1024  # the weights those stream: far beyond any cache
measure_budget_s = 4.0  # stop repeating the measurements once this much time has gone
llamacpp_budget_s = 8.0  # ... and llama.cpp's, once its probe models are written

# Reference power figures per class, from the presets' datasheets (scheduling/presets.py); a node
# has no
# portable way to read its own power draw, so energy is estimated from these.
_POWER_BY_CLASS_W = {
    "gaming-pc": (60.0, 250.0),
    "laptop": (5.0, 45.0),
    "car": (15.0, 60.0),
    "server": (150.0, 500.0),
    "datacenter-gpu": (100.0, 800.0),
    "desktop": (40.0, 150.0),
}


def _best_of(fn: Callable[[], float], tries: int, deadline: float) -> float:
    """The shortest of ``tries`` timings of ``fn`` (each returning seconds), stopping early once
    ``deadline`` (a perf_counter value) has passed; at least one try always runs."""
    best = float("inf")
    for _ in range(tries):
        best = min(best, fn())
        if time.perf_counter() > deadline:
            break
    return best


def _timed(fn: Callable[[], Any], sync: Callable[[], None] = lambda: None) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


# --- CPU -------------------------------------------------------------------------------------


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return 0


def measure_cpu_bandwidth(budget_s: float, nbytes: int = copy_bytes) -> float:
    """Bytes/s of a large memory copy (read + write): the better of numpy's copy and torch's
    multithreaded one (when torch is present; which wins depends on the machine and on what
    else runs). A first copy touches every page, untimed; then the best of a few, each library
    within half of ``budget_s``."""
    src_np = np.ones(nbytes // 8, dtype=np.float64)
    dst_np = np.empty_like(src_np)
    copies: list[Callable[[], Any]] = [lambda: np.copyto(dst_np, src_np)]
    try:
        import torch

        src = torch.from_numpy(src_np)
        dst = torch.empty_like(src)
        copies.append(lambda: dst.copy_(src))
    except ImportError:
        pass
    best_s = float("inf")
    for copy in copies:
        copy()
        deadline = time.perf_counter() + budget_s / len(copies)
        best_s = min(best_s, _best_of(functools.partial(_timed, copy), copy_tries, deadline))
    return 2.0 * nbytes / best_s


def measure_cpu_flops(budget_s: float, n: int = cpu_matmul_n) -> float:
    """FLOP/s of an fp32 n x n matrix multiply (2 n^3 FLOPs) on all cores, through torch (the
    library the engine computes with) if present, else numpy's BLAS; best of a few."""
    a: Any  # a torch tensor, or without torch a numpy array
    b: Any
    try:
        import torch

        a = torch.randn(n, n, dtype=torch.float32)
        b = torch.randn(n, n, dtype=torch.float32)
    except ImportError:
        a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
        b = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    a @ b  # warm up the BLAS threads
    seconds = _best_of(lambda: _timed(lambda: a @ b), matmul_tries, time.perf_counter() + budget_s)
    return 2.0 * n**3 / seconds


def measure_cpu_matmul_rows(
    budget_s: float,
    rows: tuple[int, ...] = matmul_rows,
    n: int = cpu_matmul_n,
    stack_bytes: int = matmul_stack_bytes,
) -> tuple[tuple[int, float], ...]:
    """((rows, FLOP/s), ...) of fp32 linear layers (n x n weights, as many as fill
    ``stack_bytes``, each used once in turn so that every call streams its weights from memory)
    applied to an input of ``rows`` rows, through torch; best of a few per row count, the budget
    shared among them. Empty without torch."""
    try:
        import torch
    except ImportError:
        return ()
    count = max(2, stack_bytes // (n * n * 4))
    weights = [torch.randn(n, n, dtype=torch.float32) for _ in range(count)]
    linear = torch.nn.functional.linear

    def run(x: Any) -> None:
        for w in weights:
            linear(x, w)

    run(torch.randn(1, n))  # warm up the BLAS threads
    out = []
    for r in rows:
        x = torch.randn(r, n, dtype=torch.float32)
        deadline = time.perf_counter() + budget_s / len(rows)
        seconds = _best_of(functools.partial(_timed, functools.partial(run, x)), matmul_tries,
                           deadline)
        out.append((r, 2.0 * r * n * n * count / seconds))
    return tuple(out)


# --- CUDA ------------------------------------------------------------------------------------


def cuda_device() -> tuple[str, int] | None:
    """(name, memory bytes) of the first CUDA GPU, or None without torch or without a GPU."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return props.name, int(props.total_memory)


def measure_cuda(budget_s: float) -> tuple[float, float]:
    """(bytes/s of a device-to-device copy, FLOP/s of an fp16 matmul) on the first GPU, each
    timed for about half of ``budget_s`` after an untimed first run."""
    import torch

    sync = torch.cuda.synchronize
    src = torch.ones(copy_bytes * 4 // 2, dtype=torch.float16, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    dst.copy_(src)
    deadline = time.perf_counter() + budget_s / 2
    copy_s = _best_of(lambda: _timed(lambda: dst.copy_(src), sync), copy_tries, deadline)
    bandwidth = 2.0 * src.numel() * src.element_size() / copy_s
    src = dst = torch.empty(0, device="cuda")  # free the buffers before the matmul
    n = gpu_matmul_n
    a = torch.randn(n, n, dtype=torch.float16, device="cuda")
    b = torch.randn(n, n, dtype=torch.float16, device="cuda")
    a @ b
    deadline = time.perf_counter() + budget_s / 2
    mm_s = _best_of(lambda: _timed(lambda: a @ b, sync), matmul_tries + 2, deadline)
    return bandwidth, 2.0 * n**3 / mm_s


# --- class -----------------------------------------------------------------------------------


def _has_battery() -> bool:
    return any(Path("/sys/class/power_supply").glob("BAT*"))


def _is_tegra() -> bool:
    return Path("/etc/nv_tegra_release").exists()


def guess_device_class(cores: int, accelerator: str | None, *, battery: bool, tegra: bool) -> str:
    """A best guess from what the OS shows; the owner can always say otherwise."""
    name = (accelerator or "").upper()
    if tegra:
        return "car"  # an NVIDIA DRIVE/Jetson Orin board: the car computers this network targets
    if any(k in name for k in ("H100", "H200", "A100", "B200", "L40", "A10", "L4", "V100")):
        return "datacenter-gpu"
    if battery:
        return "laptop"
    if "GEFORCE" in name or "RTX" in name or "RADEON" in name:
        return "gaming-pc"
    if cores >= 32:
        return "server"
    return "desktop"


# --- the profile -----------------------------------------------------------------------------


def measure_profile(
    *,
    device: str = "auto",
    device_class: str | None = None,
    network_rtt_s: float = 0.0,
    budget_s: float = measure_budget_s,
    llamacpp_types: tuple[str, ...] | None = None,
    llamacpp_keep: Path | None = None,
) -> DeviceProfile:
    """Measure this device now. ``device``: "auto" (the GPU if there is one), "cpu" or "cuda".
    ``llamacpp_types``: measure llama.cpp too, for these tensor types (its probe models
    written in a temporary folder, or kept in ``llamacpp_keep`` for the next time)."""
    share_s = budget_s / 4  # each measurement gets its own share of the budget
    cores, ram = cpu_cores(), ram_bytes()
    rows: tuple[tuple[int, float], ...] = ()
    bytes_per_param = 0.0
    gpu = cuda_device() if device in ("auto", "cuda") else None
    if device == "cuda" and gpu is None:
        raise ValueError("--device cuda asked for, but torch sees no CUDA GPU")
    # llama.cpp first: torch's OpenMP threads, once used, spin on the cores a while after each
    # operation and made llama.cpp's micro steps measure 10-40x slower (0.46 ms a layer, not 0.01)
    reads: tuple[tuple[str, int, float], ...] = ()
    llamacpp_overhead: tuple[float, ...] = ()
    narrow: tuple[tuple[str, int, float], ...] = ()
    narrow_hidden = wide_hidden = 0
    if llamacpp_types is not None and gpu is None:
        from sparecycles.node import llamacpp_profile

        if llamacpp_profile.available():
            reads, llamacpp_overhead, narrow = llamacpp_profile.measure_llamacpp(
                llamacpp_budget_s, llamacpp_types, keep=llamacpp_keep)
            narrow_hidden = llamacpp_profile.narrow_shape.hidden
            wide_hidden = llamacpp_profile.probe_shape.hidden
    if gpu is not None:
        # GPUs keep the idealised roofline for now: their linear layers and the engine's launch
        # costs are not measured yet (docs/benchmarks.md)
        bandwidth, flops = measure_cuda(budget_s)
        accelerator, accel_bytes = f"cuda:{gpu[0]}", gpu[1]
        overhead = NO_OVERHEAD
    else:
        bandwidth = measure_cpu_bandwidth(share_s)
        flops = measure_cpu_flops(share_s)
        rows = measure_cpu_matmul_rows(share_s)
        if rows:  # the square matmul is the last point: prompt-sized passes
            rows, bytes_per_param = (*rows, (cpu_matmul_n, flops)), 4.0
        overhead = measure_engine_overhead(share_s, "cpu")
        accelerator, accel_bytes = None, 0
    cls = device_class or guess_device_class(
        cores, accelerator, battery=_has_battery(), tegra=_is_tegra()
    )
    idle_w, busy_w = _POWER_BY_CLASS_W.get(cls, (0.0, 0.0))
    return DeviceProfile(
        device_class=cls,
        cpu_cores=cores,
        ram_bytes=ram,
        memory_bandwidth_bytes_per_s=bandwidth,
        peak_flops=flops,
        accelerator=accelerator,
        accelerator_memory_bytes=accel_bytes,
        network_rtt_s=network_rtt_s,
        power_idle_w=idle_w,
        power_busy_w=busy_w,
        matmul_flops_by_rows=rows,
        matmul_bytes_per_param=bytes_per_param,
        overhead_step_s=overhead[0],
        overhead_layer_s=overhead[1],
        overhead_sequence_s=overhead[2],
        overhead_sequence_layer_s=overhead[3],
        overhead_context_layer_s=overhead[4],
        llamacpp_read_by_rows=reads,
        llamacpp_overhead=llamacpp_overhead,
        llamacpp_narrow_read_by_rows=narrow,
        llamacpp_narrow_hidden=narrow_hidden,
        llamacpp_wide_hidden=wide_hidden,
    )


def _fingerprint(device: str, llamacpp_types: tuple[str, ...] | None = None) -> dict[str, Any]:
    """What, if changed, makes a cached profile stale: the hardware and what it is measured on
    (llama.cpp's weight types among it)."""
    gpu = cuda_device() if device in ("auto", "cuda") else None
    return {
        "llamacpp_types": sorted(llamacpp_types) if llamacpp_types is not None else None,
        "version": PROFILE_VERSION,
        "machine": platform.machine(),
        "cpu_cores": cpu_cores(),
        "ram_bytes": ram_bytes(),
        "accelerator": gpu[0] if gpu else None,
    }


def load_cached(cache_path: Path, fingerprint: dict[str, Any]) -> DeviceProfile | None:
    """The cached profile if it exists, parses and was taken on this same hardware."""
    try:
        data = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint:
        return None
    known = {f.name for f in fields(DeviceProfile)}
    try:
        return DeviceProfile(**{k: v for k, v in data.get("profile", {}).items() if k in known})
    except TypeError:
        return None


def save_cached(cache_path: Path, profile: DeviceProfile, fingerprint: dict[str, Any]) -> None:
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "profile": asdict(profile)}, indent=2))
    tmp.replace(cache_path)


def in_a_process_of_its_own(fn: Callable[..., Any], /, **kwargs: Any) -> Any:
    """``fn(**kwargs)`` run in a new Python process (forked where the system can, else
    spawned), its result returned.

    The profile is measured apart from the process that then serves: torch's matrix products and
    llama.cpp both run on libgomp (OpenMP), and once torch had started its threads in a node's
    process, their count beside llama.cpp's exceeded the cores; libgomp then stops spinning at
    its barriers, and llama.cpp decoded SmolLM2 at 48-79 tokens/s instead of 110-122 for the
    life of that process (docs/benchmarks.md, "OpenMP"). A node measures on its first start (or
    with ``--reprofile``), so every such start was slowed."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(method)) as pool:
        return pool.submit(fn, **kwargs).result()


def measure_apart(*, preload: bool = False, **kwargs: Any) -> DeviceProfile:
    """``measure_profile(**kwargs)`` in a process of its own (``in_a_process_of_its_own``);
    in this one where no process can be started. ``preload``: this process runs PyTorch anyway
    (a model on the transformers backend): import it first, so that a forked child does not
    import it again (a node's first start was seconds longer so, the test suite 12 -> 21
    minutes). Not otherwise: importing torch first gives llama.cpp torch's copy of libgomp,
    on which SmolLM2 decoded 87-101 tok/s against 106-126 on the system's."""
    if preload:
        for name in ("torch", "transformers", "sparecycles.node.backends.transformers"):
            try:
                __import__(name)
            except ImportError:
                break
    try:
        profile: DeviceProfile = in_a_process_of_its_own(measure_profile, **kwargs)
    except (OSError, RuntimeError) as exc:  # no process to be had (BrokenProcessPool is one)
        log.warning("measuring this device in this process (%s): llama.cpp may run slower "
                    "until the node restarts", exc)
        return measure_profile(**kwargs)
    return profile


def profile_device(
    cache_path: Path | None = None,
    *,
    refresh: bool = False,
    device_class: str | None = None,
    device: str = "auto",
    network_rtt_s: float = 0.0,
    llamacpp_types: tuple[str, ...] | None = None,
    uses_torch: bool = False,
) -> DeviceProfile:
    """This device's profile: from ``cache_path`` when it holds one taken on this hardware (and
    ``refresh`` is false), else measured now (in a process of its own: ``measure_apart``) and
    written there. ``llamacpp_types``: the node runs llama.cpp on GGUF files with these tensor
    types (``llamacpp_profile.gguf_types``); ``uses_torch``: it serves a model on PyTorch."""
    fingerprint = _fingerprint(device, llamacpp_types)
    if cache_path is not None and not refresh:
        cached = load_cached(cache_path, fingerprint)
        if cached is not None and (device_class is None or cached.device_class == device_class):
            return cached
    log.info("measuring this device (a few seconds)")
    profile = measure_apart(device=device, device_class=device_class, network_rtt_s=network_rtt_s,
                            llamacpp_types=llamacpp_types, preload=uses_torch)
    if cache_path is not None:
        save_cached(cache_path, profile, fingerprint)
    return profile
