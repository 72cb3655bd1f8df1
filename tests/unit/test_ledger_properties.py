"""Property test: random sequences of deposits, holds, posts, voids, retries, corrections,
payouts and restarts, against a reference model; after every step the independent auditor
finds nothing and every balance equals the model's.

``LedgerMachine.books`` makes the database; tests/integration runs this machine on PostgreSQL.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)
from test_ledger_flows import Books, sqlite_books

from sparecycles.errors import Conflict, InsufficientBalance, InvalidRequest
from sparecycles.ledger import payouts
from sparecycles.ledger.pricing import (
    ModelPrice,
    PriceBook,
    charge_micros,
    hold_micros,
    split_charge,
)
from sparecycles.ledger.service import VoidOutcome, WorkShare

# 50 times the default price (and deposits): earnings reach whole cents, what payouts pay
PRICES = PriceBook.default().with_price("m", ModelPrice(3_000_000, 9_000_000))
CLIENTS = ("alice", "bert")
OWNERS = ("olga", "omar", "otto")
NODES = {"n1": "olga", "n2": "omar", "n3": "otto", "n4": "olga"}
REFS = ("r1", "r2", "r3", "r4")


@dataclass
class Job:
    client: str
    prompt: int
    max_tokens: int
    hold: int
    state: str = "held"  # held | settled | voided
    settle_args: tuple | None = None
    earnings: dict[str, int] = field(default_factory=dict)  # node -> amount
    withheld: set[str] = field(default_factory=set)


class LedgerMachine(RuleBasedStateMachine):
    books: Callable[[], Books] = staticmethod(sqlite_books)

    def __init__(self) -> None:
        super().__init__()
        self.b = type(self).books(prices=PRICES)
        self.L = self.b.ledger
        self.price = self.b.prices.price_of("m")
        self.terms = self.b.prices.terms
        self.balance = dict.fromkeys(CLIENTS, 0)
        self.held = dict.fromkeys(CLIENTS, 0)
        self.limit = dict.fromkeys(CLIENTS, 0)
        self.earned = dict.fromkeys(OWNERS, 0)
        self.paid = dict.fromkeys(OWNERS, 0)
        self.deposits: dict[str, tuple[str, int]] = {}
        self.jobs: dict[str, Job] = {}
        self.items: list[tuple[str, str, int]] = []  # (batch, owner, amount) paid
        self.failed: set[tuple[str, str]] = set()
        self.dir = Path(tempfile.mkdtemp())
        self.batches = 0

    def available(self, c: str) -> int:
        return self.balance[c] - self.held[c] + self.limit[c]

    # -- rules --

    @initialize(amount=st.integers(0, 50 * 50_000))
    def fund(self, amount: int) -> None:
        for c in CLIENTS:
            if amount:
                self.L.deposit(c, amount, f"init-{c}")
                self.balance[c] += amount

    @rule(c=st.sampled_from(CLIENTS), amount=st.integers(1, 50 * 50_000), ref=st.sampled_from(REFS))
    def deposit(self, c: str, amount: int, ref: str) -> None:
        if ref in self.deposits and self.deposits[ref] != (c, amount):
            try:
                self.L.deposit(c, amount, ref)
                raise AssertionError("a reused reference with other content was accepted")
            except Conflict:
                return
        self.L.deposit(c, amount, ref)
        if ref not in self.deposits:
            self.deposits[ref] = (c, amount)
            self.balance[c] += amount

    @rule(c=st.sampled_from(CLIENTS), limit=st.integers(0, 50 * 3_000))
    def credit_limit(self, c: str, limit: int) -> None:
        if self.available(c) - self.limit[c] + limit < 0:
            try:
                self.L.set_credit_limit(c, limit)
                raise AssertionError("a credit limit below the debt was accepted")
            except InvalidRequest:
                return
        self.L.set_credit_limit(c, limit)
        self.limit[c] = limit

    @rule(c=st.sampled_from(CLIENTS), prompt=st.integers(0, 5_000),
          max_tokens=st.integers(0, 5_000))
    def hold(self, c: str, prompt: int, max_tokens: int) -> None:
        job = f"j{len(self.jobs)}"
        amount = hold_micros(self.price, prompt, max_tokens)
        if amount > self.available(c):
            try:
                self.L.hold(job, c, "m", prompt, max_tokens)
                raise AssertionError("an overdraft was accepted")
            except InsufficientBalance:
                return
        assert self.L.hold(job, c, "m", prompt, max_tokens) == amount
        assert self.L.hold(job, c, "m", prompt, max_tokens) == amount  # a retry is harmless
        self.jobs[job] = Job(c, prompt, max_tokens, amount)
        self.held[c] += amount

    @rule(c=st.sampled_from(CLIENTS), prompt=st.integers(0, 5_000),
          max_tokens=st.integers(0, 5_000), data=st.data())
    def job(self, c: str, prompt: int, max_tokens: int, data: st.DataObject) -> None:
        """The common path: a job admitted, then completed at once."""
        n = len(self.jobs)
        self.hold(c, prompt, max_tokens)
        if len(self.jobs) > n:
            self.settle(data, f"j{n}")

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def settle(self, data: st.DataObject, job_id: str | None = None) -> None:
        job_id = job_id or data.draw(st.sampled_from(sorted(self.jobs)))
        j = self.jobs[job_id]
        completion = data.draw(st.integers(0, j.max_tokens))
        nodes = data.draw(st.lists(st.sampled_from(sorted(NODES)), max_size=3, unique=True))
        shares = [WorkShare(NODES[n], n, "gaming-pc", j.prompt + 7 * i, completion // (i + 1))
                  for i, n in enumerate(nodes)]
        args = (job_id, j.client, "m", j.prompt, completion, shares)
        if j.state == "settled" and j.settle_args is not None:
            again = self.L.settle(*j.settle_args)  # a replayed completion
            assert again.replayed
            if args != j.settle_args:
                try:
                    self.L.settle(*args)
                    raise AssertionError("a settlement with other content was accepted")
                except Conflict:
                    return
            return
        if j.state == "voided":
            try:
                self.L.settle(*args)
                raise AssertionError("a voided job was charged")
            except Conflict:
                return
        s = self.L.settle(*args)
        charge = charge_micros(self.price, j.prompt, completion, j.hold)
        split = split_charge(charge, self.price, self.terms, shares)
        assert (s.charge_micros, s.fee_micros) == (charge, split.fee_micros)
        j.state, j.settle_args = "settled", args
        self.held[j.client] -= j.hold
        self.balance[j.client] -= charge
        for e in split.earnings:
            if e.amount_micros:
                self.earned[e.owner_id] += e.amount_micros
                j.earnings[e.node_id] = e.amount_micros

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def void(self, data: st.DataObject) -> None:
        j = self.jobs[job_id := data.draw(st.sampled_from(sorted(self.jobs)))]
        expected = {"held": VoidOutcome.VOIDED, "voided": VoidOutcome.ALREADY_VOIDED,
                    "settled": VoidOutcome.SETTLED}[j.state]
        assert self.L.void(job_id) is expected
        if j.state == "held":
            j.state = "voided"
            self.held[j.client] -= j.hold

    @precondition(lambda self: any(j.state == "settled" for j in self.jobs.values()))
    @rule(data=st.data())
    def withhold(self, data: st.DataObject) -> None:
        settled = sorted(k for k, j in self.jobs.items() if j.state == "settled")
        if not settled:
            return
        j = self.jobs[job_id := data.draw(st.sampled_from(settled))]
        node = data.draw(st.sampled_from([None, *sorted(NODES)]))
        chosen = [n for n in j.earnings if node is None or n == node]
        assert self.L.withhold(job_id, "verification failed", node) == sum(
            j.earnings[n] for n in chosen)
        for n in chosen:
            if n not in j.withheld:
                j.withheld.add(n)
                self.earned[NODES[n]] -= j.earnings[n]
                self.balance[j.client] += j.earnings[n]

    @rule(minimum=st.integers(10_000, 30_000))  # at least a cent
    def payout(self, minimum: int) -> None:
        self.batches += 1
        report = payouts.run_payouts(self.L, minimum, self.dir)
        due = {o: v - v % 10_000 for o, v in self.earned.items()  # in whole cents
               if v - v % 10_000 >= minimum}
        assert {line.owner_id: line.amount_micros for line in report.lines} == due
        for o, v in due.items():
            self.items.append((report.batch_id or "", o, v))
            self.earned[o] -= v
            self.paid[o] += v

    @precondition(lambda self: self.items)
    @rule(data=st.data())
    def fail_payout(self, data: st.DataObject) -> None:
        batch, owner, amount = data.draw(st.sampled_from(self.items))
        assert payouts.fail_payout(self.L, batch, owner, "returned") == amount
        if (batch, owner) not in self.failed:
            self.failed.add((batch, owner))
            self.earned[owner] += amount
            self.paid[owner] -= amount

    @rule()
    def restart(self) -> None:
        self.L = self.b.restart()

    # -- invariants --

    @invariant()
    def books_agree_with_the_model(self) -> None:
        for c in CLIENTS:
            bal = self.L.client_balance(c)
            assert (bal.balance_micros, bal.held_micros) == (self.balance[c], self.held[c])
            assert bal.available_micros >= 0
        for o in OWNERS:
            ob = self.L.owner_balance(o)
            assert (ob.earned_micros, ob.payable_micros, ob.paid_micros) == (
                self.earned[o], 0, self.paid[o])

    @invariant()
    def auditor_finds_nothing(self) -> None:
        assert self.L.check() == []


LedgerMachine.TestCase.settings = settings(
    stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow])
TestLedgerProperties = LedgerMachine.TestCase
