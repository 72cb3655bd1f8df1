"""The worked example of docs/costs.md: November 2026, every figure computed by hand.

One platform-owned GPU server (node gpu-1) and one owner's gaming PC (alice-pc); a coordinator
server and a disk of weights; two staff who split their time 70/30 between inference and
training; three paying clients (acme, beta, corp) and the platform's own lab; two models (small,
large). Five usage lines, each one client's month with one model on one node:

====  ======  =====  =========  ========  ======  =========  ==========  ==========  =========
job   client  model  workload   node      busy h  energy     tokens in   tokens out  charged
====  ======  =====  =========  ========  ======  =========  ==========  ==========  =========
J1    acme    small  inference  gpu-1     100     60 kWh     600 M       200 M       6,000.00
J2    beta    large  inference  alice-pc   50     12.5 kWh   150 M        50 M       3,000.00
J3    corp    large  inference  gpu-1     150     90 kWh     900 M       300 M       9,000.00
J4    corp    small  inference  alice-pc   50     12.5 kWh   150 M        50 M       3,000.00
J5    lab     small  training   gpu-1     150     90 kWh     900 M       300 M           0.00
====  ======  =====  =========  ========  ======  =========  ==========  ==========  =========

Owners earn 80 %: alice 2,400.00 for J2 and for J4; gpu-1's earnings (4,800 + 7,200) go to the
platform's own owner account, so they are not a cost. Inference ran 350 busy hours, training 150:
measured shares 70 % / 30 %.
"""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime

import pytest

from sparecycles.costs import allocation as al
from sparecycles.costs.allocation import (
    AttemptUsage,
    JobUsage,
    LedgerCost,
    NodeEarning,
    NodeInfo,
    Period,
    PeriodUsage,
    allocate,
)
from sparecycles.costs.costmodel import parse_cost_model
from sparecycles.costs.reports import build_report

D = 1_000_000  # one dollar in micro-units
H = 3600.0

COST_MODEL = """
currency = "USD"
[platform]
owner_ids = ["own-platform"]
[energy]
price_per_kwh = "0.15"
pue = "1.2"                 # so a kWh at the wall costs 0.18
[egress]
price_per_gb = "0.10"
bytes_per_token = 1000      # 900 M tokens out = 900 GB = 90.00
[[servers]]
name = "coordinator"
role = "coordinator"
per_month = "150.00"
[[storage]]
name = "weights"
tier = "ssd"
gb = 1000
price_per_gb_month = "0.05" # 50.00
[[hardware]]
name = "gpu-server"
node_id = "gpu-1"
price = "30000.00"
salvage = "3000.00"
purchased = 2026-06-01
life_hours = 7500           # (30,000 - 3,000) / 7,500 h = 3.60 an hour
power_idle_w = 100
[[people]]
name = "alice"
hours = 160
rate_per_hour = "50.00"     # 8,000.00
shares = { inference = 70, training = 30 }
[[people]]
name = "bob"
hours = 100
rate_per_hour = "60.00"     # 6,000.00
shares = { inference = 70, training = 30 }
[ledger]
variable_categories = ["payment_fees"]
"""


def t(day: int) -> float:
    return datetime(2026, 11, day, 12, tzinfo=UTC).timestamp()


def job(jid: str, client: str, model: str, workload: str, node: str, busy_h: float,
        power_w: float, tokens_in: int, tokens_out: int, charged: int, owner: str, earned: int,
        day: int) -> JobUsage:
    busy_s = busy_h * H
    return JobUsage(
        jid, client, model, t(day), workload, "done", tokens_in, tokens_out, charged, 0,
        (NodeEarning(node, owner, earned),) if earned else (),
        (AttemptUsage(1, node, busy_s, power_w * busy_s, "nvml" if node == "gpu-1" else "rapl",
                      tokens_in, tokens_out),))


