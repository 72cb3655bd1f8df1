"""The ledger service: every unit of money moves through one double-entry ledger.

Each call is one database transaction (or a share of one: concurrent calls are committed
together, see ``ledger/group_commit.py``). Threads call it synchronously; the coordinator's
coroutines call the ``*_async`` forms, whose transactions run on the lane's worker thread, or on
SQLite on the event loop itself when the database can be written at once. The logic lives in
``ledger/engine.apply`` (pure), the SQL in ``store/ledger_queries.py``, the payout runs in
``ledger/payouts.py`` and the independent auditor in ``ledger/audit.py``.

Guarantees. Each is stated here and in docs/ledger.md, enforced where named, and verified
independently by ``Ledger.check()`` (``sparecycles ledger check``):

1. Double entry. Every transfer debits one account and credits another, of the same currency,
   by the same non-negative integer of micro-units; debits equal credits in each currency.
   (``ledger_engine._Machine.emit``; CHECK constraints in ``ledger_schema``.)
2. Immutability. Transfers are inserted and never changed; a mistake is fixed by a correcting
   transfer (``withhold``, ``fail_payout``). Account totals are running sums of the transfers,
   updated in the same transaction, and the auditor recomputes them from the transfers.
3. Idempotency. Every transfer id is derived from the job and its event and stored forever: a
   retried or replayed call returns the first result and moves no money; the same id with other
   content raises ``Conflict``. (``_Machine.replay``; unique ``id`` and ``pending_id``.)
4. No overdraft. A hold is refused with ``InsufficientBalance`` (HTTP 429) before any node works
   unless the client's available balance (balance - open holds + credit limit) covers the most
   the job can cost; no client account ever falls below minus its credit limit. (``_Machine
   .hold``; ``invariant`` in ``emit``; CHECK ``client_within_limit`` in the database.)
5. Two phases. A hold is resolved at most once: posted for the actual charge (never more than
   the hold; the rest released) or voided. A late completion after a void is refused; a late
   failure after a settlement leaves the charge standing. (``pending_id`` is unique.)
6. Conservation per job. ``charge == sum(earnings) + fee``, each earning credited to the owner
   of the node that did that share of the work. (``pricing.split_charge``; ``settlement_of``.)
7. Payouts. A batch pays each owner once, never more than the owner's earned balance, in whole
   minor units of the currency; it is claimed by one run before its file is written, so
   concurrent runs write one file per batch; the owners' paid accounts equal the payout lines
   marked paid. (``ledger/payouts.py``.)
8. Bounded totals. No account total passes ``limits.ledger_total_micros_max``; a transaction
   that would fails with ``Conflict`` (``ledger_total_max``) and writes nothing. (CHECK
   ``totals_bounded``; ``LedgerStore.write``.)
9. The platform's own usage is not revenue: a job of a ``workload:training|rnd`` key is held
   and posted on ``cost:opex:<workload>`` through ``platform:internal``, never on a client or
   ``platform:revenue``, and takes no fee. (``_Machine.hold``/``settle``.)
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from sparecycles.errors import InvalidRequest, SpareCyclesError, invariant
from sparecycles.ledger import engine as eng
from sparecycles.ledger.audit import audit
from sparecycles.ledger.engine import (
    CostOp,
    DepositOp,
    HoldOp,
    Op,
    Settlement,
    SettleOp,
    TransferRow,
    VoidOp,
    VoidOutcome,
    WithholdOp,
    check_id,
)
from sparecycles.ledger.group_commit import After, GroupCommit
from sparecycles.ledger.pricing import (
    Earning,
    ModelPrice,
    PriceBook,
    WorkShare,
    amount_micros_max,
    tokens_max,
)
from sparecycles.store.errors import WriterBusy, transient_store_errors
from sparecycles.store.ledger_queries import LedgerStore, LedgerTx
from sparecycles.types import JobFinal, JobRecord, JobState, Workload

__all__ = [
    "Balance",
    "Earning",
    "Ledger",
    "OwnerBalance",
    "Settlement",
    "Statement",
    "StatementLine",
    "VoidOutcome",
    "WorkShare",
]

batch_ops_max = 256  # operations committed in one transaction by the group commit
statement_lines_max = 1000
prices_cache_s = 1.0  # a price set on one coordinator reaches every other within this
memo_chars_max = 500


@dataclass(frozen=True, slots=True)
class Balance:
    """An account's totals. ``balance`` is posted credits less posted debits."""

    account_id: str
    currency: str
    balance_micros: int
    held_micros: int  # open holds against it (pending debits)
    incoming_micros: int  # pending credits
    credit_limit_micros: int

    @property
    def available_micros(self) -> int:
        return self.balance_micros - self.held_micros + self.credit_limit_micros


