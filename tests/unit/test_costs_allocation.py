"""Allocation conserves every micro-unit: property tests over random usage and cost models, and
the edge cases (nothing to land on, idle hardware, corrections, platform-owned nodes)."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import ROUND_HALF_UP, Decimal

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparecycles.costs import allocation as al
from sparecycles.costs.allocation import (
    AttemptUsage,
    Correction,
    JobUsage,
    LedgerCost,
    NodeEarning,
    NodeInfo,
    Period,
    PeriodUsage,
    allocate,
    largest_remainder,
)
from sparecycles.costs.costmodel import (
    WORKLOADS,
    CostModel,
    Egress,
    EnergyPrice,
    Hardware,
    Person,
    Server,
    Storage,
)
from sparecycles.costs.reports import build_report
from sparecycles.errors import InvalidRequest

NOV = Period.month("2026-11")
NODES = ("n1", "n2", "n3")
D = 1_000_000


def _ts(d: date) -> float:
    return datetime(d.year, d.month, d.day, tzinfo=UTC).timestamp()


# ---- largest remainder -------------------------------------------------------------------------


@given(st.integers(-(10**15), 10**15),
       st.lists(st.integers(0, 10**12), min_size=1, max_size=30).filter(lambda w: sum(w) > 0))
def test_largest_remainder_conserves_and_stays_within_one_unit(total, weights):
    shares = largest_remainder(total, list(enumerate(weights)))
    assert sum(shares.values()) == total
    whole = sum(weights)
    for i, w in enumerate(weights):
        exact = Decimal(total) * w / whole
        assert abs(shares[i] - exact) < 1


def test_largest_remainder_gives_leftovers_to_largest_remainders_then_earlier_keys():
    assert largest_remainder(10, [("a", 1), ("b", 1), ("c", 1)]) == {"a": 4, "b": 3, "c": 3}
    assert largest_remainder(100, [("a", 1), ("b", 2)]) == {"a": 33, "b": 67}
    with pytest.raises(Exception, match="sum to zero"):
        largest_remainder(5, [("a", 0)])


# ---- random usage and cost models --------------------------------------------------------------

money = st.integers(0, 10**10)
shares = st.one_of(st.none(), st.dictionaries(st.sampled_from(WORKLOADS), st.integers(0, 100),
                                              min_size=1).filter(lambda d: sum(d.values()) > 0))


@st.composite
def attempts(draw, n_max: int = 3):
    n = draw(st.integers(0, n_max))
    return tuple(AttemptUsage(i + 1, draw(st.sampled_from(NODES)),
                              draw(st.floats(0, 3e6, allow_nan=False)),
                              draw(st.floats(0, 1e9, allow_nan=False)), "estimated",
                              draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6)))
                 for i in range(n))


@st.composite
def jobs(draw):
    n = draw(st.integers(0, 12))
    out = []
    for i in range(n):
        atts = draw(attempts())
        earned = tuple(NodeEarning(a.node_id, draw(st.sampled_from(["o1", "o2", "plat"])),
                                   draw(money)) for a in atts[:2])
        out.append(JobUsage(
            f"j{i:03d}", draw(st.sampled_from(["c1", "c2", "c3"])),
            draw(st.sampled_from(["m1", "m2"])),
            NOV.start_s + draw(st.floats(0, NOV.seconds - 1, allow_nan=False)),
            draw(st.sampled_from(WORKLOADS)), "done", draw(st.integers(0, 10**6)),
            draw(st.integers(0, 10**6)), draw(money), 0, earned, atts))
    return tuple(out)


@st.composite
def cost_models(draw):
    hardware = []
    for i in range(draw(st.integers(0, 2))):
        price = draw(st.integers(1, 10**11))
        hardware.append(Hardware(
            f"h{i}", price, draw(st.integers(0, price)),
            _ts(draw(st.dates(date(2024, 1, 1), date(2027, 6, 1)))),
            draw(st.integers(3600, 10 * 365 * 86_400)),
            draw(st.one_of(st.none(), st.sampled_from(NODES))),
            draw(st.one_of(st.none(), st.floats(0, 2000, allow_nan=False))), draw(shares)))
    return CostModel(
        energy=EnergyPrice(draw(st.integers(0, 10**6)),
                           Decimal(draw(st.integers(100, 300))) / 100),
        egress=draw(st.one_of(st.just(Egress()), st.builds(
            Egress, st.integers(0, 10**6), st.one_of(st.none(), st.decimals(0, 10**4, places=3)),
            st.integers(0, 10**4)))),
        servers=tuple(Server(f"s{i}", "web", draw(money), draw(st.integers(0, 10**7)),
                             draw(shares))
                      for i in range(draw(st.integers(0, 3)))),
        storage=tuple(Storage(f"d{i}", "ssd", draw(st.decimals(0, 10**5, places=2)),
                              draw(st.integers(0, 10**6)), draw(shares))
                      for i in range(draw(st.integers(0, 2)))),
        hardware=tuple(hardware),
        people=tuple(Person(f"p{i}", draw(st.decimals(0, 500, places=1)), draw(money),
                            draw(shares.filter(lambda s: s is not None)))
                     for i in range(draw(st.integers(0, 3)))),
        platform_owner_ids=frozenset({"plat"}),
    )


@st.composite
def usages(draw):
    js = draw(jobs())
    costs = tuple(LedgerCost(f"cost:{i}", draw(st.sampled_from(["fees", "training", "misc"])),
                             draw(st.booleans()), draw(st.integers(1, 10**10)))
                  for i in range(draw(st.integers(0, 3))))
    corr = tuple(Correction(f"w{i}", f"old{i}", "c1", "m1", "n1",
                            draw(st.sampled_from(["o1", "plat"])), draw(st.integers(1, 10**8)),
                            NOV.start_s + 10)
                 for i in range(draw(st.integers(0, 2))))
    nodes = {n: NodeInfo(n, "o1", n, draw(st.sampled_from(["laptop", "gaming-pc"])),
                         {"power_idle_w": draw(st.floats(0, 500, allow_nan=False))})
             for n in NODES}
    return PeriodUsage(NOV, "USD", js, costs, corr, nodes)


def _half_up(x: Decimal) -> int:
    return int(x.to_integral_value(rounding=ROUND_HALF_UP))


def _expected_non_energy_total(usage: PeriodUsage, model: CostModel) -> int:
    """The period's cost, computed on its own from the cost model and the ledger facts."""
    total = sum(e.amount_micros for j in usage.jobs for e in j.earnings
                if e.owner_id not in model.platform_owner_ids)
    total -= sum(c.amount_micros for c in usage.corrections
                 if c.owner_id not in model.platform_owner_ids)
    total += sum(s.per_month_micros + s.per_hour_micros * 720 for s in model.servers)
    total += sum(_half_up(s.gb * s.price_per_gb_month_micros) for s in model.storage)
    total += sum(_half_up(p.hours * p.rate_per_hour_micros) for p in model.people)
    total += sum(c.amount_micros for c in usage.ledger_costs)
    for h in model.hardware:
        start, end = max(NOV.start_s, h.purchased_s), min(NOV.end_s, h.purchased_s + h.life_s)
        in_service = max(0, int(end - start))
        total += _half_up(Decimal(h.price_micros - h.salvage_micros) * in_service / h.life_s)
    eg = model.egress
    tokens = sum(a.completion_tokens for j in usage.jobs for a in j.attempts)
    gb = eg.gb if eg.gb is not None else Decimal(tokens * eg.bytes_per_token) / 10**9
    return total + _half_up(gb * eg.price_per_gb_micros)


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(usages(), cost_models())
def test_allocation_conserves_the_period_total_exactly(usage, model):
    alloc = allocate(usage, model)
    assert alloc.allocated_micros + alloc.idle_micros + alloc.unallocated_micros \
        == alloc.total_micros
    energy = sum(p.total_micros for p in alloc.pools if p.category == al.ENERGY)
    assert energy >= 0
    assert alloc.total_micros - energy == _expected_non_energy_total(usage, model)
    job_ids = {j.job_id for j in usage.jobs}
    assert all(u[0] in job_ids for u in alloc.units)
    assert all(v >= 0 for c in alloc.units.values() for v in c.values())
    assert set(alloc.idle) <= {al.DEPRECIATION, al.ENERGY}
    per_job = alloc.job_costs()
    assert sum(sum(c.values()) for c in per_job.values()) == alloc.allocated_micros
    report = build_report(usage, model, alloc)  # checks its own identity (invariant)
    assert report.total_cost_micros == alloc.total_micros
    rows = sum(r.cost_micros for r in report.by_customer)
    assert rows == alloc.allocated_micros
    assert sum(r.cost_micros for r in report.by_day) == alloc.allocated_micros
    assert sum(r.cost_micros for r in report.by_node) == alloc.allocated_micros


