"""Reconciliation: metered usage, ledger postings, the FOCUS export and the report, side by side.

Pure. Each source is computed on its own path: the metering and the ledger totals are summed in
SQL (``store/cost_queries.py``), the FOCUS figures are read back from the CSV text, the report's
from the allocation. Every line must agree: money to the micro-unit; node-seconds and joules to
the rounding of their export (half a microsecond or half a millijoule per attempt). ``sparecycles
costs reconcile`` exits non-zero when one does not.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from sparecycles.costs import focus
from sparecycles.costs.allocation import OWNER_PAYOUTS, Allocation
from sparecycles.costs.reports import CostReport
from sparecycles.costs.usage import OrphanPosting
from sparecycles.ledger.pricing import ModelPrice, charge_micros, format_money

mismatches_listed_max = 20  # jobs named in a failing line; the count covers all


@dataclass(frozen=True, slots=True)
class MeteredTotals:
    """What the coordinator metered for the period's jobs (``jobs``, ``job_attempts``)."""

    jobs: int
    attempts: int
    tokens: int
    billed_tokens: int  # of the jobs the ledger charged
    busy_s: float
    energy_j: float


@dataclass(frozen=True, slots=True)
class LedgerTotals:
    """What the ledger posted for the period, summed in SQL, independently of the allocation."""

    posts: int
    charged_micros: int
    earnings_micros: int
    fees_micros: int
    withheld_micros: int  # withholds made by the end of the period for the period's requests
    corrections_micros: int  # withholds made in the period for earlier requests
    cogs_costs_micros: int
    opex_costs_micros: int
    # the platform's own usage (training, R&D): owners paid from opex, not a charge or revenue
    internal_use_micros: int = 0


@dataclass(frozen=True, slots=True)
class ChargeFacts:
    """One request's tokens, the price it was admitted at and what the ledger charged."""

    job_id: str
    state: str
    prompt_tokens: int
    completion_tokens: int
    price: ModelPrice | None  # None: no hold
    hold_micros: int
    charged_micros: int | None  # None: no post


@dataclass(frozen=True, slots=True)
class Check:
    what: str
    metered: str
    ledger: str
    focus: str
    report: str
    ok: bool
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {"what": self.what, "metered": self.metered, "ledger": self.ledger,
                "focus": self.focus, "report": self.report, "ok": self.ok, "note": self.note}


@dataclass(frozen=True, slots=True)
class Reconciliation:
    period: str
    currency: str
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {"period": self.period, "currency": self.currency, "ok": self.ok,
                "checks": [c.as_dict() for c in self.checks]}


def _sum_decimal(rows: Sequence[Mapping[str, str | None]], col: str) -> Decimal:
    return sum((Decimal(r.get(col) or "0") for r in rows), Decimal(0))


def _charge_problems(charges: Sequence[ChargeFacts]) -> tuple[int, int, list[str]]:
    """(expected total, posted total, problems): each charge recomputed from the request's
    tokens at the price it was admitted at (pricing rules 1 and 3)."""
    expected = posted = 0
    problems: list[str] = []
    for f in charges:
        delivered = f.completion_tokens > 0
        if f.charged_micros is None:
            if delivered:
                problems.append(f"{f.job_id}: delivered {f.completion_tokens} tokens, no charge")
            continue
        posted += f.charged_micros
        if f.price is None:
            problems.append(f"{f.job_id}: charged without a hold")
            continue
        want = charge_micros(f.price, f.prompt_tokens, f.completion_tokens, f.hold_micros)
        expected += want
        if want != f.charged_micros:
            problems.append(f"{f.job_id}: charged {f.charged_micros}, its tokens at its price "
                            f"make {want}")
    return expected, posted, problems


def money_exact(value: Decimal) -> str:
    """A list amount that may hold sub-micro digits (tokens x a price per million)."""
    return focus.decimal_text(value)


