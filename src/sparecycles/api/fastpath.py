"""The client API's hot path without the web framework's layers: ``POST /v1/chat/completions``
and ``POST /v1/completions`` served straight from ASGI.

Through FastAPI a request and every chunk of its streamed answer pass about a dozen layers (the
server-error and exception middlewares, the exit-stack and body-limit middlewares, the router,
the dependency solver, the request wrapper, a send wrapper per layer), ~8 % of the coordinator's
CPU per request at 256 streams (docs/benchmarks.md, issue 19, third pass). ``ClientFastPath``
sits in front of the application and answers these two routes itself, with the same steps and
the same answers:

- the body is read whole, within ``request_body_bytes_max`` (a body with no declared length, one
  over the limit, or one waiting for ``100 Continue``, goes the framework's way, where
  ``errors.BodySizeLimit`` answers it);
- in the framework's order: the body is parsed (``json.loads``, as the framework does), the key
  is checked (401/403 in OpenAI's shape, as the route's dependency does), and the body is
  validated by the same pydantic model;
- a body that does not parse or validate is handed, unchanged, to the framework's route, so a bad
  request gets exactly the 400 it got before (the error paths are not the hot path);
- the route's own function answers (``openai_routes.chat_completion``/``completion``), and an
  expected failure maps to its status through ``errors.error_response``, a database outage to
  503, anything else to a logged 500: the exception handlers of ``errors.install``.

Other methods and paths, and bodies not declared JSON (FastAPI's strict content type: no JSON is
read from them), go to the framework untouched.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sparecycles.api import openai_routes
from sparecycles.api.auth import authenticate, inference_scope
from sparecycles.api.errors import error_response, server_error, store_unavailable
from sparecycles.api.schemas import ChatCompletionRequest, CompletionRequest
from sparecycles.coordinator.service import Coordinator
from sparecycles.errors import SpareCyclesError
from sparecycles.store import ApiKeyInfo
from sparecycles.store.errors import transient_store_errors

log = logging.getLogger("sparecycles.api")

Handler = Callable[[Coordinator, Any, ApiKeyInfo, float], Awaitable[Response]]
_routes: dict[str, tuple[type[BaseModel], Handler]] = {
    "/v1/chat/completions": (ChatCompletionRequest, openai_routes.chat_completion),
    "/v1/completions": (CompletionRequest, openai_routes.completion),
}


class ClientFastPath:
    """ASGI middleware: the two inference routes answered without the framework (see above)."""

    def __init__(self, app: ASGIApp, coord: Coordinator, limit_bytes: int) -> None:
        self.app, self.coord, self.limit_bytes = app, coord, limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = _routes.get(scope["path"]) if scope["type"] == "http" else None
        if route is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        received_perf_s = time.perf_counter()
        length, authorization, json_body = -1, b"", False
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = int(value) if value.isdigit() else self.limit_bytes + 1
            elif name == b"authorization":
                authorization = value
            elif name == b"content-type":
                json_body = _is_json(value)
            elif name in (b"transfer-encoding", b"expect"):
                json_body = False
                break
        if not (json_body and 0 <= length <= self.limit_bytes):
            await self.app(scope, receive, send)  # the framework's way (BodySizeLimit)
            return
        chunks: list[bytes] = []
        more = True
        while more:  # the server stops at the declared length
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before its request was whole
            chunks.append(message.get("body", b""))
            more = message.get("more_body", False)
        body = b"".join(chunks)
        model, handler = route
        try:
            data = json.loads(body) if body else None
        except ValueError:
            data = None
        if data is None:  # no JSON: the framework's 400, exactly as before
            await self.app(scope, _replay(body, receive), send)
            return
        try:
            key = inference_scope(await authenticate(self.coord, authorization.decode("latin-1")))
            try:
                request = model.model_validate(data)
            except ValueError:  # not valid: the framework's 400, exactly as before
                await self.app(scope, _replay(body, receive), send)
                return
            response = await handler(self.coord, request, key, received_perf_s)
        except SpareCyclesError as exc:
            response = error_response(exc)
        except transient_store_errors as exc:
            response = store_unavailable(scope["method"], scope["path"], exc)
        except Exception:
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            response = server_error()
        await response(scope, receive, send)


def _is_json(content_type: bytes) -> bool:
    """As FastAPI reads a body as JSON: ``application/json`` or ``application/*+json``; with
    no content type, it reads none."""
    kind = content_type.split(b";", 1)[0].strip().lower()
    return kind == b"application/json" or (kind.startswith(b"application/")
                                           and kind.endswith(b"+json"))


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives the body already read once, then the server's own messages."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replay
