"""Every query of the dashboard in one place: who is signed in, the fleet and the jobs over time,
an owner's devices and money, a client's usage, keys and limits.

Reads are scoped here, not in the routes: every owner query takes the owner's id and every client
query the client's id, and filters by it in SQL, so a page can only ask about its own data. Time
series are grouped in SQL into buckets of ``bucket_s`` seconds (``bucket_s`` is a whole number,
inlined so PostgreSQL sees one GROUP BY expression); percentiles are computed in Python from at
most ``latency_rows_max`` rows, because SQLite has no percentile function.
"""

from __future__ import annotations

import calendar
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import (
    ColumnClause,
    Engine,
    Integer,
    and_,
    case,
    cast,
    delete,
    func,
    insert,
    literal_column,
    or_,
    select,
    update,
)
from sqlalchemy.orm import sessionmaker

from sparecycles import limits
from sparecycles.secrets_util import hash_secret, new_id, new_secret
from sparecycles.store.core_tables import ApiKey, Client, JobAttempt, JobRow, Node, Owner
from sparecycles.store.dashboard_tables import KeyLimit, NodeSample
from sparecycles.store.ledger_tables import LedgerTransfer, PayoutBatch, PayoutItem

J, AT, N, K = JobRow.__table__, JobAttempt.__table__, Node.__table__, ApiKey.__table__
C, OW, TR = Client.__table__, Owner.__table__, LedgerTransfer.__table__
PI, PB, S, L = PayoutItem.__table__, PayoutBatch.__table__, NodeSample.__table__, KeyLimit.__table__

node_sample_interval_s = 60.0  # how often the coordinator samples the fleet
node_samples_keep_s = 90 * 86_400  # older samples are deleted when a new one is taken
latency_rows_max = 100_000  # newest finished jobs read for the percentiles of a range
rows_listed_max = 200  # nodes, keys or payouts listed on one page
chains_listed_max = 20  # jobs served by chains listed on the network page
stage_rows_listed_max = 50  # an owner's latest stage attempts listed
keys_per_client_max = 100  # active keys a client may hold
ONLINE = ("online", "draining")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """An active key and whom it speaks for: a client (``client_id``) or an owner."""

    key_id: str
    name: str
    scopes: frozenset[str]
    client_id: str | None
    client_name: str | None
    owner_id: str | None
    owner_name: str | None


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def month_start_s(now_s: float) -> float:
    """The start of the calendar month (UTC) that holds ``now_s``."""
    t = time.gmtime(now_s)
    return float(calendar.timegm((t.tm_year, t.tm_mon, 1, 0, 0, 0)))


