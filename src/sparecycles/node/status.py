"""What the device says about itself right now: power, the owner's own load, temperature.

The availability policy (``availability.py``) decides from these whether the node may work.
Everything is read from Linux's /proc and /sys; a reading that the device does not offer is left
at its neutral value (on AC power, no load, unknown temperature), so a desktop without a battery
or thermal sensors is simply always allowed.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sparecycles.availability import DeviceStatus

_POWER = Path("/sys/class/power_supply")
_THERMAL = Path("/sys/class/thermal")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def power_state() -> tuple[bool, bool]:
    """(on AC power, charging). A machine with no power-supply information counts as on AC."""
    if not _POWER.is_dir():
        return True, False
    mains: list[bool] = []
    charging = False
    for supply in _POWER.iterdir():
        kind = _read(supply / "type")
        if kind == "Mains":
            mains.append(_read(supply / "online") == "1")
        elif kind == "Battery":
            charging = charging or _read(supply / "status") == "Charging"
    return (any(mains) if mains else True), charging


def hottest_c() -> float | None:
    temps = []
    if _THERMAL.is_dir():
        for zone in _THERMAL.glob("thermal_zone*"):
            raw = _read(zone / "temp")
            if raw and raw.lstrip("-").isdigit():
                temps.append(int(raw) / 1000.0)
    return max(temps) if temps else None


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) jiffies of all CPUs since boot."""
    line = _read(Path("/proc/stat"))
    if not line:
        return None
    fields = [int(x) for x in line.splitlines()[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def _own_jiffies() -> int:
    """CPU jiffies this process (the agent and its engines) has used."""
    raw = _read(Path(f"/proc/{os.getpid()}/stat"))
    if not raw:
        return 0
    after = raw.rsplit(")", 1)[1].split()
    return int(after[11]) + int(after[12])  # utime + stime


class StatusProbe:
    """Call it to get a ``DeviceStatus``; the owner's load is measured since the previous call
    and excludes the agent's own work, so serving jobs never makes the node yield to itself."""

    def __init__(self) -> None:
        self._last: tuple[int, int, int] | None = None
        self._load = 0.0
        self._last_s = 0.0

    def __call__(self) -> DeviceStatus:
        now = time.monotonic()
        if now - self._last_s >= 1.0:
            self._last_s = now
            self._update_load()
        on_ac, charging = power_state()
        return DeviceStatus(on_ac_power=on_ac, charging=charging, owner_load=self._load,
                            temperature_c=hottest_c())

    def _update_load(self) -> None:
        cpu = _cpu_jiffies()
        if cpu is None:
            return
        sample = (cpu[0], cpu[1], _own_jiffies())
        if self._last is not None:
            busy = sample[0] - self._last[0]
            total = sample[1] - self._last[1]
            ours = sample[2] - self._last[2]
            if total > 0:
                self._load = min(1.0, max(0.0, (busy - ours) / total))
        self._last = sample
