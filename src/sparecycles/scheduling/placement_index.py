"""Placing one job without scanning the fleet: the scheduler's rankings, kept between calls.

``scheduler.schedule`` builds, on every call, a load for every node, groups the nodes that serve
the job's model by (device class, accelerator, price), and ranks every group larger than
``group_candidates`` by a typical job's predicted completion, only to weigh the first few
entries of each ranking for the job itself. A coordinator calls it on every admission with one
job, and between two calls only the nodes whose load moved have new snapshots.

``PlacementIndex`` keeps those rankings from call to call: per model and typical job size
(``scheduler._typical_job`` of the job: its quantised prompt and answer), each group's members
as a sorted list of (score, position), where the position is the node's place in the list of
snapshots (the scheduler's tie-break). ``sync`` takes the fleet's snapshots and marks the nodes
whose snapshot is a new object; a ranking re-scores only those, each moved in O(log n) by
bisection, when it is next used. ``place`` then offers the scheduler's own search
(``scheduler._best_for``) the first ``group_candidates`` entries of each ranked group (and the
first ``group_rank_local_scan`` when some node is relayed: the replica's own nodes are looked
for that far down) and every member of a small group: what ``schedule`` would weigh, so the
answer is ``schedule([job], snapshots)``'s, node for node (tests/unit/test_placement_index.py
compares them on random fleets and event sequences). Placing a job costs O(changed nodes ·
log n + groups · candidates) instead of O(n) loads, n cached scores and a sort of each group.

Where that shortcut would not be exact, ``place`` answers None and the caller runs the full
scan: the baseline policies, disaggregated prefill/decode (its pairs are searched over what
each job weighed, and pushes reorder the rankings within a call), a group larger than
``group_rank_max`` (cut to its least-loaded members by a key that reads the queue), the same
node twice in the snapshots.

Pure, like the scheduler: no clock, no I/O. One event loop owns it (no locks).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from sparecycles.errors import invariant
from sparecycles.scheduling.scheduler import (
    SchedulerConfig,
    _best_for,
    _Group,
    _group_key,
    _Load,
    _predict,
    _quantised,
    _Ranking,
    _typical_job,
    node_can_serve,
)
from sparecycles.types import Assignment, Job, ModelSpec, NodeSnapshot

GroupKey = tuple[object, ...]
_POLICIES = ("fastest", "cheapest-within-deadline")  # the policies whose search is ranked


def _load(snap: NodeSnapshot) -> _Load:
    return _Load(snap, snap.active_jobs, snap.queued_tokens, snap.last_assigned_s)


@dataclass(slots=True)
class _Members:
    """One group of one ranking: its members by (score, position), and their positions."""

    entries: list[tuple[float, int]] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)


@dataclass(slots=True)
class _Rankings:
    """The groups of one model for one typical job, kept sorted as nodes change."""

    model: str
    typical: Job
    groups: dict[GroupKey, _Members] = field(default_factory=dict)
    at: dict[int, tuple[GroupKey, float]] = field(default_factory=dict)  # position -> its entry
    stale: set[int] = field(default_factory=set)  # positions whose snapshot changed since

    def score(self, snap: NodeSnapshot, spec: ModelSpec, now_s: float,
              config: SchedulerConfig) -> float:  # fmt: skip
        # the score does not read now_s (only stay_ok does): the same at any call, as RankMemo's
        return _predict(self.typical, _load(snap), spec, now_s, config).score_s

    def build(self, snaps: Mapping[int, NodeSnapshot], spec: ModelSpec, now_s: float,
              config: SchedulerConfig) -> None:  # fmt: skip
        for p in sorted(snaps):
            hit = self._place(p, snaps[p], spec, now_s, config)
            if hit is not None:
                members, score = hit
                members.entries.append((score, p))
                members.positions.append(p)  # in order already
        for members in self.groups.values():
            members.entries.sort()
        self.stale.clear()

    def drop(self, p: int) -> None:
        hit = self.at.pop(p, None)
        if hit is None:
            return
        key, score = hit
        members = self.groups[key]
        i = bisect.bisect_left(members.entries, (score, p))
        invariant(i < len(members.entries) and members.entries[i] == (score, p),
                  "placement index: a ranked node is missing from its group")
        del members.entries[i]
        j = bisect.bisect_left(members.positions, p)
        del members.positions[j]
        if not members.positions:
            del self.groups[key]

    def refresh(self, snaps: Mapping[int, NodeSnapshot], spec: ModelSpec, now_s: float,
                config: SchedulerConfig) -> None:  # fmt: skip
        """Re-score the nodes whose snapshot changed since the last use."""
        for p in self.stale:
            self.drop(p)
            snap = snaps.get(p)
            hit = None if snap is None else self._place(p, snap, spec, now_s, config)
            if hit is not None:
                members, score = hit
                bisect.insort(members.entries, (score, p))
                bisect.insort(members.positions, p)
        self.stale.clear()

    def _place(self, p: int, snap: NodeSnapshot, spec: ModelSpec, now_s: float,
               config: SchedulerConfig) -> tuple[_Members, float] | None:  # fmt: skip
        """The group node ``p`` belongs in (made if new) and its score, recorded in ``at``;
        None when it cannot serve the model. The caller puts the entry in the group."""
        if not node_can_serve(snap, self.model, config):
            return None
        key = _group_key(snap)
        score = self.score(snap, spec, now_s, config)
        members = self.groups.get(key)
        if members is None:
            members = self.groups[key] = _Members()
        self.at[p] = (key, score)
        return members, score


class PlacementIndex:
    """The fleet's snapshots and, per (model, typical job size), its groups kept ranked.

    Nodes are kept by position: the order ``schedule`` would be given them in (its tie-break
    between equal scores). Either the caller gives each node's position (``put``, ``drop``:
    the coordinator, as nodes change), or the whole list each time (``sync``: positions from
    its order). ``rankings_max`` bounds the typical sizes kept at once (each is one score per
    node serving its model); the least recently used goes first. Short chats of one service
    fall on a few sizes (sizes are quantised to steps of 19 %)."""

    def __init__(self, rankings_max: int = 16) -> None:
        invariant(rankings_max >= 1, "rankings_max must be at least 1")
        self.rankings_max = rankings_max
        self._snaps: dict[int, NodeSnapshot] = {}  # position -> snapshot
        self._pos: dict[str, int] = {}  # sync only: node id -> position
        self._next = 0
        self._relayed = 0  # snapshots with relayed set
        self.layered = 0  # snapshots holding layers of a model (stages of chains)
        self.free = 0  # snapshots with a free slot
        self._duplicates = False
        self._rankings: OrderedDict[tuple[str, int, int], _Rankings] = OrderedDict()
        self._config: SchedulerConfig | None = None
        self.rescored = 0  # nodes re-scored, all rankings together (for tests and benchmarks)

    def __len__(self) -> int:
        return len(self._snaps)

    def snapshot(self, pos: int) -> NodeSnapshot | None:
        return self._snaps.get(pos)

    def _count(self, snap: NodeSnapshot, sign: int) -> None:
        self._relayed += sign * snap.relayed
        self.layered += sign * bool(snap.layer_ranges)
        self.free += sign * (snap.active_jobs < snap.jobs_max)

    def put(self, pos: int, snap: NodeSnapshot) -> bool:
        """The node at ``pos`` as it is now; False if that is the snapshot already kept."""
        old = self._snaps.get(pos)
        if old is snap:
            return False
        if old is not None:
            self._count(old, -1)
        self._snaps[pos] = snap
        self._count(snap, 1)
        for ranking in self._rankings.values():
            ranking.stale.add(pos)
        return True

    def drop(self, pos: int) -> None:
        """The node at ``pos`` is gone (or takes no work: closed, draining)."""
        old = self._snaps.pop(pos, None)
        if old is None:
            return
        self._count(old, -1)
        for ranking in self._rankings.values():
            ranking.drop(pos)
            ranking.stale.discard(pos)

    def sync(self, snapshots: Sequence[NodeSnapshot]) -> None:
        """The fleet as the scheduler would be given it now, in the same order. Nodes whose
        snapshot is the object of the last call are left as they are (O(1) each)."""
        pos = self._pos
        prev, ordered = -1, True
        for snap in snapshots:
            p = pos.get(snap.node_id)
            if p is None:
                p = pos[snap.node_id] = self._next
                self._next += 1
            self.put(p, snap)
            if p <= prev:
                ordered = False  # a node came back before others, or is listed twice
            prev = p
        if not ordered:
            self._reset(snapshots)
            return
        self._duplicates = False  # in order: each node once
        if len(pos) != len(snapshots):
            present = {s.node_id for s in snapshots}
            for node_id in [n for n in pos if n not in present]:
                self.drop(pos.pop(node_id))

    def _reset(self, snapshots: Sequence[NodeSnapshot]) -> None:
        """Positions anew from the list's order (a node moved in it): every ranking is dropped."""
        self._pos.clear()
        self._snaps.clear()
        self._rankings.clear()
        self._relayed = self.layered = self.free = 0
        self._duplicates = False
        for i, snap in enumerate(snapshots):
            if snap.node_id in self._pos:
                self._duplicates = True  # declined until the list names each node once
                continue
            self._pos[snap.node_id] = i
            self.put(i, snap)
        self._next = len(snapshots)

    def place(
        self,
        job: Job,
        models: Mapping[str, ModelSpec],
        now_s: float,
        config: SchedulerConfig,
        overrides: Mapping[str, NodeSnapshot] | None = None,
    ) -> list[Assignment] | None:
        """``schedule([job], snapshots, models, now_s, config)`` for the synced snapshots, each
        replaced by ``overrides[node_id]`` where given (the same node with what its prefix
        cache holds for this job: ``cached_prefixes``, which a typical job's ranking does not
        read; nothing else may differ). None where the index cannot give the same answer:
        the caller runs ``schedule``."""
        if config.policy not in _POLICIES or config.disaggregate or self._duplicates:
            return None
        spec = models.get(job.model)
        if spec is None or not self.free:
            return []  # no such model, or every node is busy: schedule() returns [] too
        if config is not self._config and config != self._config:
            self._rankings.clear()  # scores depend on the config
        self._config = config
        # the typical job of a call of one job: its own sizes, quantised (_typical_job's key,
        # without building the job unless its ranking is new)
        key = (job.model, _quantised(job.prompt_tokens + job.generated_tokens),
               _quantised(max(1, job.remaining_tokens)))
        ranking = self._rankings.get(key)
        if ranking is None:
            typical = _typical_job([job])
            invariant((typical.prompt_tokens, typical.max_tokens) == key[1:],
                      "placement index: a typical job's sizes differ from its key")
            ranking = self._rankings[key] = _Rankings(job.model, typical)
            ranking.build(self._snaps, spec, now_s, config)
            self.rescored += len(ranking.at)
            while len(self._rankings) > self.rankings_max:
                self._rankings.popitem(last=False)
        else:
            self._rankings.move_to_end(key)
            self.rescored += len(ranking.stale)
            ranking.refresh(self._snaps, spec, now_s, config)
        top = config.group_candidates
        if self._relayed:  # _best_for looks this far down for the replica's own nodes
            top = max(top, config.group_rank_local_scan)
        snaps = self._snaps

        def load_of(p: int) -> _Load:
            snap = snaps[p]
            if overrides:
                snap = overrides.get(snap.node_id, snap)
            return _load(snap)

        groups: dict[GroupKey, _Group] = {}
        # in the order schedule() meets them: by their first member's position (ties between
        # groups go to the first group weighed)
        for gkey, members in sorted(ranking.groups.items(), key=lambda kv: kv[1].positions[0]):
            size = len(members.positions)
            if size > config.group_rank_max:
                return None  # schedule() cuts such a group by load first: not kept here
            if size <= config.group_candidates:
                groups[gkey] = _Group(members=[load_of(p) for p in members.positions])
            else:  # ranked: the entries schedule() would read first, none stale yet
                ranked = [(score, i, load_of(p), 0)
                          for i, (score, p) in enumerate(members.entries[:top])]
                groups[gkey] = _Group(ranked=ranked)
        view = _Ranking(groups={job.model: groups}, typical={job.model: ranking.typical})
        best = _best_for(job, view, spec, now_s, config)
        if best is None or best[1].full:  # none can take it, or it waits for a busy node
            return []
        prediction, load = best
        return [Assignment(job.job_id, load.node.node_id, now_s + prediction.total_s)]
