"""Admin API of the cost engine: the report as JSON, the FOCUS CSV, the reconciliation.

``GET /v1/admin/costs/report?period=2026-11``     the report (``CostReport.as_dict``, the month
                                                  view under ``month``; a closed month frozen)
``GET /v1/admin/costs/focus.csv?period=2026-11``  the FOCUS 1.2 CSV (500 if it broke a rule: a bug)
``GET /v1/admin/costs/reconcile?period=2026-11``  the reconciliation; ``ok`` false when the
                                                  sources disagree (still 200: it is a finding)

All need an API key with the admin scope. The cost model is ``$SPARECYCLES_COST_MODEL``, else the
shipped example; it is read once per request (a few KB), so an edited file applies at once.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from typing import Any

from fastapi import APIRouter, Depends, Query, Request, Response

from sparecycles.api.auth import require_admin
from sparecycles.costs import focus
from sparecycles.costs.costmodel import load_cost_model
from sparecycles.costs.period import month_report, period_costs, period_reconciliation
from sparecycles.errors import InvariantViolation

router = APIRouter(prefix="/v1/admin/costs", dependencies=[Depends(require_admin)])
report_requests_max = 1000
_period_pattern = r"^[0-9]{4}-[0-9]{2}$"


def _period(value: str | None) -> str:
    return value or dt.datetime.now(dt.UTC).strftime("%Y-%m")


def _context(request: Request) -> tuple[Any, str]:
    coord = request.app.state.coordinator
    return coord.store.sessions, coord.ledger.currency


@router.get("/report")
async def costs_report(
    request: Request,
    period: str | None = Query(None, pattern=_period_pattern, description="YYYY-MM"),
    requests: int = Query(50, ge=0, le=report_requests_max,
                          description="How many of the most costly requests to list"),
) -> dict[str, Any]:
    sessions, currency = _context(request)

    def work() -> dict[str, Any]:
        body, _ = month_report(sessions, _period(period), load_cost_model(), time.time(),
                               currency, requests_shown=requests)
        return body  # the report, its month view under "month"; a closed month as frozen

    return await asyncio.to_thread(work)


@router.get("/focus.csv")
async def costs_focus(
    request: Request,
    period: str | None = Query(None, pattern=_period_pattern, description="YYYY-MM"),
) -> Response:
    sessions, currency = _context(request)
    label = _period(period)

    def work() -> str:
        pc = period_costs(sessions, label, load_cost_model(), currency, requests_shown=0)
        text = pc.focus_csv()
        problems = focus.validate(*focus.read_csv(text))
        if problems:  # our own export breaking the spec is a bug, not the caller's mistake
            raise InvariantViolation(f"FOCUS export of {label} breaks: {problems[:5]}")
        return text

    text = await asyncio.to_thread(work)
    return Response(text, media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="sparecycles-focus-{label}.csv"'})


@router.get("/reconcile")
async def costs_reconcile(
    request: Request,
    period: str | None = Query(None, pattern=_period_pattern, description="YYYY-MM"),
) -> dict[str, Any]:
    sessions, currency = _context(request)

    def work() -> dict[str, Any]:
        _, rec = period_reconciliation(sessions, _period(period), load_cost_model(), currency)
        return rec.as_dict()

    return await asyncio.to_thread(work)
