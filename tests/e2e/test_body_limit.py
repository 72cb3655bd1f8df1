"""A body over the limit gets 413 in OpenAI's error shape, whatever way the client sends it.

The real coordinator app is served by uvicorn on loopback (in a thread, once for the module), and
driven by clients that send the whole body before they read (Python's urllib), by httpx with a
declared length and by httpx streaming the body in chunks (no length). A server that answered
before reading and then closed the socket with the upload unread made the first kind see
"connection reset" instead of the 413.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import httpx
import pytest
import uvicorn

from sparecycles import limits
from sparecycles.api.app import create_app
from sparecycles.settings import CoordinatorSettings
from sparecycles.store import Store

pytestmark = pytest.mark.timeout(120)

BIG = 2_000_000  # twice the limit
server_start_s_max = 30.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    db = f"sqlite:///{tmp_path_factory.mktemp('body-limit') / 'db.sqlite'}"
    port = _free_port()
    app = create_app(CoordinatorSettings(database=db, port=port, verification=False))
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + server_start_s_max
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    _key_id, key = Store(db).create_api_key("acme", "body-limit")  # the schema is the app's
    try:
        yield f"http://127.0.0.1:{port}", key
    finally:
        srv.should_exit = True
        thread.join(timeout=10)


def _assert_413(status: int, body: bytes) -> None:
    assert status == 413, body[:200]
    err = json.loads(body)["error"]
    assert set(err) >= {"message", "type", "param", "code"}
    assert err["code"] == "request_too_large" and err["type"] == "invalid_request_error"
    assert str(limits.request_body_bytes_max) in err["message"]


def _chat_body(size: int) -> bytes:
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "x"}]}).encode()
    return body[:-1] + b" " * (size - len(body)) + b"}"


@pytest.mark.parametrize("size", [BIG, BIG, BIG, 8_000_000])  # 2 MB was reset at times, 8 MB always
def test_urllib_sending_the_whole_body_first_gets_the_413(server: tuple[str, str], size: int
                                                          ) -> None:
    url, key = server
    request = urllib.request.Request(
        url + "/v1/chat/completions", data=_chat_body(size), method="POST",
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    _assert_413(info.value.code, info.value.read())


def test_httpx_with_a_declared_length_gets_the_413(server: tuple[str, str]) -> None:
    url, key = server
    with httpx.Client(timeout=30) as client:
        r = client.post(url + "/v1/chat/completions", content=_chat_body(BIG),
                        headers={"Authorization": f"Bearer {key}",
                                 "Content-Type": "application/json"})
        _assert_413(r.status_code, r.content)
        assert client.get(url + "/healthz").status_code == 200  # the connection lives on


def test_httpx_streaming_chunks_without_a_length_gets_the_413(server: tuple[str, str]) -> None:
    url, key = server
    body = _chat_body(BIG)

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 64 * 1024):
            yield body[i:i + 64 * 1024]

    with httpx.Client(timeout=30) as client:
        r = client.post(url + "/v1/chat/completions", content=chunks(),
                        headers={"Authorization": f"Bearer {key}",
                                 "Content-Type": "application/json"})
        _assert_413(r.status_code, r.content)
        assert client.get(url + "/healthz").status_code == 200


def test_a_body_within_the_limit_is_read_as_usual(server: tuple[str, str]) -> None:
    url, key = server
    r = httpx.post(url + "/v1/chat/completions", content=_chat_body(10_000), timeout=30,
                   headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    assert r.status_code == 404 and "does not exist" in r.json()["error"]["message"]  # no model


def test_a_client_waiting_for_100_continue_gets_the_413_at_once(server: tuple[str, str]
                                                                 ) -> None:
    """It has sent no body yet: nothing to drain, the answer comes before any upload."""
    url, key = server
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall((f"POST /v1/chat/completions HTTP/1.1\r\nHost: {host}\r\n"
                   f"Authorization: Bearer {key}\r\nContent-Type: application/json\r\n"
                   f"Content-Length: {BIG}\r\nExpect: 100-continue\r\n\r\n").encode())
        reply = b""
        while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
            chunk = s.recv(65536)
            if not chunk:
                break
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    _assert_413(413, body)
