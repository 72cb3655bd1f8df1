"""Dispatch's side of the placement index: the fleet's snapshots, re-read only where they moved.

``LivePlacement`` owns the dispatcher's two fleets (``nodes``: sockets on this replica;
``remote``: other replicas' nodes) as dictionaries that tell it when a node joins, is replaced
or leaves, and watches each node (``watch.Watched``): a job starting or ending on it, its
backlog moving, its status, draining, trust, speeds or host's report changing marks it. Before
a placement, ``refresh`` asks only the marked nodes for their snapshot (and those whose
snapshot is ``snapshot_reuse_s_max`` old: the availability window and the expected stay move
with the clock) and hands them to ``scheduling.placement_index.PlacementIndex``, which re-scores
just those. Each node's position is its place in ``[*nodes.values(), *remote.values()]``, the
list the full scan is given, so both break ties alike.

The index so holds, for every node that takes work (open, not draining), the snapshot the full
scan would read, but for one field: a local node's ``queued_tokens`` moves with every token
message and is read by placement only while the node is full (the wait for a slot), so a node
with a free slot is not marked for it; the scheduler's answer is the same (the property test
in tests/unit/test_placement_index.py changes it behind the index's back). Groups larger than
``group_rank_max``, whose cut reads it, are placed by the full scan, on fresh snapshots.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Generic, TypeVar

from sparecycles.coordinator.fleet_node import FleetNode
from sparecycles.coordinator.node_conn import NodeConn, snapshot_reuse_s_max
from sparecycles.coordinator.watch import NodeWatch
from sparecycles.scheduling.placement_index import PlacementIndex
from sparecycles.types import NodeSnapshot

N = TypeVar("N", bound=FleetNode)
REMOTE_BASE = 1 << 48  # positions of other replicas' nodes: after every local one


class FleetDict(dict[str, N], Generic[N]):
    """A fleet by node id that tells its ``LivePlacement`` of every change of membership (reads
    are a plain dictionary's)."""

    def __init__(self, owner: LivePlacement, remote: bool) -> None:
        super().__init__()
        self._owner, self._remote = owner, remote

    def __setitem__(self, node_id: str, node: N) -> None:
        old = self.get(node_id)
        super().__setitem__(node_id, node)
        self._owner._joined(self._remote, node_id, old, node)

    def __delitem__(self, node_id: str) -> None:
        node = self[node_id]
        super().__delitem__(node_id)
        self._owner._left(self._remote, node_id, node)

    def pop(self, node_id: str, *default: Any) -> Any:
        if node_id in self:
            node = self[node_id]
            del self[node_id]
            return node
        if default:
            return default[0]
        raise KeyError(node_id)

    def popitem(self) -> tuple[str, N]:
        if not self:
            raise KeyError("popitem(): the fleet is empty")
        node_id = next(reversed(self))
        return node_id, self.pop(node_id)

    def clear(self) -> None:
        for node_id in list(self):
            del self[node_id]

    def setdefault(self, node_id: str, node: N) -> N:  # type: ignore[override]
        if node_id not in self:
            self[node_id] = node
        return self[node_id]

    def update(self, *args: Any, **kw: Any) -> None:
        for node_id, node in dict(*args, **kw).items():
            self[node_id] = node

    def __ior__(self, other: Any) -> FleetDict[N]:  # type: ignore[override,misc]
        self.update(other)
        return self


class LivePlacement:
    """The placement index kept current from the nodes' own changes (one event loop)."""

    def __init__(self) -> None:
        self.index = PlacementIndex()
        self.nodes: FleetDict[NodeConn] = FleetDict(self, remote=False)
        self.remote: FleetDict[FleetNode] = FleetDict(self, remote=True)
        self._slot: dict[tuple[bool, str], int] = {}  # (remote?, node id) -> position
        self._node_at: dict[int, FleetNode] = {}  # position -> node
        self._dirty: dict[int, FleetNode] = {}  # position -> node, marked since the last refresh
        self._expiry: deque[tuple[float, int, NodeSnapshot]] = deque()  # (when, pos, snapshot)
        self._seq = 0
        self.refreshed = 0  # snapshots asked for (for tests and benchmarks)

    # ---- membership (FleetDict) ------------------------------------------------------------

    def _joined(self, remote: bool, node_id: str, old: FleetNode | None, node: FleetNode) -> None:
        key = (remote, node_id)
        pos = self._slot.get(key)
        if pos is None:  # a new key goes last in its dictionary, as its position does
            pos = self._slot[key] = self._seq + (REMOTE_BASE if remote else 0)
            self._seq += 1
        if old is not None and old is not node:
            old.set_watch(None)
        self._node_at[pos] = node
        node.set_watch(self._watch(pos, local=not remote))
        self._dirty[pos] = node

    def _left(self, remote: bool, node_id: str, node: FleetNode) -> None:
        pos = self._slot.pop((remote, node_id))
        node.set_watch(None)
        del self._node_at[pos]
        self._dirty.pop(pos, None)
        self.index.drop(pos)

    def _watch(self, pos: int, *, local: bool) -> NodeWatch:
        def changed(node: Any, what: str) -> None:
            # a local node's queued tokens count only while it is full (module docstring)
            if what == "queued_tokens" and local and len(node.jobs) < node.jobs_max:
                return
            self._dirty[pos] = node

        return changed

    # ---- placement ---------------------------------------------------------------------------

    def refresh(self, now_epoch_s: float) -> bool:
        """Bring the index up to date: the marked nodes' snapshots, and the expired ones'.
        False when some node holds stages of chains: the chain planner reads every snapshot,
        so placement takes the full path."""
        dirty, self._dirty = self._dirty, {}
        expiry, index = self._expiry, self.index
        while expiry and expiry[0][0] <= now_epoch_s:
            _, pos, snap = expiry.popleft()
            node = self._node_at.get(pos)
            if node is not None and index.snapshot(pos) is snap:
                dirty.setdefault(pos, node)
        for pos, node in dirty.items():
            if self._node_at.get(pos) is not node:
                continue  # replaced or gone since it was marked
            if node.closed or node.draining:
                index.drop(pos)
                continue
            snap = node.snapshot(now_epoch_s)
            self.refreshed += 1
            if index.put(pos, snap):
                expiry.append((now_epoch_s + snapshot_reuse_s_max, pos, snap))
        return index.layered == 0

    def snapshot_of(self, node_id: str) -> NodeSnapshot | None:
        """The kept snapshot of a node by id (this replica's own first, as ``Dispatcher.node``)."""
        pos = self._slot.get((False, node_id))
        if pos is None:
            pos = self._slot.get((True, node_id))
        return None if pos is None else self.index.snapshot(pos)
