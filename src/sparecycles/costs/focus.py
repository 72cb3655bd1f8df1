"""The FinOps FOCUS 1.2 export of what clients were billed, and a validator of its rules. Pure.

sparecycles is the *provider*: each client is a billing account, each API key a sub-account. A
model's input tokens and output tokens are priced differently, so each is its own SKU (``SkuId`` =
``SkuPriceId`` = ``<model>/input-tokens`` or ``<model>/output-tokens``; ``SkuMeter`` says which)
with a list price per million tokens (``PricingUnit`` = ``1000000 Tokens``). One ``Usage`` row per
(client, API key, model, workload, UTC day, SKU, list unit price): ``PricingQuantity`` is the
charged requests' tokens in millions, so ``ListUnitPrice x PricingQuantity = ListCost`` holds
exactly on every row; ``BilledCost`` is what the ledger charged for those tokens (each request's
charge split between its input and output tokens in proportion to their list amounts, largest
remainder), less refunds made in the period. A refund of a request charged in an earlier billing
period is a ``Correction`` row on the day it was made. There is no negotiated pricing, so
``ContractedUnitPrice`` is absent and ``ContractedCost`` equals ``ListCost``.

Columns: every Mandatory column of FOCUS 1.2 (``MANDATORY``), the Conditional/Recommended
columns that apply to a provider that publishes unit prices, a price list and SKUs
(``OPTIONAL``), and custom ``x_`` columns (``CUSTOM``) that carry the metering the reconciliation
checks (requests, node-seconds, energy: on the row of the request's input tokens, or of its
output tokens when it had no input). ``validate`` checks the rules listed in ``RULES``
(docs/costs.md repeats them with the spec's wording).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import IO

from sparecycles.costs.allocation import largest_remainder
from sparecycles.costs.costmodel import CostModel
from sparecycles.costs.reports import Names
from sparecycles.costs.usage import JobUsage, PeriodUsage
from sparecycles.ledger.pricing import ModelPrice

FOCUS_VERSION = "1.2"
MANDATORY: tuple[str, ...] = (
    "BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency",
    "BillingPeriodEnd", "BillingPeriodStart", "ChargeCategory", "ChargeClass",
    "ChargeDescription", "ChargePeriodEnd", "ChargePeriodStart", "ContractedCost",
    "EffectiveCost", "InvoiceIssuerName", "ListCost", "PricingQuantity", "PricingUnit",
    "ProviderName", "PublisherName", "ServiceCategory", "ServiceName",
)
# Conditional columns whose condition holds for sparecycles: it publishes unit prices exclusive
# of discounts (ListUnitPrice), a price list (SkuPriceId, SkuPriceDetails) and SKUs (SkuId, hence
# SkuMeter). ContractedUnitPrice's condition (negotiated pricing) does not hold: it is absent.
CONDITIONAL_APPLICABLE: tuple[str, ...] = (
    "ListUnitPrice", "SkuId", "SkuMeter", "SkuPriceDetails", "SkuPriceId",
)
OPTIONAL: tuple[str, ...] = (
    "BillingAccountType", "ChargeFrequency", "ConsumedQuantity", "ConsumedUnit",
    "ListUnitPrice", "PricingCategory", "ServiceSubcategory", "SkuId", "SkuMeter",
    "SkuPriceDetails", "SkuPriceId", "SubAccountId", "SubAccountName", "SubAccountType",
)
FOCUS_COLUMNS = frozenset(MANDATORY) | frozenset(OPTIONAL) | {"ContractedUnitPrice"}
CUSTOM: tuple[str, ...] = (
    "x_Model", "x_Workload", "x_Requests", "x_NodeSeconds", "x_EnergyJoules", "x_EnergySources",
)
COLUMNS = MANDATORY + OPTIONAL + CUSTOM
NOT_NULL = frozenset(MANDATORY) - {"ChargeClass", "PricingQuantity", "PricingUnit"}
# Not null on Usage/Purchase rows that are not corrections, null on Tax rows (each column's
# "nullability" paragraph in the spec says exactly this).
PRICED = ("PricingQuantity", "PricingUnit", "ListUnitPrice", "ContractedUnitPrice", "SkuId",
          "SkuPriceId")
DECIMALS = ("BilledCost", "ContractedCost", "EffectiveCost", "ListCost", "PricingQuantity",
            "ConsumedQuantity", "ContractedUnitPrice", "ListUnitPrice")
NON_NEGATIVE = ("ListUnitPrice", "ContractedUnitPrice")
DATETIMES = ("BillingPeriodStart", "BillingPeriodEnd", "ChargePeriodStart", "ChargePeriodEnd")
ALLOWED: dict[str, frozenset[str]] = {
    "ChargeCategory": frozenset({"Usage", "Purchase", "Tax", "Credit", "Adjustment"}),
    "ChargeClass": frozenset({"Correction"}),
    "ChargeFrequency": frozenset({"One-Time", "Recurring", "Usage-Based"}),
    "PricingCategory": frozenset({"Standard", "Dynamic", "Committed", "Other"}),
    "ServiceCategory": frozenset({
        "AI and Machine Learning", "Analytics", "Business Applications", "Compute",
        "Databases", "Developer Tools", "Multicloud", "Identity", "Integration",
        "Internet of Things", "Management and Governance", "Media", "Migration", "Mobile",
        "Networking", "Security", "Storage", "Web", "Other"}),
}
RULES: tuple[str, ...] = (
    "every Mandatory column is present, and every Conditional column whose condition holds for "
    "a provider that publishes unit prices, a price list and SKUs (ListUnitPrice, SkuId, "
    "SkuMeter, SkuPriceId, SkuPriceDetails); other columns are FOCUS columns or start with x_",
    "BilledCost, EffectiveCost, ListCost, ContractedCost, the Billing*/Charge* period columns, "
    "BillingAccountId/Name, BillingCurrency, ChargeCategory, ChargeDescription, "
    "InvoiceIssuerName, ProviderName, PublisherName, ServiceCategory, ServiceName: not null",
    "decimals follow NumericFormat: digits, one optional '.', a leading '-' only for negatives; "
    "no '+', exponent, comma, unit or currency symbol; unit prices are not negative",
    "date/times follow DateTimeFormat: UTC 'YYYY-MM-DDTHH:mm:ssZ'",
    "ChargePeriodStart < ChargePeriodEnd and BillingPeriodStart < BillingPeriodEnd; the charge "
    "period lies within the billing period",
    "ChargeCategory, ChargeClass, ChargeFrequency, PricingCategory, ServiceCategory: allowed "
    "values only; ChargeClass is null or 'Correction'",
    "BillingCurrency is an ISO 4217 code (three capital letters)",
    "PricingQuantity, PricingUnit, ListUnitPrice, ContractedUnitPrice, SkuId, SkuPriceId: not "
    "null on Usage/Purchase rows that are not corrections; null on Tax rows",
    "ConsumedQuantity: a positive decimal on Usage rows that are not corrections, null on rows "
    "that are not Usage; ConsumedUnit is not null when ConsumedQuantity is not",
    "ListCost = ListUnitPrice x PricingQuantity and ContractedCost = ContractedUnitPrice x "
    "PricingQuantity, exactly, when the unit price is not null and the row is not a "
    "correction; without a ContractedUnitPrice column (no negotiated pricing) ContractedCost "
    "equals ListCost",
    "EffectiveCost equals BilledCost (no commitment discounts or prepaid amortisation here)",
    "SubAccountName is null exactly when SubAccountId is null",
    "PricingUnit and ConsumedUnit follow UnitFormat: an optional positive integer quantity and "
    "capitalised plural units ('1000000 Tokens', 'Tokens', 'GB-Hours')",
    "SkuMeter is null when SkuId is null and not null when it is not; SkuPriceDetails is null "
    "when SkuPriceId is, and otherwise a JSON object (KeyValueFormat) whose keys do not start "
    "with 'F_' unless FOCUS defines them",
)
_decimal = re.compile(r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?$")
_datetime = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")
_currency = re.compile(r"^[A-Z]{3}$")
_unit = re.compile(r"^([1-9][0-9]* )?[A-Z][A-Za-z]*([-/][A-Z0-9][A-Za-z0-9 ]*)?$")
FOCUS_SKU_PRICE_KEYS = frozenset({
    "F_Bandwidth", "F_CoreCount", "F_DiskSpace", "F_DiskType", "F_GpuCount", "F_InputOutput",
    "F_InstanceType", "F_MemorySize", "F_OperatingSystem", "F_Redundancy", "F_Series",
    "F_SizeClass", "F_StorageClass"})
TOKENS_PER_PRICING_UNIT = 1_000_000  # prices are per million tokens (ledger/pricing.py)
PRICING_UNIT = f"{TOKENS_PER_PRICING_UNIT} Tokens"
INPUT, OUTPUT = "input", "output"
METERS = {INPUT: "Input Tokens", OUTPUT: "Output Tokens"}

Row = dict[str, str | None]


def money(micros: int) -> str:
    """Integer micro-units as an exact FOCUS decimal: ``-1_500_000`` -> ``"-1.500000"``."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


