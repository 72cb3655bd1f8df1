"""The admin cost routes on the in-memory store: admin scope required, JSON report, FOCUS CSV,
reconciliation."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from sparecycles.api import costs_routes
from sparecycles.costs import focus
from sparecycles.ledger.service import WorkShare
from standin_coordinator import standin_app


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    app, coord = standin_app(monkeypatch, tmp_path, costs_routes.router)
    _, admin = coord.store.create_api_key("ops", "admin", scopes=("admin",))
    _, user = coord.store.create_api_key("acme", "prod")
    client_id = coord.store.ensure_client("acme")
    owner_id = coord.store.ensure_owner("alice")
    now = time.time()
    coord.store.insert_job(id="job-1", client_id=client_id, model="tiny",
                           endpoint="chat.completions", state="done", prompt_tokens=10,
                           max_tokens=20, completion_tokens=20, created_at_s=now,
                           finished_at_s=now)
    coord.ledger.deposit(client_id, 1_000_000, "top-up")
    coord.ledger.hold("job-1", client_id, "tiny", 10, 20)
    coord.ledger.settle("job-1", client_id, "tiny", 10, 20,
                        [WorkShare(owner_id, "node-1", "laptop", 10, 20)])
    with TestClient(app) as client:
        yield client, {"Authorization": f"Bearer {admin}"}, {"Authorization": f"Bearer {user}"}
    coord.store.close()


def test_admin_scope_required(api):
    client, _, user = api
    assert client.get("/v1/admin/costs/report").status_code == 401
    r = client.get("/v1/admin/costs/report", headers=user)
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error"


def test_report_focus_and_reconcile(api):
    client, admin, _ = api
    period = time.strftime("%Y-%m", time.gmtime())
    r = client.get("/v1/admin/costs/report", params={"period": period}, headers=admin)
    assert r.status_code == 200
    body = r.json()
    assert body["period"] == period and body["summary"]["requests"] == 1
    # 10 x 0.06 + 20 x 0.18 per million tokens = 4.2 micro-units, rounded up
    assert body["summary"]["revenue_micros"] == 5
    assert body["conservation"]["holds"] is True
    assert body["conservation"]["total_micros"] == 30_000_000 + 4  # the server + 80 % of 5
    r = client.get("/v1/admin/costs/focus.csv", params={"period": period}, headers=admin)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    header, rows = focus.read_csv(r.text)
    assert focus.validate(header, rows) == [] and focus.billed_micros(rows) == 5
    # split by list amount, 0.6 : 3.6 micro-units: input 1, output 4 (largest remainder)
    assert [(r["SkuMeter"], r["BilledCost"], r["ListCost"]) for r in rows] == [
        ("Input Tokens", "0.000001", "0.0000006"), ("Output Tokens", "0.000004", "0.0000036")]
    r = client.get("/v1/admin/costs/reconcile", params={"period": period}, headers=admin)
    assert r.status_code == 200 and r.json()["ok"] is True, r.json()


def test_a_bad_period_is_a_400(api):
    client, admin, _ = api
    r = client.get("/v1/admin/costs/report", params={"period": "November"}, headers=admin)
    assert r.status_code == 400
    r = client.get("/v1/admin/costs/report", params={"period": "2026-13"}, headers=admin)
    assert r.status_code == 400 and "month" in r.json()["error"]["message"]
