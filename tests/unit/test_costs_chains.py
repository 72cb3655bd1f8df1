"""COGS per stage: a request served by a chain, every figure computed by hand.

November 2026 (720 hours). A model of 32 layers served two ways:

- C1 (acme), a chain: alice-pc layers 0:8 (a quarter of each token's work), the platform's gpu-1
  layers 8:24 (a half), bob-pc layers 24:32 (a quarter); 60 M tokens in, 20 M out, charged
  8,000.00. Busy 10 h, 20 h and 10 h; gpu-1 drew 500 W (10 kWh).
- W1 (beta), whole on gpu-1: 40 M in, 10 M out, charged 4,000.00, busy 40 h at 500 W (20 kWh).

The cost model: gpu-1's server costs 1.00 an hour of its life (7,200.00 over 7,200 h), energy
0.20 a kWh, egress 0.10 a GB at 10,000 bytes a token.
"""

from __future__ import annotations

import tomllib
from datetime import UTC, datetime

from sparecycles.costs import allocation as al
from sparecycles.costs.allocation import (
    AttemptUsage,
    JobUsage,
    NodeEarning,
    NodeInfo,
    Period,
    PeriodUsage,
    allocate,
)
from sparecycles.costs.costmodel import parse_cost_model
from sparecycles.costs.reports import build_report
from sparecycles.ledger.pricing import ModelPrice, PayoutTerms, WorkShare, split_charge
from sparecycles.scheduling.chains import stage_work_ppm
from sparecycles.scheduling.presets import MODEL_PRESETS

D = 1_000_000  # one dollar in micro-units
H = 3600.0
M = 1_000_000
MODEL = MODEL_PRESETS["llama-3-8b-q4"]  # 32 layers
PRICE = ModelPrice(10 * D, 10 * D)  # 10.00 per million tokens in and out

COST_MODEL = """
currency = "USD"
[platform]
owner_ids = ["own-platform"]
[energy]
price_per_kwh = "0.20"
pue = "1.0"
[egress]
price_per_gb = "0.10"
bytes_per_token = 10000
[[hardware]]
name = "gpu-server"
node_id = "gpu-1"
price = "7200.00"
salvage = "0"
purchased = 2026-06-01
life_hours = 7200
power_idle_w = 0
"""

STAGES = (("alice-pc", "own-alice", 0, 8, 10), ("gpu-1", "own-platform", 8, 24, 20),
          ("bob-pc", "own-bob", 24, 32, 10))


def t(day: int) -> float:
    return datetime(2026, 11, day, 12, tzinfo=UTC).timestamp()


def chain_earnings() -> tuple[NodeEarning, ...]:
    """What the ledger paid each stage's owner: its split of the charge (ledger/pricing)."""
    split = split_charge(8_000 * D, PRICE, PayoutTerms(), [
        WorkShare(owner, node, "pc", 60 * M, 20 * M,
                  work_ppm=stage_work_ppm(MODEL, first, end))
        for node, owner, first, end, _ in STAGES])
    return tuple(NodeEarning(e.node_id, e.owner_id, e.amount_micros) for e in split.earnings)


def usage() -> PeriodUsage:
    stages = tuple(
        AttemptUsage(i + 1, node, busy_h * H, (500 * busy_h * H if node == "gpu-1" else 0.0),
                     "estimated", 60 * M, 20 * M, layers=(first, end),
                     work_ppm=stage_work_ppm(MODEL, first, end))
        for i, (node, _owner, first, end, busy_h) in enumerate(STAGES))
    return PeriodUsage(
        Period.month("2026-11"), "USD",
        jobs=(
            JobUsage("C1", "acme", MODEL.name, t(5), "inference", "done", 60 * M, 20 * M,
                     8_000 * D, 0, chain_earnings(), stages, price=PRICE),
            JobUsage("W1", "beta", MODEL.name, t(6), "inference", "done", 40 * M, 10 * M,
                     4_000 * D, 0, (NodeEarning("gpu-1", "own-platform", 3_200 * D),),
                     (AttemptUsage(1, "gpu-1", 40 * H, 500 * 40 * H, "nvml", 40 * M, 10 * M),),
                     price=PRICE),
        ),
        nodes={"gpu-1": NodeInfo("gpu-1", "own-platform", "gpu-1", "datacenter-gpu"),
               "alice-pc": NodeInfo("alice-pc", "own-alice", "alice-pc", "gaming-pc"),
               "bob-pc": NodeInfo("bob-pc", "own-bob", "bob-pc", "gaming-pc")})