def decimal_text(value: Decimal) -> str:
    """An exact Decimal in NumericFormat: no exponent, no trailing zeros past the point."""
    text = format(value, "f")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def timestamp(t_s: float) -> str:
    return dt.datetime.fromtimestamp(t_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def sku_id(model: str, part: str) -> str:
    return f"{model}/{part}-tokens"


@dataclass(slots=True)
class _Group:
    billed_micros: int = 0
    priced_tokens: int = 0
    tokens: int = 0
    requests: int = 0
    busy_us: int = 0
    energy_mj: int = 0
    sources: set[str] = field(default_factory=set)


def _price_of(job: JobUsage, usage: PeriodUsage) -> ModelPrice:
    """The list price a request was admitted at (its hold), else the model's price now, else
    zero (a request nobody priced: an internal one)."""
    return job.price or usage.list_prices.get(job.model) or ModelPrice(0, 0)


def split_charge(job: JobUsage, price: ModelPrice) -> dict[str, int]:
    """The request's revenue (charge less refunds) split between its input and output tokens in
    proportion to their list amounts, exactly (largest remainder; ties to input)."""
    exact = [(INPUT, job.prompt_tokens * price.input_micros_per_mtok),
             (OUTPUT, job.completion_tokens * price.output_micros_per_mtok)]
    if sum(w for _, w in exact) == 0:
        exact = [(INPUT, job.prompt_tokens), (OUTPUT, job.completion_tokens)]
    if sum(w for _, w in exact) == 0:
        return {INPUT: 0, OUTPUT: job.revenue_micros}
    return largest_remainder(job.revenue_micros, exact)


def focus_rows(usage: PeriodUsage, model: CostModel, names: Names | None = None) -> list[Row]:
    """The period's FOCUS rows, in a stable order."""
    names = names or Names()
    p = usage.period
    Key = tuple[str, str, str, str, str, str, int]
    groups: dict[Key, _Group] = defaultdict(_Group)
    for job in usage.jobs:
        price = _price_of(job, usage)
        split = split_charge(job, price)
        head = (job.client_id, job.api_key_id or "", job.model, job.workload, p.day(job.at_s))
        parts = ((INPUT, job.prompt_tokens, price.input_micros_per_mtok),
                 (OUTPUT, job.completion_tokens, price.output_micros_per_mtok))
        meter_part = INPUT if job.prompt_tokens > 0 else OUTPUT
        for part, tokens, unit in parts:
            if tokens == 0 and split[part] == 0 and part != meter_part:
                continue
            g = groups[(*head, part, unit)]
            g.billed_micros += split[part]
            g.priced_tokens += tokens if job.billed else 0
            g.tokens += tokens
            if part == meter_part:
                g.requests += 1
                g.busy_us += sum(round(a.busy_s * 1_000_000) for a in job.attempts)
                g.energy_mj += sum(round(a.energy_j * 1000) for a in job.attempts)
                g.sources |= {a.energy_source for a in job.attempts}
    base: Row = {
        "BillingCurrency": usage.currency, "BillingPeriodStart": timestamp(p.start_s),
        "BillingPeriodEnd": timestamp(p.end_s), "InvoiceIssuerName": model.invoice_issuer,
        "ProviderName": model.provider, "PublisherName": model.provider,
        "ServiceCategory": "AI and Machine Learning", "ServiceSubcategory": "Generative AI",
        "ServiceName": "LLM inference", "ChargeFrequency": "Usage-Based",
        "BillingAccountType": "Client",
    }
    out: list[Row] = []
    for (client, key, mdl, workload, day, part, unit), g in sorted(groups.items()):
        if g.tokens == 0 and g.billed_micros == 0:  # nothing consumed, nothing billed
            # A request that consumed nothing: its metering still has to be reported, but a
            # Usage row needs a positive ConsumedQuantity. It goes on the day's other part.
            other = groups.get((client, key, mdl, workload, day,
                                OUTPUT if part == INPUT else INPUT, unit))
            if other is not None and (other.tokens or other.billed_micros):
                other.requests += g.requests
                other.busy_us += g.busy_us
                other.energy_mj += g.energy_mj
                other.sources |= g.sources
            continue
        start = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC).timestamp()
        qty = Decimal(g.priced_tokens) / TOKENS_PER_PRICING_UNIT
        unit_price = Decimal(unit) / 1_000_000
        list_cost = decimal_text(qty * unit_price)
        cost = money(g.billed_micros)
        sku = sku_id(mdl, part)
        out.append({**base, **_account(client, key or None, names),
                    "BilledCost": cost, "EffectiveCost": cost, "ListCost": list_cost,
                    "ContractedCost": list_cost, "ChargeCategory": "Usage", "ChargeClass": None,
                    "ChargeDescription": (f"{mdl} ({workload}): {g.tokens} {part} tokens at "
                                          f"{decimal_text(unit_price)} per million"),
                    "ChargePeriodStart": timestamp(start),
                    "ChargePeriodEnd": timestamp(min(start + 86_400, p.end_s)),
                    "PricingQuantity": decimal_text(qty), "PricingUnit": PRICING_UNIT,
                    "ListUnitPrice": decimal_text(unit_price),
                    "PricingCategory": "Standard", "ConsumedQuantity": str(g.tokens),
                    "ConsumedUnit": "Tokens", "SkuId": sku, "SkuPriceId": sku,
                    "SkuMeter": METERS[part],
                    "SkuPriceDetails": json.dumps({"Model": mdl, "TokenType": part.title()},
                                                  separators=(",", ":")),
                    "x_Model": mdl, "x_Workload": workload,
                    "x_Requests": str(g.requests),
                    "x_NodeSeconds": f"{g.busy_us // 1_000_000}.{g.busy_us % 1_000_000:06d}",
                    "x_EnergyJoules": f"{g.energy_mj // 1000}.{g.energy_mj % 1000:03d}",
                    "x_EnergySources": ",".join(sorted(g.sources)) or None})
    for c in sorted(usage.corrections, key=lambda c: (c.at_s, c.transfer_id)):
        start = dt.datetime.fromtimestamp(c.at_s, dt.UTC).replace(
            hour=0, minute=0, second=0, microsecond=0).timestamp()
        cost = money(-c.amount_micros)
        out.append({**base, **_account(c.client_id, c.api_key_id, names),
                    "BilledCost": cost, "EffectiveCost": cost, "ListCost": cost,
                    "ContractedCost": cost, "ChargeCategory": "Usage",
                    "ChargeClass": "Correction",
                    "ChargeDescription": (f"refund of request {c.job_id} ({c.model}), charged "
                                          "in an earlier billing period"),
                    "ChargePeriodStart": timestamp(start),
                    "ChargePeriodEnd": timestamp(min(start + 86_400, p.end_s)),
                    "x_Model": c.model, "x_Workload": None})
    return [{col: r.get(col) for col in COLUMNS} for r in out]


