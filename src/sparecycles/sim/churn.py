"""When each simulated node is there: availability realised as intervals of simulated time.

Everything here is drawn up front from the node's own random stream, so the same seed gives the
same comings and goings whatever the scheduling policy does (departures are exogenous).

Three kinds of availability (a fleet file picks one per device class):

- ``always``: a data-centre machine, there for the whole run.
- ``weibull``: a home or office machine. Up and down periods alternate, each drawn from a Weibull
  fit of the Failure Trace Archive (shared/data/README.md), intersected with the owner's time
  windows. The run starts in the renewal process's steady state: a node found up is in an up
  period drawn length-biased, at a uniform point of it (so long periods are found more often,
  as an observer arriving at a random time would find them).
  Two options make it no longer a renewal process (fleet file: ``diurnal_amplitude``,
  ``correlated_events_per_day``, ``correlated_leave_fraction``):
  *diurnal*: an up period that starts at local hour ``h`` has its Weibull scale multiplied by
  ``1 + A·cos(2π (h - 3) / 24)`` (sessions begun at night last longest, those begun mid-afternoon
  shortest); *correlated*: at moments shared by the whole class (a Poisson process of
  ``correlated_events_per_day``, from the class's own stream: an outage, an evening when owners
  reclaim their machines together) every node then up leaves with probability
  ``correlated_leave_fraction``. The scheduler is never told either; it learns stays from the
  sessions it sees (scheduling/stays.py).
- ``parked-car``: a private car's computer, on only while the car is parked and plugged in. The
  assumptions (stated again in each fleet file): a car commutes twice a day (about 95% of the day
  parked), leaving home around 07:30 and work around 17:15 local time, each car with its own
  habits (spread ``schedule_spread_min``) and each day's departure off its plan by
  ``departure_jitter_min``; it is plugged in at home with probability ``plugged_at_home`` and at
  work with ``plugged_at_work``. The owner's policy windows are the planned stays (a car knows
  its departure timer), so the scheduler knows the planned end; the car may leave earlier.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass

from sparecycles.availability import StayModel, window_remaining_s, window_wait_s
from sparecycles.types import AvailabilityPolicy

DAY_S = 86_400.0
Interval = tuple[float, float]


@dataclass(frozen=True, slots=True)
class CarHabits:
    home_departure_min: float = 7.5 * 60  # planned, local minutes of the day
    work_departure_min: float = 17.25 * 60
    commute_min: float = 30.0
    schedule_spread_min: float = 45.0  # how much one car's plan differs from the class's
    departure_jitter_min: float = 20.0  # how much a day's actual departure differs from plan
    plugged_at_home: float = 0.7
    plugged_at_work: float = 0.3


@dataclass(frozen=True, slots=True)
class AvailabilitySpec:
    """One device class's availability, as the fleet file states it."""

    kind: str = "always"  # "always" | "weibull" | "parked-car"
    up: StayModel | None = None
    down: StayModel | None = None
    windows: tuple[tuple[int, int], ...] = ()
    only_on_ac_power: bool = False
    only_while_charging: bool = False
    drain_grace_s: float = 30.0
    car: CarHabits | None = None
    diurnal_amplitude: float = 0.0  # 0..1; weibull only (see the module's doc)
    correlated_events_per_day: float = 0.0
    correlated_leave_fraction: float = 0.0


@dataclass(frozen=True, slots=True)
class Realised:
    policy: AvailabilityPolicy
    intervals: tuple[Interval, ...]  # sorted, disjoint, in simulated seconds (may start < 0)
    stay_model: StayModel | None  # what the coordinator assumes for the expected stay


def _length_biased(rng: random.Random, model: StayModel) -> float:
    """A Weibull period drawn with probability proportional to its length: if T ~ Weibull(k, s)
    then (T/s)^k ~ Exp(1), and length-biasing turns that Exp(1) into Gamma(1 + 1/k, 1)."""
    k = model.shape
    return model.scale_s * rng.gammavariate(1.0 + 1.0 / k, 1.0) ** (1.0 / k)


