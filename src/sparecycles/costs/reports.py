"""The cost report of a period: revenue, COGS, margins, fixed base costs, break-even. Pure.

Definitions (docs/costs.md states them at length):

- **Revenue** of a request: what its client was charged (ledger ``post``), less refunds made in
  the period. Refunds of requests charged in an earlier period are ``revenue_corrections``.
- **COGS**: the costs allocated to *inference* requests, by category. Costs allocated to
  training and R&D requests are operating expenses (``opex``), reported separately.
- **Gross margin** = revenue - COGS; **gross margin %** = gross margin / revenue.
- **Contribution margin** = revenue - variable costs (those that scale with volume: owner
  payouts, energy, egress, and the ledger categories the cost model calls variable).
- **Fixed base costs** (the cost of staying in the game): training, R&D, and base
  infrastructure (the fixed part of inference COGS, idle capacity and unallocated costs).
  ``total cost == variable inference COGS + fixed base + corrections`` (checked).
- **Break-even volume**: inference tokens per month whose contribution covers the fixed base:
  ``ceil(fixed base / (contribution per token))``; None when a token contributes nothing.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sparecycles.costs.allocation import (
    BASE,
    CORRECTIONS,
    OWNER_PAYOUTS,
    VARIABLE_CATEGORIES,
    Allocation,
    Pool,
)
from sparecycles.costs.costmodel import CostModel
from sparecycles.costs.economics import NodeEconomics, owner_economics
from sparecycles.costs.usage import JobUsage, OrphanPosting, PeriodUsage
from sparecycles.errors import invariant
from sparecycles.ledger.pricing import PPM

requests_shown_default = 50  # requests listed in a report (the most costly); totals cover all
MTOK = 1_000_000


@dataclass(frozen=True, slots=True)
class Names:
    """Display names for ids (clients, nodes, API keys); an id without a name shows as itself."""

    clients: Mapping[str, str] = field(default_factory=dict)
    nodes: Mapping[str, str] = field(default_factory=dict)
    api_keys: Mapping[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class StageCost:
    """One stage of a request served by a chain: the node that ran layers ``[first, end)``, its
    part of each token's work (``work_ppm``, the share the ledger paid it by), what it metered,
    and the costs allocated to it. The request's COGS is the sum over its stages."""

    attempt: int
    node_id: str
    label: str
    layers: tuple[int, int]
    work_ppm: int
    prompt_tokens: int = 0
    completion_tokens: int = 0
    busy_s: float = 0.0
    energy_j: float = 0.0
    cogs_micros: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    opex_micros: int = 0

    @property
    def cogs_total_micros(self) -> int:
        return sum(self.cogs_micros.values())

    @property
    def earning_micros(self) -> int:
        """Its owner's earning for the stage, as the ledger posted it (net of withholds)."""
        return self.cogs_micros.get(OWNER_PAYOUTS, 0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "attempt": self.attempt, "node_id": self.node_id, "label": self.label,
            "layers": list(self.layers), "work_ppm": self.work_ppm,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "busy_s": round(self.busy_s, 6), "energy_j": round(self.energy_j, 3),
            "cogs_micros": dict(sorted(self.cogs_micros.items())),
            "cogs_total_micros": self.cogs_total_micros, "opex_micros": self.opex_micros,
            "earning_micros": self.earning_micros,
        }


