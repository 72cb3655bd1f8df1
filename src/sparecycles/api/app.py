"""The coordinator's ASGI application: routes, error shape, limits, health and metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from sparecycles import __version__
from sparecycles.api import (
    admin_routes,
    costs_routes,
    errors,
    fastpath,
    ledger_routes,
    node_ws,
    openai_routes,
    owner_routes,
    responses_routes,
)
from sparecycles.api.dashboard import routes as dashboard
from sparecycles.coordinator.service import Coordinator
from sparecycles.settings import CoordinatorSettings


class CoordinatorApp(FastAPI):
    """FastAPI with the client API's fast path (api/fastpath.py) in front of its whole stack."""

    fast_path: ASGIApp | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.fast_path is not None:
            await self.fast_path(scope, receive, send)
        else:
            await super().__call__(scope, receive, send)

    async def framework(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The application without the fast path: FastAPI's middleware, routes and handlers."""
        await super().__call__(scope, receive, send)


def create_app(settings: CoordinatorSettings, coordinator: Coordinator | None = None) -> FastAPI:
    coord = coordinator or Coordinator(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await coord.start()
        try:
            yield
        finally:
            await coord.stop()

    app = CoordinatorApp(
        title="sparecycles coordinator",
        version=__version__,
        summary="OpenAI-compatible inference on the spare cycles of devices people own.",
        lifespan=lifespan,
    )
    app.state.coordinator = coord
    errors.install(app)
    app.add_middleware(errors.BodySizeLimit, limit_bytes=settings.request_body_bytes_max)
    # in front of the whole stack: the two inference routes answered without the framework's
    # layers, with the same steps and answers (fastpath.py)
    app.fast_path = fastpath.ClientFastPath(app.framework, coord,
                                            settings.request_body_bytes_max)
    app.include_router(openai_routes.router)
    app.include_router(responses_routes.router)
    app.include_router(node_ws.router)
    app.include_router(costs_routes.router)
    app.include_router(ledger_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(owner_routes.router)
    app.include_router(dashboard.router)

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness: the process answers."""
        return {"status": "ok", "replica": coord.replica_id, "version": __version__}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        """Readiness: the database answers and dispatch runs (for a load balancer)."""
        try:
            await asyncio.wait_for(asyncio.to_thread(coord.store.ping), 2.0)
        except Exception as exc:
            return JSONResponse({"status": "unready", "reason": str(exc)[:200]}, 503)
        d = coord.dispatcher
        return JSONResponse(
            {
                "status": "ready",
                "replica": coord.replica_id,
                "nodes_online": len(d.nodes) if d else 0,
                "nodes_available": sum(not n.draining for n in d.nodes.values()) if d else 0,
                # the whole fleet this replica can place work on (its nodes and its peers')
                "fleet_nodes_available": sum(
                    not n.draining and not n.closed for n in d.all_nodes()) if d else 0,
                "peers": sorted(coord.fleet.peer_ids()) if coord.fleet else [],
                "bus": ("connected" if coord.fleet and coord.fleet.connected
                        else "disconnected"),
                "jobs_waiting": len(d.waiting) if d else 0,
                "models": sorted(coord.models),
            }
        )

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics(request: Request) -> Response:
        return Response(
            coord.metrics.render(coord.dispatcher),
            media_type="text/plain; version=0.0.4; charset=utf-8",
        )

    return app
