"""Availability: is a node allowed to work now, and how long is it expected to stay?

Pure functions of an owner's ``AvailabilityPolicy``, the device's ``DeviceStatus`` and a time;
no clock is read here. The node agent evaluates ``is_available`` on its own device; the
coordinator and the simulator evaluate ``expected_stay_s`` to fill ``NodeSnapshot.expected_stay_s``,
which the scheduler uses to keep long jobs off nodes that are about to leave.

The expected stay has two parts:

- a **known** part: the end of the owner's current time window (a deterministic deadline);
- a **statistical** part: how long hosts like this one stay up, as a Weibull fit of up-times from
  the Failure Trace Archive (Javadi et al., JPDC 2013; see shared/data/README.md). Weibull shapes
  below 1 mean a decreasing hazard: a node that has been up for hours is likely to stay for hours
  more, one that just arrived often leaves soon. So the age of the current stay matters.

The expected stay is E[min(R, W)] where R is the residual up-time given the age and W the time to
the window's end, plus the policy's drain grace (the time a job gets to finish once the owner
takes the device back).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sparecycles.types import AvailabilityPolicy

MINUTES_PER_DAY = 1440
SECONDS_PER_HOUR = 3600.0


@dataclass(frozen=True, slots=True)
class DeviceStatus:
    """What the node agent reads from its device at one instant."""

    on_ac_power: bool = True  # plugged in (mains, or a car on its charger)
    charging: bool = False  # the battery is taking charge right now
    owner_load: float = 0.0  # the owner's own CPU/GPU load, 0..1, excluding our work
    temperature_c: float | None = None  # hottest sensor the agent can read; None if unknown


# --- now -----------------------------------------------------------------------------------


def check_time_zone(name: str) -> str:
    """``name`` if it is an IANA time zone this machine's tz database knows, else ValueError."""
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):  # ValueError: not a plain zone key
        raise ValueError(f"unknown time zone {name[:64]!r}: use an IANA name such as "
                         "Europe/Berlin") from None
    return name


def local_minute(policy: AvailabilityPolicy, now_s: float) -> float:
    """Minute of the owner's local day (0 <= m < 1440) at UTC epoch second ``now_s``."""
    if not policy.time_zone:
        return (now_s / 60.0 + policy.utc_offset_minutes) % MINUTES_PER_DAY
    local = datetime.fromtimestamp(now_s, ZoneInfo(policy.time_zone))
    return local.hour * 60 + local.minute + (local.second + local.microsecond / 1e6) / 60.0


def _seconds_until(policy: AvailabilityPolicy, now_s: float, minute: float, target: float
                   ) -> float:
    """Seconds from ``now_s`` (local ``minute`` of today) until local minute ``target`` of
    today (beyond 1440 or below 0: another day), counted on the owner's wall clock: across a
    daylight-saving change the night is an hour shorter or longer. A wall time that the change
    skips or repeats is read with the offset before the change (``fold=0``)."""
    if not policy.time_zone:
        return (target - minute) * 60.0
    zone = ZoneInfo(policy.time_zone)
    today = datetime.fromtimestamp(now_s, zone)
    wall = datetime(today.year, today.month, today.day) + timedelta(minutes=target)
    return wall.replace(tzinfo=zone).timestamp() - now_s


def _window_segments(policy: AvailabilityPolicy) -> list[tuple[float, float]]:
    """The windows as linear [start, end) minute intervals over four consecutive days (-1..2),
    sorted, so that runs crossing midnight are plain overlaps."""
    segments: list[tuple[float, float]] = []
    for start, end in policy.windows:
        if start == end:
            continue  # an empty window
        length = end - start if end > start else end - start + MINUTES_PER_DAY
        for day in (-1, 0, 1, 2):
            s = start + day * MINUTES_PER_DAY
            segments.append((s, s + length))
    segments.sort()
    return segments


def window_remaining_s(policy: AvailabilityPolicy, now_s: float) -> float:
    """Seconds until the owner's time windows stop allowing work: 0 outside every window,
    ``inf`` without windows or when they cover the whole day."""
    if not policy.windows:
        return math.inf
    minute = local_minute(policy, now_s)
    end = minute
    extended = True
    while extended:  # follow windows that overlap or touch the current run
        extended = False
        for s, e in _window_segments(policy):
            if s <= end < e:
                end = e
                extended = True
        if end - minute >= MINUTES_PER_DAY:
            return math.inf
    if end == minute:
        return 0.0
    return max(0.0, _seconds_until(policy, now_s, minute, end))


def window_wait_s(policy: AvailabilityPolicy, now_s: float) -> float:
    """Seconds until the owner's time windows next allow work: 0 inside a window (or without
    windows), ``inf`` when every window is empty."""
    if not policy.windows:
        return 0.0
    minute = local_minute(policy, now_s)
    starts = [s for s, e in _window_segments(policy) if e > minute]
    if not starts:
        return math.inf
    start = min(starts)
    if start <= minute:
        return 0.0
    return max(0.0, _seconds_until(policy, now_s, minute, start))


def in_window(policy: AvailabilityPolicy, now_s: float) -> bool:
    return window_remaining_s(policy, now_s) > 0.0


