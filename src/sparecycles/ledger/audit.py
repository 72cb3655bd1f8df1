"""The auditor: recompute the books from the transfers alone and report every broken invariant.

It shares no logic with the engine that wrote the books: it does not call ``apply``, it reads
the transfer rows and the jobs table, sums them in SQL, and compares. Each check is one of the
ledger's guarantees (``ledger/service.py``) seen from outside:

- debits equal credits in each currency, in the stored totals and in the transfers;
- every account's stored totals equal the sums of its transfers (nothing was lost or edited);
- every transfer stays in one currency, and a post or void resolves a hold and never exceeds it;
- no client is below its credit limit;
- every settled job has one charge, and its earnings plus fee equal that charge;
- every completed job has exactly one charge, and no hold is left open past its job (or past the
  longest a job may run);
- the platform's revenue account, a clearing account, holds nothing once jobs are settled;
- payouts equal the owners' paid accounts (and the lines in flight equal the payable accounts),
  and each batch's total equals its lines.
"""

from __future__ import annotations

from sparecycles import limits
from sparecycles.ledger.engine import REVENUE, AccountState, account_kind, holder_of
from sparecycles.ledger.pricing import format_money
from sparecycles.store.ledger_queries import LedgerStore, LedgerTx

problems_max = 1000  # the report stops here; the first problems are the ones to read


def audit(store: LedgerStore, currency: str, now_s: float, grace_s: float = 300.0) -> list[str]:
    """Every violation as one line; an empty list means every invariant holds.

    Jobs that ended less than ``grace_s`` ago are not judged yet: the coordinator settles a job
    just after it ends, in a separate transaction.
    """

    def work(tx: LedgerTx) -> list[str]:
        out: list[str] = []
        accounts = tx.all_accounts()
        _totals(tx, accounts, out)
        _jobs(tx, out, now_s - grace_s)
        _payouts(tx, accounts, out, currency)
        return out[:problems_max]

    return store.read(work)


def _totals(tx: LedgerTx, accounts: dict[str, AccountState], out: list[str]) -> None:
    recomputed = tx.recomputed_totals()
    stored_sum: dict[str, list[int]] = {}
    computed_sum: dict[str, list[int]] = {}
    for acc_id in sorted(recomputed.keys() - accounts.keys()):
        out.append(f"transfers name account {acc_id}, which does not exist")
    for acc in accounts.values():
        stored = [acc.debits_posted, acc.credits_posted, acc.debits_pending, acc.credits_pending]
        again = recomputed.get(acc.id, [0, 0, 0, 0])
        for sums, values in ((stored_sum, stored), (computed_sum, again)):
            s = sums.setdefault(acc.currency, [0, 0, 0, 0])
            for i in range(4):
                s[i] += values[i]
        if stored != again:
            out.append(f"account {acc.id}: stored totals {stored} differ from its transfers "
                       f"{again} (debits/credits posted, debits/credits pending)")
        if account_kind(acc.id) == "client":
            available = again[1] - again[0] - again[2] + acc.credit_limit_micros
            if available < 0:
                out.append(f"client {holder_of(acc.id)} is {format_money(-available)} "
                           f"{acc.currency} below its credit limit")
        if acc.id == REVENUE and again[1] != again[0]:
            out.append(f"{REVENUE} holds {format_money(again[1] - again[0])}: a charge was not "
                       "split into earnings and fee")
    for name, sums in (("stored totals", stored_sum), ("transfers", computed_sum)):
        for cur, (dp, cp, dq, cq) in sorted(sums.items()):
            if dp != cp:
                out.append(f"{cur}: posted debits {dp} != posted credits {cp} ({name})")
            if dq != cq:
                out.append(f"{cur}: pending debits {dq} != pending credits {cq} ({name})")
    out.extend(tx.malformed_transfers())


def _jobs(tx: LedgerTx, out: list[str], cutoff_s: float) -> None:
    for job, posts, charge, split in tx.job_money_sums():
        if posts != 1:
            out.append(f"job {job} has {posts} charges")
        elif split != charge:
            out.append(f"job {job}: earnings and fee {split} != charge {charge}")
    flagged: set[str] = set()
    for job, state, posts, open_holds in tx.finished_jobs_charges(cutoff_s):
        if state == "done" and posts != 1:
            out.append(f"job {job} is done and has {posts} charges (expected exactly 1)")
        if state == "failed" and posts > 1:
            out.append(f"job {job} failed and has {posts} charges")
        if open_holds:
            flagged.add(f"job:{job}:hold")
            out.append(f"job {job} is {state} and its hold is still open")
    for hold_id in tx.old_open_holds(cutoff_s - limits.job_total_s_max):
        if hold_id not in flagged:
            out.append(f"hold {hold_id} is open longer than any job may run")


def _payouts(tx: LedgerTx, accounts: dict[str, AccountState], out: list[str],
             currency: str) -> None:
    sums = tx.payout_sums()
    owners = {holder_of(a) for a in accounts if account_kind(a).startswith("owner")}
    owners |= {o for o, _ in sums}
    for owner in sorted(o for o in owners if o):
        for part, state in (("paid", "paid"), ("payable", "open")):
            acc = accounts.get(f"owner:{owner}:{part}")
            balance = acc.balance_micros if acc else 0
            lines = sums.get((owner, state), 0)
            if balance != lines:
                out.append(f"owner {owner}: {part} account {format_money(balance)} {currency} "
                           f"!= payout lines {state} {format_money(lines)} {currency}")
    for batch, total, lines in tx.batch_totals():
        if total != lines:
            out.append(f"payout batch {batch}: total {total} != sum of its lines {lines}")
