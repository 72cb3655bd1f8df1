"""Who decides what is COGS: the platform (the client's key), never the request body.

Any key could once send ``"workload": "training"`` and move its own owner payouts, energy and
share of servers and staff out of cost of goods sold. Here the route runs with a fake
coordinator whose dispatcher records what it was asked to admit.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from routes_coordinator import RecordingCoordinator

from sparecycles.api import errors, openai_routes
from sparecycles.types import Workload


@pytest.fixture
def api():
    coord = RecordingCoordinator()
    app = FastAPI()
    app.state.coordinator = coord
    errors.install(app)
    app.include_router(openai_routes.router)
    _, user = coord.store.create_api_key("acme", "prod")
    _, lab = coord.store.create_api_key("lab", "rl", ("inference", "workload:training"))
    with TestClient(app) as client:
        yield client, coord, user, lab
    coord.store.close()


def _post(client: TestClient, key: str, **extra: Any) -> Any:
    return client.post("/v1/completions", headers={"Authorization": f"Bearer {key}"},
                       json={"model": "tiny", "prompt": [1, 2, 3], "max_tokens": 4, **extra})


@pytest.mark.parametrize("workload", ["training", "rnd"])
def test_an_ordinary_key_cannot_name_another_workload(api, workload: str) -> None:
    client, coord, user, _lab = api
    r = _post(client, user, workload=workload)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == "workload"
    assert coord.admitted == []  # refused before anything was held


def test_the_key_decides_the_workload(api) -> None:
    client, coord, user, lab = api
    assert _post(client, user).status_code == 503  # reached dispatch (no node here)
    assert _post(client, user, workload="inference").status_code == 503  # says what it is
    assert _post(client, lab).status_code == 503  # an internal account's key: training
    assert _post(client, lab, workload="training").status_code == 503
    assert _post(client, lab, workload="inference").status_code == 400  # nor the other way
    assert [a["workload"] for a in coord.admitted] == [
        Workload.INFERENCE, Workload.INFERENCE, Workload.TRAINING, Workload.TRAINING]
