"""The month view: unit economics on variable cost, fixed costs budgeted against accrued, run-rate
and break-even; honest for a month in progress. Pure.

The allocation charges a month's whole fixed base (staff, servers, storage, depreciation) to the
requests of that month. For a closed month that is the *absorbed* cost of a request at that
month's volume, and it is shown as such. For a month in progress it is nonsense (five days of
demo requests carrying a month of salaries "cost" hundreds of dollars each), so this view keeps
the two apart:

- **unit economics on variable cost only** (owner payouts, energy, egress, variable ledger
  fees): price, variable cost and contribution, per million tokens and per request;
- **fixed base costs**: the month's budget (what the cost model says the month costs) against
  what has accrued by ``now`` (the budget times the elapsed part of the month), inference base
  costs apart from training and R&D (operating expenses, never COGS);
- **run-rate** of the month (to-date figures over the elapsed part), the **break-even volume**
  (tokens a month whose contribution covers the fixed budget), and the **fully loaded cost per
  million tokens** (variable + inference base budget over a month's tokens) at today's run-rate
  and at break-even;
- **energy** labelled measured or estimated, with its share of the variable cost;
- ratios over a revenue below ``ratio_revenue_min_micros`` are None ("n/a"), never "<-999%".

``month_view(report, start_s, end_s, now_s, closed=...)`` returns a JSON-able dict of integers
(micro-units), None and strings; ``costs report``, the admin API and the Finance page show it.
"""

from __future__ import annotations

from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sparecycles.costs.allocation import EGRESS, ENERGY, OWNER_PAYOUTS
from sparecycles.costs.reports import MTOK, CostReport

ratio_revenue_min_micros = 1_000_000  # below one unit of the currency a margin % means nothing
ratio_abs_max_pct = 999.0  # beyond this a ratio says more about a tiny base than about margin
MEASURED_SOURCES = frozenset({"nvml", "rapl"})
STATUS_IN_PROGRESS, STATUS_ENDED, STATUS_CLOSED = "in progress", "ended", "closed"
BASE_LINES = ("staff", "servers", "storage", "depreciation")  # shown first, in this order


def _div(num: int, den: int) -> int | None:
    """``num / den`` rounded half away from zero to an integer; None when ``den`` is 0."""
    if den == 0:
        return None
    q = (abs(num) * 2 + abs(den)) // (2 * abs(den))
    return q if (num >= 0) == (den > 0) else -q


def pct(num: int, revenue: int) -> float | None:
    """``num / revenue`` in percent, or None when the revenue is too small to mean anything."""
    if revenue < ratio_revenue_min_micros:
        return None
    value = round(100.0 * num / revenue, 1)
    return None if abs(value) > ratio_abs_max_pct else value


def _per(total: int, tokens: int, requests: int) -> dict[str, int | None]:
    return {"total_micros": total, "per_mtok_micros": _div(total * MTOK, tokens),
            "per_request_micros": _div(total, requests)}


