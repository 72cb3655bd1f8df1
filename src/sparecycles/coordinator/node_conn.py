"""The coordinator's view of the nodes connected to it: one ``NodeConn`` per open socket.

A ``NodeConn`` owns the outbound queue of its socket (a writer task drains it, so a slow node
never blocks dispatch), the node's last reported status, and the jobs it holds. It turns that into
the ``NodeSnapshot`` the scheduler reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields
from typing import Any

from sparecycles import availability
from sparecycles.coordinator.watch import Watched
from sparecycles.scheduling.stays import StayLearner, ended_by_window, learned_stay_s
from sparecycles.types import AvailabilityPolicy, DeviceProfile, NodeSnapshot

outbound_queue_max = 1024  # messages waiting for a node's socket before it is dropped
speed_ewma_weight = 0.3  # weight of the newest measurement in a node's measured decode speed
# A node's snapshot is reused while nothing it reads has changed, for at most this long: the
# availability windows move by the minute and the expected stay by the second, so a second-old
# answer is as good; rebuilding every snapshot on every placement pass cost ~30 us a node (a
# third of a second per pass on 10,000 nodes; docs/benchmarks.md, control plane).
snapshot_reuse_s_max = 1.0


def profile_from_dict(data: dict[str, Any]) -> DeviceProfile:
    """A DeviceProfile from a hello's profile, ignoring fields this coordinator does not know."""
    known = {f.name for f in fields(DeviceProfile)}
    return DeviceProfile(**{k: v for k, v in data.items() if k in known})


def policy_from_dict(data: dict[str, Any]) -> AvailabilityPolicy:
    known = {f.name for f in fields(AvailabilityPolicy)}
    clean = {k: v for k, v in data.items() if k in known}
    if "windows" in clean:
        clean["windows"] = tuple((int(a), int(b)) for a, b in clean["windows"])
    if clean.get("time_zone"):
        clean["time_zone"] = availability.check_time_zone(str(clean["time_zone"]))
    return AvailabilityPolicy(**clean)


def fold_speed(speeds: dict[str, float], batches: dict[str, float], model: str,
               tokens_per_s: float, batch: int) -> None:
    """Fold one measured decode speed, and the batch it ran in, into a node's running
    estimates (EWMA); shared by local nodes and other replicas' (fleet.RemoteNode)."""
    if tokens_per_s <= 0:
        return
    running = float(batch)
    old = speeds.get(model)
    if old is None:
        speeds[model], batches[model] = tokens_per_s, running
        return
    w = speed_ewma_weight
    speeds[model] = (1 - w) * old + w * tokens_per_s
    batches[model] = (1 - w) * batches.get(model, running) + w * running


@dataclass
class Backlog:
    """What this coordinator sent a node that the node has not worked through yet: each job's
    prompt tokens until its first token streams back (the node's prefill backlog: a new job's
    first token comes after those prompts), and the KV-cache tokens each job may fill (its
    prompt plus the tokens it may still generate) until it ends. Dispatch records a job when it
    sends it (``sent``) and when its first token arrives (``streaming``); a job that has left the
    node's job set is forgotten when the totals are read.

    The two sums are kept as the books change: placement reads every node's totals on every
    admission, and summing the books each time was ~6 % of a busy coordinator's main thread with
    50 nodes (docs/benchmarks.md, issue 19, third pass)."""

    prefill: dict[str, int] = field(default_factory=dict)
    kv: dict[str, int] = field(default_factory=dict)
    prefill_total: int = 0
    kv_total: int = 0
    node: Watched | None = field(default=None, repr=False, compare=False)  # told of changes

    def sent(self, job_id: str, prompt_tokens: int, new_tokens_max: int) -> None:
        self.forget(job_id)  # sent again (a new attempt): counted once
        self.prefill[job_id] = prompt_tokens
        self.kv[job_id] = prompt_tokens + new_tokens_max
        self.prefill_total += prompt_tokens
        self.kv_total += prompt_tokens + new_tokens_max
        if self.node is not None:
            self.node.changed("backlog")

    def streaming(self, job_id: str) -> None:
        moved = self.prefill.pop(job_id, 0)
        self.prefill_total -= moved
        if moved and self.node is not None:
            self.node.changed("backlog")

    def forget(self, job_id: str) -> None:
        """The job was never sent after all (or has left the node)."""
        moved = self.prefill.pop(job_id, 0)
        self.prefill_total -= moved
        kv = self.kv.pop(job_id, 0)
        self.kv_total -= kv
        if (moved or kv) and self.node is not None:
            self.node.changed("backlog")

    def totals(self, running: set[str]) -> tuple[int, int]:
        """(prefill backlog tokens, KV tokens reserved) of the jobs still in ``running``."""
        if len(self.kv) > len(running) or not self.kv.keys() <= running:
            for job_id in self.kv.keys() - running:  # a job's prefill entry is in kv too
                self.forget(job_id)
        return self.prefill_total, self.kv_total


