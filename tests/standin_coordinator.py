"""A coordinator stand-in for tests that drive the API's routes in process (no dispatch, no
nodes): the store and the ledger on a fresh in-memory database, and an app serving the routes
given over it, with a one-server cost model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI

from sparecycles.api import errors
from sparecycles.ledger.service import Ledger
from sparecycles.store import Store


class FakeCoordinator:
    """What the admin and dashboard routes read of a coordinator: the store, the ledger, key
    checks without a cache, no live dispatch."""

    def __init__(self) -> None:
        self.store = Store("sqlite://")
        self.store.create_all()
        self.ledger = Ledger(self.store.sessions)
        self.dispatcher = None

    def cached_key(self, secret: str) -> tuple[bool, Any]:
        return False, None  # no cache: every request asks authenticate

    def authenticate(self, secret: str) -> Any:
        return self.store.authenticate_key(secret)


def standin_app(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, router: APIRouter
                ) -> tuple[FastAPI, FakeCoordinator]:
    """``router``'s routes, with the API's error handlers, over a fresh stand-in."""
    model = tmp_path / "costs.toml"
    model.write_text('[[servers]]\nname = "coordinator"\nper_month = "30.00"\n')
    monkeypatch.setenv("SPARECYCLES_COST_MODEL", str(model))
    coord = FakeCoordinator()
    app = FastAPI()
    app.state.coordinator = coord
    errors.install(app)
    app.include_router(router)
    return app, coord