M = 1_000_000
USAGE = PeriodUsage(
    Period.month("2026-11"), "USD",
    jobs=(
        job("J1", "acme", "small", "inference", "gpu-1", 100, 600, 600 * M, 200 * M, 6000 * D,
            "own-platform", 4800 * D, 3),
        job("J2", "beta", "large", "inference", "alice-pc", 50, 250, 150 * M, 50 * M, 3000 * D,
            "own-alice", 2400 * D, 3),
        job("J3", "corp", "large", "inference", "gpu-1", 150, 600, 900 * M, 300 * M, 9000 * D,
            "own-platform", 7200 * D, 17),
        job("J4", "corp", "small", "inference", "alice-pc", 50, 250, 150 * M, 50 * M, 3000 * D,
            "own-alice", 2400 * D, 17),
        job("J5", "lab", "small", "training", "gpu-1", 150, 600, 900 * M, 300 * M, 0,
            "own-platform", 0, 20),
    ),
    ledger_costs=(LedgerCost("cost:fees-2026-11", "payment_fees", True, 630 * D, t(30)),),
    nodes={"gpu-1": NodeInfo("gpu-1", "own-platform", "gpu-1", "datacenter-gpu"),
           "alice-pc": NodeInfo("alice-pc", "own-alice", "alice-pc", "gaming-pc")},
)


@pytest.fixture(scope="module")
def model():
    return parse_cost_model(tomllib.loads(COST_MODEL), "worked example")


@pytest.fixture(scope="module")
def alloc(model):
    return allocate(USAGE, model)


@pytest.fixture(scope="module")
def report(model, alloc):
    return build_report(USAGE, model, alloc)


def test_pools_are_what_the_cost_model_and_the_ledger_say(alloc):
    by = {}
    for p in alloc.pools:
        by[p.category] = by.get(p.category, 0) + p.total_micros
    assert by == {
        al.OWNER_PAYOUTS: 4_800 * D,  # alice's 2 x 2,400; gpu-1's 12,000 is the platform's own
        al.DEPRECIATION: 2_592 * D,  # 720 hours of November x 3.60
        al.ENERGY: 48_960_000,  # (60 + 90 + 90 kWh busy + 100 W x 320 idle h = 32 kWh) x 0.18
        al.SERVERS: 150 * D,
        al.STORAGE: 50 * D,
        al.STAFF: 14_000 * D,  # 160 h x 50 + 100 h x 60
        al.EGRESS: 90 * D,
        "ledger:payment_fees": 630 * D,
    }
    assert alloc.total_micros == 22_360_960_000
    assert alloc.internal_earnings_micros == 12_000 * D


def test_idle_capacity_is_its_own_line(alloc):
    # gpu-1 was busy 100 + 150 + 150 = 400 of November's 720 hours: 320 idle hours
    assert alloc.idle == {al.DEPRECIATION: 1_152 * D, al.ENERGY: 5_760_000}  # 320 x 3.60; 32 kWh
    assert alloc.unallocated == {}
    assert alloc.allocated_micros == 21_203_200_000
    assert alloc.allocated_micros + alloc.idle_micros + alloc.unallocated_micros \
        == alloc.total_micros


def test_each_request_carries_its_costs(alloc):
    costs = alloc.job_costs()
    assert costs["J1"] == {al.DEPRECIATION: 360 * D, al.ENERGY: 10_800_000, al.SERVERS: 30 * D,
                           al.STORAGE: 10 * D, al.STAFF: 2_800 * D, al.EGRESS: 20 * D,
                           "ledger:payment_fees": 180 * D}
    assert costs["J2"] == {al.OWNER_PAYOUTS: 2_400 * D, al.SERVERS: 15 * D, al.STORAGE: 5 * D,
                           al.STAFF: 1_400 * D, al.EGRESS: 5 * D, "ledger:payment_fees": 90 * D}
    assert costs["J3"] == {al.DEPRECIATION: 540 * D, al.ENERGY: 16_200_000, al.SERVERS: 45 * D,
                           al.STORAGE: 15 * D, al.STAFF: 4_200 * D, al.EGRESS: 30 * D,
                           "ledger:payment_fees": 270 * D}
    assert costs["J4"] == costs["J2"]
    # training: 30 % of the server, the disk and the staff (by measured time and by the shares)
    assert costs["J5"] == {al.DEPRECIATION: 540 * D, al.ENERGY: 16_200_000, al.SERVERS: 45 * D,
                           al.STORAGE: 15 * D, al.STAFF: 4_200 * D, al.EGRESS: 30 * D}
    totals = {j: sum(c.values()) for j, c in costs.items()}
    assert totals == {"J1": 3_410_800_000, "J2": 3_915 * D, "J3": 5_116_200_000,
                      "J4": 3_915 * D, "J5": 4_846_200_000}


