"""``sparecycles costs ...``: what requests, clients and models cost, and the margin made.

- ``costs report --period 2026-11``      revenue, COGS, margins, fixed base, break-even, owners
- ``costs export-focus --period --out``  the FinOps FOCUS 1.2 CSV of what clients were billed
- ``costs reconcile --period``           metering vs ledger vs FOCUS; exit 1 where they differ
- ``costs estimate --device --model``    what a device would earn and cost a would-be owner

The cost model is ``--model-file``, else ``$SPARECYCLES_COST_MODEL``, else the shipped example
(docs/costs.md). Money is shown in units of the currency and kept in integer micro-units.
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from sparecycles.cli.common import DatabaseOption, console, database_url, err_console, friendly
from sparecycles.costs.costmodel import CostModel, OwnerHardware, load_cost_model
from sparecycles.costs.month import sig
from sparecycles.costs.period import (
    close_month,
    month_report,
    period_costs,
    period_reconciliation,
)
from sparecycles.costs.reports import CostReport, Row
from sparecycles.ledger.pricing import format_money, parse_money

costs_app = typer.Typer(help="Cost of compute: COGS, margins, FOCUS export, reconciliation, "
                             "owner economics.", no_args_is_help=True)
bar_width = 28
PeriodOption = typer.Option(None, "--period", help="A month, YYYY-MM (default: this month, UTC)")
ModelFileOption = typer.Option(None, "--model-file",
                               help="Cost model TOML (default: $SPARECYCLES_COST_MODEL, else "
                                    "examples/costs.toml)")


def _period(value: str | None) -> str:
    return value or dt.datetime.now(dt.UTC).strftime("%Y-%m")


def _sessions(database: str | None) -> Any:
    from sparecycles.store import Store

    store = Store(database_url(database))
    store.migrate()
    return store.sessions


def _m(micros: int | None) -> str:
    return "-" if micros is None else format_money(micros)


def _bar(value: int, largest: int, width: int = bar_width) -> str:
    if largest <= 0 or value <= 0:
        return ""
    cells = value * width / largest
    return "█" * int(cells) + ("▌" if cells - int(cells) >= 0.5 else "")


def _pct(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return "<-999%" if value < 0 else ">999%"
    return f"{value:.2f}%"


def _pnl(r: CostReport) -> Table:
    t = Table(title=f"Costs of {r.period} ({r.currency})", show_header=True)
    t.add_column("line")
    t.add_column("amount", justify="right")
    t.add_column("", style="cyan")
    cogs = dict(sorted(r.totals.cogs_micros.items(), key=lambda kv: -kv[1]))
    largest = max([r.revenue_micros, r.total_cost_micros, *cogs.values()], default=0)
    t.add_row("[bold]revenue[/bold]", _m(r.revenue_micros), _bar(r.revenue_micros, largest))
    if r.revenue_corrections_micros:
        t.add_row("  of which refunds of earlier periods", _m(r.revenue_corrections_micros), "")
    for cat, v in cogs.items():
        t.add_row(f"  COGS: {cat}", _m(v), _bar(v, largest))
    t.add_row("[bold]COGS[/bold]", _m(r.totals.cogs_total_micros),
              _bar(r.totals.cogs_total_micros, largest))
    pct = (100.0 * r.gross_margin_micros / r.revenue_micros) if r.revenue_micros else None
    t.add_row("[bold]gross margin[/bold]", _m(r.gross_margin_micros), _pct(pct))
    for cat, v in sorted(r.idle_micros.items()):
        t.add_row(f"idle capacity: {cat}", _m(v), _bar(v, largest))
    for w in ("training", "rnd"):
        if v := r.opex_allocated_micros.get(w, 0):
            t.add_row(f"opex on {w} requests", _m(v), _bar(v, largest))
    for w, cats in sorted(r.unallocated_micros.items()):
        for cat, v in sorted(cats.items()):
            t.add_row(f"unallocated ({w}): {cat}", _m(v), _bar(v, largest))
    t.add_row("[bold]total cost[/bold]", _m(r.total_cost_micros),
              _bar(r.total_cost_micros, largest))
    t.add_row("[bold]operating result[/bold]", _m(r.operating_result_micros), "")
    return t


def _rows_table(title: str, rows: tuple[Row, ...], *, first: str, per_mtok: bool = False,
                key: bool = False) -> Table:
    """Margins per row; columns that would be all zero are left out (narrow terminals)."""
    opex = any(r.opex_micros for r in rows)
    t = Table(title=title)
    cols = [first, "reqs", "revenue", "COGS", *(["opex"] if opex else []), "margin", "GM %",
            "contrib.", *(["COGS/Mtok"] if per_mtok else [])]
    for col in cols:
        t.add_column(col, justify="left" if col == first else "right",
                     no_wrap=col != first, min_width=12 if col == first else None)
    for row in rows:
        name = row.key if key else (row.label or row.key)
        t.add_row(f"{name}\n[dim]{row.label}[/dim]" if key else name, f"{row.requests:,}",
                  _m(row.revenue_micros), _m(row.cogs_total_micros),
                  *([_m(row.opex_micros)] if opex else []), _m(row.gross_margin_micros),
                  _pct(row.gross_margin_pct), _m(row.contribution_margin_micros),
                  *([_m(row.cogs_per_mtok_micros)] if per_mtok else []))
    return t


def _days(r: CostReport) -> Table:
    t = Table(title="by day: revenue (green) and cost (red)")
    for col in ("day", "reqs", "revenue", "COGS", "margin", ""):
        t.add_column(col, justify="right" if col not in ("day", "") else "left", no_wrap=True)
    largest = max([max(x.revenue_micros, x.cost_micros) for x in r.by_day], default=0)
    for x in r.by_day:
        bars = (f"[green]{_bar(x.revenue_micros, largest, 20)}[/green]\n"
                f"[red]{_bar(x.cost_micros, largest, 20)}[/red]")
        t.add_row(x.key, f"{x.requests:,}", _m(x.revenue_micros), _m(x.cogs_total_micros),
                  _m(x.gross_margin_micros), bars)
    return t


def _devices(r: CostReport) -> Table:
    t = Table(title="cost per million inference tokens, by device class")
    for col in ("device class", "attempts", "busy h", "tokens", "COGS", "COGS/Mtok"):
        t.add_column(col, justify="left" if col == "device class" else "right", no_wrap=True)
    for x in r.by_device_class:
        t.add_row(x.key, f"{x.requests:,}", f"{x.busy_s / 3600:,.3f}", f"{x.tokens:,}",
                  _m(x.cogs_total_micros), _m(x.cogs_per_mtok_micros))
    return t


def _stages(r: CostReport) -> Table:
    """The stages of the chain requests listed: who ran which layers, and what each cost."""
    t = Table(title="requests served by a chain: COGS per stage (the request's is their sum)")
    for col in ("request", "stage node", "layers", "share", "tokens", "busy s", "earning",
                "COGS"):
        t.add_column(col, justify="left" if col in ("request", "stage node") else "right",
                     no_wrap=True)
    for row in r.requests:
        for i, st in enumerate(row.stages):
            t.add_row(row.key if i == 0 else "", st.label or st.node_id,
                      f"{st.layers[0]}:{st.layers[1]}", f"{st.work_ppm / 10_000:.1f} %",
                      f"{st.prompt_tokens + st.completion_tokens:,}", f"{st.busy_s:,.3f}",
                      _m(st.earning_micros), _m(st.cogs_total_micros))
    return t


def _owners(r: CostReport) -> Table:
    t = Table(title="owner economics: what sharing earned each device, and cost its owner")
    for col in ("node", "earned", "electricity", "wear", "net", "net/busy h"):
        t.add_column(col, justify="left" if col == "node" else "right",
                     no_wrap=col != "node", min_width=16 if col == "node" else None)
    for o in r.owners:
        t.add_row(f"{o.name}\n[dim]{o.device_class}, {o.jobs:,} jobs, busy "
                  f"{o.busy_s / 3600:,.4f} h, {o.energy_j / 3600:,.3f} Wh "
                  f"({','.join(o.energy_sources) or '-'})[/dim]",
                  _m(o.earned_micros), _m(o.electricity_micros), _m(o.wear_micros),
                  _m(o.net_micros), _m(o.net_per_busy_hour_micros))
    return t


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}%"


def _tokens(n: int | None) -> str:
    if n is None:
        return "-"
    for size, suffix in ((10**9, "G"), (10**6, "M"), (10**3, "k")):
        if abs(n) >= size:
            return f"{n / size:.3g}{suffix}"
    return f"{n:,}"


def print_month(body: dict[str, Any], out: Console | None = None) -> None:
    """The month view (``costs/month.py``) in tables that read at 80 columns."""
    out = out or console
    m, cur = body["month"], body["currency"]
    u, f, rr, be = m["unit"], m["fixed"], m["run_rate"], m["break_even"]
    day = 86_400
    days = round((m["period_end_s"] - m["period_start_s"]) / day)
    done = m["elapsed_ppm"] * days / 1_000_000
    status = m["status"] + (f", day {done:.1f} of {days}" if m["status"] == "in progress"
                            else "")
    out.print(f"[bold]{body['period']}[/bold] ({status}); {m['inference_requests']:,} "
              f"inference requests, {m['inference_tokens']:,} tokens; amounts in {cur}")
    t = Table(title="unit economics, variable cost only", title_justify="left")
    t.add_column("line", no_wrap=True)
    for col in ("to date", "per Mtok", "per request"):
        t.add_column(col, justify="right", no_wrap=True)

    def row(label: str, x: dict[str, Any], style: str = "") -> None:
        cells = [sig(x["total_micros"]), sig(x["per_mtok_micros"]),
                 sig(x["per_request_micros"])]
        t.add_row(f"[{style}]{label}[/{style}]" if style else label, *cells)

    row("price (revenue)", u["price"], "bold")
    for line in u["variable_lines"]:
        label = "  " + line["line"]
        if line["line"] == "energy":
            label += f" ({u['energy']['label']})"
        row(label, line)
    row("variable cost", u["variable"], "bold")
    row("contribution", u["contribution"], "bold")
    t.add_row("contribution margin", _ratio(u["contribution_margin_pct"]), "", "")
    out.print(t)
    e = u["energy"]
    if e["measured_pct"] is not None:
        share = e["share_of_variable_pct"]
        out.print(f"[dim]energy: {e['measured_pct']:g}% of the joules measured (NVML, RAPL), "
                  f"the rest estimated; {'-' if share is None else f'{share:g}%'} of the "
                  "variable cost[/dim]")
    t = Table(title="fixed base costs of the month", title_justify="left")
    t.add_column("line", no_wrap=True)
    t.add_column("budget", justify="right", no_wrap=True)
    t.add_column("accrued to date", justify="right", no_wrap=True)
    for x in f["base_lines"]:
        t.add_row("  " + x["line"], sig(x["budget_micros"]), sig(x["accrued_micros"]))
    t.add_row("[bold]base infrastructure[/bold]", sig(f["base_budget_micros"]),
              sig(f["base_accrued_micros"]))
    for x in f["opex_lines"]:
        t.add_row(x["line"], sig(x["budget_micros"]), sig(x["accrued_micros"]))
    t.add_row("[bold]fixed base[/bold]", sig(f["budget_micros"]), sig(f["accrued_micros"]))
    out.print(t)
    t = Table(title="run-rate and break-even", title_justify="left", show_header=False)
    t.add_column("line", no_wrap=True)
    t.add_column("value", justify="right", no_wrap=True)
    t.add_row("revenue, month at this rate", sig(rr["revenue_micros"]))
    t.add_row("contribution, month at this rate", sig(rr["contribution_micros"]))
    t.add_row("result after the fixed budget", sig(rr["result_micros"]))
    t.add_row("tokens, month at this rate", _tokens(rr["tokens"]))
    t.add_row("break-even, tokens a month", _tokens(be["tokens_per_month"])
              if be["tokens_per_month"] is not None else "never")
    t.add_row("break-even, requests a month", _tokens(be["requests_per_month"]))
    loaded = m["fully_loaded_per_mtok_micros"]
    t.add_row("fully loaded per M tokens, this rate", sig(loaded["at_run_rate"]))
    t.add_row("fully loaded per M tokens, break-even", sig(loaded["at_break_even"]))
    if (a := m.get("absorbed")) is not None:
        t.add_row("COGS per request, absorbed", sig(a["per_request_micros"]))
        t.add_row("COGS per M tokens, absorbed", sig(a["per_mtok_micros"]))
    out.print(t)
    if a is not None:
        out.print(f"[dim]absorbed: {a['label']}[/dim]")
    if m["by_model"]:
        t = Table(title="by model, per M tokens", title_justify="left")
        t.add_column("model", no_wrap=True, min_width=8)
        for col in ("reqs", "tokens", "price", "variable", "contrib."):
            t.add_column(col, justify="right", no_wrap=True)
        for x in m["by_model"]:
            t.add_row(x["model"], f"{x['requests']:,}", _tokens(x["tokens"]),
                      sig(x["price_per_mtok_micros"]), sig(x["variable_per_mtok_micros"]),
                      sig(x["contribution_per_mtok_micros"]))
        out.print(t)
    for o in body.get("orphan_postings", []):
        out.print(f"[red]{o['count']:,} ledger {o['kind']} posting(s) of "
                  f"{sig(o['amount_micros'])} with no request row[/red] (jobs "
                  f"{', '.join(o['job_ids'][:5])}): see `costs reconcile`")


def print_report(r: CostReport, out: Console | None = None) -> None:
    """The whole report, as ``costs report`` prints it (the demo may print it too)."""
    out = out or console
    out.print(_pnl(r))
    held = (r.allocated_micros + r.idle_total_micros + r.unallocated_total_micros
            == r.total_cost_micros)
    out.print(f"allocated {_m(r.allocated_micros)} + idle {_m(r.idle_total_micros)} + "
              f"unallocated {_m(r.unallocated_total_micros)} = total "
              f"{_m(r.total_cost_micros)} " + ("[green]✓[/green]" if held else "[red]✗[/red]"))
    fb = r.fixed_base_micros
    be = r.break_even_tokens_per_month
    out.print(
        f"fixed base costs: training {_m(fb['training_micros'])}, R&D {_m(fb['rnd_micros'])}, "
        f"base infrastructure {_m(fb['base_infrastructure_micros'])} = "
        f"[bold]{_m(r.fixed_base_total_micros)}[/bold]; contribution per million inference "
        f"tokens {_m(r.contribution_per_mtok_micros)}; break-even "
        + (f"[bold]{be:,}[/bold] tokens/month (this period: {r.inference_tokens:,})"
           if be is not None else "never at these prices (a token contributes nothing)"))
    out.print(_rows_table("by client", r.by_customer, first="client"))
    out.print(_rows_table("by model", r.by_model, first="model", per_mtok=True))
    out.print(_days(r))
    out.print(_devices(r))
    if r.requests:
        out.print(_rows_table(f"the {len(r.requests)} most costly requests", r.requests,
                              first="request", key=True))
        if any(row.stages for row in r.requests):
            out.print(_stages(r))
    if r.owners:
        out.print(_owners(r))


@costs_app.command("report")
@friendly
def report(
    period: str | None = PeriodOption,
    model_file: Path | None = ModelFileOption,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON"),
    wide: bool = typer.Option(False, "--wide", help="Also the detail: P&L by cost pool, by "
                                                   "client, model, day, device, request, owner"),
    requests: int = typer.Option(20, "--requests", min=0, max=10_000,
                                 help="How many of the most costly requests to list"),
    database: str | None = DatabaseOption,
) -> None:
    """The month: unit economics on variable cost, fixed costs budgeted against accrued,
    run-rate, break-even and fully loaded cost per million tokens (a closed month is read back
    as it was frozen). --wide adds every breakdown; --json has them all."""
    model = load_cost_model(model_file)
    body, pc = month_report(_sessions(database), _period(period), model, time.time(),
                            requests_shown=requests)
    if as_json:
        console.print_json(json.dumps(body))
        return
    console.print(f"cost model: {body['cost_model']}" + (
        f" [dim](closed {dt.datetime.fromtimestamp(body['closed_at_s'], dt.UTC):%Y-%m-%d}: "
        "read back as frozen)[/dim]" if body.get("closed_at_s") else ""))
    print_month(body)
    if wide and pc is not None:
        print_report(pc.report)
    elif wide:
        console.print("[dim]a closed month keeps its detail in --json[/dim]")


@costs_app.command("close")
@friendly
def close(
    period: str = typer.Argument(..., help="The month to close, YYYY-MM (it must have ended)"),
    model_file: Path | None = ModelFileOption,
    database: str | None = DatabaseOption,
) -> None:
    """Freeze a month that has ended: its report, FOCUS export and cost model are stored and read
    back from then on, whatever later edits of the cost model or late postings say."""
    body, new = close_month(_sessions(database), period, load_cost_model(model_file),
                            time.time())
    when = dt.datetime.fromtimestamp(body["closed_at_s"], dt.UTC).strftime("%Y-%m-%d %H:%M")
    console.print(f"{body['period']} {'closed' if new else 'was already closed'} ({when} UTC)")


@costs_app.command("export-focus")
@friendly
def export_focus(
    out: Path = typer.Option(..., "--out", help="The CSV file to write"),
    period: str | None = PeriodOption,
    model_file: Path | None = ModelFileOption,
    database: str | None = DatabaseOption,
) -> None:
    """Write the period's billing data as a FinOps FOCUS 1.2 CSV (checked before it is written)."""
    from sparecycles.costs import focus
    from sparecycles.store.costs_queries import CostQueries

    sessions = _sessions(database)
    frozen = CostQueries(sessions).closed_month(_period(period))
    if frozen is not None:  # a closed month's export is the one that was frozen
        text, currency = frozen.focus_csv, frozen.currency
    else:
        pc = period_costs(sessions, _period(period), load_cost_model(model_file))
        text, currency = pc.focus_csv(), pc.usage.currency
    header, rows = focus.read_csv(text)
    problems = focus.validate(header, rows)
    if problems:
        for p in problems[:20]:
            err_console.print(f"[red]FOCUS rule broken:[/red] {p}")
        raise typer.Exit(1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    console.print(f"{len(rows)} FOCUS {focus.FOCUS_VERSION} rows, billed "
                  f"{format_money(focus.billed_micros(rows), currency)}, written to {out}")


@costs_app.command("reconcile")
@friendly
def reconcile(
    period: str | None = PeriodOption,
    model_file: Path | None = ModelFileOption,
    as_json: bool = typer.Option(False, "--json", help="Print the reconciliation as JSON"),
    focus_file: Path | None = typer.Option(
        None, "--focus-file", help="The FOCUS CSV that was exported (and sent): read it back "
                                   "and check it (default: the export made now)"),
    database: str | None = DatabaseOption,
) -> None:
    """Metered usage, ledger postings, the FOCUS export and the report side by side; exit 1
    where they disagree."""
    try:
        focus_csv = focus_file.read_text(encoding="utf-8") if focus_file else None
    except (OSError, UnicodeDecodeError) as exc:
        err_console.print(f"[red]cannot read {focus_file}: {exc}[/red]")
        raise typer.Exit(1) from None
    _, rec = period_reconciliation(_sessions(database), _period(period),
                                   load_cost_model(model_file), focus_csv=focus_csv)
    if as_json:
        console.print_json(json.dumps(rec.as_dict()))
    else:
        t = Table(title=f"reconciliation of {rec.period} ({rec.currency})")
        for col in ("what", "metered", "ledger", "FOCUS", "report", ""):
            t.add_column(col, justify="left" if col == "what" else "right",
                         min_width=14 if col == "what" else None)
        for c in rec.checks:
            t.add_row(c.what, c.metered, c.ledger, c.focus, c.report,
                      "[green]✓[/green]" if c.ok else "[red]✗[/red]")
        console.print(t)
        for c in rec.checks:
            if not c.ok and c.note:
                err_console.print(f"[red]{c.what}:[/red] {c.note}")
    if not rec.ok:
        err_console.print("[red]the sources disagree[/red]")
        raise typer.Exit(1)
    if not as_json:
        console.print("[green]metering, ledger, FOCUS export and report agree[/green]")


@costs_app.command("estimate")
@friendly
def estimate_cmd(
    device: str = typer.Option("this", "--device", "-d",
                               help="this (measure), a device preset, or a profile JSON"),
    model: str = typer.Option(..., "--model", "-m", help="A model preset or a model directory"),
    hours_per_day: float = typer.Option(8.0, "--hours-per-day", min=0, max=24,
                                        help="Hours a day the device would be busy"),
    batch: int = typer.Option(4, "--batch", min=1, max=256),
    prompt_tokens: int = typer.Option(1000, "--prompt-tokens", min=1),
    output_tokens: int = typer.Option(200, "--output-tokens", min=1),
    tariff: str | None = typer.Option(None, "--tariff", help="Your electricity price per kWh"),
    hardware_price: str | None = typer.Option(None, "--hardware-price",
                                              help="What the device cost you"),
    life_hours: int | None = typer.Option(None, "--life-hours", min=1,
                                          help="Hours of full load it lasts"),
    model_file: Path | None = ModelFileOption,
    database: str | None = typer.Option(None, "--database",
                                        help="Read current prices from this coordinator "
                                             "database (default: the shipped prices)"),
) -> None:
    """Before joining: what this device would likely earn and cost you per busy hour and per
    month, from the performance model and current prices."""
    from sparecycles.cli.plan import resolve_device, resolve_model
    from sparecycles.costs.economics import estimate
    from sparecycles.ledger.pricing import PriceBook

    cm: CostModel = load_cost_model(model_file)
    spec, profile = resolve_model(model), resolve_device(device)
    book = PriceBook.default(cm.currency)
    if database:
        from sparecycles.ledger.service import Ledger

        book = Ledger(_sessions(database), currency=cm.currency).prices()
    hw = cm.owners.hardware_of(profile.device_class)
    hw = OwnerHardware(parse_money(hardware_price) if hardware_price else hw.price_micros,
                       life_hours or hw.life_hours)
    e = estimate(profile, spec, book, hours_per_day=hours_per_day, batch=batch,
                 prompt_tokens=prompt_tokens, output_tokens=output_tokens, hardware=hw,
                 tariff_micros_per_kwh=(parse_money(tariff) if tariff else
                                        cm.owners.electricity_price_per_kwh_micros))
    cur = cm.currency
    if e.batch == 0:
        console.print(f"[red]{spec.name} does not fit on this {profile.device_class}: it would "
                      "earn nothing here.[/red]")
        return
    t = Table(title=f"{spec.name} on a {profile.device_class}: per busy hour ({cur})")
    t.add_column("line")
    t.add_column("amount", justify="right")
    t.add_column("", style="cyan")
    lines = [("earned", e.earning_per_busy_hour_micros),
             (f"electricity ({e.power_busy_w:g} W at {format_money(e.tariff_micros_per_kwh)}"
              "/kWh)", -e.electricity_per_busy_hour_micros),
             (f"wear ({format_money(hw.price_micros)} over {hw.life_hours:,} h)",
              -e.wear_per_busy_hour_micros)]
    largest = max(abs(v) for _, v in lines)
    for label, v in lines:
        t.add_row(label, format_money(v), _bar(abs(v), largest))
    t.add_row("[bold]net per busy hour[/bold]", format_money(e.net_per_busy_hour_micros), "")
    console.print(t)
    console.print(
        f"at batch {e.batch}, {e.requests_per_busy_hour:,.0f} requests of {prompt_tokens} + "
        f"{output_tokens} tokens per busy hour at {format_money(e.price_per_request_micros)} "
        f"each (payout by {e.payout_mode}); busy {hours_per_day:g} h a day: about "
        f"[bold]{format_money(e.net_per_month_micros, cur)}[/bold] net a month")


def register(app: typer.Typer) -> None:
    app.add_typer(costs_app, name="costs")
