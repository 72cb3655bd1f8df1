"""The FinOps FOCUS 1.2 export of what clients were billed, and a validator of its rules. Pure.

sparecycles is the *provider*: each client is a billing account, each API key a sub-account. One
``Usage`` row per (client, API key, model, workload, UTC day), whose cost is what the ledger
charged for those requests less refunds made in the period; a refund of a request charged in an
earlier billing period is a ``Correction`` row on the day it was made. Prices are list prices
with no discount or commitment, so ListCost == ContractedCost == EffectiveCost == BilledCost.

Columns: every Mandatory column of FOCUS 1.2 (``MANDATORY``), the Conditional/Recommended
columns that apply (``OPTIONAL``), and custom ``x_`` columns (``CUSTOM``) that carry the metering
the reconciliation checks (node-seconds, energy). ``validate`` checks the rules listed in
``RULES`` (docs/costs.md repeats them with the spec's wording).
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

from sparecycles.costs.costmodel import CostModel
from sparecycles.costs.reports import Names
from sparecycles.costs.usage import PeriodUsage

FOCUS_VERSION = "1.2"
MANDATORY: tuple[str, ...] = (
    "BilledCost", "BillingAccountId", "BillingAccountName", "BillingCurrency",
    "BillingPeriodEnd", "BillingPeriodStart", "ChargeCategory", "ChargeClass",
    "ChargeDescription", "ChargePeriodEnd", "ChargePeriodStart", "ContractedCost",
    "EffectiveCost", "InvoiceIssuerName", "ListCost", "PricingQuantity", "PricingUnit",
    "ProviderName", "PublisherName", "ServiceCategory", "ServiceName",
)
OPTIONAL: tuple[str, ...] = (
    "BillingAccountType", "ChargeFrequency", "ConsumedQuantity", "ConsumedUnit",
    "ContractedUnitPrice", "ListUnitPrice", "PricingCategory", "ServiceSubcategory", "SkuId",
    "SubAccountId", "SubAccountName", "SubAccountType",
)
CUSTOM: tuple[str, ...] = (
    "x_Model", "x_Workload", "x_Requests", "x_PromptTokens", "x_CompletionTokens",
    "x_NodeSeconds", "x_EnergyJoules", "x_EnergySources",
)
COLUMNS = MANDATORY + OPTIONAL + CUSTOM
NOT_NULL = frozenset(MANDATORY) - {"ChargeClass", "PricingQuantity", "PricingUnit"}
DECIMALS = ("BilledCost", "ContractedCost", "EffectiveCost", "ListCost", "PricingQuantity",
            "ConsumedQuantity", "ContractedUnitPrice", "ListUnitPrice")
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
    "every Mandatory column is present; other columns are FOCUS columns or start with x_",
    "BilledCost, EffectiveCost, ListCost, ContractedCost, the Billing*/Charge* period columns, "
    "BillingAccountId/Name, BillingCurrency, ChargeCategory, ChargeDescription, "
    "InvoiceIssuerName, ProviderName, PublisherName, ServiceCategory, ServiceName: not null",
    "decimals follow NumericFormat: digits, one optional '.', a leading '-' only for negatives; "
    "no '+', exponent, comma, unit or currency symbol",
    "date/times follow DateTimeFormat: UTC 'YYYY-MM-DDTHH:mm:ssZ'",
    "ChargePeriodStart < ChargePeriodEnd and BillingPeriodStart < BillingPeriodEnd; the charge "
    "period lies within the billing period",
    "ChargeCategory, ChargeClass, ChargeFrequency, PricingCategory, ServiceCategory: allowed "
    "values only; ChargeClass is null or 'Correction'",
    "BillingCurrency is an ISO 4217 code (three capital letters)",
    "PricingQuantity and PricingUnit: not null for Usage/Purchase rows that are not "
    "corrections; null for Tax rows",
    "ConsumedQuantity: a positive decimal on Usage rows that are not corrections, null on rows "
    "that are not Usage; ConsumedUnit is not null when ConsumedQuantity is not",
    "ListCost = ListUnitPrice x PricingQuantity and ContractedCost = ContractedUnitPrice x "
    "PricingQuantity when the unit price is not null and the row is not a correction",
    "EffectiveCost equals BilledCost (no commitment discounts or prepaid amortisation here)",
    "SubAccountName is null exactly when SubAccountId is null",
)
_decimal = re.compile(r"^-?(0|[1-9][0-9]*)(\.[0-9]+)?$")
_datetime = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")
_currency = re.compile(r"^[A-Z]{3}$")

Row = dict[str, str | None]


def money(micros: int) -> str:
    """Integer micro-units as an exact FOCUS decimal: ``-1_500_000`` -> ``"-1.500000"``."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), 1_000_000)
    return f"{sign}{whole}.{frac:06d}"


