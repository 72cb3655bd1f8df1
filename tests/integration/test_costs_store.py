"""The cost engine against a real database: jobs and attempts written through the Store, money
through the real Ledger API, then the report, the FOCUS export, the reconciliation and the CLI.

Runs on an SQLite file, and on PostgreSQL at 127.0.0.1:5432 in a schema of its own when it
answers (marked ``postgres``).
"""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from pathlib import Path

import pytest
import typer
from sqlalchemy import create_engine, text
from typer.testing import CliRunner

from sparecycles.cli import costs as costs_cli
from sparecycles.costs import focus
from sparecycles.costs.costmodel import parse_cost_model
from sparecycles.costs.period import period_costs, period_reconciliation
from sparecycles.ledger.pricing import ModelPrice, PriceBook
from sparecycles.ledger.service import Ledger, WorkShare
from sparecycles.store import Store

D = 1_000_000
PG = "postgresql://postgres@127.0.0.1:5432/test"
MODEL_TOML = """
[[servers]]
name = "coordinator"
per_month = "30.00"
[[people]]
name = "on-call"
hours = 10
rate_per_hour = "20.00"
shares = { inference = 3, training = 1 }
"""


def ts(month: int, day: int, hour: int = 12) -> float:
    return datetime(2026, month, day, hour, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request, tmp_path: Path):
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/costs.db"
        return
    try:
        admin = create_engine(PG.replace("postgresql://", "postgresql+psycopg://"))
        schema = f"costs_{secrets.token_hex(4)}"
        with admin.begin() as c:
            c.execute(text(f"CREATE SCHEMA {schema}"))
    except Exception as exc:  # no server here: the SQLite run still covers the code
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    yield f"{PG}?options=-csearch_path%3D{schema}"
    with admin.begin() as c:
        c.execute(text(f"DROP SCHEMA {schema} CASCADE"))
    admin.dispose()


@pytest.fixture
def world(url: str):
    """November 2026: three settled jobs, one refunded in part, one that failed with nothing
    delivered, one training job; a cost booked in the ledger; in December a refund of a
    November job."""
    store = Store(url)
    store.migrate()
    clock = Clock(ts(11, 5))
    prices = PriceBook.default().with_price("small", ModelPrice(100_000, 300_000))
    ledger = Ledger(store.sessions, prices=prices, clock=clock)
    acme, beta = store.ensure_client("acme"), store.ensure_client("beta")
    key_id, _ = store.create_api_key("acme", "prod")
    alice, bob = store.ensure_owner("alice"), store.ensure_owner("bob")
    profiles = {
        "node-a": (alice, {"device_class": "gaming-pc", "power_busy_w": 250.0,
                           "electricity_price_micros_per_kwh": 300_000}),
        "node-b": (bob, {"device_class": "laptop", "power_busy_w": 45.0}),
    }
    for node_id, (owner, profile) in profiles.items():
        store.node_connected(node_id=node_id, owner_id=owner, name=node_id, public_key="k",
                             profile=profile, models=[], availability={}, agent_version="t",
                             replica_id="r")
    ledger.deposit(acme, 50 * D, "acme-topup")
    ledger.deposit(beta, 50 * D, "beta-topup")

    def job(jid: str, client: str, day: int, prompt: int, out: int, nodes: list[str],
            workload: str = "inference", key: str | None = None) -> None:
        clock.t = ts(11, day)
        store.insert_job(id=jid, client_id=client, api_key_id=key, model="small",
                         endpoint="chat.completions", workload=workload, state="streaming",
                         prompt_tokens=prompt, max_tokens=out + 10, created_at_s=clock.t)
        ledger.hold(jid, client, "small", prompt, out + 10)
        shares = []
        for i, node in enumerate(nodes, start=1):
            part = out // len(nodes)
            store.start_attempt(job_id=jid, attempt=i, node_id=node, prompt_tokens=prompt)
            store.end_attempt(jid, i, outcome="done", completion_tokens=part, busy_s=2.5 * part,
                              energy_j=100.0 * part, energy_source="estimated")
            owner, profile = profiles[node]
            shares.append(WorkShare(owner, node, profile["device_class"], prompt, part))
        if out:
            ledger.settle(jid, client, "small", prompt, out, shares)
        else:
            ledger.void(jid)
        store.update_job(jid, state="done" if out else "failed", completion_tokens=out,
                         finished_at_s=clock.t + 1)

    job("j1", acme, 3, 1000, 200, ["node-a"], key=key_id)
    job("j2", acme, 3, 500, 100, ["node-a", "node-b"], key=key_id)
    job("j3", beta, 9, 2000, 400, ["node-b"])
    job("j4", beta, 9, 50, 0, ["node-b"])  # nothing delivered: voided
    job("j5", acme, 10, 300, 60, ["node-a"], workload="training")
    clock.t = ts(11, 20)
    ledger.withhold("j2", "verification failed", node_id="node-b")
    ledger.record_cost("fees-2026-11", "payment_fees", 1 * D)
    ledger.record_cost("lab-2026-11", "rnd", 2 * D, cogs=False)
    clock.t = ts(12, 2)
    ledger.withhold("j3", "verification failed late")
    yield store, ledger, url
    store.close()


