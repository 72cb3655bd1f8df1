"""A hostile node against the coordinator's socket handler, in-process (ASGI test client).

After a valid handshake, hypothesis sends sequences of frames: garbage, and well-typed messages
with hostile values (tokens and results for jobs it was never given, scores nobody asked for,
a second hello, extreme numbers). Whatever it sends, the coordinator must neither crash nor
stall: each connection ends in an orderly way, frames are handled quickly, dispatch keeps running
and an honest node can still connect.
"""

from __future__ import annotations

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from sparecycles import protocol
from sparecycles.api.app import create_app
from sparecycles.identity import NodeIdentity
from sparecycles.settings import CoordinatorSettings
from sparecycles.store import Store

frames_per_example_max = 12
sequence_s_max = 5.0  # a whole hostile sequence is handled within this


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    db = f"sqlite:///{tmp_path_factory.mktemp('sock') / 'db.sqlite'}"
    store = Store(db)
    store.migrate()
    token = store.create_node_token("mallory", "fuzz")
    app = create_app(CoordinatorSettings(database=db, heartbeat_timeout_s=2.0))
    with TestClient(app) as client:
        yield client, app.state.coordinator, token


def _hello(token: str, ident: NodeIdentity, nonce: str) -> str:
    return protocol.encode(protocol.Hello(
        token=token, public_key=ident.public_key_b64, name="fuzz",
        profile={"device_class": "laptop", "cpu_cores": 4, "ram_bytes": 1 << 30,
                 "memory_bandwidth_bytes_per_s": 1e9, "peak_flops": 1e9},
        models=[protocol.ModelOffer(name="tiny", weights_sha256="a" * 64)],
        nonce_signature=ident.sign(nonce.encode())))


ids = st.sampled_from(["job_1", "job_x", "scr_1", "", "a" * 40])
nums = st.integers(min_value=-(2**70), max_value=2**70)
floats = st.floats(allow_nan=True, allow_infinity=True)
token_ids = st.lists(nums, min_size=0, max_size=300)
metering = st.fixed_dictionaries({
    "prompt_tokens": nums, "completion_tokens": nums, "time_to_first_token_s": floats,
    "total_s": floats, "busy_s": floats})
messages = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=200).map(lambda b: b.decode("latin-1")),
    st.fixed_dictionaries({"type": st.just("tokens"), "job_id": ids, "attempt": nums,
                           "index": nums, "token_ids": token_ids,
                           "logprobs": st.none() | st.lists(floats, max_size=300)}),
    st.fixed_dictionaries({"type": st.just("done"), "job_id": ids, "attempt": nums,
                           "finish_reason": st.sampled_from(["stop", "length", "x"]),
                           "metering": metering, "output_sha256": st.just("0" * 64),
                           "signature": st.text(min_size=40, max_size=120)}),
    st.fixed_dictionaries({"type": st.just("scored"), "score_id": ids,
                           "logprobs": st.lists(floats, max_size=50),
                           "busy_s": floats, "error": st.none() | st.text(max_size=50)}),
    st.fixed_dictionaries({"type": st.just("heartbeat"), "active_jobs": nums,
                           "available": st.booleans(), "owner_load": floats,
                           "temperature_c": floats}),
    st.fixed_dictionaries({"type": st.just("job_error"), "job_id": ids, "attempt": nums,
                           "message": st.text(max_size=100)}),
    st.fixed_dictionaries({"type": st.just("draining"), "grace_s": floats}),
    st.fixed_dictionaries({"type": st.just("hello"), "token": st.text(max_size=20)}),
    st.dictionaries(st.text(max_size=10), nums | floats | st.text(max_size=10), max_size=5),
).map(lambda m: m if isinstance(m, str) else json.dumps(m))


@settings(deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.lists(messages, min_size=1, max_size=frames_per_example_max))
def test_a_hostile_node_cannot_crash_or_stall_the_coordinator(coordinator, frames) -> None:
    client, coord, token = coordinator
    ident = NodeIdentity.generate()
    started = time.monotonic()
    with client.websocket_connect(protocol.WS_PATH) as ws:
        challenge = json.loads(ws.receive_text())
        ws.send_text(_hello(token, ident, challenge["nonce"]))
        welcome = json.loads(ws.receive_text())
        assert welcome["type"] == "welcome", welcome
        for frame in frames:
            try:
                ws.send_text(frame)
            except Exception:  # the coordinator closed the socket: an orderly end
                break
    assert time.monotonic() - started < sequence_s_max
    assert client.get("/healthz").status_code == 200
    assert coord.dispatcher._task is not None and not coord.dispatcher._task.done()
    assert all(not t.done() for t in coord.verifier._workers)


def test_an_honest_node_still_gets_in_afterwards(coordinator) -> None:
    client, coord, token = coordinator
    ident = NodeIdentity.generate()
    with client.websocket_connect(protocol.WS_PATH) as ws:
        challenge = json.loads(ws.receive_text())
        ws.send_text(_hello(token, ident, challenge["nonce"]))
        assert json.loads(ws.receive_text())["type"] == "welcome"
        ws.send_text(protocol.encode(protocol.Heartbeat()))
        deadline = time.monotonic() + 5
        while ident.node_id not in coord.dispatcher.nodes and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ident.node_id in coord.dispatcher.nodes
