"""Per-key admission on a coordinator: the state behind ``coordinator/ratelimit.py``'s decisions.

``KeyGate.admit`` runs after a request is tokenized (so the hold it would place is known) and
before dispatch admits it: concurrent requests, then rate, then each spending budget. A refusal
is ``RateLimited`` (429 with Retry-After). An admitted request is in flight until its job
finishes (``release``, called from the coordinator's job-finished hook).

What is kept per key, in memory (one coordinator's view; replicas each enforce their own share):
its policy (reloaded every ``policy_cache_s``), its token bucket, the holds of its requests in
flight, and what it was charged this period (reloaded every ``spend_cache_s``; a finished job's
hold is added meanwhile, so the estimate errs on the side of refusing).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import LRUCache

from sparecycles import limits
from sparecycles.coordinator import ratelimit
from sparecycles.coordinator.ratelimit import Bucket, KeyPolicy
from sparecycles.errors import InvalidRequest, RateLimited
from sparecycles.ledger import pricing
from sparecycles.ledger.service import Ledger
from sparecycles.store.trust_queries import TrustQueries

policy_cache_s = 5.0  # a limit an admin or a client sets applies within this
spend_cache_s = 5.0
prices_cache_s = 1.0  # the price book used to estimate a request's hold (as the ledger's cache)
# Keys with state in memory; beyond it the least recently used key's state is forgotten (its
# bucket refills, its policy and spending are read again), one key at a time.
keys_tracked_max = 100_000


@dataclass(frozen=True, slots=True)
class Ticket:
    key_id: str
    job_id: str
    hold_micros: int
    trusted_only: bool
    periods: tuple[float, ...] = ()  # starts of the budget periods whose spending was read


class KeyGate:
    def __init__(self, db: TrustQueries, ledger: Ledger, *,
                 clock: Callable[[], float] = time.time):
        self.db, self.ledger, self.clock = db, ledger, clock
        self._policies: LRUCache[str, tuple[float, KeyPolicy]] = LRUCache(keys_tracked_max)
        self._buckets: LRUCache[str, Bucket] = LRUCache(keys_tracked_max)
        self._in_flight: dict[str, dict[str, int]] = {}  # key -> job -> hold
        # (key, period start) -> (read at, spent)
        self._spent: LRUCache[tuple[str, float], tuple[float, int]] = LRUCache(keys_tracked_max)
        self._tickets: dict[str, Ticket] = {}
        self._prices: tuple[float, pricing.PriceBook] | None = None

    async def policy(self, key_id: str) -> KeyPolicy:
        now = self.clock()
        hit = self._policies.get(key_id)
        if hit is None or now - hit[0] > policy_cache_s:
            admin, rpm, month = await asyncio.to_thread(self.db.key_policy, key_id)
            hit = (now, ratelimit.combine(admin, rpm, month))
            self._policies[key_id] = hit
        return hit[1]

    def forget(self, key_id: str) -> None:
        """Drop a key's cached policy (an admin just changed it)."""
        self._policies.pop(key_id, None)

    async def fits(self, key_id: str, jobs: int, param: str) -> None:
        """A 400 when one request needs more jobs at once (its choices) than the key may ever
        have in flight, or start at once under its rate limit: a 429 would tell the client to
        retry what can never be admitted."""
        policy = await self.policy(key_id)
        streams_max = _streams_max(policy)
        if jobs > streams_max:
            raise InvalidRequest(f"This request needs {jobs} jobs at once (one a choice); this "
                                 f"key may have {streams_max} requests in flight.", param=param,
                                 code="too_many_choices")
        burst = policy.burst or policy.requests_per_minute  # as ratelimit.rate_decision
        if burst is not None and jobs > burst:
            raise InvalidRequest(f"This request needs {jobs} jobs at once (one a choice); this "
                                 f"key may start {burst} at once (its rate limit's burst).",
                                 param=param, code="too_many_choices")

    async def admit(self, key_id: str, job_id: str, model: str, prompt_tokens: int,
                    max_tokens: int) -> Ticket:
        policy = await self.policy(key_id)
        flying = self._in_flight.get(key_id, {})
        streams_max = _streams_max(policy)
        if len(flying) >= streams_max:
            raise RateLimited(f"This key already has {len(flying)} requests in flight; it may "
                              f"have {streams_max} at once.", retry_after_s=1.0,
                              code="concurrent_requests")
        now = self.clock()
        bucket, wait_s = ratelimit.rate_decision(policy, self._buckets.get(key_id), now)
        if wait_s is not None:
            raise RateLimited(f"This key is limited to {policy.requests_per_minute} requests per "
                              "minute.", retry_after_s=wait_s, code="rate_limit_exceeded")
        hold = 0
        periods: list[float] = []
        budgets = [(policy.budget_micros, policy.budget_period),
                   (policy.monthly_budget_micros, "month")]
        if any(b is not None for b, _ in budgets):
            price = (await self._price_book()).price_of(model)
            hold = pricing.hold_micros(price, prompt_tokens, max_tokens)
        for budget, period in budgets:
            if budget is None:
                continue
            start_s, end_s = ratelimit.period_bounds(period, now)
            periods.append(start_s)
            spent = await self._spent_since(key_id, start_s)
            wait_s = ratelimit.budget_decision(
                budget_micros=budget, spent_micros=spent, in_flight_micros=sum(flying.values()),
                hold_micros=hold, period_end_s=end_s, now_s=now)
            if wait_s is not None:
                raise RateLimited(f"This key's budget of {budget} micro-units per {period} would "
                                  "be exceeded by this request.", retry_after_s=wait_s,
                                  code="budget_exceeded")
        if bucket is not None:
            self._buckets[key_id] = bucket
        self._in_flight.setdefault(key_id, {})[job_id] = hold
        ticket = Ticket(key_id, job_id, hold, policy.trusted_only, tuple(periods))
        self._tickets[job_id] = ticket
        return ticket

    def release(self, job_id: str) -> None:
        """The job finished (or was never admitted): it no longer counts as in flight; its hold
        counts as spent until the next reload of what the key was charged."""
        ticket = self._tickets.pop(job_id, None)
        if ticket is None:
            return
        flying = self._in_flight.get(ticket.key_id, {})
        flying.pop(job_id, None)
        if not flying:
            self._in_flight.pop(ticket.key_id, None)
        # the periods this request was checked against; not a pass over every key's entries
        # (up to keys_tracked_max of them, on every request's end)
        for start in ticket.periods:
            hit = self._spent.get((ticket.key_id, start))
            if hit is not None:
                self._spent[(ticket.key_id, start)] = (hit[0], hit[1] + ticket.hold_micros)

    async def _price_book(self) -> pricing.PriceBook:
        """The ledger's prices, re-read at most every ``prices_cache_s`` (not once a request)."""
        now = self.clock()
        if self._prices is None or not 0 <= now - self._prices[0] <= prices_cache_s:
            self._prices = (now, await asyncio.to_thread(self.ledger.prices))
        return self._prices[1]

    def in_flight(self, key_id: str) -> int:
        return len(self._in_flight.get(key_id, {}))

    async def _spent_since(self, key_id: str, start_s: float) -> int:
        now = self.clock()
        hit = self._spent.get((key_id, start_s))
        if hit is None or now - hit[0] > spend_cache_s:
            hit = (now, await asyncio.to_thread(self.db.key_spent_since, key_id, start_s))
            self._spent[(key_id, start_s)] = hit
        return hit[1]


def _streams_max(policy: KeyPolicy) -> int:
    """Requests a key may have in flight at once: its policy's, within the platform's bound."""
    return min(policy.streams_max or limits.streams_per_key_max, limits.streams_per_key_max)
