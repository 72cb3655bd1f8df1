"""The ledger's state machine: operations applied to a snapshot of accounts and transfers. Pure.

``apply(snapshot, ops)`` is the whole of the ledger's logic. It reads only the snapshot the store
loaded (with the client accounts locked), and returns the transfers to insert, the change of
every account's totals and one result per operation (a value, or the expected error of that
operation alone). No database, clock or randomness inside, so the same code runs in the service,
in batches, and under the simulation test.

Chart of accounts (one currency per ledger; ``credit`` accounts grow with credits):

==============================  ==========================================================
``client:<id>``                 a client's prepaid balance; may fall to ``-credit_limit``
``owner:<id>:earned``           earned by an owner's nodes, not yet in a payout
``owner:<id>:payable``          in a payout batch whose file is being written
``owner:<id>:paid``             paid out to the owner: money that left the platform
``platform:revenue``            every charge comes in here and leaves at once as earnings
                                and fee, so its posted balance is zero after each settlement
``platform:fees``               the platform's fee income
``world:deposits``              where client deposits come from (its debits: all deposits)
``cost:cogs:<category>``        the platform's cost of goods sold (hosting, verification,
``cost:opex:<category>``        payment fees...) and operating costs, for the cost engine;
                                ``cost:opex:training``/``rnd`` also pay for the platform's
                                own usage (through ``platform:internal``, never revenue)
``world:vendors``               paid to the world (vendors)
==============================  ==========================================================

Transfer ids, derived from the job and the event so that a retry is recognised:
``job:<id>:hold``, ``job:<id>:post``, ``job:<id>:void``, ``job:<id>:earning:<node>``,
``job:<id>:fee``, ``job:<id>:withhold:<node>``, ``deposit:<reference>``, ``cost:<id>``,
``payout:<batch>:<owner>:payable|paid|reversal``.
"""

from __future__ import annotations

import enum
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from sparecycles.errors import (
    Conflict,
    InsufficientBalance,
    InvalidRequest,
    InvariantViolation,
    SpareCyclesError,
    invariant,
)
from sparecycles.ledger.pricing import (
    Earning,
    ModelPrice,
    PayoutTerms,
    PriceBook,
    WorkShare,
    amount_micros_max,
    charge_micros,
    format_money,
    hold_micros,
    split_charge,
)
from sparecycles.types import Workload

REVENUE = "platform:revenue"
INTERNAL = "platform:internal"  # the clearing account of the platform's own usage
FEES = "platform:fees"
DEPOSITS = "world:deposits"
VENDORS = "world:vendors"
id_pattern = re.compile(r"^[A-Za-z0-9._~@+=/-]{1,80}$")  # ids of clients, owners, nodes, jobs


def client_account(client_id: str) -> str:
    return f"client:{client_id}"


def owner_account(owner_id: str, part: str = "earned") -> str:
    invariant(part in ("earned", "payable", "paid"), f"no owner account part {part!r}")
    return f"owner:{owner_id}:{part}"


def account_kind(account_id: str) -> str:
    """``client``, ``owner_earned``/``owner_payable``/``owner_paid``, ``platform``, ``world``,
    ``cost``: the kind decides the lock order and which checks apply."""
    head, _, rest = account_id.partition(":")
    if head == "owner":
        return "owner_" + rest.rpartition(":")[2]
    return head


def holder_of(account_id: str) -> str | None:
    head, _, rest = account_id.partition(":")
    if head == "client":
        return rest
    if head == "owner":
        return rest.rpartition(":")[0]
    return None


def lock_rank(account_id: str) -> tuple[int, str]:
    """Every transaction takes account locks in this order (clients, owners, the rest), which
    is what makes concurrent settlements free of deadlocks on PostgreSQL."""
    kind = account_kind(account_id)
    return (0 if kind == "client" else 1 if kind.startswith("owner") else 2, account_id)


def check_id(value: str, what: str) -> str:
    if not isinstance(value, str) or not id_pattern.match(value):
        raise InvalidRequest(f"{what} must be 1-80 letters, digits or ._~@+=/-, got {value!r}")
    return value