@dataclass(slots=True)
class Row:
    """One line of a breakdown: a request, a client, a model, a day, a node or a device class."""

    key: str
    label: str = ""
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    inference_tokens: int = 0  # the tokens COGS pays for (training and R&D tokens are opex)
    busy_s: float = 0.0
    energy_j: float = 0.0
    revenue_micros: int = 0
    cogs_micros: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    opex_micros: int = 0
    variable_micros: int = 0
    stage_attempts: int = 0  # of a node or a device class: attempts that were a chain's stage
    stages: list[StageCost] = field(default_factory=list)  # of a request served by a chain

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def cogs_total_micros(self) -> int:
        return sum(self.cogs_micros.values())

    @property
    def cost_micros(self) -> int:
        return self.cogs_total_micros + self.opex_micros

    @property
    def gross_margin_micros(self) -> int:
        return self.revenue_micros - self.cogs_total_micros

    @property
    def gross_margin_pct(self) -> float | None:
        """For display only (the money stays integer)."""
        if self.revenue_micros == 0:
            return None
        return round(100.0 * self.gross_margin_micros / self.revenue_micros, 2)

    @property
    def contribution_margin_micros(self) -> int:
        return self.revenue_micros - self.variable_micros

    @property
    def cogs_per_mtok_micros(self) -> int | None:
        """COGS per million inference tokens, rounded half up to a micro-unit."""
        if self.inference_tokens == 0:
            return None
        return (2 * self.cogs_total_micros * MTOK + self.inference_tokens) // (
            2 * self.inference_tokens)

    def as_dict(self) -> dict[str, Any]:
        return {
            "key": self.key, "label": self.label, "requests": self.requests,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "inference_tokens": self.inference_tokens,
            "busy_s": round(self.busy_s, 6), "energy_j": round(self.energy_j, 3),
            "revenue_micros": self.revenue_micros,
            "cogs_micros": dict(sorted(self.cogs_micros.items())),
            "cogs_total_micros": self.cogs_total_micros, "opex_micros": self.opex_micros,
            "gross_margin_micros": self.gross_margin_micros,
            "gross_margin_pct": self.gross_margin_pct,
            "variable_micros": self.variable_micros,
            "contribution_margin_micros": self.contribution_margin_micros,
            "cogs_per_mtok_micros": self.cogs_per_mtok_micros,
            "stage_attempts": self.stage_attempts,
            **({"stages": [st.as_dict() for st in self.stages]} if self.stages else {}),
        }