def shared_moments(rng: random.Random, per_day: float, horizon_s: float) -> tuple[float, ...]:
    """A class's correlated departure moments over [0, horizon_s]: a Poisson process."""
    if per_day <= 0.0:
        return ()
    out: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(per_day / DAY_S)
        if t >= horizon_s:
            return tuple(out)
        out.append(t)


def _diurnal_scale(start_s: float, epoch0_s: float, offset_min: int, amplitude: float) -> float:
    hour = ((epoch0_s + start_s + offset_min * 60) % DAY_S) / 3600.0
    return 1.0 + amplitude * math.cos(2.0 * math.pi * (hour - 3.0) / 24.0)


def churned_intervals(
    rng: random.Random, spec: AvailabilitySpec, epoch0_s: float, horizon_s: float,
    offset_min: int, moments: tuple[float, ...],
) -> list[Interval]:  # fmt: skip
    """Weibull up/down periods with the diurnal and correlated options (see the module's doc)."""
    assert spec.up is not None and spec.down is not None
    up, down = spec.up, spec.down
    out, t = _steady_start(rng, up, down)
    amplitude = spec.diurnal_amplitude
    while t < horizon_s:
        scale = up.scale_s * _diurnal_scale(t, epoch0_s, offset_min, amplitude)
        out.append((t, t + rng.weibullvariate(scale, up.shape)))
        t = out[-1][1] + rng.weibullvariate(down.scale_s, down.shape)
    if not moments or spec.correlated_leave_fraction <= 0.0:
        return out
    cut: list[Interval] = []
    for a, b in out:
        i = bisect.bisect_right(moments, a)
        while i < len(moments) and moments[i] < b:
            if rng.random() < spec.correlated_leave_fraction:
                b = moments[i]
                break
            i += 1
        cut.append((a, b))
    return cut


def _steady_start(
    rng: random.Random, up: StayModel, down: StayModel
) -> tuple[list[Interval], float]:
    """The renewal process found in its steady state at time 0: the up period it is in (if up)
    and when the next up period starts."""
    out: list[Interval] = []
    p_up = up.mean_s / (up.mean_s + down.mean_s)
    if rng.random() < p_up:
        length = _length_biased(rng, up)
        age = rng.random() * length
        out.append((-age, length - age))
        t = length - age + rng.weibullvariate(down.scale_s, down.shape)
    else:
        length = _length_biased(rng, down)
        t = length * rng.random()  # the rest of the current down period
    return out, t


def weibull_intervals(
    rng: random.Random, up: StayModel, down: StayModel, horizon_s: float
) -> list[Interval]:
    """Alternating up/down periods over [0, horizon_s], starting in the steady state."""
    out, t = _steady_start(rng, up, down)
    while t < horizon_s:
        end = t + rng.weibullvariate(up.scale_s, up.shape)
        out.append((t, end))
        t = end + rng.weibullvariate(down.scale_s, down.shape)
    return out


def window_intervals(
    policy: AvailabilityPolicy, epoch0_s: float, start_s: float, horizon_s: float
) -> list[Interval]:
    """The owner's time windows as intervals of simulated time (epoch = epoch0_s + t)."""
    if not policy.windows:
        return [(start_s, math.inf)]
    out: list[Interval] = []
    t = start_s
    while t < horizon_s:
        wait = window_wait_s(policy, epoch0_s + t)
        if math.isinf(wait):
            break
        t += wait
        length = window_remaining_s(policy, epoch0_s + t)
        out.append((t, t + length))
        if math.isinf(length):
            break
        t += length + 1e-6
    return out


def intersect(a: list[Interval], b: list[Interval]) -> list[Interval]:
    """Intersection of two sorted lists of disjoint intervals."""
    out: list[Interval] = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _local_midnight(epoch_s: float, utc_offset_minutes: int) -> float:
    """Epoch second of the local midnight that starts the day containing ``epoch_s``."""
    local = epoch_s + utc_offset_minutes * 60
    return local - (local % DAY_S) - utc_offset_minutes * 60