@dataclass
class NodeConn(Watched):
    node_id: str
    owner_id: str
    name: str
    public_key: str
    profile: DeviceProfile
    policy: AvailabilityPolicy
    models: tuple[str, ...]
    weights: dict[str, str]  # model -> weights_sha256 the node reported
    jobs_max: int
    send_raw: Callable[[str], Awaitable[None]]
    status: availability.DeviceStatus = field(default_factory=availability.DeviceStatus)
    jobs: set[str] = field(default_factory=set)  # job ids running here
    queued_tokens: int = 0
    backlog: Backlog = field(default_factory=Backlog)
    draining: bool = False
    last_seen_s: float = field(default_factory=time.monotonic)
    measured_tps: dict[str, float] = field(default_factory=dict)
    measured_batch: dict[str, float] = field(default_factory=dict)  # the batch each was taken at
    reputation: float = 1.0
    features: frozenset[str] = frozenset()  # protocol.FEATURE_* from its hello
    stays: StayLearner | None = None  # the coordinator's learned stays (scheduling/stays.py)
    up_since_s: float = field(default_factory=time.time)  # epoch: this session's start
    layer_ranges: dict[str, tuple[int, int]] = field(default_factory=dict)  # stages it holds
    _outbox: asyncio.Queue[str | None] = field(
        default_factory=lambda: asyncio.Queue(outbound_queue_max)
    )
    _writer: asyncio.Task[None] | None = None
    closed: bool = False
    _snap: tuple[tuple[Any, ...], float, NodeSnapshot] | None = None  # (inputs, at, snapshot)

    def start(self) -> None:
        self._writer = asyncio.create_task(self._write_loop(), name=f"node-writer-{self.node_id}")

    async def _write_loop(self) -> None:
        while (frame := await self._outbox.get()) is not None:
            try:
                await self.send_raw(frame)
            except Exception:
                self.closed = True
                return

    def send(self, frame: str) -> bool:
        """Queue a frame; False (and the node is to be dropped) when its queue is full."""
        if self.closed:
            return False
        try:
            self._outbox.put_nowait(frame)
        except asyncio.QueueFull:
            self.closed = True
            return False
        return True

    async def stop(self) -> None:
        self.closed = True
        with contextlib.suppress(asyncio.QueueFull):
            self._outbox.put_nowait(None)
        if self._writer is not None:
            self._writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._writer

    def set_draining(self, draining: bool, now_epoch_s: float) -> None:
        """The node stopped taking work (its owner took it back, its window closed, its socket
        closed) or started again: the end of a session is one observation of how long nodes of
        its class stay (censored when the owner's window closed it), the start of one resets
        its age."""
        if draining and not self.draining and self.stays is not None:
            length = now_epoch_s - self.up_since_s
            ended = not ended_by_window(self.policy, now_epoch_s)
            self.stays.observe(self.profile.device_class, self.node_id, length, ended)
        elif not draining and self.draining:
            self.up_since_s = now_epoch_s
        self.draining = draining

    def observe_speed(self, model: str, tokens_per_s: float, batch: int | None = None) -> None:
        """Fold a job's measured decode speed into the node's running estimate (EWMA), with the
        batch it ran in: by default the jobs on the node now, the finishing one included (the
        caller observes before it ends the attempt). The scheduler compares the speed with the
        prediction at that batch, so a node measured while busy is not taken for a slow one."""
        fold_speed(self.measured_tps, self.measured_batch, model, tokens_per_s,
                   max(1, len(self.jobs) if batch is None else batch))
        self.changed("measured_tps")

    def snapshot(self, now_epoch_s: float) -> NodeSnapshot:
        """The scheduler's view of this node now (reused while its inputs are unchanged, for at
        most ``snapshot_reuse_s_max``)."""
        inputs = (len(self.jobs), self.queued_tokens, self.draining, self.reputation,
                  self.status, self.policy, self.models, self.jobs_max, self.profile,
                  self.backlog.totals(self.jobs))
        cached = self._snap
        if (cached is not None and cached[0] == inputs
                and abs(now_epoch_s - cached[1]) < snapshot_reuse_s_max
                and cached[2].measured_decode_tokens_per_s == self.measured_tps):
            return cached[2]
        snap = self._build_snapshot(now_epoch_s)
        self._snap = (inputs, now_epoch_s, snap)
        return snap

    def _expected_stay_s(self, now_epoch_s: float) -> float:
        """Learned from the sessions seen (per class, and per node as its history grows) when
        the coordinator keeps a learner; else bounded by the owner's window alone."""
        if self.stays is None:
            return availability.expected_stay_s(self.policy, self.status, now_epoch_s)
        return learned_stay_s(self.stays, self.profile.device_class, self.node_id, self.policy,
                              self.status, now_epoch_s, self.up_since_s)  # fmt: skip

    def _build_snapshot(self, now_epoch_s: float) -> NodeSnapshot:
        prefill_tokens, kv_tokens = self.backlog.totals(self.jobs)
        return NodeSnapshot(
            node_id=self.node_id,
            owner_id=self.owner_id,
            profile=self.profile,
            models=self.models,
            active_jobs=len(self.jobs),
            jobs_max=self.jobs_max,
            queued_tokens=self.queued_tokens,
            prefill_backlog_tokens=prefill_tokens,
            kv_reserved_tokens=kv_tokens,
            measured_decode_tokens_per_s=dict(self.measured_tps),
            measured_decode_batch=dict(self.measured_batch),
            available=not self.draining
            and availability.is_available(self.policy, self.status, now_epoch_s),
            expected_stay_s=self._expected_stay_s(now_epoch_s),
            reputation=self.reputation,
            draining=self.draining,
            features=self.features,
            layer_ranges=dict(self.layer_ranges),
        )
