"""Every query of the ledger, in one place: this file shows everything money does to the database.

Concurrency. Each write is one transaction that (1) takes its locks in one global order —
client accounts first (``SELECT ... FOR NO KEY UPDATE ORDER BY id`` on PostgreSQL), then the other
accounts as it updates them, sorted by ``ledger_engine.lock_rank`` — so concurrent settlements
never deadlock, and (2) updates the running totals by deltas (``x = x + :d``) in the same
transaction as the immutable transfer rows, so no update is lost. On SQLite the transaction
starts with ``BEGIN IMMEDIATE``: one writer at a time, and the loaded balances cannot go stale.
A transaction that meets a deadlock, a serialization failure, a busy database or a duplicate id
inserted concurrently is retried from the start (every ledger write is idempotent).

The ledger's other modules never import SQLAlchemy; they call ``LedgerStore``.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from cachetools import LRUCache, cached
from sqlalchemy import (
    Connection,
    Engine,
    String,
    Text,
    and_,
    any_,
    bindparam,
    case,
    cast,
    func,
    insert,
    inspect,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import sessionmaker

from sparecycles import limits
from sparecycles.errors import Conflict, InvariantViolation, NotFound
from sparecycles.ledger.engine import (
    AccountState,
    HoldTerms,
    Outcome,
    TransferRow,
    account_kind,
    holder_of,
    lock_rank,
)
from sparecycles.ledger.pricing import ModelPrice, PayoutTerms
from sparecycles.store.core_tables import Client, JobAttempt, JobRow, Owner
from sparecycles.store.db import insert_rows, sqlite_run, update_rows, writer_of
from sparecycles.store.ledger_tables import (
    LEDGER_TABLES,
    LedgerAccount,
    LedgerHold,
    LedgerPrice,
    LedgerTransfer,
    PayoutBatch,
    PayoutItem,
)

T = TypeVar("T")
A, TR, H = LedgerAccount.__table__, LedgerTransfer.__table__, LedgerHold.__table__
tx_attempts_max = 8  # a transaction that keeps meeting deadlocks or busy errors is given up
tx_backoff_s = 0.002  # first pause before a retry, doubled each time
copy_rows_min = 16  # below this a COPY's extra round trips cost more than the INSERTs
in_list_max = 500  # ids per IN (...) list, well below SQLite's bound on parameters
terms_cache_max = 1000  # distinct payout terms kept parsed
_retry_sqlstates = {"40P01", "40001", "23505", "55P03"}  # deadlock, serialization, unique, lock

# The totals of a batch in one statement on PostgreSQL: ``l`` locks the accounts in the order
# of the arrays (ORDER BY runs below the row locks, so they are taken in that order), then the
# UPDATE changes only rows this transaction already holds, so it never waits out of order.
_pg_apply_totals = """
WITH d AS (
    SELECT * FROM unnest(%s::text[], %s::int8[], %s::int8[], %s::int8[], %s::int8[])
        WITH ORDINALITY AS d(id, dp, cp, dq, cq, n)),
l AS MATERIALIZED (
    SELECT a.id FROM ledger_accounts a JOIN d ON a.id = d.id ORDER BY d.n
    FOR NO KEY UPDATE OF a)
UPDATE ledger_accounts a
SET debits_posted = a.debits_posted + d.dp, credits_posted = a.credits_posted + d.cp,
    debits_pending = a.debits_pending + d.dq, credits_pending = a.credits_pending + d.cq