# ---- edge cases --------------------------------------------------------------------------------


def test_a_month_without_jobs_leaves_every_shared_cost_unallocated():
    model = CostModel(servers=(Server("coord", per_month_micros=100 * D),),
                      people=(Person("ann", Decimal(10), 10 * D, {"inference": 1, "rnd": 1}),))
    alloc = allocate(PeriodUsage(NOV), model)
    assert alloc.allocated_micros == 0 and alloc.idle_micros == 0
    assert alloc.unallocated == {(al.SERVERS, al.BASE): 100 * D,
                                 (al.STAFF, "inference"): 50 * D, (al.STAFF, "rnd"): 50 * D}


def test_a_share_with_no_request_of_its_workload_is_not_spread_over_the_others():
    job = JobUsage("j", "c", "m", NOV.start_s + 5, attempts=(AttemptUsage(1, "n1", 10.0),))
    model = CostModel(people=(Person("ann", Decimal(1), 90 * D, {"inference": 2, "training": 1}),))
    alloc = allocate(PeriodUsage(NOV, jobs=(job,)), model)
    assert alloc.job_costs() == {"j": {al.STAFF: 60 * D}}
    assert alloc.unallocated == {(al.STAFF, "training"): 30 * D}


def test_hardware_outside_its_life_costs_nothing_and_idle_hardware_is_idle():
    old = Hardware("old", 1000 * D, 0, _ts(date(2020, 1, 1)), 365 * 86_400, "n1")
    new = Hardware("new", 720 * D + 100 * D, 100 * D, NOV.start_s, 720 * 3600, "n2",
                   power_idle_w=1000.0)
    model = CostModel(hardware=(old, new), energy=EnergyPrice(100_000, Decimal(1)))
    alloc = allocate(PeriodUsage(NOV), model)
    assert alloc.idle == {al.DEPRECIATION: 720 * D, al.ENERGY: 72 * D}  # 720 kWh x 0.10
    assert alloc.allocated_micros == 0