MODEL = parse_cost_model(__import__("tomllib").loads(MODEL_TOML), "test")


def test_report_reads_what_the_ledger_posted(world):
    store, ledger, _ = world
    pc = period_costs(store.sessions, "2026-11", MODEL)
    r = pc.report
    jobs = {j.job_id: j for j in pc.usage.jobs}
    assert set(jobs) == {"j1", "j2", "j3", "j4", "j5"}
    assert jobs["j4"].state == "failed" and not jobs["j4"].billed
    charges = {j: ledger.job_money(j)["charged_micros"] for j in jobs}
    # 0.10 in / 0.30 out per million tokens: j1 = 1000 x 0.1 + 200 x 0.3 = 160 micro-units
    assert charges == {"j1": 160, "j2": 80, "j3": 320, "j4": 0, "j5": 48}
    withheld = ledger.job_money("j2")["withheld_micros"]
    assert jobs["j2"].refund_micros == withheld > 0
    assert r.revenue_micros == 160 + 80 + 320 + 48 - withheld
    earned = {(j.job_id, e.node_id): e.amount_micros for j in jobs.values() for e in j.earnings}
    assert earned[("j2", "node-b")] == 0 and earned[("j1", "node-a")] == 128
    assert {c.category for c in pc.usage.ledger_costs} == {"payment_fees", "rnd"}
    assert r.allocated_micros + r.idle_total_micros + r.unallocated_total_micros \
        == r.total_cost_micros
    # the coordinator, the on-call person (200.00, 3:1), the ledger's costs and the earnings
    assert r.total_cost_micros == 30 * D + 200 * D + 3 * D + sum(earned.values())
    assert r.unallocated_micros == {"rnd": {"ledger:rnd": 2 * D}}  # no R&D job ran
    by = {o.node_id: o for o in r.owners}
    assert by["node-a"].tariff_micros_per_kwh == 300_000 and by["node-a"].figures_from == "node"
    assert by["node-b"].figures_from == "defaults"


def test_focus_export_and_reconciliation_agree(world):
    store, _, _ = world
    pc, rec = period_reconciliation(store.sessions, "2026-11", MODEL)
    assert rec.ok, [c for c in rec.checks if not c.ok]
    header, rows = focus.read_csv(pc.focus_csv())
    assert focus.validate(header, rows) == []
    assert focus.billed_micros(rows) == pc.report.revenue_micros
    sub = {r["SubAccountId"] for r in rows}
    assert any(s and s.startswith("key_") for s in sub)
    dec, rec_dec = period_reconciliation(store.sessions, "2026-12", MODEL)
    assert rec_dec.ok, [c for c in rec_dec.checks if not c.ok]
    (corr,) = focus.read_csv(dec.focus_csv())[1]
    assert corr["ChargeClass"] == "Correction" and corr["BilledCost"] == "-0.000256"
    assert dec.report.revenue_micros == -256  # j3's earning (80 % of 320) refunded to beta


def test_a_tampered_posting_is_caught(world):
    store, _, _ = world
    with store.engine.begin() as c:
        c.execute(text("UPDATE ledger_transfers SET amount_micros = amount_micros + 7 "
                       "WHERE id = 'job:j1:post'"))
    _, rec = period_reconciliation(store.sessions, "2026-11", MODEL)
    bad = {c.what for c in rec.checks if not c.ok}
    assert not rec.ok
    assert "charges = tokens x admission price" in bad
    assert "charges = earnings + fees" in bad


