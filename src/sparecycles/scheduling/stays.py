"""Learned stays: how long a node stays up, estimated from the sessions the coordinator saw.

Pure: no clock, no database. The coordinator (``coordinator/node_conn.py``) and the simulator
(``sim/loop.py``) feed the same ``StayLearner`` the sessions they observe and read the same
estimate, so the scheduler is never told the law that departures are drawn from.

- A **session** is one stretch of a node being available: from when it became available to
  when it stopped. It is an *event* when the node left on its own (the owner took it back, the
  machine went away), and *censored* when it was cut for a reason the up-time does not explain:
  the owner's window closed (known in advance, so it is bounded separately), or it is still
  going (its age so far is a lower bound on its length).
- **Kaplan-Meier**: ``S(t) = prod over event times t_i <= t of (1 - d_i / n_i)`` with ``d_i``
  events at ``t_i`` and ``n_i`` sessions at risk (length >= t_i). Censored sessions count as at
  risk up to their length and never as events, so they do not bias the estimate down.
- **Beyond the longest session**, ``S`` is extended by an exponential tail whose rate is the
  maximum-likelihood rate of the whole sample (events / total observed time): KM says nothing
  there, and without a tail a node older than every session seen would be expected to leave at
  once (or, with a censored last session, never).
- The **residual stay** of a node up for ``a`` seconds, counted no further than ``W`` (the
  window's end): ``E[min(T - a, W) | T > a] = integral from a to a+W of S(u) du / S(a)``, exact
  on the step function (a running integral is kept, so a query is two binary searches).
- **Per device class, and per node as its history grows**: a node's estimate is its own
  sessions' residual and its class's, mixed by ``n / (n + node_prior_sessions)`` where ``n`` is
  the node's own sessions (a node with 8 sessions counts half; one with 80 almost alone). A
  class with no session yet falls back to ``prior_mean_s`` (an exponential law).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from sparecycles.availability import DeviceStatus, is_available, window_remaining_s
from sparecycles.types import AvailabilityPolicy

# Limits and constants (units last)
node_prior_sessions = 8.0  # a node's own estimate weighs n / (n + this) against its class's
prior_mean_s = 3600.0  # stay assumed for a class that has no session yet (exponential)
sessions_per_key_max = 4096  # the most recent sessions kept per node and per class
rebuild_growth_fraction = 0.05  # a class's estimate is rebuilt when its sample grew by this


@dataclass(frozen=True, slots=True)
class Survival:
    """A Kaplan-Meier survival function with an exponential tail (see the module's doc)."""

    times: tuple[float, ...]  # distinct event times, ascending (0 first)
    surv: tuple[float, ...]  # S(t) on [times[i], times[i+1])
    cum: tuple[float, ...]  # integral of S from 0 to times[i]
    end_s: float  # the longest session seen: the tail starts here
    tail_rate_per_s: float  # hazard beyond end_s (0: no event seen, S stays flat)
    sessions: int

    def s(self, t: float) -> float:
        if t <= 0.0:
            return 1.0
        if t >= self.end_s:
            return self.surv[-1] * math.exp(-self.tail_rate_per_s * (t - self.end_s))
        return self.surv[bisect.bisect_right(self.times, t) - 1]

    def integral(self, t: float) -> float:
        """Integral of S from 0 to t (may be inf when the tail is flat)."""
        if t <= 0.0:
            return 0.0
        if t >= self.end_s:
            head = self._integral_to(self.end_s)
            if math.isinf(t):
                if self.tail_rate_per_s <= 0.0:
                    return math.inf if self.surv[-1] > 0 else head
                return head + self.surv[-1] / self.tail_rate_per_s
            rate, dt = self.tail_rate_per_s, t - self.end_s
            if rate <= 0.0:
                return head + self.surv[-1] * dt
            return head + self.surv[-1] * (1.0 - math.exp(-rate * dt)) / rate
        return self._integral_to(t)

    def _integral_to(self, t: float) -> float:
        i = bisect.bisect_right(self.times, t) - 1
        return self.cum[i] + self.surv[i] * (t - self.times[i])

    def residual_s(self, age_s: float, horizon_s: float = math.inf) -> float:
        """E[min(T - age, horizon) | T > age]."""
        if horizon_s <= 0.0:
            return 0.0
        age = max(0.0, age_s)
        at = self.s(age)
        if at <= 1e-12:  # older than any session and no tail: it leaves any moment
            return 0.0
        value = (self.integral(age + horizon_s) - self.integral(age)) / at
        return max(0.0, min(horizon_s, value))

    @property
    def mean_s(self) -> float:
        return self.integral(math.inf)


def kaplan_meier(sessions: Iterable[tuple[float, bool]]) -> Survival:
    """The estimate from ``(length_s, ended)`` pairs (``ended`` False: censored)."""
    data = sorted((max(0.0, length), ended) for length, ended in sessions)
    n = len(data)
    times, surv, cum = [0.0], [1.0], [0.0]
    at_risk, s, i = n, 1.0, 0
    events = 0
    exposure = 0.0
    while i < n:
        t = data[i][0]
        d = c = 0
        while i < n and data[i][0] == t:
            if data[i][1]:
                d += 1
            else:
                c += 1
            exposure += t
            i += 1
        if d:
            events += d
            cum.append(cum[-1] + s * (t - times[-1]))
            # the last sessions at risk all ending would take S to 0 and leave no room for the
            # tail: count one more at risk there (S stays positive, the tail takes over)
            s *= 1.0 - d / (at_risk if d < at_risk else at_risk + 1)
            times.append(t)
            surv.append(s)
        at_risk -= d + c
    end = data[-1][0] if data else 0.0
    rate = events / exposure if exposure > 0 and events else 0.0
    return Survival(tuple(times), tuple(surv), tuple(cum), max(end, times[-1]), rate, n)


def exponential(mean_s: float) -> Survival:
    """S(t) = exp(-t / mean): the prior of a class with no session yet."""
    return Survival((0.0,), (1.0,), (0.0,), 0.0, 1.0 / mean_s, 0)


@dataclass(slots=True)
class _Sample:
    sessions: list[tuple[float, bool]] = field(default_factory=list)
    built: Survival | None = None
    built_at: int = 0  # len(sessions) when built

    def add(self, length_s: float, ended: bool) -> None:
        self.sessions.append((length_s, ended))
        if len(self.sessions) > sessions_per_key_max:
            del self.sessions[: len(self.sessions) - sessions_per_key_max]
            self.built_at = 0  # force a rebuild: the sample changed, not only grew

    def estimate(self, growth: float) -> Survival | None:
        n = len(self.sessions)
        if n == 0:
            return None
        if self.built is None or n > self.built_at * (1.0 + growth) or self.built_at == 0:
            self.built, self.built_at = kaplan_meier(self.sessions), n
        return self.built


class StayLearner:
    """Sessions observed per device class and per node, and the stay estimate of each node."""

    def __init__(self, node_prior: float = node_prior_sessions, prior_s: float = prior_mean_s,
                 growth: float = rebuild_growth_fraction) -> None:  # fmt: skip
        self.node_prior = node_prior
        self.prior = exponential(prior_s)
        self.growth = growth
        self._classes: dict[str, _Sample] = {}
        self._nodes: dict[str, _Sample] = {}

    def observe(self, device_class: str, node_id: str, length_s: float, ended: bool) -> None:
        """One session of ``node_id`` lasted ``length_s``; ``ended``: the node left (not cut by
        its window, not still going)."""
        if not math.isfinite(length_s) or length_s < 0.0:
            return
        self._classes.setdefault(device_class, _Sample()).add(length_s, ended)
        self._nodes.setdefault(node_id, _Sample()).add(length_s, ended)

    def sessions(self, node_id: str) -> int:
        sample = self._nodes.get(node_id)
        return 0 if sample is None else len(sample.sessions)

    def survival(self, device_class: str) -> Survival:
        sample = self._classes.get(device_class)
        built = None if sample is None else sample.estimate(self.growth)
        return built or self.prior

    def residual_s(self, device_class: str, node_id: str, age_s: float,
                   horizon_s: float = math.inf) -> float:  # fmt: skip
        """Expected remaining stay of a node up for ``age_s``, no further than ``horizon_s``."""
        of_class = self.survival(device_class).residual_s(age_s, horizon_s)
        sample = self._nodes.get(node_id)
        if sample is None or not sample.sessions:
            return of_class
        own = sample.estimate(0.0)
        assert own is not None
        weight = len(sample.sessions) / (len(sample.sessions) + self.node_prior)
        of_node = own.residual_s(age_s, horizon_s)
        if math.isinf(of_node) or math.isinf(of_class):
            return of_node if weight >= 0.5 else of_class
        return weight * of_node + (1.0 - weight) * of_class


def learned_stay_s(
    learner: StayLearner,
    device_class: str,
    node_id: str,
    policy: AvailabilityPolicy,
    status: DeviceStatus,
    now_s: float,
    up_since_s: float,
) -> float:
    """``availability.expected_stay_s`` with the learned law instead of an assumed one: 0 if the
    node may not work now, else the learned residual stay bounded by the window's end, plus the
    owner's drain grace."""
    if not is_available(policy, status, now_s):
        return 0.0
    window_s = window_remaining_s(policy, now_s)
    stay = learner.residual_s(device_class, node_id, now_s - up_since_s, window_s)
    return stay + policy.drain_grace_s


def ended_by_window(policy: AvailabilityPolicy, end_s: float, tolerance_s: float = 1.0) -> bool:
    """Whether a session that stopped at epoch ``end_s`` was cut by the owner's window closing
    (a censored session) rather than by the node leaving."""
    if not policy.windows:
        return False
    return window_remaining_s(policy, end_s - tolerance_s) <= 2.0 * tolerance_s


def observe_all(learner: StayLearner, device_class: str, node_id: str,
                sessions: Sequence[tuple[float, bool]]) -> None:  # fmt: skip
    for length, ended in sessions:
        learner.observe(device_class, node_id, length, ended)