FROM d, l WHERE a.id = d.id AND l.id = d.id"""
def _pg_totals_args(deltas: list[tuple[str, list[int]]]) -> tuple[list[Any], ...]:
    """The five arrays of ``_pg_apply_totals``: ids and the four deltas, in lock order."""
    return tuple(list(c) for c in zip(*((k, *d) for k, d in deltas), strict=True))


def _insert_sql(table: str, mark: str) -> str:
    cols = _insert_columns[table]
    return f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join([mark] * len(cols))})"


_sqlite_apply_totals = (
    "UPDATE ledger_accounts SET debits_posted = debits_posted + ?, "
    "credits_posted = credits_posted + ?, debits_pending = debits_pending + ?, "
    "credits_pending = credits_pending + ? WHERE id = ?")


_insert_columns = {  # "ledger_transfers": the fields of TransferRow, in order
    "ledger_transfers": ("id", "debit_account_id", "credit_account_id", "amount_micros",
                         "currency", "kind", "job_id", "pending_id", "fingerprint", "memo",
                         "created_at_s"),
    "ledger_holds": ("job_id", "client_id", "model", "currency", "prompt_tokens", "max_tokens",
                     "input_micros_per_mtok", "output_micros_per_mtok", "terms", "hold_micros",
                     "created_at_s"),
}


def _by_ids(table: Any, col: str, pg: bool) -> Any:
    """``WHERE col IN (...)``: one array parameter on PostgreSQL (``= ANY``; one plan for any
    number of ids), an expanding list on SQLite."""
    c = table.c[col]
    if pg:
        return select(table).where(c == any_(bindparam("ids", type_=postgresql.ARRAY(String))))
    return select(table).where(c.in_(bindparam("ids", expanding=True)))


def _holds_by_ids(pg: bool) -> Any:
    """Hold terms by job id, ``terms`` last and as its JSON text (parsed once per text)."""
    cols = [H.c[c] for c in _insert_columns["ledger_holds"] if c != "terms"]
    q = _by_ids(H, "job_id", pg)
    return q.with_only_columns(*cols, cast(H.c.terms, Text).label("terms"))


def _transfers_by(col: str, pg: bool) -> Any:
    """Transfers by ``col``, their columns in the order of ``TransferRow``'s fields."""
    q = _by_ids(TR, col, pg)
    return q.with_only_columns(*(TR.c[c] for c in _insert_columns["ledger_transfers"]))


# (statement on SQLite, statement on PostgreSQL)
_sel_holds = (_holds_by_ids(False), _holds_by_ids(True))
_account_columns = ("id", "currency", "debits_posted", "credits_posted", "debits_pending",
                    "credits_pending", "credit_limit_micros")  # AccountState's fields, in order
_sel_accounts = tuple(q.with_only_columns(*(A.c[c] for c in _account_columns)).order_by(A.c.id)
                      for q in (_by_ids(A, "id", False), _by_ids(A, "id", True)))
# FOR NO KEY UPDATE, not FOR UPDATE: the weakest lock that excludes another writer of the totals.
_sel_accounts_locked = _sel_accounts[1].with_for_update(key_share=True)
if (TransferRow._fields != _insert_columns["ledger_transfers"]  # rows are written as they are
        or tuple(f.name for f in fields(AccountState)) != _account_columns):  # and read so
    raise InvariantViolation("TransferRow's or AccountState's fields and the columns differ")
_sel_job_transfers = (_transfers_by("job_id", False), _transfers_by("job_id", True))
_sel_transfers = (_transfers_by("id", False), _transfers_by("id", True))


def _pg_text(q: Any) -> str:
    """A statement's SQL for the raw psycopg connection (``%s`` for its one array)."""
    sql = str(q.compile(dialect=postgresql.psycopg.dialect()))
    if sql.count("%(ids)s") != 1:
        raise InvariantViolation(f"expected one array parameter in {sql}")
    return sql.replace("%(ids)s", "%s")


# The reads of a batch on SQLite: SQL text run straight on the driver (``LedgerTx._select``),
# the same columns in the same order as the statements above; ``{ids}`` is the list of marks.
_sqlite_by_ids = {
    "holds": f"SELECT {', '.join(c for c in _insert_columns['ledger_holds'] if c != 'terms')}, "
             "terms FROM ledger_holds WHERE job_id IN ({ids})",
    "accounts": f"SELECT {', '.join(_account_columns)} FROM ledger_accounts "
                "WHERE id IN ({ids}) ORDER BY id",
    "job_transfers": f"SELECT {', '.join(_insert_columns['ledger_transfers'])} "
                     "FROM ledger_transfers WHERE job_id IN ({ids})",
    "transfers": f"SELECT {', '.join(_insert_columns['ledger_transfers'])} "
                 "FROM ledger_transfers WHERE id IN ({ids})",
}


@functools.lru_cache(maxsize=1024)
def _sqlite_in(name: str, n: int) -> str:
    return _sqlite_by_ids[name].format(ids=", ".join("?" * n))


# The reads of a batch on PostgreSQL, sent together in one pipeline (``LedgerTx.load``).
_pg_load = (_pg_text(_sel_holds[1]), _pg_text(_sel_accounts_locked),
            _pg_text(_sel_job_transfers[1]), _pg_text(_sel_transfers[1]))


def _chunks(items: Iterable[str]) -> Iterator[list[str]]:
    items = sorted(set(items))
    for i in range(0, len(items), in_list_max):
        yield items[i : i + in_list_max]


def _account(row: Any) -> AccountState:
    return AccountState(row.id, row.currency, row.debits_posted, row.credits_posted,
                        row.debits_pending, row.credits_pending, row.credit_limit_micros)


