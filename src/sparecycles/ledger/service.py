"""The ledger service: every unit of money moves through one double-entry ledger.

The coordinator calls this synchronously from a worker thread; each call is one database
transaction (or a share of one: concurrent calls are committed together, see ``_GroupCommit``).
The logic lives in ``ledger_engine.apply`` (pure), the SQL in ``store/ledger_store.py``, the
payout runs in ``ledger/payouts.py`` and the independent auditor in ``ledger/audit.py``.

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
7. Payouts. A batch pays each owner once, never more than the owner's earned balance, and the
   owners' paid accounts equal the payout lines marked paid. (``ledger/payouts.py``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from sparecycles.errors import InvalidRequest, SpareCyclesError, invariant
from sparecycles.ledger import engine as eng
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
from sparecycles.ledger.pricing import (
    Earning,
    ModelPrice,
    PriceBook,
    WorkShare,
    amount_micros_max,
    tokens_max,
)
from sparecycles.store.db import transient_store_errors
from sparecycles.store.ledger_queries import LedgerStore, LedgerTx

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


# Work done inside an op's own transaction once its result is known (the result: its value, or
# the SpareCyclesError it raised): how an admission writes its job row with its hold.
After = Callable[[LedgerTx, Any], None]


class _Caller:
    """One caller waiting on its ops: woken when all of them are done, or to lead."""

    __slots__ = ("event", "left", "promoted")

    def __init__(self, ops: int):
        self.event, self.left, self.promoted = threading.Event(), ops, False


class _Pending:
    """One queued op: of a thread waiting (``caller``) or of a coroutine (``future``)."""

    __slots__ = ("after", "caller", "error", "future", "op", "result")

    def __init__(self, op: Op, after: After | None, caller: _Caller | None,
                 future: asyncio.Future[Any] | None = None):  # fmt: skip
        self.op, self.after, self.caller, self.future = op, after, caller, future
        self.result: Any = None
        self.error: BaseException | None = None


def _resolve(done: list[_Pending]) -> None:
    """On the event loop: hand each coroutine its op's result (or the error)."""
    for p in done:
        fut = p.future
        if fut is None or fut.done():
            continue
        if p.error is not None:
            fut.set_exception(p.error)
        elif isinstance(p.result, BaseException):
            fut.set_exception(p.result)
        else:
            fut.set_result(p.result)


