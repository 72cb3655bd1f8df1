"""The ledger's behaviour, flow by flow, against a real database.

Here each test gets a fresh in-memory SQLite database; tests/integration/test_ledger_postgres.py
runs these same functions again on SQLite files and PostgreSQL (it overrides ``make_books``).
"""

from __future__ import annotations

import contextlib
import csv
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, select, text
from sqlalchemy.exc import IntegrityError

from sparecycles import limits
from sparecycles.errors import (
    Conflict,
    InsufficientBalance,
    InvalidRequest,
    InvariantViolation,
    NotFound,
    SpareCyclesError,
)
from sparecycles.ledger import payouts
from sparecycles.ledger.engine import DepositOp, HoldOp, SettleOp, VoidOp
from sparecycles.ledger.pricing import ModelPrice, PriceBook
from sparecycles.ledger.service import Ledger, VoidOutcome, WorkShare
from sparecycles.store.core_tables import Client, JobRow, Owner
from sparecycles.store.db import Base, make_engine
from sparecycles.store.ledger_tables import LedgerTransfer
from sparecycles.types import JobFinal, JobRecord, JobState

USD = 1_000_000
CENT = 10_000
PRICE = ModelPrice(60_000, 180_000)  # the default price: $0.06 in / $0.18 out per million


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@dataclass
class Books:
    """A ledger on a fresh database, with what tests need to look underneath it."""

    engine: Engine
    clock: FakeClock = field(default_factory=FakeClock)
    prices: PriceBook = field(default_factory=PriceBook.default)
    ledger: Ledger = field(init=False)

    def __post_init__(self) -> None:
        self.ledger = self.restart()

    def restart(self, **kw: Any) -> Ledger:
        """A new Ledger on the same database, as after a coordinator restart."""
        return Ledger(self.engine, prices=self.prices, clock=self.clock, **kw)

    def add_job(self, job_id: str, client_id: str, state: str,
                finished_at_s: float | None = None) -> None:
        with self.engine.begin() as c:
            if c.scalar(select(func.count()).select_from(Client)
                        .where(Client.id == client_id)) == 0:
                c.execute(insert(Client.__table__).values(id=client_id, name=client_id,
                                                          created_at_s=0.0))
            c.execute(insert(JobRow.__table__).values(
                id=job_id, client_id=client_id, model="m", endpoint="chat.completions",
                state=state, prompt_tokens=1, max_tokens=1, created_at_s=self.clock() - 10,
                finished_at_s=finished_at_s))

    def transfers(self) -> int:
        with self.engine.connect() as c:
            return int(c.scalar(select(func.count()).select_from(LedgerTransfer)) or 0)

    def exec(self, sql: str) -> None:
        with self.engine.begin() as c:
            c.execute(text(sql))


def sqlite_books(**kw: Any) -> Books:
    engine = make_engine("sqlite://")
    Base.metadata.create_all(engine)
    return Books(engine, **kw)


@pytest.fixture
def make_books() -> Iterator[Callable[..., Books]]:
    yield sqlite_books


def share(owner: str, node: str, prompt: int, completion: int, busy_s: float = 1.0
          ) -> WorkShare:
    return WorkShare(owner, node, "gaming-pc", prompt, completion, busy_s)


# ---- deposits and holds ----------------------------------------------------------------------


def test_deposit_is_idempotent_by_reference(make_books: Callable[..., Books]) -> None:
    b = make_books()
    L = b.ledger
    L.deposit("alice", 10 * USD, "pay-1")
    L.deposit("alice", 10 * USD, "pay-1")  # a retried webhook
    assert L.client_balance("alice").balance_micros == 10 * USD
    with pytest.raises(Conflict):
        L.deposit("alice", 11 * USD, "pay-1")  # same id, other content
    with pytest.raises(InvalidRequest):
        L.deposit("alice", 0, "pay-2")
    assert L.check() == []


def test_a_total_past_its_limit_is_refused_with_a_clear_error(
        make_books: Callable[..., Books]) -> None:
    """On SQLite a running total that passed 2^63 silently became a float and ``ledger check``
    crashed on it. Totals are bounded (limits.ledger_total_micros_max) on both databases."""
    from sparecycles import limits

    b = make_books()
    L = b.ledger
    L.deposit("alice", 10 * USD, "pay-1")
    near = limits.ledger_total_micros_max - 5 * USD
    b.exec(f"UPDATE ledger_accounts SET credits_posted = {near} WHERE id = 'client:alice'")
    b.exec(f"UPDATE ledger_accounts SET debits_posted = {near} WHERE id = 'world:deposits'")
    with pytest.raises(Conflict) as err:
        L.deposit("alice", 10 * USD, "pay-2")
    assert err.value.code == "ledger_total_max"
    assert L.client_balance("alice").balance_micros == near  # nothing written
    with b.engine.connect() as c:
        kinds = {type(v) for v in c.execute(text(
            "SELECT debits_posted, credits_posted FROM ledger_accounts "
            "WHERE id = 'client:alice'")).one()}
    assert kinds == {int}
    problems = L.check()  # runs (the tampered totals differ from their transfers; no crash)
    assert any("client:alice" in p for p in problems)
    with pytest.raises(IntegrityError):  # the database refuses it whoever writes
        b.exec(f"UPDATE ledger_accounts SET credits_posted = {2**63 - 1} "
               "WHERE id = 'client:alice'")


def test_hold_refused_as_insufficient_quota_before_any_work(
        make_books: Callable[..., Books]) -> None:
    b = make_books()
    L = b.ledger
    L.deposit("alice", 100, "p")
    before = b.transfers()
    with pytest.raises(InsufficientBalance) as err:
        L.hold("j1", "alice", "m", 1000, 1000)  # costs 240 micros at most
    assert err.value.status_code == 429 and err.value.code == "insufficient_quota"
    assert b.transfers() == before  # nothing was written
    assert L.hold("j2", "alice", "m", 500, 0) == 30
    assert L.client_balance("alice").available_micros == 70
    with pytest.raises(InsufficientBalance):  # a client with no account at all
        L.hold("j3", "nobody", "m", 1, 1)
    assert L.check() == []