def month_view(r: CostReport, start_s: float, end_s: float, now_s: float, *,
               closed: bool = False) -> dict[str, Any]:
    """The month view of report ``r`` of the month ``[start_s, end_s)`` as seen at ``now_s``."""
    span = end_s - start_s
    elapsed_ppm = 1_000_000 if now_s >= end_s else max(0, int((now_s - start_s) * 1_000_000
                                                              // span))
    status = (STATUS_CLOSED if closed else STATUS_ENDED if now_s >= end_s
              else STATUS_IN_PROGRESS)
    tokens, requests = r.inference_tokens, r.inference_requests
    revenue = r.inference_revenue_micros
    var = dict(r.variable_by_category)
    ledger_var = {k: v for k, v in var.items() if k.startswith("ledger:")}
    lines = [("owner payouts", var.get(OWNER_PAYOUTS, 0)), ("energy", var.get(ENERGY, 0)),
             ("egress", var.get(EGRESS, 0))]
    lines += [(f"fees: {k.removeprefix('ledger:')}", v) for k, v in sorted(ledger_var.items())]
    variable = r.variable_inference_cogs_micros
    contribution = revenue - variable
    joules = dict(r.energy_j_by_source)
    total_j = sum(joules.values())
    measured_j = sum(v for k, v in joules.items() if k in MEASURED_SOURCES)
    measured_pct = round(100.0 * measured_j / total_j, 1) if total_j > 0 else None
    energy_label = ("no energy metered" if measured_pct is None else "measured"
                    if measured_pct == 100.0 else "estimated" if measured_pct == 0.0
                    else f"{measured_pct:g}% measured")
    unit = {
        "price": _per(revenue, tokens, requests),
        "variable_lines": [{"line": name, **_per(v, tokens, requests)} for name, v in lines],
        "variable": _per(variable, tokens, requests),
        "contribution": _per(contribution, tokens, requests),
        "contribution_margin_pct": pct(contribution, revenue),
        "energy": {"label": energy_label, "measured_pct": measured_pct,
                   "share_of_variable_pct": (round(100.0 * var.get(ENERGY, 0) / variable, 1)
                                             if variable > 0 else None)},
    }
    base = dict(r.base_by_category)
    order = [c for c in BASE_LINES if c in base] + sorted(c for c in base if c not in BASE_LINES)
    base_lines = [{"line": c, "budget_micros": base[c],
                   "accrued_micros": base[c] * elapsed_ppm // 1_000_000} for c in order]
    base_total = sum(base.values())
    opex: list[dict[str, Any]] = [{"line": f"{w} (opex)", "budget_micros": v,
                                   "accrued_micros": v * elapsed_ppm // 1_000_000}
                                  for w, v in (("training", r.opex_by_workload.get("training", 0)),
                                               ("R&D", r.opex_by_workload.get("rnd", 0)))
                                  if v]
    fixed_total = base_total + sum(int(x["budget_micros"]) for x in opex)

    def run(x: int) -> int | None:
        return _div(x * 1_000_000, elapsed_ppm)

    tokens_run = run(tokens)
    contribution_run = run(contribution)
    per_token_contribution = (contribution, tokens)  # a fraction: micro-units per token
    break_even = (-(-fixed_total * tokens // contribution)
                  if contribution > 0 and tokens > 0 else None)
    variable_per_mtok = _div(variable * MTOK, tokens)

    def loaded(month_tokens: int | None) -> int | None:
        if not month_tokens or variable_per_mtok is None:
            return None
        return variable_per_mtok + (_div(base_total * MTOK, month_tokens) or 0)

    view: dict[str, Any] = {
        "period_start_s": start_s, "period_end_s": end_s, "now_s": min(now_s, end_s),
        "status": status, "elapsed_ppm": elapsed_ppm, "currency": r.currency,
        "inference_tokens": tokens, "inference_requests": requests,
        "unit": unit,
        "fixed": {"base_lines": base_lines, "base_budget_micros": base_total,
                  "base_accrued_micros": base_total * elapsed_ppm // 1_000_000,
                  "opex_lines": opex, "budget_micros": fixed_total,
                  "accrued_micros": fixed_total * elapsed_ppm // 1_000_000},
        "run_rate": {"revenue_micros": run(revenue), "variable_micros": run(variable),
                     "contribution_micros": contribution_run, "tokens": tokens_run,
                     "requests": run(requests),
                     "result_micros": (None if contribution_run is None
                                       else contribution_run - fixed_total)},
        "break_even": {"tokens_per_month": break_even,
                       "requests_per_month": (_div(break_even * requests, tokens)
                                              if break_even is not None and tokens else None),
                       "contribution_per_mtok_micros": _div(per_token_contribution[0] * MTOK,
                                                            per_token_contribution[1])},
        "fully_loaded_per_mtok_micros": {"at_run_rate": loaded(tokens_run),
                                         "at_break_even": loaded(break_even)},
        "by_model": [{"model": m.key, "requests": m.requests, "tokens": m.inference_tokens,
                      "price_per_mtok_micros": _div(m.revenue_micros * MTOK, m.inference_tokens),
                      "variable_per_mtok_micros": _div(m.variable_micros * MTOK,
                                                       m.inference_tokens),
                      "contribution_per_mtok_micros": _div(
                          (m.revenue_micros - m.variable_micros) * MTOK, m.inference_tokens)}
                     for m in r.by_model if m.inference_tokens],
        "absorbed": None,
    }
    if status != STATUS_IN_PROGRESS:
        cogs = r.totals.cogs_total_micros
        view["absorbed"] = {
            "label": f"absorbed at that month's volume ({requests:,} requests, "
                     f"{tokens:,} tokens)",
            "cogs_micros": cogs, "per_request_micros": _div(cogs, requests),
            "per_mtok_micros": _div(cogs * MTOK, tokens)}
    return view


def sig(micros: int | None, digits: int = 4) -> str:
    """An amount to ``digits`` significant figures, whole units with thousands separators from
    1,000 up, never finer than a micro-unit: 1,235 / 123.5 / 0.001235 / 0.000001."""
    if micros is None:
        return "-"
    value = Decimal(micros) / 1_000_000
    if value == 0:
        return "0"
    places = max(0, min(6, digits - 1 - value.adjusted()))
    text = f"{value.quantize(Decimal(1).scaleb(-places), rounding=ROUND_HALF_UP):,.{places}f}"
    return text
