"""Fixtures shared by the unit tests of dispatch and the fleet."""

from __future__ import annotations

import pytest

from sparecycles.ledger.pricing import PriceBook
from sparecycles.ledger.service import Ledger
from sparecycles.store import Store


@pytest.fixture
def world(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    store.create_all()
    ledger = Ledger(store.sessions, prices=PriceBook.default())
    client = store.ensure_client("acme")
    ledger.deposit(client, 10_000_000, reference="topup")
    owners = [store.ensure_owner("alice"), store.ensure_owner("bob")]
    return store, ledger, client, owners
