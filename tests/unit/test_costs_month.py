"""The month view (costs/month.py) and the cost model's effective dates: a month in progress
reads as unit economics on variable cost with fixed costs budgeted against accrued; a later rate
never changes an earlier month; every table reads at 80 columns."""

from __future__ import annotations

import re
import tomllib
from datetime import UTC, datetime

import pytest
from rich.console import Console

from sparecycles.cli.costs import print_month
from sparecycles.costs.allocation import (
    AttemptUsage,
    JobUsage,
    NodeEarning,
    Period,
    PeriodUsage,
    allocate,
)
from sparecycles.costs.costmodel import parse_cost_model
from sparecycles.costs.month import month_view, sig
from sparecycles.costs.reports import build_report
from sparecycles.errors import InvalidRequest

D = 1_000_000
NOV = Period.month("2026-11")
DEC = Period.month("2026-12")


def ts(month: int, day: int, hour: int = 12) -> float:
    return datetime(2026, month, day, hour, tzinfo=UTC).timestamp()


DATED = """
[[energy]]
from = 2026-01-01
price_per_kwh = "0.15"
[[energy]]
from = 2026-12-01
price_per_kwh = "0.45"
[[servers]]
name = "coordinator"
from = 2026-01-01
per_month = "150.00"
[[servers]]
name = "coordinator"
from = 2026-12-01
per_month = "450.00"
[[people]]
name = "alice"
from = 2026-10-01
until = 2026-12-01
hours = 10
rate_per_hour = "50.00"
shares = { inference = 1 }
[[hardware]]
name = "gpu-box"
node_id = "n1"
from = 2026-01-01
price = "7200.00"
purchased = 2026-01-01
life_hours = 7200
power_idle_w = 0
"""


def usage(period: Period, day: float) -> PeriodUsage:
    t = period.start_s + day * 86_400
    jobs = (JobUsage("j1", "acme", "small-model-with-a-long-name", t, "inference", "done",
                     400_000, 100_000, 30 * D, 0, (NodeEarning("n2", "o2", 20 * D),),
                     (AttemptUsage(1, "n2", 3600.0, 360_000.0, "estimated", 400_000, 100_000),)),
            JobUsage("j2", "beta", "large", t, "inference", "done", 100_000, 50_000, 12 * D, 0,
                     (), (AttemptUsage(1, "n1", 1800.0, 1_800_000.0, "nvml", 100_000,
                                       50_000),)))
    return PeriodUsage(period, "USD", jobs)


def test_a_rate_dated_later_leaves_earlier_months_as_they_were():
    dated = parse_cost_model(tomllib.loads(DATED))
    first_only = parse_cost_model(tomllib.loads(DATED.split("[[energy]]\nfrom = 2026-12")[0]
                                                + DATED.split('per_kwh = "0.45"')[1]
                                                .replace('name = "coordinator"\nfrom = '
                                                         '2026-12-01\nper_month = "450.00"',
                                                         'name = "other"\nfrom = 2027-01-01\n'
                                                         'per_month = "1.00"')))
    nov = allocate(usage(NOV, 3), dated)
    assert nov.pools == allocate(usage(NOV, 3), first_only).pools
    pools = {p.name: p.total_micros for p in nov.pools}
    assert pools["server:coordinator"] == 150 * D and pools["person:alice"] == 500 * D
    # gpu-box: 0.5 h busy x 1.8 kWh... energy at 0.15 in November
    assert pools["energy:gpu-box"] == round(1.8 / 3.6 * 0.15 * D)
    dec = {p.name: p.total_micros for p in allocate(usage(DEC, 3), dated).pools}
    assert dec["server:coordinator"] == 450 * D and "person:alice" not in dec
    assert dec["energy:gpu-box"] == round(1.8 / 3.6 * 0.45 * D)


@pytest.mark.parametrize(("toml", "message"), [
    ('[[servers]]\nname = "a"\nfrom = 2026-11-15\nper_month = "1"', "first day of a month"),
    ('[[servers]]\nname = "a"\nfrom = 2026-11-01\nuntil = 2026-11-01\nper_month = "1"',
     "until is not after from"),
    ('[[servers]]\nname = "a"\nper_month = "1"\n[[servers]]\nname = "a"\nper_month = "2"',
     "two versions from the same month"),
    ('[[servers]]\nname = "a"\nfrom = 2026-01-01\nuntil = 2026-12-01\nper_month = "1"\n'
     '[[servers]]\nname = "a"\nfrom = 2026-11-01\nper_month = "2"', "in effect at once"),
    ('[[energy]]\nfrom = 2026-01-01\n[[energy]]\nfrom = 2026-01-01', "same month"),
])
def test_effective_dates_are_checked(toml, message):
    with pytest.raises(InvalidRequest, match=message):
        parse_cost_model(tomllib.loads(toml))


def test_the_shipped_example_dates_every_rate():
    from sparecycles.costs.costmodel import SHIPPED_EXAMPLE

    doc = tomllib.loads(SHIPPED_EXAMPLE.read_text())
    for kind in ("servers", "storage", "hardware", "people", "energy", "egress", "ledger"):
        entries = doc[kind] if isinstance(doc[kind], list) else [doc[kind]]
        assert all("from" in e for e in entries), kind


@pytest.fixture(scope="module")
def in_progress():
    """The demo's situation: day 5 of November, two requests, a whole month of fixed costs."""
    model = parse_cost_model(tomllib.loads(DATED))
    u = usage(NOV, 3)
    report = build_report(u, model, allocate(u, model))
    return report, month_view(report, NOV.start_s, NOV.end_s, ts(11, 6, 0))