def timestamp(t_s: float) -> str:
    return dt.datetime.fromtimestamp(t_s, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(slots=True)
class _Group:
    billed_micros: int = 0
    priced_tokens: int = 0
    tokens: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    busy_us: int = 0
    energy_mj: int = 0
    sources: set[str] | None = None


def focus_rows(usage: PeriodUsage, model: CostModel, names: Names | None = None) -> list[Row]:
    """The period's FOCUS rows, in a stable order."""
    names = names or Names()
    p = usage.period
    groups: dict[tuple[str, str | None, str, str, str], _Group] = defaultdict(_Group)
    for job in usage.jobs:
        g = groups[(job.client_id, job.api_key_id, job.model, job.workload, p.day(job.at_s))]
        g.billed_micros += job.revenue_micros
        g.priced_tokens += job.tokens if job.billed else 0
        g.tokens += job.tokens
        g.requests += 1
        g.prompt_tokens += job.prompt_tokens
        g.completion_tokens += job.completion_tokens
        g.busy_us += sum(round(a.busy_s * 1_000_000) for a in job.attempts)
        g.energy_mj += sum(round(a.energy_j * 1000) for a in job.attempts)
        g.sources = (g.sources or set()) | {a.energy_source for a in job.attempts}
    base: Row = {
        "BillingCurrency": usage.currency, "BillingPeriodStart": timestamp(p.start_s),
        "BillingPeriodEnd": timestamp(p.end_s), "InvoiceIssuerName": model.invoice_issuer,
        "ProviderName": model.provider, "PublisherName": model.provider,
        "ServiceCategory": "AI and Machine Learning", "ServiceSubcategory": "Generative AI",
        "ServiceName": "LLM inference", "ChargeFrequency": "Usage-Based",
        "BillingAccountType": "Client",
    }
    out: list[Row] = []
    for (client, key, mdl, workload, day), g in sorted(groups.items(),
                                                       key=lambda kv: str(kv[0])):
        if g.tokens == 0 and g.billed_micros == 0:
            continue  # nothing consumed and nothing billed: no charge to report
        start = dt.datetime.fromisoformat(day).replace(tzinfo=dt.UTC).timestamp()
        cost = money(g.billed_micros)
        out.append({**base, **_account(client, key, names),
                    "BilledCost": cost, "EffectiveCost": cost, "ListCost": cost,
                    "ContractedCost": cost, "ChargeCategory": "Usage", "ChargeClass": None,
                    "ChargeDescription": (f"{mdl} ({workload}): {g.requests} requests, "
                                          f"{g.prompt_tokens} input + {g.completion_tokens} "
                                          "output tokens"),
                    "ChargePeriodStart": timestamp(start),
                    "ChargePeriodEnd": timestamp(min(start + 86_400, p.end_s)),
                    "PricingQuantity": str(g.priced_tokens), "PricingUnit": "Tokens",
                    "PricingCategory": "Standard", "ConsumedQuantity": str(g.tokens),
                    "ConsumedUnit": "Tokens", "ContractedUnitPrice": None, "ListUnitPrice": None,
                    "SkuId": mdl, "x_Model": mdl, "x_Workload": workload,
                    "x_Requests": str(g.requests), "x_PromptTokens": str(g.prompt_tokens),
                    "x_CompletionTokens": str(g.completion_tokens),
                    "x_NodeSeconds": f"{g.busy_us // 1_000_000}.{g.busy_us % 1_000_000:06d}",
                    "x_EnergyJoules": f"{g.energy_mj // 1000}.{g.energy_mj % 1000:03d}",
                    "x_EnergySources": ",".join(sorted(g.sources or ())) or None})
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
                    "SkuId": c.model, "x_Model": c.model, "x_Workload": None})
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
    whole, _, frac = text.lstrip("-").partition(".")
    value = int(whole) * 1_000_000 + int((frac + "000000")[:6] or 0)
    return -value if text.startswith("-") else value