def test_a_hold_writes_its_job_row_in_the_same_transaction(make_books: Callable[..., Books]
                                                           ) -> None:
    """Admission is one commit: the job's row and its hold together, or the row alone as
    failed when the hold is refused (402 before any work, and no hold without its job)."""
    b = make_books()
    L = b.ledger
    b.add_job("seed", "alice", "done")  # the client's row (jobs reference it)
    L.deposit("alice", 130, "p")
    L.hold("j0", "alice", "m", 500, 0)  # creates the accounts a hold touches (once, apart)
    commits: list[int] = []
    event.listen(b.engine, "commit", lambda _conn: commits.append(1))

    def row(job_id: str) -> JobRecord:
        return JobRecord(id=job_id, client_id="alice", model="m", endpoint="chat.completions",
                         state=JobState.ADMITTED, prompt_tokens=500, max_tokens=0,
                         created_at_s=b.clock())

    assert L.hold("j1", "alice", "m", 500, 0, job=row("j1")) == 30
    assert len(commits) == 1
    with pytest.raises(InsufficientBalance):
        L.hold("j2", "alice", "m", 1000, 1000, job=row("j2"))  # 240 > the 70 left
    with b.engine.connect() as c:
        jobs = {r.id: r for r in c.execute(select(JobRow).where(JobRow.id.in_(["j1", "j2"])))}
    assert jobs["j1"].state == "admitted" and jobs["j1"].error is None
    assert jobs["j2"].state == "failed" and "balance" in (jobs["j2"].error or "").lower()
    assert jobs["j2"].finished_at_s == b.clock()
    assert L.job_money("j1")["state"] == "held" and L.job_money("j2")["state"] == "none"
    assert L.check() == []


def test_settle_and_void_close_their_job_row_in_the_same_transaction(
        make_books: Callable[..., Books]) -> None:
    """A job's final row lands in the commit of its settlement (or void), not in one of its
    own: a job is done exactly when its money is settled."""
    b = make_books()
    L = b.ledger
    b.add_job("seed", "alice", "done")
    L.deposit("alice", 1_000, "p")
    for job_id in ("j0", "j1", "j2"):
        b.add_job(job_id, "alice", "streaming")
        L.hold(job_id, "alice", "m", 500, 100)
    L.settle("j0", "alice", "m", 500, 1, [share("o", "n", 500, 1)])  # creates the accounts
    commits: list[int] = []
    event.listen(b.engine, "commit", lambda _conn: commits.append(1))
    done = JobFinal(state=JobState.DONE, completion_tokens=10, finish_reason="stop",
                    finished_at_s=b.clock(), total_s=1.0)
    L.settle("j1", "alice", "m", 500, 10, [share("o", "n", 500, 10)], job=done)
    L.void("j2", job=JobFinal(state=JobState.FAILED, completion_tokens=0, error="node lost",
                              finished_at_s=b.clock(), total_s=1.0))
    L.void("j1", job=done)  # a no-op on the money; the row is written as given
    assert len(commits) == 3
    with b.engine.connect() as c:
        jobs = {r.id: r for r in c.execute(select(JobRow).where(JobRow.id.in_(["j1", "j2"])))}
    assert (jobs["j1"].state, jobs["j1"].completion_tokens) == ("done", 10)
    assert (jobs["j2"].state, jobs["j2"].error) == ("failed", "node lost")
    assert L.job_money("j1")["state"] == "settled" and L.job_money("j2")["state"] == "voided"
    assert L.check() == []


def test_one_transaction_writes_its_jobs_rows_together(make_books: Callable[..., Books]
                                                      ) -> None:
    """Admissions and settlements batched into one transaction write every job row, whatever
    columns each names (a refused hold's row has more; a settlement with a first token too),
    and a job held and settled in the same transaction is inserted before it is closed."""
    b = make_books()
    L = b.ledger
    b.add_job("seed", "alice", "done")
    L.deposit("alice", 1_000, "p")
    L.hold("j0", "alice", "m", 500, 0)  # the accounts a hold touches, created apart
    L.settle("j0", "alice", "m", 500, 0, [share("o", "n", 500, 0)])

    def row(job_id: str, most: int) -> JobRecord:
        return JobRecord(id=job_id, client_id="alice", model="m", endpoint="chat.completions",
                         state=JobState.ADMITTED, prompt_tokens=100, max_tokens=most,
                         created_at_s=1.0)

    calls = [  # what the group commit batches when these arrive together
        L._hold_op("a", "alice", "m", 100, 10, row("a", 10)),
        L._hold_op("big", "alice", "m", 100_000, 100_000, row("big", 100_000)),
        L._hold_op("b", "alice", "m", 100, 10, row("b", 10)),
        L._settle_op("a", "alice", "m", 100, 4, [share("o", "n", 100, 4)],
                     JobFinal(state=JobState.DONE, completion_tokens=4, finished_at_s=2.0,
                              total_s=1.0, first_token_at_s=1.25, time_to_first_token_s=0.25)),
        (VoidOp("b"), L._job_update("b", JobFinal(state=JobState.FAILED, completion_tokens=0,
                                                  finished_at_s=2.0, total_s=1.0,
                                                  error="node lost"))),
    ]
    commits: list[int] = []
    event.listen(b.engine, "commit", lambda _conn: commits.append(1))
    results = L._apply_batch([op for op, _ in calls], [after for _, after in calls])
    assert len(commits) == 1
    assert isinstance(results[1], InsufficientBalance) and results[4] is VoidOutcome.VOIDED
    with b.engine.connect() as c:
        jobs = {r.id: r for r in c.execute(select(JobRow).where(JobRow.id.in_(["a", "b", "big"])))}
    assert (jobs["a"].state, jobs["a"].completion_tokens) == ("done", 4)
    assert jobs["a"].time_to_first_token_s == 0.25
    assert (jobs["b"].state, jobs["b"].error) == ("failed", "node lost")
    assert jobs["big"].state == "failed" and "balance" in (jobs["big"].error or "").lower()
    assert L.check() == []


def test_an_op_that_breaks_a_shared_transaction_costs_only_itself(
        make_books: Callable[..., Books]) -> None:
    """Three admissions batched together, the second's job row a duplicate of the first's:
    the transaction fails, each op is run again alone, and only the duplicate fails."""
    from sqlalchemy.exc import IntegrityError as SAIntegrityError

    b = make_books()
    L = b.restart(lanes=1)
    b.add_job("seed", "alice", "done")
    L.deposit("alice", 10_000, "p")

    def row(job_id: str) -> JobRecord:
        return JobRecord(id=job_id, client_id="alice", model="m", endpoint="chat.completions",
                         state=JobState.ADMITTED, prompt_tokens=100, max_tokens=10,
                         created_at_s=1.0)

    calls = [L._hold_op("h1", "alice", "m", 100, 10, row("r1")),
             L._hold_op("h2", "alice", "m", 100, 10, row("r1")),  # the same row id again
             L._hold_op("h3", "alice", "m", 100, 10, row("r3"))]
    with pytest.raises(SAIntegrityError):
        L._lanes[0].submit_many([op for op, _ in calls], [after for _, after in calls])
    assert L.job_money("h1")["state"] == "held" and L.job_money("h3")["state"] == "held"
    assert L.job_money("h2")["state"] == "none"  # went back with its own transaction
    assert L.check() == []