def _transfer(row: Any) -> TransferRow:
    return TransferRow(row.id, row.debit_account_id, row.credit_account_id, row.amount_micros,
                       row.currency, row.kind, row.job_id, row.pending_id, row.fingerprint,
                       row.memo, row.created_at_s)


@cached(LRUCache(terms_cache_max), lock=threading.Lock())
def _terms(text: str) -> PayoutTerms:
    """Payout terms from their stored JSON text; few distinct terms exist (one per price book),
    so each text is parsed once."""
    return PayoutTerms.from_dict(json.loads(text))


def _retryable(exc: Exception) -> bool:
    """Whether a failed transaction may be run again: ``exc`` is SQLAlchemy's wrapper of a
    driver error, or a driver error raised from the raw connection (COPY, pipelines)."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    state = getattr(orig, "sqlstate", None)
    if state is not None:
        return state in _retry_sqlstates
    text = str(orig).lower()
    return "database is locked" in text or "unique constraint failed" in text or "busy" in text


@dataclass(frozen=True, slots=True)
class StatementRow:
    seq: int
    transfer: TransferRow
    hold_amount_micros: int | None  # for post and void rows: the hold they resolve


class LedgerTx:
    """One transaction's queries. Made only by ``LedgerStore.write``/``read``."""

    def __init__(self, conn: Connection, dialect: str):
        self.conn, self.dialect = conn, dialect
        self.pg = dialect == "postgresql"
        self._job_inserts: list[dict[str, Any]] = []
        self._job_updates: list[tuple[str, dict[str, Any]]] = []
        self._attempt_starts: list[dict[str, Any]] = []
        self._attempt_ends: list[dict[str, Any]] = []

    # -- reads for a batch --

    def _select(self, sql_or_query: Any, chunk: list[str]) -> Any:
        """Rows of one of the batch's reads by ids: on SQLite prepared SQL text straight on
        the driver (``db.sqlite_run``; ``sql_or_query`` a ``_sqlite_by_ids`` entry), otherwise
        the compiled statement with its ids."""
        if self.pg:
            return self.conn.execute(sql_or_query, {"ids": chunk})
        return sqlite_run(self.conn, _sqlite_in(sql_or_query, len(chunk)), chunk)

    def holds(self, job_ids: Iterable[str]) -> dict[str, HoldTerms]:
        out: dict[str, HoldTerms] = {}
        q = _sel_holds[1] if self.pg else "holds"
        for chunk in _chunks(job_ids):
            for (job, client, model, cur, prompt, most, p_in, p_out, amount, at,
                 terms) in self._select(q, chunk):
                out[job] = HoldTerms(job, client, model, cur, prompt, most,
                                     ModelPrice(p_in, p_out), _terms(terms), amount, at)
        return out

    def accounts(self, ids: Iterable[str], *, lock: bool = False) -> dict[str, AccountState]:
        """Accounts by id; with ``lock`` their rows are locked in id order until commit."""
        out: dict[str, AccountState] = {}
        q = (_sel_accounts_locked if lock else _sel_accounts[1]) if self.pg else "accounts"
        for chunk in _chunks(ids):
            out.update((r[0], AccountState(*r)) for r in self._select(q, chunk))
        return out

    def transfers(self, *, job_ids: Iterable[str] = (), ids: Iterable[str] = ()
                  ) -> dict[str, TransferRow]:
        out: dict[str, TransferRow] = {}
        queries = ((_sel_job_transfers[1], _sel_transfers[1]) if self.pg
                   else ("job_transfers", "transfers"))
        for q, keys in zip(queries, (job_ids, ids), strict=True):
            for chunk in _chunks(keys):
                out.update((r[0], TransferRow(*r)) for r in self._select(q, chunk))
        return out

    def load(self, hold_jobs: Iterable[str], clients: Iterable[str], job_ids: Iterable[str],
             ids: Iterable[str]) -> tuple[dict[str, HoldTerms], dict[str, AccountState],
                                          dict[str, TransferRow]]:
        """``holds``, then ``accounts(clients, lock=True)``, then ``transfers``, for a batch
        whose clients are known before its holds are read. On PostgreSQL the three go in one
        pipeline: one round trip, run in this order, so the transfers are still read after
        the locks are taken."""
        if not self.pg:
            return (self.holds(hold_jobs), self.accounts(clients, lock=True),
                    self.transfers(job_ids=job_ids, ids=ids))
        raw = self._raw()
        keys = [sorted(set(k)) for k in (hold_jobs, clients, job_ids, ids)]
        with raw.pipeline():
            curs = [raw.execute(sql, (k,)) if k else None for sql, k in zip(_pg_load, keys,
                                                                             strict=True)]
        holds = {job: HoldTerms(job, client, model, cur, prompt, most, ModelPrice(p_in, p_out),
                                _terms(terms), amount, at)
                 for job, client, model, cur, prompt, most, p_in, p_out, amount, at, terms
                 in (curs[0].fetchall() if curs[0] else ())}
        accounts = {r[0]: AccountState(*r) for r in (curs[1].fetchall() if curs[1] else ())}
        transfers = {r[0]: TransferRow(*r) for c in curs[2:] if c for r in c.fetchall()}
        return holds, accounts, transfers

    def _raw(self) -> Any:
        """The psycopg connection under this transaction (COPY, pipelines)."""
        if not self.conn.in_transaction():
            self.conn.begin()  # so that the store's commit commits what is sent raw
        return self.conn.connection.driver_connection

    def all_prices(self, currency: str) -> dict[str, ModelPrice]:
        P = LedgerPrice.__table__
        q = select(P).where(P.c.currency == currency)
        return {r.model: ModelPrice(r.input_micros_per_mtok, r.output_micros_per_mtok)
                for r in self.conn.execute(q)}

    # -- writes --

    def write(self, out: Outcome) -> None:
        """Insert the new transfers and holds, then lock every account they name in lock order
        and apply the totals; an account that does not exist stops the transaction."""
        terms: dict[int, str] = {}  # the batch's holds share one or two terms objects
        for h in out.holds:
            if id(h.terms) not in terms:
                terms[id(h.terms)] = json.dumps(h.terms.as_dict(), sort_keys=True)
        holds = [(h.job_id, h.client_id, h.model, h.currency, h.prompt_tokens, h.max_tokens,
                  h.price.input_micros_per_mtok, h.price.output_micros_per_mtok,
                  terms[id(h.terms)], h.hold_micros, h.created_at_s) for h in out.holds]
        deltas = sorted(out.deltas.items(), key=lambda kv: lock_rank(kv[0]))
        if self.pg and len(out.transfers) < copy_rows_min and len(holds) < copy_rows_min:
            # A few rows (the group commit of single calls): the INSERTs and the totals in one
            # pipeline, one round trip; the count of accounts is checked before the commit.
            raw = self._raw()
            with raw.pipeline():
                cur = raw.cursor()
                for table, rows in ((TR, out.transfers), (H, holds)):
                    if rows:
                        cur.executemany(_insert_sql(table.name, "%s"), rows)
                totals = (raw.execute(_pg_apply_totals, _pg_totals_args(deltas))
                          if deltas else None)
            self._check_totals(deltas, totals.rowcount if totals else 0)
            return
        self._insert(TR, out.transfers)  # TransferRow is a tuple in the columns' order
        self._insert(H, holds)
        self._apply_totals(deltas)

    def _apply_totals(self, deltas: list[tuple[str, list[int]]]) -> None:
        """Add each account's deltas to its totals, locking the accounts in the order given
        (``lock_rank``). Every account a transfer names is here (``emit`` records both sides,
        even for a zero amount), and the count of rows updated must equal the count of
        accounts: this is what keeps transfers from naming an account that does not exist
        (migration 0005 replaced the per-row foreign keys with it; ``ledger check`` verifies
        it again from outside)."""
        if not deltas:
            return
        if self.pg:
            n = self.conn.exec_driver_sql(_pg_apply_totals, _pg_totals_args(deltas)).rowcount
        else:
            n = sqlite_run(self.conn, _sqlite_apply_totals, [(*d, k) for k, d in deltas],
                           many=True).rowcount
        self._check_totals(deltas, n)

    @staticmethod
    def _check_totals(deltas: list[tuple[str, list[int]]], n: int) -> None:
        if n != len(deltas):
            raise InvariantViolation(f"{len(deltas) - n} of the accounts {[k for k, _ in deltas]}"
                                     " do not exist")

    def insert_job(self, fields: Mapping[str, Any]) -> None:
        """A job's row, written in the transaction of its hold (``Ledger.hold(job=...)``).
        Queued, and written with the batch's others by ``flush_jobs`` before the commit."""
        self._job_inserts.append(dict(fields))

    def update_job(self, job_id: str, fields: Mapping[str, Any]) -> None:
        """A job's final state, written in the transaction of its settlement or void
        (``Ledger.settle(job=...)``, ``Ledger.void(job=...)``); queued like ``insert_job``."""
        self._job_updates.append((job_id, dict(fields)))

    def start_attempt(self, fields: Mapping[str, Any]) -> None:
        """A job's first attempt (its ``job_attempts`` row), written in the transaction of its
        hold when the job is placed as it is admitted; queued like ``insert_job``."""
        self._attempt_starts.append(dict(fields))

    def end_attempts(self, job_id: str, ends: Sequence[Mapping[str, Any]]) -> None:
        """How a job's last attempts ended (each: ``attempt`` and the columns of its row in
        ``job_attempts`` to set), written in the transaction of the job's settlement or void
        rather than in one of their own; queued like ``update_job``."""
        self._attempt_ends.extend({"job_id": job_id, **end} for end in ends)

    def flush_jobs(self) -> None:
        """Write the queued job rows: the inserts, then the updates (a job held and settled in
        one batch is inserted first), each kind as one statement per set of columns, sent
        together (a batch of 15 admissions cost 15 round trips before; now one or two), with
        the attempts' starts after the inserts and their ends after the updates."""
        inserts, self._job_inserts = self._job_inserts, []
        updates, self._job_updates = self._job_updates, []
        starts, self._attempt_starts = self._attempt_starts, []
        ends, self._attempt_ends = self._attempt_ends, []
        insert_rows(self.conn, JobRow.__table__, inserts)
        insert_rows(self.conn, JobAttempt.__table__, starts)
        update_rows(self.conn, JobRow.__table__, ("id",),
                    [{"id": job_id, **fields} for job_id, fields in updates])
        update_rows(self.conn, JobAttempt.__table__, ("job_id", "attempt"), ends)

    def _insert(self, table: Any, rows: Sequence[tuple[Any, ...]]) -> None:
        """Insert-only rows: COPY on PostgreSQL for a batch (several times faster than INSERTs,
        every constraint still checked), executemany of one plain INSERT otherwise."""
        if not rows:
            return
        cols = _insert_columns[table.name]
        if not self.pg:
            sqlite_run(self.conn, _insert_sql(table.name, "?"), rows, many=True)
            return
        if len(rows) < copy_rows_min:
            self.conn.exec_driver_sql(_insert_sql(table.name, "%s"), rows)
            return
        cur = self._raw().cursor()  # same transaction
        with cur.copy(f"COPY {table.name} ({', '.join(cols)}) FROM STDIN") as copy:
            for r in rows:
                copy.write_row(r)

    def set_credit_limit(self, account_id: str, limit_micros: int) -> None:
        self.conn.execute(update(A).where(A.c.id == account_id)
                          .values(credit_limit_micros=limit_micros))

    def set_price(self, model: str, currency: str, price: ModelPrice, now_s: float) -> None:
        P = LedgerPrice.__table__
        values = {"currency": currency, "input_micros_per_mtok": price.input_micros_per_mtok,
                  "output_micros_per_mtok": price.output_micros_per_mtok,
                  "updated_at_s": now_s}
        ins = (postgresql.insert(P) if self.dialect == "postgresql" else sqlite.insert(P))
        self.conn.execute(ins.values(model=model, **values)
                          .on_conflict_do_update(index_elements=[P.c.model], set_=values))

    # -- payouts --

    def payable_owners(self, currency: str, min_micros: int) -> list[str]:
        """Owners whose earned balance is at least ``min_micros`` (not locked: the caller
        locks all their accounts in lock order, then reads the balances again)."""
        q = (select(A.c.holder_id).where(A.c.kind == "owner_earned", A.c.currency == currency,
                                         A.c.credits_posted - A.c.debits_posted >= min_micros)
             .order_by(A.c.id))
        return [h for h in self.conn.scalars(q) if h is not None]

    def batch(self, batch_id: str) -> Any | None:
        return self.conn.execute(select(PayoutBatch.__table__)
                                 .where(PayoutBatch.__table__.c.id == batch_id)).first()

    def open_batches(self, currency: str) -> list[str]:
        """Batches not finished: ``open`` or ``writing`` (claimed, maybe by a run that died)."""
        B = PayoutBatch.__table__
        q = select(B.c.id).where(B.c.state.in_(("open", "writing")), B.c.currency == currency)
        return list(self.conn.scalars(q.order_by(B.c.created_at_s)))

    def claim_batch(self, batch_id: str, run_token: str, now_s: float, stale_s: float) -> bool:
        """Claim a batch for one run, atomically on both databases (one conditional UPDATE: on
        PostgreSQL a concurrent claim waits for this row and then finds it taken): an ``open``
        batch, or a ``writing`` one whose claim is older than ``stale_s`` (its run died)."""
        B = PayoutBatch.__table__
        q = (update(B).where(B.c.id == batch_id, or_(
            B.c.state == "open",
            and_(B.c.state == "writing", B.c.claimed_at_s < now_s - stale_s)))
            .values(state="writing", run_token=run_token, claimed_at_s=now_s))
        return self.conn.execute(q).rowcount == 1

    def negative_owners(self, currency: str) -> list[tuple[str, int, float]]:
        """(owner, earned balance, time of the last transfer to or from it) of every owner whose
        earned balance is below zero: a receivable (a withhold after the earning was paid)."""
        last = (select(func.max(TR.c.created_at_s)).where(or_(
            TR.c.debit_account_id == A.c.id, TR.c.credit_account_id == A.c.id))
            .scalar_subquery())
        q = (select(A.c.holder_id, A.c.credits_posted - A.c.debits_posted, last)
             .where(A.c.kind == "owner_earned", A.c.currency == currency,
                    A.c.credits_posted - A.c.debits_posted < 0).order_by(A.c.id))
        return [(h, int(b), float(t or 0.0)) for h, b, t in self.conn.execute(q)]

    def batch_items(self, batch_id: str) -> list[Any]:
        I = PayoutItem.__table__  # noqa: E741
        return list(self.conn.execute(
            select(I).where(I.c.batch_id == batch_id).order_by(I.c.owner_id)))

    def insert_batch(self, row: Mapping[str, Any], items: list[Mapping[str, Any]]) -> None:
        self.conn.execute(insert(PayoutBatch.__table__), [dict(row)])
        if items:
            self.conn.execute(insert(PayoutItem.__table__), [dict(i) for i in items])

    def update_batch(self, batch_id: str, **values: Any) -> None:
        B = PayoutBatch.__table__
        self.conn.execute(update(B).where(B.c.id == batch_id).values(**values))

    def update_item(self, batch_id: str, owner_id: str, **values: Any) -> None:
        I = PayoutItem.__table__  # noqa: E741
        self.conn.execute(update(I).where(I.c.batch_id == batch_id, I.c.owner_id == owner_id)
                          .values(**values))

    def owner_names(self, owner_ids: Iterable[str]) -> dict[str, str]:
        out: dict[str, str] = {}
        for chunk in _chunks(owner_ids):
            q = select(Owner.id, Owner.name).where(Owner.id.in_(chunk))
            out.update((i, n) for i, n in self.conn.execute(q))
        return out

    # -- reading for people --

    def statement(self, account_ids: list[str], limit: int) -> list[StatementRow]:
        hold = TR.alias("h")
        q = (select(TR, hold.c.amount_micros.label("hold_amount"))
             .select_from(TR.outerjoin(hold, hold.c.id == TR.c.pending_id))
             .where(or_(TR.c.debit_account_id.in_(account_ids),
                        TR.c.credit_account_id.in_(account_ids)))
             .order_by(TR.c.seq.desc()).limit(limit))
        return [StatementRow(r.seq, _transfer(r), r.hold_amount) for r in self.conn.execute(q)]

    def resolve(self, kind: str, name_or_id: str) -> str:
        """A client's or owner's id from its name or id (also bare ledger holders)."""
        table = Client if kind == "client" else Owner
        found = self.conn.scalar(select(table.id).where(table.name == name_or_id))
        if found is None:
            found = self.conn.scalar(select(table.id).where(table.id == name_or_id))
        if found is None:
            prefix = "client:" if kind == "client" else "owner:"
            found = self.conn.scalar(select(A.c.holder_id).where(
                A.c.holder_id == name_or_id, A.c.id.startswith(prefix)).limit(1))
        if found is None:
            raise NotFound(f"no {kind} named {name_or_id!r}")
        return found

    # -- the auditor's queries (ledger/audit.py) --

    def all_accounts(self) -> dict[str, AccountState]:
        return {r.id: _account(r) for r in self.conn.execute(select(A))}

    def recomputed_totals(self) -> dict[str, list[int]]:
        """Each account's four totals summed from the transfers alone."""
        out: dict[str, list[int]] = {}
        res = TR.alias("r")
        for col, slot in (("debit_account_id", 0), ("credit_account_id", 1)):
            acc = TR.c[col]
            q = (select(acc, func.sum(TR.c.amount_micros))
                 .where(TR.c.kind.not_in(("hold", "void"))).group_by(acc))
            for a, total in self.conn.execute(q):
                out.setdefault(a, [0, 0, 0, 0])[slot] += int(total)
            q = (select(acc, func.sum(TR.c.amount_micros))
                 .select_from(TR.outerjoin(res, res.c.pending_id == TR.c.id))
                 .where(TR.c.kind == "hold", res.c.id.is_(None)).group_by(acc))
            for a, total in self.conn.execute(q):
                out.setdefault(a, [0, 0, 0, 0])[slot + 2] += int(total)
        return out

    def malformed_transfers(self) -> list[str]:
        """Transfers whose currency differs from an account's, or that resolve a non-hold."""
        dr, cr, hold = A.alias("dr"), A.alias("cr"), TR.alias("h")
        q1 = (select(TR.c.id)
              .select_from(TR.join(dr, dr.c.id == TR.c.debit_account_id)
                           .join(cr, cr.c.id == TR.c.credit_account_id))
              .where(or_(dr.c.currency != TR.c.currency, cr.c.currency != TR.c.currency)))
        q2 = (select(TR.c.id).select_from(TR.outerjoin(hold, hold.c.id == TR.c.pending_id))
              .where(TR.c.pending_id.is_not(None),
                     or_(hold.c.id.is_(None), hold.c.kind != "hold",
                         TR.c.kind.not_in(("post", "void")),
                         TR.c.amount_micros > hold.c.amount_micros,
                         hold.c.debit_account_id != TR.c.debit_account_id,
                         hold.c.credit_account_id != TR.c.credit_account_id)))
        q3 = select(TR.c.id).where(TR.c.kind.in_(("post", "void")), TR.c.pending_id.is_(None))
        return [f"transfer {i} is malformed (currency, or a post/void without its hold)"
                for q in (q1, q2, q3) for i in self.conn.scalars(q)]

    def job_money_sums(self) -> list[tuple[str, int, int, int]]:
        """Per settled job: (job, posts, charge, earnings + fee)."""
        q = (select(TR.c.job_id,
                    func.sum(_case(TR.c.kind == "post", 1)),
                    func.sum(_case(TR.c.kind == "post", TR.c.amount_micros)),
                    func.sum(_case(TR.c.kind.in_(("earning", "fee")), TR.c.amount_micros)))
             .where(TR.c.kind.in_(("post", "earning", "fee")), TR.c.job_id.is_not(None))
             .group_by(TR.c.job_id))
        return [(j, int(n), int(c), int(s)) for j, n, c, s in self.conn.execute(q)]

    def finished_jobs_charges(self, cutoff_s: float) -> list[tuple[str, str, int, int]]:
        """Jobs done or failed before ``cutoff_s``: (job, state, posts, open holds)."""
        J = JobRow.__table__
        post, hold, res = TR.alias("p"), TR.alias("h"), TR.alias("r")
        posts = (select(func.count()).select_from(post)
                 .where(post.c.job_id == J.c.id, post.c.kind == "post").scalar_subquery())
        open_holds = (select(func.count())
                      .select_from(hold.outerjoin(res, res.c.pending_id == hold.c.id))
                      .where(hold.c.job_id == J.c.id, hold.c.kind == "hold", res.c.id.is_(None))
                      .scalar_subquery())
        finished = func.coalesce(J.c.finished_at_s, J.c.created_at_s)
        q = (select(J.c.id, J.c.state, posts, open_holds)
             .where(J.c.state.in_(("done", "failed")), finished < cutoff_s))
        return [(j, s, int(p), int(h)) for j, s, p, h in self.conn.execute(q)]

    def old_open_holds(self, cutoff_s: float) -> list[str]:
        hold, res = TR.alias("h"), TR.alias("r")
        q = (select(hold.c.id).select_from(hold.outerjoin(res, res.c.pending_id == hold.c.id))
             .where(hold.c.kind == "hold", res.c.id.is_(None), hold.c.created_at_s < cutoff_s))
        return list(self.conn.scalars(q))

    def payout_sums(self) -> dict[tuple[str, str], int]:
        """(owner, item state) -> total of payout items."""
        I = PayoutItem.__table__  # noqa: E741
        q = select(I.c.owner_id, I.c.state, func.sum(I.c.amount_micros)).group_by(
            I.c.owner_id, I.c.state)
        return {(o, s): int(t) for o, s, t in self.conn.execute(q)}

    def batch_totals(self) -> list[tuple[str, int, int]]:
        B, I = PayoutBatch.__table__, PayoutItem.__table__  # noqa: E741
        q = (select(B.c.id, B.c.total_micros, func.coalesce(func.sum(I.c.amount_micros), 0))
             .outerjoin(I, I.c.batch_id == B.c.id).group_by(B.c.id, B.c.total_micros))
        return [(b, int(t), int(s)) for b, t, s in self.conn.execute(q)]

    def counts(self) -> tuple[int, int]:
        return (int(self.conn.scalar(select(func.count()).select_from(A)) or 0),
                int(self.conn.scalar(select(func.count()).select_from(TR)) or 0))