def test_platform_nodes_earnings_are_internal_and_corrections_reverse_payouts():
    job = JobUsage("j", "c", "m", NOV.start_s + 5, charge_micros=10 * D,
                   earnings=(NodeEarning("n1", "plat", 8 * D), NodeEarning("n2", "o2", 1 * D)),
                   attempts=(AttemptUsage(1, "n1", 1.0), AttemptUsage(2, "n2", 1.0)))
    corr = Correction("job:old:withhold:n2", "old", "c", "m", "n2", "o2", 3 * D, NOV.start_s)
    model = CostModel(platform_owner_ids=frozenset({"plat"}))
    alloc = allocate(PeriodUsage(NOV, jobs=(job,), corrections=(corr,)), model)
    assert alloc.internal_earnings_micros == 8 * D
    assert alloc.job_costs() == {"j": {al.OWNER_PAYOUTS: 1 * D}}
    assert alloc.unallocated == {(al.OWNER_PAYOUTS, al.CORRECTIONS): -3 * D}
    assert alloc.total_micros == -2 * D
    report = build_report(PeriodUsage(NOV, jobs=(job,), corrections=(corr,)), model, alloc)
    assert report.revenue_micros == 7 * D and report.revenue_corrections_micros == -3 * D


def test_refused_inputs():
    with pytest.raises(InvalidRequest, match="workload"):
        allocate(PeriodUsage(NOV, jobs=(JobUsage("j", "c", "m", 0.0, workload="gaming"),)),
                 CostModel())
    with pytest.raises(InvalidRequest, match="ledger in EUR"):
        allocate(PeriodUsage(NOV, "EUR"), CostModel())
    with pytest.raises(InvalidRequest, match="month"):
        Period.month("2026-13")
    assert Period.month("2026-12").end_s == _ts(date(2027, 1, 1))
    assert len(Period.month("2026-02").days()) == 28
