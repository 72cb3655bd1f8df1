"""The glue between the store and the pure parts: one call per question the CLI and API ask.

Each function reads the period from the database once (``store/cost_queries.py``), then runs the
pure allocation, report, FOCUS export and reconciliation on what it read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sparecycles.costs import focus
from sparecycles.costs.allocation import Allocation, allocate
from sparecycles.costs.costmodel import CostModel
from sparecycles.costs.month import month_view
from sparecycles.costs.reconcile import Reconciliation, reconcile
from sparecycles.costs.reports import CostReport, Names, build_report, requests_shown_default
from sparecycles.costs.usage import Period, PeriodUsage
from sparecycles.errors import InvalidRequest


@dataclass(frozen=True, slots=True)
class PeriodCosts:
    usage: PeriodUsage
    model: CostModel
    allocation: Allocation
    report: CostReport
    names: Names

    def focus_rows(self) -> list[focus.Row]:
        return focus.focus_rows(self.usage, self.model, self.names)

    def focus_csv(self) -> str:
        return focus.to_csv(self.focus_rows())


def period_costs(sessions: Any, period: str, model: CostModel, currency: str | None = None, *,
                 requests_shown: int = requests_shown_default) -> PeriodCosts:
    """Allocate and report ``period`` (``YYYY-MM``) from the database behind ``sessions``."""
    from sparecycles.store.costs_queries import CostQueries

    q = CostQueries(sessions)
    usage = q.period_usage(Period.month(period), currency or model.currency)
    names = q.names()
    alloc = allocate(usage, model)
    report = build_report(usage, model, alloc, names, requests_shown=requests_shown)
    return PeriodCosts(usage, model, alloc, report, names)


def period_reconciliation(sessions: Any, period: str, model: CostModel,
                          currency: str | None = None, *, focus_csv: str | None = None
                          ) -> tuple[PeriodCosts, Reconciliation]:
    """The period's costs and their reconciliation with the metering, the ledger and FOCUS
    (``focus_csv``: the exported file's text, read back; default: the export made now)."""
    from sparecycles.store.costs_queries import CostQueries

    pc = period_costs(sessions, period, model, currency)
    q = CostQueries(sessions)
    p, cur = pc.usage.period, pc.usage.currency
    rec = reconcile(pc.allocation, pc.report,
                    pc.focus_csv() if focus_csv is None else focus_csv, q.metered_totals(p),
                    q.ledger_totals(p, cur), q.charge_facts(p, cur),
                    q.orphan_postings(p, cur))
    return pc, rec


def month_report(sessions: Any, period: str, model: CostModel, now_s: float,
                 currency: str | None = None, *,
                 requests_shown: int = requests_shown_default
                 ) -> tuple[dict[str, Any], PeriodCosts | None]:
    """The month's report as a dict (``CostReport.as_dict`` with the month view under
    ``"month"``) and, for a month that is not closed, the costs it was computed from. A closed
    month is read back as it was frozen, never recomputed (the second value is None)."""
    from sparecycles.store.costs_queries import CostQueries

    label = Period.month(period).label
    closed = CostQueries(sessions).closed_month(label)
    if closed is not None:
        return json.loads(closed.report_json), None
    pc = period_costs(sessions, label, model, currency, requests_shown=requests_shown)
    p = pc.usage.period
    body = pc.report.as_dict()
    body["month"] = month_view(pc.report, p.start_s, p.end_s, now_s)
    body["closed_at_s"] = None
    return body, pc


def close_month(sessions: Any, period: str, model: CostModel, now_s: float,
                currency: str | None = None) -> tuple[dict[str, Any], bool]:
    """Freeze a month that has ended: its report (month view included), FOCUS export and the
    cost model in effect, stored so that it is read back from then on. Returns (the frozen
    report, True) or (the report frozen earlier, False) when it was closed already."""
    from sparecycles.store.costs_queries import ClosedMonth, CostQueries

    p = Period.month(period)
    q = CostQueries(sessions)
    if (done := q.closed_month(p.label)) is not None:
        return json.loads(done.report_json), False
    if now_s < p.end_s:
        raise InvalidRequest(f"{p.label} has not ended: a month is closed after its last day")
    pc = period_costs(sessions, p.label, model, currency)
    body = pc.report.as_dict()
    body["month"] = month_view(pc.report, p.start_s, p.end_s, now_s, closed=True)
    body["closed_at_s"] = now_s
    text = json.dumps(body, sort_keys=True)
    stored = q.close_month(ClosedMonth(p.label, pc.usage.currency, now_s, text,
                                       pc.focus_csv(), model.source,
                                       repr(model.for_period(p.start_s))))
    if not stored:  # another close won the race: read back what it froze
        again = q.closed_month(p.label)
        assert again is not None
        return json.loads(again.report_json), False
    return json.loads(text), True