def test_credit_limit_lets_a_client_go_negative_down_to_it(make_books: Callable[..., Books]
                                                            ) -> None:
    L = make_books().ledger
    L.set_credit_limit("corp", 1 * USD)
    hold = L.hold("j1", "corp", "m", 1_000_000, 2_000_000)  # 0.06 + 0.36 = 0.42 USD
    assert hold == 420_000
    L.settle("j1", "corp", "m", 1_000_000, 2_000_000, [share("o", "n", 1_000_000, 2_000_000)])
    assert L.client_balance("corp").balance_micros == -420_000
    with pytest.raises(InsufficientBalance):
        L.hold("j2", "corp", "m", 10_000_000, 0)  # 0.60 more would pass -1.00
    with pytest.raises(InvalidRequest):
        L.set_credit_limit("corp", 100_000)  # already owes more than that
    assert L.check() == []


# ---- settlement --------------------------------------------------------------------------------


def test_settle_posts_actual_releases_rest_and_pays_owner_and_fee(
        make_books: Callable[..., Books]) -> None:
    L = make_books().ledger
    L.deposit("alice", 1 * USD, "p")
    assert L.hold("j1", "alice", "m", 1000, 500) == 150
    s = L.settle("j1", "alice", "m", 1000, 200, [share("bob", "pc1", 1000, 200)])
    assert (s.charge_micros, s.released_micros, s.fee_micros) == (96, 54, 20)
    assert [(e.owner_id, e.node_id, e.amount_micros) for e in s.earnings] == [("bob", "pc1", 76)]
    bal = L.client_balance("alice")
    assert (bal.balance_micros, bal.held_micros) == (USD - 96, 0)
    assert L.owner_balance("bob").earned_micros == 76
    assert L.balance("platform:fees").balance_micros == 20
    assert L.balance("platform:revenue").balance_micros == 0  # a clearing account
    money = L.job_money("j1")
    assert money["state"] == "settled" and money["charged_micros"] == 96
    assert money["owner_earned_micros"] == 76 and money["released_micros"] == 54
    assert L.check() == []


def test_a_replayed_settlement_never_charges_twice(make_books: Callable[..., Books]) -> None:
    b = make_books()
    L = b.ledger
    L.deposit("alice", USD, "p")
    L.hold("j1", "alice", "m", 1000, 500)
    shares = [share("bob", "pc1", 1000, 200)]
    first = L.settle("j1", "alice", "m", 1000, 200, shares)
    n = b.transfers()
    again = b.restart().settle("j1", "alice", "m", 1000, 200, shares)  # after a restart, too
    assert again.replayed and again.charge_micros == first.charge_micros
    assert again.earnings == first.earnings and b.transfers() == n
    with pytest.raises(Conflict):
        L.settle("j1", "alice", "m", 1000, 201, shares)  # same job, other content
    assert L.client_balance("alice").balance_micros == USD - 96
    assert L.check() == []


def test_void_releases_and_late_events_are_harmless(make_books: Callable[..., Books]) -> None:
    L = make_books().ledger
    L.deposit("alice", USD, "p")
    L.hold("j1", "alice", "m", 1000, 500)
    assert L.void("j1") is VoidOutcome.VOIDED
    assert L.void("j1") is VoidOutcome.ALREADY_VOIDED
    assert L.client_balance("alice").available_micros == USD
    with pytest.raises(Conflict):  # a completion that arrives after the failure
        L.settle("j1", "alice", "m", 1000, 10, [share("bob", "pc1", 1000, 10)])
    L.hold("j2", "alice", "m", 1000, 500)
    L.settle("j2", "alice", "m", 1000, 10, [share("bob", "pc1", 1000, 10)])
    assert L.void("j2") is VoidOutcome.SETTLED  # a failure after completion: charge stands
    assert L.void("never-held") is VoidOutcome.NO_HOLD
    with pytest.raises(Conflict):  # a retried admission of a job that already ended
        L.hold("j1", "alice", "m", 1000, 500)
    with pytest.raises(Conflict):
        L.settle("never-held", "alice", "m", 1, 1, [])
    assert L.job_money("j1")["state"] == "voided"
    assert L.check() == []


def test_the_worked_example_of_docs_ledger_md(make_books: Callable[..., Books]) -> None:
    L = make_books().ledger
    L.deposit("alice", USD, "pay-1")
    assert L.hold("j1", "alice", "m", 1000, 500) == 150
    s = L.settle("j1", "alice", "m", 1000, 200,
                 [share("bob", "pc1", 1000, 80), share("carol", "laptop2", 1080, 120)])
    assert s.charge_micros == 96 and s.released_micros == 54 and s.fee_micros == 21
    assert {e.owner_id: e.amount_micros for e in s.earnings} == {"bob": 35, "carol": 40}
    assert L.client_balance("alice").balance_micros == 999_904


