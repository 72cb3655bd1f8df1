"""The node protocol's coordinator end: one WebSocket per node, dialled out by the node.

Handshake: the coordinator sends a ``challenge`` nonce; the node answers ``hello`` with its
owner's token, its Ed25519 public key and a signature of the nonce (proving it holds the key), its
device profile, availability policy and models. Models whose weight hash differs from the
registry's are refused. Then the node streams ``tokens`` and ``done`` for the jobs it is given and
sends a ``heartbeat`` every few seconds. Anything outside the protocol closes the socket (1008);
the coordinator goes on serving everyone else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time

from fastapi import APIRouter, WebSocket, WebSocketDisconnect

from sparecycles import limits, protocol
from sparecycles.coordinator.node_conn import NodeConn, policy_from_dict, profile_from_dict
from sparecycles.coordinator.service import Coordinator
from sparecycles.errors import Conflict, ProtocolError
from sparecycles.identity import node_id_for, verify

router = APIRouter()
log = logging.getLogger("sparecycles.node_ws")
POLICY_VIOLATION = 1008
deadline_step_s = 1.0  # how often a busy socket's silence deadline is moved on


@router.websocket(protocol.WS_PATH)
async def node_socket(ws: WebSocket) -> None:
    coord: Coordinator = ws.app.state.coordinator
    await ws.accept()
    node: NodeConn | None = None
    try:
        node = await _handshake(coord, ws)
        await _serve(coord, ws, node)
    except ProtocolError as exc:
        log.warning("node %s: protocol error: %s", node.node_id if node else "?", exc.message)
        with contextlib.suppress(Exception):
            await ws.send_text(protocol.encode(protocol.Reject(reason=exc.message)))
            await ws.close(code=POLICY_VIOLATION)
    except (WebSocketDisconnect, TimeoutError, RuntimeError):
        pass
    finally:
        if node is not None:
            node.set_draining(True, time.time())  # the session is over (learned stays)
            await node.stop()
            if coord.dispatcher is not None and coord.dispatcher.nodes.get(node.node_id) is node:
                await coord.dispatcher.on_node_lost(node)
                if coord.fleet is not None:
                    coord.fleet.local_down(node)
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(coord.store.set_node_status, node.node_id, "offline")


async def _receive(ws: WebSocket, timeout_s: float) -> str:
    async with asyncio.timeout(timeout_s):
        return await _read(ws)


async def _read(ws: WebSocket) -> str:
    message = await ws.receive()
    if message["type"] == "websocket.disconnect":
        raise WebSocketDisconnect(message.get("code", 1000))
    data = message.get("text")
    if data is None:  # a binary frame: read as text too, since a relay publishes it in JSON
        frame: bytes = message.get("bytes") or b""
        if len(frame) > limits.ws_message_bytes_max:
            raise ProtocolError("message too large")
        try:
            return frame.decode()
        except UnicodeDecodeError:
            raise ProtocolError("message is not UTF-8 text") from None
    if len(data) > limits.ws_message_bytes_max:
        raise ProtocolError("message too large")
    return data


async def _handshake(coord: Coordinator, ws: WebSocket) -> NodeConn:
    nonce = secrets.token_urlsafe(24)
    await ws.send_text(protocol.encode(protocol.Challenge(nonce=nonce)))
    hello = protocol.decode_node_message(await _receive(ws, limits.node_hello_timeout_s))
    if not isinstance(hello, protocol.Hello):
        raise ProtocolError("the first message must be hello")
    owner_id = await asyncio.to_thread(coord.store.owner_for_node_token, hello.token)
    if owner_id is None:
        raise ProtocolError("unknown or revoked node token")
    if not verify(hello.public_key, nonce.encode(), hello.nonce_signature):
        raise ProtocolError("the challenge signature does not verify with the public key")
    try:
        profile = profile_from_dict(hello.profile)
        policy = policy_from_dict(hello.availability)
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"invalid profile or availability policy: {exc}") from None
    node_id = node_id_for(hello.public_key)
    reputation = 1.0 if coord.verifier is None else await coord.verifier.admit_node(
        node_id, owner_id)  # a quarantined node is refused here
    accepted, rejected, weights = [], {}, {}
    ranges: dict[str, tuple[int, int]] = {}
    for offer in hello.models:
        spec = coord.models.get(offer.name)
        if spec is None:
            rejected[offer.name] = "not in this network's model registry"
        elif offer.layers is not None:  # a stage of chains: the hash of that range must match
            first, end = offer.layers
            want = await asyncio.to_thread(coord.layers_sha256, offer.name, first, end)
            if want is None:
                rejected[offer.name] = f"layers {first}:{end} are not a range of this model"
            elif offer.weights_sha256 != want:
                rejected[offer.name] = (f"the hash of layers {first}:{end} differs from the "
                                        "registry's")
            else:
                ranges[offer.name] = (first, end)
                weights[offer.name] = offer.weights_sha256
        elif offer.weights_sha256 != spec.weights_sha256:
            rejected[offer.name] = "weights hash differs from the registry's"
        else:
            accepted.append(offer.name)
            weights[offer.name] = offer.weights_sha256
    try:
        await asyncio.to_thread(
            coord.store.node_connected,
            node_id=node_id,
            owner_id=owner_id,
            name=hello.name,
            public_key=hello.public_key,
            profile=hello.profile,
            models=[m.model_dump() for m in hello.models],
            availability=hello.availability,
            agent_version=hello.agent_version,
            replica_id=coord.replica_id,
        )
    except Conflict as exc:
        raise ProtocolError(exc.message) from None
    stored = await asyncio.to_thread(coord.store.node_availability, node_id)
    if stored and stored.get("set_by") == "owner":  # the owner's dashboard edit wins
        policy = policy_from_dict(stored)
    assert coord.dispatcher is not None
    old = coord.dispatcher.nodes.get(node_id)
    if old is not None:  # the same node reconnected: its old socket is finished
        await old.stop()
        await coord.dispatcher.on_node_lost(old)
    node = NodeConn(
        node_id=node_id,
        owner_id=owner_id,
        name=hello.name or node_id,
        public_key=hello.public_key,
        profile=profile,
        policy=policy,
        models=tuple(accepted),
        weights=weights,
        jobs_max=hello.jobs_max,
        send_raw=ws.send_text,
        reputation=reputation,
        features=frozenset(hello.features),
        stays=coord.stays,
        layer_ranges=ranges,
    )
    await ws.send_text(
        protocol.encode(
            protocol.Welcome(
                node_id=node_id,
                owner_id=owner_id,
                heartbeat_interval_s=limits.heartbeat_interval_s,
                accepted_models=accepted + [f"{m}[{a}:{b}]" for m, (a, b) in ranges.items()],
                rejected_models=rejected,
            )
        )
    )
    node.start()
    coord.dispatcher.on_node_ready(node)
    if coord.fleet is not None:
        coord.fleet.local_up(node)
    log.info("node %s (%s) online with %s", node_id, profile.device_class, accepted)
    return node


async def _serve(coord: Coordinator, ws: WebSocket, node: NodeConn) -> None:
    router = coord.router
    assert router is not None
    timeout_s = coord.settings.heartbeat_timeout_s
    loop = asyncio.get_running_loop()
    # One deadline for the socket, moved on at most every ``deadline_step_s``: a node silent for
    # ``heartbeat_timeout_s`` (and at most that step more) is dropped. A timer set and cancelled
    # around every message cost ~5 % of a busy coordinator's CPU (docs/benchmarks.md).
    async with asyncio.timeout(None) as deadline:
        moved_s = -math.inf
        while not node.closed:
            now_s = loop.time()
            if now_s - moved_s >= deadline_step_s:
                deadline.reschedule(now_s + timeout_s)
                moved_s = now_s
            raw = await _read(ws)
            msg = protocol.decode_node_message(raw)
            node.last_seen_s = time.monotonic()
            pending = router.route(node, msg, raw)  # coordinator/router.py: where each one goes
            if pending is not None:
                deadline.reschedule(None)  # a handed-back job may wait on its settlement
                await pending
                moved_s = -math.inf