def _case(cond: Any, value: Any) -> Any:
    return case((cond, value), else_=0)


class LedgerStore:
    """The ledger's database: short transactions over one engine (SQLite or PostgreSQL)."""

    def __init__(self, sessions: sessionmaker | Engine):
        engine = sessions if isinstance(sessions, Engine) else sessions.kw["bind"]
        self.engine: Engine = engine
        self.dialect = engine.dialect.name
        if self.dialect not in ("sqlite", "postgresql"):
            raise InvariantViolation(f"the ledger runs on SQLite or PostgreSQL, not {self.dialect}")
        self._known_accounts: set[str] = set()
        self.retries = 0  # transactions retried after a deadlock, busy or duplicate error
        self._writes = writer_of(engine)  # SQLite: one writer connection, the store's too

    def create_tables(self) -> None:
        """Tables straight from the models (tests, benchmarks); production uses migrations."""
        from sparecycles.store.db import Base

        Base.metadata.create_all(self.engine)

    def write(self, fn: Callable[[LedgerTx], T], *, wait: bool = True) -> T:
        """Run ``fn`` in one write transaction, retried from the start on transient failures.
        ``wait=False`` (SQLite, on the event loop): one try, now or never: ``WriterBusy`` when
        the database is being written by another thread or process, any failure raised as is."""
        if not wait:
            with self._writes.begin(wait=False) as conn:
                tx = LedgerTx(conn, self.dialect)
                result = fn(tx)
                tx.flush_jobs()
                return result
        pause = tx_backoff_s
        for attempt in range(1, tx_attempts_max + 1):
            try:
                with self._writes.begin() as conn:
                    tx = LedgerTx(conn, self.dialect)
                    result = fn(tx)
                    tx.flush_jobs()
                    return result
            except Exception as exc:
                driver = isinstance(exc, DBAPIError) or hasattr(exc, "sqlstate")
                if driver and "totals_bounded" in str(exc):
                    raise Conflict(
                        "an account's running total would pass limits.ledger_total_micros_max "
                        f"({limits.ledger_total_micros_max} micro-units); nothing was written",
                        code="ledger_total_max") from None
                if attempt == tx_attempts_max or not driver or not _retryable(exc):
                    raise
                self.retries += 1
                time.sleep(pause)
                pause *= 2
        raise AssertionError("unreachable")

    def read(self, fn: Callable[[LedgerTx], T]) -> T:
        with self.engine.connect() as conn:
            result = fn(LedgerTx(conn, self.dialect))
            conn.commit()
            return result

    def ensure_accounts(self, ids: Iterable[str], currency: str, now_s: float) -> None:
        """Create the accounts not known yet (in their own transaction, before any lock is
        taken, so creating an account never joins the lock order of a settlement)."""
        missing = sorted(set(ids) - self._known_accounts)
        if not missing:
            return
        rows = [{"id": i, "kind": account_kind(i), "holder_id": holder_of(i), "currency": currency,
                 "debits_posted": 0, "credits_posted": 0, "debits_pending": 0,
                 "credits_pending": 0, "credit_limit_micros": 0, "created_at_s": now_s}
                for i in missing]
        ins = postgresql.insert(A) if self.dialect == "postgresql" else sqlite.insert(A)

        def create(tx: LedgerTx) -> dict[str, str]:
            tx.conn.execute(ins.on_conflict_do_nothing(index_elements=[A.c.id]), rows)
            q = select(A.c.id, A.c.currency).where(A.c.id.in_(missing))
            return {i: c for i, c in tx.conn.execute(q)}

        found = self.write(create)
        wrong = {i: c for i, c in found.items() if c != currency}
        if wrong or len(found) != len(missing):
            raise InvariantViolation(f"accounts in another currency than {currency}: {wrong}")
        self._known_accounts.update(missing)

    @property
    def inline_writes(self) -> bool:
        """Whether write transactions may run on the event loop (``write(wait=False)``): on
        SQLite, a file on this machine, with no round trip to a server."""
        return self.dialect == "sqlite"

    def knows(self, ids: set[str]) -> bool:
        """Whether every one of these accounts was created (or found) by this store already."""
        return self._known_accounts.issuperset(ids)

    def tables_present(self) -> bool:
        names = set(inspect(self.engine).get_table_names())
        return all(t.name in names for t in LEDGER_TABLES)