def test_ledger_postings_without_a_job_row_are_seen(world):
    """A charge posted for a request the jobs table does not have was invisible to both the
    report and the reconciliation (both start from the jobs): it must show and fail."""
    store, ledger, _ = world
    ledger.clock.t = ts(11, 15)  # type: ignore[attr-defined]
    ledger.hold("ghost", store.ensure_client("acme"), "small", 100, 10)
    ledger.settle("ghost", store.ensure_client("acme"), "small", 100, 10, [])
    pc, rec = period_reconciliation(store.sessions, "2026-11", MODEL)
    kinds = {o.kind: o for o in pc.report.orphans}
    assert "post" in kinds and kinds["post"].job_ids == ("ghost",)
    (line,) = [c for c in rec.checks if c.what == "ledger postings with no request row"]
    assert not line.ok and not rec.ok and "ghost" in line.note
    assert pc.report.as_dict()["orphan_postings"][0]["kind"] in kinds


def test_reconcile_reads_the_exported_file_back(world):
    store, _, _ = world
    pc, _ = period_reconciliation(store.sessions, "2026-11", MODEL)
    sent = pc.focus_csv()
    _, rec = period_reconciliation(store.sessions, "2026-11", MODEL, focus_csv=sent)
    assert rec.ok
    _, rows = focus.read_csv(sent)
    rows[0]["BilledCost"] = focus.money(focus._micros(rows[0]["BilledCost"]) + 1)
    rows[0]["EffectiveCost"] = rows[0]["BilledCost"]
    _, rec = period_reconciliation(store.sessions, "2026-11", MODEL,
                                   focus_csv=focus.to_csv(rows))
    assert {c.what for c in rec.checks if not c.ok} == {"revenue (charges - refunds)"}
    _, rec = period_reconciliation(store.sessions, "2026-11", MODEL, focus_csv="a,b\n1,2\n")
    assert not rec.ok and rec.checks[0].what == "FOCUS file readable"


def test_a_closed_month_is_read_back_not_recomputed(world, tmp_path: Path):
    """Closing freezes a month: after the cost model changes (even backdated) and a late
    posting, its report renders byte for byte as it was, and its FOCUS export is the frozen
    one."""
    store, ledger, url = world
    model_file = tmp_path / "costs.toml"
    model_file.write_text(MODEL_TOML)
    app = typer.Typer()
    costs_cli.register(app)
    runner = CliRunner()
    common = ["--database", url, "--model-file", str(model_file)]
    r = runner.invoke(app, ["costs", "close", "2026-11", *common])
    assert r.exit_code == 0 and "2026-11 closed" in r.output, r.output
    before = runner.invoke(app, ["costs", "report", "--period", "2026-11", *common]).output
    before_json = runner.invoke(app, ["costs", "report", "--json", "--period", "2026-11",
                                      *common]).output
    focus_before = tmp_path / "a.csv"
    runner.invoke(app, ["costs", "export-focus", "--out", str(focus_before), "--period",
                        "2026-11", *common])
    model_file.write_text(MODEL_TOML.replace('"30.00"', '"90.00"'))  # rewrites history
    ledger.clock.t = ts(11, 25)  # type: ignore[attr-defined]
    ledger.record_cost("late-fee", "payment_fees", 5 * D)
    after = runner.invoke(app, ["costs", "report", "--period", "2026-11", *common]).output
    after_json = runner.invoke(app, ["costs", "report", "--json", "--period", "2026-11",
                                     *common]).output
    assert after.split("\n", 1)[1] == before.split("\n", 1)[1]  # all but the model's path
    assert after_json == before_json
    focus_after = tmp_path / "b.csv"
    runner.invoke(app, ["costs", "export-focus", "--out", str(focus_after), "--period",
                        "2026-11", *common])
    assert focus_after.read_bytes() == focus_before.read_bytes()
    recomputed = period_costs(store.sessions, "2026-11", parse_cost_model(
        __import__("tomllib").loads(MODEL_TOML.replace('"30.00"', '"90.00"')), "x"))
    assert recomputed.report.total_cost_micros != json.loads(before_json)["summary"][
        "total_cost_micros"]  # so the month was read back, not recomputed
    r = runner.invoke(app, ["costs", "close", "2026-11", *common])
    assert r.exit_code == 0 and "already closed" in r.output
    r = runner.invoke(app, ["costs", "close", "2999-01", *common])
    assert r.exit_code == 1 and "has not ended" in r.output


