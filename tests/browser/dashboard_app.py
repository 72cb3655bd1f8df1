"""The dashboard application in process, over a coordinator stand-in, for the tests that drive
it through HTTP (no browser): the app, a sign-in, and the base URL its client uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sparecycles.api import errors
from sparecycles.api.dashboard import routes as dashboard
from sparecycles.ledger.service import Ledger
from sparecycles.store import Store

BASE = "http://testserver"


class FakeCoordinator:
    """What the dashboard reads of a coordinator: the store, the ledger, no live dispatch."""

    def __init__(self) -> None:
        self.store = Store("sqlite://")
        self.store.create_all()
        self.ledger = Ledger(self.store.sessions)
        self.dispatcher = None


def dashboard_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
                  ) -> tuple[FastAPI, FakeCoordinator]:
    """The dashboard's routes on a fresh in-memory store, with a one-server cost model."""
    model = tmp_path / "costs.toml"
    model.write_text('[[servers]]\nname = "coordinator"\nper_month = "30.00"\n')
    monkeypatch.setenv("SPARECYCLES_COST_MODEL", str(model))
    coord = FakeCoordinator()
    app = FastAPI()
    app.state.coordinator = coord
    errors.install(app)
    app.include_router(dashboard.router)
    return app, coord


def sign_in(client: TestClient, secret: str) -> TestClient:
    client.cookies.clear()
    page = client.get("/dashboard/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    r = client.post("/dashboard/login", data={"key": secret, "csrf": token[1]},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    return client