@dataclass(frozen=True, slots=True)
class CostReport:
    period: str
    currency: str
    cost_model: str
    totals: Row  # every request of the period
    revenue_corrections_micros: int
    idle_micros: Mapping[str, int]
    unallocated_micros: Mapping[str, Mapping[str, int]]  # workload -> category -> micros
    total_cost_micros: int
    allocated_micros: int
    opex_allocated_micros: Mapping[str, int]  # training / rnd -> on their requests
    fixed_base_micros: Mapping[str, int]  # training, rnd, base_infrastructure
    variable_inference_cogs_micros: int
    inference_revenue_micros: int
    inference_tokens: int
    break_even_tokens_per_month: int | None
    contribution_per_mtok_micros: int | None
    by_customer: tuple[Row, ...]
    by_model: tuple[Row, ...]
    by_day: tuple[Row, ...]
    by_node: tuple[Row, ...]
    by_device_class: tuple[Row, ...]
    requests: tuple[Row, ...]  # the most costly, at most ``requests_shown``
    pools: tuple[Pool, ...]
    owners: tuple[NodeEconomics, ...]
    orphans: tuple[OrphanPosting, ...] = ()  # ledger postings with no request row
    # inference costs by category: variable (scale with volume) and fixed base (the fixed
    # part of inference COGS with the idle capacity and unallocated inference/base costs of
    # each category)
    variable_by_category: Mapping[str, int] = field(default_factory=dict)
    base_by_category: Mapping[str, int] = field(default_factory=dict)
    opex_by_workload: Mapping[str, int] = field(default_factory=dict)  # training, rnd: all of it
    inference_requests: int = 0
    energy_j_by_source: Mapping[str, float] = field(default_factory=dict)  # all attempts

    @property
    def revenue_micros(self) -> int:
        return self.totals.revenue_micros + self.revenue_corrections_micros

    @property
    def idle_total_micros(self) -> int:
        return sum(self.idle_micros.values())

    @property
    def unallocated_total_micros(self) -> int:
        return sum(v for by in self.unallocated_micros.values() for v in by.values())

    @property
    def fixed_base_total_micros(self) -> int:
        return sum(self.fixed_base_micros.values())

    @property
    def gross_margin_micros(self) -> int:
        return self.revenue_micros - self.totals.cogs_total_micros

    @property
    def operating_result_micros(self) -> int:
        return self.revenue_micros - self.total_cost_micros

    def as_dict(self) -> dict[str, Any]:
        gm = self.gross_margin_micros
        return {
            "period": self.period, "currency": self.currency, "cost_model": self.cost_model,
            "summary": {
                "requests": self.totals.requests, "tokens": self.totals.tokens,
                "revenue_micros": self.revenue_micros,
                "revenue_corrections_micros": self.revenue_corrections_micros,
                "cogs_micros": dict(sorted(self.totals.cogs_micros.items())),
                "cogs_total_micros": self.totals.cogs_total_micros,
                "gross_margin_micros": gm,
                "gross_margin_pct": (round(100.0 * gm / self.revenue_micros, 2)
                                     if self.revenue_micros else None),
                "idle_micros": dict(self.idle_micros),
                "opex_allocated_micros": dict(self.opex_allocated_micros),
                "unallocated_micros": {w: dict(c) for w, c in self.unallocated_micros.items()},
                "total_cost_micros": self.total_cost_micros,
                "operating_result_micros": self.operating_result_micros,
            },
            "conservation": {
                "allocated_micros": self.allocated_micros,
                "idle_micros": self.idle_total_micros,
                "unallocated_micros": self.unallocated_total_micros,
                "total_micros": self.total_cost_micros,
                "holds": (self.allocated_micros + self.idle_total_micros
                          + self.unallocated_total_micros == self.total_cost_micros),
            },
            "fixed_base": {**self.fixed_base_micros,
                           "total_micros": self.fixed_base_total_micros},
            "break_even": {
                "tokens_per_month": self.break_even_tokens_per_month,
                "contribution_per_mtok_micros": self.contribution_per_mtok_micros,
                "inference_tokens_this_period": self.inference_tokens,
                "inference_revenue_micros": self.inference_revenue_micros,
                "variable_inference_cogs_micros": self.variable_inference_cogs_micros,
            },
            "cost_per_mtok_micros": {
                "by_model": {r.key: r.cogs_per_mtok_micros for r in self.by_model},
                "by_device_class": {r.key: r.cogs_per_mtok_micros for r in self.by_device_class},
            },
            "by_customer": [r.as_dict() for r in self.by_customer],
            "by_model": [r.as_dict() for r in self.by_model],
            "by_day": [r.as_dict() for r in self.by_day],
            "by_node": [r.as_dict() for r in self.by_node],
            "by_device_class": [r.as_dict() for r in self.by_device_class],
            "requests": [r.as_dict() for r in self.requests],
            "pools": [{"name": p.name, "category": p.category, "total_micros": p.total_micros,
                       "basis": p.basis} for p in self.pools],
            "owners": [o.as_dict() for o in self.owners],
            "inference_costs": {"variable_micros": dict(sorted(self.variable_by_category.items())),
                                "base_micros": dict(sorted(self.base_by_category.items())),
                                "opex_micros": dict(sorted(self.opex_by_workload.items())),
                                "inference_requests": self.inference_requests},
            "energy_j_by_source": {k: round(v, 3)
                                   for k, v in sorted(self.energy_j_by_source.items())},
            "orphan_postings": [{"kind": o.kind, "count": o.count,
                                 "amount_micros": o.amount_micros, "job_ids": list(o.job_ids)}
                                for o in self.orphans],
        }


def _variable(category: str, model: CostModel) -> bool:
    return (category in VARIABLE_CATEGORIES
            or (category.removeprefix("ledger:") in model.variable_ledger_categories
            and category.startswith("ledger:")))


