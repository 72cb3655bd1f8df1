"""``EventStreamResponse`` (api/sse.py): the bytes it writes, and a client that goes away.

Driven as the server drives it (scope, receive, send), so the disconnect is the server's own
``http.disconnect`` message: the stream's clean-up must run (that is where a job is cancelled and
charged for what was delivered), the response must end without an error, and a cancellation from
outside must still propagate.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from sparecycles.api.sse import FLUSH, EventStreamResponse

scope = {"type": "http", "method": "POST", "path": "/", "headers": [],
         "asgi": {"version": "3.0", "spec_version": "2.3"}}


class Client:
    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.gone = asyncio.Event()
        self.asked = 0

    async def receive(self) -> dict[str, Any]:
        self.asked += 1
        if self.asked == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await self.gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent
                        if m["type"] == "http.response.body")


def test_chunks_are_written_at_flushes_and_the_end() -> None:
    async def stream() -> AsyncIterator[str]:
        yield "data: 1\n\n"
        yield "data: 2\n\n"
        yield FLUSH
        yield "data: 3\n\n"
        yield "data: [DONE]\n\n"

    async def main() -> Client:
        client = Client()
        await EventStreamResponse(stream())(scope, client.receive, client.send)
        return client

    client = asyncio.run(main())
    bodies = [m for m in client.sent if m["type"] == "http.response.body"]
    assert [m["body"] for m in bodies] == [b"data: 1\n\ndata: 2\n\n",
                                           b"data: 3\n\ndata: [DONE]\n\n"]
    assert bodies[-1]["more_body"] is False


def test_a_client_that_goes_away_stops_the_stream_and_its_clean_up_runs() -> None:
    cleaned: list[str] = []

    async def stream() -> AsyncIterator[str]:
        try:
            yield "data: 1\n\n"
            yield FLUSH
            await asyncio.Event().wait()  # a node that never answers again
            yield "data: never\n\n"
        finally:
            await asyncio.sleep(0)  # the clean-up may await (dispatch's cancel does)
            cleaned.append("cancelled")

    async def main() -> Client:
        client = Client()
        response = asyncio.create_task(
            EventStreamResponse(stream())(scope, client.receive, client.send))
        while not client.body():
            await asyncio.sleep(0.001)
        client.gone.set()
        await asyncio.wait_for(response, 5)  # ends without an error
        return client

    client = asyncio.run(main())
    assert cleaned == ["cancelled"]
    assert client.body() == b"data: 1\n\n"


def test_a_cancellation_from_outside_still_propagates() -> None:
    async def stream() -> AsyncIterator[str]:
        yield FLUSH
        await asyncio.Event().wait()
        yield "data: never\n\n"

    async def main() -> None:
        client = Client()
        response = asyncio.create_task(
            EventStreamResponse(stream())(scope, client.receive, client.send))
        await asyncio.sleep(0.01)
        response.cancel()
        with pytest.raises(asyncio.CancelledError):
            await response
        # the disconnect listener is gone with it: nothing is left running
        await asyncio.sleep(0)
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert others == []

    asyncio.run(main())


@pytest.mark.parametrize("chat", [True, False])
def test_a_text_chunk_from_its_template_is_the_chunk_encoded_whole(chat: bool) -> None:
    from types import SimpleNamespace

    from sparecycles.api.openai_routes import _Reply, _sse

    job = SimpleNamespace(job_id="job_x")
    reply = _Reply(job, "tiny\"model", chat, 3, None, None, False)  # type: ignore[arg-type]
    for index in (0, 3):
        for text in ("hello", " \"quoted\"\n", "é中😀", "\x00", "\\u0000", "</script>"):
            choice = SimpleNamespace(index=index)
            want = _sse(reply._text_chunk(choice, text, None))  # type: ignore[arg-type]
            assert reply.text_sse(index, text) == want
