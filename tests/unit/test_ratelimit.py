"""Per-key limits: the token bucket, budgets per period, concurrent streams (pure), and the
coordinator's ``KeyGate`` over an in-memory store."""

from __future__ import annotations

import calendar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparecycles.coordinator import ratelimit
from sparecycles.coordinator.admission import KeyGate
from sparecycles.coordinator.ratelimit import Bucket, KeyPolicy
from sparecycles.errors import InvalidRequest, RateLimited
from sparecycles.ledger.pricing import PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.store import Store
from sparecycles.store.trust_queries import TrustQueries

T0 = float(calendar.timegm((2026, 3, 31, 23, 0, 0)))


def test_bucket_allows_a_burst_then_the_rate() -> None:
    b = None
    for _ in range(3):
        b, wait = ratelimit.take(b, rate_per_s=1.0, burst=3, now_s=T0)
        assert wait is None
    b, wait = ratelimit.take(b, rate_per_s=1.0, burst=3, now_s=T0)
    assert wait == pytest.approx(1.0)
    b, wait = ratelimit.take(b, rate_per_s=1.0, burst=3, now_s=T0 + 1.0)
    assert wait is None


def test_a_clock_going_backwards_refills_nothing() -> None:
    b = Bucket(0.0, T0)
    _b, wait = ratelimit.take(b, rate_per_s=1.0, burst=3, now_s=T0 - 100)
    assert wait == pytest.approx(1.0)


@settings(deadline=None)
@given(st.lists(st.floats(0, 5), min_size=1, max_size=100),
       st.floats(0.1, 10), st.integers(1, 10))
def test_a_bucket_never_admits_more_than_burst_plus_rate_times_time(
        gaps: list[float], rate: float, burst: int) -> None:
    b, now, admitted = None, T0, 0
    for gap in gaps:
        now += gap
        b, wait = ratelimit.take(b, rate_per_s=rate, burst=burst, now_s=now)
        admitted += wait is None
        assert wait is None or wait > 0
    assert admitted <= burst + rate * (now - T0) + 1e-6


def test_periods_are_calendar_days_and_months_in_utc() -> None:
    day = ratelimit.period_bounds("day", T0)
    assert day == (T0 - 23 * 3600, T0 + 3600)
    month = ratelimit.period_bounds("month", T0)
    assert month[1] == T0 + 3600 and month[1] - month[0] == 31 * 86400
    dec = float(calendar.timegm((2026, 12, 15, 0, 0, 0)))
    assert ratelimit.period_bounds("month", dec)[1] == calendar.timegm((2027, 1, 1, 0, 0, 0))
    with pytest.raises(ValueError):
        ratelimit.period_bounds("week", T0)


def test_budget_counts_what_was_spent_what_flies_and_this_hold() -> None:
    kw = dict(budget_micros=100, period_end_s=T0 + 3600, now_s=T0)
    assert ratelimit.budget_decision(spent_micros=50, in_flight_micros=30, hold_micros=20,
                                     **kw) is None
    wait = ratelimit.budget_decision(spent_micros=50, in_flight_micros=30, hold_micros=21, **kw)
    assert wait == 3600
    assert ratelimit.budget_decision(budget_micros=None, spent_micros=10**9, in_flight_micros=0,
                                     hold_micros=1, period_end_s=T0, now_s=T0) is None


def test_the_stricter_of_admin_and_client_limits_applies() -> None:
    admin = KeyPolicy(requests_per_minute=60, streams_max=2, trusted_only=True)
    p = ratelimit.combine(admin, client_rpm=10, client_budget_month_micros=500)
    assert p.requests_per_minute == 10 and p.monthly_budget_micros == 500
    assert p.streams_max == 2 and p.trusted_only
    assert ratelimit.combine(KeyPolicy(), None, None).unlimited


