"""Allocation: every cost of a period lands on a request, on idle capacity, or on "unallocated".

Pure: usage records (what the jobs did, as metered, with what the ledger posted for them) and a
cost model go in; an ``Allocation`` comes out. No database, clock or randomness.

The unit of allocation is one *attempt* of a job on one node (``Unit = (job, attempt, node)``):
a request's cost is the sum over its attempts, a node's the sum over the attempts it ran, and a
client's, a model's and a day's the sum over their requests. A request served by a chain has one
attempt per stage (``AttemptUsage.layers``), so its cost is the sum over its stages, and each
stage's node carries its own part: its earning as the ledger split it (by the stage's share of
the work), the joules and busy seconds metered on it for energy and depreciation, and its share
of each token sent for egress. Each cost is a *pool* (one server's
month, one person's hours, one GPU's depreciation...) with an integer total of micro-units, split
by integer weights with the largest-remainder method, so that for every period, exactly::

    allocated + idle + unallocated == sum(pool totals) == total cost        (checked: invariant)

How each pool is split (docs/costs.md explains why):

================  =======================================================================
owner payouts     direct: each node's earning for the job, net of withholds (ledger)
energy            platform hardware only: the attempts' metered joules, the rest of the
                  month's idle draw is idle capacity; x PUE x the platform's tariff
depreciation      platform hardware serving as a node: busy microseconds of its attempts,
                  its in-service microseconds nobody used are idle capacity
servers, storage  shared: split between workloads by measured node-seconds (or the shares
                  the cost model gives), then within a workload by busy microseconds
egress            tokens sent to clients (completion tokens; a chain's stages by their
                  share of each token's work)
staff             each person's hours by their activity shares, then by busy microseconds
ledger costs      ``cost:cogs:*`` over inference; ``cost:opex:training|rnd`` over that
                  workload; other opex is unallocated (a base cost of staying in the game)
================  =======================================================================

A share that finds no request to land on (a server in a month with no jobs, the training share of
a person when no training job ran) is *unallocated*, by workload; never spread over the others.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from typing import Any, TypeVar

from sparecycles.costs.costmodel import WORKLOADS, CostModel, Shares
from sparecycles.costs.usage import (
    AttemptUsage,
    Correction,
    JobUsage,
    LedgerCost,
    NodeEarning,
    NodeInfo,
    Period,
    PeriodUsage,
)
from sparecycles.errors import InvalidRequest, invariant
from sparecycles.ledger.pricing import PPM

__all__ = [
    "Allocation",
    "AttemptUsage",
    "Correction",
    "JobUsage",
    "LedgerCost",
    "NodeEarning",
    "NodeInfo",
    "Period",
    "PeriodUsage",
    "Pool",
    "allocate",
    "largest_remainder",
]

K = TypeVar("K", bound=Hashable)
Unit = tuple[str, int, str]  # (job id, attempt, node id)
IDLE = "(idle)"
BASE = "base"  # unallocated with no workload to carry it
CORRECTIONS = "corrections"  # refunds this period of jobs charged in an earlier one
OWNER_PAYOUTS, ENERGY, DEPRECIATION = "owner_payouts", "energy", "depreciation"
SERVERS, STORAGE, EGRESS, STAFF = "servers", "storage", "egress", "staff"
VARIABLE_CATEGORIES = frozenset({OWNER_PAYOUTS, ENERGY, EGRESS})  # scale with volume
J_PER_KWH = 3_600_000


def to_micros(value: Decimal) -> int:
    """A pool's exact total rounded to a whole micro-unit, half up (the one rounding of a pool;
    its split is exact)."""
    return int(value.to_integral_value(rounding=ROUND_HALF_UP))


def largest_remainder(total: int, weights: Sequence[tuple[K, int]]) -> dict[K, int]:
    """Split ``total`` in proportion to non-negative integer weights, conserving it exactly:
    each key gets ``floor(total * w / W)``, then the micro-units left over go one each to the
    largest remainders (ties: the earlier key). Keys must be distinct; ``W`` must be positive."""
    if total < 0:
        return {k: -v for k, v in largest_remainder(-total, weights).items()}
    keys = [k for k, _ in weights]
    invariant(len(set(keys)) == len(keys), "largest_remainder: duplicate keys")
    invariant(all(isinstance(w, int) and w >= 0 for _, w in weights),
              "largest_remainder: weights are non-negative integers")
    whole = sum(w for _, w in weights)
    invariant(whole > 0, "largest_remainder: the weights sum to zero")
    shares = [total * w // whole for _, w in weights]
    left = total - sum(shares)
    order = sorted(range(len(weights)), key=lambda i: (-(total * weights[i][1] % whole), i))
    for i in order[:left]:
        shares[i] += 1
    invariant(sum(shares) == total, "largest_remainder lost a micro-unit")
    return dict(zip(keys, shares, strict=True))


# ---- output ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Pool:
    name: str  # e.g. "server:coordinator", "person:alice", "hardware:gpu-1"
    category: str
    total_micros: int
    basis: str


@dataclass(frozen=True, slots=True)
class Allocation:
    period: Period
    currency: str
    pools: tuple[Pool, ...]
    units: Mapping[Unit, Mapping[str, int]]  # attempt -> category -> micros
    unit_workload: Mapping[Unit, str]
    idle: Mapping[str, int]  # category -> micros
    unallocated: Mapping[tuple[str, str], int]  # (category, workload | base | corrections)
    jobs: Mapping[str, JobUsage]
    internal_earnings_micros: int = 0  # earnings of the platform's own nodes: not a cost

    @property
    def total_micros(self) -> int:
        return sum(p.total_micros for p in self.pools)

    @property
    def allocated_micros(self) -> int:
        return sum(sum(c.values()) for c in self.units.values())

    @property
    def idle_micros(self) -> int:
        return sum(self.idle.values())

    @property
    def unallocated_micros(self) -> int:
        return sum(self.unallocated.values())

    def job_costs(self) -> dict[str, dict[str, int]]:
        """Request -> category -> micros (the sum over its attempts)."""
        out: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for (job_id, _, _), cats in self.units.items():
            for cat, v in cats.items():
                out[job_id][cat] += v
        return {j: dict(c) for j, c in out.items()}


# ---- the allocation ----------------------------------------------------------------------------


class _Books:
    def __init__(self, usage: PeriodUsage, model: CostModel):
        self.usage, self.model = usage, model
        self.pools: list[Pool] = []
        self.units: dict[Unit, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.idle: dict[str, int] = defaultdict(int)
        self.unallocated: dict[tuple[str, str], int] = defaultdict(int)
        self.workload: dict[Unit, str] = {}
        self.busy_us: dict[Unit, int] = {}
        self.energy_mj: dict[Unit, int] = {}
        self.tokens_out: dict[Unit, int] = {}
        self.internal = 0
        for job in sorted(usage.jobs, key=lambda j: j.job_id):
            if job.workload not in WORKLOADS:
                raise InvalidRequest(f"job {job.job_id}: unknown workload {job.workload!r}")
            for a in sorted(job.attempts, key=lambda a: a.attempt):
                u = (job.job_id, a.attempt, a.node_id)
                invariant(u not in self.workload, f"attempt {u} listed twice")
                self.workload[u] = job.workload
                self.busy_us[u] = max(0, round(a.busy_s * 1_000_000))
                self.energy_mj[u] = max(0, round(a.energy_j * 1000))
                # tokens sent, times the part of each token's work the attempt did: a chain's
                # stages each count the tokens delivered while they served, and their parts of
                # a token add up to one (a whole-model attempt's part is all of it)
                self.tokens_out[u] = max(0, a.completion_tokens) * min(PPM, max(0, a.work_ppm))
        self.order = sorted(self.workload)
        self.by_job: dict[str, list[Unit]] = defaultdict(list)
        self.by_node: dict[str, list[Unit]] = defaultdict(list)
        for u in self.order:
            self.by_job[u[0]].append(u)
            self.by_node[u[2]].append(u)

    def pool(self, name: str, category: str, total: int, basis: str) -> None:
        self.pools.append(Pool(name, category, total, basis))

    def put(self, category: str, amounts: Mapping[Any, int]) -> None:
        for key, amount in amounts.items():
            if key == IDLE:
                self.idle[category] += amount
            elif amount:
                self.units[key][category] += amount

    def spread(self, name: str, category: str, total: int, shares: Shares | None,
               basis: str = "node-seconds") -> None:
        """A shared cost: to workloads by ``shares`` (or measured busy time), then to attempts
        of each workload by busy microseconds; what finds no attempt stays unallocated."""
        self.pool(name, category, total, basis if shares is None else "shares, then " + basis)
        if total == 0:
            return
        if shares is None:
            by_workload: dict[str, int] = defaultdict(int)
            for u in self.order:
                by_workload[self.workload[u]] += self.busy_us[u]
            weights = [(w, by_workload[w]) for w in WORKLOADS if by_workload[w] > 0]
            if not weights:
                self.unallocated[(category, BASE)] += total
                return
        else:
            weights = [(w, shares[w]) for w in WORKLOADS if shares.get(w, 0) > 0]
        for w, part in largest_remainder(total, weights).items():
            units = [(u, self.busy_us[u]) for u in self.order
                     if self.workload[u] == w and self.busy_us[u] > 0]
            if units:
                self.put(category, largest_remainder(part, units))
            else:
                self.unallocated[(category, w)] += part

    def owner_payouts(self) -> None:
        total = 0
        for job in sorted(self.usage.jobs, key=lambda j: j.job_id):
            for e in job.earnings:
                if e.owner_id in self.model.platform_owner_ids:
                    self.internal += e.amount_micros
                    continue
                on_node = [u for u in self.by_job[job.job_id] if u[2] == e.node_id]
                unit = on_node[0] if on_node else (job.job_id, 0, e.node_id)
                self.workload.setdefault(unit, job.workload)
                self.put(OWNER_PAYOUTS, {unit: e.amount_micros})
                total += e.amount_micros
        self.pool("owner payouts", OWNER_PAYOUTS, total, "direct (ledger earnings)")
        back = sum(c.amount_micros for c in self.usage.corrections
                   if c.owner_id not in self.model.platform_owner_ids)
        if back:
            self.pool("owner payouts withheld for earlier periods", OWNER_PAYOUTS, -back,
                      "corrections")
            self.unallocated[(OWNER_PAYOUTS, CORRECTIONS)] -= back

    def hardware(self) -> None:
        p, m = self.usage.period, self.model
        for h in m.hardware:
            start = max(p.start_s, h.purchased_s)
            end = min(p.end_s, h.purchased_s + h.life_s)
            in_service_s = max(0, int(end - start))
            dep = to_micros(Decimal(h.price_micros - h.salvage_micros) * in_service_s / h.life_s)
            if h.node_id is None:
                self.spread(f"hardware:{h.name}", DEPRECIATION, dep, h.shares)
                continue
            units = self.by_node[h.node_id]
            idle_us = max(0, in_service_s * 1_000_000 - sum(self.busy_us[u] for u in units))
            self.pool(f"hardware:{h.name}", DEPRECIATION, dep, "busy seconds on its node")
            weights: list[tuple[Unit | str, int]] = [
                (u, self.busy_us[u]) for u in units if self.busy_us[u] > 0]
            weights += [(IDLE, idle_us)] if idle_us else []
            if weights:
                self.put(DEPRECIATION, largest_remainder(dep, weights))
            else:
                self.unallocated[(DEPRECIATION, BASE)] += dep
            node = self.usage.nodes.get(h.node_id)
            idle_w = h.power_idle_w if h.power_idle_w is not None else float(
                (node.profile if node else {}).get("power_idle_w", 0.0) or 0.0)
            idle_mj = round(idle_w * idle_us / 1000)
            energy: list[tuple[Unit | str, int]] = [
                (u, self.energy_mj[u]) for u in units if self.energy_mj[u] > 0]
            energy += [(IDLE, idle_mj)] if idle_mj else []
            total_mj = sum(w for _, w in energy)
            cost = to_micros(Decimal(total_mj) / 1000 * m.energy.pue
                             * m.energy.price_per_kwh_micros / J_PER_KWH)
            self.pool(f"energy:{h.name}", ENERGY, cost, "joules metered on its node")
            if cost:
                self.put(ENERGY, largest_remainder(cost, energy))

    def fixed(self) -> None:
        p, m = self.usage.period, self.model
        for s in m.servers:
            total = s.per_month_micros + s.per_hour_micros * p.hours
            self.spread(f"server:{s.name}", SERVERS, total, s.shares)
        for st in m.storage:
            self.spread(f"storage:{st.name}", STORAGE,
                        to_micros(st.gb * st.price_per_gb_month_micros), st.shares)
        for person in m.people:
            self.spread(f"person:{person.name}", STAFF,
                        to_micros(person.hours * person.rate_per_hour_micros), person.shares)

    def egress(self) -> None:
        eg = self.model.egress
        tokens = (sum(self.tokens_out.values()) + PPM // 2) // PPM
        gb = eg.gb if eg.gb is not None else Decimal(tokens * eg.bytes_per_token) / 10**9
        total = to_micros(gb * eg.price_per_gb_micros)
        self.pool("egress", EGRESS, total, "completion tokens sent")
        if not total:
            return
        weights = [(u, self.tokens_out[u]) for u in self.order if self.tokens_out[u] > 0]
        if weights:
            self.put(EGRESS, largest_remainder(total, weights))
        else:
            self.unallocated[(EGRESS, BASE)] += total

    def ledger_costs(self) -> None:
        sums: dict[tuple[str, bool], int] = defaultdict(int)
        for c in self.usage.ledger_costs:
            sums[(c.category, c.cogs)] += c.amount_micros
        for (cat, cogs), total in sorted(sums.items()):
            category = f"ledger:{cat}"
            if cogs:
                self.spread(f"ledger cogs:{cat}", category, total, {"inference": 1})
            elif cat in WORKLOADS:
                self.spread(f"ledger opex:{cat}", category, total, {cat: 1})
            else:
                self.pool(f"ledger opex:{cat}", category, total, "unallocated (opex)")
                self.unallocated[(category, BASE)] += total


def allocate(usage: PeriodUsage, model: CostModel) -> Allocation:
    """Every cost of ``usage.period`` onto requests, idle capacity or unallocated, exactly."""
    if model.currency != usage.currency:
        raise InvalidRequest(f"the cost model is in {model.currency}, the ledger in "
                             f"{usage.currency}")
    model = model.for_period(usage.period.start_s)  # the rates in effect that month
    books = _Books(usage, model)
    books.owner_payouts()
    books.hardware()
    books.fixed()
    books.egress()
    books.ledger_costs()
    out = Allocation(
        period=usage.period,
        currency=usage.currency,
        pools=tuple(books.pools),
        units={u: dict(c) for u, c in books.units.items()},
        unit_workload=dict(books.workload),
        idle={k: v for k, v in books.idle.items() if v},
        unallocated={k: v for k, v in books.unallocated.items() if v},
        jobs={j.job_id: j for j in usage.jobs},
        internal_earnings_micros=books.internal,
    )
    invariant(out.allocated_micros + out.idle_micros + out.unallocated_micros
              == out.total_micros,
              f"allocation does not conserve the period's cost: {out.allocated_micros} + "
              f"{out.idle_micros} + {out.unallocated_micros} != {out.total_micros}")
    return out
