"""The simulator's event loop: a workload trace against a fleet, with a simulated clock.

It drives ``scheduler.schedule`` the way the coordinator does: jobs wait in a queue; whenever one
arrives or a node frees a slot (at most every ``schedule_interval_s``, the coordinator's
scheduling tick) the waiting jobs and node snapshots go in, assignments come out and are applied.
Nodes come and go as their availability intervals say (sim/churn.py); a node that leaves stops
taking work, finishes what it can within its owner's drain grace, and the rest of its jobs go
back to the queue with the tokens already delivered (resumption elsewhere, as dispatch does), up
to ``limits.job_attempts_max`` attempts.

Deterministic from its seed: the fleet's availability and speeds, the model mix and the
scheduler's randomness each come from their own seeded stream, events are ordered by (time,
sequence number), and nothing reads a clock (except to report how long the run took).
"""

from __future__ import annotations

import heapq
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from sparecycles import availability, limits
from sparecycles.ledger import pricing
from sparecycles.scheduling import perfmodel, scheduler, stays
from sparecycles.scheduling.presets import model_preset
from sparecycles.scheduling.scheduler import hedge_job, schedule, should_hedge, update_speed_factor
from sparecycles.sim.churn import realise, shared_moments
from sparecycles.sim.fleet_file import FleetSpec, lognormal_factor
from sparecycles.sim.node import Attempt, SimNode
from sparecycles.sim.policies import BASELINES, CandidateIndex, policy_config
from sparecycles.sim.trace import Trace
from sparecycles.types import Job, NodeSnapshot

EV_NODE, EV_JOIN, EV_LEAVE, EV_DRAIN_END, EV_SCHEDULE, EV_HEDGE, EV_KV_ARRIVED = range(7)
PENDING, DONE, FAILED = 0, 1, 2
STATUS_AT_WORK = availability.DeviceStatus(on_ac_power=True, charging=True)


@dataclass(frozen=True, slots=True)
class SimConfig:
    policy: str = "fastest"
    seed: int = 0
    schedule_interval_s: float = 0.05  # the coordinator's scheduling tick
    retry_interval_s: float = 0.5  # jobs left waiting are offered again this often
    stay_refresh_s: float = 5.0  # a node's expected stay is recomputed at most this often
    drain_horizon_s: float = 1800.0  # simulate this long past the last arrival, then stop
    candidates_all_max: int = 64  # see sim/policies.py
    prefill_chunk_tokens: int = 512  # the nodes' engines: chunked prefill (0: prefill first)
    # ours is also offered the node that served a conversation's last turn (its prefix cache)
    prefix_aware: bool = True
    # How the scheduler learns how long nodes stay: "learned" (scheduling/stays.py: Kaplan-Meier
    # over the sessions seen, from stay_history_s before the trace on) or "true" (it is told the
    # Weibull law the simulator draws from: an oracle no coordinator has), or "none" (every node
    # up is expected to stay for ever: placement blind to departures, an ablation).
    stays: str = "learned"
    stay_history_s: float = 7 * 86_400.0
    model_mix: tuple[tuple[str, float], ...] = ()  # default: every request to the first model


def max_tokens_for(output_tokens: int) -> int:
    """The client's max_tokens for a request that produced ``output_tokens``: the trace does not
    say, so we assume clients ask for a round power of two at or above what they get (at least
    64, at most the API's limit); the scheduler plans with max_tokens, the node stops at the
    true output length."""
    cap = max(64, 1 << max(0, output_tokens - 1).bit_length())
    return max(output_tokens, min(cap, limits.completion_tokens_max))


@dataclass(slots=True)
class Waiting:
    req: int
    job: Job
    since: float
    is_hedge: bool = False