class _Rows:
    def __init__(self, label: Callable[[str], str] = lambda k: k):
        self.rows: dict[str, Row] = {}
        self.label = label

    def __getitem__(self, key: str) -> Row:
        if key not in self.rows:
            self.rows[key] = Row(key, self.label(key))
        return self.rows[key]

    def sorted(self, by: Callable[[Row], Any] = lambda r: r.key) -> tuple[Row, ...]:
        return tuple(sorted(self.rows.values(), key=by))


def _add_job(rows: Iterable[Row], job: JobUsage) -> None:
    for r in rows:
        r.requests += 1
        r.prompt_tokens += job.prompt_tokens
        r.completion_tokens += job.completion_tokens
        r.inference_tokens += job.tokens if job.workload == "inference" else 0
        r.revenue_micros += job.revenue_micros
        r.busy_s += sum(a.busy_s for a in job.attempts)
        r.energy_j += sum(a.energy_j for a in job.attempts)


def _add_cost(rows: Iterable[Row], category: str, amount: int, workload: str,
              variable: bool) -> None:
    for r in rows:
        if workload == "inference":
            r.cogs_micros[category] += amount
        else:
            r.opex_micros += amount
        if variable:
            r.variable_micros += amount


def build_report(usage: PeriodUsage, model: CostModel, alloc: Allocation,
                 names: Names | None = None, *,
                 requests_shown: int = requests_shown_default) -> CostReport:
    """The report of ``alloc`` (made by ``allocate(usage, model)``)."""
    model = model.for_period(usage.period.start_s)  # the rates in effect that month
    names = names or Names()
    nodes = usage.nodes
    total = Row("total", "all requests")
    customers = _Rows(lambda k: names.clients.get(k, k))
    models, days, classes = _Rows(), _Rows(), _Rows()
    node_rows = _Rows(lambda k: names.nodes.get(k, nodes[k].name if k in nodes else k))
    requests = _Rows()
    period = usage.period
    for job in usage.jobs:
        rows = (total, customers[job.client_id], models[job.model], days[period.day(job.at_s)],
                requests[job.job_id])
        _add_job(rows, job)
        requests[job.job_id].label = f"{job.model} {job.workload} {job.state}"
        for a in job.attempts:
            cls = nodes[a.node_id].device_class if a.node_id in nodes else "unknown"
            for r in (node_rows[a.node_id], classes[cls]):
                r.requests += 1
                r.stage_attempts += a.is_stage
                r.prompt_tokens += a.prompt_tokens
                r.completion_tokens += a.completion_tokens
                if job.workload == "inference":  # a stage's tokens count for its part of them
                    r.inference_tokens += ((a.prompt_tokens + a.completion_tokens)
                                           * a.work_ppm // PPM)
                r.busy_s += a.busy_s
                r.energy_j += a.energy_j
            if a.layers is not None:
                requests[job.job_id].stages.append(StageCost(
                    a.attempt, a.node_id, node_rows[a.node_id].label, a.layers, a.work_ppm,
                    a.prompt_tokens, a.completion_tokens, a.busy_s, a.energy_j))
    stage_of = {(job_id, st.attempt, st.node_id): st
                for job_id, r in requests.rows.items() for st in r.stages}
    opex_alloc: dict[str, int] = defaultdict(int)
    variable_inference = inference_fixed = 0
    var_by: dict[str, int] = defaultdict(int)
    base_by: dict[str, int] = defaultdict(int)
    for unit, cats in alloc.units.items():
        unit_job = alloc.jobs.get(unit[0])
        invariant(unit_job is not None, f"cost allocated to an unknown request {unit[0]}")
        assert unit_job is not None
        w = alloc.unit_workload.get(unit, unit_job.workload)
        cls = nodes[unit[2]].device_class if unit[2] in nodes else "unknown"
        unit_rows = (total, customers[unit_job.client_id], models[unit_job.model],
                     days[period.day(unit_job.at_s)], requests[unit_job.job_id],
                     node_rows[unit[2]], classes[cls])
        stage = stage_of.get(unit)
        for cat, amount in cats.items():
            var = _variable(cat, model)
            _add_cost(unit_rows, cat, amount, w, var)
            if stage is not None:
                if w == "inference":
                    stage.cogs_micros[cat] += amount
                else:
                    stage.opex_micros += amount
            if w == "inference":
                variable_inference += amount if var else 0
                inference_fixed += 0 if var else amount
                (var_by if var else base_by)[cat] += amount
            else:
                opex_alloc[w] += amount
    unallocated: dict[str, dict[str, int]] = defaultdict(dict)
    for (cat, w), amount in sorted(alloc.unallocated.items()):
        unallocated[w][cat] = amount
    un_by = {w: sum(c.values()) for w, c in unallocated.items()}
    # a budget line is the category's whole month, whether a request, idle capacity or
    # nobody carried it (the P&L of --wide keeps them apart)
    for cat, amount in alloc.idle.items():
        base_by[cat] += amount
    for w in ("inference", BASE):
        for cat, amount in unallocated.get(w, {}).items():
            base_by[cat] += amount
    energy_by: dict[str, float] = defaultdict(float)
    for job in usage.jobs:
        for a in job.attempts:
            energy_by[a.energy_source] += a.energy_j
    fixed = {
        "training_micros": opex_alloc["training"] + un_by.get("training", 0),
        "rnd_micros": opex_alloc["rnd"] + un_by.get("rnd", 0),
        "base_infrastructure_micros": (inference_fixed + alloc.idle_micros
                                       + un_by.get("inference", 0) + un_by.get(BASE, 0)),
    }
    invariant(variable_inference + sum(fixed.values()) + un_by.get(CORRECTIONS, 0)
              == alloc.total_micros, "the fixed base and variable COGS must add up to the total")
    inference_jobs = [j for j in usage.jobs if j.workload == "inference"]
    revenue_i = sum(j.revenue_micros for j in inference_jobs)
    tokens_i = sum(j.tokens for j in inference_jobs)
    contribution = revenue_i - variable_inference
    fixed_total = sum(fixed.values())
    break_even = per_mtok = None
    if contribution > 0 and tokens_i > 0:
        break_even = -(-fixed_total * tokens_i // contribution)
        per_mtok = contribution * MTOK // tokens_i
    corrections = -sum(c.amount_micros for c in usage.corrections)
    by_cost: Callable[[Row], Any] = lambda r: (-r.cost_micros, r.key)  # noqa: E731
    return CostReport(
        period=period.label, currency=usage.currency, cost_model=model.source, totals=total,
        revenue_corrections_micros=corrections, idle_micros=dict(alloc.idle),
        unallocated_micros=dict(unallocated), total_cost_micros=alloc.total_micros,
        allocated_micros=alloc.allocated_micros, opex_allocated_micros=dict(opex_alloc),
        fixed_base_micros=fixed, variable_inference_cogs_micros=variable_inference,
        inference_revenue_micros=revenue_i, inference_tokens=tokens_i,
        break_even_tokens_per_month=break_even, contribution_per_mtok_micros=per_mtok,
        by_customer=customers.sorted(by_cost), by_model=models.sorted(), by_day=days.sorted(),
        by_node=node_rows.sorted(by_cost), by_device_class=classes.sorted(),
        requests=requests.sorted(by_cost)[:max(0, requests_shown)], pools=alloc.pools,
        owners=tuple(owner_economics(usage, model)), orphans=usage.orphans,
        variable_by_category={k: v for k, v in var_by.items() if v},
        base_by_category={k: v for k, v in base_by.items() if v},
        opex_by_workload={"training": fixed["training_micros"], "rnd": fixed["rnd_micros"]},
        inference_requests=len(inference_jobs), energy_j_by_source=dict(energy_by),
    )