class _GroupCommit:
    """Commit concurrent calls together: the first caller leads and runs every queued op in one
    transaction, then hands the lead to the next waiter. A single caller pays no wait; under load
    one commit (the expensive part) serves up to ``batch_ops_max`` operations. Safe because
    ``apply`` gives each op in a batch the same result it would have alone, in queue order.
    A caller may queue many ops at once (``Ledger.submit``): they stay in order, and are run in
    as few transactions as fit them, shared with other callers' ops.

    Coroutines queue ops too (``submit_async``) without holding a thread each while they wait:
    when the op at the head of the queue is a coroutine's, the lane's own worker thread leads
    (and hands the lead back to a waiting thread when one is at the head again)."""

    def __init__(self, run: Callable[[list[Op], list[After | None]], list[Any]], ops_max: int):
        self._run, self._ops_max = run, ops_max
        self._lock = threading.Lock()
        self._queue: deque[_Pending] = deque()
        self._busy = False
        self._worker: ThreadPoolExecutor | None = None

    def load(self) -> int:
        """Ops queued or running (a hint for choosing a lane; read without the lock)."""
        return len(self._queue) + self._busy

    def submit(self, op: Op, after: After | None = None) -> Any:
        p = self.submit_many([op], [after])[0]
        if isinstance(p, BaseException):
            raise p
        return p

    def submit_many(self, ops: Sequence[Op], afters: Sequence[After | None]) -> list[Any]:
        """Each op's result (its value or the SpareCyclesError it raised), in order; raises
        what made the transaction of one of them fail (a transaction that fails for one op's
        sake is run again op by op, so the others of the list may have committed)."""
        me = _Caller(len(ops))
        mine = [_Pending(op, after, me) for op, after in zip(ops, afters, strict=True)]
        with self._lock:
            self._queue.extend(mine)
            lead = not self._busy
            self._busy = True
        if not lead:
            me.event.wait()
            if not me.promoted:
                return self._results(mine)
        while me.left:
            self._run_one_batch(me)
        self._hand_on()
        return self._results(mine)

    def submit_async(self, op: Op, after: After | None = None) -> asyncio.Future[Any]:
        """Queue ``op`` from a coroutine; the future is done when its transaction is."""
        loop = asyncio.get_running_loop()
        p = _Pending(op, after, None, loop.create_future())
        with self._lock:
            self._queue.append(p)
            lead = not self._busy
            self._busy = True
        if lead:
            self._start_worker()
        return p.future  # type: ignore[return-value]

    def _start_worker(self) -> None:
        """Give the lead to the lane's worker thread. When no thread can be had (the process
        is out of threads, or the interpreter is shutting down) the caller at hand leads: the
        lane is busy, so left without a leader it would stop every later call on it."""
        try:
            if self._worker is None:
                self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-lane")
            self._worker.submit(self._lead_for_coroutines)
        except RuntimeError:
            # A failed thread start leaves the task queued in that executor: never use it again
            # (were its thread to start later, the task would lead beside whoever leads then).
            self._worker = None
            self._lead_for_coroutines()

    def _lead_for_coroutines(self) -> None:
        """The worker's turn as leader: run batches while a coroutine's op is at the head."""
        while True:
            with self._lock:
                head = self._queue[0] if self._queue else None
            if head is None or head.caller is not None:
                break
            self._run_one_batch(None)
        self._hand_on()

    def _run_one_batch(self, me: _Caller | None) -> None:
        with self._lock:
            batch = [self._queue.popleft() for _ in range(min(self._ops_max, len(self._queue)))]
        try:
            results = self._run([p.op for p in batch], [p.after for p in batch])
            for p, r in zip(batch, results, strict=True):
                p.result = r
        except Exception as exc:
            if len(batch) == 1 or isinstance(exc, transient_store_errors):
                for p in batch:  # the database is away (its retries are spent): all learn why
                    p.error = exc
            else:  # one op broke the transaction: run each alone, so it costs only itself
                for p in batch:
                    try:
                        p.result = self._run([p.op], [p.after])[0]
                    except Exception as alone:
                        p.error = alone
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: every op learns why
            for p in batch:
                p.error = exc
        by_loop: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        for p in batch:
            if p.caller is None:
                fut = p.future
                if fut is not None:
                    by_loop.setdefault(fut.get_loop(), []).append(p)
                continue
            p.caller.left -= 1
            if not p.caller.left and p.caller is not me:
                p.caller.event.set()
        for loop, done in by_loop.items():  # one wake-up of each loop per transaction
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                loop.call_soon_threadsafe(_resolve, done)

    def _hand_on(self) -> None:
        """The leader is done: the lead goes to the op at the head of the queue, if any."""
        with self._lock:
            if not self._queue:
                self._busy = False
                return
            head = self._queue[0]
            if head.caller is not None:
                head.caller.promoted = True
                head.caller.event.set()
                return
        self._start_worker()

    @staticmethod
    def _results(mine: list[_Pending]) -> list[Any]:
        for p in mine:
            if p.error is not None:
                raise p.error
        return [p.result for p in mine]


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
        self._lanes = [_GroupCommit(self._apply_batch, batch_ops_max if batching else 1)
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
             max_tokens: int, *, job: Mapping[str, Any] | None = None) -> int:
        """Reserve the most the job can cost; returns the hold. Raises InsufficientBalance.

        ``job``, the job's row (``store.schema.JobRow``'s columns), is inserted in the hold's own
        transaction: as given when the hold is placed, ``failed`` with the reason when it is
        refused. So admission costs one commit, and no job is ever admitted without its hold.
        """
        return self._submit(*self._hold_op(job_id, client_id, model, prompt_tokens, max_tokens,
                                           job))

    async def hold_async(self, job_id: str, client_id: str, model: str, prompt_tokens: int,
                         max_tokens: int, *, job: Mapping[str, Any] | None = None) -> int:
        """``hold`` from a coroutine: queued on its lane's group commit without a thread."""
        return await self._submit_async(*self._hold_op(job_id, client_id, model, prompt_tokens,
                                                       max_tokens, job))

    def _hold_op(self, job_id: str, client_id: str, model: str, prompt_tokens: int,
                 max_tokens: int, job: Mapping[str, Any] | None) -> tuple[Op, After | None]:
        _tokens(prompt_tokens, max_tokens)
        check_id(client_id, "client id")
        op = HoldOp(check_id(job_id, "job id"), client_id, model, prompt_tokens, max_tokens)
        if job is None:
            return op, None
        row = dict(job)

        def record(tx: LedgerTx, result: Any) -> None:
            if isinstance(result, SpareCyclesError):
                tx.insert_job({**row, "state": "failed", "error": result.message,
                               "finished_at_s": self.clock()})
            else:
                tx.insert_job(row)

        return op, record

    def settle(self, job_id: str, client_id: str, model: str, prompt_tokens: int,
               completion_tokens: int, shares: Sequence[WorkShare], *,
               job: Mapping[str, Any] | None = None) -> Settlement:
        """Post the actual charge against the hold (the rest is released), credit each owner's
        earning for their share and the fee to the platform. Idempotent by job id."""
        return self._submit(*self._settle_op(job_id, client_id, model, prompt_tokens,
                                             completion_tokens, shares, job))

    async def settle_async(self, job_id: str, client_id: str, model: str, prompt_tokens: int,
                           completion_tokens: int, shares: Sequence[WorkShare], *,
                           job: Mapping[str, Any] | None = None) -> Settlement:
        """``settle`` from a coroutine: queued on its lane's group commit without a thread."""
        return await self._submit_async(*self._settle_op(job_id, client_id, model, prompt_tokens,
                                                         completion_tokens, shares, job))

    def _settle_op(self, job_id: str, client_id: str, model: str, prompt_tokens: int,
                   completion_tokens: int, shares: Sequence[WorkShare],
                   job: Mapping[str, Any] | None) -> tuple[Op, After | None]:  # fmt: skip
        _tokens(prompt_tokens, completion_tokens)
        for s in shares:
            check_id(s.owner_id, "owner id")
            check_id(s.node_id, "node id")
            _tokens(s.prompt_tokens, s.completion_tokens)
        op = SettleOp(check_id(job_id, "job id"), check_id(client_id, "client id"),
                      model, prompt_tokens, completion_tokens, tuple(shares))
        return op, self._job_update(job_id, job)

    def void(self, job_id: str, *, job: Mapping[str, Any] | None = None) -> VoidOutcome:
        """Release a failed job's hold. Harmless to repeat, and a no-op after a settlement."""
        return self._submit(*self._void_op(job_id, job))

    async def void_async(self, job_id: str, *,
                         job: Mapping[str, Any] | None = None) -> VoidOutcome:  # fmt: skip
        """``void`` from a coroutine: queued on its lane's group commit without a thread."""
        return await self._submit_async(*self._void_op(job_id, job))

    def _void_op(self, job_id: str,
                 job: Mapping[str, Any] | None) -> tuple[Op, After | None]:  # fmt: skip
        return VoidOp(check_id(job_id, "job id")), self._job_update(job_id, job)

    @staticmethod
    def _job_update(job_id: str, job: Mapping[str, Any] | None) -> After | None:
        """``job``, fields of the job's row (its final state), updated in the transaction of its
        settlement or void: a job is closed exactly when its money is, in one commit. Written
        whatever the op's result (a void after a settlement is a no-op, yet the job is over)."""
        if job is None:
            return None
        fields = dict(job)
        return lambda tx, _result: tx.update_job(job_id, fields)

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
        lane = min(self._lanes, key=_GroupCommit.load)
        return lane.submit_many(ops, [None] * len(ops))

    def _lane(self, op: Op) -> _GroupCommit:
        key = (getattr(op, "job_id", None) or getattr(op, "reference", None)
               or getattr(op, "cost_id", ""))
        return self._lanes[zlib.crc32(key.encode()) % len(self._lanes)]

    def _submit(self, op: Op, after: After | None = None) -> Any:
        return self._lane(op).submit(op, after)

    async def _submit_async(self, op: Op, after: After | None = None) -> Any:
        return await self._lane(op).submit_async(op, after)

    def _apply_batch(self, ops: list[Op], afters: Sequence[After | None] = ()) -> list[Any]:
        """One transaction: load and lock what the ops touch, apply them, write the outcome,
        then each op's ``after`` with its result."""
        now = self.clock()
        named = {a for op in ops for a in eng.accounts_of(op, {})}  # all but voids' and withholds'
        if not self.store.knows(named):  # create the accounts of the ops whose ids are valid
            self.store.ensure_accounts(
                {a for op in ops if not isinstance(op, VoidOp | WithholdOp) and eng.ids_valid(op)
                 for a in eng.accounts_of(op, {})}, self.currency, now)

        late = any(isinstance(op, VoidOp | WithholdOp) for op in ops)  # clients in their holds

        def work(tx: LedgerTx) -> list[Any]:
            jobs = eng.job_ids(ops)
            held = [j.job_id for j in ops if not isinstance(j, HoldOp | DepositOp | CostOp)]
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

        return self.store.write(work)

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

    # ---- payouts and the audit ---------------------------------------------------------------

    def run_payouts(self, min_micros: int, out_path: Path, batch_id: str | None = None) -> Any:
        """Pay every owner whose earned balance is at least ``min_micros``; see
        ledger/payouts.py."""
        from sparecycles.ledger.payouts import run_payouts

        return run_payouts(self, min_micros, Path(out_path), batch_id)

    def fail_payout(self, batch_id: str, owner_id: str, reason: str) -> int:
        """Reverse one owner's payout that the bank returned; see ledger/payouts.py."""
        from sparecycles.ledger.payouts import fail_payout

        return fail_payout(self, batch_id, owner_id, reason[:memo_chars_max])

    def check(self, now_s: float | None = None, grace_s: float = 300.0) -> list[str]:
        """Every broken invariant, one line each; empty when the books are right."""
        from sparecycles.ledger.audit import audit

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
