"""Money on the command line: ``sparecycles ledger ...`` and ``sparecycles payouts ...``.

Amounts are typed and shown in units of the currency (``--amount 10.00``) and kept as integer
micro-units inside. Every command is one short transaction against ``--database``; errors end
the command with one line and exit code 1, and ``ledger check`` exits 1 when an invariant fails.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from sparecycles.cli.common import DatabaseOption, console, database_url, err_console, friendly
from sparecycles.errors import InvalidRequest
from sparecycles.ledger import payouts
from sparecycles.ledger.pricing import ModelPrice, format_money, parse_money
from sparecycles.ledger.service import Ledger, Statement

ledger_app = typer.Typer(help="The double-entry ledger: balances, deposits, prices, audit.",
                         no_args_is_help=True)
prices_app = typer.Typer(help="Prices per million tokens, per model.", no_args_is_help=True)
payouts_app = typer.Typer(help="Pay owners what their nodes earned.", no_args_is_help=True)
ledger_app.add_typer(prices_app, name="prices")


def _ledger(database: str | None) -> Ledger:
    from sparecycles.store import Store

    store = Store(database_url(database))
    store.migrate()
    return Ledger(store.sessions)


@ledger_app.command("check")
@friendly
def check(
    grace_s: float = typer.Option(300.0, "--grace-s", help="Ignore jobs that ended this recently"),
    database: str | None = DatabaseOption,
) -> None:
    """Verify every invariant of the books; exit 1 and list what fails."""
    ledger = _ledger(database)
    problems = ledger.check(grace_s=grace_s)
    accounts, transfers = ledger.store.read(lambda tx: tx.counts())
    if problems:
        for p in problems:
            err_console.print(f"[red]violation:[/red] {p}")
        err_console.print(f"{len(problems)} violation(s) in {accounts} accounts and "
                          f"{transfers} transfers")
        raise typer.Exit(1)
    console.print(f"ledger OK: {accounts} accounts, {transfers} transfers, every invariant holds")


@ledger_app.command("statement")
@friendly
def statement(
    client: str = typer.Option(None, "--client", help="Client name or id"),
    owner: str = typer.Option(None, "--owner", help="Owner name or id"),
    limit: int = typer.Option(20, "--limit", help="Newest transfers to show"),
    database: str | None = DatabaseOption,
) -> None:
    """A client's or an owner's balances and newest transfers."""
    if (client is None) == (owner is None):
        raise InvalidRequest("give --client or --owner")
    ledger = _ledger(database)
    if client is not None:
        st = ledger.statement(client_id=ledger.resolve("client", client), limit=limit)
    else:
        st = ledger.statement(owner_id=ledger.resolve("owner", owner), limit=limit)
    _print_statement(st)


def _print_statement(st: Statement) -> None:
    cur = st.currency
    console.print(f"[bold]{st.holder}[/bold] ({cur})")
    for b in st.balances:
        extra = f", held {format_money(b.held_micros)}" if b.held_micros else ""
        if b.credit_limit_micros:
            extra += f", credit limit {format_money(b.credit_limit_micros)}"
        console.print(f"  {b.account_id}: balance {format_money(b.balance_micros)}{extra}")
    table = Table()
    for name in ("#", "kind", "amount", "held", "account", "job", "counterparty", "memo"):
        table.add_column(name, overflow="fold", no_wrap=name in ("kind", "amount", "held"))
    many = len(st.balances) > 1
    for line in st.lines:
        account = line.account_id.rpartition(":")[2] if many else ""
        table.add_row(str(line.seq), line.kind, format_money(line.amount_micros),
                      format_money(line.held_micros), account, line.job_id or "",
                      line.counterparty, line.memo or "")
    console.print(table)


@ledger_app.command("deposit")
@friendly
def deposit(
    client: str = typer.Option(..., "--client", help="Client name or id"),
    amount: str = typer.Option(..., "--amount", help="In units of the currency, e.g. 10.00"),
    reference: str = typer.Option(..., "--reference",
                                  help="The payment's id (required): repeating it deposits "
                                  "only once, so a retried command never deposits twice"),
    database: str | None = DatabaseOption,
) -> None:
    """Add funds to a client's prepaid balance."""
    micros = parse_money(amount)
    ledger = _ledger(database)
    client_id = ledger.resolve("client", client)
    ledger.deposit(client_id, micros, reference)
    bal = ledger.client_balance(client_id)
    console.print(f"deposited {format_money(micros, ledger.currency)} to {client} "
                  f"(reference {reference}); balance {format_money(bal.balance_micros)}")


