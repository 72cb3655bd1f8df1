"""The job lifecycle: the only glue between the API, the scheduler, the nodes, the store and money.

    admitted --(scheduler picks a node)--> placed --(first token)--> streaming --> done
        ^                                                    |                 \\-> failed
        \\------ node left / went silent: resumed elsewhere --/

Guarantees, each enforced below:
- A job's tokens reach its client in order, each exactly once, across attempts: an attempt
  starts from the prompt plus every token already delivered, and token messages are matched to
  the attempt and position they claim (duplicates dropped, gaps end the attempt).
- Every wait is bounded: placement (``placement_wait_s``), silence of a node on a job
  (``token_gap_s``), attempts (``limits.job_attempts_max``).
- Money follows the outcome: a job is admitted only with a hold on the client's balance; a job
  that ends with tokens delivered is settled for exactly those tokens, shared between the nodes
  that produced them; a job that delivered nothing has its hold voided.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from sparecycles import limits, protocol
from sparecycles.coordinator.chains import ChainRegistry
from sparecycles.coordinator.fleet_node import FleetNode
from sparecycles.coordinator.handoff import Disagg, KvHandoff, pick_receiver, relayed
from sparecycles.coordinator.jobs import (
    Attempt,
    JobEvent,
    JobEventKind,
    JobObserver,
    LiveJob,
    observed_decode_tokens_per_s,
)
from sparecycles.coordinator.node_conn import NodeConn
from sparecycles.coordinator.placement import LivePlacement
from sparecycles.coordinator.prefixes import PrefixIndex, block_keys
from sparecycles.coordinator.replication.leases import settle_abandoned
from sparecycles.coordinator.writer import StoreWriter
from sparecycles.errors import Conflict, JobFailed, NoNodeAvailable, SpareCyclesError
from sparecycles.identity import verify
from sparecycles.ledger.service import Ledger, WorkShare
from sparecycles.scheduling import scheduler
from sparecycles.store import Store
from sparecycles.trust.decisions import check_metering_bounds
from sparecycles.types import (
    Assignment,
    AttemptOutcome,
    Job,
    JobFinal,
    JobRecord,
    JobState,
    ModelSpec,
    NodeSnapshot,
    SamplingParams,
    Workload,
)

log = logging.getLogger("sparecycles.coordinator.dispatch")
watchdog_interval_s = 0.25
prefix_tokens_min = 32  # shorter prompts gain too little from a node's prefix cache to look


@dataclass(frozen=True, slots=True)
class Now:
    """One reading of the three clocks dispatch uses, taken once where an event enters and
    passed down: epoch seconds (what is stored and shown), monotonic seconds (every wait,
    timeout and duration) and perf-counter seconds (the API's overhead metrics)."""

    epoch_s: float
    mono_s: float
    perf_s: float

    @staticmethod
    def read() -> Now:
        return Now(time.time(), time.monotonic(), time.perf_counter())


class Dispatcher:
    def __init__(
        self,
        *,
        store: Store,
        ledger: Ledger,
        models: dict[str, ModelSpec],
        replica_id: str,
        placement_wait_s: float = limits.placement_wait_s_max,
        token_gap_s: float = limits.token_gap_s_max,
        policy: str = "fastest",
        disagg: str = "off",
        on_finished: Callable[[LiveJob, str], None] | None = None,
        verifier: JobObserver | None = None,
        clock: Callable[[], Now] = Now.read,
    ):
        self.store, self.ledger, self.models = store, ledger, models
        self.replica_id = replica_id
        self.placement_wait_s, self.token_gap_s = placement_wait_s, token_gap_s
        # disaggregated prefill/decode (coordinator/handoff.py): "auto" follows the scheduler's
        # roofline rule (SchedulerConfig.disaggregate), "always" hands off whenever it can
        self.disagg = Disagg(disagg)
        self.config = scheduler.SchedulerConfig(policy=policy,
                                                disaggregate=self.disagg is Disagg.AUTO)
        self.kv_held_bytes = 0  # hand-offs' KV caches held here (handoff.kv_held_bytes_max)
        self.handoffs = {"started": 0, "sent": 0, "failed": 0}  # counted, for /metrics and tests
        self._rank_memo = scheduler.RankMemo()  # placement reuses unchanged nodes' scores
        # one job placed at a time (each admission) through the placement index, kept current
        # from the nodes' own changes (coordinator/placement.py)
        self.placement = LivePlacement()
        self._job_views: dict[str, tuple[tuple[int, int], LiveJob, Job]] = {}  # _job_view
        # which node's prefix cache holds which conversation: its next turn is offered there
        self.prefixes = PrefixIndex()
        self.prefix_aware = True
        self._ending: set[asyncio.Future[None]] = set()  # jobs ending: settling, then told
        # nodes connected to this replica, and nodes of other replicas
        # (coordinator/replication/fleet.py): dictionaries that tell placement who comes and goes
        self.nodes: dict[str, NodeConn] = self.placement.nodes
        self.remote: dict[str, FleetNode] = self.placement.remote
        self.jobs: dict[str, LiveJob] = {}
        self.waiting: dict[str, LiveJob] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.writer = StoreWriter(store)  # store writes after admission, in order
        self._on_finished = on_finished
        self.verifier = verifier  # told of every result, to check claims and spot-check jobs
        self.clock = clock  # read where an event enters; everything below takes ``now``
        self.chains = ChainRegistry(self)  # jobs served by chains of stages (chains.py)

    # ---- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        await asyncio.to_thread(self._recover)
        self._task = asyncio.create_task(self._loop(), name="dispatch")
        self.writer.start()

    async def stop(self) -> None:
        await self.chains.stop()
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in list(self.jobs.values()):
            await self._finish(job, self.clock(),
                               error=JobFailed("the coordinator is shutting down"))
        await self.writer.drain()
        if self._ending:  # settled by now: their clients are told
            await asyncio.gather(*self._ending, return_exceptions=True)
        await self.writer.stop()

    def _recover(self) -> None:
        """Settle jobs a previous run of this replica left open (it crashed or was killed).

        Their clients' connections died with that process, so nothing more can be delivered:
        the holds are voided and the jobs marked failed (a job settled just before the crash
        keeps its charge). No money moves for undelivered work.
        """
        for row in self.store.unfinished_jobs(self.replica_id):
            settle_abandoned(self.store, self.ledger, row.id, "coordinator restarted")
        self.store.mark_replica_nodes_offline(self.replica_id)

    # ---- admission ---------------------------------------------------------------------------

    async def admit(
        self,
        *,
        job_id: str,
        client_id: str,
        api_key_id: str | None,
        model: str,
        endpoint: str,
        prompt_ids: list[int],
        sampling: SamplingParams,
        stream: bool,
        workload: Workload = Workload.INFERENCE,
        trusted_only: bool = False,
        received_perf_s: float | None = None,
    ) -> LiveJob:
        """Record the job and hold its most possible cost; raises InsufficientBalance (429).

        The job row and the hold are one transaction (one commit, shared by the admissions of
        the moment: the ledger's group commit), durable before any node is sent the job. When
        no other job waits, the job is placed here and now rather than on the dispatch loop's
        next turn: its node is chosen (and its slot taken) before the hold, so that the
        attempt's row rides in the hold's transaction too, and the node is sent the job once
        that has committed (one commit a job fewer than placing after the hold).
        """
        now = self.clock()
        if len(self.waiting) >= limits.jobs_waiting_max:
            raise NoNodeAvailable("too many requests are waiting for a node; retry shortly")
        job = LiveJob(
            job_id=job_id,
            client_id=client_id,
            model=model,
            prompt_ids=prompt_ids,
            sampling=sampling,
            workload=workload,
            trusted_only=trusted_only,
            admitted_epoch_s=now.epoch_s,
            admitted_mono_s=now.mono_s,
            waiting_since_mono_s=now.mono_s,
            received_perf_s=received_perf_s or now.perf_s,
        )
        placing_perf_s = time.perf_counter()
        placed = self._reserve(job, now) if not self.waiting and self._task is not None else None
        holding_perf_s = time.perf_counter()
        row = JobRecord(
            id=job_id,
            client_id=client_id,
            api_key_id=api_key_id,
            model=model,
            endpoint=endpoint,
            workload=workload,
            state=JobState.PLACED if placed else JobState.ADMITTED,
            stream=stream,
            trusted_only=trusted_only,
            prompt_tokens=len(prompt_ids),
            max_tokens=sampling.max_tokens,
            replica_id=self.replica_id,
            created_at_s=now.epoch_s,
            node_id=placed[0].node_id if placed else None,
            attempts=1 if placed else 0,
        )
        start = None
        if placed:
            start = dict(attempt=1, node_id=placed[0].node_id, prompt_tokens=len(prompt_ids),
                         outcome=str(AttemptOutcome.RUNNING), started_at_s=now.epoch_s)
        try:
            await self.ledger.hold_async(job_id, client_id, model, len(prompt_ids),
                                         sampling.max_tokens, job=row, workload=workload,
                                         attempt_start=start)
        except BaseException:
            if placed:
                self._unreserve(job, placed[0])
            raise
        self.jobs[job_id] = job
        job.placement_s = holding_perf_s - placing_perf_s
        job.hold_s = time.perf_counter() - holding_perf_s
        if placed:
            self._send(job, *placed, self.clock())  # after the hold's commit: a new reading
        else:
            self.waiting[job_id] = job
            self._wake.set()
        return job

    def _reserve(self, job: LiveJob, now: Now) -> tuple[FleetNode, str] | None:
        """Choose the node for a job alone and take its slot (its attempt begins), without
        sending it anything yet; None when no node can take it now (the loop will try)."""
        try:
            if self.placement.refresh(now.epoch_s):  # no node holds stages: no chain to weigh
                if not len(self.placement.index):
                    return None
                assignments = self._schedule([job], now)
            else:
                snapshots = self._snapshots(now)
                if self.chains.plan_for(job, snapshots) is not None:
                    return None  # a chain serves it: the loop places it there (_place_waiting)
                assignments = self._schedule([job], now, snapshots)
            node = self.node(assignments[0].node_id) if assignments else None
            if node is None:
                return None
            return node, self._begin_attempt(job, node, now,
                                             decode_node_id=assignments[0].decode_node_id)
        except Exception:  # the loop places it on its next turn; a bug here is logged loudly
            log.exception("placement on admission failed")
            return None

    def _unreserve(self, job: LiveJob, node: FleetNode) -> None:
        """Undo ``_begin_attempt`` on ``node`` (the job's hold was refused, or the node could not
        be sent the job): its slot is free again, and the job has no such attempt."""
        att = job.attempts.pop()
        job.handoff = None
        node.jobs.discard(job.job_id)
        node.queued_tokens = max(0, node.queued_tokens - (job.sampling.max_tokens - att.token_base))
        node.backlog.forget(job.job_id)
        job.state = JobState.ADMITTED

    # ---- placement ---------------------------------------------------------------------------

    async def _loop(self) -> None:
        while True:
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation that
            # arrives as its timeout fires, and stop() would wait for ever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(watchdog_interval_s):
                    await self._wake.wait()
            self._wake.clear()
            try:
                self._place_waiting(self.clock())
                await self._watchdog(self.clock())
            except Exception:  # a bug here must not stop all placement; it is logged loudly
                log.exception("dispatch loop iteration failed")

    def _place_waiting(self, now: Now) -> None:
        if not self.waiting:
            return
        if self.placement.refresh(now.epoch_s):  # no chains to weigh
            if not self.placement.index.free:
                return  # every node is busy: each job waits (scheduler.schedule returns [])
            if len(self.waiting) == 1:
                self._place(self._schedule(list(self.waiting.values()), now), now)
                return
        snapshots = self._snapshots(now)
        if not snapshots:
            return
        # chains first (models no whole-model node serves, or where a chain is predicted faster
        # by the margin: coordinator/chains.ChainRegistry.plan_for), then whole-model nodes
        if any(s.layer_ranges for s in snapshots):
            chained = self.chains.place(list(self.waiting.values()), snapshots, now)
            for job_id in chained:
                placed = self.waiting.pop(job_id)
                if placed.dispatched_perf_s is None:
                    placed.dispatched_perf_s = now.perf_s
            if not self.waiting:
                return
            if chained:  # their stages' nodes hold one more job each
                snapshots = [n.snapshot(now.epoch_s) for n in self.all_nodes()
                             if not n.closed and not n.draining]
        self._place(self._schedule(list(self.waiting.values()), now, snapshots), now)

    def _place(self, assignments: list[Assignment], now: Now) -> None:
        for assignment in assignments:
            job = self.waiting.get(assignment.job_id)
            node = self.node(assignment.node_id)
            if job is None or node is None:
                continue
            self._assign(job, node, now, decode_node_id=assignment.decode_node_id)

    def _snapshots(self, now: Now) -> list[NodeSnapshot]:
        """Every node that takes work, as the full scan reads it (in ``all_nodes``' order)."""
        return [n.snapshot(now.epoch_s) for n in self.all_nodes()
                if not n.closed and not n.draining]

    def _schedule(self, lives: list[LiveJob], now: Now,
                  snapshots: list[NodeSnapshot] | None = None) -> list[Assignment]:
        """The scheduler's assignments for ``lives``. One job, with no ``snapshots`` given (the
        index is fresh: ``placement.refresh``), is placed through the placement index, which
        re-scored only the nodes that changed since its last call; a queue, or what the index
        cannot answer exactly, by the full scan over ``snapshots`` (read now if not given).
        Both give the same answer."""
        if len(lives) == 1 and snapshots is None:
            jobs, overrides = self._scheduler_view(lives, self.placement.snapshot_of)
            placed = self.placement.index.place(jobs[0], self.models, now.epoch_s, self.config,
                                                overrides)
            if placed is not None:
                return placed
        if snapshots is None:
            snapshots = self._snapshots(now)
        full = snapshots
        by_id: dict[str, NodeSnapshot] = {}

        def snapshot_of(node_id: str) -> NodeSnapshot | None:  # built if a prefix is held
            if not by_id:
                by_id.update((s.node_id, s) for s in full)
            return by_id.get(node_id)

        jobs, overrides = self._scheduler_view(lives, snapshot_of)
        if overrides:
            snapshots = [overrides.get(s.node_id, s) for s in snapshots]
        return scheduler.schedule(jobs, snapshots, self.models, now.epoch_s, self.config,
                                  memo=self._rank_memo)

    def _scheduler_view(self, lives: list[LiveJob],
                        snapshot_of: Callable[[str], NodeSnapshot | None]
                        ) -> tuple[list[Job], dict[str, NodeSnapshot]]:
        """The jobs as the scheduler sees them, and the nodes that differ for them: with
        prefix-aware placement, a job whose prompt starts with what a node's prefix cache holds
        (at least half the prompt: the next turn of a conversation, not a shared system prompt
        alone) is marked, and those nodes' snapshots (returned by node id, to stand in for
        theirs) tell the scheduler so: it predicts their prefill of the rest only."""
        jobs = [self._job_view(live) for live in lives]
        if not (self.prefix_aware and len(self.prefixes)):
            return jobs, {}
        held: dict[str, dict[str, int]] = {}  # node -> job -> tokens it holds
        marked: list[Job] = []
        for job, live in zip(jobs, lives, strict=True):
            prompt = live.prompt_ids + live.generated
            if len(prompt) < 2 * prefix_tokens_min:
                marked.append(job)
                continue
            hits = self.prefixes.hits(block_keys(prompt), most_tokens=len(prompt) - 1,
                                      least_tokens=len(prompt) // 2)
            for node_id, tokens in hits.items():
                held.setdefault(node_id, {})[job.job_id] = tokens
            marked.append(dataclasses.replace(job, prefix_key=job.job_id,
                                              prefix_tokens=len(prompt)) if hits else job)
        overrides = {}
        for node_id, by_job in held.items():
            snap = snapshot_of(node_id)
            if snap is not None:  # a node that takes work now
                overrides[node_id] = dataclasses.replace(snap, cached_prefixes=by_job)
        return (marked, overrides) if held else (jobs, {})

    def _job_view(self, live: LiveJob) -> Job:
        """``live.as_job()``, kept while the job waits: a queue of 48 is offered to the
        scheduler whenever a slot frees, and building each Job again was half of placement's
        samples then (py-spy, 2 real nodes at 64 streams). What can change while a job waits
        is what it has generated (a resumed job) and the nodes it avoids (a set that grows)."""
        if live.job_id not in self.waiting:  # placed as it is admitted: once
            return live.as_job()
        key = (len(live.generated), len(live.avoid_nodes))
        kept = self._job_views.get(live.job_id)
        if kept is not None and kept[0] == key and kept[1] is live:
            return kept[2]
        job = live.as_job()
        if len(self._job_views) >= 2 * len(self.waiting) + 64:  # only waiting jobs are kept
            self._job_views = {k: v for k, v in self._job_views.items() if k in self.waiting}
        self._job_views[live.job_id] = (key, live, job)
        return job

    def all_nodes(self) -> list[FleetNode]:
        """Every node this replica can place work on: its own, and its peers' (relayed)."""
        return [*self.nodes.values(), *self.remote.values()]

    def node(self, node_id: str) -> FleetNode | None:
        """A node of the fleet: connected here, or to another replica."""
        return self.nodes.get(node_id) or self.remote.get(node_id)

    def _assign(self, job: LiveJob, node: FleetNode, now: Now, *, decode_node_id: str = "",
                handoff: KvHandoff | None = None) -> None:
        """Send a waiting job to ``node``; its attempt's row is queued on the writer. With
        ``handoff`` (complete), the attempt decodes from that KV cache, sent right after."""
        if node.closed:
            return  # the node's socket is gone; its reader will clean up
        frame = self._begin_attempt(job, node, now, decode_node_id=decode_node_id,
                                    kv_import=handoff.layout if handoff else None)
        att = job.attempts[-1]
        if not node.send(frame):  # its queue is full: it is being dropped; the job waits on
            self._unreserve(job, node)
            self.waiting[job.job_id] = job
            return
        if handoff is not None:  # the cache, renumbered to this attempt (a full queue: the
            for chunk in handoff.chunks:  # node is dropped and the job resumed as any)
                if not node.send(relayed(chunk, att.number)):
                    break
            self.handoffs["sent"] += 1
        if job.dispatched_perf_s is None:
            job.dispatched_perf_s = now.perf_s
        self.writer.background(
            self.store.start_attempt,
            job_id=job.job_id,
            attempt=att.number,
            node_id=node.node_id,
            prompt_tokens=len(job.prompt_ids) + att.token_base,
        )

    def _begin_attempt(self, job: LiveJob, node: FleetNode, now: Now, *,
                       decode_node_id: str = "", kv_import: protocol.KvLayout | None = None
                       ) -> str:
        """The job's next attempt on ``node``: its slot taken, its message made (not sent).
        Where placement hands the job's decode to another node (``_receiver_for``), this
        attempt prefills it, samples its first token and exports its KV cache."""
        number = len(job.attempts) + 1
        prompt = job.prompt_ids + job.generated
        remaining = job.sampling.max_tokens - len(job.generated)
        receiver = None if kv_import else self._receiver_for(job, node, decode_node_id)
        job.handoff = None
        if receiver is not None:
            job.handoff = KvHandoff(receiver, number, len(prompt))
            self.handoffs["started"] += 1
            remaining = 1  # the prefill's token; the receiver decodes the rest
        prompt_sha256 = protocol.tokens_sha256(prompt)
        msg = protocol.JobAssign(
            job_id=job.job_id,
            attempt=number,
            model=job.model,
            prompt_token_ids=prompt,
            sampling=protocol.Sampling.of(job.sampling, max_tokens=remaining),
            prompt_sha256=prompt_sha256,
            want_logprobs=self.verifier is not None or _client_logprobs(job.sampling),
            resumed_tokens=len(job.generated),
            kv_export=receiver is not None,
            kv_import=kv_import,
        )
        job.attempts.append(
            Attempt(
                number=number,
                node_id=node.node_id,
                owner_id=node.owner_id,
                device_class=node.profile.device_class,
                token_base=len(job.generated),
                started_mono_s=now.mono_s,
                last_token_mono_s=now.mono_s,
                kv_positions=kv_import.positions if kv_import else 0,
                prefilled_tokens=len(prompt) - kv_import.positions if kv_import else None,
                prompt_sha256=prompt_sha256,
            )
        )
        job.state = JobState.PLACED
        node.jobs.add(job.job_id)
        node.queued_tokens += remaining
        node.backlog.sent(job.job_id, len(prompt), remaining)
        spec = self.models.get(job.model)
        if spec is not None:
            job.attempts[-1].first_token_grace_s = first_token_grace_s(
                spec.n_params, node.backlog.totals(node.jobs)[0], node.profile.peak_flops)
        self.waiting.pop(job.job_id, None)
        return protocol.encode(msg)

    def _receiver_for(self, job: LiveJob, sender: FleetNode, decode_node_id: str) -> str | None:
        """The node to decode ``job`` after ``sender`` prefills it, or None (no hand-off): the
        scheduler's choice (``disagg = "auto"``), or under ``"always"`` the least busy other
        node that can take it. Only a first attempt is handed off, only between nodes on this
        replica's sockets that can hand off a cache, and only with more than one token to
        come."""
        if (self.disagg is Disagg.OFF or job.chain is not None or job.generated
                or job.sampling.max_tokens < 2 or not isinstance(sender, NodeConn)
                or protocol.FEATURE_KV_HANDOFF not in sender.features):
            return None

        def can_take(n: NodeConn) -> bool:
            return (not n.closed and not n.draining and job.model in n.models
                    and protocol.FEATURE_KV_HANDOFF in n.features
                    and n.reputation >= (self.config.trusted_reputation_min if job.trusted_only
                                         else self.config.reputation_min))

        if decode_node_id:
            receiver = self.nodes.get(decode_node_id)
            return decode_node_id if receiver is not None and can_take(receiver) else None
        if self.disagg is not Disagg.ALWAYS:
            return None
        return pick_receiver([(n.node_id, len(n.jobs), n.jobs_max) for n in self.nodes.values()
                              if can_take(n)], sender.node_id, job.avoid_nodes)

    def on_kv_chunk(self, node: FleetNode, msg: protocol.KvChunk) -> None:
        """A chunk of the KV cache a job's prefilling attempt hands off: checked and held."""
        try:
            job, att = self._attempt_of(node, msg.job_id, msg.attempt)
        except _StaleMessage:
            return
        h = job.handoff
        if h is None or h.sender_attempt != att.number:
            return  # not asked for: dropped
        self.kv_held_bytes += h.add(msg, self.models[job.model], self.kv_held_bytes)
        att.last_token_mono_s = self.clock().mono_s  # the node is at work, not silent
        if h.error is not None:
            log.warning("job %s: hand-off from node %s refused: %s", job.job_id, node.node_id,
                        h.error)

    def _drop_handoff(self, job: LiveJob) -> KvHandoff | None:
        """Take the job's hand-off away (it goes ahead or is given up); its bytes are freed."""
        h, job.handoff = job.handoff, None
        if h is not None:
            self.kv_held_bytes -= h.held_bytes
        return h

    def _hand_off(self, job: LiveJob, h: KvHandoff, now: Now) -> None:
        """The sender's attempt is done: the job goes to the receiver with the cache, or, when
        that cannot be, back to the queue with its first token (placed as any resumed job)."""
        self._write_attempt_ends(job)  # before the next attempt's start, in the writer's order
        receiver = self.nodes.get(h.receiver_id)
        why = h.error or ("" if h.complete else "the KV cache did not all arrive")
        if not why and (receiver is None or receiver.closed or receiver.draining
                        or len(receiver.jobs) >= receiver.jobs_max):
            why = "the decoding node is gone or busy"
        job.state = JobState.ADMITTED
        job.waiting_since_mono_s = now.mono_s
        if why or receiver is None:
            self.handoffs["failed"] += 1
            log.warning("job %s: hand-off to %s given up (%s); it goes on as a resumed job",
                        job.job_id, h.receiver_id, why)
            self.waiting[job.job_id] = job
            self._wake.set()
            return
        self._assign(job, receiver, now, handoff=h)
        if job.state is JobState.ADMITTED:  # the receiver's queue was full: placed as any
            self.waiting[job.job_id] = job
            self._wake.set()

    def _send(self, job: LiveJob, node: FleetNode, frame: str, now: Now) -> None:
        """Send the attempt reserved on admission, its row committed with the hold. A node whose
        socket is gone by now (it left while the hold committed) ends the attempt (its row says
        so), and the job waits for another node."""
        if not node.send(frame):
            self._resume_soon(job, now, outcome=AttemptOutcome.NODE_LOST)
        elif job.dispatched_perf_s is None:
            job.dispatched_perf_s = now.perf_s

    async def _watchdog(self, now: Now) -> None:
        for job in list(self.waiting.values()):
            if now.mono_s - job.waiting_since_mono_s > self.placement_wait_s:
                has_nodes = any(job.model in n.models for n in self.all_nodes())
                why = (
                    "every node serving this model is busy or unavailable"
                    if has_nodes
                    else "no node serving this model is online"
                )
                await self._finish(
                    job, now,
                    error=NoNodeAvailable(
                        f"no node could take the request for model '{job.model}' within "
                        f"{self.placement_wait_s:g} s: {why}"
                    ),
                )
        for job in list(self.jobs.values()):
            att = job.current
            if (job.state in (JobState.PLACED, JobState.STREAMING) and att is not None
                    and job.chain is None  # a chain times out its stages itself
                    and now.mono_s - att.last_token_mono_s > self.token_gap_s + (
                        att.first_token_grace_s if att.first_token_mono_s is None else 0.0)):
                log.warning("job %s: node %s silent, resuming", job.job_id, att.node_id)
                node = self.node(att.node_id)
                if node is not None:
                    node.send(protocol.encode(protocol.Cancel(job_id=job.job_id,
                                                              attempt=att.number)))
                await self._resume(job, now, outcome=AttemptOutcome.NODE_SILENT)

    # ---- node events -------------------------------------------------------------------------

    def _attempt_of(self, node: FleetNode, job_id: str, number: int
                    ) -> tuple[LiveJob, Attempt]:
        job = self.jobs.get(job_id)
        att = job.current if job else None
        if (job is None or att is None or att.number != number or att.node_id != node.node_id
                or att.ended):
            raise _StaleMessage
        return job, att

    def on_tokens(self, node: FleetNode, msg: protocol.Tokens) -> None:
        try:
            job, att = self._attempt_of(node, msg.job_id, msg.attempt)
        except _StaleMessage:
            return  # a late message for an attempt that already ended: harmless, dropped
        now = self.clock()
        skip = att.tokens - msg.index  # tokens of this message we already have
        if skip < 0:
            log.warning("job %s: node %s skipped tokens; resuming", job.job_id, node.node_id)
            # now, not in a task: a task could end a later attempt
            self._resume_soon(job, now, outcome=AttemptOutcome.PROTOCOL_GAP)
            return
        new = msg.token_ids[skip:]
        room = job.sampling.max_tokens - len(job.generated)
        if len(new) > room:
            new = new[:room]  # a node may not produce more than was asked; the rest is dropped
        if not new:
            return
        job.generated.extend(new)
        lps = msg.logprobs if msg.logprobs and len(msg.logprobs) == len(msg.token_ids) else None
        att.logprobs.extend(lps[skip : skip + len(new)] if lps else [None] * len(new))
        tops: tuple[list[tuple[int, float]], ...] | None = None
        if _client_logprobs(job.sampling):
            sent = msg.top_logprobs
            if sent is not None and len(sent) == len(msg.token_ids):
                tops = tuple(sent[skip : skip + len(new)])
            else:
                tops = tuple([] for _ in new)
            att.top_logprobs.extend(list(t) for t in tops)
        att.tokens += len(new)
        att.last_token_mono_s = now.mono_s
        node.queued_tokens = max(0, node.queued_tokens - len(new))
        if att.first_token_mono_s is None:
            att.first_token_mono_s = now.mono_s
            node.backlog.streaming(job.job_id)
        if job.first_token_mono_s is None:  # recorded with the job's final row (one write a job)
            job.first_token_mono_s = now.mono_s
            job.state = JobState.STREAMING
        client = _client_logprobs(job.sampling)
        job.events.put_nowait(JobEvent(
            JobEventKind.TOKENS, tuple(new), at_perf_s=now.perf_s,
            logprobs=tuple(att.logprobs[-len(new):]) if client else None,
            top_logprobs=tops))

    async def on_done(self, node: FleetNode, msg: protocol.Done) -> None:
        """A node's result: returns once the job is settled and its client told."""
        ending = self.done_received(node, msg)
        if ending is not None:
            await ending

    def done_received(self, node: FleetNode,
                      msg: protocol.Done) -> asyncio.Future[None] | None:  # fmt: skip
        """A node's result, handled now: checked, the attempt ended, the job finished (or
        resumed when the result does not verify). Returns what completes once the settlement
        has committed and the client has been told; a socket's reader does not wait for it,
        so the node's (or, for a relayed node, every relayed node's) next messages are not held
        behind a commit."""
        try:
            job, att = self._attempt_of(node, msg.job_id, msg.attempt)
        except _StaleMessage:
            return None
        now = self.clock()
        produced = job.generated[att.token_base : att.token_base + att.tokens]
        output_sha256 = protocol.tokens_sha256(produced)
        payload = protocol.result_payload(
            job_id=msg.job_id,
            attempt=msg.attempt,
            weights_sha256=node.weights.get(job.model, ""),
            # the prompt the attempt was sent (its hash kept when it was sent)
            prompt_sha256=att.prompt_sha256 or protocol.tokens_sha256(
                job.prompt_ids + job.generated[: att.token_base]),
            output_sha256=output_sha256,
            finish_reason=msg.finish_reason,
            metering=msg.metering,
            logprobs_sha256=msg.logprobs_sha256,
        )
        lps_ok = True
        if _client_logprobs(job.sampling):  # what the client was shown is what the node signed
            got = att.logprobs[: att.tokens]
            lps_ok = None not in got and msg.logprobs_sha256 == protocol.logprobs_sha256(
                [x for x in got if x is not None], att.top_logprobs[: att.tokens])
        if not lps_ok or msg.output_sha256 != output_sha256 or not verify(
            node.public_key, payload, msg.signature
        ):
            log.warning("job %s: node %s sent a result that does not verify", job.job_id,
                        node.node_id)
            if self.verifier is not None:
                self.verifier.on_bad_signature(node, job, att)
            # now, not in a task
            return self._resume_soon(job, now, outcome=AttemptOutcome.BAD_SIGNATURE)
        if (bad := check_metering_bounds(busy_s=msg.metering.busy_s,
                                         energy_j=msg.metering.energy_j,
                                         wall_s=now.mono_s - att.started_mono_s,
                                         device_class=att.device_class)) is not None:
            if self.verifier is not None:  # refused: never in the books, counted against it
                self.verifier.on_refused(node, job, att, bad)
            return self._resume_soon(job, now, outcome=AttemptOutcome.BAD_METERING)
        if self.verifier is not None:
            self.verifier.on_result(node, job, att, msg.metering)
        speed = observed_decode_tokens_per_s(att, now.mono_s)
        if speed > 0:
            node.observe_speed(job.model, speed)
        self._end_attempt(job, att, node, AttemptOutcome.DONE, now, metering=msg.metering,
                          signature=msg.signature)
        if self.prefix_aware and protocol.FEATURE_PREFIX_CACHE in node.features:
            self.prefixes.record(node.node_id, job.prompt_ids + job.generated, node.jobs_max)
        if att.kv_positions:  # it was sent a cache: paid for the prompt it prefilled itself
            att.prefilled_tokens = max(1, min(msg.metering.prompt_tokens,
                                              len(job.prompt_ids) + att.token_base))
        h = self._drop_handoff(job)
        if (h is not None and h.sender_attempt == att.number and msg.finish_reason == "length"
                and att.tokens == 1 and len(job.generated) < job.sampling.max_tokens):
            self._hand_off(job, h, now)
            return None
        reason = "length" if len(job.generated) >= job.sampling.max_tokens else msg.finish_reason
        return self._finish_soon(job, now,
                                 finish_reason="stop" if reason == "cancelled" else reason)

    async def on_job_error(self, node: FleetNode, msg: protocol.JobError) -> None:
        try:
            job, _att = self._attempt_of(node, msg.job_id, msg.attempt)
        except _StaleMessage:
            return
        log.warning("job %s handed back by node %s: %s", job.job_id, node.node_id, msg.message)
        await self._resume(job, self.clock(), outcome=AttemptOutcome.DRAINED if node.draining
                           else AttemptOutcome.FAILED)

    async def on_node_lost(self, node: FleetNode, *,
                           outcome: AttemptOutcome = AttemptOutcome.NODE_LOST) -> None:
        """The node's socket closed (here, or at its replica): every job it held is resumed
        elsewhere. With ``outcome="replica_lost"`` the node is not to blame (the replica holding
        its socket died, or it moved to another), so its jobs may resume on it again."""
        fleet: dict[str, Any] = self.nodes if isinstance(node, NodeConn) else self.remote
        if fleet.get(node.node_id) is node:
            del fleet[node.node_id]
        self.chains.on_node_lost(node, outcome)  # its chains repair themselves
        self.prefixes.forget(node.node_id)
        for job_id in list(node.jobs):
            job = self.jobs.get(job_id)
            if (job is not None and job.chain is None and job.current
                    and job.current.node_id == node.node_id):
                await self._resume(job, self.clock(), outcome=outcome)
        self._wake.set()

    def on_node_ready(self, node: FleetNode) -> None:
        if not isinstance(node, NodeConn):  # another replica's (replication/fleet.py)
            self.remote[node.node_id] = node
        else:
            self.nodes[node.node_id] = node
            moved = self.remote.get(node.node_id)
            if moved is not None:  # it left its replica for this one: its jobs there are gone
                moved.closed = True
                asyncio.get_running_loop().create_task(
                    self.on_node_lost(moved, outcome=AttemptOutcome.REPLICA_LOST))
        self._wake.set()

    # ---- ending ------------------------------------------------------------------------------

    def _end_attempt(
        self,
        job: LiveJob,
        att: Attempt,
        node: FleetNode | None,
        outcome: AttemptOutcome,
        now: Now,
        metering: protocol.Metering | None = None,
        signature: str | None = None,
    ) -> None:
        """End the attempt: its node no longer holds the job, and its row's end is kept on the
        job (``attempt_ends``), to be written with the job's settlement when the job ends now
        (one commit a job instead of two), or queued by ``_resume_soon`` when it goes on."""
        att.ended = True
        if node is not None:
            node.jobs.discard(job.job_id)
        fields: dict[str, Any] = {
            "attempt": att.number,
            "outcome": str(outcome),
            "completion_tokens": att.tokens,
            "time_to_first_token_s": (att.first_token_mono_s - att.started_mono_s)
            if att.first_token_mono_s
            else None,
            "total_s": now.mono_s - att.started_mono_s,
            "ended_at_s": now.epoch_s,
        }
        if metering is not None:
            fields.update(
                busy_s=metering.busy_s,
                energy_j=metering.energy_j,
                energy_source=metering.energy_source,
                signature=signature,
            )
        job.attempt_ends.append(fields)

    def _write_attempt_ends(self, job: LiveJob) -> None:
        """Queue the ends of the job's attempts that no settlement will carry (it goes on)."""
        for fields in job.attempt_ends:
            end = dict(fields)
            self.writer.background(self.store.end_attempt, job.job_id, end.pop("attempt"), **end)
        job.attempt_ends.clear()

    async def _resume(self, job: LiveJob, now: Now, *, outcome: AttemptOutcome) -> None:
        """End the current attempt and put the job back to be placed with what it has so far."""
        ending = self._resume_soon(job, now, outcome=outcome)
        if ending is not None:
            await ending

    def _resume_soon(self, job: LiveJob, now: Now, *, outcome: AttemptOutcome
                     ) -> asyncio.Future[None] | None:
        """``_resume``, done now; if that ends the job, what completes once it is settled."""
        att = job.current
        if att is None or job.state.is_final:
            return None
        node = self.node(att.node_id)
        self._end_attempt(job, att, node, outcome, now)
        if self._drop_handoff(job) is not None:
            self.handoffs["failed"] += 1
        if outcome != AttemptOutcome.REPLICA_LOST:  # not the node's fault: it may take it again
            job.avoid_nodes.add(att.node_id)
        if len(job.generated) >= job.sampling.max_tokens:
            return self._finish_soon(job, now, finish_reason="length")
        if len(job.attempts) >= limits.job_attempts_max:
            return self._finish_soon(job, now, error=JobFailed(
                f"the request failed on {len(job.attempts)} nodes in turn; giving up"))
        self._write_attempt_ends(job)  # before the next attempt's start, in the writer's order
        job.state = JobState.ADMITTED
        job.waiting_since_mono_s = now.mono_s
        self.waiting[job.job_id] = job
        self._wake.set()
        return None

    async def cancel(
        self, job_id: str, *, reason: str = "client", keep_tokens: int | None = None
    ) -> None:
        """Stop a job early: the client went away, or its text reached a stop string.

        The job is settled for the tokens it produced, or for ``keep_tokens`` of them when the
        text ended there (tokens after a stop string are neither shown nor charged).
        """
        job = self.jobs.get(job_id)
        if job is None or job.state.is_final:
            return
        if keep_tokens is not None and keep_tokens < len(job.generated):
            del job.generated[keep_tokens:]
            for a in job.attempts:
                a.tokens = max(0, min(a.tokens, keep_tokens - a.token_base))
        now = self.clock()
        att = job.current
        if job.chain is not None:
            job.chain.cancel()  # ends its stages' attempts
        elif att is not None and job.state in (JobState.PLACED, JobState.STREAMING):
            node = self.node(att.node_id)
            if node is not None:
                node.send(protocol.encode(protocol.Cancel(job_id=job_id, attempt=att.number)))
            self._end_attempt(job, att, node, AttemptOutcome.CANCELLED, now)
        await self._finish(job, now, finish_reason="stop", cancelled_by=reason)

    async def _finish(
        self,
        job: LiveJob,
        now: Now,
        *,
        finish_reason: str | None = None,
        error: SpareCyclesError | None = None,
        cancelled_by: str | None = None,
    ) -> None:
        ending = self._finish_soon(job, now, finish_reason=finish_reason, error=error,
                                   cancelled_by=cancelled_by)
        if ending is not None:
            await ending

    def _finish_soon(
        self,
        job: LiveJob,
        now: Now,
        *,
        finish_reason: str | None = None,
        error: SpareCyclesError | None = None,
        cancelled_by: str | None = None,
    ) -> asyncio.Future[None] | None:
        """End the job now (state, out of the queues) and queue its settlement; returns what
        completes once the settlement has committed and the client has been told."""
        if job.state.is_final:
            self._write_attempt_ends(job)
            return None
        self.jobs.pop(job.job_id, None)
        self.waiting.pop(job.job_id, None)
        self._drop_handoff(job)
        delivered = len(job.generated)
        job.state = JobState.DONE if delivered and error is None else JobState.FAILED
        if error is not None and delivered:
            job.state = JobState.FAILED  # partial output: charged for what was delivered
        shares = [
            WorkShare(
                owner_id=a.owner_id,
                node_id=a.node_id,
                device_class=a.device_class,
                prompt_tokens=len(job.prompt_ids) + a.token_base if a.prefilled_tokens is None
                else a.prefilled_tokens,
                completion_tokens=a.tokens,
                busy_s=a.busy_s,
                work_ppm=a.work_ppm,
            )
            for a in job.attempts
            if a.tokens > 0
        ]
        first = job.first_token_mono_s
        final = JobFinal(
            state=job.state, completion_tokens=delivered, finished_at_s=now.epoch_s,
            total_s=now.mono_s - job.admitted_mono_s,
            finish_reason=finish_reason if error is None else None,
            error=None if error is None else error.message,
            first_token_at_s=None if first is None else now.epoch_s - (now.mono_s - first),
            time_to_first_token_s=None if first is None else first - job.admitted_mono_s)
        ends, job.attempt_ends = job.attempt_ends, []

        async def _settle() -> None:  # one transaction: the money, the job's final row and the
            try:  # end of its last attempt (its start was queued before this, so it has landed)
                if delivered:
                    await self.ledger.settle_async(job.job_id, job.client_id, job.model,
                                                   len(job.prompt_ids), delivered, shares,
                                                   job=final, attempt_ends=ends)
                else:
                    await self.ledger.void_async(job.job_id, job=final, attempt_ends=ends)
            except Conflict as exc:  # e.g. a restart already voided this job's hold
                log.warning("job %s: not settled: %s", job.job_id, exc.message)

        settled = self.writer.queue(_settle)

        async def _tell() -> None:
            try:
                await settled
            finally:
                if error is not None:
                    job.events.put_nowait(JobEvent(JobEventKind.ERROR, error=error))
                else:
                    job.events.put_nowait(JobEvent(JobEventKind.DONE, finish_reason=finish_reason))
                if self._on_finished:
                    self._on_finished(job, str(job.state))

        return self._spawn(_tell())

    # ---- helpers -----------------------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        """Run ``coro`` as a task kept until it ends (its failure is logged, and raised to
        whoever awaits it)."""
        task = asyncio.ensure_future(coro)
        self._ending.add(task)
        task.add_done_callback(self._ended)
        return task

    def _ended(self, task: asyncio.Future[None]) -> None:
        self._ending.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("ending a job failed", exc_info=task.exception())


# A prefill's pessimistic rate against the device's profiled peak: CPUs reach a fraction of it
# on a model's matrix products, and a node shares its device with its owner.
prefill_peak_fraction = 0.1


def first_token_grace_s(n_params: int, prefill_tokens: int, peak_flops: float) -> float:
    """Seconds a node may take to prefill ``prefill_tokens`` (its backlog with the new prompt)
    of a model of ``n_params`` before its silence counts: 2 FLOPs a parameter a token at
    ``prefill_peak_fraction`` of its profiled peak (8,000 tokens of a 135M-parameter model at a
    10^11 FLOP/s peak: ~220 s; a short chat: well under a second), at most
    ``limits.first_token_grace_s_max`` (a node's peak is its own report: a hung node that still
    heartbeats must not hold a job, its key's slot and its hold for hours)."""
    grace = 2.0 * n_params * max(0, prefill_tokens) / (max(peak_flops, 1e9) * prefill_peak_fraction)
    return min(grace, limits.first_token_grace_s_max)


class _StaleMessage(Exception):
    pass


def _client_logprobs(sampling: SamplingParams) -> bool:
    """The client asked for log-probabilities (the node sends and signs them)."""
    return sampling.logprobs or sampling.top_logprobs > 0