def test_the_cli(world, tmp_path: Path):
    store, _, url = world
    model_file = tmp_path / "costs.toml"
    model_file.write_text(MODEL_TOML)
    app = typer.Typer()
    costs_cli.register(app)
    runner = CliRunner()
    common = ["--period", "2026-11", "--database", url, "--model-file", str(model_file)]
    r = runner.invoke(app, ["costs", "report", "--json", *common])
    assert r.exit_code == 0, r.output
    body = json.loads(r.output)
    assert body["conservation"]["holds"] is True and body["summary"]["requests"] == 5
    r = runner.invoke(app, ["costs", "report", *common])
    assert r.exit_code == 0 and "break-even" in r.output and "contribution" in r.output
    assert "gross margin" not in r.output  # the absorbed P&L is the --wide detail
    r = runner.invoke(app, ["costs", "report", "--wide", *common])
    assert r.exit_code == 0 and "gross margin" in r.output
    out = tmp_path / "focus.csv"
    r = runner.invoke(app, ["costs", "export-focus", "--out", str(out), *common])
    assert r.exit_code == 0, r.output
    assert focus.validate(*focus.read_csv(out.read_text())) == []
    r = runner.invoke(app, ["costs", "reconcile", *common])
    assert r.exit_code == 0 and "agree" in r.output, r.output
    r = runner.invoke(app, ["costs", "reconcile", "--focus-file", str(out), *common])
    assert r.exit_code == 0 and "agree" in r.output, r.output
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:1] + lines[2:]))  # a row lost on the way
    r = runner.invoke(app, ["costs", "reconcile", "--focus-file", str(out), *common])
    assert r.exit_code == 1, r.output
    with store.engine.begin() as c:
        c.execute(text("UPDATE jobs SET completion_tokens = 999 WHERE id = 'j3'"))
    r = runner.invoke(app, ["costs", "reconcile", *common])
    assert r.exit_code == 1
    r = runner.invoke(app, ["costs", "report", "--period", "Nov", "--database", url])
    assert r.exit_code == 1 and "month like" in r.output
    r = runner.invoke(app, ["costs", "estimate", "--device", "gaming-pc", "--model",
                            "qwen2.5-0.5b", "--model-file", str(model_file)])
    assert r.exit_code == 0 and "net per busy hour" in r.output, r.output


def test_a_chain_job_is_read_and_costed_per_stage(world):
    """A job served by two stages (node-a layers 0:2, node-b 2:4): the attempts' rows keep
    their layers and work share, and the report lists the job's COGS per stage, each stage's
    owner payout being its earning as the ledger posted it."""
    store, ledger, _ = world
    acme = store.ensure_client("acme")
    owners = {"node-a": store.ensure_owner("alice"), "node-b": store.ensure_owner("bob")}
    store.insert_job(id="j6", client_id=acme, model="small", endpoint="completions",
                     state="streaming", prompt_tokens=400, max_tokens=100,
                     created_at_s=ts(11, 15))
    ledger.hold("j6", acme, "small", 400, 100)
    for i, (node, layers) in enumerate((("node-a", (0, 2)), ("node-b", (2, 4))), start=1):
        store.start_attempt(job_id="j6", attempt=i, node_id=node, prompt_tokens=400,
                            layers=layers, work_ppm=500_000)
        store.end_attempt("j6", i, outcome="done", completion_tokens=90, busy_s=4.0)
    ledger.settle("j6", acme, "small", 400, 90, [
        WorkShare(owners[n], n, "pc", 400, 90, work_ppm=500_000) for n in ("node-a", "node-b")])
    store.update_job("j6", state="done", completion_tokens=90, finished_at_s=ts(11, 15) + 1)
    pc = period_costs(store.sessions, "2026-11", MODEL)
    job = next(j for j in pc.usage.jobs if j.job_id == "j6")
    assert [(a.node_id, a.layers, a.work_ppm) for a in job.attempts] == [
        ("node-a", (0, 2), 500_000), ("node-b", (2, 4), 500_000)]
    whole = next(j for j in pc.usage.jobs if j.job_id == "j1")
    assert [(a.layers, a.work_ppm) for a in whole.attempts] == [(None, 1_000_000)]
    row = next(r for r in pc.report.requests if r.key == "j6")
    earned = ledger.job_money("j6")["earnings"]
    assert [(s.node_id, s.layers, s.earning_micros) for s in row.stages] == [
        ("node-a", (0, 2), earned["node-a"]), ("node-b", (2, 4), earned["node-b"])]
    assert earned["node-a"] == earned["node-b"] > 0
    assert sum(s.cogs_total_micros for s in row.stages) == row.cogs_total_micros
