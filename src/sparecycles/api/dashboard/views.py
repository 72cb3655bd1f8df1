"""What each dashboard page shows: its numbers, tables and figures, built from the store.

Each builder is synchronous (the routes run it in a worker thread) and returns one dict: ``stats``
(the tiles), ``charts`` (plotly figures) and ``tables`` (rows for the template). The JSON
endpoints send ``stats`` and ``charts``, which is what the pages poll. Owner and client builders
take the signed-in principal's id and read nothing else.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import defaultdict
from typing import Any

from cachetools import LRUCache

from sparecycles.api.dashboard import charts as ch
from sparecycles.api.dashboard import forms as forms
from sparecycles.costs.costmodel import load_cost_model
from sparecycles.costs.period import PeriodCosts, period_reconciliation
from sparecycles.costs.reconcile import Reconciliation
from sparecycles.errors import SpareCyclesError
from sparecycles.store.dashboard_queries import DashboardQueries
from sparecycles.store.trust_queries import TrustQueries
from sparecycles.trust.reputation import reputation as reputation_of

costs_cache_s = 30.0  # a period's cost report is computed at most this often per coordinator
costs_cache_entries_max = 24
earnings_days = 30
verifications_shown = 20  # an owner's latest verification results listed
LATENCY = (("total p50", "total_s", 50), ("total p95", "total_s", 95),
           ("total p99", "total_s", 99), ("first token p50", "ttft_s", 50),
           ("first token p95", "ttft_s", 95))


# coordinator -> period -> (expires, costs, reconciliation); the least recent period goes first
_CostsByPeriod = LRUCache[str, tuple[float, PeriodCosts, Reconciliation]]
_costs_cache: weakref.WeakKeyDictionary[Any, _CostsByPeriod] = weakref.WeakKeyDictionary()
_costs_lock = threading.Lock()  # pages are rendered on worker threads too


def period_of(now_s: float) -> str:
    return time.strftime("%Y-%m", time.gmtime(now_s))


def period_costs_cached(coord: Any, period: str, now_s: float
                        ) -> tuple[PeriodCosts, Reconciliation]:
    """The period's cost report and reconciliation, shared by the owner and finance pages."""
    with _costs_lock:
        cache = _costs_cache.get(coord)
        if cache is None:
            cache = _costs_cache[coord] = LRUCache(costs_cache_entries_max)
        hit = cache.get(period)
    if hit is not None and now_s < hit[0]:
        return hit[1], hit[2]
    pc, rec = period_reconciliation(coord.store.sessions, period, load_cost_model(),
                                    coord.ledger.currency)
    with _costs_lock:
        cache[period] = (now_s + costs_cache_s, pc, rec)
    return pc, rec


def _live(coord: Any) -> dict[str, Any]:
    d = coord.dispatcher
    return dict(d.nodes) if d is not None else {}


def _trust(coord: Any, owner_id: str | None) -> dict[str, Any]:
    """node id -> what verification learnt of it (``reputation.NodeTrust``), of one owner."""
    return {r["node_id"]: r["trust"] for r in
            TrustQueries(coord.store.sessions).nodes_trust(owner_id) if r["trust"] is not None}


def _node_row(n: dict[str, Any], live: dict[str, Any], trust: dict[str, Any]
              ) -> dict[str, Any]:
    conn, t = live.get(n["id"]), trust.get(n["id"])
    outcomes = n["outcomes"]
    rep = (reputation_of(t) if t is not None
           else None if conn is None else float(conn.reputation))
    return {**n, "reputation": None if rep is None else f"{rep:.3f}",
            "running": None if conn is None else len(conn.jobs),
            "checks": 0 if t is None else t.checks, "failures": 0 if t is None else t.failures,
            "quarantined": bool(t is not None and t.quarantined),
            "quarantine_reason": "" if t is None else t.quarantine_reason,
            "last_seen": ch.when(n["last_seen_at_s"]),
            "models_text": ", ".join(m.get("name", "?") for m in n["models"] or []),
            "done": outcomes.get("done", 0), "departed": outcomes.get("node_lost", 0),
            "bad_signature": outcomes.get("bad_signature", 0),
            "failed": outcomes.get("failed", 0)}


