"""A node that tells its watcher when what its snapshot reads changes: ``Watched``.

Dispatch's placement (coordinator/placement.py) re-reads the snapshots of the nodes that said
so, instead of asking every node on every admission. ``NodeConn`` and ``RemoteNode`` mix it
in; their job sets are ``JobSet``s and their backlogs tell it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

# What a node's snapshot reads, of either kind of node: setting one of these tells the node's
# watcher (dispatch's placement index) that its snapshot may have changed. Its job set and its
# backlog change in place, and tell it themselves (``JobSet``, ``Backlog``); measured speeds
# are folded in by ``observe_speed``, which tells it too.
WATCHED = frozenset({
    "jobs", "queued_tokens", "backlog", "draining", "closed", "reputation", "status", "policy",
    "models", "jobs_max", "profile", "features", "layer_ranges", "up_since_s", "stays",
    # another replica's node (replication/fleet.RemoteNode): its host's reports
    "available", "expected_stay_s", "host_active", "host_queued", "sent_since_report",
})

NodeWatch = Callable[[Any, str], None]  # (the node, what changed)


class Watched:
    """A node that tells its watcher when something its snapshot reads changes, so that
    placement re-reads the snapshots of those nodes only (``Dispatcher._refresh_index``)
    instead of asking every node on every admission. A mixin of ``NodeConn`` and
    ``RemoteNode``: an attribute in ``WATCHED`` set, a job added to or taken from its
    ``jobs``, its backlog moved, a speed observed."""

    _watch: NodeWatch | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "jobs" and type(value) is not JobSet:
            value = JobSet(value, self)
        object.__setattr__(self, name, value)
        if name == "backlog":
            value.node = self
        if name in WATCHED and self._watch is not None:
            self._watch(self, name)

    def set_watch(self, watch: NodeWatch | None) -> None:
        """Who is told of changes from now on (None: nobody)."""
        object.__setattr__(self, "_watch", watch)

    def changed(self, what: str) -> None:
        """Tell the watcher that ``what`` changed in place (a job set, the backlog, speeds)."""
        if self._watch is not None:
            self._watch(self, what)


class JobSet(set[str]):
    """A node's job ids: tells its node when a job starts or ends there (an in-place operator,
    ``jobs |= ...``, tells it by setting the attribute again)."""

    __slots__ = ("node",)

    def __init__(self, items: Iterable[str] = (), node: Watched | None = None) -> None:
        super().__init__(items)
        self.node = node

    def _changed(self) -> None:
        if self.node is not None:
            self.node.changed("jobs")

    def add(self, job_id: str) -> None:
        super().add(job_id)
        self._changed()

    def discard(self, job_id: object) -> None:
        super().discard(job_id)
        self._changed()

    def remove(self, job_id: str) -> None:
        super().remove(job_id)
        self._changed()

    def pop(self) -> str:
        job_id = super().pop()
        self._changed()
        return job_id

    def clear(self) -> None:
        super().clear()
        self._changed()

    def update(self, *others: Iterable[str]) -> None:
        super().update(*others)
        self._changed()

    def difference_update(self, *others: Iterable[Any]) -> None:
        super().difference_update(*others)
        self._changed()

    def intersection_update(self, *others: Iterable[Any]) -> None:
        super().intersection_update(*others)
        self._changed()

    def symmetric_difference_update(self, other: Iterable[str]) -> None:
        super().symmetric_difference_update(other)
        self._changed()

    def __reduce__(self) -> tuple[Any, ...]:  # copies are plain sets: no node to tell
        return (set, (list(self),))
