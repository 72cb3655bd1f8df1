"""The dashboard application in process, over a coordinator stand-in, for the tests that drive
it through HTTP (no browser): the app, a sign-in, and the base URL its client uses."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from sparecycles.api.dashboard import routes as dashboard
from standin_coordinator import FakeCoordinator, standin_app

BASE = "http://testserver"


def dashboard_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path
                  ) -> tuple[FastAPI, FakeCoordinator]:
    """The dashboard's routes on a fresh in-memory store, with a one-server cost model."""
    return standin_app(monkeypatch, tmp_path, dashboard.router)


def sign_in(client: TestClient, secret: str) -> TestClient:
    client.cookies.clear()
    page = client.get("/dashboard/login")
    token = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert token is not None
    r = client.post("/dashboard/login", data={"key": secret, "csrf": token[1]},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    return client