# ---- chains: jobs served by stages on several nodes -------------------------------------------

# how a stage ended that made its chain repair itself (anything but done, running, cancelled)
STAGE_LOSSES = frozenset({"failed", "drained", "node_lost", "node_silent", "protocol_gap",
                          "bad_signature", "bad_metering", "replica_lost"})


def _share(part: int, whole: int) -> str:
    return "—" if whole <= 0 else f"{100 * part / whole:.1f} %"


def _stage_row(st: dict[str, Any], cur: str) -> dict[str, Any]:
    """One stage attempt as a table shows it. ``joined`` is the token of the answer it joined
    the chain at (a replacement joins after the first): the prompt it prefilled beyond the
    job's own."""
    work = int(st["work_ppm"] or 0)
    earned = int(st["earned_micros"]) - int(st["withheld_micros"])
    return {
        "job_id": st["job_id"], "attempt": st["attempt"], "node": st["node_name"] or st["node_id"],
        "owner": st["owner"] or "—", "model": st["model"],
        "layers": f"{st['layer_first']}:{st['layer_end']}", "work": f"{work / 10_000:.1f} %",
        "tokens": int(st["prompt_tokens"] or 0) + int(st["completion_tokens"] or 0),
        "completion_tokens": int(st["completion_tokens"] or 0),
        "joined": max(0, int(st["prompt_tokens"] or 0) - int(st["job_prompt_tokens"] or 0)),
        "busy": ch.duration(float(st["busy_s"] or 0.0)), "outcome": st["outcome"],
        "lost": st["outcome"] in STAGE_LOSSES, "earned": ch.money(earned, cur),
        "withheld": int(st["withheld_micros"]) > 0,
        "pay_share": _share(earned, int(st["job_paid_micros"])),
        "when": ch.when(st["started_at_s"]),
    }


def chains_table(q: DashboardQueries, cur: str, since_s: float) -> list[dict[str, Any]]:
    """The newest jobs served by chains, each with its stages: node, layers, part of each
    token's work, share of the owners' pay (the ledger's split by measured work), earning, and
    how the stage ended; ``repairs`` counts the stages lost mid-answer (each one replaced, or
    the job ended)."""
    out = []
    for job in q.chain_jobs(since_s):
        stages = job["stages"]
        paid = stages[0]["job_paid_micros"] if stages else 0
        rows = [_stage_row(st, cur) for st in stages]
        out.append({
            "id": job["id"], "model": job["model"], "client": job["client"] or "—",
            "state": job["state"], "when": ch.when(job["created_at_s"]),
            "tokens": int(job["prompt_tokens"] or 0) + int(job["completion_tokens"] or 0),
            "completion_tokens": int(job["completion_tokens"] or 0),
            "total": ch.duration(job["total_s"]), "charged": ch.money(job["charged_micros"], cur),
            "paid": ch.money(paid, cur), "repairs": sum(r["lost"] for r in rows),
            "nodes": len({st["node_id"] for st in stages}), "stages": rows,
            "error": (job["error"] or "")[:200]})
    return out


# ---- network (admin) --------------------------------------------------------------------------