def test_the_ledger_pays_each_stage_its_share_of_the_work() -> None:
    # owners' part: 80 % of 8,000.00 = 6,400.00, by a quarter, a half and a quarter
    assert {e.node_id: e.amount_micros for e in chain_earnings()} == {
        "alice-pc": 1_600 * D, "gpu-1": 3_200 * D, "bob-pc": 1_600 * D}


def test_a_chain_request_costs_the_sum_of_its_stages() -> None:
    model = parse_cost_model(tomllib.loads(COST_MODEL), "chains")
    u = usage()
    alloc = allocate(u, model)
    # egress: 20 M + 10 M tokens sent = 300 GB = 30.00 (a chain's tokens counted once, not
    # once per stage), split by each stage's share of each token: 5.00, 10.00, 5.00; W1 10.00
    by_unit = {u_[2] if u_[0] == "C1" else "W1": cats for u_, cats in alloc.units.items()}
    assert by_unit == {
        # alice's and bob's earnings are a cost; gpu-1's is the platform's own (not a cost), but
        # its depreciation (20 busy hours x 1.00) and energy (10 kWh x 0.20) land on its stage
        "alice-pc": {al.OWNER_PAYOUTS: 1_600 * D, al.EGRESS: 5 * D},
        "gpu-1": {al.DEPRECIATION: 20 * D, al.ENERGY: 2 * D, al.EGRESS: 10 * D},
        "bob-pc": {al.OWNER_PAYOUTS: 1_600 * D, al.EGRESS: 5 * D},
        "W1": {al.DEPRECIATION: 40 * D, al.ENERGY: 4 * D, al.EGRESS: 10 * D},
    }
    assert alloc.idle == {al.DEPRECIATION: 660 * D}  # 720 - 60 busy hours of gpu-1
    report = build_report(u, model, alloc)
    rows = {r.key: r for r in report.requests}
    c1 = rows["C1"]
    assert c1.cogs_total_micros == 3_242 * D  # 3,200 + 20 + 2 + 20
    assert c1.gross_margin_micros == 4_758 * D
    assert [(s.node_id, s.layers, s.work_ppm, s.cogs_total_micros, s.earning_micros)
            for s in c1.stages] == [("alice-pc", (0, 8), 250_000, 1_605 * D, 1_600 * D),
                                    ("gpu-1", (8, 24), 500_000, 32 * D, 0),
                                    ("bob-pc", (24, 32), 250_000, 1_605 * D, 1_600 * D)]
    assert sum(s.cogs_total_micros for s in c1.stages) == c1.cogs_total_micros
    assert rows["W1"].cogs_total_micros == 54 * D and not rows["W1"].stages
    # per node: gpu-1 ran a stage and a whole job; its tokens count for its part of the work
    nodes = {r.key: r for r in report.by_node}
    assert (nodes["gpu-1"].requests, nodes["gpu-1"].stage_attempts) == (2, 1)
    assert nodes["gpu-1"].cogs_total_micros == 86 * D
    assert nodes["gpu-1"].inference_tokens == 80 * M // 2 + 50 * M
    assert nodes["alice-pc"].inference_tokens == 20 * M
    # the whole report: a chain's tokens are inference tokens once, not once per stage
    assert report.inference_tokens == 130 * M
    assert report.totals.cogs_total_micros == 3_296 * D
    out = report.as_dict()
    c1_out = next(r for r in out["requests"] if r["key"] == "C1")
    assert [s["layers"] for s in c1_out["stages"]] == [[0, 8], [8, 24], [24, 32]]
    assert "stages" not in next(r for r in out["requests"] if r["key"] == "W1")