def unavailable_reasons(
    policy: AvailabilityPolicy, status: DeviceStatus, now_s: float
) -> tuple[str, ...]:
    """Every condition of the policy that does not hold now; empty when the node may work."""
    reasons: list[str] = []
    if not in_window(policy, now_s):
        reasons.append("outside the owner's time windows")
    if policy.only_on_ac_power and not status.on_ac_power:
        reasons.append("not on AC power")
    if policy.only_while_charging and not status.charging:
        reasons.append("not charging")
    if status.owner_load > policy.owner_load_max:
        reasons.append(f"owner's load {status.owner_load:.2f} above {policy.owner_load_max:.2f}")
    if (
        policy.temperature_max_c is not None
        and status.temperature_c is not None
        and status.temperature_c >= policy.temperature_max_c
    ):
        reasons.append(f"temperature {status.temperature_c:.0f} C at or above the limit")
    return tuple(reasons)


def is_available(policy: AvailabilityPolicy, status: DeviceStatus, now_s: float) -> bool:
    return not unavailable_reasons(policy, status, now_s)


# --- how long it stays ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StayModel:
    """Weibull distribution of how long a node stays up: S(t) = exp(-(t / scale) ** shape)."""

    shape: float
    scale_s: float

    @classmethod
    def from_hours(cls, shape: float, scale_h: float) -> StayModel:
        return cls(shape=shape, scale_s=scale_h * SECONDS_PER_HOUR)

    @property
    def mean_s(self) -> float:
        return self.scale_s * math.gamma(1.0 + 1.0 / self.shape)


# Up-time fits from the Failure Trace Archive (shared/data/README.md, units converted to seconds).
FTA_MICROSOFT99_UP = StayModel.from_hours(0.55, 35.30)  # corporate desktop PCs
FTA_ND07CPU_UP = StayModel.from_hours(0.45, 4.16)  # desktop CPUs, idle availability
FTA_SKYPE06_UP = StayModel.from_hours(0.64, 10.86)  # peer-to-peer home machines
# ... and how long they stay away once gone (used by the simulator to bring nodes back).
FTA_MICROSOFT99_DOWN = StayModel.from_hours(0.60, 9.34)
FTA_ND07CPU_DOWN = StayModel.from_hours(0.51, 0.74)
FTA_SKYPE06_DOWN = StayModel.from_hours(0.63, 9.48)

_GAMMA_ITERATIONS_MAX = 200  # series and continued fraction converge in far fewer for our shapes
_GAMMA_EPSILON = 1e-12


def _upper_gamma_scaled(s: float, x: float) -> float:
    """Γ(s, x) * e^x, the upper incomplete gamma function scaled so it stays finite for large x
    (Numerical Recipes §6.2: series below s + 1, Lentz's continued fraction above)."""
    if x <= 0.0:
        return math.gamma(s)
    x_s: float = x**s  # float ** float is typed Any (a negative base would give a complex)
    if x < s + 1.0:
        term = total = 1.0 / s
        a = s
        for _ in range(_GAMMA_ITERATIONS_MAX):
            a += 1.0
            term *= x / a
            total += term
            if abs(term) < abs(total) * _GAMMA_EPSILON:
                break
        # Γ(s, x) = Γ(s) - γ(s, x), γ(s, x) = e^-x x^s Σ
        return math.gamma(s) * math.exp(x) - x_s * total
    b = x + 1.0 - s
    c = 1.0 / 1e-300
    d = 1.0 / b
    h = d
    for i in range(1, _GAMMA_ITERATIONS_MAX):
        an = -i * (i - s)
        b += 2.0
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < _GAMMA_EPSILON:
            break
    return x_s * h


def residual_stay_s(model: StayModel, age_s: float, horizon_s: float = math.inf) -> float:
    """E[min(T - age, horizon) | T > age] for T ~ ``model``: the expected remaining up-time of a
    node already up for ``age_s``, counting no further than ``horizon_s``."""
    if horizon_s <= 0.0:
        return 0.0
    k, lam = model.shape, model.scale_s
    s = 1.0 / k
    xa = (max(0.0, age_s) / lam) ** k
    # ∫_a^b S(u) du / S(a) = (lam / k) [Γ(s, xa) e^xa - Γ(s, xb) e^xb e^-(xb - xa)]
    head = _upper_gamma_scaled(s, xa)
    tail = 0.0
    if math.isfinite(horizon_s):
        xb = ((max(0.0, age_s) + horizon_s) / lam) ** k
        tail = _upper_gamma_scaled(s, xb) * math.exp(-(xb - xa))
    return max(0.0, min(horizon_s, (lam / k) * (head - tail)))


def expected_stay_s(
    policy: AvailabilityPolicy,
    status: DeviceStatus,
    now_s: float,
    *,
    up_since_s: float | None = None,
    model: StayModel | None = None,
) -> float:
    """Expected seconds a job placed now can keep running on this node: 0 if the node may not
    work now; else the expected remaining stay (bounded by the window's end, statistical if a
    ``model`` is given, ``inf`` if nothing bounds it) plus the policy's drain grace."""
    if not is_available(policy, status, now_s):
        return 0.0
    window_s = window_remaining_s(policy, now_s)
    if model is None:
        stay_s = window_s
    else:
        age_s = 0.0 if up_since_s is None else now_s - up_since_s
        stay_s = residual_stay_s(model, age_s, window_s)
    return stay_s + policy.drain_grace_s