def network(q: DashboardQueries, coord: Any, range_name: str | None, now_s: float
            ) -> dict[str, Any]:
    rng, span, size = ch.range_of(range_name)
    bs = ch.buckets(now_s, span, size)
    since, until = bs[0], now_s + 1
    xs = [ch.stamp(b) for b in bs]
    index = {b: i for i, b in enumerate(bs)}

    classes: dict[str, list[float | None]] = {}
    online: list[float | None] = [None] * len(bs)
    queue: list[int | None] = [None] * len(bs)
    for b, cls, mean_online, _busy, _online, queue_max in q.fleet_series(since, until, size):
        i = index.get(int(b))
        if i is None:
            continue
        queue[i] = max(queue[i] or 0, int(queue_max or 0))
        online[i] = (online[i] or 0.0) + (float(mean_online) if cls else 0.0)
        if cls:
            classes.setdefault(cls, [None] * len(bs))[i] = round(float(mean_online), 2)
    for ys in classes.values():  # a class missing from a sample had no node online
        for i in range(len(bs)):
            if ys[i] is None and queue[i] is not None:
                ys[i] = 0.0
    # utilization: busy node-seconds the nodes reported / online node-seconds (the last sample
    # carries forward over buckets without one)
    busy_s = [0.0] * len(bs)
    for b, total in q.busy_series(since, until, size):
        i = index.get(int(b))
        if i is not None:
            busy_s[i] = float(total or 0.0)
    util: list[float | None] = []
    last: float | None = None
    for i in range(len(bs)):
        last = online[i] if online[i] is not None else last
        util.append(None if not last else round(min(100.0, 100 * busy_s[i] / (last * size)), 2))

    reqs, toks = [0.0] * len(bs), [0.0] * len(bs)
    total_requests = total_tokens = failed = 0
    for b, n, nfail, prompt, completion in q.job_series(since, until, size):
        i = index.get(int(b))
        if i is None:
            continue
        tokens = int(prompt or 0) + int(completion or 0)
        reqs[i], toks[i] = round(n / size, 4), round(tokens / size, 2)
        total_requests, total_tokens, failed = (total_requests + n, total_tokens + tokens,
                                                failed + int(nfail or 0))

    lat: dict[int, dict[str, list[float]]] = defaultdict(lambda: {"ttft_s": [], "total_s": []})
    for created, ttft, total in q.latency_rows(since, until):
        b = int(created // size) * size
        if ttft is not None:
            lat[b]["ttft_s"].append(float(ttft))
        lat[b]["total_s"].append(float(total))
    for v in lat.values():
        v["ttft_s"].sort()
        v["total_s"].sort()
    all_total = sorted(t for v in lat.values() for t in v["total_s"])

    departed: dict[str, list[int]] = {}
    for b, cls, n in q.departures(since, until, size):
        i = index.get(int(b))
        if i is not None:
            departed.setdefault(cls or "unknown", [0] * len(bs))[i] += int(n)

    xr = ch.span_of(bs, size)
    fleet = q.fleet_now(now_s)
    queue_now = fleet.pop("")["queue"]
    trust = _trust(coord, None)
    nodes = [_node_row(n, _live(coord), trust) for n in q.nodes()]
    charts = {
        "nodes_online": ch.figure(
            [ch.trace(c, *ch.present(xs, ys), kind="area", i=i) for i, (c, ys) in
             enumerate(sorted(classes.items()))], ch.TIME_AXIS, "nodes online (mean)", x_range=xr),
        "utilization": ch.figure(
            [ch.trace("busy node-seconds / online node-seconds", xs, util, i=0)],
            ch.TIME_AXIS, "utilization (%)", x_range=xr),
        "queue": ch.figure([ch.trace("jobs waiting for a node", xs, queue, i=3)], ch.TIME_AXIS,
                           "queue depth (jobs)", x_range=xr),
        "throughput": ch.figure(
            [ch.trace("requests/s", xs, reqs, kind="bar", i=0, opacity=0.55),
             ch.trace("tokens/s (prompt + output)", xs, toks, i=1, yaxis="y2")],
            ch.TIME_AXIS, "requests per second", y2_title="tokens per second", x_range=xr),
        "latency": ch.figure(
            [ch.trace(name, xs, [ch.percentile(lat[b][field], p) if b in lat else None
                                 for b in bs], i=i,
                      line={"dash": "dot" if field == "ttft_s" else "solid",
                            "color": ch.PALETTE[i]})
             for i, (name, field, p) in enumerate(LATENCY)], ch.TIME_AXIS, "latency (s)",
            x_range=xr),
        "departures": ch.figure(
            [ch.trace(c, xs, ys, kind="bar", i=i) for i, (c, ys) in
             enumerate(sorted(departed.items()))], ch.TIME_AXIS,
            "jobs interrupted (node left)", barmode="stack", x_range=xr),
    }
    stats = {
        "nodes_online": str(sum(v["online"] for v in fleet.values())),
        "nodes_busy": str(sum(v["busy"] for v in fleet.values())),
        "queue": str(queue_now),
        "requests": f"{total_requests:,}" + (f" ({failed} failed)" if failed else ""),
        "tokens_per_s": f"{total_tokens / span:.2f}",
        "latency_p95": ch.duration(ch.percentile(all_total, 95)),
        "departures": str(sum(sum(v) for v in departed.values())),
    }
    chains = chains_table(q, coord.ledger.currency, since)
    return {"range": rng, "stats": stats, "charts": charts,
            "tables": {"nodes": nodes, "chains": chains}}


# ---- owner ------------------------------------------------------------------------------------


def owner(q: DashboardQueries, coord: Any, owner_id: str, now_s: float) -> dict[str, Any]:
    cur = coord.ledger.currency
    trust = _trust(coord, owner_id)
    nodes = [_node_row(n, _live(coord), trust) for n in q.nodes(owner_id)]
    names = {n["id"]: n["name"] for n in nodes}
    checks = [{"when": ch.when(v["created_at_s"]), "node": names.get(v["node_id"], v["node_id"]),
               "method": str(v["method"]).replace("_", " "), "outcome": v["outcome"],
               "reason": (v["reason"] or "")[:160], "tokens": v["tokens_checked"],
               "withheld": ch.money(v["withheld_micros"], cur)}
              for v in TrustQueries(coord.store.sessions).verifications(
                  owner_id=owner_id, limit=verifications_shown)]
    withheld = q.owner_withheld_by_node(owner_id)
    economics, economics_error = {}, None
    try:
        pc, _rec = period_costs_cached(coord, period_of(now_s), now_s)
        economics = {e.node_id: e for e in pc.report.owners if e.owner_id == owner_id}
    except (SpareCyclesError, OSError, ValueError) as exc:
        economics_error = str(exc)[:300]
    for n in nodes:
        e = economics.get(n["id"])
        n["withheld"] = ch.money(withheld.get(n["id"], 0), cur)
        n["economics"] = None if e is None else {
            "earned": ch.money(e.earned_micros, cur),
            "electricity": ch.money(e.electricity_micros, cur),
            "wear": ch.money(e.wear_micros, cur), "net": ch.money(e.net_micros, cur),
            "net_per_hour": ch.money(e.net_per_busy_hour_micros, cur),
            "busy": ch.duration(e.busy_s), "figures_from": e.figures_from,
            "negative": e.net_micros < 0}
        n["policy"] = forms.policy_form_values(n["availability"] or {})

    first_day = int(now_s // 86_400) * 86_400 - (earnings_days - 1) * 86_400
    days = [first_day + i * 86_400 for i in range(earnings_days)]
    earned, taken = dict.fromkeys(days, 0), dict.fromkeys(days, 0)
    for b, e_sum, w_sum in q.owner_earnings_by_day(owner_id, first_day):
        if int(b) in earned:
            earned[int(b)], taken[int(b)] = int(e_sum or 0), int(w_sum or 0)
    xs = [ch.day(d) for d in days]
    device_names = [e.name for e in economics.values()]
    charts = {
        "earnings": ch.figure(
            [ch.trace("earned", xs, [ch.units(earned[d]) for d in days], kind="bar", i=2),
             ch.trace("withheld by verification", xs, [ch.units(-taken[d]) for d in days],
                      kind="bar", i=3)],
            "day (UTC)", f"earnings ({cur})", barmode="relative", money_axis=True, days=True),
        "profit": ch.figure(
            [ch.trace(label, device_names,
                      [ch.units(getattr(e, attr) * sign) for e in economics.values()],
                      kind="bar", i=i)
             for label, attr, sign, i in (
                 ("earned", "earned_micros", 1, 2), ("electricity", "electricity_micros", -1, 1),
                 ("wear", "wear_micros", -1, 8), ("net profit", "net_micros", 1, 0))]
            if economics else [],
            "device", f"this month ({cur})", barmode="group", x_type="category",
            money_axis=True),
    }
    bal = coord.ledger.owner_balance(owner_id)
    net = sum(e.net_micros for e in economics.values())
    stats = {
        "devices_online": f"{sum(n['status'] == 'online' for n in nodes)} of {len(nodes)}",
        "earned_30d": ch.money_short(sum(earned.values()) - sum(taken.values()), cur),
        "net_month": ch.money_short(net, cur) if economics else "—",
        "balance_earned": ch.money_short(bal.earned_micros, cur),
        "paid": ch.money_short(bal.paid_micros, cur),
    }
    payouts = [{**p, "amount": ch.money(p["amount_micros"], p["currency"]),
                "created": ch.when(p["created_at_s"]), "paid": ch.when(p["paid_at_s"])}
               for p in q.owner_payouts(owner_id)]
    stage_jobs = [_stage_row(st, cur) for st in q.owner_stage_jobs(owner_id)]
    return {"stats": stats, "charts": charts,
            "tables": {"nodes": nodes, "payouts": payouts, "checks": checks,
                       "stage_jobs": stage_jobs,
                       "economics_error": economics_error,
                       "balance": {"earned": ch.money(bal.earned_micros, cur),
                                   "payable": ch.money(bal.payable_micros, cur),
                                   "paid": ch.money(bal.paid_micros, cur)}}}


# ---- client -----------------------------------------------------------------------------------


def client(q: DashboardQueries, coord: Any, client_id: str, range_name: str | None,
           now_s: float) -> dict[str, Any]:
    cur = coord.ledger.currency
    rng, span, size = ch.range_of(range_name)
    bs = ch.buckets(now_s, span, size)
    xs = [ch.stamp(b) for b in bs]
    index = {b: i for i, b in enumerate(bs)}
    keys = q.client_keys(client_id, now_s)
    key_names = {k["id"]: f"{k['name']} ({k['prefix']}…)" for k in keys}
    spend: dict[str, list[int]] = {}
    tokens: dict[str, list[int]] = {}
    per_key: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    per_model: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    for b, key_id, model, n, tok, charged in q.client_series(client_id, bs[0], now_s + 1, size):
        i = index.get(int(b))
        if i is None:
            continue
        key = key_names.get(key_id or "", key_id or "no key")
        spend.setdefault(key, [0] * len(bs))[i] += int(charged or 0)
        tokens.setdefault(model, [0] * len(bs))[i] += int(tok or 0)
        for acc in (per_key[key], per_model[model]):
            acc[0] += int(n)
            acc[1] += int(tok or 0)
            acc[2] += int(charged or 0)
    charts = {
        "spend": ch.figure(
            [ch.trace(k, xs, [ch.units(v) for v in ys], kind="bar", i=i)
             for i, (k, ys) in enumerate(sorted(spend.items()))],
            ch.TIME_AXIS, f"charged ({cur})", barmode="stack", money_axis=True,
            x_range=ch.span_of(bs, size)),
        "tokens": ch.figure(
            [ch.trace(m, xs, ys, kind="bar", i=i + 2)
             for i, (m, ys) in enumerate(sorted(tokens.items()))],
            ch.TIME_AXIS, "tokens (prompt + output)", barmode="stack",
            x_range=ch.span_of(bs, size)),
    }
    bal = coord.ledger.client_balance(client_id)
    for k in keys:
        k.update(created=ch.when(k["created_at_s"]), revoked=k["revoked_at_s"] is not None,
                 month_spend=ch.money(k["month_spend_micros"], cur),
                 budget=("" if k["budget_micros_per_month"] is None
                         else ch.money(k["budget_micros_per_month"], None)),
                 rpm="" if k["requests_per_minute"] is None else k["requests_per_minute"])

    def rows(d: dict[str, list[int]]) -> list[dict[str, Any]]:
        return [{"name": name, "requests": r, "tokens": f"{t:,}", "charged": ch.money(c, cur)}
                for name, (r, t, c) in sorted(d.items(), key=lambda kv: -kv[1][2])]

    stats = {
        "balance": ch.money_short(bal.available_micros, cur),
        "held": ch.money_short(bal.held_micros, cur),
        "requests": f"{sum(v[0] for v in per_key.values()):,}",
        "tokens": f"{sum(v[1] for v in per_key.values()):,}",
        "charged": ch.money_short(sum(v[2] for v in per_key.values()), cur),
    }
    return {"range": rng, "stats": stats, "charts": charts,
            "tables": {"keys": keys, "per_key": rows(per_key), "per_model": rows(per_model),
                       "currency": cur}}
