"""Every query of the cost engine, in one place: what a period's jobs did and what the ledger
posted for them. Read-only; the cost engine's other modules never import SQLAlchemy.

A job belongs to the period in which it ended (``finished_at_s``, or ``created_at_s`` for a job
that never finished), whatever the time of its ledger transfers, so the metering, the ledger and
the FOCUS export of a period speak of the same requests. Withholds count in the period they were
made: for a request of the period they net its revenue and its owners' earnings; for a request
of an earlier period they are corrections.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, and_, case, exists, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import sessionmaker

from sparecycles.costs.allocation import (
    AttemptUsage,
    Correction,
    JobUsage,
    LedgerCost,
    NodeEarning,
    NodeInfo,
    Period,
    PeriodUsage,
)
from sparecycles.costs.reconcile import ChargeFacts, LedgerTotals, MeteredTotals
from sparecycles.costs.reports import Names
from sparecycles.costs.usage import OrphanPosting
from sparecycles.errors import InvalidRequest
from sparecycles.ledger.engine import holder_of
from sparecycles.ledger.pricing import PPM, ModelPrice
from sparecycles.store.core_tables import ApiKey, Client, JobAttempt, JobRow, Node
from sparecycles.store.costs_tables import CostClose
from sparecycles.store.ledger_tables import LedgerHold, LedgerPrice, LedgerTransfer

J, AT, N = JobRow.__table__, JobAttempt.__table__, Node.__table__
TR, H, LP = LedgerTransfer.__table__, LedgerHold.__table__, LedgerPrice.__table__
CC = CostClose.__table__
# A post that is a sale: charged to a client. The platform's own usage (training, R&D) is posted
# from ``cost:opex:<workload>`` and is neither a charge nor revenue.
_sale = TR.c.debit_account_id.like("client:%")
# Costs booked in the ledger: ``record_cost``'s, and owners' receivables written off by a payout
# run (``cost:opex:owner_receivables_written_off``), which the report shows as that category.
_BOOKED = ("cost", "write_off")
period_jobs_max = 5_000_000  # a report holds a period's jobs in memory; beyond this, split it
orphan_ids_listed_max = 20  # job ids named per kind of orphan posting
_ended = ("done", "failed")
_request_kinds = ("post", "earning", "fee", "withhold")  # transfers that speak of a request


@dataclass(frozen=True, slots=True)
class ClosedMonth:
    period: str
    currency: str
    closed_at_s: float
    report_json: str
    focus_csv: str
    cost_model_source: str
    cost_model_text: str


class CostQueries:
    def __init__(self, sessions: sessionmaker | Engine):
        self.engine: Engine = sessions if isinstance(sessions, Engine) else sessions.kw["bind"]

    def closed_month(self, period: str) -> ClosedMonth | None:
        with self.engine.connect() as c:
            row = c.execute(select(CC).where(CC.c.period == period)).first()
        return None if row is None else ClosedMonth(*row)

    def close_month(self, closed: ClosedMonth) -> bool:
        """Freeze a month; False when it was closed already (a month is closed once: the
        primary key decides between two closes at the same time)."""
        try:
            with self.engine.begin() as c:
                c.execute(insert(CostClose).values(
                    period=closed.period, currency=closed.currency,
                    closed_at_s=closed.closed_at_s, report_json=closed.report_json,
                    focus_csv=closed.focus_csv, cost_model_source=closed.cost_model_source,
                    cost_model_text=closed.cost_model_text))
        except IntegrityError:
            return False
        return True

    @staticmethod
    def _in_period(period: Period) -> Any:
        ended = func.coalesce(J.c.finished_at_s, J.c.created_at_s)
        return and_(J.c.state.in_(_ended), ended >= period.start_s, ended < period.end_s)

    def _period_job_ids(self, period: Period) -> Any:
        return select(J.c.id).where(self._in_period(period))

    def period_usage(self, period: Period, currency: str) -> PeriodUsage:
        """The period's jobs with their attempts and money, the ledger's costs and corrections."""
        ids = self._period_job_ids(period)
        with self.engine.connect() as c:
            n = c.scalar(select(func.count()).select_from(J).where(self._in_period(period)))
            if (n or 0) > period_jobs_max:
                raise InvalidRequest(f"{n} jobs in {period.label}: more than {period_jobs_max}")
            jobs = c.execute(select(J).where(self._in_period(period)).order_by(J.c.id)).all()
            held = dict((r[0], ModelPrice(int(r[1]), int(r[2]))) for r in c.execute(
                select(H.c.job_id, H.c.input_micros_per_mtok, H.c.output_micros_per_mtok)
                .where(H.c.job_id.in_(ids))).all())
            listed = {r[0]: ModelPrice(int(r[1]), int(r[2])) for r in c.execute(
                select(LP.c.model, LP.c.input_micros_per_mtok, LP.c.output_micros_per_mtok)
                .where(LP.c.currency == currency)).all()}
            attempts = c.execute(select(AT).where(AT.c.job_id.in_(ids))
                                 .order_by(AT.c.job_id, AT.c.attempt)).all()
            others = c.scalars(select(TR.c.currency).distinct().where(
                TR.c.job_id.in_(ids), TR.c.currency != currency)).all()
            if others:
                raise InvalidRequest(f"the ledger's charges of {period.label} are in "
                                     f"{', '.join(sorted(others))}, not {currency}: set the "
                                     "cost model's currency to the ledger's")
            money = c.execute(select(TR).where(
                TR.c.job_id.in_(ids), TR.c.currency == currency,
                TR.c.kind.in_(("post", "earning", "withhold")))).all()
            late = c.execute(
                select(TR, J.c.client_id, J.c.model, J.c.api_key_id)
                .join(J, J.c.id == TR.c.job_id, isouter=True)
                .where(TR.c.kind == "withhold", TR.c.currency == currency,
                       TR.c.created_at_s >= period.start_s, TR.c.created_at_s < period.end_s,
                       TR.c.job_id.not_in(ids))).all()
            costs = c.execute(select(TR).where(
                TR.c.kind.in_(_BOOKED), TR.c.currency == currency,
                TR.c.created_at_s >= period.start_s, TR.c.created_at_s < period.end_s)).all()
            nodes = c.execute(select(N.c.id, N.c.owner_id, N.c.name, N.c.device_class,
                                     N.c.profile)).all()
        by_job: dict[str, list[AttemptUsage]] = defaultdict(list)
        for a in attempts:
            by_job[a.job_id].append(AttemptUsage(
                a.attempt, a.node_id, float(a.busy_s or 0.0), float(a.energy_j or 0.0),
                a.energy_source or "estimated", int(a.prompt_tokens or 0),
                int(a.completion_tokens or 0),
                layers=None if a.layer_first is None or a.layer_end is None
                else (int(a.layer_first), int(a.layer_end)),
                work_ppm=PPM if a.work_ppm is None else int(a.work_ppm)))
        charged: dict[str, int] = defaultdict(int)
        refunded: dict[str, int] = defaultdict(int)
        earned: dict[tuple[str, str, str], int] = defaultdict(int)  # (job, node, owner)
        for t in money:
            if t.kind == "post":
                if t.debit_account_id.startswith("client:"):  # not the platform's own usage
                    charged[t.job_id] += t.amount_micros
            elif t.kind == "earning":
                node = t.id.rpartition(":")[2]
                earned[(t.job_id, node, holder_of(t.credit_account_id) or "")] += t.amount_micros
            elif t.created_at_s < period.end_s:  # a withhold made by the end of the period
                node = t.id.rpartition(":")[2]
                earned[(t.job_id, node, holder_of(t.debit_account_id) or "")] -= t.amount_micros
                refunded[t.job_id] += t.amount_micros
        earnings: dict[str, list[NodeEarning]] = defaultdict(list)
        for (job, node, owner), amount in sorted(earned.items()):
            earnings[job].append(NodeEarning(node, owner, amount))
        out_jobs = tuple(
            JobUsage(
                job_id=j.id, client_id=j.client_id, model=j.model,
                at_s=float(j.finished_at_s if j.finished_at_s is not None else j.created_at_s),
                workload=j.workload or "inference", state=j.state,
                prompt_tokens=int(j.prompt_tokens or 0),
                completion_tokens=int(j.completion_tokens or 0),
                charge_micros=charged.get(j.id, 0), refund_micros=refunded.get(j.id, 0),
                earnings=tuple(earnings.get(j.id, ())), attempts=tuple(by_job.get(j.id, ())),
                api_key_id=j.api_key_id, posted=j.id in charged, price=held.get(j.id))
            for j in jobs)
        corrections = tuple(
            Correction(t.id, t.job_id or "", t.client_id or "", t.model or "",
                       t.id.rpartition(":")[2], holder_of(t.debit_account_id) or "",
                       t.amount_micros, t.created_at_s, t.api_key_id)
            for t in late)
        ledger_costs = tuple(
            LedgerCost(t.id, t.debit_account_id.split(":", 2)[2],
                       t.debit_account_id.startswith("cost:cogs:"), t.amount_micros,
                       t.created_at_s)
            for t in costs)
        infos = {n.id: NodeInfo(n.id, n.owner_id, n.name, n.device_class,
                                n.profile if isinstance(n.profile, dict) else {})
                 for n in nodes}
        return PeriodUsage(period, currency, out_jobs, ledger_costs, corrections, infos,
                           listed, tuple(self.orphan_postings(period, currency)))

    def orphan_postings(self, period: Period, currency: str) -> list[OrphanPosting]:
        """Transfers of the period that speak of a request (post, earning, fee, withhold) with
        no ``jobs`` row: no job id, or one the jobs table does not have. Money that the
        metering cannot explain; without this query both the report and the reconciliation,
        which start from the jobs, would never see it."""
        has_job = exists().where(J.c.id == TR.c.job_id)
        where = and_(TR.c.kind.in_(_request_kinds), TR.c.currency == currency,
                     TR.c.created_at_s >= period.start_s, TR.c.created_at_s < period.end_s,
                     (TR.c.job_id.is_(None)) | ~has_job)
        with self.engine.connect() as c:
            sums = c.execute(select(TR.c.kind, func.count(),
                                    func.coalesce(func.sum(TR.c.amount_micros), 0))
                             .where(where).group_by(TR.c.kind).order_by(TR.c.kind)).all()
            out = []
            for kind, n, amount in sums:
                ids = c.scalars(select(TR.c.job_id).distinct().where(where, TR.c.kind == kind)
                                .order_by(TR.c.job_id).limit(orphan_ids_listed_max)).all()
                out.append(OrphanPosting(kind, int(n), int(amount),
                                         tuple(i or "(none)" for i in ids)))
        return out

    def names(self) -> Names:
        with self.engine.connect() as c:
            clients = dict(c.execute(select(Client.__table__.c.id, Client.__table__.c.name)).all())
            keys = dict(c.execute(select(ApiKey.__table__.c.id, ApiKey.__table__.c.name)).all())
            nodes = dict(c.execute(select(N.c.id, N.c.name)).all())
        return Names(clients, nodes, keys)

    def metered_totals(self, period: Period) -> MeteredTotals:
        ids = self._period_job_ids(period)
        posted = exists().where(TR.c.job_id == J.c.id, TR.c.kind == "post", _sale)
        tokens = J.c.prompt_tokens + J.c.completion_tokens
        with self.engine.connect() as c:
            n, t, billed = c.execute(
                select(func.count(), func.coalesce(func.sum(tokens), 0),
                       func.coalesce(func.sum(case((posted, tokens), else_=0)), 0))
                .where(self._in_period(period))).one()
            attempts, busy, energy = c.execute(
                select(func.count(), func.coalesce(func.sum(AT.c.busy_s), 0.0),
                       func.coalesce(func.sum(AT.c.energy_j), 0.0))
                .where(AT.c.job_id.in_(ids))).one()
        return MeteredTotals(int(n), int(attempts), int(t), int(billed), float(busy),
                             float(energy))

    def ledger_totals(self, period: Period, currency: str) -> LedgerTotals:
        ids = self._period_job_ids(period)
        in_period = and_(TR.c.created_at_s >= period.start_s, TR.c.created_at_s < period.end_s)

        def total(kind: str, *also: Any) -> Any:
            return func.coalesce(func.sum(case((and_(TR.c.kind == kind, *also),
                                                TR.c.amount_micros), else_=0)), 0)

        sale = and_(TR.c.kind == "post", _sale)
        with self.engine.connect() as c:
            posts, charged, earned, fees, internal = c.execute(
                select(func.coalesce(func.sum(case((sale, 1), else_=0)), 0),
                       total("post", _sale), total("earning"), total("fee"),
                       total("post", TR.c.debit_account_id.like("cost:%")))
                .where(TR.c.job_id.in_(ids), TR.c.currency == currency)).one()
            withheld = c.scalar(select(func.coalesce(func.sum(TR.c.amount_micros), 0)).where(
                TR.c.kind == "withhold", TR.c.job_id.in_(ids), TR.c.currency == currency,
                TR.c.created_at_s < period.end_s))
            corrections = c.scalar(select(func.coalesce(func.sum(TR.c.amount_micros), 0)).where(
                TR.c.kind == "withhold", TR.c.job_id.not_in(ids), TR.c.currency == currency,
                in_period))
            cogs, opex = c.execute(select(
                func.coalesce(func.sum(case((TR.c.debit_account_id.like("cost:cogs:%"),
                                             TR.c.amount_micros), else_=0)), 0),
                func.coalesce(func.sum(case((TR.c.debit_account_id.like("cost:opex:%"),
                                             TR.c.amount_micros), else_=0)), 0))
                .where(TR.c.kind.in_(_BOOKED), TR.c.currency == currency, in_period)).one()
        return LedgerTotals(int(posts), int(charged), int(earned), int(fees), int(withheld or 0),
                            int(corrections or 0), int(cogs), int(opex), int(internal))

    def write_offs_micros(self, period: Period, currency: str) -> int:
        """Owners' receivables written off in the period (ledger/payouts.write_off_receivables):
        in the report as the ledger opex category ``owner_receivables_written_off``."""
        with self.engine.connect() as c:
            return int(c.scalar(select(func.coalesce(func.sum(TR.c.amount_micros), 0)).where(
                TR.c.kind == "write_off", TR.c.currency == currency,
                TR.c.created_at_s >= period.start_s, TR.c.created_at_s < period.end_s)) or 0)

    def charge_facts(self, period: Period, currency: str) -> list[ChargeFacts]:
        post = (select(func.sum(TR.c.amount_micros)).where(
            TR.c.job_id == J.c.id, TR.c.kind == "post", _sale, TR.c.currency == currency)
            .scalar_subquery())
        q = (select(J.c.id, J.c.state, J.c.prompt_tokens, J.c.completion_tokens,
                    H.c.input_micros_per_mtok, H.c.output_micros_per_mtok, H.c.hold_micros,
                    post)
             .join(H, H.c.job_id == J.c.id, isouter=True)
             .where(self._in_period(period), ~exists().where(  # not the platform's own usage
                 TR.c.job_id == J.c.id, TR.c.kind == "hold",
                 TR.c.credit_account_id == "platform:internal"))
             .order_by(J.c.id))
        with self.engine.connect() as c:
            rows = c.execute(q).all()
        return [ChargeFacts(r[0], r[1], int(r[2] or 0), int(r[3] or 0),
                            None if r[4] is None else ModelPrice(int(r[4]), int(r[5])),
                            int(r[6] or 0), None if r[7] is None else int(r[7]))
                for r in rows]