def ids_valid(op: Any) -> bool:
    """Whether every id an op would name an account or transfer by is well formed (checked
    before its accounts are created; the op itself then fails with the reason)."""
    ids = [getattr(op, f) for f in ("job_id", "client_id", "reference", "cost_id", "owner_id",
                                    "batch_id") if getattr(op, f, None) is not None]
    ids += [x for s in getattr(op, "shares", ()) for x in (s.owner_id, s.node_id)]
    return all(isinstance(i, str) and id_pattern.match(i) for i in ids)


# What json.dumps(parts, sort_keys=True, separators=(",", ":"), default=repr) builds on every
# call; made once, it makes the same text (two fingerprints per settlement).
_canonical_json = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=repr).encode


def fingerprint(*parts: Any) -> str:
    """SHA-256 of the canonical JSON of a request: equal requests, equal fingerprints."""
    return hashlib.sha256(_canonical_json(parts).encode()).hexdigest()


# ---- state -----------------------------------------------------------------------------------


@dataclass(slots=True)
class AccountState:
    id: str
    currency: str
    debits_posted: int = 0
    credits_posted: int = 0
    debits_pending: int = 0
    credits_pending: int = 0
    credit_limit_micros: int = 0

    @property
    def kind(self) -> str:
        return account_kind(self.id)

    @property
    def balance_micros(self) -> int:
        """Posted credits less posted debits (what a credit-normal account holds)."""
        return self.credits_posted - self.debits_posted

    @property
    def available_micros(self) -> int:
        """What a client can still spend: balance less open holds plus its credit limit."""
        return self.balance_micros - self.debits_pending + self.credit_limit_micros


class TransferKind(enum.StrEnum):
    """What a transfer does (the ``kind`` column of ``ledger_transfers``)."""

    HOLD = "hold"  # client -> revenue, pending: the most a job can cost
    POST = "post"  # resolves a hold: the actual charge
    VOID = "void"  # resolves a hold: nothing charged
    EARNING = "earning"  # revenue -> an owner's earned account, a node's share of a job
    FEE = "fee"  # revenue -> the platform's fees
    DEPOSIT = "deposit"  # a client's prepayment
    WITHHOLD = "withhold"  # an earning taken back to its client (verification failed)
    COST = "cost"  # a platform cost booked to a vendor
    PAYOUT = "payout"  # an owner's earned -> payable -> paid
    PAYOUT_REVERSAL = "payout_reversal"  # a returned payout, back to earned
    WRITE_OFF = "write_off"  # an owner's receivable written off (cost:opex) after a stated period


class PayoutStep(enum.StrEnum):
    """The steps of one owner's line of a payout batch (``PayoutOp.step``)."""

    QUEUE = "queue"  # earned -> payable
    PAY = "pay"  # payable -> paid
    REVERSE = "reverse"  # back to earned, from wherever the money is


class TransferRow(NamedTuple):
    """A transfer as stored (``types.Transfer`` plus what makes it auditable). Immutable; a
    tuple in the order of the table's columns, so the store writes it as it is (a frozen
    dataclass took 1.2 us to build, this 0.25, and a settlement builds six)."""

    id: str
    debit_account_id: str
    credit_account_id: str
    amount_micros: int
    currency: str
    kind: str
    job_id: str | None
    pending_id: str | None
    fingerprint: str
    memo: str | None
    created_at_s: float


@dataclass(frozen=True, slots=True)
class HoldTerms:
    """The terms a job was admitted on (row of ``ledger_holds``)."""

    job_id: str
    client_id: str
    model: str
    currency: str
    prompt_tokens: int
    max_tokens: int
    price: ModelPrice
    terms: PayoutTerms
    hold_micros: int
    created_at_s: float


@dataclass(slots=True)
class Snapshot:
    """What the store loaded for one batch. Client accounts are fresh and locked; the others are
    only ever changed by deltas, so their totals here may be zero."""

    now_s: float
    book: PriceBook
    accounts: dict[str, AccountState]
    transfers: dict[str, TransferRow]  # existing rows the batch's ids may collide with
    holds: dict[str, HoldTerms]
    prices: Mapping[str, ModelPrice] = field(default_factory=dict)  # set through the admin API


# ---- operations and results -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class HoldOp:
    job_id: str
    client_id: str
    model: str
    prompt_tokens: int
    max_tokens: int
    workload: Workload = Workload.INFERENCE  # decided by the platform (the client's key)


@dataclass(frozen=True, slots=True)
class SettleOp:
    job_id: str
    client_id: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    shares: tuple[WorkShare, ...]