def _account(client: str, key: str | None, names: Names) -> Row:
    client_name = names.clients.get(client, client)
    return {"BillingAccountId": client, "BillingAccountName": client_name,
            "SubAccountId": key or client,
            "SubAccountName": names.api_keys.get(key, key) if key else client_name,
            "SubAccountType": "API Key" if key else "Client"}


def write_csv(rows: Iterable[Row], out: IO[str]) -> int:
    """Write rows as CSV (null = empty field); returns the number of rows."""
    w = csv.DictWriter(out, fieldnames=list(COLUMNS), lineterminator="\n")
    w.writeheader()
    n = 0
    for r in rows:
        w.writerow({k: "" if v is None else v for k, v in r.items()})
        n += 1
    return n


def to_csv(rows: Iterable[Row]) -> str:
    buf = io.StringIO()
    write_csv(rows, buf)
    return buf.getvalue()


def read_csv(text: str) -> tuple[list[str], list[Row]]:
    """(header, rows) with empty fields read as null."""
    reader = csv.DictReader(io.StringIO(text))
    rows = [{k: (v if v != "" else None) for k, v in r.items()} for r in reader]
    return list(reader.fieldnames or []), rows


# ---- validation --------------------------------------------------------------------------------


def _micros(text: str) -> int:
    """A FOCUS decimal of the currency in micro-units, exactly (refuses sub-micro digits)."""
    value = Decimal(text) * 1_000_000
    if value != value.to_integral_value():
        raise ValueError(f"{text!r} has more than 6 decimal places")
    return int(value)


