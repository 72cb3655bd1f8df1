"""Bounded caches forget one entry at a time (least recently used) when full: the other
entries survive. A cache that emptied itself when full dropped every key's state at once."""

from __future__ import annotations

import pytest

from sparecycles.coordinator import service
from sparecycles.coordinator.service import Coordinator
from sparecycles.settings import CoordinatorSettings
from sparecycles.store import Store


def test_the_key_cache_forgets_one_key_when_full(tmp_path, monkeypatch: pytest.MonkeyPatch
                                                 ) -> None:
    monkeypatch.setattr(service, "key_cache_entries_max", 4)
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = Store(url)
    store.create_all()
    coord = Coordinator(CoordinatorSettings(database=url, verification=False), store=store)
    secrets = [store.create_api_key("acme", f"k{i}")[1] for i in range(5)]
    for secret in secrets:
        assert coord.authenticate(secret) is not None
    assert [coord.cached_key(s)[0] for s in secrets] == [False, True, True, True, True]
    coord.forget_keys()  # a revocation still empties it at once
    assert not any(coord.cached_key(s)[0] for s in secrets)