@dataclass(frozen=True, slots=True)
class VoidOp:
    job_id: str


@dataclass(frozen=True, slots=True)
class DepositOp:
    client_id: str
    amount_micros: int
    reference: str


@dataclass(frozen=True, slots=True)
class WithholdOp:
    job_id: str
    reason: str
    node_id: str | None = None


@dataclass(frozen=True, slots=True)
class CostOp:
    cost_id: str
    category: str
    amount_micros: int
    cogs: bool = True
    memo: str | None = None


@dataclass(frozen=True, slots=True)
class PayoutOp:
    """One owner's line of a payout batch: ``queue`` (earned -> payable), ``pay`` (payable ->
    paid) or ``reverse`` (back to earned, from wherever the money is)."""

    batch_id: str
    owner_id: str
    amount_micros: int
    step: PayoutStep
    memo: str | None = None


@dataclass(frozen=True, slots=True)
class WriteOffOp:
    """Write off an owner's receivable (a negative earned balance: a withhold after the earning
    was paid out) that no later earning netted within ``limits.owner_receivable_s_max``.
    ``as_of_s``, the time of the balance's last change, names the transfer, so two runs that
    see the same receivable write it off once."""

    owner_id: str
    amount_micros: int
    as_of_s: float


WRITE_OFFS = "cost:opex:owner_receivables_written_off"

Op = HoldOp | SettleOp | VoidOp | DepositOp | WithholdOp | CostOp | PayoutOp | WriteOffOp


@dataclass(frozen=True, slots=True)
class Settlement:
    """A settled job: ``charge == sum(earnings) + fee``; ``released`` went back to the client."""

    job_id: str
    charge_micros: int
    released_micros: int
    fee_micros: int
    earnings: tuple[Earning, ...]
    replayed: bool = False


class VoidOutcome(enum.StrEnum):
    VOIDED = "voided"
    ALREADY_VOIDED = "already_voided"
    SETTLED = "settled"  # a late failure after the job was settled: the charge stands
    NO_HOLD = "no_hold"  # the job was refused before any hold


@dataclass(slots=True)
class Outcome:
    results: list[Any]  # per op: its value or the SpareCyclesError it raised
    transfers: list[TransferRow]
    holds: list[HoldTerms]
    deltas: dict[str, list[int]]  # account -> [debits_posted, credits_posted, dpending, cpending]


def job_ids(ops: Sequence[Op]) -> set[str]:
    return {o.job_id for o in ops if isinstance(o, HoldOp | SettleOp | VoidOp | WithholdOp)}


def transfer_ids(ops: Sequence[Op]) -> set[str]:
    """Ids not keyed by a job (the store loads a batch's jobs' transfers by ``job_id``)."""
    out: set[str] = set()
    for o in ops:
        if isinstance(o, DepositOp):
            out.add(f"deposit:{o.reference}")
        elif isinstance(o, CostOp):
            out.add(f"cost:{o.cost_id}")
        elif isinstance(o, PayoutOp):
            out.update(f"payout:{o.batch_id}:{o.owner_id}:{s}"
                       for s in ("payable", "paid", "reversal"))
        elif isinstance(o, WriteOffOp):
            out.add(write_off_id(o))
    return out


def write_off_id(op: WriteOffOp) -> str:
    return f"writeoff:{op.owner_id}:{int(op.as_of_s * 1000)}"


def accounts_of(op: Op, holds: Mapping[str, HoldTerms]) -> set[str]:
    """Every account an op may touch (created beforehand; clients locked)."""
    if isinstance(op, HoldOp):
        if op.workload is not Workload.INFERENCE:
            return {client_account(op.client_id), internal_use_account(op.workload), INTERNAL}
        return {client_account(op.client_id), REVENUE}
    if isinstance(op, SettleOp):  # all three of an owner's accounts exist from the first
        owners = {owner_account(s.owner_id, p) for s in op.shares
                  for p in ("earned", "payable", "paid")}
        return {client_account(op.client_id), REVENUE, FEES, *owners}
    if isinstance(op, PayoutOp):
        return {owner_account(op.owner_id, p) for p in ("earned", "payable", "paid")}
    if isinstance(op, DepositOp):
        return {client_account(op.client_id), DEPOSITS}
    if isinstance(op, CostOp):
        return {_cost_account(op), VENDORS}
    if isinstance(op, WriteOffOp):
        return {owner_account(op.owner_id), WRITE_OFFS}
    terms = holds.get(op.job_id)
    return {client_account(terms.client_id), REVENUE} if terms else set()