@dataclass(frozen=True, slots=True)
class OwnerBalance:
    owner_id: str
    currency: str
    earned_micros: int
    payable_micros: int
    paid_micros: int


@dataclass(frozen=True, slots=True)
class StatementLine:
    """One transfer as it touched an account: ``amount_micros`` is the change of its balance,
    ``held_micros`` the change of its open holds (holds, and the posts and voids that end them)."""

    seq: int
    account_id: str
    transfer_id: str
    kind: str
    job_id: str | None
    amount_micros: int
    held_micros: int
    counterparty: str
    memo: str | None
    created_at_s: float


@dataclass(frozen=True, slots=True)
class Statement:
    holder: str
    currency: str
    balances: tuple[Balance, ...]
    lines: tuple[StatementLine, ...]  # newest first

    def as_dict(self) -> dict[str, Any]:
        """JSON for the API (amounts stay integer micro-units)."""
        return {
            "holder": self.holder,
            "currency": self.currency,
            "balances": [{"account": b.account_id, "balance_micros": b.balance_micros,
                          "held_micros": b.held_micros, "available_micros": b.available_micros,
                          "credit_limit_micros": b.credit_limit_micros} for b in self.balances],
            "lines": [{"seq": x.seq, "account": x.account_id, "transfer_id": x.transfer_id,
                       "kind": x.kind, "job_id": x.job_id, "amount_micros": x.amount_micros,
                       "held_micros": x.held_micros, "counterparty": x.counterparty,
                       "memo": x.memo, "created_at_s": x.created_at_s} for x in self.lines],
        }