@pytest.fixture
def gate(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_all()
    ledger = Ledger(store.sessions, prices=PriceBook.default())
    key_id, _secret = store.create_api_key("acme", "k")
    clock = [T0]
    g = KeyGate(TrustQueries(store.sessions), ledger, clock=lambda: clock[0])
    return g, TrustQueries(store.sessions), key_id, clock


async def test_gate_enforces_streams_rate_and_budget(gate) -> None:
    g, db, key_id, clock = gate
    db.set_key_policy(key_id, KeyPolicy(requests_per_minute=60, burst=2, streams_max=2))
    await g.admit(key_id, "j1", "tiny", 10, 10)
    await g.admit(key_id, "j2", "tiny", 10, 10)
    with pytest.raises(RateLimited) as info:
        await g.admit(key_id, "j3", "tiny", 10, 10)
    assert info.value.code == "concurrent_requests"
    g.release("j1")
    with pytest.raises(RateLimited) as info:  # a stream is free, but the burst is spent
        await g.admit(key_id, "j3", "tiny", 10, 10)
    assert info.value.code == "rate_limit_exceeded" and info.value.retry_after_s == 1.0
    clock[0] += 1.0
    await g.admit(key_id, "j3", "tiny", 10, 10)
    assert g.in_flight(key_id) == 2
    db.set_key_policy(key_id, KeyPolicy(budget_micros=1, budget_period="day"))
    g.forget(key_id)
    with pytest.raises(RateLimited) as info:
        await g.admit(key_id, "j4", "tiny", 10, 10)
    assert info.value.code == "budget_exceeded" and info.value.retry_after_s == 3599  # to 0:00
    g.release("j2")
    g.release("j3")
    g.release("never-admitted")  # harmless
    assert g.in_flight(key_id) == 0


async def test_more_choices_than_a_key_may_ever_fly_is_a_400_not_a_429(gate) -> None:
    """n choices are n jobs in flight at once: past the key's streams_max the request can never
    be admitted, so retrying after a 429 (what it got) would only loop."""
    g, db, key_id, _clock = gate
    db.set_key_policy(key_id, KeyPolicy(streams_max=1))
    await g.fits(key_id, 1, "n")
    with pytest.raises(InvalidRequest) as info:
        await g.fits(key_id, 2, "n")
    assert (info.value.param, info.value.code, info.value.status_code) == (
        "n", "too_many_choices", 400)
    assert g.in_flight(key_id) == 0  # nothing admitted
    db.set_key_policy(key_id, KeyPolicy(requests_per_minute=60, burst=3))
    g.forget(key_id)
    await g.fits(key_id, 3, "n")
    with pytest.raises(InvalidRequest):  # each choice takes one of the burst's 3 at once
        await g.fits(key_id, 4, "n")


async def test_gate_reads_the_clients_own_dashboard_limits(gate) -> None:
    from sparecycles.store.dashboard_queries import DashboardQueries

    g, db, key_id, _clock = gate
    q = DashboardQueries(db.sessions)
    acme = q.key_by_id(key_id)
    assert acme is not None and acme.client_id is not None
    assert q.set_key_limits(acme.client_id, key_id, None, 1)
    await g.admit(key_id, "j1", "tiny", 10, 10)
    with pytest.raises(RateLimited):
        await g.admit(key_id, "j2", "tiny", 10, 10)


async def test_a_full_gate_forgets_one_key_not_every_keys_bucket(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past ``keys_tracked_max`` keys the least recently used key's state goes, one at a time:
    the others keep their spent buckets (a cache that emptied when full gave every key a full
    burst again)."""
    from sparecycles.coordinator import admission

    monkeypatch.setattr(admission, "keys_tracked_max", 4)
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_all()
    db = TrustQueries(store.sessions)
    g = KeyGate(db, Ledger(store.sessions, prices=PriceBook.default()), clock=lambda: T0)
    keys = [store.create_api_key("acme", f"k{i}")[0] for i in range(6)]
    for key_id in keys:
        db.set_key_policy(key_id, KeyPolicy(requests_per_minute=1, burst=1))
    for i, key_id in enumerate(keys[:4]):
        await g.admit(key_id, f"j{i}", "tiny", 10, 10)
        g.release(f"j{i}")
    await g.admit(keys[4], "j4", "tiny", 10, 10)  # a fifth key: the bound is passed
    for i, key_id in enumerate(keys[1:4], start=1):  # their bursts stay spent
        with pytest.raises(RateLimited) as info:
            await g.admit(key_id, f"again{i}", "tiny", 10, 10)
        assert info.value.code == "rate_limit_exceeded"


async def test_a_finished_requests_hold_counts_as_spent_for_its_own_key_only(gate) -> None:
    """``release`` adds the hold to what the key's budget periods spent (until the next reload),
    touching only the periods that request was checked against."""
    g, db, key_id, _clock = gate
    db.set_key_policy(key_id, KeyPolicy(budget_micros=10**9, budget_period="day"))
    ticket = await g.admit(key_id, "j1", "tiny", 10, 10)
    assert ticket.hold_micros > 0 and len(ticket.periods) == 1
    g._spent[("someone-else", ticket.periods[0])] = (T0, 7)
    before = g._spent[(key_id, ticket.periods[0])][1]
    g.release("j1")
    assert g._spent[(key_id, ticket.periods[0])][1] == before + ticket.hold_micros
    assert g._spent[("someone-else", ticket.periods[0])] == (T0, 7)
