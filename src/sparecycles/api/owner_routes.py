"""An owner's view of their nodes' trust: ``GET /v1/owner/nodes`` with an owner key.

Each node's reputation (the posterior mean the scheduler reads), the 95% lower bound on its
honesty, its checks and failures, whether it is quarantined and why, and its latest verdicts
with what each withheld. Owner keys are made with ``sparecycles owners key --owner NAME``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request

from sparecycles.api.admin_routes import trust_view
from sparecycles.api.errors import ERROR_RESPONSES
from sparecycles.errors import PermissionDenied, Unauthorized
from sparecycles.store.dashboard_queries import DashboardQueries
from sparecycles.store.trust_queries import TrustQueries

router = APIRouter(prefix="/v1/owner", tags=["owner"], responses=ERROR_RESPONSES)
verdicts_shown_max = 50


async def _owner_id(request: Request) -> str:
    scheme, _, secret = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secret.strip():
        raise Unauthorized("Send your owner key as 'Authorization: Bearer YOUR_KEY'.")
    sessions = request.app.state.coordinator.store.sessions
    key = await asyncio.to_thread(DashboardQueries(sessions).key_by_secret, secret.strip())
    if key is None:
        raise Unauthorized("Incorrect API key provided.")
    if key.owner_id is None or "owner" not in key.scopes:
        raise PermissionDenied("This endpoint needs an owner key.")
    return key.owner_id


@router.get("/nodes")
async def my_nodes(request: Request) -> dict[str, Any]:
    owner_id = await _owner_id(request)
    db = TrustQueries(request.app.state.coordinator.store.sessions)
    rows = await asyncio.to_thread(db.nodes_trust, owner_id)
    recent = await asyncio.to_thread(db.verifications, owner_id=owner_id,
                                     limit=verdicts_shown_max)
    return {
        "data": [{k: v for k, v in r.items() if k != "trust"} | trust_view(r["trust"])
                 for r in rows],
        "verifications": [{k: v[k] for k in ("job_id", "node_id", "method", "outcome",
                                              "reason", "withheld_micros", "created_at_s")}
                          for v in recent],
    }