def test_client_who_disconnects_pays_for_what_was_generated(
        make_books: Callable[..., Books]) -> None:
    L = make_books().ledger
    L.deposit("alice", USD, "p")
    L.hold("j1", "alice", "m", 100, 1000)
    s = L.settle("j1", "alice", "m", 100, 37, [share("bob", "pc1", 100, 37)])
    assert s.charge_micros == -(-(100 * 60_000 + 37 * 180_000) // 1_000_000)
    assert L.client_balance("alice").balance_micros == USD - s.charge_micros


def test_work_split_between_nodes_pays_each_owner_its_share(
        make_books: Callable[..., Books]) -> None:
    L = make_books().ledger
    L.deposit("alice", USD, "p")
    L.hold("j1", "alice", "m", 1000, 1000)
    # pc1 generated 300 tokens and left; laptop2 prefilled prompt + 300 and generated 500 more
    shares = [share("bob", "pc1", 1000, 300), share("carol", "laptop2", 1300, 500)]
    s = L.settle("j1", "alice", "m", 1000, 800, shares)
    pool = s.charge_micros * 800_000 // 1_000_000
    w1, w2 = 1000 * 60_000 + 300 * 180_000, 1300 * 60_000 + 500 * 180_000
    assert [e.amount_micros for e in s.earnings] == [pool * w2 // (w1 + w2),
                                                     pool * w1 // (w1 + w2)]  # sorted by node
    assert L.owner_balance("bob").earned_micros == pool * w1 // (w1 + w2)
    assert L.owner_balance("carol").earned_micros == pool * w2 // (w1 + w2)
    assert sum(e.amount_micros for e in s.earnings) + s.fee_micros == s.charge_micros
    assert L.check() == []


def test_price_is_fixed_when_the_job_is_admitted(make_books: Callable[..., Books]) -> None:
    L = make_books().ledger
    L.deposit("alice", USD, "p")
    L.hold("old", "alice", "m", 1_000_000, 0)  # 0.06 USD at the old price
    L.set_price("m", ModelPrice(120_000, 360_000))
    assert L.hold("new", "alice", "m", 1_000_000, 0) == 120_000
    assert L.settle("old", "alice", "m", 1_000_000, 0, []).charge_micros == 60_000
    assert L.prices().price_of("m") == ModelPrice(120_000, 360_000)
    assert L.check() == []


# ---- corrections -----------------------------------------------------------------------------


def test_the_platform_s_own_usage_is_not_a_sale_to_itself(
        make_books: Callable[..., Books]) -> None:
    """A training job of the platform's lab: held on ``cost:opex:training`` (no balance needed,
    the lab's client account untouched), the owner paid its share as for any job, no fee, and
    nothing in revenue; a withhold returns the earning to the opex account."""
    import datetime as dt

    from sparecycles.costs.usage import Period
    from sparecycles.store.costs_queries import CostQueries
    from sparecycles.types import Workload

    b = make_books()
    L = b.ledger
    b.add_job("lab-1", "lab", "done", finished_at_s=b.clock())
    b.exec("UPDATE jobs SET workload = 'training' WHERE id = 'lab-1'")
    hold = L.hold("lab-1", "lab", "m", 1000, 500, workload=Workload.TRAINING)
    assert hold == 150 and L.client_balance("lab").held_micros == 0
    s = L.settle("lab-1", "lab", "m", 1000, 200, [share("bob", "pc1", 1000, 200)])
    assert [e.amount_micros for e in s.earnings] == [76]  # floor(96 * 0.8), as for a client
    assert s.fee_micros == 0 and s.charge_micros == 76 and s.released_micros == 150 - 76
    assert L.client_balance("lab").balance_micros == 0
    assert L.balance("cost:opex:training").balance_micros == -76  # debit-normal: a cost of 76
    assert L.balance("platform:revenue").balance_micros == 0
    assert L.balance("platform:fees").balance_micros == 0
    assert L.owner_balance("bob").earned_micros == 76
    assert L.check() == []
    month = Period.month(dt.datetime.fromtimestamp(b.clock(), dt.UTC).strftime("%Y-%m"))
    q = CostQueries(b.engine)
    (job,) = q.period_usage(month, "USD").jobs
    assert job.charge_micros == 0 and not job.posted  # not revenue
    assert [e.amount_micros for e in job.earnings] == [76]  # the owner payout, on its attempt
    totals = q.ledger_totals(month, "USD")
    assert (totals.posts, totals.charged_micros, totals.internal_use_micros) == (0, 0, 76)
    assert totals.charged_micros + totals.internal_use_micros == (totals.earnings_micros
                                                                  + totals.fees_micros)
    assert q.charge_facts(month, "USD") == []  # no charge to recompute
    assert L.withhold("lab-1", "spot check") == 76
    assert L.balance("cost:opex:training").balance_micros == 0
    assert L.client_balance("lab").balance_micros == 0 and L.check() == []
    L.hold("lab-2", "lab", "m", 10, 10, workload=Workload.TRAINING)
    with pytest.raises(Conflict):  # a retry that changes the workload is another request
        L.hold("lab-2", "lab", "m", 10, 10)


def test_withhold_refunds_the_client_from_the_cheating_node(
        make_books: Callable[..., Books]) -> None:
    L = make_books().ledger
    L.deposit("alice", USD, "p")
    L.hold("j1", "alice", "m", 1000, 1000)
    s = L.settle("j1", "alice", "m", 1000, 800,
                 [share("bob", "pc1", 1000, 300), share("carol", "laptop2", 1300, 500)])
    carol = next(e.amount_micros for e in s.earnings if e.owner_id == "carol")
    assert L.withhold("j1", "wrong logits", node_id="laptop2") == carol
    assert L.withhold("j1", "wrong logits", node_id="laptop2") == carol  # harmless repeat
    assert L.owner_balance("carol").earned_micros == 0
    assert L.client_balance("alice").balance_micros == USD - s.charge_micros + carol
    assert L.balance("platform:fees").balance_micros == s.fee_micros  # the fee stays
    assert L.job_money("j1")["withheld_micros"] == carol
    with pytest.raises(Conflict):
        L.withhold("not-settled", "x")
    assert L.check() == []


def test_withhold_after_payout_leaves_a_debt_netted_later(
        make_books: Callable[..., Books], tmp_path: Path) -> None:
    L = make_books().ledger
    L.deposit("alice", 100 * USD, "p")
    L.hold("j1", "alice", "m", 10_000_000, 10_000_000)
    L.settle("j1", "alice", "m", 10_000_000, 10_000_000, [share("bob", "pc1", 10**7, 10**7)])
    earned = L.owner_balance("bob").earned_micros
    assert payouts.run_payouts(L, CENT, tmp_path).total_micros == earned
    L.withhold("j1", "cheat found late")
    assert L.owner_balance("bob").earned_micros == -earned
    assert payouts.run_payouts(L, CENT, tmp_path).batch_id is None  # nothing until repaid
    assert L.check() == []


def test_a_receivable_no_earning_nets_is_written_off_into_the_cost_report(
        make_books: Callable[..., Books], tmp_path: Path) -> None:
    """An owner paid, then caught cheating, who never earns again: the negative earned balance
    (a receivable) is written off at the first payout run after limits.owner_receivable_s_max,
    to an opex account the cost report reads."""
    import datetime as dt

    from sparecycles.costs.usage import Period
    from sparecycles.store.costs_queries import CostQueries

    b = make_books()
    L = b.ledger
    L.deposit("alice", 100 * USD, "p")
    L.hold("j1", "alice", "m", 10_000_000, 10_000_000)
    L.settle("j1", "alice", "m", 10_000_000, 10_000_000, [share("bob", "pc1", 10**7, 10**7)])
    paid = payouts.run_payouts(L, CENT, tmp_path).total_micros
    L.withhold("j1", "cheat found late")
    owed = -L.owner_balance("bob").earned_micros
    assert owed > 0
    b.clock.advance(limits.owner_receivable_s_max - 10)
    payouts.run_payouts(L, CENT, tmp_path)
    assert L.owner_balance("bob").earned_micros == -owed  # not yet: an earning may net it
    b.clock.advance(20)
    assert payouts.write_off_receivables(L) == owed
    assert payouts.write_off_receivables(L) == 0  # once
    assert L.owner_balance("bob").earned_micros == 0
    assert L.owner_balance("bob").paid_micros == paid
    assert L.balance("cost:opex:owner_receivables_written_off").balance_micros == -owed
    assert L.check() == []
    month = Period.month(dt.datetime.fromtimestamp(b.clock(), dt.UTC).strftime("%Y-%m"))
    q = CostQueries(b.engine)
    assert q.write_offs_micros(month, "USD") == owed
    booked = [(c.category, c.cogs, c.amount_micros)
              for c in q.period_usage(month, "USD").ledger_costs]
    assert booked == [("owner_receivables_written_off", False, owed)]
    totals = q.ledger_totals(month, "USD")
    assert (totals.cogs_costs_micros, totals.opex_costs_micros) == (0, owed)


def test_payout_lines_are_whole_cents_and_the_rest_stays_earned(
        make_books: Callable[..., Books], tmp_path: Path) -> None:
    b = make_books()
    L = b.ledger
    L.deposit("alice", 1000 * USD, "p")
    bob = _earn(L, "j1", "bob", 50_000_123)
    assert bob % CENT != 0
    with pytest.raises(InvalidRequest, match="minor unit"):
        payouts.run_payouts(L, CENT - 1, tmp_path)
    report = payouts.run_payouts(L, CENT, tmp_path)
    assert report.total_micros == bob - bob % CENT
    assert L.owner_balance("bob").earned_micros == bob % CENT  # for the next run
    with open(report.file_path) as f:
        (row,) = csv.DictReader(f)
    assert int(row["amount_micros"]) % CENT == 0 and row["amount"].count(".") == 1
    assert len(row["amount"].split(".")[1]) == 2  # a bank's amount: dollars and cents
    assert L.check() == []


def test_a_batch_whose_every_line_failed_is_not_stored_as_paid(
        make_books: Callable[..., Books], tmp_path: Path) -> None:
    b = make_books()
    L = b.ledger
    L.deposit("alice", 1000 * USD, "p")
    _earn(L, "j1", "bob", 50_000_000)
    _earn(L, "j2", "carol", 50_000_000)
    payouts.run_payouts(L, USD, tmp_path, batch_id="b1")
    state = "SELECT state FROM payout_batches WHERE id = 'b1'"
    payouts.fail_payout(L, "b1", "bob", "account closed")
    with b.engine.connect() as c:
        assert c.scalar(text(state)) == "paid"  # carol's line stands
    payouts.fail_payout(L, "b1", "carol", "account closed")
    with b.engine.connect() as c:
        assert c.scalar(text(state)) == "returned"
    assert L.check() == []


def test_concurrent_payout_runs_write_one_file_for_one_batch(
        make_books: Callable[..., Books], tmp_path: Path) -> None:
    """Four ``payouts run`` at once (four Ledgers, as four processes) on one database: one
    batch, one file, every owner paid once. (Before the claim, every run resumed the open batch
    and wrote it to its own file: submitting them would have paid every owner four times.)"""
    import threading

    b = make_books()
    L = b.ledger
    L.deposit("alice", 1000 * USD, "p")
    owners = {o: _earn(L, f"j-{o}", o, 50_000_000) for o in ("bob", "carol", "dave")}
    runners = [b.restart() for _ in range(4)]
    start = threading.Barrier(len(runners))
    results: list[Any] = []

    def run(ledger: Ledger, i: int) -> None:
        start.wait()
        try:
            results.append(payouts.run_payouts(ledger, USD, tmp_path / f"run{i}"))
        except Conflict as exc:
            results.append(exc)

    threads = [threading.Thread(target=run, args=(r, i)) for i, r in enumerate(runners)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    paid = [r for r in results if not isinstance(r, Conflict) and r.batch_id is not None]
    assert len(files) == 1 and len(paid) == 1, (files, results)
    assert files[0].name == f"payouts-{paid[0].batch_id}.csv"
    for o, v in owners.items():
        assert L.owner_balance(o).paid_micros == v
    assert L.check() == []


def test_record_cost_books_platform_costs(make_books: Callable[..., Books]) -> None:
    L = make_books().ledger
    L.record_cost("hosting-2025-01", "hosting", 120 * USD, memo="coordinator VMs")
    L.record_cost("hosting-2025-01", "hosting", 120 * USD)
    assert L.balance("cost:cogs:hosting").balance_micros == -120 * USD  # a debit account
    with pytest.raises(InvalidRequest):
        L.record_cost("x", "Not A Category", 1)
    assert L.check() == []


# ---- batches and restarts ------------------------------------------------------------------


def test_a_batch_gives_each_op_its_own_result(make_books: Callable[..., Books]) -> None:
    L = make_books().ledger
    results = L.submit([
        DepositOp("alice", 1000, "p1"),
        HoldOp("j1", "alice", "m", 1000, 1000),  # 240
        HoldOp("j2", "alice", "m", 100_000, 100_000),  # 24_000: refused
        HoldOp("j3", "alice", "m", 1000, 1000),
        SettleOp("j1", "alice", "m", 1000, 10, (share("bob", "pc1", 1000, 10),)),
        SettleOp("j1", "alice", "m", 1000, 10, (share("bob", "pc1", 1000, 10),)),
        VoidOp("j3"),
        DepositOp("alice", 2000, "p1"),  # conflicting retry
        DepositOp("bad id!", 5, "p2"),  # refused alone, and creates no account
    ])
    assert isinstance(results[8], InvalidRequest)
    assert L.balance("client:bad id!").balance_micros == 0
    assert results[0] == "deposit:p1" and results[1] == 240 and results[3] == 240
    assert isinstance(results[2], InsufficientBalance)
    assert results[4].charge_micros == 62 and results[5].replayed
    assert results[6] is VoidOutcome.VOIDED and isinstance(results[7], Conflict)
    assert L.client_balance("alice").balance_micros == 1000 - 62
    assert L.check() == []


def test_concurrent_submits_share_transactions_and_keep_their_order(
        make_books: Callable[..., Books]) -> None:
    import threading

    b = make_books()
    L = b.restart(lanes=2)
    commits: list[int] = []
    event.listen(b.engine, "commit", lambda _conn: commits.append(1))
    for c in range(6):
        L.deposit(f"c{c}", USD, f"p{c}")
    commits.clear()
    results: dict[int, list[Any]] = {}

    def work(c: int) -> None:  # each list holds a job's hold before its settlement
        ops: list[Any] = []
        for i in range(40):
            ops += [HoldOp(f"j{c}-{i}", f"c{c}", "m", 100, 100),
                    SettleOp(f"j{c}-{i}", f"c{c}", "m", 100, 50, (share("bob", "pc1", 100, 50),))]
        results[c] = L.submit(ops)

    threads = [threading.Thread(target=work, args=(c,)) for c in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # at most one transaction per submit (80 ops fit one; several may share one), and the
    # creation of bob's accounts (by either lane)
    assert len(commits) <= 6 + 2
    charge = -(-(100 * 60_000 + 50 * 180_000) // 1_000_000)
    for c in range(6):
        assert results[c][0::2] == [-(-(100 * 60_000 + 100 * 180_000) // 1_000_000)] * 40
        assert [r.charge_micros for r in results[c][1::2]] == [charge] * 40
        assert L.client_balance(f"c{c}").balance_micros == USD - 40 * charge
    assert L.check() == []


def test_coroutines_queue_on_the_group_commit_with_threads(
        make_books: Callable[..., Books]) -> None:
    """hold_async/settle_async/void_async from many coroutines at once, while threads call the
    blocking API on the same lane: every op gets its own result (a refused hold raises in its
    own coroutine only), the coroutines' ops share transactions, and the books balance."""
    import asyncio
    import threading

    b = make_books()
    L = b.restart(lanes=1)
    for c in range(4):
        L.deposit(f"c{c}", USD, f"p{c}")
    L.deposit("poor", 10, "p-poor")
    commits: list[int] = []
    event.listen(b.engine, "commit", lambda _conn: commits.append(1))

    async def one(c: int, i: int) -> int:
        job = f"a{c}-{i}"
        held = await L.hold_async(job, f"c{c}", "m", 100, 100)
        if i % 5 == 4:
            assert await L.void_async(job) is VoidOutcome.VOIDED
            return 0
        s = await L.settle_async(job, f"c{c}", "m", 100, 50, [share("bob", "pc1", 100, 50)])
        assert s.charge_micros <= held
        return s.charge_micros

    def blocking(c: int) -> None:  # a thread on the same lane meanwhile
        for i in range(10):
            L.hold(f"t{c}-{i}", f"c{c}", "m", 100, 100)
            L.settle(f"t{c}-{i}", f"c{c}", "m", 100, 50, [share("bob", "pc1", 100, 50)])

    async def main() -> list[int]:
        threads = [threading.Thread(target=blocking, args=(c,)) for c in range(2)]
        for t in threads:
            t.start()
        charges = await asyncio.gather(*(one(c, i) for c in range(4) for i in range(25)))
        with pytest.raises(InsufficientBalance):
            await L.hold_async("broke", "poor", "m", 100_000, 100_000)
        await asyncio.to_thread(lambda: [t.join() for t in threads])
        return charges

    commits.clear()
    charges = asyncio.run(main())
    charge = -(-(100 * 60_000 + 50 * 180_000) // 1_000_000)
    assert charges.count(charge) == 80 and charges.count(0) == 20
    # 100 coroutines x 2-3 ops and 2 threads x 20 ops, in far fewer transactions than ops
    assert len(commits) < (100 * 2 + 20 + 40) / 2
    for c in range(4):
        spent = 20 * charge + (10 * charge if c < 2 else 0)
        assert L.client_balance(f"c{c}").balance_micros == USD - spent
    assert L.client_balance("poor").balance_micros == 10
    assert L.check() == []


# The calls of one job, in its order: (call, args...). Each pattern's results alone (computed
# sequentially first) are what every concurrent run of it must get.
_PATTERNS: dict[str, list[tuple[Any, ...]]] = {
    "settled": [("hold", 100, 100), ("settle", 50)],
    "voided": [("hold", 100, 100), ("void",)],
    "settled twice": [("hold", 100, 100), ("settle", 50), ("settle", 50)],
    "void after settle": [("hold", 100, 100), ("settle", 50), ("void",)],
    "voided twice": [("hold", 100, 100), ("void",), ("void",)],
    "refused": [("hold", 100_000, 100_000), ("void",)],
    "never held": [("settle", 50)],
    "with its row": [("hold", 100, 100, "row"), ("settle", 50, "row")],
}


def _normal(result: Any, job_id: str) -> Any:
    """A result with its job id taken out, to compare runs of a pattern."""
    if isinstance(result, BaseException):
        return (type(result).__name__, str(result).replace(job_id, "J"))
    if hasattr(result, "job_id"):
        return replace(result, job_id="J")
    return result


@pytest.mark.parametrize("lanes", [1, 2])
def test_threads_and_coroutines_on_a_ledger_get_the_results_of_calls_alone(
        make_books: Callable[..., Books], lanes: int) -> None:
    """Stress: blocking calls from threads, ``submit`` lists, and coroutines on two event loops
    (some of which stop waiting), all at once on one or two lanes. No lane ever runs two
    transactions at once, every call gets the result the same call gets alone, a job's calls
    keep their order, and the books balance."""
    import asyncio
    import random
    import threading
    import time

    b = make_books()
    L = b.restart(lanes=lanes)
    overlaps: list[int] = []
    for lane in L._lanes:  # one transaction at a time per lane
        running = [0]

        def watched(ops: Any, afters: Any, run: Any = lane._run, running: list[int] = running
                    ) -> Any:
            running[0] += 1
            if running[0] > 1:
                overlaps.append(1)
            try:
                return run(ops, afters)
            finally:
                running[0] -= 1

        lane._run = watched  # type: ignore[method-assign]
    clients = [f"c{c}" for c in range(4)]
    for c in clients:
        b.add_job(f"seed-{c}", c, "done")  # the clients' rows (job rows reference them)
        L.deposit(c, USD, f"p-{c}")
    L.deposit("poor", 10, "p-poor")
    L.hold("seed", "c0", "m", 1, 1)
    L.settle("seed", "c0", "m", 1, 1, [share("bob", "pc1", 1, 1)])  # bob's accounts, apart

    def row(job_id: str, client: str) -> JobRecord:
        return JobRecord(id=job_id, client_id=client, model="m", endpoint="chat.completions",
                         state=JobState.ADMITTED, prompt_tokens=100, max_tokens=100,
                         created_at_s=b.clock())

    def args(step: tuple[Any, ...], job_id: str, client: str) -> tuple[str, tuple[Any, ...],
                                                                         dict[str, Any]]:
        kind, *rest = step
        who = "poor" if rest[:1] == [100_000] else client
        if kind == "hold":
            kw = {"job": row(job_id, who)} if "row" in rest else {}
            return kind, (job_id, who, "m", rest[0], rest[1]), kw
        if kind == "settle":
            final = JobFinal(state=JobState.DONE, completion_tokens=rest[0],
                             finished_at_s=b.clock(), total_s=1.0)
            kw = {"job": final} if "row" in rest else {}
            return kind, (job_id, client, "m", 100, rest[0], [share("bob", "pc1", 100, rest[0])]
                          ), kw
        return kind, (job_id,), {}

    def alone(steps: list[tuple[Any, ...]], job_id: str, client: str) -> list[Any]:
        out = []
        for step in steps:
            kind, a, kw = args(step, job_id, client)
            try:
                out.append(_normal(getattr(L, kind)(*a, **kw), job_id))
            except SpareCyclesError as exc:
                out.append(_normal(exc, job_id))
        return out

    expected = {name: alone(steps, f"oracle-{i}", "c0")
                for i, (name, steps) in enumerate(_PATTERNS.items())}
    assert expected["settled"][1].charge_micros > 0  # the oracle itself is sane
    start = {c: L.client_balance(c).balance_micros for c in clients}
    got: list[tuple[str, str, list[Any]]] = []  # (pattern, job id, results)
    charged = {c: 0 for c in clients}
    lock = threading.Lock()

    def record(name: str, job_id: str, client: str, results: list[Any]) -> None:
        with lock:
            got.append((name, job_id, results))
            if name in ("settled", "settled twice", "void after settle", "with its row"):
                charged[client] += expected["settled"][1].charge_micros

    def blocking(t: int) -> None:
        rng = random.Random(t)
        for i in range(12):
            name = rng.choice(list(_PATTERNS))
            job_id, client = f"t{t}-{i}", clients[(t + i) % 4]
            if rng.random() < 0.25 and "row" not in repr(_PATTERNS[name]):  # a submit list
                ops = []
                for step in _PATTERNS[name]:
                    kind, a, _kw = args(step, job_id, client)
                    ops.append(HoldOp(*a) if kind == "hold" else VoidOp(*a) if kind == "void"
                               else SettleOp(*a[:5], tuple(a[5])))
                record(name, job_id, client, [_normal(r, job_id) for r in L.submit(ops)])
            else:
                record(name, job_id, client, alone(_PATTERNS[name], job_id, client))

    async def one(e: int, k: int) -> None:
        rng = random.Random(1000 * e + k)
        for i in range(4):
            name = rng.choice(list(_PATTERNS))
            job_id, client = f"e{e}-{k}-{i}", clients[(e + k + i) % 4]
            out: list[Any] = []
            for step in _PATTERNS[name]:
                kind, a, kw = args(step, job_id, client)
                call = getattr(L, f"{kind}_async")(*a, **kw)
                if rng.random() < 0.05:  # stops waiting; the call lands all the same
                    task = asyncio.ensure_future(call)
                    await asyncio.sleep(0)
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, SpareCyclesError):
                        await task
                    out = []
                    break
                try:
                    out.append(_normal(await call, job_id))
                except SpareCyclesError as exc:
                    out.append(_normal(exc, job_id))
            if out:
                record(name, job_id, client, out)
            else:  # cancelled part way: finish the job alone (its calls must have landed)
                with lock:
                    got.append(("cancelled", job_id, []))

    loop_errors: list[Any] = []

    def loop_thread(e: int) -> None:
        async def main() -> None:
            asyncio.get_running_loop().set_exception_handler(
                lambda _l, ctx: loop_errors.append(ctx))
            await asyncio.gather(*(one(e, k) for k in range(10)))

        asyncio.run(main())

    workers = ([threading.Thread(target=blocking, args=(t,)) for t in range(3)]
               + [threading.Thread(target=loop_thread, args=(e,)) for e in range(2)])
    t0 = time.monotonic()
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    assert not any(w.is_alive() for w in workers), "a caller never got its result"
    assert time.monotonic() - t0 < 60
    assert overlaps == [] and loop_errors == []
    for name, job_id, results in got:
        if name != "cancelled":
            assert results == expected[name], (name, job_id)
    deadline = time.monotonic() + 10  # a leader may still be handing on after its last wake-up
    while any(lane.load() for lane in L._lanes) and time.monotonic() < deadline:
        time.sleep(0.005)
    assert not any(lane.load() for lane in L._lanes), "ops left queued with nobody leading"
    # jobs cancelled part way: settle or void them now, so every hold is closed
    for name, job_id, _ in got:
        if name == "cancelled":
            L.void(job_id)
    cancelled_charges = sum(L.job_money(j)["charged_micros"] for n, j, _ in got
                            if n == "cancelled")
    assert sum(start[c] - L.client_balance(c).balance_micros for c in clients) == (
        sum(charged.values()) + cancelled_charges)
    for c in clients:
        assert L.client_balance(c).held_micros == 0
    assert L.client_balance("poor").balance_micros == 10
    with b.engine.connect() as c:
        rows = dict(c.execute(select(JobRow.id, JobRow.state)
                              .where(JobRow.id.not_like("seed-%"))).all())
    assert all(rows[j] == "done" for n, j, _ in got if n == "with its row")
    assert L.check() == []


def test_bad_ids_and_token_counts_are_refused(make_books: Callable[..., Books]) -> None:
    L = make_books().ledger
    with pytest.raises(InvalidRequest):
        L.hold("job with spaces", "alice", "m", 1, 1)
    with pytest.raises(InvalidRequest):
        L.hold("j", "alice", "m", -1, 1)
    with pytest.raises(InvalidRequest):
        L.settle("j", "alice", "m", 1, 1, [share("bad owner!", "n", 1, 1)])
    with pytest.raises(InvalidRequest):
        L.statement()


# ---- statements ------------------------------------------------------------------------------


def test_statements_show_balances_and_history(make_books: Callable[..., Books]) -> None:
    L = make_books().ledger
    L.deposit("alice", USD, "p")
    L.hold("j1", "alice", "m", 1000, 500)
    L.settle("j1", "alice", "m", 1000, 200, [share("bob", "pc1", 1000, 200)])
    st = L.statement(client_id="alice")
    assert st.balances[0].balance_micros == USD - 96
    assert [(x.kind, x.amount_micros, x.held_micros) for x in st.lines] == [
        ("post", -96, -150), ("hold", 0, 150), ("deposit", USD, 0)]
    doc = st.as_dict()
    assert doc["balances"][0]["available_micros"] == USD - 96
    assert doc["lines"][0]["transfer_id"] == "job:j1:post"
    owner = L.statement(owner_id="bob")
    assert [b.balance_micros for b in owner.balances] == [76, 0, 0]
    assert [(x.kind, x.amount_micros) for x in owner.lines] == [("earning", 76)]


# ---- payouts ---------------------------------------------------------------------------------


def _earn(L: Ledger, job: str, owner: str, completion: int) -> int:
    L.hold(job, "alice", "m", 0, completion)
    return L.settle(job, "alice", "m", 0, completion,
                    [share(owner, f"{owner}-pc", 0, completion)]).earnings[0].amount_micros


def test_payout_run_pays_owners_above_minimum_once(make_books: Callable[..., Books],
                                                   tmp_path: Path) -> None:
    b = make_books()
    L = b.ledger
    with b.engine.begin() as c:
        c.execute(insert(Owner.__table__).values(id="bob", name="Bob B", created_at_s=0.0))
    L.deposit("alice", 1000 * USD, "p")
    bob = _earn(L, "j1", "bob", 50_000_000)  # 9.00 USD * 0.8 = 7.20 USD
    carol = _earn(L, "j2", "carol", 10_000_000)  # 1.44 USD: below the minimum
    report = payouts.run_payouts(L, 5 * USD, tmp_path, batch_id="b1")
    assert report.batch_id == "b1" and report.total_micros == bob == 7_200_000
    assert report.file_path == str(tmp_path / "payouts-b1.csv")
    with open(tmp_path / "payouts-b1.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"batch_id": "b1", "owner_id": "bob", "owner_name": "Bob B",
                     "currency": "USD", "amount": "7.20", "amount_micros": "7200000",
                     "transfer_id": "payout:b1:bob:paid"}]
    assert L.owner_balance("bob").paid_micros == bob and L.owner_balance("bob").earned_micros == 0
    assert L.owner_balance("carol").earned_micros == carol
    with pytest.raises(Conflict):
        payouts.run_payouts(L, 5 * USD, tmp_path, batch_id="b1")
    assert payouts.run_payouts(L, 5 * USD, tmp_path).batch_id is None
    assert L.check() == []


def test_failed_payout_is_reversed_and_paid_in_a_later_batch(
        make_books: Callable[..., Books], tmp_path: Path) -> None:
    L = make_books().ledger
    L.deposit("alice", 1000 * USD, "p")
    bob = _earn(L, "j1", "bob", 50_000_000)
    payouts.run_payouts(L, USD, tmp_path, batch_id="b1")
    assert payouts.fail_payout(L, "b1", "bob", "account closed") == bob
    assert payouts.fail_payout(L, "b1", "bob", "account closed") == bob  # harmless repeat
    assert L.owner_balance("bob").earned_micros == bob and L.owner_balance("bob").paid_micros == 0
    assert L.check() == []
    assert payouts.run_payouts(L, USD, tmp_path, batch_id="b2").total_micros == bob
    with pytest.raises(NotFound):
        payouts.fail_payout(L, "b2", "nobody", "x")
    assert L.owner_balance("bob").paid_micros == bob and L.check() == []


def test_a_payout_run_that_crashed_is_resumed_not_paid_twice(
        make_books: Callable[..., Books], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    b = make_books()
    L = b.ledger
    L.deposit("alice", 1000 * USD, "p")
    bob = _earn(L, "j1", "bob", 50_000_000)

    def crash(*_: Any) -> str:
        raise OSError("disk full")

    monkeypatch.setattr(payouts, "_write_csv", crash)
    with pytest.raises(OSError):
        payouts.run_payouts(L, USD, tmp_path)
    assert L.owner_balance("bob").payable_micros == bob  # in flight, books still balance
    assert L.check() == []
    monkeypatch.undo()
    _earn(b.restart(), "j2", "bob", 50_000_000)  # earned meanwhile: not in the open batch
    with pytest.raises(Conflict, match="another run"):  # the dead run's claim is fresh
        payouts.run_payouts(b.restart(), USD, tmp_path)
    b.clock.advance(limits.payout_claim_s_max + 1)  # then it is taken over
    report = payouts.run_payouts(b.restart(), USD, tmp_path)
    assert report.resumed and report.total_micros == bob
    assert L.owner_balance("bob").paid_micros == bob
    assert L.owner_balance("bob").earned_micros == bob  # the second job waits for next batch
    assert L.check() == []


# ---- the auditor -----------------------------------------------------------------------------


def test_check_finds_tampering_and_missing_settlements(make_books: Callable[..., Books]) -> None:
    b = make_books()
    L = b.ledger
    L.deposit("alice", USD, "p")
    L.hold("j1", "alice", "m", 1000, 500)
    L.settle("j1", "alice", "m", 1000, 200, [share("bob", "pc1", 1000, 200)])
    b.add_job("j1", "alice", "done", finished_at_s=b.clock() - 1000)
    assert L.check() == []
    L.hold("j2", "alice", "m", 10, 10)
    b.add_job("j2", "alice", "failed", finished_at_s=b.clock() - 1000)  # hold never voided
    b.add_job("j3", "alice", "done", finished_at_s=b.clock() - 1000)  # never charged
    b.add_job("j4", "alice", "done", finished_at_s=b.clock() - 5)  # too recent to judge
    problems = L.check()
    assert any("j2" in p and "hold is still open" in p for p in problems)
    assert any("j3" in p and "0 charges" in p for p in problems)
    assert not any("j4" in p for p in problems)
    L.void("j2")
    b.exec("UPDATE ledger_accounts SET credits_posted = credits_posted + 5 "
           "WHERE id = 'client:alice'")
    problems = L.check(grace_s=1e9)
    assert any("client:alice: stored totals" in p for p in problems)
    assert any("posted debits" in p and "(stored totals)" in p for p in problems)


def test_the_database_refuses_a_missing_account_and_a_hold_resolved_twice(
        make_books: Callable[..., Books]) -> None:
    """What the foreign keys did before migration 0005, and the unique ``pending_id``."""
    b = make_books()
    L = b.ledger
    L.deposit("alice", USD, "p")
    L.hold("j1", "alice", "m", 1000, 500)
    L.ensure_owner("carol")  # this ledger now takes carol's accounts as created...
    b.exec("DELETE FROM ledger_accounts WHERE id = 'owner:carol:earned'")  # ...and one is gone
    with pytest.raises(InvariantViolation, match="owner:carol:earned"):
        L.settle("j1", "alice", "m", 1000, 200, [share("carol", "pc9", 1000, 200)])
    assert L.job_money("j1")["state"] == "held"  # nothing of the settlement was written
    L.settle("j1", "alice", "m", 1000, 200, [share("bob", "pc1", 1000, 200)])
    with pytest.raises(IntegrityError):  # a second post of the same hold
        b.exec("INSERT INTO ledger_transfers (id, debit_account_id, credit_account_id, "
               "amount_micros, currency, kind, job_id, pending_id, fingerprint, created_at_s) "
               "VALUES ('job:j1:post2', 'client:alice', 'platform:revenue', 1, 'USD', 'post', "
               "'j1', 'job:j1:hold', 'x', 0)")
    assert L.check() == []


def test_check_finds_a_hold_open_too_long(make_books: Callable[..., Books]) -> None:
    b = make_books()
    b.ledger.deposit("alice", USD, "p")
    b.ledger.hold("j1", "alice", "m", 10, 10)
    assert b.ledger.check() == []
    b.clock.advance(2 * 3600 + 600)
    assert any("open longer than any job" in p for p in b.ledger.check())


def test_group_commit_serves_concurrent_callers(make_books: Callable[..., Books]) -> None:
    import threading

    b = make_books()
    L = b.ledger
    for c in range(8):
        L.deposit(f"c{c}", USD, f"p{c}")
    errors: list[BaseException] = []

    def work(c: int) -> None:
        try:
            for i in range(20):
                L.hold(f"j{c}-{i}", f"c{c}", "m", 100, 100)
                L.settle(f"j{c}-{i}", f"c{c}", "m", 100, 50, [share("bob", "pc1", 100, 50)])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(c,)) for c in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    charge = -(-(100 * 60_000 + 50 * 180_000) // 1_000_000)
    assert all(L.client_balance(f"c{c}").balance_micros == USD - 20 * charge for c in range(8))
    assert L.check() == []



