"""What dispatch needs of a node, wherever its socket is: ``FleetNode``.

Two kinds of node satisfy it: ``node_conn.NodeConn`` (its socket is on this replica) and
``replication.fleet.RemoteNode`` (its socket is on another replica; ``send`` goes over the bus).
Dispatch speaks only this protocol, so it imports neither the bus nor the fleet.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from sparecycles.coordinator.watch import NodeWatch
from sparecycles.types import DeviceProfile, NodeSnapshot

if TYPE_CHECKING:
    from sparecycles.coordinator.node_conn import Backlog

class FleetNode(Protocol):
    node_id: str
    owner_id: str
    public_key: str  # base64 Ed25519: the key its signed results are checked against
    profile: DeviceProfile
    models: tuple[str, ...]
    weights: dict[str, str]  # model -> weights_sha256 the node reported
    jobs: set[str]  # this replica's jobs running on it
    queued_tokens: int  # tokens still to come for those jobs
    backlog: Backlog  # this replica's jobs' prompt tokens not yet prefilled, and KV reserved
    draining: bool
    closed: bool
    jobs_max: int
    features: frozenset[str]  # protocol.FEATURE_* from its hello

    def send(self, frame: str) -> bool:
        """Queue one encoded message for the node; False when its socket is gone."""
        ...

    def snapshot(self, now_epoch_s: float) -> NodeSnapshot:
        """The scheduler's view of the node now."""
        ...

    def observe_speed(self, model: str, tokens_per_s: float, batch: int | None = None) -> None:
        """Fold a measured decode speed into the node's estimate."""
        ...

    def set_watch(self, watch: NodeWatch | None) -> None:
        """Who is told when something the node's snapshot reads changes (``Watched``)."""
        ...