def _time(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def validate(header: Sequence[str], rows: Sequence[Mapping[str, str | None]]) -> list[str]:
    """Every broken rule (``RULES``), one line each; empty when the dataset conforms."""
    problems = [f"missing Mandatory column {c}" for c in MANDATORY if c not in header]
    problems += [f"missing Conditional column {c} (its condition holds: sparecycles publishes "
                 "unit prices, a price list and SKUs)"
                 for c in CONDITIONAL_APPLICABLE if c not in header]
    problems += [f"column {c} is neither a FOCUS column nor a custom x_ column"
                 for c in header if c not in FOCUS_COLUMNS and not c.startswith("x_")]
    contracted_price = "ContractedUnitPrice" in header
    for i, r in enumerate(rows, start=1):
        problems += [f"row {i}: {p}" for p in _row_problems(r, contracted_price)]
    return problems


def _row_problems(r: Mapping[str, str | None], contracted_price: bool) -> list[str]:
    out = [f"{c} is null" for c in sorted(NOT_NULL) if r.get(c) is None]
    for c in DECIMALS:
        v = r.get(c)
        if v is not None and not _decimal.match(v):
            out.append(f"{c} {v!r} is not a FOCUS decimal")
        elif v is not None and c in NON_NEGATIVE and v.startswith("-"):
            out.append(f"{c} {v!r} is negative")
    for c in DATETIMES:
        v = r.get(c)
        if v is not None and not _datetime.match(v):
            out.append(f"{c} {v!r} is not a UTC date/time like 2026-11-01T00:00:00Z")
    for c, allowed in ALLOWED.items():
        v = r.get(c)
        if v is not None and v not in allowed:
            out.append(f"{c} {v!r} is not an allowed value")
    for c in ("PricingUnit", "ConsumedUnit"):
        v = r.get(c)
        if v is not None and not _unit.match(v):
            out.append(f"{c} {v!r} does not follow UnitFormat")
    if out:
        return out  # the remaining rules read these values
    cur = r.get("BillingCurrency") or ""
    if not _currency.match(cur):
        out.append(f"BillingCurrency {cur!r} is not an ISO 4217 code")
    cs, ce = _time(r["ChargePeriodStart"] or ""), _time(r["ChargePeriodEnd"] or "")
    bs, be = _time(r["BillingPeriodStart"] or ""), _time(r["BillingPeriodEnd"] or "")
    if not cs < ce:
        out.append("ChargePeriodStart is not before ChargePeriodEnd")
    if not bs < be:
        out.append("BillingPeriodStart is not before BillingPeriodEnd")
    if not (bs <= cs and ce <= be):
        out.append("the charge period is not within the billing period")
    category, correction = r.get("ChargeCategory"), r.get("ChargeClass") == "Correction"
    priced = [c for c in PRICED if c in r and (c != "ContractedUnitPrice" or contracted_price)]
    if category in ("Usage", "Purchase") and not correction:
        out += [f"{c} is null on a {category} row" for c in priced if r.get(c) is None]
    if category == "Tax":
        out += [f"{c} is not null on a Tax row" for c in priced if r.get(c) is not None]
    consumed = r.get("ConsumedQuantity")
    if category == "Usage" and not correction and (consumed is None
                                                   or Decimal(consumed) <= 0):
        out.append("ConsumedQuantity is not a positive decimal on a Usage row")
    if category != "Usage" and consumed is not None:
        out.append("ConsumedQuantity is not null on a row that is not Usage")
    if consumed is not None and r.get("ConsumedUnit") is None:
        out.append("ConsumedUnit is null while ConsumedQuantity is not")
    qty = r.get("PricingQuantity")
    for price_col, cost_col in (("ListUnitPrice", "ListCost"),
                                ("ContractedUnitPrice", "ContractedCost")):
        price = r.get(price_col)
        if (price is not None and qty is not None and not correction
                and Decimal(price) * Decimal(qty) != Decimal(r[cost_col] or "0")):
            out.append(f"{cost_col} is not {price_col} x PricingQuantity")
    if (not contracted_price and not correction
            and Decimal(r.get("ContractedCost") or "0") != Decimal(r.get("ListCost") or "0")):
        out.append("ContractedCost differs from ListCost with no negotiated pricing "
                   "(no ContractedUnitPrice column)")
    if r.get("EffectiveCost") != r.get("BilledCost"):
        out.append("EffectiveCost differs from BilledCost with no commitment to amortise")
    if (r.get("SubAccountId") is None) != (r.get("SubAccountName") is None):
        out.append("SubAccountName and SubAccountId are not null together")
    if "SkuMeter" in r and (r.get("SkuId") is None) != (r.get("SkuMeter") is None):
        out.append("SkuMeter is null exactly when SkuId is not (it follows SkuId)")
    details = r.get("SkuPriceDetails")
    if details is not None:
        if r.get("SkuPriceId") is None:
            out.append("SkuPriceDetails is not null while SkuPriceId is null")
        out += _key_value_problems(details)
    return out


def _key_value_problems(text: str) -> list[str]:
    try:
        obj = json.loads(text)
    except ValueError:
        return [f"SkuPriceDetails {text!r} is not a JSON object (KeyValueFormat)"]
    if not isinstance(obj, dict):
        return [f"SkuPriceDetails {text!r} is not a JSON object (KeyValueFormat)"]
    return [f"SkuPriceDetails key {k!r} starts with F_ but is not a FOCUS-defined property"
            for k in obj if k.startswith("F_") and k not in FOCUS_SKU_PRICE_KEYS]


def billed_micros(rows: Iterable[Mapping[str, str | None]]) -> int:
    """The sum of BilledCost, exactly (for the reconciliation)."""
    return sum(_micros(r["BilledCost"] or "0") for r in rows)
