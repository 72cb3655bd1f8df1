"""What a period's jobs did and what the ledger posted for them: the inputs of the cost engine.

Plain frozen dataclasses, built by ``store/cost_queries.py`` from ``jobs``, ``job_attempts``,
``nodes`` and the ledger's transfers, or by hand in tests and the simulator.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sparecycles.errors import InvalidRequest
from sparecycles.ledger.pricing import PPM, ModelPrice


@dataclass(frozen=True, slots=True)
class Period:
    """A calendar month in UTC, ``[start_s, end_s)``."""

    label: str
    start_s: float
    end_s: float

    @classmethod
    def month(cls, label: str) -> Period:
        try:
            first = dt.datetime.strptime(label, "%Y-%m").replace(tzinfo=dt.UTC)
        except ValueError:
            raise InvalidRequest(f"a period is a month like 2026-11, got {label!r}") from None
        nxt = first.replace(year=first.year + first.month // 12, month=first.month % 12 + 1)
        return cls(first.strftime("%Y-%m"), first.timestamp(), nxt.timestamp())

    @property
    def seconds(self) -> int:
        return int(self.end_s - self.start_s)

    @property
    def hours(self) -> int:
        return self.seconds // 3600

    def contains(self, t_s: float) -> bool:
        return self.start_s <= t_s < self.end_s

    def day(self, t_s: float) -> str:
        return dt.datetime.fromtimestamp(t_s, dt.UTC).date().isoformat()

    def days(self) -> list[str]:
        return [self.day(self.start_s + 86_400 * i) for i in range(self.seconds // 86_400)]


@dataclass(frozen=True, slots=True)
class NodeInfo:
    node_id: str
    owner_id: str
    name: str = ""
    device_class: str = "unknown"
    profile: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class AttemptUsage:
    """One attempt as metered on its node (a row of ``job_attempts``).

    A stage of a chain (``layers`` set) ran only layers ``[first, end)`` of the model over the
    tokens it counts: ``work_ppm`` is its part of each token's work in parts per million, the
    same share the ledger split the owners' earnings by (``ledger/pricing.WorkShare``); a node
    that held the whole model did all of it (``PPM``)."""

    attempt: int
    node_id: str
    busy_s: float = 0.0
    energy_j: float = 0.0
    energy_source: str = "estimated"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    layers: tuple[int, int] | None = None
    work_ppm: int = PPM

    @property
    def is_stage(self) -> bool:
        return self.layers is not None


@dataclass(frozen=True, slots=True)
class NodeEarning:
    node_id: str
    owner_id: str
    amount_micros: int  # earned for the job, less what was withheld by the end of the period


@dataclass(frozen=True, slots=True)
class JobUsage:
    """One request that ended in the period (its finish time ``at_s``), with its money."""

    job_id: str
    client_id: str
    model: str
    at_s: float
    workload: str = "inference"
    state: str = "done"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    charge_micros: int = 0  # posted by the ledger
    refund_micros: int = 0  # withheld from owners and refunded to the client within the period
    earnings: tuple[NodeEarning, ...] = ()
    attempts: tuple[AttemptUsage, ...] = ()
    api_key_id: str | None = None
    posted: bool = False  # the ledger posted a charge (also true whenever charge_micros > 0)
    price: ModelPrice | None = None  # the list price it was admitted at (its hold); None: no hold

    @property
    def billed(self) -> bool:
        return self.posted or self.charge_micros > 0

    @property
    def revenue_micros(self) -> int:
        return self.charge_micros - self.refund_micros

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def chain(self) -> bool:
        """Served by a chain of stages (some of its attempts ran part of the model)."""
        return any(a.is_stage for a in self.attempts)


@dataclass(frozen=True, slots=True)
class LedgerCost:
    """A ``cost`` transfer of the period (``Ledger.record_cost``)."""

    transfer_id: str
    category: str
    cogs: bool
    amount_micros: int
    at_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Correction:
    """A withhold made in this period for a job charged in an earlier one: the client's refund
    and the owner's reversed earning both land here, not on the earlier period's books."""

    transfer_id: str
    job_id: str
    client_id: str
    model: str
    node_id: str
    owner_id: str
    amount_micros: int
    at_s: float
    api_key_id: str | None = None


@dataclass(frozen=True, slots=True)
class OrphanPosting:
    """A ledger transfer of the period that speaks of a request (a post, earning, fee or
    withhold) but has no ``jobs`` row to belong to: money nobody's metering explains. Summed by
    kind; the report shows it and the reconciliation fails while there is any."""

    kind: str
    count: int
    amount_micros: int
    job_ids: tuple[str, ...] = ()  # a few of them, for the operator to look up


@dataclass(frozen=True, slots=True)
class PeriodUsage:
    period: Period
    currency: str = "USD"
    jobs: tuple[JobUsage, ...] = ()
    ledger_costs: tuple[LedgerCost, ...] = ()
    corrections: tuple[Correction, ...] = ()
    nodes: Mapping[str, NodeInfo] = field(default_factory=dict)
    list_prices: Mapping[str, ModelPrice] = field(default_factory=dict)  # model -> price now
    orphans: tuple[OrphanPosting, ...] = ()


