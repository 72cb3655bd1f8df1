"""Client authentication: ``Authorization: Bearer sk-sc-…`` checked against hashed keys.

Scopes: ``inference`` (the OpenAI-compatible API and a client's own job records), ``admin``
(``/v1/admin``, costs), ``owner`` (an owner's dashboard and ``/v1/owner``; such keys have no
client and never authenticate here), ``workload:training`` and ``workload:rnd`` (the platform's
own internal accounts: what their requests are for; see ``workload_of``). A key holds one or
more. Only an operator (``sparecycles keys create``) or an admin key grants scopes.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import Request

from sparecycles.errors import PermissionDenied, Unauthorized
from sparecycles.store import ApiKeyInfo
from sparecycles.types import Workload

if TYPE_CHECKING:
    from sparecycles.coordinator.service import Coordinator

WORKLOAD_SCOPES = {f"workload:{w}": w for w in Workload if w is not Workload.INFERENCE}


def workload_of(info: ApiKeyInfo) -> Workload:
    """What a key's requests are for, decided by the platform, never by the request body: a key
    of the platform's own internal accounts carries a ``workload:training`` or ``workload:rnd``
    scope (granted by an operator or an admin); every other key's requests are inference, whose
    cost is COGS and whose charge is revenue."""
    internal = [w for s, w in WORKLOAD_SCOPES.items() if s in info.scopes]
    return internal[0] if len(internal) == 1 else Workload.INFERENCE


async def authenticate(coord: Coordinator, header: str) -> ApiKeyInfo:
    """The key of an ``Authorization`` header's value; Unauthorized otherwise."""
    scheme, _, secret = header.partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized(
            "You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY'."
        )
    cached, info = coord.cached_key(secret.strip())
    if not cached:  # a query, off the event loop
        info = await asyncio.to_thread(coord.authenticate, secret.strip())
    if info is None:
        raise Unauthorized("Incorrect API key provided.")
    return info


def inference_scope(info: ApiKeyInfo) -> ApiKeyInfo:
    """``info`` if it has the ``inference`` scope; PermissionDenied otherwise."""
    if "inference" not in info.scopes:
        raise PermissionDenied("This endpoint needs an API key with the inference scope.")
    return info


async def _authenticate(request: Request) -> ApiKeyInfo:
    return await authenticate(request.app.state.coordinator,
                              request.headers.get("authorization", ""))


async def require_key(request: Request) -> ApiKeyInfo:
    """A key with the ``inference`` scope."""
    return inference_scope(await _authenticate(request))


async def require_admin(request: Request) -> ApiKeyInfo:
    info = await _authenticate(request)
    if "admin" not in info.scopes:
        raise PermissionDenied("This endpoint needs an API key with the admin scope.")
    return info
