"""Server-sent events in as few socket writes as the stream allows.

Each write to a client's socket is a system call (tens of microseconds on a VM), and a streamed
answer used to make one per chunk: the role chunk, every token chunk, the finish chunk, the usage
chunk, ``[DONE]`` and the end of the body, each its own write. ``EventStreamResponse`` keeps what
the stream yields in a buffer and writes it out only when the stream says it is about to wait
(it yields ``FLUSH``) or ends: chunks produced together (the role chunk and the first tokens;
several token messages that queued while the event loop was busy; the finish, usage and
``[DONE]``) go out in one write, and nothing waits longer than it did before, since a flush comes
before every wait. The end of the body rides with the last chunks.

A client that goes away is still noticed as before, so its job is cancelled and charged only for
what was delivered: a task waits for the server's ``http.disconnect`` and cancels the stream, as
Starlette's own listener does, but with plain asyncio. Starlette runs its listener in an anyio
task group whose cancel scope, when the stream ends, formats the running task's ``repr`` into its
reason (anyio 4.16): the callbacks' source lines looked up through ``inspect``, ~5 % of the
coordinator's CPU at 8 streams (docs/benchmarks.md, issue 19, third pass).
"""

from __future__ import annotations

import asyncio

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send


class _Flush(str):
    """The marker a stream yields before it waits: write out what it produced so far."""


FLUSH: str = _Flush()


class EventStreamResponse(StreamingResponse):
    """A ``StreamingResponse`` for ``text/event-stream`` that writes at ``FLUSH`` markers and at
    the end, not at every chunk. A stream that never yields ``FLUSH`` is written out whole at its
    end, so every producer that waits must yield ``FLUSH`` first."""

    media_type = "text/event-stream"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        streaming = asyncio.current_task()
        assert streaming is not None
        state = {"streaming": True, "client_gone": False}

        async def listen() -> None:  # the request's body was read whole before the answer
            while (await receive())["type"] != "http.disconnect":
                pass

        def gone(task: asyncio.Task[None]) -> None:
            if task.cancelled():
                return
            task.exception()  # retrieved: a receive that failed means the client is gone too
            if state["streaming"]:
                state["client_gone"] = True
                streaming.cancel()  # the stream's own clean-up runs (its job is cancelled)

        listener = asyncio.create_task(listen())
        listener.add_done_callback(gone)
        try:
            await self.stream_response(send)
        except asyncio.CancelledError:
            # the client went away (not a cancellation from outside): the answer ends here
            if not state["client_gone"] or streaming.uncancel() > 0:
                raise
        finally:
            state["streaming"] = False
            listener.cancel()
        if self.background is not None:
            await self.background()

    async def stream_response(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code,
                    "headers": self.raw_headers})
        pending: list[str] = []
        async for chunk in self.body_iterator:
            if chunk is FLUSH:
                if pending:
                    body = "".join(pending).encode(self.charset)
                    pending.clear()
                    await send({"type": "http.response.body", "body": body, "more_body": True})
            elif isinstance(chunk, str):
                pending.append(chunk)
            else:  # bytes from a producer that encodes itself
                pending.append(bytes(chunk).decode(self.charset))
        await send({"type": "http.response.body",
                    "body": "".join(pending).encode(self.charset), "more_body": False})
