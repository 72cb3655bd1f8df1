"""Payouts: pay every owner above a minimum, write the batch file, post the matching transfers.

A run has three steps, so that a crash at any point leaves the books right and the run resumable:

1. One transaction opens the batch: every owner whose earned balance is at least the minimum is
   locked, gets a line, and a transfer ``earned -> payable`` (``payout:<batch>:<owner>:payable``).
2. The CSV file for the payment provider is written (to a temporary name, then renamed).
3. One transaction moves ``payable -> paid`` for every line and marks the batch paid, with the
   file's SHA-256.

Guarantees: a batch id is used once, and a paid batch is refused (``Conflict``); an owner is paid
at most once per batch (the transfer ids), never more than they earned (the earned account is
locked while the line is made); a batch left open by a crash is resumed by the next run, not paid
again. A payout the bank returns is reversed by a correcting transfer
(``payout:<batch>:<owner>:reversal``, paid -> earned) so the owner is paid in a later batch.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparecycles.errors import Conflict, InvalidRequest, NotFound, SpareCyclesError, invariant
from sparecycles.ledger import engine as eng
from sparecycles.ledger.engine import PayoutOp
from sparecycles.ledger.pricing import format_money
from sparecycles.store.ledger_queries import LedgerTx

if TYPE_CHECKING:
    from sparecycles.ledger.service import Ledger

owners_per_batch_max = 100_000
CSV_COLUMNS = ("batch_id", "owner_id", "owner_name", "currency", "amount", "amount_micros",
               "transfer_id")


@dataclass(frozen=True, slots=True)
class PayoutLine:
    owner_id: str
    owner_name: str
    amount_micros: int
    state: str


@dataclass(frozen=True, slots=True)
class PayoutReport:
    batch_id: str | None  # None: no owner reached the minimum, nothing was paid
    currency: str
    total_micros: int
    lines: tuple[PayoutLine, ...]
    file_path: str | None
    file_sha256: str | None
    resumed: bool = False


def _apply(ledger: Ledger, tx: LedgerTx, ops: list[PayoutOp], locked: dict[str, Any]) -> None:
    """Apply payout ops through the same state machine as every other transfer."""
    accounts = dict(locked)
    for op in ops:
        for a in eng.accounts_of(op, {}):
            accounts.setdefault(a, eng.AccountState(a, ledger.currency))
    snap = eng.Snapshot(ledger.clock(), ledger.book, accounts,
                        tx.transfers(ids=eng.transfer_ids(ops)), {})
    out = eng.apply(snap, ops)
    for r in out.results:
        if isinstance(r, SpareCyclesError):
            raise r
    tx.write(out)


def run_payouts(ledger: Ledger, min_micros: int, out_path: Path,
                batch_id: str | None = None) -> PayoutReport:
    """Pay every owner whose earned balance is at least ``min_micros``; see the module doc."""
    if min_micros <= 0:
        raise InvalidRequest("the payout minimum must be positive")
    if batch_id is not None and ("/" in batch_id or not eng.id_pattern.match(batch_id)):
        raise InvalidRequest(f"a batch id is 1-80 letters, digits or ._~@+=- (no /), "
                             f"got {batch_id!r}")
    cur, now = ledger.currency, ledger.clock()

    def open_batch(tx: LedgerTx) -> tuple[str | None, bool]:
        if batch_id is not None and (row := tx.batch(batch_id)) is not None:
            if row.state == "paid":
                raise Conflict(f"payout batch {batch_id} was already paid")
            return batch_id, True
        if batch_id is None and (left := tx.open_batches(cur)):
            return left[0], True  # a run that crashed after step 1: finish it, pay nothing new
        candidates = tx.payable_owners(cur, min_micros)[:owners_per_batch_max]
        locked = tx.accounts({eng.owner_account(o, p) for o in candidates
                              for p in ("earned", "payable", "paid")}, lock=True)
        lines = [(o, locked[eng.owner_account(o)].balance_micros) for o in candidates]
        lines = [(o, v) for o, v in lines if v >= min_micros]  # as of the lock
        if not lines:
            return None, False
        bid = batch_id or time.strftime("batch-%Y%m%dT%H%M%SZ-", time.gmtime(now)) + \
            secrets.token_hex(3)
        tx.insert_batch(
            {"id": bid, "currency": cur, "state": "open", "min_micros": min_micros,
             "total_micros": sum(v for _, v in lines), "owners": len(lines),
             "created_at_s": now},
            [{"batch_id": bid, "owner_id": o, "amount_micros": v, "state": "open"}
             for o, v in lines])
        _apply(ledger, tx, [PayoutOp(bid, o, v, "queue") for o, v in lines], locked)
        return bid, False

    bid, resumed = ledger.store.write(open_batch)
    if bid is None:
        return PayoutReport(None, cur, 0, (), None, None)

    def load(tx: LedgerTx) -> tuple[list[Any], dict[str, str]]:
        rows = tx.batch_items(bid)
        return rows, tx.owner_names(r.owner_id for r in rows)

    rows, names = ledger.store.read(load)
    to_pay = [r for r in rows if r.state == "open"]
    sha = _write_csv(out_path, bid, cur, [(r.owner_id, names.get(r.owner_id, ""),
                                          r.amount_micros) for r in to_pay])

    def pay(tx: LedgerTx) -> None:
        row = tx.batch(bid)
        invariant(row is not None, f"batch {bid} vanished")
        assert row is not None
        if row.state == "paid":
            raise Conflict(f"payout batch {bid} was already paid")
        ops = [PayoutOp(bid, r.owner_id, r.amount_micros, "pay") for r in to_pay]
        locked = tx.accounts({a for op in ops for a in eng.accounts_of(op, {})}, lock=True)
        _apply(ledger, tx, ops, locked)
        for r in to_pay:
            tx.update_item(bid, r.owner_id, state="paid")
        tx.update_batch(bid, state="paid", paid_at_s=ledger.clock(), file_path=str(out_path),
                        file_sha256=sha)

    ledger.store.write(pay)
    lines = tuple(PayoutLine(r.owner_id, names.get(r.owner_id, ""), r.amount_micros,
                             "paid" if r.state == "open" else r.state) for r in rows)
    return PayoutReport(bid, cur, sum(r.amount_micros for r in to_pay), lines, str(out_path),
                        sha, resumed)


def fail_payout(ledger: Ledger, batch_id: str, owner_id: str, reason: str) -> int:
    """Reverse one owner's payout (the bank returned it): a correcting transfer back to earned.
    Harmless to repeat. Returns the amount reversed."""

    def work(tx: LedgerTx) -> int:
        item = next((i for i in tx.batch_items(batch_id) if i.owner_id == owner_id), None)
        if item is None:
            raise NotFound(f"batch {batch_id} has no payout to owner {owner_id}")
        if item.state == "failed":
            return int(item.amount_micros)
        op = PayoutOp(batch_id, owner_id, item.amount_micros, "reverse", memo=reason or None)
        locked = tx.accounts(eng.accounts_of(op, {}), lock=True)
        _apply(ledger, tx, [op], locked)
        tx.update_item(batch_id, owner_id, state="failed", failed_reason=reason,
                       failed_at_s=ledger.clock())
        return int(item.amount_micros)

    return ledger.store.write(work)


def _write_csv(path: Path, batch_id: str, currency: str,
               lines: list[tuple[str, str, int]]) -> str:
    """Write the batch file atomically; returns its SHA-256."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for owner_id, name, amount in lines:
        w.writerow((batch_id, owner_id, name, currency, format_money(amount), amount,
                    f"payout:{batch_id}:{owner_id}:paid"))
    data = buf.getvalue().encode()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()
