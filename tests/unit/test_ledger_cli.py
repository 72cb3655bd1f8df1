"""``sparecycles ledger`` and ``sparecycles payouts`` end to end on a SQLite file."""

from __future__ import annotations

import csv
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from sparecycles.cli.ledger import register
from sparecycles.ledger.service import Ledger, WorkShare
from sparecycles.store import Store

Run = Callable[..., tuple[int, str]]


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Run, Store]]:
    url = f"sqlite:///{tmp_path}/sc.db"
    monkeypatch.setenv("SPARECYCLES_DATABASE", url)
    store = Store(url)
    store.migrate()
    app = typer.Typer()
    register(app)
    runner = CliRunner()

    def run(*args: str) -> tuple[int, str]:
        result = runner.invoke(app, list(args))
        return result.exit_code, result.output

    yield run, store
    store.close()


def test_deposit_statement_check_and_prices(cli: tuple[Run, Store]) -> None:
    run, store = cli
    client = store.ensure_client("acme")
    code, out = run("ledger", "deposit", "--client", "acme", "--amount", "10.00",
                    "--reference", "stripe-1")
    assert code == 0 and "balance 10.00" in out
    code, out = run("ledger", "deposit", "--client", "acme", "--amount", "10.00",
                    "--reference", "stripe-1")
    assert code == 0 and "balance 10.00" in out  # the same payment, once
    assert Ledger(store.sessions).client_balance(client).balance_micros == 10_000_000
    code, out = run("ledger", "statement", "--client", "acme")
    assert code == 0 and "deposit" in out and "10.00" in out
    code, out = run("ledger", "prices", "set", "tiny", "--input", "0.02", "--output", "0.06")
    assert code == 0
    code, out = run("ledger", "prices", "show")
    assert code == 0 and "tiny" in out and "0.06" in out and "80%" in out
    code, out = run("ledger", "check")
    assert code == 0 and "every invariant holds" in out


def test_errors_are_one_line_and_exit_1(cli: tuple[Run, Store]) -> None:
    run, store = cli
    store.ensure_client("acme")
    for args, message in (
        (("ledger", "deposit", "--client", "nobody", "--amount", "1", "--reference", "r"),
         "no client named"),
        (("ledger", "deposit", "--client", "acme", "--amount", "1.0000001", "--reference", "r"),
         "6 decimal"),
        (("ledger", "deposit", "--client", "acme", "--amount", "-3", "--reference", "r"),
         "non-negative"),
        (("ledger", "statement"), "--client or --owner"),
        (("payouts", "fail", "nonsense"), "BATCH_ID/OWNER"),
    ):
        code, out = run(*args)
        assert code == 1 and message in out and "Traceback" not in out, (args, out)


@pytest.mark.parametrize("amount", ["1_000", "\u0661\u0660", "\uff11\uff10", "1e3", "Infinity",
                                    "0x10", "+5", "1.", ".5", "1,000"])
def test_amounts_are_plain_ascii_decimals(cli: tuple[Run, Store], amount: str) -> None:
    run, store = cli
    store.ensure_client("acme")
    code, out = run("ledger", "deposit", "--client", "acme", "--amount", amount,
                    "--reference", "r-1")
    assert code == 1 and "not an amount" in out and "Traceback" not in out, out
    code, out = run("payouts", "run", "--min", amount, "--out", "x.csv")
    assert code == 1 and "not an amount" in out, out


def test_a_deposit_needs_a_reference_so_a_retry_never_deposits_twice(
        cli: tuple[Run, Store]) -> None:
    run, store = cli
    client = store.ensure_client("acme")
    for _ in range(2):  # the operator's retry
        code, _out = run("ledger", "deposit", "--client", "acme", "--amount", "10.00")
        assert code != 0
    assert Ledger(store.sessions).client_balance(client).balance_micros == 0


def test_check_exits_1_on_a_broken_invariant(cli: tuple[Run, Store]) -> None:
    run, store = cli
    from sqlalchemy import text

    client = store.ensure_client("acme")
    Ledger(store.sessions).deposit(client, 5_000_000, "p")
    with store.engine.begin() as c:
        c.execute(text("UPDATE ledger_accounts SET credits_posted = 1 WHERE kind = 'client'"))
    code, out = run("ledger", "check")
    assert code == 1 and "violation" in out and "stored totals" in out


def test_payouts_run_writes_the_batch_and_fail_reverses(cli: tuple[Run, Store],
                                                        tmp_path: Path) -> None:
    run, store = cli
    client = store.ensure_client("acme")
    owner = store.ensure_owner("olga")
    ledger = Ledger(store.sessions)
    ledger.deposit(client, 100_000_000, "p")
    ledger.hold("j1", client, "m", 0, 50_000_000)
    ledger.settle("j1", client, "m", 0, 50_000_000,
                  [WorkShare(owner, "node1", "gaming-pc", 0, 50_000_000)])  # earns 7.20
    code, out = run("payouts", "run", "--min", "5.00", "--out", str(tmp_path),
                    "--batch-id", "b1")
    assert code == 0 and "7.20 USD" in out
    rows = list(csv.DictReader((tmp_path / "payouts-b1.csv").open()))
    assert [(r["owner_name"], r["amount"]) for r in rows] == [("olga", "7.20")]
    code, out = run("payouts", "run", "--min", "5.00", "--out", str(tmp_path),
                    "--batch-id", "b1")
    assert code == 1 and "already paid" in out
    code, out = run("payouts", "fail", "b1/olga", "--reason", "IBAN closed")
    assert code == 0 and "reversed 7.20 USD" in out
    code, out = run("ledger", "statement", "--owner", "olga")
    assert code == 0 and "payout_reversal" in out
    assert run("ledger", "check")[0] == 0