def test_unit_economics_use_variable_cost_only(in_progress):
    report, m = in_progress
    u = m["unit"]
    assert m["status"] == "in progress" and m["elapsed_ppm"] == 166_666  # 5 of 30 days
    assert u["price"]["total_micros"] == 42 * D
    assert u["price"]["per_request_micros"] == 21 * D
    assert u["price"]["per_mtok_micros"] == round(42 * D * 1_000_000 / 650_000)
    lines = {x["line"]: x["total_micros"] for x in u["variable_lines"]}
    assert lines["owner payouts"] == 20 * D and lines["energy"] == 75_000
    assert u["variable"]["total_micros"] == 20 * D + 75_000 == \
        report.variable_inference_cogs_micros
    assert u["contribution"]["total_micros"] == 42 * D - 20 * D - 75_000
    assert u["energy"]["label"] == "83.3% measured"  # 1.8 MJ of nvml, 0.36 MJ estimated
    assert u["energy"]["share_of_variable_pct"] == 0.4


def test_fixed_costs_budgeted_against_accrued(in_progress):
    report, m = in_progress
    f = m["fixed"]
    budget = {x["line"]: x["budget_micros"] for x in f["base_lines"]}
    assert budget["servers"] == 150 * D and budget["staff"] == 500 * D
    assert f["base_budget_micros"] == report.fixed_base_micros["base_infrastructure_micros"]
    assert f["accrued_micros"] == f["budget_micros"] * 166_666 // 1_000_000
    rr = m["run_rate"]
    assert rr["revenue_micros"] == round(42 * D / 0.166666)
    assert rr["result_micros"] == rr["contribution_micros"] - f["budget_micros"]
    be = m["break_even"]["tokens_per_month"]
    contribution = 42 * D - 20 * D - 75_000
    assert be == -(-f["budget_micros"] * 650_000 // contribution)
    loaded = m["fully_loaded_per_mtok_micros"]
    # at break-even a token's full cost is its price (no training or R&D here)
    assert abs(loaded["at_break_even"] - m["unit"]["price"]["per_mtok_micros"]) <= 2
    assert loaded["at_run_rate"] > loaded["at_break_even"]
    assert m["absorbed"] is None  # shown for closed months only


def test_a_month_that_ended_shows_absorbed_cogs_labelled():
    model = parse_cost_model(tomllib.loads(DATED))
    u = usage(NOV, 3)
    report = build_report(u, model, allocate(u, model))
    m = month_view(report, NOV.start_s, NOV.end_s, ts(12, 2), closed=True)
    assert m["status"] == "closed" and m["elapsed_ppm"] == 1_000_000
    a = m["absorbed"]
    assert a["per_request_micros"] == report.totals.cogs_total_micros // 2
    assert "absorbed at that month's volume (2 requests" in a["label"]


def test_a_ratio_over_a_tiny_revenue_says_n_a():
    model = parse_cost_model(tomllib.loads(DATED))
    tiny = PeriodUsage(NOV, "USD", (JobUsage(
        "j", "a", "m", ts(11, 2), "inference", "done", 10, 20, 5, 0,
        (NodeEarning("n2", "o", 4),), (AttemptUsage(1, "n2", 1.0, 1.0, "estimated", 10, 20),)),))
    report = build_report(tiny, model, allocate(tiny, model))
    m = month_view(report, NOV.start_s, NOV.end_s, ts(11, 3))
    assert m["unit"]["contribution_margin_pct"] is None
    console = Console(width=80, record=True)
    print_month({"period": "2026-11", "currency": "USD", "month": m}, console)
    text = console.export_text()
    assert "n/a" in text and "999" not in text


def test_the_month_reads_at_80_columns(in_progress):
    _, m = in_progress
    console = Console(width=80, record=True)
    print_month({"period": "2026-11", "currency": "USD", "month": m}, console)
    text = console.export_text()
    assert all(len(line) <= 80 for line in text.splitlines())
    for name in ("small-model-with-a-long-name", "large"):
        assert re.search(rf"│ {re.escape(name)} +│", text), text
    numbers = [sig(m["unit"]["price"]["per_mtok_micros"]),
               sig(m["unit"]["contribution"]["per_request_micros"]),
               sig(m["fixed"]["budget_micros"]), sig(m["fixed"]["accrued_micros"]),
               sig(m["run_rate"]["result_micros"]),
               sig(m["fully_loaded_per_mtok_micros"]["at_run_rate"])]
    for n in numbers:
        assert re.search(rf"[ │]{re.escape(n)} +│|[ │]{re.escape(n)}$|│ +{re.escape(n)} │",
                         text, re.M), (n, text)
    assert "…" not in text  # nothing cut


def test_worked_example_month_view_agrees_with_the_report():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "worked_example", Path(__file__).with_name("test_costs_worked_example.py"))
    assert spec and spec.loader
    wx = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(wx)
    model = parse_cost_model(tomllib.loads(wx.COST_MODEL))
    report = build_report(wx.USAGE, model, allocate(wx.USAGE, model))
    m = month_view(report, NOV.start_s, NOV.end_s, NOV.end_s)
    assert m["unit"]["variable"]["total_micros"] == 5_517 * D
    assert m["fixed"]["budget_micros"] == report.fixed_base_total_micros == 16_843_960_000
    assert m["break_even"]["tokens_per_month"] == report.break_even_tokens_per_month


@pytest.mark.parametrize(("micros", "text"), [
    (1_234_567_890, "1,235"), (123_456_789, "123.5"), (12_345_678, "12.35"),
    (1_234, "0.001234"), (1, "0.000001"), (-98_765_432, "-98.77"), (0, "0"), (None, "-")])
def test_amounts_to_significant_figures(micros, text):
    assert sig(micros) == text
