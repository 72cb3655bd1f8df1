"""The FOCUS 1.2 export: its columns and values, checked against the specification's rules; and
the validator catches each broken rule."""

from __future__ import annotations

import csv
import io
import re
from datetime import UTC, datetime

import pytest

from sparecycles.costs import focus
from sparecycles.costs.allocation import (
    AttemptUsage,
    Correction,
    JobUsage,
    NodeEarning,
    Period,
    PeriodUsage,
)
from sparecycles.costs.costmodel import CostModel
from sparecycles.costs.reports import Names

D = 1_000_000
NOV = Period.month("2026-11")


def t(day: int, hour: int = 12) -> float:
    return datetime(2026, 11, day, hour, tzinfo=UTC).timestamp()


def job(jid, client, model, day, charged, refund=0, tokens=(100, 50), key=None, state="done",
        workload="inference"):
    return JobUsage(jid, client, model, t(day), workload, state, tokens[0], tokens[1], charged,
                    refund, (NodeEarning("n1", "o1", charged * 8 // 10),),
                    (AttemptUsage(1, "n1", 1.25, 40.5, "rapl", *tokens),), key)


USAGE = PeriodUsage(NOV, "USD", jobs=(
    job("a", "acme", "small", 3, 3 * D, key="key-1"),
    job("b", "acme", "small", 3, 2 * D, refund=500_000, key="key-1"),
    job("c", "acme", "large", 3, 7 * D, key="key-2"),
    job("d", "beta", "small", 30, 1 * D),
    job("e", "beta", "small", 30, 0, tokens=(80, 0), state="failed"),  # nothing delivered
    job("f", "lab", "small", 4, 0, workload="training"),
), corrections=(Correction("job:z:withhold:n1", "z", "beta", "large", "n1", "o1", 250_000,
                           t(12, 8)),))
NAMES = Names(clients={"acme": "Acme Corp", "beta": "Beta Ltd"},
              api_keys={"key-1": "prod", "key-2": "batch"})


@pytest.fixture(scope="module")
def exported():
    text = focus.to_csv(focus.focus_rows(USAGE, CostModel(), NAMES))
    return text, *focus.read_csv(text)


def test_every_mandatory_column_of_focus_1_2_is_present(exported):
    _, header, _ = exported
    assert set(focus.MANDATORY) <= set(header)
    assert len(focus.MANDATORY) == 21
    for col in ("BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "ChargeCategory",
                "ChargePeriodStart", "ChargePeriodEnd", "BillingPeriodStart", "BillingPeriodEnd",
                "ServiceCategory", "PricingQuantity", "PricingUnit", "BillingAccountId",
                "BillingAccountName", "BillingCurrency", "ChargeClass", "ChargeDescription",
                "InvoiceIssuerName", "ProviderName", "PublisherName", "ServiceName"):
        assert col in focus.MANDATORY
    for col in ("ConsumedQuantity", "ConsumedUnit", "SubAccountId", "SubAccountName"):
        assert col in header
    assert all(c in focus.MANDATORY or c in focus.OPTIONAL or c.startswith("x_") for c in header)


def test_the_export_follows_every_rule(exported):
    _, header, rows = exported
    assert focus.validate(header, rows) == []


def test_rows_group_by_client_key_model_workload_and_day(exported):
    _, _, rows = exported
    usage = [r for r in rows if r["ChargeClass"] is None]
    keyed = {(r["BillingAccountId"], r["SubAccountId"], r["x_Model"], r["x_Workload"],
              r["ChargePeriodStart"]): r for r in usage}
    a = keyed[("acme", "key-1", "small", "inference", "2026-11-03T00:00:00Z")]
    assert a["BilledCost"] == "4.500000"  # 3.00 + 2.00 - 0.50 refunded in the period
    assert a["EffectiveCost"] == a["ListCost"] == a["ContractedCost"] == a["BilledCost"]
    assert (a["PricingQuantity"], a["PricingUnit"]) == ("300", "Tokens")
    assert (a["ConsumedQuantity"], a["ConsumedUnit"]) == ("300", "Tokens")
    assert a["ChargePeriodEnd"] == "2026-11-04T00:00:00Z"
    assert (a["BillingPeriodStart"], a["BillingPeriodEnd"]) == ("2026-11-01T00:00:00Z",
                                                                "2026-12-01T00:00:00Z")
    assert a["BillingAccountName"] == "Acme Corp" and a["SubAccountName"] == "prod"
    assert a["ChargeCategory"] == "Usage" and a["ServiceCategory"] == "AI and Machine Learning"
    assert a["BillingCurrency"] == "USD" and a["ChargeFrequency"] == "Usage-Based"
    assert (a["x_Requests"], a["x_NodeSeconds"], a["x_EnergyJoules"]) == ("2", "2.500000",
                                                                         "81.000")
    b = keyed[("beta", "beta", "small", "inference", "2026-11-30T00:00:00Z")]
    assert b["ChargePeriodEnd"] == "2026-12-01T00:00:00Z"  # the last day ends with the period
    assert b["BilledCost"] == "1.000000"
    assert (b["PricingQuantity"], b["ConsumedQuantity"]) == ("150", "230")  # e was not charged
    assert b["SubAccountName"] == "Beta Ltd" and b["SubAccountType"] == "Client"
    lab = keyed[("lab", "lab", "small", "training", "2026-11-04T00:00:00Z")]
    assert lab["BilledCost"] == "0.000000"
    assert len(usage) == 4


def test_a_refund_of_an_earlier_period_is_a_correction_row(exported):
    _, _, rows = exported
    (c,) = [r for r in rows if r["ChargeClass"] == "Correction"]
    assert c["BilledCost"] == "-0.250000" and c["ChargeCategory"] == "Usage"
    assert c["PricingQuantity"] is None and c["ConsumedQuantity"] is None
    assert c["ChargePeriodStart"] == "2026-11-12T00:00:00Z"
    assert focus.billed_micros(rows) == 3 * D + 1_500_000 + 7 * D + 1 * D - 250_000


def test_csv_shape(exported):
    text, header, rows = exported
    assert text.splitlines()[0].split(",") == list(focus.COLUMNS) == header
    raw = list(csv.reader(io.StringIO(text)))
    assert all(len(r) == len(header) for r in raw)
    assert all(re.fullmatch(r"-?\d+\.\d{6}", r["BilledCost"] or "") for r in rows)


def _broken(mutate) -> list[str]:
    rows = focus.focus_rows(USAGE, CostModel(), NAMES)
    mutate(rows[0])
    header, back = focus.read_csv(focus.to_csv(rows))
    return focus.validate(header, back)


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda r: r.update(BilledCost=None), "BilledCost is null"),
    (lambda r: r.update(BillingAccountId=None), "BillingAccountId is null"),
    (lambda r: r.update(BilledCost="1e3"), "not a FOCUS decimal"),
    (lambda r: r.update(ListCost="+2.00"), "not a FOCUS decimal"),
    (lambda r: r.update(EffectiveCost="1,000.00"), "not a FOCUS decimal"),
    (lambda r: r.update(ChargePeriodStart="2026-11-03 00:00:00"), "not a UTC date/time"),
    (lambda r: r.update(ChargePeriodEnd=r["ChargePeriodStart"]), "is not before ChargePeriodEnd"),
    (lambda r: r.update(BillingPeriodEnd="2026-10-01T00:00:00Z"),
     "BillingPeriodStart is not before BillingPeriodEnd"),
    (lambda r: r.update(ChargePeriodEnd="2026-12-02T00:00:00Z"), "not within the billing"),
    (lambda r: r.update(ChargeCategory="Usage-Based"), "ChargeCategory 'Usage-Based'"),
    (lambda r: r.update(ChargeClass="Refund"), "ChargeClass 'Refund'"),
    (lambda r: r.update(ServiceCategory="AI"), "ServiceCategory 'AI'"),
    (lambda r: r.update(BillingCurrency="usd"), "ISO 4217"),
    (lambda r: r.update(PricingUnit=None), "PricingUnit is null on a Usage row"),
    (lambda r: r.update(ConsumedQuantity="0"), "ConsumedQuantity is not a positive decimal"),
    (lambda r: r.update(ConsumedUnit=None), "ConsumedUnit is null"),
    (lambda r: r.update(ChargeCategory="Tax"), "PricingQuantity is not null on a Tax row"),
    (lambda r: r.update(ChargeCategory="Credit"), "ConsumedQuantity is not null on a row"),
    (lambda r: r.update(ListUnitPrice="1.00"), "ListCost is not ListUnitPrice x Pricing"),
    (lambda r: r.update(EffectiveCost="0.000001"), "EffectiveCost differs"),
    (lambda r: r.update(SubAccountName=None), "SubAccountName and SubAccountId"),
    (lambda r: r.update(InvoiceIssuerName=None), "InvoiceIssuerName is null"),
])
def test_the_validator_catches_each_broken_rule(mutate, message):
    problems = _broken(mutate)
    assert any(message in p for p in problems), problems


def test_the_validator_catches_missing_and_unknown_columns():
    rows = focus.focus_rows(USAGE, CostModel(), NAMES)
    header = [c for c in focus.COLUMNS if c != "ServiceName"] + ["Extra"]
    problems = focus.validate(header, rows)
    assert "missing Mandatory column ServiceName" in problems
    assert any("column Extra is neither" in p for p in problems)


def test_unit_prices_that_multiply_out_are_accepted():
    rows = focus.focus_rows(USAGE, CostModel(), NAMES)
    r = rows[0]
    r["ListUnitPrice"] = "0.015"  # 300 tokens x 0.015 = 4.50
    assert focus.validate(list(focus.COLUMNS), [r]) == []