class DashboardQueries:
    def __init__(self, sessions: sessionmaker | Engine):
        self.engine: Engine = sessions if isinstance(sessions, Engine) else sessions.kw["bind"]
        self.sqlite = self.engine.dialect.name == "sqlite"

    def _bucket(self, col: Any, bucket_s: int) -> Any:
        size: ColumnClause[Any] = literal_column(str(int(bucket_s)))
        if self.sqlite:  # epoch seconds are positive: truncation is the floor
            return cast(col / size, Integer) * size
        return func.floor(col / size) * size

    # ---- who is signed in ---------------------------------------------------------------------

    def _key(self, where: Any) -> KeyRecord | None:
        q = (select(K.c.id, K.c.name, K.c.scopes, K.c.client_id, C.c.name, K.c.owner_id,
                    OW.c.name)
             .select_from(K.outerjoin(C, C.c.id == K.c.client_id)
                          .outerjoin(OW, OW.c.id == K.c.owner_id))
             .where(where, K.c.revoked_at_s.is_(None)))
        with self.engine.connect() as c:
            r = c.execute(q).first()
        if r is None:
            return None
        return KeyRecord(r[0], r[1], frozenset(filter(None, r[2].split(","))), r[3], r[4], r[5],
                         r[6])

    def key_by_secret(self, secret: str) -> KeyRecord | None:
        return self._key(K.c.key_hash == hash_secret(secret))

    def key_by_id(self, key_id: str) -> KeyRecord | None:
        return self._key(K.c.id == key_id)

    # ---- the fleet ----------------------------------------------------------------------------

    def fleet_now(self, now_s: float) -> dict[str, dict[str, int]]:
        """Per device class: nodes online, busy and jobs running; ``queue`` under key ""."""
        recent = now_s - limits.job_total_s_max  # older "running" rows are a crash's leftovers
        with self.engine.connect() as c:
            online = c.execute(select(N.c.device_class, func.count())
                               .where(N.c.status.in_(ONLINE)).group_by(N.c.device_class)).all()
            busy = c.execute(
                select(N.c.device_class, func.count(func.distinct(AT.c.node_id)), func.count())
                .select_from(AT.join(N, N.c.id == AT.c.node_id))
                .where(AT.c.outcome == "running", AT.c.started_at_s >= recent,
                       N.c.status.in_(ONLINE))
                .group_by(N.c.device_class)).all()
            queue = c.scalar(select(func.count()).select_from(J).where(
                J.c.state == "admitted", J.c.created_at_s >= recent)) or 0
        out = {cls: {"online": int(n), "busy": 0, "jobs_running": 0} for cls, n in online}
        for cls, nodes, jobs in busy:
            out.setdefault(cls, {"online": 0, "busy": 0, "jobs_running": 0})
            out[cls].update(busy=int(nodes), jobs_running=int(jobs))
        out[""] = {"queue": int(queue)}
        return out

    def record_node_sample(self, now_s: float, *, min_gap_s: float = node_sample_interval_s / 2
                           ) -> int:
        """Store one sample of the fleet (a row per device class; one row with class "" when
        none is online). Skipped when another sample is newer than ``min_gap_s`` (two replicas
        sampling at once). Returns the rows written."""
        with self.engine.connect() as c:
            newest = c.scalar(select(func.max(S.c.at_s)))
        if newest is not None and now_s - newest < min_gap_s:
            return 0
        fleet = self.fleet_now(now_s)
        queue = fleet.pop("")["queue"]
        rows = [{"at_s": now_s, "device_class": cls[:40], "online": v["online"],
                 "busy": v["busy"], "jobs_running": v["jobs_running"], "queue_depth": queue}
                for cls, v in sorted(fleet.items())]
        rows = rows or [{"at_s": now_s, "device_class": "", "online": 0, "busy": 0,
                         "jobs_running": 0, "queue_depth": queue}]
        with self.engine.begin() as c:
            c.execute(insert(S), rows)
            c.execute(delete(S).where(S.c.at_s < now_s - node_samples_keep_s))
        return len(rows)

    def fleet_series(self, since_s: float, until_s: float, bucket_s: int) -> Sequence[Any]:
        """(bucket, class, mean online, busy total, online total, max queue) per bucket."""
        b = self._bucket(S.c.at_s, bucket_s)
        q = (select(b, S.c.device_class, func.avg(S.c.online), func.sum(S.c.busy),
                    func.sum(S.c.online), func.max(S.c.queue_depth))
             .where(S.c.at_s >= since_s, S.c.at_s < until_s)
             .group_by(b, S.c.device_class).order_by(b))
        with self.engine.connect() as c:
            return c.execute(q).all()

    def job_series(self, since_s: float, until_s: float, bucket_s: int) -> Sequence[Any]:
        """(bucket, requests, failed, prompt tokens, completion tokens) per bucket."""
        b = self._bucket(J.c.created_at_s, bucket_s)
        q = (select(b, func.count(), func.sum(case((J.c.state == "failed", 1), else_=0)),
                    func.sum(J.c.prompt_tokens), func.sum(J.c.completion_tokens))
             .where(J.c.created_at_s >= since_s, J.c.created_at_s < until_s)
             .group_by(b).order_by(b))
        with self.engine.connect() as c:
            return c.execute(q).all()

    def latency_rows(self, since_s: float, until_s: float) -> Sequence[Any]:
        """(admitted at, time to first token, total) of the newest finished jobs of a range."""
        q = (select(J.c.created_at_s, J.c.time_to_first_token_s, J.c.total_s)
             .where(J.c.state == "done", J.c.created_at_s >= since_s,
                    J.c.created_at_s < until_s, J.c.total_s.is_not(None))
             .order_by(J.c.created_at_s.desc()).limit(latency_rows_max))
        with self.engine.connect() as c:
            return c.execute(q).all()

    def busy_series(self, since_s: float, until_s: float, bucket_s: int) -> Sequence[Any]:
        """(bucket, busy node-seconds the nodes reported) by the start of each attempt."""
        b = self._bucket(AT.c.started_at_s, bucket_s)
        q = (select(b, func.sum(AT.c.busy_s))
             .where(AT.c.started_at_s >= since_s, AT.c.started_at_s < until_s)
             .group_by(b).order_by(b))
        with self.engine.connect() as c:
            return c.execute(q).all()

    def departures(self, since_s: float, until_s: float, bucket_s: int) -> Sequence[Any]:
        """(bucket, device class, attempts interrupted because their node left) per bucket."""
        at = func.coalesce(AT.c.ended_at_s, AT.c.started_at_s)
        b = self._bucket(at, bucket_s)
        q = (select(b, func.coalesce(N.c.device_class, "unknown"), func.count())
             .select_from(AT.outerjoin(N, N.c.id == AT.c.node_id))
             .where(AT.c.outcome == "node_lost", at >= since_s, at < until_s)
             .group_by(b, N.c.device_class).order_by(b))
        with self.engine.connect() as c:
            return c.execute(q).all()

    def nodes(self, owner_id: str | None = None) -> list[dict[str, Any]]:
        """Nodes (of one owner, or all) with their work: attempts by outcome, tokens, busy time.
        ``signed`` counts results whose Ed25519 signature the coordinator verified."""
        q = (select(N.c.id, N.c.name, N.c.owner_id, OW.c.name.label("owner"), N.c.device_class,
                    N.c.status, N.c.availability, N.c.models, N.c.agent_version,
                    N.c.first_seen_at_s, N.c.last_seen_at_s)
             .select_from(N.join(OW, OW.c.id == N.c.owner_id))
             .order_by(N.c.status != "online", N.c.last_seen_at_s.desc()).limit(rows_listed_max))
        if owner_id is not None:
            q = q.where(N.c.owner_id == owner_id)
        with self.engine.connect() as c:
            rows = [dict(r._mapping) for r in c.execute(q)]
            ids = [r["id"] for r in rows]
            work = c.execute(
                select(AT.c.node_id, AT.c.outcome, func.count(),
                       func.sum(case((AT.c.signature.is_not(None), 1), else_=0)),
                       func.sum(AT.c.completion_tokens), func.sum(AT.c.busy_s))
                .where(AT.c.node_id.in_(ids)).group_by(AT.c.node_id, AT.c.outcome)).all()
        by: dict[str, dict[str, Any]] = defaultdict(
            lambda: {"outcomes": {}, "signed": 0, "tokens": 0, "busy_s": 0.0})
        for node_id, outcome, n, signed, tokens, busy in work:
            w = by[node_id]
            w["outcomes"][outcome] = int(n)
            w["signed"] += int(signed or 0)
            w["tokens"] += int(tokens or 0)
            w["busy_s"] += float(busy or 0.0)
        for r in rows:
            r.update(by[r["id"]])
        return rows

    # ---- chains: jobs served by stages of several nodes ---------------------------------------

    def _stage_rows(self, c: Any, where: Any, limit: int) -> list[dict[str, Any]]:
        """Stage attempts (``job_attempts`` rows with a layer range) with their job's model,
        their node's and owner's names, the earning the ledger posted for them
        (``job:<job>:earning:<node>``) and what verification withheld of it, and what the job
        paid all its owners (net), newest first."""
        q = (select(AT.c.job_id, AT.c.attempt, AT.c.node_id, AT.c.outcome, AT.c.prompt_tokens,
                    AT.c.completion_tokens, AT.c.busy_s, AT.c.started_at_s, AT.c.ended_at_s,
                    AT.c.layer_first, AT.c.layer_end, AT.c.work_ppm, J.c.model,
                    J.c.prompt_tokens.label("job_prompt_tokens"),
                    N.c.name.label("node_name"), OW.c.name.label("owner"))
             .select_from(AT.join(J, J.c.id == AT.c.job_id)
                          .outerjoin(N, N.c.id == AT.c.node_id)
                          .outerjoin(OW, OW.c.id == N.c.owner_id))
             .where(AT.c.layer_first.is_not(None), where)
             .order_by(AT.c.started_at_s.desc(), AT.c.job_id, AT.c.attempt).limit(limit))
        rows = [dict(r._mapping) for r in c.execute(q)]
        ids = {f"job:{r['job_id']}:earning:{r['node_id']}" for r in rows}
        ids |= {f"job:{r['job_id']}:withhold:{r['node_id']}" for r in rows}
        money: dict[str, int] = {}
        for chunk in _chunks(sorted(ids), 500):
            money.update((tid, int(amount)) for tid, amount in c.execute(
                select(TR.c.id, TR.c.amount_micros).where(TR.c.id.in_(chunk))))
        paid: dict[str, int] = defaultdict(int)  # job -> all its owners' earnings, net
        for chunk in _chunks(sorted({r["job_id"] for r in rows}), 500):
            for job_id, kind, amount in c.execute(
                    select(TR.c.job_id, TR.c.kind, func.sum(TR.c.amount_micros))
                    .where(TR.c.job_id.in_(chunk), TR.c.kind.in_(("earning", "withhold")))
                    .group_by(TR.c.job_id, TR.c.kind)):
                paid[job_id] += int(amount or 0) * (1 if kind == "earning" else -1)
        for r in rows:
            key = f"job:{r['job_id']}:%s:{r['node_id']}"
            r["earned_micros"] = money.get(key % "earning", 0)
            r["withheld_micros"] = money.get(key % "withhold", 0)
            r["job_paid_micros"] = paid.get(r["job_id"], 0)
        return rows

    def owner_stage_jobs(self, owner_id: str, limit: int = stage_rows_listed_max
                         ) -> list[dict[str, Any]]:
        """One owner's stage attempts (their devices' parts of chains), newest first."""
        mine = select(N.c.id).where(N.c.owner_id == owner_id)
        with self.engine.connect() as c:
            return self._stage_rows(c, AT.c.node_id.in_(mine), limit)

    def chain_jobs(self, since_s: float, limit: int = chains_listed_max) -> list[dict[str, Any]]:
        """The newest jobs served by chains that started since ``since_s``, each with every
        stage attempt it had (replaced ones too), its client and its charge."""
        with self.engine.connect() as c:
            recent = (select(AT.c.job_id, func.max(AT.c.started_at_s).label("at"))
                      .where(AT.c.layer_first.is_not(None), AT.c.started_at_s >= since_s)
                      .group_by(AT.c.job_id).order_by(func.max(AT.c.started_at_s).desc())
                      .limit(limit))
            ids = [r[0] for r in c.execute(recent)]
            if not ids:
                return []
            jobs = {r.id: dict(r._mapping) for r in c.execute(
                select(J.c.id, J.c.model, J.c.state, J.c.prompt_tokens, J.c.completion_tokens,
                       J.c.created_at_s, J.c.total_s, J.c.error, C.c.name.label("client"))
                .select_from(J.outerjoin(C, C.c.id == J.c.client_id))
                .where(J.c.id.in_(ids)))}
            charged = dict(c.execute(select(TR.c.job_id, TR.c.amount_micros).where(
                TR.c.job_id.in_(ids), TR.c.kind == "post")).all())
            stages = self._stage_rows(c, AT.c.job_id.in_(ids),
                                      limit * limits.chain_stages_max * 2)
        by_job: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for st in sorted(stages, key=lambda r: (r["job_id"], r["attempt"])):
            by_job[st["job_id"]].append(st)
        return [{**jobs[j], "charged_micros": int(charged.get(j, 0)), "stages": by_job[j]}
                for j in ids if j in jobs]

    # ---- an owner ----------------------------------------------------------------------------

    def owner_earnings_by_day(self, owner_id: str, since_s: float) -> Sequence[Any]:
        """(day start, earned, withheld) of one owner's earned account since ``since_s``."""
        acc = f"owner:{owner_id}:earned"
        b = self._bucket(TR.c.created_at_s, 86_400)
        q = (select(b, func.sum(case((TR.c.kind == "earning", TR.c.amount_micros), else_=0)),
                    func.sum(case((TR.c.kind == "withhold", TR.c.amount_micros), else_=0)))
             .where(TR.c.created_at_s >= since_s,
                    or_(and_(TR.c.kind == "earning", TR.c.credit_account_id == acc),
                        and_(TR.c.kind == "withhold", TR.c.debit_account_id == acc)))
             .group_by(b).order_by(b))
        with self.engine.connect() as c:
            return c.execute(q).all()

    def owner_withheld_by_node(self, owner_id: str) -> dict[str, int]:
        """Earnings taken back by verification, per node (``job:<id>:withhold:<node>``)."""
        q = select(TR.c.id, TR.c.amount_micros).where(
            TR.c.kind == "withhold", TR.c.debit_account_id == f"owner:{owner_id}:earned")
        out: dict[str, int] = defaultdict(int)
        with self.engine.connect() as c:
            for tid, amount in c.execute(q):
                out[tid.rpartition(":")[2]] += int(amount)
        return dict(out)

    def owner_payouts(self, owner_id: str) -> list[dict[str, Any]]:
        q = (select(PI.c.batch_id, PI.c.amount_micros, PI.c.state, PI.c.failed_reason,
                    PB.c.created_at_s, PB.c.paid_at_s, PB.c.currency)
             .select_from(PI.join(PB, PB.c.id == PI.c.batch_id))
             .where(PI.c.owner_id == owner_id)
             .order_by(PB.c.created_at_s.desc()).limit(rows_listed_max))
        with self.engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(q)]

    def set_node_policy(self, owner_id: str, node_id: str, policy: dict[str, Any]) -> bool:
        """Store an owner's availability policy for one of their nodes; False if not theirs."""
        with self.engine.begin() as c:
            return bool(c.execute(update(N).where(N.c.id == node_id, N.c.owner_id == owner_id)
                                  .values(availability=policy)).rowcount)

    # ---- a client ----------------------------------------------------------------------------

    def client_series(self, client_id: str, since_s: float, until_s: float, bucket_s: int
                      ) -> Sequence[Any]:
        """(bucket, key id, model, requests, tokens, charged) of one client's jobs."""
        b = self._bucket(J.c.created_at_s, bucket_s)
        q = (select(b, J.c.api_key_id, J.c.model, func.count(J.c.id),
                    func.sum(J.c.prompt_tokens + J.c.completion_tokens),
                    func.coalesce(func.sum(TR.c.amount_micros), 0))
             .select_from(J.outerjoin(TR, and_(TR.c.job_id == J.c.id, TR.c.kind == "post")))
             .where(J.c.client_id == client_id, J.c.created_at_s >= since_s,
                    J.c.created_at_s < until_s)
             .group_by(b, J.c.api_key_id, J.c.model).order_by(b))
        with self.engine.connect() as c:
            return c.execute(q).all()

    def _spent_since(self, since_s: float, key_ids: list[str]) -> dict[str, int]:
        q = (select(J.c.api_key_id, func.sum(TR.c.amount_micros))
             .select_from(J.join(TR, and_(TR.c.job_id == J.c.id, TR.c.kind == "post")))
             .where(J.c.api_key_id.in_(key_ids), J.c.created_at_s >= since_s)
             .group_by(J.c.api_key_id))
        with self.engine.connect() as c:
            return {k: int(v or 0) for k, v in c.execute(q)}

    def client_keys(self, client_id: str, now_s: float) -> list[dict[str, Any]]:
        """A client's keys with their limits and what each was charged this month."""
        q = (select(K.c.id, K.c.name, K.c.prefix, K.c.scopes, K.c.created_at_s,
                    K.c.revoked_at_s, L.c.budget_micros_per_month, L.c.requests_per_minute)
             .select_from(K.outerjoin(L, L.c.key_id == K.c.id))
             .where(K.c.client_id == client_id)
             .order_by(K.c.revoked_at_s.is_not(None), K.c.created_at_s).limit(rows_listed_max))
        with self.engine.connect() as c:
            rows = [dict(r._mapping) for r in c.execute(q)]
        spent = self._spent_since(month_start_s(now_s), [r["id"] for r in rows])
        for r in rows:
            r["month_spend_micros"] = spent.get(r["id"], 0)
        return rows

    def create_client_key(self, client_id: str, name: str) -> tuple[str, str] | None:
        """A new inference key for a client (never admin); None at ``keys_per_client_max``."""
        secret, key_id = new_secret("sk"), new_id("key")
        with self.engine.begin() as c:
            active = c.scalar(select(func.count()).select_from(K).where(
                K.c.client_id == client_id, K.c.revoked_at_s.is_(None))) or 0
            if active >= keys_per_client_max:
                return None
            c.execute(insert(K).values(
                id=key_id, client_id=client_id, owner_id=None, name=name,
                key_hash=hash_secret(secret), prefix=secret[:10], scopes="inference",
                created_at_s=time.time()))
        return key_id, secret

    def revoke_client_key(self, client_id: str, key_id: str) -> bool:
        with self.engine.begin() as c:
            return bool(c.execute(
                update(K).where(K.c.id == key_id, K.c.client_id == client_id,
                                K.c.revoked_at_s.is_(None))
                .values(revoked_at_s=time.time())).rowcount)

    def set_key_limits(self, client_id: str, key_id: str, budget_micros: int | None,
                       requests_per_minute: int | None) -> bool:
        """Set (or clear, with None) a key's limits; False if the key is not the client's."""
        with self.engine.begin() as c:
            mine = c.scalar(select(K.c.id).where(K.c.id == key_id, K.c.client_id == client_id,
                                                 K.c.revoked_at_s.is_(None)))
            if mine is None:
                return False
            c.execute(delete(L).where(L.c.key_id == key_id))
            if budget_micros is not None or requests_per_minute is not None:
                c.execute(insert(L).values(key_id=key_id, budget_micros_per_month=budget_micros,
                                           requests_per_minute=requests_per_minute,
                                           updated_at_s=time.time()))
        return True

    def key_limits(self, key_id: str) -> tuple[int | None, int | None]:
        """(budget per month, requests per minute) of a key; (None, None) without limits."""
        with self.engine.connect() as c:
            r = c.execute(select(L.c.budget_micros_per_month, L.c.requests_per_minute)
                          .where(L.c.key_id == key_id)).first()
        return (None, None) if r is None else (r[0], r[1])
