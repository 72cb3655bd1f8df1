"""Energy per job: measured where the hardware tells, estimated where it does not; always labelled.

- **nvml**: an NVIDIA GPU node with ``pynvml`` importable reads each GPU's total energy counter
  (``nvmlDeviceGetTotalEnergyConsumption``, millijoules since the driver loaded; Volta and newer).
- **rapl**: a CPU node on Linux reads the RAPL package counters under ``/sys/class/powercap``
  (``intel-rapl:N/energy_uj``, microjoules, wrapping at ``max_energy_range_uj``; AMD CPUs expose
  the same files). The ``psys`` domain, where present, covers the whole platform and is used alone.
  Since 2020 these files are often readable by root only; then the meter estimates.
- **estimated**: the device profile's ``power_busy_w`` times the job's busy seconds.

A node is metered by what does its work: a GPU node without NVML is estimated, not metered by its
CPU's RAPL. The counters measure the whole device over a span, which concurrent jobs share, so a
job is given the span's energy times its share of the span (``busy_s / elapsed``), the same
attribution its busy seconds get. Use::

    meter = EnergyMeter.detect(profile)          # once, when the agent starts
    r0 = meter.read()                            # when a job starts
    ...
    joules, source = meter.joules_between(r0, meter.read(), busy_s)   # when it ends
"""

from __future__ import annotations

import functools
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sparecycles.protocol import EnergySource
from sparecycles.types import DeviceProfile

log = logging.getLogger("sparecycles.node.energy")
POWERCAP_ROOT = Path("/sys/class/powercap")
rapl_domains_max = 16  # packages on one machine; more means something odd is mounted there
power_plausible_w_max = 20_000.0  # a measured average above this is a bad reading: estimate
_top_domain = re.compile(r"^intel-rapl:[0-9]+$")


@dataclass(frozen=True, slots=True)
class EnergyReading:
    """A moment: the monotonic time and, when measuring, each counter in joules."""

    t_s: float
    counters_j: tuple[float, ...] | None = None


class EnergyMeter:
    """Reads energy counters (or nothing, when estimating). Cheap: a few file reads or NVML calls
    per reading; safe to call from the agent's event loop."""

    def __init__(self, profile: DeviceProfile, source: EnergySource = "estimated",
                 counters: Sequence[Callable[[], float]] = (),
                 ranges_j: Sequence[float | None] = (),
                 clock: Callable[[], float] = time.monotonic):
        self.profile, self.source, self.clock = profile, source, clock
        self._counters, self._ranges = tuple(counters), tuple(ranges_j)
        if source != "estimated" and not self._counters:
            self.source = "estimated"

    # ---- detection -------------------------------------------------------------------------------

    @classmethod
    def detect(cls, profile: DeviceProfile, *, powercap_root: Path = POWERCAP_ROOT,
               nvml: Any = None, clock: Callable[[], float] = time.monotonic) -> EnergyMeter:
        """The best meter this device allows: NVML on a CUDA node, RAPL on a CPU node, else the
        estimate. ``nvml`` (a pynvml-like module) and ``powercap_root`` are seams for tests."""
        if (profile.accelerator or "").startswith("cuda"):
            counters = _nvml_counters(nvml)
            if counters:
                return cls(profile, "nvml", counters, [None] * len(counters), clock)
            return cls(profile, "estimated", clock=clock)
        found = _rapl_counters(powercap_root)
        if found:
            return cls(profile, "rapl", [c for c, _ in found], [r for _, r in found], clock)
        return cls(profile, "estimated", clock=clock)

    # ---- reading ---------------------------------------------------------------------------------

    def read(self) -> EnergyReading:
        now = self.clock()
        if self.source == "estimated":
            return EnergyReading(now)
        try:
            return EnergyReading(now, tuple(float(c()) for c in self._counters))
        except Exception as exc:  # a counter that fails once: estimate this job
            log.debug("energy counter unreadable (%s); estimating", exc)
            return EnergyReading(now)

    def estimate_j(self, busy_s: float) -> float:
        return max(0.0, busy_s) * max(0.0, self.profile.power_busy_w)

    def joules_between(self, r0: EnergyReading, r1: EnergyReading, busy_s: float
                       ) -> tuple[float, EnergySource]:
        """(joules, source) for work that kept the device busy ``busy_s`` seconds between two
        readings; ``source`` is ``rapl``, ``nvml`` or ``estimated``."""
        busy_s = max(0.0, busy_s)
        elapsed_s = r1.t_s - r0.t_s
        if (r0.counters_j is None or r1.counters_j is None or elapsed_s <= 0
                or len(r0.counters_j) != len(r1.counters_j)):
            return self.estimate_j(busy_s), "estimated"
        total = 0.0
        for c0, c1, wrap in zip(r0.counters_j, r1.counters_j, self._ranges, strict=False):
            delta = c1 - c0
            if delta < 0 and wrap:
                delta += wrap  # the counter wrapped once (RAPL: minutes at full load)
            if delta < 0:
                return self.estimate_j(busy_s), "estimated"
            total += delta
        if total / elapsed_s > power_plausible_w_max:
            return self.estimate_j(busy_s), "estimated"
        return total * min(1.0, busy_s / elapsed_s), self.source


# ---- the counters ------------------------------------------------------------------------------


def _read_uj(path: Path) -> float:
    return int(path.read_text().strip()) / 1e6


def _rapl_counters(root: Path) -> list[tuple[Callable[[], float], float | None]]:
    """Readable RAPL domains: ``psys`` alone if present, else every top-level package."""
    try:
        domains = sorted(d for d in root.iterdir() if _top_domain.match(d.name))
    except OSError:
        return []
    readable: list[tuple[str, Path, float | None]] = []
    for d in domains[:rapl_domains_max]:
        try:
            name = (d / "name").read_text().strip()
            _read_uj(d / "energy_uj")
        except (OSError, ValueError):
            continue  # not ours to read (root only), or not a counter
        try:
            wrap: float | None = _read_uj(d / "max_energy_range_uj")
        except (OSError, ValueError):
            wrap = None
        readable.append((name, d / "energy_uj", wrap))
    psys = [r for r in readable if r[0] == "psys"]
    chosen = psys[:1] if psys else [r for r in readable if r[0].startswith("package")]
    return [(functools.partial(_read_uj, path), wrap) for _, path, wrap in chosen]


def _nvml_counters(nvml: Any = None) -> list[Callable[[], float]]:
    """One energy counter per NVIDIA GPU (joules), or none without pynvml or its support."""
    if nvml is None:
        try:
            import pynvml as nvml  # type: ignore[no-redef]
        except ImportError:
            return []
    try:
        nvml.nvmlInit()
        handles = [nvml.nvmlDeviceGetHandleByIndex(i)
                   for i in range(int(nvml.nvmlDeviceGetCount()))]
        for h in handles:
            nvml.nvmlDeviceGetTotalEnergyConsumption(h)  # raises where unsupported (pre-Volta)
    except Exception as exc:  # any NVML error means: estimate
        log.info("NVML energy counters unavailable (%s); estimating energy", exc)
        return []

    def read_j(handle: Any) -> float:
        return float(nvml.nvmlDeviceGetTotalEnergyConsumption(handle)) / 1000.0

    return [functools.partial(read_j, h) for h in handles]
