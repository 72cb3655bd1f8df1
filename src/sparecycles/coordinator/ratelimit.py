"""Per-key limits: a token bucket for request rate, spending budgets per period, concurrent
streams. Pure: time comes in as ``now_s``; each decision returns how long to wait (the
``Retry-After`` of a 429) or ``None`` when the request may go.

A key's effective ``KeyPolicy`` combines what an admin set (``/v1/admin/keys``) with what the
client set for itself on the dashboard (``key_limits``): the stricter of each applies.
"""

from __future__ import annotations

import calendar
import math
import time
from dataclasses import dataclass

from sparecycles.types import KeyPolicy as KeyPolicy  # the store's record, kept in types.py

PERIODS = ("day", "month")
retry_after_s_min = 1.0  # HTTP's Retry-After counts whole seconds


def combine(admin: KeyPolicy, client_rpm: int | None, client_budget_month_micros: int | None
            ) -> KeyPolicy:
    """The admin's policy made stricter by the client's own dashboard limits."""
    rpm = _min_opt(admin.requests_per_minute, client_rpm)
    return KeyPolicy(requests_per_minute=rpm, burst=admin.burst,
                     budget_micros=admin.budget_micros, budget_period=admin.budget_period,
                     monthly_budget_micros=client_budget_month_micros,
                     streams_max=admin.streams_max, trusted_only=admin.trusted_only)


def _min_opt(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


# ---- request rate: a token bucket -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Bucket:
    tokens: float
    updated_s: float


def take(bucket: Bucket | None, *, rate_per_s: float, burst: float, now_s: float,
         cost: float = 1.0) -> tuple[Bucket, float | None]:
    """Refill at ``rate_per_s`` up to ``burst`` and take ``cost``: (new bucket, None) if allowed,
    else (unchanged bucket, seconds until ``cost`` will be there)."""
    if rate_per_s <= 0 or burst < cost:
        return bucket or Bucket(0.0, now_s), math.inf
    if bucket is None:
        bucket = Bucket(burst, now_s)
    elapsed = max(0.0, now_s - bucket.updated_s)  # a clock step backwards refills nothing
    tokens = min(burst, bucket.tokens + elapsed * rate_per_s)
    if tokens >= cost:
        return Bucket(tokens - cost, now_s), None
    return Bucket(tokens, now_s), (cost - tokens) / rate_per_s


def rate_decision(policy: KeyPolicy, bucket: Bucket | None, now_s: float
                  ) -> tuple[Bucket | None, float | None]:
    if policy.requests_per_minute is None:
        return bucket, None
    burst = policy.burst or policy.requests_per_minute
    return take(bucket, rate_per_s=policy.requests_per_minute / 60.0, burst=burst, now_s=now_s)


# ---- spending budgets ---------------------------------------------------------------------


def period_bounds(period: str, now_s: float) -> tuple[float, float]:
    """[start, end) of the calendar ``day`` or ``month`` (UTC) holding ``now_s``."""
    t = time.gmtime(now_s)
    if period == "day":
        start = calendar.timegm((t.tm_year, t.tm_mon, t.tm_mday, 0, 0, 0))
        return float(start), float(start + 86_400)
    if period == "month":
        start = calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0))
        year, month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
        return float(start), float(calendar.timegm((year, month, 1, 0, 0, 0)))
    raise ValueError(f"budget period must be one of {PERIODS}, got {period!r}")


def budget_decision(*, budget_micros: int | None, spent_micros: int, in_flight_micros: int,
                    hold_micros: int, period_end_s: float, now_s: float) -> float | None:
    """Admit only if what was charged this period, plus the holds of requests in flight, plus
    this request's hold stays within the budget; else wait for the next period."""
    if budget_micros is None:
        return None
    if spent_micros + in_flight_micros + hold_micros <= budget_micros:
        return None
    return max(retry_after_s_min, period_end_s - now_s)


def streams_decision(policy: KeyPolicy, in_flight: int) -> float | None:
    if policy.streams_max is None or in_flight < policy.streams_max:
        return None
    return retry_after_s_min