def reconcile(alloc: Allocation, report: CostReport, focus_csv: str, metered: MeteredTotals,
              ledger: LedgerTotals, charges: Sequence[ChargeFacts],
              orphans: Sequence[OrphanPosting] = ()) -> Reconciliation:
    """Put the four sources side by side; ``ok`` only when every line agrees.

    ``focus_csv`` is the export as a file holds it (``costs reconcile --focus-file`` reads the
    file that was sent; without it, the export made now, through its CSV text). ``orphans`` are
    the ledger's postings of the period with no request row, read on their own path: any makes
    the reconciliation fail, since no metering explains them."""
    cur = report.currency
    header, rows = focus.read_csv(focus_csv)
    usage_rows = [r for r in rows if r.get("ChargeClass") != "Correction"]
    corr_rows = [r for r in rows if r.get("ChargeClass") == "Correction"]
    checks: list[Check] = []

    def money(m: int) -> str:
        return format_money(m)  # the currency is the reconciliation's

    # a header or rows that cannot be read as FOCUS make the checks below meaningless: say so
    if not set(focus.MANDATORY) <= set(header):
        return Reconciliation(report.period, cur, (Check(
            "FOCUS file readable", "", "", f"{len(rows)} rows", "", False,
            "not a FOCUS export: missing " + ", ".join(
                c for c in focus.MANDATORY if c not in header)),))
    tokens_focus = int(_sum_decimal(usage_rows, "ConsumedQuantity"))
    checks.append(Check("tokens, all requests", f"{metered.tokens:,}", "", f"{tokens_focus:,}",
                        f"{report.totals.tokens:,}",
                        metered.tokens == tokens_focus == report.totals.tokens))
    billed_focus = int(_sum_decimal(usage_rows, "PricingQuantity")
                       * focus.TOKENS_PER_PRICING_UNIT)
    checks.append(Check("tokens, charged requests", f"{metered.billed_tokens:,}", "",
                        f"{billed_focus:,}", "", metered.billed_tokens == billed_focus))
    expected, posted, problems = _charge_problems(charges)
    checks.append(Check(
        "charges = tokens x admission price", money(expected), money(posted), "", "",
        not problems and expected == posted == ledger.charged_micros,
        "; ".join(problems[:mismatches_listed_max])
        + (f" (+{len(problems) - mismatches_listed_max} more)"
           if len(problems) > mismatches_listed_max else "")))
    list_focus = _sum_decimal(usage_rows, "ListCost")
    list_expected = sum((Decimal(f.prompt_tokens * f.price.input_micros_per_mtok
                                 + f.completion_tokens * f.price.output_micros_per_mtok)
                         / 10**12 for f in charges
                         if f.price is not None and f.charged_micros is not None),
                        Decimal(0))
    checks.append(Check("list cost = charged tokens x admission prices", money_exact(
        list_expected), "", money_exact(list_focus), "", list_focus == list_expected))
    revenue_ledger = ledger.charged_micros - ledger.withheld_micros - ledger.corrections_micros
    revenue_focus = focus.billed_micros(rows)
    checks.append(Check("revenue (charges - refunds)", "", money(revenue_ledger),
                        money(revenue_focus), money(report.revenue_micros),
                        revenue_ledger == revenue_focus == report.revenue_micros))
    corr_focus = -focus.billed_micros(corr_rows)
    checks.append(Check("refunds of earlier periods", "", money(ledger.corrections_micros),
                        money(corr_focus), money(-report.revenue_corrections_micros),
                        ledger.corrections_micros == corr_focus
                        == -report.revenue_corrections_micros))
    earned_ledger = ledger.earnings_micros - ledger.withheld_micros
    payouts = sum(p.total_micros for p in alloc.pools
                  if p.category == OWNER_PAYOUTS and p.basis != "corrections")
    checks.append(Check("owner earnings (net of withholds)", "", money(earned_ledger), "",
                        money(payouts + alloc.internal_earnings_micros),
                        earned_ledger == payouts + alloc.internal_earnings_micros,
                        f"{money(alloc.internal_earnings_micros)} of it to the platform's own "
                        "nodes" if alloc.internal_earnings_micros else ""))
    fee_ok = (ledger.charged_micros + ledger.internal_use_micros
              == ledger.earnings_micros + ledger.fees_micros)
    checks.append(Check("charges = earnings + fees", "", money(ledger.charged_micros), "",
                        money(ledger.earnings_micros + ledger.fees_micros), fee_ok))
    booked = ledger.cogs_costs_micros + ledger.opex_costs_micros
    booked_report = sum(p.total_micros for p in alloc.pools if p.category.startswith("ledger:"))
    checks.append(Check("costs booked in the ledger", "", money(booked), "",
                        money(booked_report), booked == booked_report))
    busy_focus = _sum_decimal(usage_rows, "x_NodeSeconds")
    tol_s = Decimal("0.000001") * max(1, metered.attempts)
    checks.append(Check("node-seconds", f"{metered.busy_s:,.6f}", "", f"{busy_focus:,.6f}",
                        f"{report.totals.busy_s:,.6f}",
                        abs(Decimal(repr(metered.busy_s)) - busy_focus) <= tol_s
                        and abs(metered.busy_s - report.totals.busy_s) <= float(tol_s)))
    energy_focus = _sum_decimal(usage_rows, "x_EnergyJoules")
    tol_j = Decimal("0.001") * max(1, metered.attempts)
    checks.append(Check("energy (J)", f"{metered.energy_j:,.3f}", "", f"{energy_focus:,.3f}",
                        f"{report.totals.energy_j:,.3f}",
                        abs(Decimal(repr(metered.energy_j)) - energy_focus) <= tol_j
                        and abs(metered.energy_j - report.totals.energy_j) <= float(tol_j)))
    checks.append(Check("requests", f"{metered.jobs:,}", f"{ledger.posts:,} charged",
                        f"{sum(int(r['x_Requests'] or 0) for r in usage_rows):,}",
                        f"{report.totals.requests:,}",
                        metered.jobs == report.totals.requests
                        == sum(int(r["x_Requests"] or 0) for r in usage_rows)))
    orphan_n = sum(o.count for o in orphans)
    checks.append(Check(
        "ledger postings with no request row", "", f"{orphan_n:,}", "",
        f"{sum(o.count for o in report.orphans):,}", orphan_n == 0,
        "; ".join(f"{o.count:,} {o.kind} of {money(o.amount_micros)} (jobs "
                  f"{', '.join(o.job_ids[:5])})" for o in orphans)))
    conserved = (alloc.allocated_micros + alloc.idle_micros + alloc.unallocated_micros
                 == alloc.total_micros == report.total_cost_micros)
    checks.append(Check("allocated + idle + unallocated = total cost", "", "", "",
                        money(alloc.total_micros), conserved,
                        f"{money(alloc.allocated_micros)} + {money(alloc.idle_micros)} + "
                        f"{money(alloc.unallocated_micros)} != {money(alloc.total_micros)}"
                        if not conserved else ""))
    broken = focus.validate(header, rows)
    checks.append(Check("FOCUS 1.2 rules", "", "", f"{len(rows)} rows", "", not broken,
                        "; ".join(broken[:mismatches_listed_max])))
    return Reconciliation(report.period, cur, tuple(checks))
