"""Payouts: pay every owner above a minimum, write the batch file, post the matching transfers.

A run has three steps, so that a crash at any point leaves the books right and the run resumable:

1. One transaction opens the batch and claims it for this run (state ``writing``, a random run
   token, the time): every owner whose earned balance is at least the minimum is locked, gets a
   line of that balance rounded down to whole minor units of the currency (cents for USD; the
   rest stays earned for the next run), and a transfer ``earned -> payable``
   (``payout:<batch>:<owner>:payable``).
2. The run that holds the claim writes the batch's file, ``payouts-<batch>.csv`` in the output
   folder (one name per batch; to a temporary name, then renamed).
3. One transaction checks the claim is still this run's, moves ``payable -> paid`` for every
   line and marks the batch paid, with the file's SHA-256.

Guarantees: a batch id is used once, and a paid batch is refused (``Conflict``); a batch is
written by one run at a time: a concurrent run finds it claimed and stops with ``Conflict``
(one conditional UPDATE, atomic on SQLite and PostgreSQL), so four runs at once write one file
for one batch; a claim older than ``limits.payout_claim_s_max`` (its run died) is taken over and
the same file is written again. An owner is paid at most once per batch (the transfer ids),
never more than they earned (the earned account is locked while the line is made), in whole
minor units; the minimum cannot be below one minor unit. A payout the bank returns is reversed
by a correcting transfer (``payout:<batch>:<owner>:reversal``, paid -> earned) so the owner is
paid in a later batch; a batch whose every line was returned is ``returned``, not paid. An
owner's receivable (earned below zero after a withhold of money already paid out) that no
earning nets within ``limits.owner_receivable_s_max`` is written off at the next run
(``writeoff:<owner>:<ms>``, ``cost:opex:owner_receivables_written_off -> owner:<id>:earned``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparecycles import limits
from sparecycles.errors import Conflict, InvalidRequest, NotFound, SpareCyclesError, invariant
from sparecycles.ledger import engine as eng
from sparecycles.ledger.engine import PayoutOp, PayoutStep, WriteOffOp
from sparecycles.ledger.pricing import format_money, minor_unit_micros
from sparecycles.ledger.service import memo_chars_max
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


def _apply(ledger: Ledger, tx: LedgerTx, ops: Sequence[PayoutOp | WriteOffOp],
           locked: dict[str, Any]) -> None:
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


def write_off_receivables(ledger: Ledger) -> int:
    """Write off every owner's receivable older than ``limits.owner_receivable_s_max`` (see
    ``WriteOffOp``); returns the total written off. Harmless to repeat, and safe to run at once
    from several places: the owner's account is locked, and the transfer id is derived from the
    receivable."""
    now = ledger.clock()
    ledger.store.ensure_accounts({eng.WRITE_OFFS}, ledger.currency, now)

    def work(tx: LedgerTx) -> int:
        due = [(o, -b, t) for o, b, t in tx.negative_owners(ledger.currency)
               if t < now - limits.owner_receivable_s_max][:owners_per_batch_max]
        if not due:
            return 0
        locked = tx.accounts({eng.owner_account(o) for o, _, _ in due}, lock=True)
        due = [(o, -locked[eng.owner_account(o)].balance_micros, t) for o, _, t in due
               if locked[eng.owner_account(o)].balance_micros < 0]  # as of the lock
        _apply(ledger, tx, [WriteOffOp(o, v, t) for o, v, t in due], locked)
        return sum(v for _, v, _ in due)

    return ledger.store.write(work)


def batch_file(out_dir: Path, batch_id: str) -> Path:
    """The file of a batch: one name per batch, whichever run writes it."""
    return out_dir / f"payouts-{batch_id}.csv"


def run_payouts(ledger: Ledger, min_micros: int, out_dir: Path,
                batch_id: str | None = None) -> PayoutReport:
    """Pay every owner whose earned balance is at least ``min_micros``, in whole minor units of
    the currency, into ``batch_file(out_dir, batch)``; see the module doc."""
    cur = ledger.currency
    minor = minor_unit_micros(cur)
    if min_micros < minor:
        raise InvalidRequest(f"the payout minimum is at least one minor unit of {cur} "
                             f"({format_money(minor, cur)}), got {format_money(min_micros)}")
    if batch_id is not None and ("/" in batch_id or not eng.id_pattern.match(batch_id)):
        raise InvalidRequest(f"a batch id is 1-80 letters, digits or ._~@+=- (no /), "
                             f"got {batch_id!r}")
    write_off_receivables(ledger)
    now, token = ledger.clock(), secrets.token_hex(16)

    def claim(tx: LedgerTx, bid: str) -> bool:
        return tx.claim_batch(bid, token, now, limits.payout_claim_s_max)

    def open_batch(tx: LedgerTx) -> tuple[str | None, bool]:
        if batch_id is not None and (row := tx.batch(batch_id)) is not None:
            if row.state in ("paid", "returned"):
                raise Conflict(f"payout batch {batch_id} was already paid")
            if not claim(tx, batch_id):
                raise Conflict(f"payout batch {batch_id} is being written by another run")
            return batch_id, True
        if batch_id is None and (left := tx.open_batches(cur)):
            if claim(tx, left[0]):
                return left[0], True  # a run that died after step 1: finish it, pay nothing new
            raise Conflict(f"payout batch {left[0]} is being written by another run; it is "
                           f"taken over after {limits.payout_claim_s_max:.0f} s if that run "
                           "died")
        candidates = tx.payable_owners(cur, min_micros)[:owners_per_batch_max]
        locked = tx.accounts({eng.owner_account(o, p) for o in candidates
                              for p in ("earned", "payable", "paid")}, lock=True)
        # as of the lock, rounded down to whole minor units: the rest stays earned
        lines = [(o, (b := locked[eng.owner_account(o)].balance_micros) - b % minor)
                 for o in candidates]
        lines = [(o, v) for o, v in lines if v >= min_micros and v > 0]
        if not lines:
            return None, False
        bid = batch_id or time.strftime("batch-%Y%m%dT%H%M%SZ-", time.gmtime(now)) + \
            secrets.token_hex(3)
        tx.insert_batch(
            {"id": bid, "currency": cur, "state": "writing", "min_micros": min_micros,
             "total_micros": sum(v for _, v in lines), "owners": len(lines),
             "created_at_s": now, "run_token": token, "claimed_at_s": now},
            [{"batch_id": bid, "owner_id": o, "amount_micros": v, "state": "open"}
             for o, v in lines])
        _apply(ledger, tx, [PayoutOp(bid, o, v, PayoutStep.QUEUE) for o, v in lines], locked)
        return bid, False

    bid, resumed = ledger.store.write(open_batch)
    if bid is None:
        return PayoutReport(None, cur, 0, (), None, None)

    def load(tx: LedgerTx) -> tuple[list[Any], dict[str, str]]:
        rows = tx.batch_items(bid)
        return rows, tx.owner_names(r.owner_id for r in rows)

    rows, names = ledger.store.read(load)
    to_pay = [r for r in rows if r.state == "open"]
    out_path = batch_file(out_dir, bid)
    sha = _write_csv(out_path, bid, cur, [(r.owner_id, names.get(r.owner_id, ""),
                                          r.amount_micros) for r in to_pay])

    def pay(tx: LedgerTx) -> None:
        row = tx.batch(bid)
        invariant(row is not None, f"batch {bid} vanished")
        assert row is not None  # for the type checker; the invariant above survives -O
        if row.state != "writing" or row.run_token != token:
            raise Conflict(f"payout batch {bid} was taken over by another run (this one took "
                           f"longer than {limits.payout_claim_s_max:.0f} s); its file is the "
                           "same")
        ops = [PayoutOp(bid, r.owner_id, r.amount_micros, PayoutStep.PAY) for r in to_pay]
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
    reason = reason[:memo_chars_max]

    def work(tx: LedgerTx) -> int:
        item = next((i for i in tx.batch_items(batch_id) if i.owner_id == owner_id), None)
        if item is None:
            raise NotFound(f"batch {batch_id} has no payout to owner {owner_id}")
        if item.state == "failed":
            return int(item.amount_micros)
        op = PayoutOp(batch_id, owner_id, item.amount_micros, PayoutStep.REVERSE,
                      memo=reason or None)
        locked = tx.accounts(eng.accounts_of(op, {}), lock=True)
        _apply(ledger, tx, [op], locked)
        tx.update_item(batch_id, owner_id, state="failed", failed_reason=reason,
                       failed_at_s=ledger.clock())
        if all(i.state == "failed" or i.owner_id == owner_id for i in tx.batch_items(batch_id)):
            tx.update_batch(batch_id, state="returned")  # nothing of it stands as paid
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