def _minute(value: float) -> int:
    return round(value) % 1440


def car_realisation(
    rng: random.Random,
    spec: AvailabilitySpec,
    epoch0_s: float,
    horizon_s: float,
    utc_offset_minutes: int,
) -> tuple[AvailabilityPolicy, list[Interval]]:
    habits = spec.car or CarHabits()
    # whole minutes, so that the planned stays and the policy's windows agree exactly
    home_dep = round(habits.home_departure_min + rng.gauss(0.0, habits.schedule_spread_min))
    work_dep = round(habits.work_departure_min + rng.gauss(0.0, habits.schedule_spread_min))
    commute = round(habits.commute_min)
    plugged_home = rng.random() < habits.plugged_at_home
    plugged_work = rng.random() < habits.plugged_at_work
    windows = []
    if plugged_home:
        windows.append((_minute(work_dep + commute), _minute(home_dep)))
    if plugged_work:
        windows.append((_minute(home_dep + commute), _minute(work_dep)))
    policy = AvailabilityPolicy(
        windows=tuple(windows) or ((0, 0),),  # never plugged in: an empty window, never works
        utc_offset_minutes=utc_offset_minutes,
        only_on_ac_power=True,
        only_while_charging=spec.only_while_charging,
        drain_grace_s=spec.drain_grace_s,
    )
    midnight0 = _local_midnight(epoch0_s, utc_offset_minutes) - epoch0_s  # sim time
    days = int(horizon_s // DAY_S) + 2
    jitter = habits.departure_jitter_min
    out: list[Interval] = []
    prev_home_arrival = None
    for d in range(-1, days):
        base = midnight0 + d * DAY_S
        leave_home = base + 60 * min(home_dep, home_dep + rng.gauss(0.0, jitter))
        leave_work = base + 60 * min(work_dep, work_dep + rng.gauss(0.0, jitter))
        if plugged_home and prev_home_arrival is not None:
            out.append((prev_home_arrival, leave_home))
        if plugged_work:
            out.append((base + 60 * (home_dep + commute), leave_work))
        # arriving home: never before the planned arrival (the window opens then)
        prev_home_arrival = base + 60 * (work_dep + commute)
    return policy, [(a, b) for a, b in out if a < b]


def realise(
    rng: random.Random,
    spec: AvailabilitySpec,
    epoch0_s: float,
    horizon_s: float,
    utc_offset_minutes: int = 0,
    moments: tuple[float, ...] = (),
) -> Realised:
    """One node's policy and availability intervals over [0, horizon_s]; ``moments``: the
    class's correlated departure moments (``shared_moments``)."""
    if spec.kind == "parked-car":
        policy, intervals = car_realisation(rng, spec, epoch0_s, horizon_s, utc_offset_minutes)
        return Realised(policy, tuple(intervals), None)
    policy = AvailabilityPolicy(
        windows=spec.windows,
        utc_offset_minutes=utc_offset_minutes,
        only_on_ac_power=spec.only_on_ac_power,
        only_while_charging=spec.only_while_charging,
        drain_grace_s=spec.drain_grace_s,
    )
    if spec.kind == "always":
        up: list[Interval] = [(-DAY_S, math.inf)]
    elif spec.kind == "weibull":
        if spec.up is None or spec.down is None:
            raise ValueError("weibull availability needs up and down fits")
        if spec.diurnal_amplitude or spec.correlated_leave_fraction:
            up = churned_intervals(rng, spec, epoch0_s, horizon_s, utc_offset_minutes, moments)
        else:
            up = weibull_intervals(rng, spec.up, spec.down, horizon_s)
    else:
        raise ValueError(f"unknown availability kind {spec.kind!r}")
    start = min([-DAY_S, *(a for a, _ in up[:1])])
    windows = window_intervals(policy, epoch0_s, start, horizon_s)
    model = spec.up if spec.kind == "weibull" else None
    return Realised(policy, tuple(intersect(up, windows)), model)