@prices_app.command("show")
@friendly
def prices_show(database: str | None = DatabaseOption) -> None:
    """Every model's price, the default for others, and the owners' share."""
    book = _ledger(database).prices()
    table = Table("model", f"input /Mtok ({book.currency})", f"output /Mtok ({book.currency})")
    for name, p in sorted(book.models.items()):
        table.add_row(name, format_money(p.input_micros_per_mtok),
                      format_money(p.output_micros_per_mtok))
    if book.fallback is not None:
        table.add_row("(any other)", format_money(book.fallback.input_micros_per_mtok),
                      format_money(book.fallback.output_micros_per_mtok))
    console.print(table)
    share = book.terms.owner_share_ppm / 10_000
    console.print(f"owners earn {share:g}% of each charge (payout by {book.terms.mode}); "
                  f"platform fee {100 - share:g}%; payout minimum "
                  f"{format_money(book.payout_min_micros, book.currency)}")


@prices_app.command("set")
@friendly
def prices_set(
    model: str = typer.Argument(..., help="Model name as clients request it"),
    input_price: str = typer.Option(..., "--input", help="Per million input tokens, e.g. 0.06"),
    output_price: str = typer.Option(..., "--output", help="Per million output tokens"),
    database: str | None = DatabaseOption,
) -> None:
    """Set a model's price. Jobs admitted earlier keep the price they were admitted at."""
    ledger = _ledger(database)
    ledger.set_price(model, ModelPrice(parse_money(input_price), parse_money(output_price)))
    console.print(f"{model}: {input_price} in / {output_price} out per million tokens "
                  f"({ledger.currency})")


@payouts_app.command("run")
@friendly
def payouts_run(
    minimum: str = typer.Option("5.00", "--min", help="Pay owners who earned at least this"),
    out: Path = typer.Option(..., "--out", help="The folder of the batch files: the batch is "
                             "written to OUT/payouts-<batch>.csv"),
    batch_id: str = typer.Option(None, "--batch-id", help="Name the batch (default: the time)"),
    database: str | None = DatabaseOption,
) -> None:
    """Pay every owner above the minimum: write the batch file and post the transfers."""
    ledger = _ledger(database)
    report = payouts.run_payouts(ledger, parse_money(minimum), out, batch_id)
    if report.batch_id is None:
        console.print(f"no owner has earned {minimum} {ledger.currency}; nothing to pay")
        return
    note = " (resumed an unfinished batch)" if report.resumed else ""
    console.print(f"batch {report.batch_id}{note}: paid {len(report.lines)} owner(s) "
                  f"{format_money(report.total_micros, report.currency)}; file {report.file_path}"
                  f" sha256 {report.file_sha256}")


@payouts_app.command("fail")
@friendly
def payouts_fail(
    target: str = typer.Argument(..., metavar="BATCH_ID/OWNER",
                                 help="The batch and the owner (name or id) whose payout failed"),
    reason: str = typer.Option("returned by the bank", "--reason"),
    database: str | None = DatabaseOption,
) -> None:
    """Reverse one owner's payout (a correcting transfer back to their earned balance)."""
    batch_id, sep, owner = target.partition("/")
    if not sep or not batch_id or not owner:
        raise InvalidRequest("give BATCH_ID/OWNER, e.g. batch-20250101T000000Z-abc123/alice")
    ledger = _ledger(database)
    amount = payouts.fail_payout(ledger, batch_id, ledger.resolve("owner", owner), reason)
    console.print(f"reversed {format_money(amount, ledger.currency)} of batch {batch_id} to "
                  f"{owner}'s earned balance")


def register(app: typer.Typer) -> None:
    app.add_typer(ledger_app, name="ledger")
    app.add_typer(payouts_app, name="payouts")