def _time(text: str) -> float:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC).timestamp()


def validate(header: Sequence[str], rows: Sequence[Mapping[str, str | None]]) -> list[str]:
    """Every broken rule (``RULES``), one line each; empty when the dataset conforms."""
    problems = [f"missing Mandatory column {c}" for c in MANDATORY if c not in header]
    known = set(MANDATORY) | set(OPTIONAL)
    problems += [f"column {c} is neither a FOCUS column nor a custom x_ column"
                 for c in header if c not in known and not c.startswith("x_")]
    for i, r in enumerate(rows, start=1):
        problems += [f"row {i}: {p}" for p in _row_problems(r)]
    return problems


def _row_problems(r: Mapping[str, str | None]) -> list[str]:
    out = [f"{c} is null" for c in sorted(NOT_NULL) if r.get(c) is None]
    for c in DECIMALS:
        v = r.get(c)
        if v is not None and not _decimal.match(v):
            out.append(f"{c} {v!r} is not a FOCUS decimal")
    for c in DATETIMES:
        v = r.get(c)
        if v is not None and not _datetime.match(v):
            out.append(f"{c} {v!r} is not a UTC date/time like 2026-11-01T00:00:00Z")
    for c, allowed in ALLOWED.items():
        v = r.get(c)
        if v is not None and v not in allowed:
            out.append(f"{c} {v!r} is not an allowed value")
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
    if category in ("Usage", "Purchase") and not correction:
        out += [f"{c} is null on a {category} row" for c in ("PricingQuantity", "PricingUnit")
                if r.get(c) is None]
    if category == "Tax":
        out += [f"{c} is not null on a Tax row" for c in ("PricingQuantity", "PricingUnit")
                if r.get(c) is not None]
    consumed = r.get("ConsumedQuantity")
    if category == "Usage" and not correction and (consumed is None or _micros(consumed) <= 0):
        out.append("ConsumedQuantity is not a positive decimal on a Usage row")
    if category != "Usage" and consumed is not None:
        out.append("ConsumedQuantity is not null on a row that is not Usage")
    if consumed is not None and r.get("ConsumedUnit") is None:
        out.append("ConsumedUnit is null while ConsumedQuantity is not")
    qty = r.get("PricingQuantity")
    for price_col, cost_col in (("ListUnitPrice", "ListCost"),
                                ("ContractedUnitPrice", "ContractedCost")):
        price = r.get(price_col)
        if price is not None and qty is not None and not correction:
            exact = _micros(price) * _micros(qty)  # micros^2
            if exact != _micros(r[cost_col] or "0") * 1_000_000:
                out.append(f"{cost_col} is not {price_col} x PricingQuantity")
    if r.get("EffectiveCost") != r.get("BilledCost"):
        out.append("EffectiveCost differs from BilledCost with no commitment to amortise")
    if (r.get("SubAccountId") is None) != (r.get("SubAccountName") is None):
        out.append("SubAccountName and SubAccountId are not null together")
    return out


def billed_micros(rows: Iterable[Mapping[str, str | None]]) -> int:
    """The sum of BilledCost, exactly (for the reconciliation)."""
    return sum(_micros(r["BilledCost"] or "0") for r in rows)
