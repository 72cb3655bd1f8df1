"""The glue between the store and the pure parts: one call per question the CLI and API ask.

Each function reads the period from the database once (``store/cost_queries.py``), then runs the
pure allocation, report, FOCUS export and reconciliation on what it read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sparecycles.costs import focus
from sparecycles.costs.allocation import Allocation, allocate
from sparecycles.costs.costmodel import CostModel
from sparecycles.costs.reconcile import Reconciliation, reconcile
from sparecycles.costs.reports import CostReport, Names, build_report, requests_shown_default
from sparecycles.costs.usage import Period, PeriodUsage


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
