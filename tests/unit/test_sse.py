"""EventStreamResponse: the same bytes as a plain streaming response, in fewer writes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse

from sparecycles.api.sse import FLUSH, EventStreamResponse


def _writes(response: StreamingResponse) -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(response.stream_response(send))
    return sent


async def _chunks(items: list[str]) -> AsyncIterator[str]:
    for item in items:
        yield item


def _body(sent: list[dict[str, Any]]) -> bytes:
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_chunks_between_flushes_go_out_in_one_write_and_the_end_rides_with_the_last() -> None:
    items = ["data: role\n\n", "data: a\n\n", FLUSH, "data: b\n\n", FLUSH, FLUSH,
             "data: é\n\n", "data: finish\n\n", "data: [DONE]\n\n"]
    sent = _writes(EventStreamResponse(_chunks(items)))
    plain = _writes(StreamingResponse(_chunks([i for i in items if i is not FLUSH])))
    assert _body(sent) == _body(plain)  # the client reads the same bytes
    bodies = [m for m in sent if m["type"] == "http.response.body"]
    assert [m["body"] for m in bodies] == [
        b"data: role\n\ndata: a\n\n", b"data: b\n\n",
        "data: é\n\ndata: finish\n\ndata: [DONE]\n\n".encode()]
    assert [m["more_body"] for m in bodies] == [True, True, False]
    assert len(plain) == len(items) - 3 + 2  # start, one write per chunk, the empty end
    assert sent[0]["type"] == "http.response.start"
    assert dict(sent[0]["headers"])[b"content-type"].startswith(b"text/event-stream")


def test_an_empty_stream_still_ends_the_body() -> None:
    sent = _writes(EventStreamResponse(_chunks([FLUSH])))
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    assert sent[1] == {"type": "http.response.body", "body": b"", "more_body": False}


def test_a_flush_marker_is_only_the_marker_itself() -> None:
    sent = _writes(EventStreamResponse(_chunks(["", "x", FLUSH])))
    assert _body(sent) == b"x"