@dataclass(slots=True)
class SimResult:
    policy: str
    seed: int
    fleet: FleetSpec
    trace_name: str
    arrival: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    first_token: np.ndarray  # client time of the first token; nan if none
    end: np.ndarray  # client time of the last token (or of the failure)
    status: np.ndarray  # DONE / FAILED
    attempts: np.ndarray
    interrupted: np.ndarray
    hedged: np.ndarray
    handed_off: np.ndarray  # attempts of each request prefilled on one node, decoded on another
    node_class: np.ndarray
    node_busy_s: np.ndarray
    node_available_s: np.ndarray
    node_earned_micros: np.ndarray
    kv_over_capacity_placements: int = 0
    kv_bytes_moved: int = 0  # KV caches shipped by hand-offs (those cut short counted whole)
    handoffs_interrupted: int = 0  # hand-offs that lost a node before the cache arrived
    prompt_tokens_admitted: int = 0  # prompt tokens of every admitted attempt (prefills)
    prompt_tokens_cached: int = 0  # ... of which nodes' prefix caches held
    charges_micros: int = 0
    hedge_waste_tokens: int = 0
    busy_cost_micros: int = 0
    scheduler_calls: int = 0
    events: int = 0
    sim_end_s: float = 0.0
    wall_s: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def build_nodes(
    fleet: FleetSpec, epoch0_s: float, horizon_s: float, seed: int, history_s: float = 0.0
) -> list[SimNode]:
    """Realise every node of the fleet: profile, model, true speed, policy and intervals, the
    intervals from ``history_s`` before the trace starts (what the coordinator saw before)."""
    rng = random.Random(f"{seed}:fleet")
    nodes: list[SimNode] = []
    for ci, c in enumerate(fleet.classes):
        span = horizon_s + history_s
        moments = shared_moments(random.Random(f"{seed}:class:{ci}"),
                                 c.availability.correlated_events_per_day, span)  # fmt: skip
        for i in range(c.count):
            offset = c.utc_offsets_minutes[i % len(c.utc_offsets_minutes)]
            real = realise(rng, c.availability, epoch0_s - history_s, span, offset, moments)
            if history_s > 0.0:
                real = replace(real, intervals=tuple(
                    (a - history_s, b - history_s) for a, b in real.intervals))  # fmt: skip
            spec = model_preset(c.models[i % len(c.models)])
            nodes.append(
                SimNode(
                    idx=len(nodes),
                    node_id=f"{c.name}-{i}",
                    cls=ci,
                    profile=c.profile,
                    spec=spec,
                    costs=perfmodel.costs(spec, c.profile),
                    jobs_max=c.jobs_max,
                    speed=lognormal_factor(rng.gauss(0.0, 1.0), c.speed_mean, c.speed_sigma),
                    price_micros_per_mtok=c.price_micros_per_mtok,
                    reputation=c.reputation,
                    policy=real.policy,
                    stay_model=real.stay_model,
                    intervals=real.intervals,
                )
            )
    return nodes