class Ledger:
    """Accounts, holds, settlements, deposits, corrections, payouts and statements.

    ``sessions`` is the store's sessionmaker (or an Engine). ``prices`` are the configured prices;
    prices set through the admin API (``set_price``) are stored and take precedence. ``lanes``
    group commits run side by side (PostgreSQL); the calls for one job (``hold``, ``settle``,
    ``void``...) always share a lane. ``submit`` takes the least busy lane for its whole list,
    so a job's ops sent through ``submit`` and through the calls at once may meet in two lanes:
    the transfer ids keep that safe (the second transaction retries and finds them done).
    """

    def __init__(
        self,
        sessions: Any,
        currency: str = "USD",
        prices: PriceBook | None = None,
        *,
        clock: Callable[[], float] = time.time,
        lanes: int | None = None,
        batching: bool = True,
    ):
        book = prices or PriceBook.default(currency)
        self.book = book if book.currency == currency else replace(book, currency=currency)
        self.currency = self.book.currency
        self.store = LedgerStore(sessions)
        self.clock = clock
        n = lanes or (4 if self.store.dialect == "postgresql" else 1)
        self._prices: dict[str, ModelPrice] = {}
        self._prices_expire_s = float("-inf")
        self._batching = batching
        inline = self._apply_inline if self.store.inline_writes else None
        self._lanes = [GroupCommit(self._apply_batch, batch_ops_max if batching else 1,
                                   transient_store_errors, inline=inline)
                       for _ in range(n)]

    # ---- accounts ------------------------------------------------------------------------------

    def ensure_client(self, client_id: str) -> None:
        self.store.ensure_accounts([eng.client_account(check_id(client_id, "client id"))],
                                   self.currency, self.clock())

    def ensure_owner(self, owner_id: str) -> None:
        check_id(owner_id, "owner id")
        self.store.ensure_accounts([eng.owner_account(owner_id, p) for p in
                                    ("earned", "payable", "paid")], self.currency, self.clock())

    def set_credit_limit(self, client_id: str, credit_limit_micros: int) -> None:
        """Let a client's balance fall to ``-credit_limit_micros``; refused if it would leave
        the client below the new limit already."""
        if not 0 <= credit_limit_micros <= amount_micros_max:
            raise InvalidRequest("a credit limit is a non-negative amount")
        self.ensure_client(client_id)
        acc_id = eng.client_account(client_id)

        def work(tx: LedgerTx) -> None:
            acc = tx.accounts([acc_id], lock=True)[acc_id]
            if acc.available_micros - acc.credit_limit_micros + credit_limit_micros < 0:
                raise InvalidRequest(f"client {client_id} already uses more credit than that")
            tx.set_credit_limit(acc_id, credit_limit_micros)

        self.store.write(work)

    # ---- money -----------------------------------------------------------------------------

    def hold(self, job_id: str, client_id: str, model: str, prompt_tokens: int,
             max_tokens: int, *, job: JobRecord | None = None,
             workload: Workload = Workload.INFERENCE,
             attempt_start: Mapping[str, Any] | None = None) -> int:
        """Reserve the most the job can cost; returns the hold. Raises InsufficientBalance.

        ``job``, the job's row (a ``JobRecord``), is inserted in the hold's own
        transaction: as given when the hold is placed, ``failed`` with the reason when it is
        refused. So admission costs one commit, and no job is ever admitted without its hold.
        ``attempt_start``, the row of the job's first attempt (``job_attempts`` columns but the
        job's id) when it was placed as it was admitted, is inserted with a placed hold only.

        ``workload`` other than inference (the platform's own usage, decided by the client's
        key): the hold is on ``cost:opex:<workload>`` instead of the client, and the settlement
        pays the owners from it with no charge to the client and no fee (not revenue).
        """
        return self._submit(*self._hold_op(job_id, client_id, model, prompt_tokens, max_tokens,
                                           job, workload, attempt_start))

    async def hold_async(self, job_id: str, client_id: str, model: str, prompt_tokens: int,
                         max_tokens: int, *, job: JobRecord | None = None,
                         workload: Workload = Workload.INFERENCE,
                         attempt_start: Mapping[str, Any] | None = None) -> int:
        """``hold`` from a coroutine: queued on its lane's group commit without a thread."""
        return await self._submit_async(*self._hold_op(job_id, client_id, model, prompt_tokens,
                                                       max_tokens, job, workload, attempt_start))

    def _hold_op(self, job_id: str, client_id: str, model: str, prompt_tokens: int,
                 max_tokens: int, job: JobRecord | None,
                 workload: Workload = Workload.INFERENCE,
                 attempt_start: Mapping[str, Any] | None = None) -> tuple[Op, After | None]:
        _tokens(prompt_tokens, max_tokens)
        check_id(client_id, "client id")
        op = HoldOp(check_id(job_id, "job id"), client_id, model, prompt_tokens, max_tokens,
                    Workload(workload))
        if job is None:
            return op, None

        def record(tx: LedgerTx, result: Any) -> None:
            if isinstance(result, SpareCyclesError):  # refused: never placed either
                tx.insert_job(replace(job, state=JobState.FAILED, error=result.message,
                                      finished_at_s=self.clock(), node_id=None,
                                      attempts=0).as_row())
            else:
                tx.insert_job(job.as_row())
                if attempt_start is not None:
                    tx.start_attempt({**attempt_start, "job_id": job.id})

        return op, record

    def settle(self, job_id: str, client_id: str, model: str, prompt_tokens: int,
               completion_tokens: int, shares: Sequence[WorkShare], *,
               job: JobFinal | None = None,
               attempt_ends: Sequence[Mapping[str, Any]] = ()) -> Settlement:
        """Post the actual charge against the hold (the rest is released), credit each owner's
        earning for their share and the fee to the platform. Idempotent by job id.

        ``job`` (the job's final row) and ``attempt_ends`` (how its last attempts ended: each
        ``attempt`` and the columns of its ``job_attempts`` row to set) are written in the same
        transaction: a job's money, its final state and its attempts' metering in one commit."""
        return self._submit(*self._settle_op(job_id, client_id, model, prompt_tokens,
                                             completion_tokens, shares, job, attempt_ends))

    async def settle_async(self, job_id: str, client_id: str, model: str, prompt_tokens: int,
                           completion_tokens: int, shares: Sequence[WorkShare], *,
                           job: JobFinal | None = None,
                           attempt_ends: Sequence[Mapping[str, Any]] = ()) -> Settlement:
        """``settle`` from a coroutine: queued on its lane's group commit without a thread."""
        return await self._submit_async(*self._settle_op(job_id, client_id, model, prompt_tokens,
                                                         completion_tokens, shares, job,
                                                         attempt_ends))

    def _settle_op(self, job_id: str, client_id: str, model: str, prompt_tokens: int,
                   completion_tokens: int, shares: Sequence[WorkShare],
                   job: JobFinal | None, attempt_ends: Sequence[Mapping[str, Any]] = ()
                   ) -> tuple[Op, After | None]:  # fmt: skip
        _tokens(prompt_tokens, completion_tokens)
        for s in shares:
            check_id(s.owner_id, "owner id")
            check_id(s.node_id, "node id")
            _tokens(s.prompt_tokens, s.completion_tokens)
        op = SettleOp(check_id(job_id, "job id"), check_id(client_id, "client id"),
                      model, prompt_tokens, completion_tokens, tuple(shares))
        return op, self._job_update(job_id, job, attempt_ends)

    def void(self, job_id: str, *, job: JobFinal | None = None,
             attempt_ends: Sequence[Mapping[str, Any]] = ()) -> VoidOutcome:
        """Release a failed job's hold. Harmless to repeat, and a no-op after a settlement.
        ``job`` and ``attempt_ends`` as for ``settle``."""
        return self._submit(*self._void_op(job_id, job, attempt_ends))

    async def void_async(self, job_id: str, *, job: JobFinal | None = None,
                         attempt_ends: Sequence[Mapping[str, Any]] = ()) -> VoidOutcome:
        """``void`` from a coroutine: queued on its lane's group commit without a thread."""
        return await self._submit_async(*self._void_op(job_id, job, attempt_ends))

    def _void_op(self, job_id: str, job: JobFinal | None,
                 attempt_ends: Sequence[Mapping[str, Any]] = ()) -> tuple[Op, After | None]:
        return VoidOp(check_id(job_id, "job id")), self._job_update(job_id, job, attempt_ends)

    @staticmethod
    def _job_update(job_id: str, job: JobFinal | None,
                    attempt_ends: Sequence[Mapping[str, Any]] = ()) -> After | None:
        """``job``, fields of the job's row (its final state), and ``attempt_ends``, updated in
        the transaction of its settlement or void: a job is closed exactly when its money is, in
        one commit. Written whatever the op's result (a void after a settlement is a no-op, yet
        the job is over)."""
        if job is None and not attempt_ends:
            return None
        fields = job.as_row() if job is not None else None
        ends = [dict(e) for e in attempt_ends]

        def write(tx: LedgerTx, _result: Any) -> None:
            if fields is not None:
                tx.update_job(job_id, fields)
            if ends:
                tx.end_attempts(job_id, ends)

        return write

    def deposit(self, client_id: str, amount_micros: int, reference: str) -> str:
        """Credit a client's prepaid balance; ``reference`` (e.g. the payment's id) makes the
        deposit idempotent. Returns the transfer id."""
        check_id(client_id, "client id")
        check_id(reference, "deposit reference")
        return self._submit(DepositOp(client_id, amount_micros, reference))

    def withhold(self, job_id: str, reason: str, node_id: str | None = None) -> int:
        """Take back a settled job's earnings (of one node, or all) when verification finds the
        work was not done honestly. Each earning is moved by a correcting transfer from the
        owner's earned account back to the client, as a refund; the platform keeps its fee (it
        paid for the verification that caught it). An earning already paid out leaves the
        owner's earned balance negative, netted against later earnings. Returns the amount."""
        if node_id is not None:
            check_id(node_id, "node id")
        return self._submit(WithholdOp(check_id(job_id, "job id"), reason[:memo_chars_max],
                                       node_id))

    def record_cost(self, cost_id: str, category: str, amount_micros: int, *, cogs: bool = True,
                    memo: str | None = None) -> str:
        """Book a platform cost (hosting, verification, payment fees...) to ``cost:cogs:<c>`` or
        ``cost:opex:<c>``; idempotent by ``cost_id``. Owners' earnings are COGS already."""
        return self._submit(CostOp(check_id(cost_id, "cost id"), category, amount_micros, cogs,
                                   None if memo is None else memo[:memo_chars_max]))

    def submit(self, ops: Sequence[Op]) -> list[Any]:
        """Apply many operations, in order, in as few transactions as fit them (simulation,
        benchmarks, bulk imports): through the least busy lane's group commit, so concurrent
        submits share transactions of up to ``batch_ops_max`` ops. Returns one result per op:
        its value, or the SpareCyclesError it raised."""
        if not self._batching:  # each call its own transaction; a submit still one per chunk
            return [r for i in range(0, len(ops), batch_ops_max)
                    for r in self._apply_batch(list(ops[i : i + batch_ops_max]))]
        if not ops:
            return []
        lane = min(self._lanes, key=GroupCommit.load)
        return lane.submit_many(ops, [None] * len(ops))

    def _lane(self, op: Op) -> GroupCommit:
        key: str = (getattr(op, "job_id", None) or getattr(op, "reference", None)
                    or getattr(op, "cost_id", None) or "")
        return self._lanes[zlib.crc32(key.encode()) % len(self._lanes)]

    def _submit(self, op: Op, after: After | None = None) -> Any:
        return self._lane(op).submit(op, after)

    async def _submit_async(self, op: Op, after: After | None = None) -> Any:
        return await self._lane(op).submit_async(op, after)

    def _apply_inline(self, ops: list[Op], afters: Sequence[After | None]) -> list[Any] | None:
        """``_apply_batch`` now, on the event loop, or not at all (None): when the database is
        being written by another thread or process, or an account must be created first."""
        if not self.store.knows({a for op in ops for a in eng.accounts_of(op, {})}):
            return None
        try:
            return self._apply_batch(ops, afters, wait=False)
        except WriterBusy:
            return None

    def _apply_batch(self, ops: list[Op], afters: Sequence[After | None] = (), *,
                     wait: bool = True) -> list[Any]:
        """One transaction: load and lock what the ops touch, apply them, write the outcome,
        then each op's ``after`` with its result. ``wait=False``: see ``LedgerStore.write``."""
        now = self.clock()
        named = {a for op in ops for a in eng.accounts_of(op, {})}  # all but voids' and withholds'
        if not self.store.knows(named):  # create the accounts of the ops whose ids are valid
            self.store.ensure_accounts(
                {a for op in ops if not isinstance(op, VoidOp | WithholdOp) and eng.ids_valid(op)
                 for a in eng.accounts_of(op, {})}, self.currency, now)

        late = any(isinstance(op, VoidOp | WithholdOp) for op in ops)  # clients in their holds

        def work(tx: LedgerTx) -> list[Any]:
            jobs = eng.job_ids(ops)
            held = [j.job_id for j in ops if isinstance(j, SettleOp | VoidOp | WithholdOp)]
            if late:  # read the holds, then lock their clients too
                holds = tx.holds(held)
                touched = named | {a for op in ops if isinstance(op, VoidOp | WithholdOp)
                                   for a in eng.accounts_of(op, holds)}
                clients = {a for a in touched if eng.account_kind(a) == "client"}
                accounts = tx.accounts(clients, lock=True)
                transfers = tx.transfers(job_ids=jobs, ids=eng.transfer_ids(ops))
            else:  # the same three reads, in one round trip on PostgreSQL
                touched = set(named)
                clients = {a for a in touched if eng.account_kind(a) == "client"}
                holds, accounts, transfers = tx.load(held, clients, jobs, eng.transfer_ids(ops))
            touched |= {a for t in transfers.values()
                        for a in (t.debit_account_id, t.credit_account_id)}
            for a in touched - accounts.keys():
                accounts[a] = eng.AccountState(a, self.currency)
            prices = self._stored_prices(tx, now) if any(isinstance(o, HoldOp) for o in ops) else {}
            snap = eng.Snapshot(now, self.book, accounts, transfers, holds, prices)
            out = eng.apply(snap, ops)
            tx.write(out)
            for after, result in zip(afters, out.results, strict=False):
                if after is not None:
                    after(tx, result)
            return out.results

        return self.store.write(work, wait=wait)

    def _stored_prices(self, tx: LedgerTx, now: float) -> dict[str, ModelPrice]:
        """Prices set through the admin API, re-read at most every ``prices_cache_s``."""
        if now >= self._prices_expire_s or now < self._prices_expire_s - prices_cache_s:
            self._prices = tx.all_prices(self.currency)
            self._prices_expire_s = now + prices_cache_s
        return self._prices

    # ---- reading ---------------------------------------------------------------------------

    def balance(self, account_id: str) -> Balance:
        acc = self.store.read(lambda tx: tx.accounts([account_id])).get(account_id)
        if acc is None:
            return Balance(account_id, self.currency, 0, 0, 0, 0)
        return _balance(acc)

    def resolve(self, kind: str, name_or_id: str) -> str:
        """A client's or an owner's id from its name or id (people type names)."""
        if kind not in ("client", "owner"):
            raise InvalidRequest(f"resolve a client or an owner, not {kind!r}")
        return self.store.read(lambda tx: tx.resolve(kind, name_or_id))

    def client_balance(self, client_id: str) -> Balance:
        return self.balance(eng.client_account(client_id))

    def owner_balance(self, owner_id: str) -> OwnerBalance:
        parts = [self.balance(eng.owner_account(owner_id, p)).balance_micros
                 for p in ("earned", "payable", "paid")]
        return OwnerBalance(owner_id, self.currency, *parts)

    def statement(self, *, client_id: str | None = None, owner_id: str | None = None,
                  limit: int = 50) -> Statement:
        """Balances and the newest ``limit`` transfers of a client or an owner."""
        if (client_id is None) == (owner_id is None):
            raise InvalidRequest("a statement is for one client or one owner")
        if client_id is not None:
            holder, ids = f"client {client_id}", [eng.client_account(client_id)]
        else:
            holder = f"owner {owner_id}"
            ids = [eng.owner_account(owner_id or "", p) for p in ("earned", "payable", "paid")]
        limit = max(1, min(limit, statement_lines_max))

        def work(tx: LedgerTx) -> Statement:
            accs = tx.accounts(ids)
            balances = tuple(_balance(accs[i]) if i in accs else
                             Balance(i, self.currency, 0, 0, 0, 0) for i in ids)
            lines = tuple(line for r in tx.statement(ids, limit)
                          for line in _lines(r.seq, r.transfer, r.hold_amount_micros, ids))
            return Statement(holder, self.currency, balances, lines)

        return self.store.read(work)

    def job_money(self, job_id: str) -> dict[str, Any]:
        """A job's money for its client and the API: hold, charge, release, fee, earnings."""
        ts = self.store.read(lambda tx: tx.transfers(job_ids=[job_id]))
        by = {t.id.removeprefix(f"job:{job_id}:"): t for t in ts.values()}

        def amount(kind: str) -> int:
            return sum(t.amount_micros for t in ts.values() if t.kind == kind)

        held = by["hold"].amount_micros if "hold" in by else 0
        state = ("settled" if "post" in by else "voided" if "void" in by else
                 "held" if "hold" in by else "none")
        charged = amount("post")
        return {"currency": self.currency, "state": state, "held_micros": held,
                "charged_micros": charged,
                "released_micros": held - charged if state in ("settled", "voided") else 0,
                "owner_earned_micros": amount("earning"), "fee_micros": amount("fee"),
                "earnings": {k.removeprefix("earning:"): t.amount_micros
                             for k, t in by.items() if k.startswith("earning:")},
                "withheld_micros": amount("withhold")}

    # ---- prices ----------------------------------------------------------------------------

    def prices(self) -> PriceBook:
        """The configured prices with those set through the admin API on top."""
        stored = self.store.read(lambda tx: tx.all_prices(self.currency))
        return replace(self.book, models={**self.book.models, **stored})

    def set_price(self, model: str, price: ModelPrice) -> None:
        """Set a model's price (admin API, CLI). Jobs admitted before keep their price."""
        if not model or len(model) > 200:
            raise InvalidRequest("a model name is 1-200 characters")
        self.store.write(lambda tx: tx.set_price(model, self.currency, price, self.clock()))
        self._prices_expire_s = float("-inf")

    # ---- the audit (payouts: ledger/payouts.py, called with the ledger) -----------------------

    def check(self, now_s: float | None = None, grace_s: float = 300.0) -> list[str]:
        """Every broken invariant, one line each; empty when the books are right."""
        return audit(self.store, self.currency, self.clock() if now_s is None else now_s,
                     grace_s)


