"""A node's silence deadline (``api/node_ws._serve``): moved on by its messages, enforced when it
falls silent. The deadline is one timer per socket, moved at most every ``deadline_step_s``."""

from __future__ import annotations

import json
import time

import pytest
from starlette.testclient import TestClient

from sparecycles import protocol
from sparecycles.api import node_ws
from sparecycles.api.app import create_app
from sparecycles.identity import NodeIdentity
from sparecycles.settings import CoordinatorSettings
from sparecycles.store import Store

timeout_s = 0.5


@pytest.fixture()
def coordinator(tmp_path, monkeypatch):
    monkeypatch.setattr(node_ws, "deadline_step_s", 0.1)
    db = f"sqlite:///{tmp_path / 'db.sqlite'}"
    store = Store(db)
    store.migrate()
    token = store.create_node_token("olga", "laptop")
    app = create_app(CoordinatorSettings(database=db, heartbeat_timeout_s=timeout_s))
    with TestClient(app) as client:
        yield client, app.state.coordinator, token


def _connect(ws, token: str, ident: NodeIdentity) -> None:
    challenge = json.loads(ws.receive_text())
    ws.send_text(protocol.encode(protocol.Hello(
        token=token, public_key=ident.public_key_b64, name="n",
        profile={"device_class": "laptop", "cpu_cores": 4, "ram_bytes": 1 << 30,
                 "memory_bandwidth_bytes_per_s": 1e9, "peak_flops": 1e9},
        models=[], nonce_signature=ident.sign(challenge["nonce"].encode()))))
    assert json.loads(ws.receive_text())["type"] == "welcome"


def _wait(condition, bound_s: float = 10.0) -> bool:
    deadline = time.monotonic() + bound_s
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)
    return condition()


def test_a_node_that_keeps_talking_stays_for_longer_than_the_timeout(coordinator) -> None:
    client, coord, token = coordinator
    ident = NodeIdentity.generate()
    with client.websocket_connect(protocol.WS_PATH) as ws:
        _connect(ws, token, ident)
        assert _wait(lambda: ident.node_id in coord.dispatcher.nodes)
        for _ in range(int(4 * timeout_s / 0.1)):  # four timeouts long, a message every 0.1 s
            ws.send_text(protocol.encode(protocol.Heartbeat()))
            time.sleep(0.1)
        assert ident.node_id in coord.dispatcher.nodes


def test_a_silent_node_is_dropped(coordinator) -> None:
    client, coord, token = coordinator
    ident = NodeIdentity.generate()
    with client.websocket_connect(protocol.WS_PATH) as ws:
        _connect(ws, token, ident)
        ws.send_text(protocol.encode(protocol.Heartbeat()))
        assert _wait(lambda: ident.node_id in coord.dispatcher.nodes)
        assert _wait(lambda: ident.node_id not in coord.dispatcher.nodes)
