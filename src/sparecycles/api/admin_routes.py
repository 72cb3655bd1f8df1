"""Admin API for keys, their limits, and the nodes' trust. Every route needs the admin scope.

``POST   /v1/admin/keys``                     make a key (shown once) with scopes and limits
``GET    /v1/admin/keys``                     every key (never a secret)
``DELETE /v1/admin/keys/{key_id}``            revoke a key (effective at once on this replica)
``PUT    /v1/admin/keys/{key_id}/limits``     rate, budget per period, streams, trusted-only
``GET    /v1/admin/nodes``                    each node's reputation and quarantine
``POST   /v1/admin/nodes/{node_id}/release``  lift a quarantine after review
``PUT    /v1/admin/owners/{owner}/trusted``   designate an owner's nodes as trusted verifiers
``GET    /v1/admin/verifications``            recent verdicts (by node or job)
``GET    /v1/admin/verification``             totals: checks, failures, compute overhead
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from sparecycles import limits
from sparecycles.api.auth import require_admin
from sparecycles.api.errors import ERROR_RESPONSES
from sparecycles.coordinator.ratelimit import KeyPolicy
from sparecycles.errors import NotFound
from sparecycles.store.trust_queries import TrustQueries
from sparecycles.trust.reputation import NodeTrust, honesty_lower_bound, reputation

router = APIRouter(prefix="/v1/admin", dependencies=[Depends(require_admin)], tags=["admin"],
                   responses=ERROR_RESPONSES)
id_pattern = r"^[A-Za-z0-9_.:-]{1,80}$"


class KeyLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests_per_minute: int | None = Field(default=None, ge=1,
                                            le=limits.requests_per_minute_max)
    burst: int | None = Field(default=None, ge=1, le=limits.requests_per_minute_max)
    budget_micros: int | None = Field(default=None, ge=0, le=10**15)
    budget_period: Literal["day", "month"] = "month"
    streams_max: int | None = Field(default=None, ge=1, le=limits.streams_per_key_max)
    trusted_only: bool = False


class NewKey(BaseModel):
    model_config = ConfigDict(extra="forbid")
    client: str = Field(min_length=1, max_length=200)
    name: str = Field(min_length=1, max_length=200)
    scopes: list[Literal["inference", "admin", "workload:training", "workload:rnd"]] = Field(
        default=["inference"], min_length=1, max_length=3)
    limits: KeyLimits | None = None


class OwnerTrust(BaseModel):
    model_config = ConfigDict(extra="forbid")
    trusted: bool


def _db(request: Request) -> TrustQueries:
    return TrustQueries(request.app.state.coordinator.store.sessions)


def trust_view(trust: NodeTrust | None) -> dict[str, Any]:
    """A node's posterior as shown to its owner and the admin."""
    if trust is None:
        return {"reputation": None, "checks": 0, "failures": 0, "quarantined": False}
    return {"reputation": round(reputation(trust), 4),
            "posterior": {"alpha": trust.alpha, "beta": trust.beta},
            "honesty_at_least_95pct": round(honesty_lower_bound(trust), 4),
            "checks": trust.checks, "failures": trust.failures,
            "consecutive_clean": trust.consecutive_clean, "quarantined": trust.quarantined,
            "quarantine_reason": trust.quarantine_reason or None}


@router.post("/keys", status_code=201)
async def create_key(body: NewKey, request: Request) -> dict[str, Any]:
    coord = request.app.state.coordinator
    key_id, secret = await asyncio.to_thread(coord.store.create_api_key, body.client,
                                             body.name, tuple(body.scopes))
    if body.limits is not None:
        await asyncio.to_thread(_db(request).set_key_policy, key_id,
                                KeyPolicy(**body.limits.model_dump()))
    return {"id": key_id, "key": secret, "client": body.client, "scopes": sorted(body.scopes)}


@router.get("/keys")
async def list_keys(request: Request) -> dict[str, Any]:
    coord = request.app.state.coordinator
    return {"data": await asyncio.to_thread(coord.store.list_api_keys)}


@router.delete("/keys/{key_id}")
async def revoke_key(request: Request, key_id: str = Path(pattern=id_pattern)
                     ) -> dict[str, Any]:
    coord = request.app.state.coordinator
    await asyncio.to_thread(coord.store.revoke_api_key, key_id)
    coord.forget_keys()
    return {"id": key_id, "revoked": True}


@router.put("/keys/{key_id}/limits")
async def set_limits(body: KeyLimits, request: Request,
                     key_id: str = Path(pattern=id_pattern)) -> dict[str, Any]:
    coord = request.app.state.coordinator
    await asyncio.to_thread(_db(request).set_key_policy, key_id, KeyPolicy(**body.model_dump()))
    coord.gate.forget(key_id)
    return {"id": key_id, "limits": body.model_dump()}


@router.get("/nodes")
async def nodes(request: Request) -> dict[str, Any]:
    rows = await asyncio.to_thread(_db(request).nodes_trust)
    return {"data": [{k: v for k, v in r.items() if k != "trust"} | trust_view(r["trust"])
                     for r in rows]}


@router.post("/nodes/{node_id}/release")
async def release_node(request: Request, node_id: str = Path(pattern=id_pattern)
                       ) -> dict[str, Any]:
    verifier = request.app.state.coordinator.verifier
    if verifier is None:
        raise NotFound("verification is off on this coordinator")
    if await asyncio.to_thread(request.app.state.coordinator.store.get_node, node_id) is None:
        raise NotFound(f"no node {node_id}")
    return {"node_id": node_id} | trust_view(await verifier.lift_quarantine(node_id))


@router.put("/owners/{owner}/trusted")
async def set_owner_trusted(body: OwnerTrust, request: Request,
                            owner: str = Path(pattern=id_pattern)) -> dict[str, Any]:
    verifier = request.app.state.coordinator.verifier
    if verifier is None:
        raise NotFound("verification is off on this coordinator")
    await verifier.set_owner_trusted(owner, body.trusted)
    return {"owner": owner, "trusted": body.trusted}


@router.get("/verifications")
async def verifications(
    request: Request,
    node_id: str | None = Query(default=None, pattern=id_pattern),
    job_id: str | None = Query(default=None, pattern=id_pattern),
    limit: int = Query(default=50, ge=1, le=200),
) -> dict[str, Any]:
    rows = await asyncio.to_thread(_db(request).verifications, node_id=node_id, job_id=job_id,
                                   limit=limit)
    return {"data": rows}


@router.get("/verification")
async def verification_summary(request: Request) -> dict[str, Any]:
    verifier = request.app.state.coordinator.verifier
    totals = await asyncio.to_thread(_db(request).verification_totals)
    live = verifier.summary() if verifier is not None else None
    return {"enabled": verifier is not None, "live": live, "recorded": totals}
