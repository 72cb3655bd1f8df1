"""The scheduler: which node runs which waiting job. Pure: no database, network or clock.

``schedule(jobs, nodes, models, now_s, config, rng=None)`` takes the waiting jobs, snapshots of the
nodes and the model specs, and returns assignments. The coordinator calls it with live state; the
simulator calls it with simulated state; tests call it with hand-built state. The caller applies
the assignments; jobs left out stay waiting for the next call.

Policies (``SchedulerConfig.policy``):

- ``fastest`` (ours, the default): a job goes to the node that minimises its predicted completion
  time (queueing + prefill + decode at that node's batch + network round trip), corrected by the
  node's measured speed, weighted by the risk that the node leaves first. A job predicted to take
  longer than a fraction of a node's expected stay is not placed there. If the best node is busy
  (every slot taken), the job waits for it rather than going to a much slower free node (late
  binding; ``late_binding_gain_min`` says how much slower): nothing is returned for it, and
  later jobs of the same call see that queue.
- ``cheapest-within-deadline``: the cheapest node whose predicted finish meets the job's deadline
  (or ``deadline_default_s`` after admission); the fastest node if none does.
- baselines for the simulator: ``random``, ``round-robin`` (least recently assigned first),
  ``least-loaded``; they respect the hard constraints (model, fit, availability, trust, free slot)
  and ignore speed and departures.

With ``SchedulerConfig.disaggregate`` ("fastest"), a job may instead be handed off: prefilled on
one node and decoded on another, its KV cache shipped between them, when the roofline predicts
that pair finishes it sooner than any single node (``predict_handoff``); the assignment then
names both (``Assignment.decode_node_id``).

NodeSnapshot fields read: node_id, profile, models, active_jobs, jobs_max, queued_tokens,
prefill_backlog_tokens, prefill_backlog_s, kv_reserved_tokens, available, draining,
expected_stay_s, reputation, decode_speed_factor (else measured_decode_tokens_per_s at
measured_decode_batch), price_micros_per_mtok, last_assigned_s (round-robin only),
cached_prefixes, uplink_backlog_s and downlink_backlog_s (hand-offs only). Job fields read:
job_id, model, prompt_tokens, max_tokens, generated_tokens, admitted_at_s, deadline_s,
trusted_only, avoid_nodes, prefix_key, prefix_tokens.

For large fleets the per-job search is bounded: nodes are grouped by (device class, accelerator,
price); a group of at most ``group_candidates`` nodes is weighed whole (so small states get the
exact answer), a larger one is ranked once per call by the predicted completion of a typical job
of the call; each job weighs every group's best usable node, then the runners-up of the group that
came out ahead. docs/scheduling.md has the formulas.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
import math
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple

from cachetools import LRUCache

from sparecycles.errors import invariant
from sparecycles.scheduling import perfmodel
from sparecycles.scheduling.perfmodel import DEFAULT_CALIBRATION, Calibration
from sparecycles.types import Assignment, Job, ModelSpec, NodeSnapshot

POLICIES = ("fastest", "cheapest-within-deadline", "random", "round-robin", "least-loaded")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    policy: str = "fastest"
    reputation_min: float = 0.5  # below this a node gets no work at all
    trusted_reputation_min: float = 0.9  # a job marked trusted_only needs at least this
    # A job is not placed on a node whose expected stay is shorter than its predicted duration
    # divided by this fraction: with roughly exponential departures, a job that takes half the
    # expected stay finishes before the node leaves about 60% of the time (exp(-0.5)).
    stay_fraction_max: float = 0.5
    # ... unless it has waited this long already: then a risky node beats no node.
    stay_rule_relax_after_s: float = 5.0
    # A departure costs about the job's whole predicted time again (noticing, placing, prefilling
    # anew on another node): completion is weighted by 1 + this * P(node leaves first).
    departure_penalty_fraction: float = 1.0
    late_binding: bool = True  # "fastest"/"cheapest": may keep a job waiting for a busy node
    late_binding_wait_s_max: float = 5.0  # ... for so long; then the best free node takes it
    # ... and only if the busy node's score beats the best free node's by this factor: the
    # performance model is trusted to about 25 % (docs/benchmarks.md), so a smaller edge is noise,
    # and a fleet of near-equal nodes would otherwise queue on whichever measured a little faster.
    late_binding_gain_min: float = 1.25
    # With several coordinator replicas, a node connected to another replica costs a relay of
    # every message over the bus (CPU on both replicas and NATS). Among near-equal nodes the
    # replica's own wins: a relayed node is chosen only if it beats this replica's best free
    # node by more than this fraction of its score (0: no preference).
    relay_tolerance: float = 0.1
    group_rank_local_scan: int = 64  # ... looked for this far down a large group's ranking
    deadline_default_s: float = 60.0  # "cheapest-within-deadline" for a job without a deadline
    group_candidates: int = 4  # nodes per group each job weighs exactly
    # A group larger than this is ranked only over its least-loaded members (free slots first,
    # then the smallest queue per unit of memory bandwidth): ranking predicts every member, and
    # on one group of 10,000 nodes that took most of a second per placement pass while the best
    # node of such a group is, all but always, among its least-loaded few hundred.
    group_rank_max: int = 512
    assignments_per_call_max: int = 10_000
    # Hedging: a job still running after this many times its predicted duration gets a second
    # node (0 disables); at most hedges_per_job_max, only if enough tokens remain to matter.
    hedge_after_factor: float = 0.0
    hedges_per_job_max: int = 1
    hedge_remaining_tokens_min: int = 32
    # Disaggregated prefill/decode ("fastest" only; live, coordinator/handoff.py with the
    # setting disagg = "auto"): a job may be prefilled on one node, which samples its first
    # token, and decoded on another, the KV cache shipped between them over the slower of the
    # sender's uplink and the receiver's downlink, when the roofline predicts that pair
    # finishes it sooner than the best single node (docs/scheduling.md, "Disaggregated
    # prefill/decode"). The prefill is
    # weighed on the ``disaggregate_senders`` nodes that would finish it soonest, each against
    # every node the job weighed for decoding.
    disaggregate: bool = False
    disaggregate_senders: int = 2
    # ... and the pair is taken only if its score beats the best single node's by this factor:
    # a hand-off moves gigabytes over a link whose speed is the owner's word, not a measurement,
    # and fails if either node leaves during it, so a near tie stays on one node.
    disaggregate_gain_min: float = 1.1
    calibration: Calibration = field(default=DEFAULT_CALIBRATION)

    def __post_init__(self) -> None:
        invariant(self.policy in POLICIES, f"unknown scheduling policy {self.policy!r}")
        invariant(self.group_candidates >= 1, "group_candidates must be at least 1")
        invariant(self.group_rank_max >= self.group_candidates,
                  "group_rank_max must be at least group_candidates")
        invariant(self.late_binding_gain_min >= 1.0, "late_binding_gain_min must be at least 1")
        invariant(self.disaggregate_gain_min >= 1.0, "disaggregate_gain_min must be at least 1")
        invariant(self.disaggregate_senders >= 1, "disaggregate_senders must be at least 1")


# --- measured speed ------------------------------------------------------------------------

SPEED_FACTOR_MIN = 0.05  # a node 20x slower than predicted is broken; clamp rather than trust it
SPEED_FACTOR_MAX = 20.0


def update_speed_factor(
    factor: float, measured_tokens_per_s: float, predicted_tokens_per_s: float, alpha: float = 0.2
) -> float:
    """EWMA of measured / predicted decode speed: the value to store in
    ``NodeSnapshot.decode_speed_factor[model]`` after a job finishes. ``alpha`` 0.2 lets about
    five jobs move the estimate most of the way, so one noisy job cannot swing placement."""
    if measured_tokens_per_s <= 0.0 or predicted_tokens_per_s <= 0.0:
        return factor
    ratio = measured_tokens_per_s / predicted_tokens_per_s
    updated = (1.0 - alpha) * factor + alpha * ratio
    return min(SPEED_FACTOR_MAX, max(SPEED_FACTOR_MIN, updated))


# Context at which a node's reported per-job decode speed is compared with the prediction when
# no speed factor is kept for it (see speed_factor): a typical chat request's context.
SPEED_REFERENCE_CONTEXT_TOKENS = 1024


def speed_factor(
    node: NodeSnapshot, model: str, spec: ModelSpec, calib: Calibration = DEFAULT_CALIBRATION
) -> float:
    """Measured / predicted decode speed of ``node`` for ``model``: the kept factor if there is
    one; else the node's measured per-job decode speed (``measured_decode_tokens_per_s``) over
    the predicted per-job speed at the batch it was measured at (``measured_decode_batch``, else
    the node's current batch); else 1."""
    factor = node.decode_speed_factor.get(model)
    if factor is not None:
        return factor
    measured = node.measured_decode_tokens_per_s.get(model, 0.0)
    if measured <= 0.0:
        return 1.0
    batch = max(1, round(node.measured_decode_batch.get(model, 0.0)) or node.active_jobs)
    step_s = perfmodel.costs_of(spec, node.profile, calib).decode_step_s(
        batch, SPEED_REFERENCE_CONTEXT_TOKENS
    )
    return update_speed_factor(1.0, measured, 1.0 / step_s, alpha=1.0)


# --- prediction ----------------------------------------------------------------------------


class _Load:
    """A node's load as this call has changed it (the snapshot itself stays untouched). A plain
    slotted class: one is made per node per call, so it allocates nothing more until used."""

    __slots__ = ("_costs", "_factors", "active", "downlink_placed_s", "kv_placed",
                 "last_assigned_s", "node", "prefill_backlog_s", "queued_tokens",
                 "uplink_placed_s", "version", "waiting")

    def __init__(self, node: NodeSnapshot, active: int, queued_tokens: int,
                 last_assigned_s: float = -math.inf) -> None:  # fmt: skip
        self.node = node
        self.active = active
        self.queued_tokens = queued_tokens
        self.prefill_backlog_s = 0.0  # prefills of jobs placed here in this call, run before ours
        self.kv_placed = 0  # KV tokens reserved by the jobs placed here in this call
        self.waiting = 0  # jobs of this call waiting for a slot here (late binding)
        self.uplink_placed_s = 0.0  # KV-cache hand-offs placed in this call, from here
        self.downlink_placed_s = 0.0  # ... and to here
        self.version = 0
        self.last_assigned_s = last_assigned_s
        self._costs: dict[str, perfmodel.Costs] | None = None  # per model, this call
        self._factors: dict[str, float] | None = None  # speed_factor per model, this call

    @property
    def full(self) -> bool:
        return self.active >= self.node.jobs_max

    def costs_of(self, spec: ModelSpec, calib: Calibration) -> perfmodel.Costs:
        if self._costs is None:
            self._costs = {}
        c = self._costs.get(spec.name)
        if c is None:
            c = self._costs[spec.name] = perfmodel.costs_of(spec, self.node.profile, calib)
        return c

    def factor_of(self, model: str, spec: ModelSpec, calib: Calibration) -> float:
        if self._factors is None:
            self._factors = {}
        f = self._factors.get(model)
        if f is None:
            f = self._factors[model] = speed_factor(self.node, model, spec, calib)
        return f


class Prediction(NamedTuple):  # a tuple: built hundreds of times per call, so kept cheap
    ttft_s: float  # from now to the first token at the client
    prefill_s: float  # of which the prompt's prefill on the node
    total_s: float  # from now to the last token
    score_s: float  # total_s weighted by the risk of the node leaving first
    stay_ok: bool  # the job fits comfortably in the node's expected stay
    cost_micros: int


def _queue_wait_s(load: _Load, step_s: float) -> float:
    """Time until a slot frees on a full node, for the (waiting + 1)-th job in its queue. With
    ``b`` running jobs whose remaining tokens spread evenly up to twice their mean, the first
    finishes after about 2 * mean / (b + 1) steps."""
    if not load.full:
        return 0.0
    b = max(1, load.active)
    mean_remaining = load.queued_tokens / b
    return (load.waiting + 1) * 2.0 * mean_remaining / (b + 1) * step_s


def predict(
    job: Job, node: NodeSnapshot, spec: ModelSpec, now_s: float, config: SchedulerConfig
) -> Prediction:
    """The prediction the scheduler makes for ``job`` on ``node`` as it stands (no other job of
    the same call counted); the coordinator keeps it to correct the node's speed later."""
    load = _Load(node, node.active_jobs, node.queued_tokens)
    return _predict(job, load, spec, now_s, config)


# The three helpers below repeat parts of _predict for the hand-off's prediction; _predict keeps
# them inline, as it is the scheduler's innermost function.


def _cached_tokens(job: Job, node: NodeSnapshot, context: int) -> int:
    """Prompt tokens of ``job`` that ``node``'s prefix cache holds (multi-turn)."""
    if job.prefix_key and node.cached_prefixes:
        return min(node.cached_prefixes.get(job.prefix_key, 0), job.prefix_tokens, context - 1)
    return 0


def _backlog_s(load: _Load, costs: perfmodel.Costs, factor: float) -> float:
    """Prefill queued on the node before a new job's: prompts placed earlier (as reported, else
    predicted from their tokens) and those this call placed there."""
    node = load.node
    backlog = node.prefill_backlog_s
    if backlog <= 0.0 and node.prefill_backlog_tokens > 0:
        backlog = costs.prefill_s(node.prefill_backlog_tokens) / factor
    return backlog + load.prefill_backlog_s


def _p_leave(seconds: float, stay_s: float) -> float:
    """The chance that a node expected to stay ``stay_s`` leaves within ``seconds``."""
    if stay_s == math.inf:
        return 0.0
    return 1.0 - math.exp(-seconds / (stay_s if stay_s > 1e-9 else 1e-9))


def _predict(
    job: Job, load: _Load, spec: ModelSpec, now_s: float, config: SchedulerConfig
) -> Prediction:
    node, calib = load.node, config.calibration
    costs = load.costs_of(spec, calib)
    factor = load.factor_of(job.model, spec, calib)
    context = job.prompt_tokens + job.generated_tokens  # a resumed job prefills its tokens too
    remaining = max(1, job.max_tokens - job.generated_tokens)
    batch = load.active + 1 if load.active < node.jobs_max else node.jobs_max
    step = costs.decode_step_s(batch, context + remaining // 2) / factor
    hit = 0  # prompt tokens the node's prefix cache holds for this job (multi-turn)
    if job.prefix_key and node.cached_prefixes:
        hit = min(node.cached_prefixes.get(job.prefix_key, 0), job.prefix_tokens, context - 1)
    prefill = costs.prefill_s(context - hit, hit) / factor
    wait = _queue_wait_s(load, step) if load.active >= node.jobs_max else 0.0
    backlog = node.prefill_backlog_s  # prompts already queued on the node are prefilled first
    if backlog <= 0.0 and node.prefill_backlog_tokens > 0:
        backlog = costs.prefill_s(node.prefill_backlog_tokens) / factor
    ttft = node.profile.network_rtt_s + wait + backlog + load.prefill_backlog_s + prefill + step
    total = ttft + (remaining - 1) * step
    stay = node.expected_stay_s
    p_leave = 0.0 if stay == math.inf else 1.0 - math.exp(-total / (stay if stay > 1e-9 else 1e-9))
    waited = now_s - job.admitted_at_s
    stay_ok = total <= config.stay_fraction_max * stay or waited >= config.stay_rule_relax_after_s
    cost = node.price_micros_per_mtok * (context + remaining) // 1_000_000
    score = total * (1.0 + config.departure_penalty_fraction * p_leave)
    return Prediction(ttft, prefill, total, score, stay_ok, cost)


# --- hard constraints ----------------------------------------------------------------------


def node_can_serve(node: NodeSnapshot, model: str, config: SchedulerConfig) -> bool:
    """Constraints that do not depend on the job: the node works now and holds the model."""
    return (
        node.available
        and not node.draining
        and node.reputation >= config.reputation_min
        and model in node.models
    )


def kv_need_tokens(job: Job) -> int:
    """The KV-cache tokens a job may fill on a node: its prompt, what earlier attempts generated
    (prefilled again) and what it may still generate."""
    return job.prompt_tokens + max(job.max_tokens, job.generated_tokens)


def _kv_reserved(load: _Load, need: int) -> int:
    """KV tokens already reserved on the node: as reported, plus this call's placements; a
    snapshot that reports none while jobs run counts each at ``need`` (the old assumption)."""
    node = load.node
    reported = node.kv_reserved_tokens
    if reported <= 0 and node.active_jobs > 0:
        reported = node.active_jobs * need
    return reported + load.kv_placed


def _job_fits(job: Job, load: _Load, spec: ModelSpec, config: SchedulerConfig) -> bool:
    """Constraints that depend on the job: trust, avoided nodes, memory. Memory: the job's whole
    KV need (``kv_need_tokens``) beside every running job's reservation fits the node's KV
    capacity, so the scheduler never over-commits it (an engine past it must preempt and
    recompute, or refuse)."""
    node = load.node
    if job.trusted_only and node.reputation < config.trusted_reputation_min:
        return False
    if node.node_id in job.avoid_nodes:
        return False
    if not job.needs <= node.features:  # e.g. a grammar, on a node too old to apply it
        return False
    costs = load.costs_of(spec, config.calibration)
    need = kv_need_tokens(job)
    return need <= costs.context_length and _kv_reserved(load, need) + need <= (
        costs.kv_capacity_tokens
    )


# --- ours: fastest and cheapest-within-deadline --------------------------------------------


def _group_key(node: NodeSnapshot) -> tuple[object, ...]:
    return (node.profile.device_class, node.profile.accelerator, node.price_micros_per_mtok)


@dataclass(slots=True)
class _Group:
    """Nodes of one (device class, accelerator, price). A group of at most ``group_candidates``
    nodes is weighed whole; a larger one is ranked by a typical job's predicted completion."""

    members: list[_Load] = field(default_factory=list)
    ranked: list[tuple[float, int, _Load, int]] | None = None
    start: int = 0  # ranked entries before this are known stale

    def candidates(self, count: int) -> list[_Load]:
        if self.ranked is None:
            return self.members
        out: list[_Load] = []
        i, entries = self.start, self.ranked
        while i < len(entries) and len(out) < count:
            _, _, load, version = entries[i]
            if version == load.version:
                out.append(load)
            elif i == self.start:
                self.start += 1
            i += 1
        return out

    def local_candidates(self, scan: int) -> list[_Load]:
        """This replica's own free nodes among the first ``scan`` current entries, in order
        (every member of an unranked group)."""
        if self.ranked is None:
            return [ld for ld in self.members if not ld.node.relayed]
        out: list[_Load] = []
        seen, entries = 0, self.ranked
        for i in range(self.start, len(entries)):
            _, _, load, version = entries[i]
            if version != load.version:
                continue
            seen += 1
            if not load.node.relayed and not load.full:
                out.append(load)
            if seen >= scan:
                break
        return out


@dataclass(slots=True)
class _Ranking:
    """The groups of every model of one call, and the typical job each is ranked by."""

    groups: dict[str, dict[tuple[object, ...], _Group]]
    typical: dict[str, Job]
    seq: int = 0

    memo: RankMemo | None = None

    def rank(self, group: _Group, spec: ModelSpec, now_s: float, config: SchedulerConfig) -> None:
        typical, memo = self.typical[spec.name], self.memo
        entries = []
        for load in group.members:  # every load is as its snapshot: nothing placed yet
            if memo is not None:
                score = memo.score(typical, load, spec, now_s, config)
            else:
                score = _predict(typical, load, spec, now_s, config).score_s
            self.seq += 1
            entries.append((score, self.seq, load, load.version))
        entries.sort()  # seq is unique: loads are never compared
        group.ranked = entries

    def push(
        self, group: _Group, load: _Load, spec: ModelSpec, now_s: float, config: SchedulerConfig
    ) -> None:
        """(Re-)insert ``load`` in its group's ranking after its load changed."""
        if group.ranked is None:
            return
        score = _predict(self.typical[spec.name], load, spec, now_s, config).score_s
        self.seq += 1
        bisect.insort(group.ranked, (score, self.seq, load, load.version))


class RankMemo:
    """Scores of the typical job on node snapshots, kept from one ``schedule`` call to the next.

    Ranking a large group predicts the typical job on every member, each call; between two calls
    of a busy coordinator only the few nodes whose load changed have new snapshots (the
    coordinator reuses a node's snapshot while its inputs are unchanged), so the rest are looked
    up here. A score depends only on the snapshot, the (quantised) typical job, the model and the
    config; the entry keeps its snapshot, so an id is never reused while it is remembered.
    That also keeps replaced snapshots alive (~700 bytes each, measured), so past
    ``entries_max`` entries the least recently used goes (a replaced snapshot's score is never
    read again, so those go first): ~12 MB at most, and live nodes' scores stay.
    """

    def __init__(self, entries_max: int = 16_384) -> None:
        self.entries_max = entries_max
        self._scores: LRUCache[tuple[int, str, int, int], tuple[NodeSnapshot, float]] = (
            LRUCache(entries_max))
        self._config: SchedulerConfig | None = None

    def __len__(self) -> int:
        return len(self._scores)

    def score(
        self, typical: Job, load: _Load, spec: ModelSpec, now_s: float, config: SchedulerConfig
    ) -> float:
        if config is not self._config and config != self._config:
            self._scores.clear()
        self._config = config
        node = load.node
        key = (id(node), spec.name, typical.prompt_tokens, typical.max_tokens)
        hit = self._scores.get(key)
        if hit is not None and hit[0] is node:
            return hit[1]
        score = _predict(typical, load, spec, now_s, config).score_s
        self._scores[key] = (node, score)
        return score


def _load_order(load: _Load) -> tuple[bool, float, float]:
    """A cheap order of a group's members, least loaded first (see ``group_rank_max``)."""
    node = load.node
    bandwidth = max(1.0, node.profile.memory_bandwidth_bytes_per_s)
    return (load.full, load.active / max(1, node.jobs_max), load.queued_tokens / bandwidth)


def _quantised(tokens: float) -> int:
    """``tokens`` rounded to a step of 2**(1/4) (19 %): a large group's ranking is a short list
    of candidates, each then weighed for the job itself, so it may be for a nearby size, and
    rankings for nearby sizes are then the same one (``RankMemo``)."""
    if tokens <= 8:
        return max(1, round(tokens))
    step: float = 2.0 ** (round(4.0 * math.log2(tokens)) / 4.0)
    return round(step)


def _typical_job(jobs: Sequence[Job]) -> Job:
    """A job of (quantised) median prompt and median remaining length, to rank nodes by."""
    prompt = _quantised(statistics.median(j.prompt_tokens + j.generated_tokens for j in jobs))
    remaining = _quantised(statistics.median(max(1, j.remaining_tokens) for j in jobs))
    return replace(jobs[0], prompt_tokens=prompt, generated_tokens=0, max_tokens=remaining,
                   prefix_key="", prefix_tokens=0)


def _build_ranking(
    jobs: Sequence[Job],
    loads: Sequence[_Load],
    models: Mapping[str, ModelSpec],
    now_s: float,
    config: SchedulerConfig,
    memo: RankMemo | None = None,
) -> _Ranking:
    by_model: dict[str, list[Job]] = {}
    for job in jobs:
        by_model.setdefault(job.model, []).append(job)
    ranking = _Ranking(
        groups={m: {} for m in by_model},
        typical={m: _typical_job(js) for m, js in by_model.items()},
        memo=memo,
    )
    for model in by_model:
        groups = ranking.groups[model]
        for load in loads:
            if node_can_serve(load.node, model, config):
                groups.setdefault(_group_key(load.node), _Group()).members.append(load)
        for group in groups.values():
            if len(group.members) > config.group_rank_max:
                group.members = heapq.nsmallest(config.group_rank_max, group.members,
                                                key=_load_order)
            if len(group.members) > config.group_candidates:
                ranking.rank(group, models[model], now_s, config)
    return ranking


def _choose(
    options: list[tuple[Prediction, _Load]], job: Job, now_s: float, config: SchedulerConfig
) -> tuple[Prediction, _Load] | None:
    usable = [o for o in options if o[0].stay_ok]
    if not usable:
        return None
    if config.policy == "cheapest-within-deadline":
        deadline = job.deadline_s
        if deadline is None:
            deadline = job.admitted_at_s + config.deadline_default_s
        on_time = [o for o in usable if now_s + o[0].total_s <= deadline]
        if on_time:
            return min(on_time, key=lambda o: (o[0].cost_micros, o[0].score_s))
    best = min(usable, key=lambda o: o[0].score_s)
    if best[1].full:  # late binding: wait for it only if no free node comes close
        free = [o for o in usable if not o[1].full]
        if free:
            best_free = min(free, key=lambda o: o[0].score_s)
            if best_free[0].score_s <= best[0].score_s * config.late_binding_gain_min:
                best = best_free
    if best[1].node.relayed and config.relay_tolerance > 0:  # this replica's own, if as good
        bound = best[0].score_s * (1.0 + config.relay_tolerance)
        near = [o for o in usable
                if not o[1].node.relayed and not o[1].full and o[0].score_s <= bound]
        if near:
            best = min(near, key=lambda o: o[0].score_s)
    return best


def _best_for(
    job: Job,
    ranking: _Ranking,
    spec: ModelSpec,
    now_s: float,
    config: SchedulerConfig,
    weighed: list[tuple[Prediction, _Load]] | None = None,
) -> tuple[Prediction, _Load] | None:
    """Weigh every group's best usable node for this job, then the runners-up of the group
    whose best came out ahead (a group's ranking is for a typical job, not for this one). The
    nodes weighed go into ``weighed`` when given (the hand-off's candidates)."""
    options: list[tuple[Prediction, _Load]] = [] if weighed is None else weighed
    may_wait = config.late_binding and now_s - job.admitted_at_s < config.late_binding_wait_s_max
    rest: dict[int, list[_Load]] = {}
    for group in ranking.groups[job.model].values():
        candidates = group.candidates(config.group_candidates)
        for i, load in enumerate(candidates):
            if (load.full and not may_wait) or not _job_fits(job, load, spec, config):
                continue
            prediction = _predict(job, load, spec, now_s, config)
            options.append((prediction, load))
            if group.ranked is not None and prediction.stay_ok:
                rest[id(load)] = candidates[i + 1 :]  # weighed only if this group wins
                break
    best = _choose(options, job, now_s, config)
    if best is None or id(best[1]) not in rest:
        return best
    for load in rest[id(best[1])]:
        if (load.full and not may_wait) or not _job_fits(job, load, spec, config):
            continue
        options.append((_predict(job, load, spec, now_s, config), load))
    best = _choose(options, job, now_s, config)
    if best is not None and best[1].node.relayed and config.relay_tolerance > 0:
        # the replica's own nodes may sit just below the top of a ranking: weigh the best one
        # of each group too, so that the relay rule in _choose has it to compare
        seen = {id(o[1]) for o in options}
        for group in ranking.groups[job.model].values():
            for load in group.local_candidates(config.group_rank_local_scan):
                if id(load) in seen or load.full or not _job_fits(job, load, spec, config):
                    continue
                options.append((_predict(job, load, spec, now_s, config), load))
                break
        best = _choose(options, job, now_s, config)
    return best


# --- ours: disaggregated prefill/decode ----------------------------------------------------


class Handoff(NamedTuple):
    """A job prefilled on ``sender`` and decoded on ``receiver``, its KV cache shipped."""

    prediction: Prediction
    sender: _Load
    receiver: _Load
    prefill_s: float  # the prompt's prefill on the sender
    transfer: perfmodel.KvTransfer


def kv_handoff_tokens(job: Job) -> int:
    """The KV-cache tokens a job fills on the node that prefills it for another: its context and
    the first token, held until the hand-off is sent."""
    return job.prompt_tokens + job.generated_tokens + 1


def _prefilled_s(job: Job, load: _Load, spec: ModelSpec, config: SchedulerConfig) -> float:
    """Seconds from now until ``job``'s prompt is prefilled on the node: the prefill queued there
    first, then its own (the prefix the node caches not prefilled again)."""
    calib = config.calibration
    costs = load.costs_of(spec, calib)
    factor = load.factor_of(job.model, spec, calib)
    context = job.prompt_tokens + job.generated_tokens
    hit = _cached_tokens(job, load.node, context)
    return _backlog_s(load, costs, factor) + costs.prefill_s(context - hit, hit) / factor


def predict_handoff(
    job: Job, sender: _Load, receiver: _Load, spec: ModelSpec, now_s: float,
    config: SchedulerConfig,
) -> Handoff:  # fmt: skip
    """The roofline of a hand-off (docs/scheduling.md has the formula): the sender prefills
    after its queued prefill and samples the first token; the KV cache (less the prefix the
    receiver's cache holds) leaves when both the prefill and the links are done with what was
    queued before it, takes ``bytes / min(uplink, downlink)`` plus both round trips; then the
    receiver decodes the rest at its batch + 1. The departure risk is the sender's over the
    hand-off and the receiver's over the whole job."""
    calib = config.calibration
    p, d = sender.node, receiver.node
    p_costs, d_costs = sender.costs_of(spec, calib), receiver.costs_of(spec, calib)
    p_factor = sender.factor_of(job.model, spec, calib)
    d_factor = receiver.factor_of(job.model, spec, calib)
    context = job.prompt_tokens + job.generated_tokens
    remaining = max(1, job.max_tokens - job.generated_tokens)
    hit = _cached_tokens(job, p, context)
    prefill = p_costs.prefill_s(context - hit, hit) / p_factor
    first_step = p_costs.decode_step_s(sender.active + 1, context) / p_factor
    prefilled = _backlog_s(sender, p_costs, p_factor) + prefill + first_step
    ttft = p.profile.network_rtt_s + prefilled
    held = _cached_tokens(job, d, context)  # the receiver has these already: not sent
    transfer = perfmodel.kv_transfer(context - held, p_costs, p.profile, d.profile)
    start = max(prefilled, p.uplink_backlog_s + sender.uplink_placed_s,
                d.downlink_backlog_s + receiver.downlink_placed_s)  # fmt: skip
    ready = start + transfer.arrive_s
    # prompts queued on the receiver are prefilled in chunks between its decode steps: until they
    # are done the new sequence gains about nothing (a chunk's step is the prefill's, not the
    # decode's), so its decode starts once both the cache and that backlog are through
    decoding = max(ready, _backlog_s(receiver, d_costs, d_factor))
    step = d_costs.decode_step_s(receiver.active + 1, context + remaining // 2) / d_factor
    total = decoding + (remaining - 1) * step + d.profile.network_rtt_s
    kept = (1.0 - _p_leave(ready, p.expected_stay_s)) * (1.0 - _p_leave(total, d.expected_stay_s))
    score = total * (1.0 + config.departure_penalty_fraction * (1.0 - kept))
    frac = config.stay_fraction_max
    stay_ok = (ready <= frac * p.expected_stay_s and total <= frac * d.expected_stay_s) or (
        now_s - job.admitted_at_s >= config.stay_rule_relax_after_s)
    cost = (p.price_micros_per_mtok * context + d.price_micros_per_mtok * remaining) // 1_000_000
    return Handoff(Prediction(ttft, prefill, total, score, stay_ok, cost), sender, receiver,
                   prefill, transfer)  # fmt: skip


def _best_handoff(
    job: Job,
    weighed: list[tuple[Prediction, _Load]],
    best: tuple[Prediction, _Load] | None,
    spec: ModelSpec,
    now_s: float,
    config: SchedulerConfig,
) -> Handoff | None:
    """The best pair of the nodes the job weighed (each with a free slot and a known link) whose
    score beats the best single node's by ``disaggregate_gain_min``; None if none does."""
    if job.max_tokens - job.generated_tokens <= 1:
        return None  # the prefill's first token is the whole answer: nothing to decode elsewhere
    # each receiver with its decode as the job's own prediction there has it (the batch and step
    # a hand-off would get) and the bytes it would be sent (not what its prefix cache holds):
    # with the sender's prefill, a lower bound of the pair's time, to skip hopeless pairs
    context = job.prompt_tokens + job.generated_tokens
    kv_per_token = perfmodel.kv_bytes_per_token(spec, config.calibration)
    receivers: dict[int, tuple[_Load, float, float]] = {}
    down_max = 0.0
    sent_min = math.inf
    for prediction, load in weighed:
        if not load.full and load.node.profile.downlink_bytes_per_s > 0.0:
            sent = float((context - _cached_tokens(job, load.node, context)) * kv_per_token)
            receivers[id(load)] = (load, prediction.total_s - prediction.ttft_s, sent)
            down_max = max(down_max, load.node.profile.downlink_bytes_per_s)
            sent_min = min(sent_min, sent)
    if not receivers:
        return None
    bar = best[0].score_s / config.disaggregate_gain_min if best is not None else math.inf
    # a sender whose bytes alone, at the fastest downlink, take longer than the best single
    # node is no sender (a fleet of home uplinks stops here, before any prediction)
    up_min = sent_min / bar if bar < math.inf else 0.0
    senders: dict[int, _Load] = {}
    for _, load in weighed:
        up = load.node.profile.uplink_bytes_per_s
        if not load.full and up > 0.0 and min(up, down_max) > up_min:
            senders[id(load)] = load
    if not senders or len(senders.keys() | receivers.keys()) < 2:
        return None
    soonest = heapq.nsmallest(config.disaggregate_senders,
                              ((_prefilled_s(job, ld, spec, config), i, ld)
                               for i, ld in enumerate(senders.values())))  # fmt: skip
    chosen: Handoff | None = None
    for prefilled, _, sender in soonest:
        for receiver, decode_s, sent in receivers.values():
            if receiver is sender:
                continue
            link = perfmodel.link_bytes_per_s(sender.node.profile, receiver.node.profile)
            if prefilled + sent / link + decode_s >= bar:
                continue  # prefill, bytes and decode alone take longer than the best single node
            handoff = predict_handoff(job, sender, receiver, spec, now_s, config)
            if handoff.prediction.stay_ok and handoff.prediction.score_s < bar:
                bar, chosen = handoff.prediction.score_s, handoff
    return chosen


def _place_handoff(job: Job, handoff: Handoff, now_s: float) -> Assignment:
    """Count a hand-off in both nodes' loads for the rest of the call."""
    sender, receiver = handoff.sender, handoff.receiver
    sender.active += 1
    sender.queued_tokens += 1
    sender.prefill_backlog_s += handoff.prefill_s
    sender.kv_placed += kv_handoff_tokens(job)
    sender.uplink_placed_s += handoff.transfer.uplink_s
    receiver.active += 1
    receiver.queued_tokens += job.remaining_tokens
    receiver.kv_placed += kv_need_tokens(job)
    receiver.downlink_placed_s += handoff.transfer.downlink_s
    return Assignment(job.job_id, sender.node.node_id, now_s + handoff.prediction.total_s,
                      decode_node_id=receiver.node.node_id)  # fmt: skip


def _schedule_ours(
    jobs: Sequence[Job],
    loads: Sequence[_Load],
    models: Mapping[str, ModelSpec],
    now_s: float,
    config: SchedulerConfig,
    memo: RankMemo | None = None,
) -> list[Assignment]:
    ranking = _build_ranking(jobs, loads, models, now_s, config, memo)
    out: list[Assignment] = []
    disaggregate = config.disaggregate and config.policy == "fastest"

    def none_free() -> bool:
        """No node of the call can take another job: the jobs left would only queue for busy
        nodes (late binding), which returns nothing, so the call ends there (a job's end with
        a queue waiting places the next jobs, not the whole queue). Asked when a node fills."""
        return not any(not ld.full for groups in ranking.groups.values()
                       for group in groups.values() for ld in group.members)

    for job in jobs:
        spec = models[job.model]
        weighed: list[tuple[Prediction, _Load]] | None = [] if disaggregate else None
        best = _best_for(job, ranking, spec, now_s, config, weighed)
        handoff = _best_handoff(job, weighed, best, spec, now_s, config) if weighed else None
        if handoff is not None:
            out.append(_place_handoff(job, handoff, now_s))
            for load in (handoff.sender, handoff.receiver):
                load.version += 1
                group = ranking.groups[job.model][_group_key(load.node)]
                ranking.push(group, load, spec, now_s, config)
            filled = handoff.sender.full or handoff.receiver.full
            if len(out) >= config.assignments_per_call_max or (filled and none_free()):
                break
            continue
        if best is None:
            continue
        prediction, load = best
        if load.full:
            load.waiting += 1  # the job waits for this node; later jobs see the longer queue
        else:
            out.append(Assignment(job.job_id, load.node.node_id, now_s + prediction.total_s))
            load.active += 1
            load.queued_tokens += job.remaining_tokens
            load.prefill_backlog_s += prediction.prefill_s
            load.kv_placed += kv_need_tokens(job)
            if load.full and none_free():
                break
        load.version += 1
        ranking.push(ranking.groups[job.model][_group_key(load.node)], load, spec, now_s, config)
        if len(out) >= config.assignments_per_call_max:
            break
    return out


# --- baselines -----------------------------------------------------------------------------


_RANDOM_TRIES_MAX = 64  # random picks before falling back to filtering every node


def _pick_random(job: Job, serving: list[_Load], spec: ModelSpec, config: SchedulerConfig,
                 rng: random.Random) -> _Load | None:  # fmt: skip
    """Uniform over the nodes that can take the job: rejection sampling, then a full filter."""
    for _ in range(min(_RANDOM_TRIES_MAX, 4 * len(serving))):
        load = rng.choice(serving)
        if not load.full and _job_fits(job, load, spec, config):
            return load
    free = [ld for ld in serving if not ld.full and _job_fits(job, ld, spec, config)]
    return rng.choice(free) if free else None


def _tie_break(node_id: str, salt: bytes) -> bytes:
    """A random order of nodes that does not depend on which other nodes are in the list (so
    offering only the nodes a baseline could pick gives the answer of the whole fleet)."""
    return hashlib.blake2b(node_id.encode(), key=salt, digest_size=8).digest()


def _baseline_key(load: _Load, policy: str, salt: bytes) -> tuple[float, object]:
    if policy == "round-robin":
        return (load.last_assigned_s, load.node.node_id)
    # least-loaded, random ties
    return (load.active / max(1, load.node.jobs_max), _tie_break(load.node.node_id, salt))


def _pick_ordered(job: Job, heap: list[tuple[tuple[float, object], int, _Load, int]],
                  spec: ModelSpec, config: SchedulerConfig) -> _Load | None:  # fmt: skip
    """The first node in the policy's order that can take the job (stale entries dropped)."""
    skipped, chosen = [], None
    while heap:
        entry = heapq.heappop(heap)
        load = entry[2]
        if entry[3] != load.version or load.full:
            continue
        if _job_fits(job, load, spec, config):
            chosen = load
            skipped.append(entry)  # re-keyed by the caller; this entry goes stale
            break
        skipped.append(entry)
    for entry in skipped:
        heapq.heappush(heap, entry)
    return chosen


def _schedule_baseline(
    jobs: Sequence[Job],
    loads: Sequence[_Load],
    models: Mapping[str, ModelSpec],
    now_s: float,
    config: SchedulerConfig,
    rng: random.Random,
) -> list[Assignment]:
    out: list[Assignment] = []
    serving: dict[str, list[_Load]] = {}
    heaps: dict[str, list[tuple[tuple[float, object], int, _Load, int]]] = {}
    salt = rng.getrandbits(64).to_bytes(8, "big") if config.policy == "least-loaded" else b""
    for job in jobs:
        spec = models[job.model]
        if job.model not in serving:
            serving[job.model] = [ld for ld in loads if node_can_serve(ld.node, job.model, config)]
            heaps[job.model] = []
            if config.policy != "random":
                heaps[job.model] = [
                    (_baseline_key(ld, config.policy, salt), i, ld, ld.version)
                    for i, ld in enumerate(serving[job.model])
                ]
                heapq.heapify(heaps[job.model])
        if not serving[job.model]:
            continue
        if config.policy == "random":
            load = _pick_random(job, serving[job.model], spec, config, rng)
        else:
            load = _pick_ordered(job, heaps[job.model], spec, config)
        if load is None:
            continue
        prediction = _predict(job, load, spec, now_s, config)
        out.append(Assignment(job.job_id, load.node.node_id, now_s + prediction.total_s))
        load.active += 1
        load.queued_tokens += job.remaining_tokens
        load.kv_placed += kv_need_tokens(job)
        load.last_assigned_s = now_s + len(out) * 1e-9  # later in this call: later in the cycle
        load.version += 1
        if config.policy != "random":
            key = _baseline_key(load, config.policy, salt)
            heapq.heappush(heaps[job.model], (key, len(out) + len(loads), load, load.version))
        if len(out) >= config.assignments_per_call_max:
            break
    return out


# --- the entry point -----------------------------------------------------------------------


def schedule(
    jobs: Sequence[Job],
    nodes: Sequence[NodeSnapshot],
    models: Mapping[str, ModelSpec],
    now_s: float,
    config: SchedulerConfig = SchedulerConfig(),
    rng: random.Random | None = None,
    memo: RankMemo | None = None,
) -> list[Assignment]:
    """Place waiting jobs on nodes; oldest job first. Jobs whose model is not in ``models`` or
    that no node can take now are left out (they stay waiting). ``rng`` (seeded by the caller)
    is needed by the random and least-loaded policies; each node gets at most its free slots.
    A caller that schedules again and again keeps one ``memo``: the answer is the same with or
    without it, only cheaper when most snapshots are the same objects as last call."""
    waiting = sorted(
        (j for j in jobs if j.model in models), key=lambda j: (j.admitted_at_s, j.job_id)
    )
    if not waiting or not nodes:
        return []
    wanted = {j.model for j in waiting}
    if not any(n.active_jobs < n.jobs_max and any(node_can_serve(n, m, config) for m in wanted)
               for n in nodes):
        return []  # every node that could take one is busy: each job waits (or queues for one)
    loads = [
        _Load(n, n.active_jobs, n.queued_tokens, n.last_assigned_s) for n in nodes
    ]
    if config.policy in ("fastest", "cheapest-within-deadline"):
        return _schedule_ours(waiting, loads, models, now_s, config, memo)
    return _schedule_baseline(waiting, loads, models, now_s, config, rng or random.Random(0))


# --- hedging -------------------------------------------------------------------------------


def should_hedge(
    job: Job,
    started_at_s: float,
    predicted_finish_s: float,
    tokens_done: int,
    hedges_so_far: int,
    now_s: float,
    config: SchedulerConfig,
) -> bool:
    """Whether a running job has fallen far enough behind its prediction to start a second copy
    on another node (the copy resumes from ``tokens_done``; the first to finish wins and the
    other is cancelled, its tokens still paid: that is the cost of hedging)."""
    if config.hedge_after_factor <= 0.0 or hedges_so_far >= config.hedges_per_job_max:
        return False
    if job.remaining_tokens - tokens_done < config.hedge_remaining_tokens_min:
        return False
    predicted_s = max(1e-9, predicted_finish_s - started_at_s)
    return now_s - started_at_s >= config.hedge_after_factor * predicted_s


def hedge_job(job: Job, tokens_done: int, node_id: str, hedge_index: int) -> Job:
    """The second copy of a job: resumes from the tokens already streamed, never on ``node_id``."""
    return replace(
        job,
        job_id=f"{job.job_id}~h{hedge_index}",
        generated_tokens=job.generated_tokens + tokens_done,
        avoid_nodes=(*job.avoid_nodes, node_id),
    )
