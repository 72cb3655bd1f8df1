"""OpenAI's error shape for every failure, and the request-size guard.

``{"error": {"message", "type", "param", "code"}}`` with the right status: 400 for bad input
(FastAPI's 422 is mapped to 400, as OpenAI does), 401, 404, 413, 429 (with Retry-After; or
insufficient_quota), 503. Anything unexpected is logged with its traceback and answered 500 in
the same shape, without internals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sparecycles import limits
from sparecycles.errors import (
    InsufficientBalance,
    RateLimited,
    SpareCyclesError,
    StoreUnavailable,
)
from sparecycles.store.errors import transient_store_errors

log = logging.getLogger("sparecycles.api")


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error shape, as every route answers a failure."""

    error: ErrorDetail


# Documented on the routers (``APIRouter(responses=ERROR_RESPONSES)``) so that the OpenAPI spec
# says what a client gets, and a fuzzer can check the bodies against it.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": why}
    for status, why in ((400, "Invalid request"), (401, "No or unknown API key"),
                        (403, "The key lacks the scope"),
                        (404, "Not found"), (413, "Request body too large"),
                        (429, "A limit of the key was reached (see Retry-After), or the balance "
                              "is insufficient (insufficient_quota)"),
                        (503, "No node could serve the request"))
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None
               ) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: SpareCyclesError) -> JSONResponse:
    headers = {}
    if isinstance(exc, RateLimited):
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    elif isinstance(exc, StoreUnavailable):
        headers["Retry-After"] = "1"
    elif isinstance(exc, InsufficientBalance):  # as OpenAI: no use retrying until topped up
        headers["x-should-retry"] = "false"
    return JSONResponse(
        error_body(exc.message, exc.error_type, exc.param, exc.code),
        status_code=exc.status_code,
        headers=headers,
    )


# pydantic's names for the member of a union a value was tried against ("str", "list[str]",
# "literal['none','auto','required']", "NamedToolChoice", "function-after[...]"): not fields of
# the request, so not part of the ``param`` a client is told (field names are lower snake case)
_UNION_MEMBER = re.compile(r"^(str|int|float|bool|none|dict|list)$|^[A-Z]|[\[\-]")


def field_param(loc: Any, last_is_key: bool = False) -> str | None:
    """A validation error's location as the ``param`` a client is told: its fields and indexes,
    without "body" and pydantic's union members; the last part kept whatever it looks like
    where it is the client's own key (an unknown key, refused)."""
    parts = list(loc)
    out = [str(p) for i, p in enumerate(parts) if p != "body" and not (
        isinstance(p, str) and _UNION_MEMBER.search(p)
        and not (last_is_key and i == len(parts) - 1))]
    return ".".join(out) or None


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return "We could not parse the JSON body of your request.", None
    param = field_param(first.get("loc", ()), first.get("type") == "extra_forbidden")
    msg = first.get("msg", "invalid value")
    return (f"Invalid value for '{param}': {msg}" if param else f"Invalid request: {msg}"), param


def install(app: FastAPI) -> None:
    @app.exception_handler(SpareCyclesError)
    async def _expected(_: Request, exc: SpareCyclesError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), type_), status_code=exc.status_code)

    async def _store_away(request: Request, exc: Exception) -> JSONResponse:
        return store_unavailable(request.method, request.url.path, exc)

    for error in transient_store_errors:
        app.add_exception_handler(error, _store_away)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return server_error()


def store_unavailable(method: str, path: str, exc: Exception) -> JSONResponse:
    """The 503 of a request that met the database unavailable (logged as a warning)."""
    log.warning("database unavailable on %s %s: %s", method, path,
                str(exc).splitlines()[0][:200])
    return error_response(StoreUnavailable(
        "The service's database is briefly unavailable; nothing was charged. Retry shortly."))


def server_error() -> JSONResponse:
    """The 500 of an unexpected failure (the caller logs it), without internals."""
    return JSONResponse(
        error_body("The server had an error processing your request.", "server_error"),
        status_code=500,
    )


class BodySizeLimit:
    """Refuse bodies over ``limit_bytes`` with 413 in OpenAI's error shape, never holding more
    than the limit in memory.

    The rest of an oversized body is read and dropped before the 413 goes out (up to
    ``limits.request_body_drain_bytes_max`` and ``request_body_drain_s_max``): a client that
    sends the whole body before it reads the answer (Python's urllib) otherwise finds the socket
    reset under it and never sees the 413. A declared length beyond the drain bound, or a client
    waiting for ``100 Continue``, is answered at once. A body that grows past the limit as it
    streams (no length declared) stops the app; whatever the app makes of its cut-off body (a
    400 "error parsing the body") is dropped and the 413 sent instead.
    """

    def __init__(self, app: ASGIApp, limit_bytes: int):
        self.app, self.limit_bytes = app, limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit_bytes:
            waits = headers.get(b"expect", b"").lower() == b"100-continue"
            drained = (not waits and int(declared) <= limits.request_body_drain_bytes_max
                       and await _drain(receive, 0))
            await self._reject(send, close=not drained)
            return
        if (declared is not None and declared.isdigit()
                and b"transfer-encoding" not in headers):
            # the server reads exactly the declared length, which is within the limit: nothing
            # to count, and no wrapper on every message of the answer (a stream's every chunk)
            await self.app(scope, receive, send)
            return
        seen = 0
        started = False
        too_large = False
        drained = False

        async def limited_receive() -> Message:
            nonlocal seen, too_large, drained
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit_bytes:
                    too_large = True
                    drained = not message.get("more_body") or await _drain(receive, seen)
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if too_large and not started:
                return  # the app's answer to a body it never got whole: the 413 replaces it
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        with contextlib.suppress(_TooLarge):  # the app may also catch it and answer (dropped)
            await self.app(scope, limited_receive, tracking_send)
        if too_large and not started:
            await self._reject(send, close=not drained)

    async def _reject(self, send: Send, *, close: bool = False) -> None:
        resp = JSONResponse(
            error_body(
                f"Request body exceeds the limit of {self.limit_bytes} bytes.",
                "invalid_request_error",
                code="request_too_large",
            ),
            status_code=413,
            headers={"Connection": "close"} if close else None,
        )
        await resp({"type": "http"}, _empty_receive, send)


async def _drain(receive: Receive, seen_bytes: int) -> bool:
    """Read and drop the rest of a request's body; True once it has all been read, False when
    the client went away or the drain bounds (``limits.request_body_drain_*``) were reached."""
    deadline = asyncio.get_running_loop().time() + limits.request_body_drain_s_max
    while seen_bytes <= limits.request_body_drain_bytes_max:
        left_s = deadline - asyncio.get_running_loop().time()
        if left_s <= 0:
            return False
        try:
            message = await asyncio.wait_for(receive(), left_s)
        except TimeoutError:
            return False
        if message["type"] != "http.request":
            return False
        seen_bytes += len(message.get("body", b""))
        if not message.get("more_body"):
            return True
    return False


class _TooLarge(Exception):
    pass


async def _empty_receive() -> Message:
    return {"type": "http.disconnect"}