def _tokens(*counts: int) -> None:
    for n in counts:
        if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= tokens_max:
            raise InvalidRequest(f"token counts are integers in 0..{tokens_max}, got {n!r}")


def _balance(acc: eng.AccountState) -> Balance:
    return Balance(acc.id, acc.currency, acc.balance_micros, acc.debits_pending,
                   acc.credits_pending, acc.credit_limit_micros)


def _lines(seq: int, t: TransferRow, hold_amount: int | None, mine: list[str]
           ) -> list[StatementLine]:
    """How one transfer changed each of ``mine`` (a transfer between two of them gives two)."""
    out = []
    for acc in mine:
        if acc not in (t.debit_account_id, t.credit_account_id):
            continue
        debit = acc == t.debit_account_id
        if t.kind in ("post", "void"):
            invariant(hold_amount is not None, f"{t.id} resolves no hold")
        posted = 0 if t.kind in ("hold", "void") else t.amount_micros
        held = 0
        if debit and t.kind == "hold":
            held = t.amount_micros
        elif debit and t.kind in ("post", "void"):
            held = -(hold_amount or 0)
        other = t.credit_account_id if debit else t.debit_account_id
        out.append(StatementLine(seq, acc, t.id, t.kind, t.job_id,
                                 -posted if debit else posted, held, other, t.memo,
                                 t.created_at_s))
    return out
