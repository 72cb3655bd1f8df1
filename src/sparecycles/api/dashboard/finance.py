"""The finance page: revenue, COGS by category, gross margin, cost per million tokens, fixed
base costs and break-even, and the reconciliation, from the cost engine's report of a month."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import PurePath
from typing import Any

from sparecycles.api.dashboard import charts as ch
from sparecycles.api.dashboard.views import period_costs_cached
from sparecycles.costs.month import month_view, sig


def month_tables(m: dict[str, Any]) -> dict[str, Any]:
    """The month view (costs/month.py) as the rows ``costs report`` prints, for the page."""
    u, f, rr, be = m["unit"], m["fixed"], m["run_rate"], m["break_even"]

    def per(label: str, x: dict[str, Any]) -> tuple[str, str, str, str]:
        return (label, sig(x["total_micros"]), sig(x["per_mtok_micros"]),
                sig(x["per_request_micros"]))

    unit = [per("price (revenue)", u["price"])]
    unit += [per(x["line"] + (f" ({u['energy']['label']})" if x["line"] == "energy" else ""),
                 x) for x in u["variable_lines"]]
    unit += [per("variable cost", u["variable"]), per("contribution", u["contribution"])]
    margin = u["contribution_margin_pct"]
    loaded = m["fully_loaded_per_mtok_micros"]
    fixed = [(x["line"], sig(x["budget_micros"]), sig(x["accrued_micros"]))
             for x in f["base_lines"] + f["opex_lines"]]
    fixed.append(("fixed base, total", sig(f["budget_micros"]), sig(f["accrued_micros"])))
    run = [("revenue, month at this rate", sig(rr["revenue_micros"])),
           ("contribution, month at this rate", sig(rr["contribution_micros"])),
           ("result after the fixed budget", sig(rr["result_micros"])),
           ("tokens, month at this rate", "-" if rr["tokens"] is None else f"{rr['tokens']:,}"),
           ("break-even, tokens a month", "never" if be["tokens_per_month"] is None
            else f"{be['tokens_per_month']:,}"),
           ("fully loaded per million tokens, at this rate", sig(loaded["at_run_rate"])),
           ("fully loaded per million tokens, at break-even", sig(loaded["at_break_even"]))]
    if (a := m.get("absorbed")) is not None:
        run += [(f"COGS per request, {a['label']}", sig(a["per_request_micros"])),
                ("COGS per million tokens, absorbed", sig(a["per_mtok_micros"]))]
    return {"status": m["status"], "unit": unit,
            "margin": "n/a" if margin is None else f"{margin:.1f}%", "fixed": fixed,
            "run": run, "energy_share": u["energy"]["share_of_variable_pct"]}


def finance(coord: Any, period: str, now_s: float) -> dict[str, Any]:
    pc, rec = period_costs_cached(coord, period, now_s)
    r = pc.report
    from sparecycles.store.costs_queries import CostQueries

    frozen = CostQueries(coord.store.sessions).closed_month(period)
    month = (json.loads(frozen.report_json)["month"] if frozen is not None
             else month_view(r, pc.usage.period.start_s, pc.usage.period.end_s, now_s))
    cur = r.currency
    by_day = {row.key: row for row in r.by_day}
    xs = [d for d in pc.usage.period.days() if d <= ch.day(now_s) or d in by_day]
    days = [by_day.get(d) for d in xs]

    def daily(value: Callable[[Any], Any]) -> list[Any]:
        return [None if row is None else value(row) for row in days]

    cats = sorted({c for row in r.by_day for c in row.cogs_micros})
    def cogs_of(c: str) -> Callable[[Any], Any]:
        return lambda row: ch.units(row.cogs_micros.get(c, 0))

    cogs = [ch.trace(c, xs, daily(cogs_of(c)), kind="bar", i=i) for i, c in enumerate(cats)]
    if r.by_day:
        cogs.append(ch.trace("revenue", xs, daily(lambda row: ch.units(row.revenue_micros)), i=9,
                             line={"color": "#111827", "width": 3}))
    margin = [ch.trace("gross margin", xs, daily(lambda row: ch.units(row.gross_margin_micros)),
                       kind="bar", i=2),
              ch.trace("gross margin %", xs, daily(lambda row: row.gross_margin_pct), i=4,
                       yaxis="y2")] if r.by_day else []
    per_mtok = [
        ch.trace(label, [f"{kind}: {row.key}" for row in rows],
                 [ch.units(row.cogs_per_mtok_micros) for row in rows], kind="bar", i=i)
        for i, (label, kind, rows) in enumerate((("by model", "model", r.by_model),
                                                 ("by device class", "device", r.by_device_class)))
        if rows]
    charts = {
        "cogs": ch.figure(cogs, "day (UTC)", f"{cur} per day", barmode="stack", days=True,
                          money_axis=True),
        "margin": ch.figure(margin, "day (UTC)", f"gross margin ({cur})",
                            y2_title="gross margin (%)", days=True, money_axis=True),
        "per_mtok": ch.figure(per_mtok, "model or device class",
                              f"COGS per million tokens ({cur})", x_type="category",
                              money_axis=True),
    }
    gm = r.gross_margin_micros
    stats = {
        "revenue": ch.money_short(r.revenue_micros, cur),
        "cogs": ch.money_short(r.totals.cogs_total_micros, cur),
        "gross_margin": ch.money_short(gm, cur),
        "gross_margin_pct": ch.pct(100 * gm / r.revenue_micros if r.revenue_micros else None),
        "operating_result": ch.money_short(r.operating_result_micros, cur),
        "reconciled": "all sources agree" if rec.ok else "MISMATCH",
    }
    mtok = [{"kind": kind, "key": row.key, "tokens": f"{row.inference_tokens:,}",
             "cogs": ch.money(row.cogs_total_micros, cur),
             "per_mtok": ch.money(row.cogs_per_mtok_micros, cur)}
            for kind, rows in (("model", r.by_model), ("device class", r.by_device_class))
            for row in rows]
    fixed = [(name.removesuffix("_micros").replace("_", " "), ch.money(v, cur))
             for name, v in r.fixed_base_micros.items()]
    return {"period": period, "stats": stats, "charts": charts, "month": month_tables(month),
            "tables": {
        "mtok": mtok, "fixed": fixed, "fixed_total": ch.money(r.fixed_base_total_micros, cur),
        "break_even": (f"{r.break_even_tokens_per_month:,} tokens per month"
                       if r.break_even_tokens_per_month is not None
                       else "not reachable: a token contributes nothing yet"),
        "contribution": ch.money(r.contribution_per_mtok_micros, cur),
        "inference_tokens": f"{r.inference_tokens:,}",
        "reconciliation": rec, "cost_model": cost_model_name(r.cost_model),
        "cogs_by_category": [(c, ch.money(v, cur))
                             for c, v in sorted(r.totals.cogs_micros.items())]}}


def cost_model_name(source: str) -> str:
    """The cost model as the page names it: its file's name (``costs.toml``), never the
    absolute path on the coordinator's machine; "(built-in defaults)" as it is."""
    return PurePath(source).name or source