class Simulation:
    def __init__(
        self,
        trace: Trace,
        fleet: FleetSpec,
        config: SimConfig,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.trace, self.fleet, self.config, self.progress = trace, fleet, config, progress
        self.sched = policy_config(config.policy)
        self.rng = random.Random(f"{config.seed}:scheduler")
        self.models = {m: model_preset(m) for c in fleet.classes for m in c.models}
        self.end_t = trace.duration_s + config.drain_horizon_s
        history = config.stay_history_s if config.stays == "learned" else 0.0
        self.nodes = build_nodes(fleet, trace.epoch0_s, self.end_t, config.seed, history)
        for node in self.nodes:
            node.chunk = config.prefill_chunk_tokens
        self.learner = stays.StayLearner()
        self.stays_seeded: set[int] = set()  # nodes whose current session was seen as censored
        if config.stays == "learned":
            self._learn_history(history)
        self.by_id = {n.node_id: n for n in self.nodes}
        self.index = CandidateIndex(all_max=config.candidates_all_max)
        self.prices = pricing.PriceBook.default().with_specs(self.models.values())
        n = len(trace)
        self.prompt = trace.prompt_tokens.tolist()
        self.output = trace.output_tokens.tolist()
        self.req_model = self._model_of_requests(n)
        # multi-turn traces: the prefix cache's key of each request and the tokens it shares
        # with its conversation's previous turn; the node that served a conversation last
        self.conversation = (
            [f"c{c}" for c in trace.conversation.tolist()] if trace.conversation is not None
            else [""] * n
        )  # fmt: skip
        self.prefix = trace.prefix_tokens.tolist() if trace.prefix_tokens is not None else [0] * n
        self.prefix_home: dict[str, int] = {}
        self.first = [math.nan] * n
        self.end = [math.nan] * n
        self.status = bytearray(n)
        self.attempts = bytearray(n)
        self.interrupted = bytearray(n)
        self.hedged = bytearray(n)
        self.handed_off = bytearray(n)
        self.heap: list[tuple[float, int, int, object, int]] = []
        self.seq = 0
        self.waiting: dict[str, Waiting] = {}
        self.waiting_by_req: dict[int, str] = {}
        self.live: dict[int, list[Attempt]] = {}
        self.shares: dict[int, list[tuple[SimNode, int, int]]] = {}
        self.sched_pending: float | None = None
        self.last_sched = -math.inf
        self.result_counters = {"charges": 0, "hedge_waste": 0, "calls": 0, "events": 0,
                                "kv_bytes": 0, "handoffs_interrupted": 0}  # fmt: skip

    # --- set-up ------------------------------------------------------------------------------

    def _model_of_requests(self, n: int) -> list[str]:
        mix = self.config.model_mix or ((self.fleet.classes[0].models[0], 1.0),)
        names = [m for m, _ in mix]
        if len(names) == 1:
            return [names[0]] * n
        weights = np.asarray([w for _, w in mix], dtype=float)
        rng = np.random.default_rng(self.config.seed)
        picks = rng.choice(len(names), size=n, p=weights / weights.sum())
        return [names[i] for i in picks]

    def _learn_history(self, history_s: float) -> None:
        """The sessions the coordinator saw before the trace: those that ended (an event, or
        censored if the owner's window closed them) and those still going (censored at their
        age so far; when such a session ends during the run it is not counted again)."""
        epoch = self.trace.epoch0_s
        for node in self.nodes:
            cls = self.fleet.classes[node.cls].name
            for a, b in node.intervals:
                if a >= 0.0:
                    break
                if b <= 0.0:
                    if a < -history_s + 1.0:
                        continue  # begun before the coordinator looked: length unknown
                    ended = not stays.ended_by_window(node.policy, epoch + b)
                    self.learner.observe(cls, node.node_id, b - a, ended)
                else:  # up now, for -a so far (the node says since when)
                    self.learner.observe(cls, node.node_id, -a, False)
                    self.stays_seeded.add(node.idx)

    def _learn_session(self, node: SimNode, t: float) -> None:
        """A node's session ended at ``t``: one more observation (scheduling/stays.py)."""
        if self.config.stays != "learned":
            return
        if node.idx in self.stays_seeded:
            self.stays_seeded.discard(node.idx)
            return
        ended = not stays.ended_by_window(node.policy, self.trace.epoch0_s + t)
        cls = self.fleet.classes[node.cls].name
        self.learner.observe(cls, node.node_id, t - node.up_since, ended)

    def push(self, t: float, kind: int, obj: object, version: int = 0) -> None:
        self.seq += 1
        heapq.heappush(self.heap, (t, self.seq, kind, obj, version))

    def _start_nodes(self) -> None:
        for node in self.nodes:
            self._next_interval(node, 0.0, first=True)

    def _next_interval(self, node: SimNode, t: float, first: bool = False) -> None:
        """Push the node's next join (or, if it is up at the start, mark it up)."""
        for start, end in node.intervals:
            if end <= t or start >= self.end_t:
                continue
            if first and start <= 0.0:
                node.accepting, node.up_since, node.stay_t = True, start, -math.inf
                self._index(node)
                if end < self.end_t:
                    self.push(end, EV_LEAVE, node)
            elif start > t or (start == t and not first):
                self.push(start, EV_JOIN, node)
            return

    # --- the loop ----------------------------------------------------------------------------

    def run(self) -> SimResult:
        wall0 = time.perf_counter()
        self._start_nodes()
        arrivals = self.trace.arrival_s.tolist()
        n, i, t = len(arrivals), 0, 0.0
        handlers = self.handlers()
        heap = self.heap
        while True:
            next_arrival = arrivals[i] if i < n else math.inf
            if heap and heap[0][0] <= next_arrival:
                t, _, kind, obj, version = heapq.heappop(heap)
                if t > self.end_t:
                    break
                handlers[kind](obj, version, t)
            elif i < n:
                t = next_arrival
                self.arrive(i, t)
                i += 1
                if self.progress is not None and i % 2000 == 0:
                    self.progress(i, n)
            else:
                break
            self.result_counters["events"] += 1
            if i >= n and not self.live and not self.waiting:
                break
        if self.progress is not None:
            self.progress(n, n)
        return self._result(t, time.perf_counter() - wall0)

    def handlers(self) -> dict[int, Callable[[object, int, float], None]]:
        """The event kinds and what handles each (sim/chains.py adds its own)."""
        return {
            EV_NODE: self.on_node, EV_JOIN: self.on_join, EV_LEAVE: self.on_leave,
            EV_DRAIN_END: self.on_drain_end, EV_SCHEDULE: self.on_schedule,
            EV_HEDGE: self.on_hedge, EV_KV_ARRIVED: self.on_kv_arrived,
        }  # fmt: skip

    def arrive(self, req: int, t: float) -> None:
        """A request arrives; its deadline is the SLO for its max_tokens (what a client with that
        SLO would state; only cheapest-within-deadline reads it)."""
        max_tokens = max_tokens_for(self.output[req])
        slo = self.fleet.slo
        job = Job(
            job_id=str(req),
            model=self.req_model[req],
            prompt_tokens=self.prompt[req],
            max_tokens=max_tokens,
            client_id="client",
            admitted_at_s=t,
            deadline_s=t + slo.ttft_target_s(self.prompt[req]) + slo.tpot_s * (max_tokens - 1),
            prefix_key=self.conversation[req],
            prefix_tokens=self.prefix[req],
        )
        self._enqueue(Waiting(req, job, t), t)

    def _enqueue(self, w: Waiting, t: float) -> None:
        self.waiting[w.job.job_id] = w
        self.waiting_by_req[w.req] = w.job.job_id
        self.want_schedule(t)

    # --- scheduling --------------------------------------------------------------------------

    def want_schedule(self, t: float) -> None:
        at = max(t, self.last_sched + self.config.schedule_interval_s)
        if self.sched_pending is not None and self.sched_pending <= at:
            return
        self.sched_pending = at
        self.push(at, EV_SCHEDULE, None)

    def on_schedule(self, _obj: object, _version: int, t: float) -> None:
        if self.sched_pending == t:
            self.sched_pending = None
        if not self.waiting or t < self.last_sched + self.config.schedule_interval_s - 1e-9:
            return
        self.last_sched = t
        self._expire(t)
        if self.waiting:
            self._place(t)
        if self.waiting:
            self.want_schedule(t + self.config.retry_interval_s)

    def _expire(self, t: float) -> None:
        """Jobs no node took within placement_wait_s_max are answered 503 (oldest first)."""
        while self.waiting:
            job_id = next(iter(self.waiting))
            w = self.waiting[job_id]
            if t - w.since <= limits.placement_wait_s_max:
                break
            self._unwait(job_id)
            if w.req not in self.live:
                self.fail(w.req, t)

    def _unwait(self, job_id: str) -> Waiting | None:
        w = self.waiting.pop(job_id, None)
        if w is not None and self.waiting_by_req.get(w.req) == job_id:
            del self.waiting_by_req[w.req]
        return w

    def _place(self, t: float) -> None:
        jobs = [w.job for w in self.waiting.values()][: limits.jobs_waiting_max]
        per_model: dict[str, int] = {}
        for j in jobs:
            per_model[j.model] = per_model.get(j.model, 0) + 1
        offered = [
            idx
            for model, count in per_model.items()
            for idx in self.index.candidates(model, count, self.sched.policy, self.rng)
        ]
        if self.config.prefix_aware and self.sched.policy not in BASELINES and self.prefix_home:
            seen = set(offered)
            for j in jobs:  # the node holding a job's prefix, if it takes work
                home = self.prefix_home.get(j.prefix_key) if j.prefix_key else None
                if home is not None and home not in seen and self.nodes[home].accepting:
                    seen.add(home)
                    offered.append(home)
        snapshots = [self.snapshot(self.nodes[idx], t) for idx in offered]
        self.result_counters["calls"] += 1
        for a in schedule(jobs, snapshots, self.models, t, self.sched, self.rng):
            w = self._unwait(a.job_id)
            if w is None:
                continue
            if a.decode_node_id:
                self.start_handoff(w, self.by_id[a.node_id], self.by_id[a.decode_node_id], t,
                                   a.predicted_finish_s)  # fmt: skip
            else:
                self.start(w, self.by_id[a.node_id], t, a.predicted_finish_s)

    def snapshot(self, node: SimNode, t: float) -> NodeSnapshot:
        """What the coordinator would report for this node now (cached while unchanged)."""
        if node.snapshot is not None and t - node.snapshot_t <= self.config.stay_refresh_s:
            return node.snapshot
        stay = self.stay_of(node, t)
        backlog_tokens, backlog_s = node.prefill_backlog(t) if node.active else (0, 0.0)
        uplink_s, downlink_s = node.link_backlog_s(t)
        node.snapshot = NodeSnapshot(
            node_id=node.node_id,
            owner_id="owner-" + node.node_id,
            profile=node.profile,
            models=(node.spec.name,),
            active_jobs=node.active,
            jobs_max=node.jobs_max,
            queued_tokens=node.queued_tokens(),
            prefill_backlog_tokens=backlog_tokens,
            prefill_backlog_s=backlog_s,
            kv_reserved_tokens=node.kv_reserved(),
            cached_prefixes=node.cache,
            available=node.accepting,
            expected_stay_s=stay,
            reputation=node.reputation,
            draining=node.draining,
            decode_speed_factor=node.factor,
            price_micros_per_mtok=node.price_micros_per_mtok,
            last_assigned_s=node.last_assigned_t,
            uplink_backlog_s=uplink_s,
            downlink_backlog_s=downlink_s,
        )
        node.snapshot_t = t
        return node.snapshot

    def stay_of(self, node: SimNode, t: float) -> float:
        """The node's expected stay as the coordinator predicts it (recomputed at most every
        ``stay_refresh_s``)."""
        if t - node.stay_t > self.config.stay_refresh_s or node.stay_t > t:
            epoch = self.trace.epoch0_s
            if not node.accepting:
                node.stay = 0.0
            elif self.config.stays == "none":
                node.stay = math.inf
            elif self.config.stays == "learned":
                node.stay = stays.learned_stay_s(
                    self.learner, self.fleet.classes[node.cls].name, node.node_id, node.policy,
                    STATUS_AT_WORK, epoch + t, epoch + node.up_since,
                )
            else:
                node.stay = availability.expected_stay_s(
                    node.policy, STATUS_AT_WORK, epoch + t,
                    up_since_s=epoch + node.up_since, model=node.stay_model,
                )  # fmt: skip
            node.stay_t = t
        return node.stay

    def _index(self, node: SimNode) -> None:
        node.snapshot = None
        accepting = node.accepting and not node.draining
        self.index.update(node.idx, node.spec.name, node.cls, node.active, node.jobs_max, accepting)

    def start(self, w: Waiting, node: SimNode, t: float, predicted_finish_t: float) -> None:
        req, gen = w.req, w.job.generated_tokens
        att = Attempt(
            req=req, job=w.job, node=node, assigned_t=t, predicted_finish_t=predicted_finish_t,
            target=max(1, self.output[req] - gen), context0=self.prompt[req] + gen,
            is_hedge=w.is_hedge, kv_need=scheduler.kv_need_tokens(w.job),
            conversation=w.job.prefix_key, prefix=w.job.prefix_tokens,
        )  # fmt: skip
        node.advance(t)
        if node.kv_reserved() + att.kv_need > node.costs.kv_capacity_tokens:
            node.kv_over_capacity_placements += 1
        node.queue.append(att)
        node.start_prefill(t)
        self.replan(node, t)
        self.live.setdefault(req, []).append(att)
        self.attempts[req] = min(255, self.attempts[req] + 1)
        node.last_assigned_t = t
        self.index.assigned(node.idx)
        self._index(node)
        factor = self.sched.hedge_after_factor
        if factor > 0.0 and not w.is_hedge:
            self.push(t + factor * max(1e-3, predicted_finish_t - t), EV_HEDGE, att)

    def start_handoff(self, w: Waiting, sender: SimNode, receiver: SimNode, t: float,
                      predicted_finish_t: float) -> None:  # fmt: skip
        """Place a job as a hand-off (sim/node.py): the sender's attempt into its queue, the
        receiver's into its ``incoming`` with its whole KV need reserved."""
        req, job = w.req, w.job
        context0 = self.prompt[req] + job.generated_tokens
        dec = Attempt(
            req=req, job=job, node=receiver, assigned_t=t, predicted_finish_t=predicted_finish_t,
            target=max(1, self.output[req] - job.generated_tokens), context0=context0,
            is_hedge=w.is_hedge, kv_need=scheduler.kv_need_tokens(job),
            conversation=job.prefix_key, prefix=job.prefix_tokens, handed=True,
        )  # fmt: skip
        pre = Attempt(
            req=req, job=job, node=sender, assigned_t=t, predicted_finish_t=predicted_finish_t,
            target=1, context0=context0, is_hedge=w.is_hedge,
            kv_need=scheduler.kv_handoff_tokens(job), conversation=job.prefix_key,
            prefix=job.prefix_tokens, handoff=dec,
        )  # fmt: skip
        dec.source = pre
        planned = perfmodel.kv_transfer(context0, sender.costs, sender.profile, receiver.profile)
        if math.isfinite(planned.arrive_s):
            pre.uplink_s, pre.downlink_s = planned.uplink_s, planned.downlink_s
        sender.uplink_due_s += pre.uplink_s
        receiver.downlink_due_s += pre.downlink_s
        for node, att in ((sender, pre), (receiver, dec)):
            node.advance(t)
            if node.kv_reserved() + att.kv_need > node.costs.kv_capacity_tokens:
                node.kv_over_capacity_placements += 1
            node.last_assigned_t = t
            self.index.assigned(node.idx)
        sender.queue.append(pre)
        sender.start_prefill(t)
        self.replan(sender, t)
        receiver.incoming.append(dec)
        for node in (sender, receiver):
            self._index(node)
        self.live.setdefault(req, []).append(dec)
        self.attempts[req] = min(255, self.attempts[req] + 1)
        self.handed_off[req] = min(255, self.handed_off[req] + 1)
        factor = self.sched.hedge_after_factor
        if factor > 0.0 and not w.is_hedge:
            self.push(t + factor * max(1e-3, predicted_finish_t - t), EV_HEDGE, dec)

    # --- nodes -------------------------------------------------------------------------------

    def replan(self, node: SimNode, t: float) -> None:
        node.version += 1
        at = node.next_event_t(t)
        if at is not None:
            self.push(at, EV_NODE, node, node.version)

    def on_node(self, obj: object, version: int, t: float) -> None:
        node = obj
        assert isinstance(node, SimNode)
        if version != node.version:
            return
        node.advance(t)
        finished = node.finished()
        if node.prefill_done():
            a = node.prefilling
            assert a is not None
            node.prefilling = None
            a.first_token_t, a.done, a.decode_batch = t, 1.0, len(node.decoding) + 1
            req = a.req
            if math.isnan(self.first[req]):
                self.first[req] = t + node.profile.network_rtt_s
            if a.handoff is not None:
                finished += self._prefilled_for_handoff(a, t)
            elif a.done >= a.target:
                finished.append(a)
            else:
                node.decoding.append(a)
            node.snapshot = None  # its prefill backlog changed
        for a in finished:
            self.complete(a, t)
        node.start_prefill(t)  # the next prompt, if its KV need fits
        self.replan(node, t)
        if finished:
            self._index(node)
            if self.waiting:
                self.want_schedule(t)

    # --- hand-offs ---------------------------------------------------------------------------

    def _prefilled_for_handoff(self, pre: Attempt, t: float) -> list[Attempt]:
        """The sender prefilled a hand-off's prompt and sampled its first token: ship the KV
        cache, or, if that token was the whole answer, finish the job here (returned)."""
        dec, sender = pre.handoff, pre.node
        assert dec is not None
        receiver = dec.node
        self._release_link(pre)
        dec.done, dec.first_token_t = 1.0, t  # the client has the first token
        if dec.done >= dec.target:  # nothing left to decode: the sender finishes the job
            pre.handoff, dec.source, dec.live = None, None, False
            receiver.advance(t)
            receiver.incoming.remove(dec)
            copies = self.live.get(pre.req, [])
            copies[copies.index(dec)] = pre
            self._index(receiver)
            return [pre]
        self.shares.setdefault(pre.req, []).append((sender, pre.context0, 1))
        sender.tokens_out += 1
        sender.sending.append(pre)
        held = receiver.cached_for(dec)  # the receiver's prefix cache: not sent again
        if dec.conversation in receiver.cache:  # the sequence owns those KV blocks now
            receiver.cached_tokens -= receiver.cache.pop(dec.conversation)
        transfer = perfmodel.kv_transfer(pre.context0 - held, sender.costs, sender.profile,
                                         receiver.profile)  # fmt: skip
        start = max(t, sender.uplink_free_t, receiver.downlink_free_t)
        sender.uplink_free_t = start + transfer.uplink_s
        receiver.downlink_free_t = start + transfer.downlink_s
        self.result_counters["kv_bytes"] += (pre.context0 - held) * sender.costs.kv_bytes_per_token
        self.push(start + transfer.arrive_s, EV_KV_ARRIVED, pre)
        receiver.snapshot = None  # its downlink's backlog changed
        return []

    def on_kv_arrived(self, obj: object, _version: int, t: float) -> None:
        pre = obj
        assert isinstance(pre, Attempt)
        dec = pre.handoff
        if not pre.live or dec is None or not dec.live:
            return  # a node left during the hand-off (already re-placed)
        sender, receiver = pre.node, dec.node
        pre.live, pre.handoff, dec.source = False, None, None
        sender.advance(t)
        sender.sending.remove(pre)
        sender.remember(pre.conversation, pre.context0)  # the freed blocks stay as a prefix
        sender.start_prefill(t)  # its KV cache is free: the next prompt may fit
        self.replan(sender, t)
        self._index(sender)
        receiver.advance(t)
        receiver.receive(dec, t)
        self.replan(receiver, t)
        self._index(receiver)
        if self.waiting:  # the sender's slot is free
            self.want_schedule(t)

    @staticmethod
    def _release_link(pre: Attempt) -> None:
        """A hand-off placed and not yet sent no longer waits for the links (sent or dropped)."""
        dec = pre.handoff
        if dec is not None:
            pre.node.uplink_due_s = max(0.0, pre.node.uplink_due_s - pre.uplink_s)
            dec.node.downlink_due_s = max(0.0, dec.node.downlink_due_s - pre.downlink_s)
        pre.uplink_s = pre.downlink_s = 0.0

    def _unlink(self, a: Attempt, t: float) -> Attempt | None:
        """Cut a hand-off in two: the other half (returned) is taken off its node."""
        pre = a if a.handoff is not None else a.source
        if pre is None:
            return None
        dec = pre.handoff
        assert dec is not None
        self._release_link(pre)
        other = dec if a is pre else pre
        pre.handoff, dec.source = None, None
        if other.live:
            other.live = False
            node = other.node
            node.advance(t)
            node.remove(other)
            node.start_prefill(t)  # in case it was the one being prefilled
            self.replan(node, t)
            self._index(node)
        return other

    def _drop(self, a: Attempt, t: float) -> None:
        """Take a live attempt off its node, and a hand-off's other half off the other."""
        self._unlink(a, t)
        a.live = False
        node = a.node
        node.advance(t)
        node.remove(a)
        node.start_prefill(t)  # in case it was the one being prefilled
        self.replan(node, t)
        self._index(node)

    def complete(self, a: Attempt, t: float) -> None:
        req, node = a.req, a.node
        a.live = False
        self.status[req] = DONE
        self.end[req] = t + node.profile.network_rtt_s
        for other in self.live.pop(req, []):
            if other is not a and other.live:  # a hedge that lost: cancelled, its work wasted
                self.result_counters["hedge_waste"] += int(other.done)
                self._drop(other, t)
        pending = self.waiting_by_req.get(req)
        if pending is not None:
            self._unwait(pending)
        node.remember(a.conversation, a.context0 + a.target)  # for the next turn
        if a.conversation:
            self.prefix_home[a.conversation] = node.idx
        shares = self.shares.pop(req, [])
        if a.handed:  # the sender prefilled it and sampled the first token (its share is in)
            shares.append((node, 0, a.target - 1))
            node.tokens_out += a.target - 1
        else:
            shares.append((node, a.context0, a.target))
            node.tokens_out += a.target
        self.settle(req, shares)
        self._learn_speed(a, t)

    def _learn_speed(self, a: Attempt, t: float) -> None:
        """What the coordinator does when a job ends: fold measured speed into the node's factor."""
        decode_s = t - a.first_token_t
        if a.target <= 1 or decode_s <= 0.0:
            return
        node = a.node
        step = node.costs.decode_step_s(a.decode_batch, a.context0 + a.target // 2)
        model = node.spec.name
        node.factor = {
            model: update_speed_factor(
                node.factor.get(model, 1.0), (a.target - 1) / decode_s, 1.0 / step
            )
        }

    def settle(self, req: int, shares: list[tuple[SimNode, int, int]]) -> None:
        """The production ledger's rules (ledger/pricing.py): the client's charge, the owners'
        split."""
        price = self.prices.price_of(self.req_model[req])
        hold = pricing.hold_micros(price, self.prompt[req], max_tokens_for(self.output[req]))
        charge = pricing.charge_micros(price, self.prompt[req], self.output[req], hold)
        work = [
            pricing.WorkShare("owner-" + n.node_id, n.node_id, n.profile.device_class, p, c)
            for n, p, c in shares
        ]
        split = pricing.split_charge(charge, price, self.prices.terms, work)
        for e in split.earnings:
            self.by_id[e.node_id].earned_micros += e.amount_micros
        self.result_counters["charges"] += charge

    def fail(self, req: int, t: float) -> None:
        self.status[req] = FAILED
        self.end[req] = t
        self.shares.pop(req, None)  # a failed job is not charged; nobody is paid (the hold voids)

    # --- comings and goings ------------------------------------------------------------------

    def on_join(self, obj: object, _version: int, t: float) -> None:
        node = obj
        assert isinstance(node, SimNode)
        if node.draining:  # back before its grace ran out: it keeps what it holds
            node.draining = False
            node.drains += 1  # the pending end of that drain no longer applies
        node.accepting, node.up_since, node.stay_t = True, t, -math.inf
        self._index(node)
        end = next((e for s, e in node.intervals if s <= t < e), t)
        if end < self.end_t:
            self.push(end, EV_LEAVE, node)
        if self.waiting:
            self.want_schedule(t)

    def on_leave(self, obj: object, _version: int, t: float) -> None:
        node = obj
        assert isinstance(node, SimNode)
        node.accepting, node.draining, node.stay_t = False, True, -math.inf
        self._learn_session(node, t)
        node.drains += 1
        self._index(node)
        self.push(t + node.policy.drain_grace_s, EV_DRAIN_END, node, node.drains)
        self._next_interval(node, t)

    def on_drain_end(self, obj: object, version: int, t: float) -> None:
        node = obj
        assert isinstance(node, SimNode)
        if not node.draining or version != node.drains:
            return  # already drained (it came back early), or the end of an older drain
        node.advance(t)
        for a in node.attempts():
            if a.handoff is not None or a.source is not None:  # a hand-off cut short
                self.result_counters["handoffs_interrupted"] += 1
                dec = a.handoff or a
                self._unlink(a, t)
                a.live = False
                self.interrupt(dec, t, left=node)
            else:
                self.interrupt(a, t)
        node.queue.clear()
        node.prefilling, node.decoding, node.draining = None, [], False
        node.sending, node.incoming = [], []
        node.forget_cache()  # the owner took the machine back: its KV cache is gone
        self.replan(node, t)
        self._index(node)

    def interrupt(self, a: Attempt, t: float, left: SimNode | None = None) -> None:
        """The node left with this attempt unfinished: resume the job elsewhere from the tokens
        already delivered, unless another copy carries on or it is out of attempts. ``left``:
        the node that left, when it is not the attempt's own (a hand-off's sender)."""
        req, node = a.req, a.node
        a.live = False
        copies = self.live.get(req, [])
        if a in copies:
            copies.remove(a)
        if not copies:
            self.live.pop(req, None)
        tokens = int(a.done)
        self.interrupted[req] = min(255, self.interrupted[req] + 1)
        if a.handed:  # the sender's share (prompt, first token) went in when it shipped
            if tokens > 1:
                self.shares.setdefault(req, []).append((node, 0, tokens - 1))
        elif a.first_token_t >= 0.0:
            self.shares.setdefault(req, []).append((node, a.context0, tokens))
        if req in self.live or req in self.waiting_by_req or self.status[req] != PENDING:
            return
        if self.attempts[req] >= limits.job_attempts_max:
            self.fail(req, t)
            return
        job = replace(
            a.job, job_id=str(req), generated_tokens=a.job.generated_tokens + tokens,
            admitted_at_s=t, avoid_nodes=((left or node).node_id,),
        )  # fmt: skip
        self._enqueue(Waiting(req, job, t), t)

    def on_hedge(self, obj: object, _version: int, t: float) -> None:
        a = obj
        assert isinstance(a, Attempt)
        req = a.req
        if not a.live or req in self.waiting_by_req:
            return
        done = int(a.done)
        if should_hedge(a.job, a.assigned_t, a.predicted_finish_t, done, self.hedged[req], t,
                        self.sched):  # fmt: skip
            self.hedged[req] += 1
            base = replace(a.job, job_id=str(req))
            copy = replace(hedge_job(base, done, a.node.node_id, self.hedged[req]), admitted_at_s=t)
            self._enqueue(Waiting(req, copy, t, is_hedge=True), t)

    # --- the result --------------------------------------------------------------------------

    def _result(self, t_end: float, wall_s: float) -> SimResult:
        for req in range(len(self.status)):
            if self.status[req] == PENDING:  # still running or waiting when the run stopped
                self.fail(req, t_end)
        available = np.zeros(len(self.nodes))
        busy_cost = 0
        for node in self.nodes:
            node.advance(t_end)
            available[node.idx] = sum(
                max(0.0, min(e, t_end) - max(s, 0.0)) for s, e in node.intervals
            )
            rate = self.prices.terms.busy_rate(node.profile.device_class)
            busy_cost += int(node.busy_s * rate / 3600.0)
        c = self.result_counters
        return SimResult(
            policy=self.config.policy,
            seed=self.config.seed,
            fleet=self.fleet,
            trace_name=self.trace.name,
            arrival=self.trace.arrival_s,
            prompt=self.trace.prompt_tokens,
            output=self.trace.output_tokens,
            first_token=np.asarray(self.first),
            end=np.asarray(self.end),
            status=np.frombuffer(bytes(self.status), dtype=np.uint8),
            attempts=np.frombuffer(bytes(self.attempts), dtype=np.uint8),
            interrupted=np.frombuffer(bytes(self.interrupted), dtype=np.uint8),
            hedged=np.frombuffer(bytes(self.hedged), dtype=np.uint8),
            handed_off=np.frombuffer(bytes(self.handed_off), dtype=np.uint8),
            node_class=np.asarray([n.cls for n in self.nodes]),
            node_busy_s=np.asarray([n.busy_s for n in self.nodes]),
            node_available_s=available,
            node_earned_micros=np.asarray([n.earned_micros for n in self.nodes], dtype=np.int64),
            kv_over_capacity_placements=sum(n.kv_over_capacity_placements for n in self.nodes),
            kv_bytes_moved=c["kv_bytes"],
            handoffs_interrupted=c["handoffs_interrupted"],
            prompt_tokens_admitted=sum(n.prompt_tokens_admitted for n in self.nodes),
            prompt_tokens_cached=sum(n.prompt_tokens_cached for n in self.nodes),
            charges_micros=c["charges"],
            hedge_waste_tokens=c["hedge_waste"],
            busy_cost_micros=busy_cost,
            scheduler_calls=c["calls"],
            events=c["events"],
            sim_end_s=t_end,
            wall_s=wall_s,
        )