def test_profit_and_loss(report):
    assert report.revenue_micros == 21_000 * D
    assert dict(report.totals.cogs_micros) == {
        al.OWNER_PAYOUTS: 4_800 * D, al.DEPRECIATION: 900 * D, al.ENERGY: 27 * D,
        al.SERVERS: 105 * D, al.STORAGE: 35 * D, al.STAFF: 9_800 * D, al.EGRESS: 60 * D,
        "ledger:payment_fees": 630 * D}
    assert report.totals.cogs_total_micros == 16_357 * D
    assert report.gross_margin_micros == 4_643 * D  # 22.11 %
    assert report.totals.gross_margin_pct == 22.11
    assert report.opex_allocated_micros["training"] == 4_846_200_000
    assert report.idle_total_micros == 1_157_760_000
    assert report.total_cost_micros == 22_360_960_000
    assert report.operating_result_micros == -1_360_960_000


def test_per_customer_margins(report):
    c = {r.key: r for r in report.by_customer}
    assert (c["acme"].revenue_micros, c["acme"].cogs_total_micros) == (6_000 * D, 3_410_800_000)
    assert c["acme"].gross_margin_micros == 2_589_200_000
    assert c["acme"].gross_margin_pct == 43.15
    assert c["acme"].contribution_margin_micros == 5_789_200_000  # less energy, egress, fees
    assert c["beta"].gross_margin_micros == -915 * D
    assert c["beta"].gross_margin_pct == -30.5
    assert c["beta"].contribution_margin_micros == 505 * D  # 3,000 - 2,400 - 5 - 90
    assert c["corp"].cogs_total_micros == 9_031_200_000
    assert c["corp"].gross_margin_micros == 2_968_800_000
    assert c["corp"].contribution_margin_micros == 9_188_800_000
    assert (c["lab"].revenue_micros, c["lab"].cogs_total_micros) == (0, 0)
    assert c["lab"].opex_micros == 4_846_200_000


def test_per_model_and_day(report):
    m = {r.key: r for r in report.by_model}
    assert (m["small"].revenue_micros, m["small"].cogs_total_micros) == (9_000 * D, 7_325_800_000)
    assert m["small"].opex_micros == 4_846_200_000
    assert (m["large"].revenue_micros, m["large"].cogs_total_micros) == (12_000 * D, 9_031_200_000)
    d = {r.key: r for r in report.by_day}
    assert d["2026-11-03"].cogs_total_micros == 7_325_800_000
    assert d["2026-11-17"].cogs_total_micros == 9_031_200_000
    assert d["2026-11-20"].opex_micros == 4_846_200_000


def test_cost_per_million_tokens(report):
    m = {r.key: r.cogs_per_mtok_micros for r in report.by_model}
    assert m == {"small": 7_325_800, "large": 6_450_857}  # 7,325.80 / 1,000; 9,031.20 / 1,400
    c = {r.key: r.cogs_per_mtok_micros for r in report.by_device_class}
    assert c == {"datacenter-gpu": 4_263_500, "gaming-pc": 19_575_000}  # 8,527 / 2,000; 7,830 / 400


def test_fixed_base_and_break_even(report):
    assert report.variable_inference_cogs_micros == 5_517 * D  # 4,800 + 27 + 60 + 630
    assert report.fixed_base_micros == {
        "training_micros": 4_846_200_000,
        "rnd_micros": 0,
        "base_infrastructure_micros": 11_997_760_000,  # 16,357 - 5,517 + 1,157.76 idle
    }
    assert report.fixed_base_total_micros == 16_843_960_000
    # a token of inference contributes (21,000 - 5,517) / 2,400 M = 6.45125 per million
    assert report.contribution_per_mtok_micros == 6_451_250
    # 16,843.96 / 15,483 x 2,400 M = 2,610,960,666.54 tokens: rounded up
    assert report.break_even_tokens_per_month == -(
        -16_843_960_000 * 2_400_000_000 // 15_483_000_000) == 2_610_960_667


def test_owner_economics(report):
    alice = next(o for o in report.owners if o.node_id == "alice-pc")
    assert alice.earned_micros == 4_800 * D
    assert alice.electricity_micros == 5 * D  # 25 kWh at the default 0.20
    assert alice.wear_micros == 5 * D  # 100 busy h x 1,500 / 30,000 h
    assert alice.net_micros == 4_790 * D
    assert alice.net_per_busy_hour_micros == 47_900_000
    assert alice.figures_from == "defaults"
