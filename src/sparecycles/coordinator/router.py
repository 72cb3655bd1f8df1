"""Where a local node's messages go: one decision per message, made here.

A node's socket carries three kinds of traffic, told apart by what the message answers:

- answers to verification work (``scored``; ``tokens``/``done``/``job_error`` of a replay):
  the verifier's link (coordinator/verification_link.py);
- ``tokens``/``done``/``job_error`` of a job that another replica owns, and ``stage_output`` of
  a stage of another replica's chain: the fleet relays them to that replica over the bus
  (coordinator/replication/fleet.py);
- everything else: this replica's dispatch (jobs, and the KV caches of hand-offs: ``kv_chunk``)
  and the node's own state (heartbeats, draining).

The link and the fleet each say whether a job id is theirs (a dictionary lookup); neither sees the
messages that are not. ``route`` handles what it can at once and returns what is left to await
(a handed-back job, a status write), so a socket's reader never waits on a settlement.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Protocol

from sparecycles import availability, protocol
from sparecycles.coordinator.node_conn import NodeConn
from sparecycles.errors import ProtocolError

if TYPE_CHECKING:
    from sparecycles.coordinator.dispatch import Dispatcher

JobMessage = protocol.Tokens | protocol.Done | protocol.JobError


class JobClaimant(Protocol):
    """A part that runs jobs of its own on local nodes (the verifier's link, the fleet)."""

    def owns(self, node: NodeConn, job_id: str) -> bool:
        """Is this message's job (on this node) one of mine?"""
        ...

    def take(self, node: NodeConn, msg: JobMessage, raw: str) -> None:
        """A message of one of my jobs."""
        ...


class StageClaimant(Protocol):
    """A part that relays stages of chains driven elsewhere (the fleet)."""

    def owns_stage(self, node: NodeConn, sequence_id: str) -> bool: ...

    def take_stage(self, node: NodeConn, msg: protocol.StageOutput, raw: str) -> None: ...


class Relay(JobClaimant, StageClaimant, Protocol):
    """The fleet: jobs and stages of other replicas on this replica's nodes."""


class ScoreReader(Protocol):
    def on_scored(self, node: NodeConn, msg: protocol.Scored) -> None: ...


class NodeRouter:
    def __init__(self, dispatcher: Dispatcher, *,
                 verification: JobClaimant | None = None, scores: ScoreReader | None = None,
                 relay: Relay | None = None) -> None:  # fmt: skip
        self.dispatcher = dispatcher
        self.claimants: list[JobClaimant] = [c for c in (verification, relay) if c is not None]
        self.relay = relay
        self.scores = scores

    def route(self, node: NodeConn, msg: protocol.NodeMessage, raw: str) -> Awaitable[None] | None:
        """Handle ``msg`` from local ``node``; returns what remains to be awaited, if anything."""
        d = self.dispatcher
        if isinstance(msg, protocol.Tokens | protocol.Done | protocol.JobError):
            for claimant in self.claimants:
                if claimant.owns(node, msg.job_id):
                    claimant.take(node, msg, raw)
                    return None
            if isinstance(msg, protocol.Tokens):
                d.on_tokens(node, msg)
            elif isinstance(msg, protocol.Done):
                d.done_received(node, msg)  # the settlement is not waited for here
            else:
                return d.on_job_error(node, msg)
        elif isinstance(msg, protocol.KvChunk):  # a prefill's KV cache, to hand off (handoff.py)
            d.on_kv_chunk(node, msg)
        elif isinstance(msg, protocol.StageOutput):  # a stage of a chain (chains.py)
            if self.relay is not None and self.relay.owns_stage(node, msg.sequence_id):
                self.relay.take_stage(node, msg, raw)  # another replica drives that chain
            else:
                d.chains.on_output(node, msg)
        elif isinstance(msg, protocol.Scored):
            if self.scores is not None:
                self.scores.on_scored(node, msg)
        elif isinstance(msg, protocol.Heartbeat):
            node.status = availability.DeviceStatus(
                on_ac_power=msg.on_ac_power,
                charging=msg.charging,
                owner_load=msg.owner_load,
                temperature_c=msg.temperature_c,
            )
            if node.draining and msg.available:  # the owner's window opened again
                node.set_draining(False, time.time())
                d.on_node_ready(node)
            node.set_draining(not msg.available, time.time())  # a session's end: learned stays
        elif isinstance(msg, protocol.Draining):
            node.set_draining(True, time.time())
            return asyncio.to_thread(d.store.set_node_status, node.node_id, "draining")
        elif isinstance(msg, protocol.Hello):
            raise ProtocolError("hello sent twice")
        return None