def internal_use_account(workload: Workload) -> str:
    """Where the platform's own usage of a workload is paid from: an operating expense."""
    invariant(workload is not Workload.INFERENCE, "inference is charged to its client")
    return f"cost:opex:{workload}"


def _cost_account(op: CostOp) -> str:
    return f"cost:{'cogs' if op.cogs else 'opex'}:{op.category}"


# ---- the state machine ------------------------------------------------------------------------


class _Machine:
    def __init__(self, snap: Snapshot):
        self.s = snap
        self.out = Outcome([], [], [], {})
        self.by_job: dict[str, list[TransferRow]] = {}
        for t in snap.transfers.values():
            if t.job_id is not None:
                self.by_job.setdefault(t.job_id, []).append(t)

    def of_job(self, job_id: str, kind: TransferKind) -> list[TransferRow]:
        return sorted((t for t in self.by_job.get(job_id, ()) if t.kind == kind),
                      key=lambda t: t.id)

    def account(self, account_id: str) -> AccountState:
        acc = self.s.accounts.get(account_id)
        if acc is None or acc.currency != self.s.book.currency:
            raise InvariantViolation(f"account {account_id} was not loaded, or is in another "
                                     f"currency than {self.s.book.currency}")
        return acc

    def job_transfer(self, job_id: str, event: str) -> TransferRow | None:
        return self.s.transfers.get(f"job:{job_id}:{event}")

    def emit(self, t: TransferRow) -> None:
        """Record a transfer and apply it to both accounts' totals (the only place that does)."""
        if (t.id in self.s.transfers or not 0 <= t.amount_micros <= amount_micros_max
                or t.debit_account_id == t.credit_account_id
                or t.currency != self.s.book.currency):
            raise InvariantViolation(f"{t} breaks double entry: a duplicate id, an amount out "
                                     "of range, one account on both sides or another currency")
        dr, cr = self.account(t.debit_account_id), self.account(t.credit_account_id)
        d_dr = self.out.deltas.setdefault(dr.id, [0, 0, 0, 0])
        d_cr = self.out.deltas.setdefault(cr.id, [0, 0, 0, 0])
        amount, posted = t.amount_micros, t.amount_micros
        if t.kind in ("post", "void"):
            hold = self.s.transfers.get(t.pending_id or "")
            if (hold is None or hold.kind != "hold" or amount > hold.amount_micros
                    or (hold.debit_account_id, hold.credit_account_id) != (dr.id, cr.id)):
                raise InvariantViolation(f"{t.id} does not resolve a matching hold")
            dr.debits_pending -= hold.amount_micros
            cr.credits_pending -= hold.amount_micros
            d_dr[2] -= hold.amount_micros
            d_cr[3] -= hold.amount_micros
            posted = amount if t.kind == "post" else 0
        if t.kind == "hold":
            dr.debits_pending += amount
            cr.credits_pending += amount
            d_dr[2] += amount
            d_cr[3] += amount
        else:
            dr.debits_posted += posted
            cr.credits_posted += posted
            d_dr[0] += posted
            d_cr[1] += posted
        if dr.available_micros < 0 and dr.kind == "client":  # guarantee 4, checked again
            raise InvariantViolation(f"{t.id}: {dr.id} would fall below its credit limit")
        self.s.transfers[t.id] = t
        if t.job_id is not None:
            self.by_job.setdefault(t.job_id, []).append(t)
        self.out.transfers.append(t)

    def transfer(self, tid: str, dr: str, cr: str, amount: int, kind: TransferKind, fp: str, *,
                 job_id: str | None = None, pending_id: str | None = None,
                 memo: str | None = None) -> None:
        self.emit(TransferRow(tid, dr, cr, amount, self.s.book.currency, str(kind), job_id,
                              pending_id, fp, memo, self.s.now_s))

    @staticmethod
    def replay(existing: TransferRow, fp: str) -> None:
        """Same id: the same request is a harmless retry; different content is refused."""
        if existing.fingerprint != fp:
            raise Conflict(
                f"transfer id {existing.id} was already used for a different request",
                code="idempotency_conflict",
            )

    # -- operations --

    def hold(self, op: HoldOp) -> int:
        check_id(op.job_id, "job id")
        check_id(op.client_id, "client id")
        internal = op.workload is not Workload.INFERENCE
        fp = fingerprint("hold", op.client_id, op.model, op.prompt_tokens, op.max_tokens,
                         *((str(op.workload),) if internal else ()))
        if (done := self.job_transfer(op.job_id, "hold")) is not None:
            self.replay(done, fp)
            for end in ("post", "void"):
                if self.job_transfer(op.job_id, end) is not None:  # not an open hold any more
                    raise Conflict(f"job {op.job_id} was already {end}ed; admit it under a new id",
                                   code="hold_closed")
            return done.amount_micros
        if not 0 < len(op.model) <= 200:
            raise InvalidRequest("a model name is 1-200 characters")
        price = self.s.prices.get(op.model) or self.s.book.price_of(op.model)
        amount = hold_micros(price, op.prompt_tokens, op.max_tokens)
        client = self.account(client_account(op.client_id))
        if internal:  # the platform's own usage: not a sale to itself, no balance to check
            self.transfer(f"job:{op.job_id}:hold", internal_use_account(op.workload), INTERNAL,
                          amount, TransferKind.HOLD, fp, job_id=op.job_id)
        elif client.available_micros < amount:
            cur = self.s.book.currency
            raise InsufficientBalance(
                f"this request may cost up to {format_money(amount, cur)} and the balance "
                f"available is {format_money(client.available_micros, cur)}; add funds or "
                "lower max_tokens"
            )
        else:
            self.transfer(f"job:{op.job_id}:hold", client.id, REVENUE, amount,
                          TransferKind.HOLD, fp, job_id=op.job_id)
        terms = HoldTerms(op.job_id, op.client_id, op.model, self.s.book.currency,
                          op.prompt_tokens, op.max_tokens, price, self.s.book.terms, amount,
                          self.s.now_s)
        self.s.holds[op.job_id] = terms
        self.out.holds.append(terms)
        return amount

    def settle(self, op: SettleOp) -> Settlement:
        shares = sorted(
            (s.owner_id, s.node_id, s.device_class, s.prompt_tokens, s.completion_tokens,
             s.busy_s, s.work_ppm) for s in op.shares
        )
        fp = fingerprint("settle", op.client_id, op.model, op.prompt_tokens,
                         op.completion_tokens, shares)
        if (done := self.job_transfer(op.job_id, "post")) is not None:
            self.replay(done, fp)
            return self.settlement_of(op.job_id, replayed=True)
        hold, terms = self.job_transfer(op.job_id, "hold"), self.s.holds.get(op.job_id)
        if hold is None or terms is None:
            raise Conflict(f"job {op.job_id} has no hold to settle", code="no_hold")
        if self.job_transfer(op.job_id, "void") is not None:
            raise Conflict(f"job {op.job_id} was voided; a late completion is not charged",
                           code="hold_voided")
        if (op.client_id, op.model) != (terms.client_id, terms.model):
            raise Conflict(f"job {op.job_id} was held for {terms.client_id}/{terms.model}")
        for s in op.shares:
            check_id(s.owner_id, "owner id")
            check_id(s.node_id, "node id")
        if len({s.node_id for s in op.shares}) != len({(s.node_id, s.owner_id)
                                                        for s in op.shares}):
            raise InvalidRequest("a node belongs to one owner")
        charge = charge_micros(terms.price, op.prompt_tokens, op.completion_tokens,
                               hold.amount_micros)
        split = split_charge(charge, terms.price, terms.terms, op.shares)
        payer, clearing = hold.debit_account_id, hold.credit_account_id
        if clearing == INTERNAL:
            # The platform's own usage: the owners are paid their share of what it would have
            # cost a client (their work is real), from the opex account the hold named; nothing
            # is charged to a client, no fee is taken, and the revenue account is not touched.
            charge = sum(e.amount_micros for e in split.earnings)
            split = replace(split, charge_micros=charge, fee_micros=0)
        self.transfer(f"job:{op.job_id}:post", payer, clearing, charge, TransferKind.POST, fp,
                      job_id=op.job_id, pending_id=hold.id)
        for e in split.earnings:
            if e.amount_micros:
                self.transfer(f"job:{op.job_id}:earning:{e.node_id}", clearing,
                              owner_account(e.owner_id), e.amount_micros, TransferKind.EARNING, fp,
                              job_id=op.job_id)
        if split.fee_micros:
            self.transfer(f"job:{op.job_id}:fee", REVENUE, FEES, split.fee_micros,
                          TransferKind.FEE, fp, job_id=op.job_id)
        result = self.settlement_of(op.job_id, replayed=False)
        if result.charge_micros != charge or result.fee_micros != split.fee_micros:
            raise InvariantViolation(f"job {op.job_id}: settlement does not read back")
        return result

    def settlement_of(self, job_id: str, *, replayed: bool) -> Settlement:
        post, hold = self.job_transfer(job_id, "post"), self.job_transfer(job_id, "hold")
        if post is None or hold is None:
            raise InvariantViolation(f"job {job_id} is not settled")
        fee = self.job_transfer(job_id, "fee")
        prefix = f"job:{job_id}:earning:"
        earnings = tuple(
            Earning(holder_of(t.credit_account_id) or "", t.id.removeprefix(prefix),
                    t.amount_micros)
            for t in self.of_job(job_id, TransferKind.EARNING)
        )
        fee_micros = fee.amount_micros if fee else 0
        if sum(e.amount_micros for e in earnings) + fee_micros != post.amount_micros:
            raise InvariantViolation(f"job {job_id}: earnings and fee must add up to the charge")
        return Settlement(job_id, post.amount_micros, hold.amount_micros - post.amount_micros,
                          fee_micros, earnings, replayed)

    def void(self, op: VoidOp) -> VoidOutcome:
        if self.job_transfer(op.job_id, "void") is not None:
            return VoidOutcome.ALREADY_VOIDED
        hold = self.job_transfer(op.job_id, "hold")
        if hold is None:
            return VoidOutcome.NO_HOLD
        if self.job_transfer(op.job_id, "post") is not None:
            return VoidOutcome.SETTLED
        self.transfer(f"job:{op.job_id}:void", hold.debit_account_id, hold.credit_account_id,
                      hold.amount_micros, TransferKind.VOID, fingerprint("void", op.job_id),
                      job_id=op.job_id, pending_id=hold.id)
        return VoidOutcome.VOIDED

    def deposit(self, op: DepositOp) -> str:
        check_id(op.client_id, "client id")
        check_id(op.reference, "deposit reference")
        if not 0 < op.amount_micros <= amount_micros_max:
            raise InvalidRequest(f"a deposit must be positive, got {op.amount_micros}")
        tid, fp = f"deposit:{op.reference}", fingerprint("deposit", op.client_id,
                                                          op.amount_micros)
        if (done := self.s.transfers.get(tid)) is not None:
            self.replay(done, fp)
            return tid
        self.transfer(tid, DEPOSITS, client_account(op.client_id), op.amount_micros,
                      TransferKind.DEPOSIT, fp)
        return tid

    def withhold(self, op: WithholdOp) -> int:
        """Move a settled job's earnings (of one node, or all) back to its client as a refund."""
        terms = self.s.holds.get(op.job_id)
        if terms is None or self.job_transfer(op.job_id, "post") is None:
            raise Conflict(f"job {op.job_id} is not settled; there is nothing to withhold")
        earnings = [
            t for t in self.of_job(op.job_id, TransferKind.EARNING)
            if op.node_id is None or t.id.endswith(f":earning:{op.node_id}")
        ]
        total = 0
        for e in earnings:
            node = e.id.rpartition(":")[2]
            tid = f"job:{op.job_id}:withhold:{node}"
            fp = fingerprint("withhold", e.id, e.amount_micros)
            if (done := self.s.transfers.get(tid)) is not None:
                self.replay(done, fp)
            else:
                post = self.job_transfer(op.job_id, "post")
                payer = post.debit_account_id if post else client_account(terms.client_id)
                self.transfer(tid, e.credit_account_id, payer,
                              e.amount_micros, TransferKind.WITHHOLD, fp, job_id=op.job_id,
                              memo=op.reason[:500])
            total += e.amount_micros
        return total

    def cost(self, op: CostOp) -> str:
        check_id(op.cost_id, "cost id")
        if not re.fullmatch(r"[a-z0-9_-]{1,40}", op.category):
            raise InvalidRequest(f"a cost category is 1-40 of a-z0-9_-, got {op.category!r}")
        if not 0 < op.amount_micros <= amount_micros_max:
            raise InvalidRequest(f"a cost must be positive, got {op.amount_micros}")
        tid = f"cost:{op.cost_id}"
        fp = fingerprint("cost", _cost_account(op), op.amount_micros)
        if (done := self.s.transfers.get(tid)) is not None:
            self.replay(done, fp)
            return tid
        self.transfer(tid, _cost_account(op), VENDORS, op.amount_micros, TransferKind.COST, fp,
                      memo=op.memo)
        return tid


    def payout(self, op: PayoutOp) -> int:
        base = f"payout:{op.batch_id}:{op.owner_id}"
        earned, payable, paid = (owner_account(op.owner_id, p)
                                 for p in ("earned", "payable", "paid"))
        fp = fingerprint("payout", op.batch_id, op.owner_id, op.amount_micros)
        if not 0 < op.amount_micros <= amount_micros_max:
            raise InvalidRequest(f"a payout must be positive, got {op.amount_micros}")
        step = {PayoutStep.QUEUE: ("payable", earned, payable),
                PayoutStep.PAY: ("paid", payable, paid),
                PayoutStep.REVERSE: ("reversal", "", earned)}.get(op.step)
        invariant(step is not None, f"no payout step {op.step!r}")
        assert step is not None
        suffix, src, dst = step
        if (done := self.s.transfers.get(f"{base}:{suffix}")) is not None:
            self.replay(done, fp)
            return done.amount_micros
        has_payable = f"{base}:payable" in self.s.transfers
        has_paid = f"{base}:paid" in self.s.transfers
        if op.step == PayoutStep.QUEUE and self.account(earned).balance_micros < op.amount_micros:
            raise Conflict(f"owner {op.owner_id} has not earned {format_money(op.amount_micros)}")
        reversed_ = f"{base}:reversal" in self.s.transfers
        if op.step == PayoutStep.PAY and (not has_payable or reversed_):
            raise Conflict(f"{base} was never queued, or was reversed")
        if op.step == PayoutStep.REVERSE:
            if not has_payable:
                raise Conflict(f"{base} was never paid; there is nothing to reverse")
            src = paid if has_paid else payable
        kind = (TransferKind.PAYOUT_REVERSAL if op.step == PayoutStep.REVERSE
                else TransferKind.PAYOUT)
        self.transfer(f"{base}:{suffix}", src, dst, op.amount_micros, kind, fp, memo=op.memo)
        return op.amount_micros


    def write_off(self, op: WriteOffOp) -> int:
        earned = self.account(owner_account(op.owner_id))
        tid = write_off_id(op)
        fp = fingerprint("write_off", op.owner_id, op.amount_micros)
        if (done := self.s.transfers.get(tid)) is not None:
            self.replay(done, fp)
            return done.amount_micros
        if not 0 < op.amount_micros <= -earned.balance_micros:
            raise Conflict(f"owner {op.owner_id} owes less than {format_money(op.amount_micros)}")
        self.transfer(tid, WRITE_OFFS, earned.id, op.amount_micros, TransferKind.WRITE_OFF, fp,
                      memo="receivable written off: no earning netted it in time")
        return op.amount_micros


def apply(snapshot: Snapshot, ops: Sequence[Op]) -> Outcome:
    """Apply ``ops`` in order; each sees the effects of those before it. An op that fails with an
    expected error changes nothing (it checks before it emits) and the others go on."""
    m = _Machine(snapshot)
    handlers = {HoldOp: m.hold, SettleOp: m.settle, VoidOp: m.void, DepositOp: m.deposit,
                WithholdOp: m.withhold, CostOp: m.cost, PayoutOp: m.payout,
                WriteOffOp: m.write_off}
    for op in ops:
        mark = len(m.out.transfers)
        try:
            m.out.results.append(handlers[type(op)](op))  # type: ignore[operator]
        except SpareCyclesError as exc:
            if len(m.out.transfers) != mark:
                raise InvariantViolation(
                    f"{type(op).__name__} failed after emitting transfers") from exc
            m.out.results.append(exc)
    return m.out
