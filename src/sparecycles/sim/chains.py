"""Chains in the simulator: a model no node holds whole, served by chains of nodes that each
hold a contiguous range of its layers (``FleetSpec.chained``; docs/scheduling.md, "Chains in the
simulator").

Placement and repair call the production planner (``scheduling/chains.py``), as dispatch does
(``coordinator/chains.py``); the policies differ only in what they ask of it:

- ``fastest`` (ours): ``plan_chain_for_job``, the planner scoring a chain as the scheduler
  scores a whole-model node: the job's predicted completion (each stage's prefill backlog, the
  prompt's prefill and hops, every token's step at the stage's batch with this job, and hops),
  with departures weighed in: each stage's node's expected stay (learned, as the sim's
  whole-model policies learn it) against the job's predicted time; a node likely to leave first
  is left out unless no chain exists without it (or the job has waited
  ``SchedulerConfig.stay_rule_relax_after_s``), and weighted by its risk otherwise;
- ``fixed-chain``: the chain the planner picks at the first request, for the whole run; a lost
  stage is replaced only by a node holding the same layers (or waited for), which then stays in
  the chain; every request goes through it;
- ``petals``: Petals' client rule (``petals/client/routing/sequence_manager.py``,
  ``_make_sequence_with_min_latency``): the least-latency path where a server costs half its
  round trip plus an 18 ms serialisation overhead plus ``1 / inference_rps`` per block (the
  server's announced single-sequence speed, here the roofline's), no departure prediction; a
  lost server is banned and its span routed again the same way.

The model of a chain (the assumptions, stated):

- **Decode**: each chain's token goes through its stages one after another; the chains on a
  stage fall into step and share its pass (as ``node/stage_worker.py`` batches them), so a
  token's time is ``sum over stages of (the stage's roofline step at the number of chains
  decoding there / the node's true speed + the planner's hop_s)``. The step is constant between
  events (context at the event's value); progress is linear in between.
- **Prefill** (and a repair's rebuild): stage after stage, each stage's prompt pass
  (``perfmodel`` prefill of its layers / true speed) after the prefills already queued on it
  (one at a time per node), then the activations' hop for every position
  (``scheduling/chains.prefill_hop_s``). A prefill does not slow the decode of the other chains
  on the stage (its passes interleave; the wait for a stage's prefill queue is counted).
- **Memory**: a stage admits a chain only with a free slot (``jobs_max``) and room in its KV
  cache for the chain's whole need (context plus max_tokens, at its layers' bytes per token);
  every policy sees only such nodes.
- **Departures**: a node that leaves keeps serving its chains for its owner's drain grace; at
  its end each chain through it loses that stage. The chain keeps its other stages (and their
  caches) and asks its policy for a segment over the lost layers, without the nodes that failed
  it; the segment rebuilds its caches from the stage's inputs (a prefill of the prompt and the
  tokens delivered, through the new stages only), then decoding resumes: no token is lost or
  repeated. A stage lost during the prompt's prefill restarts the prefill through the repaired
  chain. No segment within ``limits.placement_wait_s_max`` (looked for every
  ``retry_interval_s``), or more than ``limits.stage_repairs_max`` repairs: the request fails
  (not charged, as a whole-model job that lost its node for good).
- **Money**: each stage's owner earns its share of the charge by tokens processed times its
  layers' part of the work (``pricing.WorkShare.work_ppm``), as settlement does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from sparecycles import limits
from sparecycles.ledger import pricing
from sparecycles.scheduling import chains as planner
from sparecycles.scheduling import perfmodel
from sparecycles.sim.fleet_file import FleetSpec
from sparecycles.sim.loop import DONE, EV_DRAIN_END, SimConfig, SimResult, Simulation, Waiting
from sparecycles.sim.node import SimNode
from sparecycles.sim.trace import Trace
from sparecycles.types import Job, ModelSpec, NodeSnapshot

EV_CHAIN, EV_REPAIR = 20, 21
PREFILL, DECODE, REPAIR = 0, 1, 2
PETALS_OVERHEAD_S = 0.018  # Petals' measured serialisation overhead per server (its source)


@dataclass(slots=True, eq=False)
class Stage:
    node: SimNode
    first: int
    end: int
    tokens0: int = 0  # tokens the chain had delivered when this stage joined it
    ready: bool = False  # its KV cache holds the chain's context (prefilled or rebuilt)


@dataclass(slots=True, eq=False)
class ChainRun:
    """One request served by a chain."""

    req: int
    job: Job
    stages: list[Stage]
    target: int  # tokens to generate
    context0: int  # prompt tokens
    kv_need: int  # KV tokens on each stage: the context plus every token it may generate
    phase: int = PREFILL
    done: float = 0.0  # tokens delivered
    token_s: float = math.inf  # seconds per token as the chain stands (decoding)
    busy: list[float] = field(default_factory=list)  # each stage's busy share of that time
    last_t: float = 0.0
    version: int = 0
    repairs: int = 0
    live: bool = True
    broken: tuple[int, int] | None = None  # the layers [first, end) waiting for a node
    lost_at: float = 0.0
    avoid: set[str] = field(default_factory=set)  # nodes that failed it
    shares: list[tuple[SimNode, int, int, int]] = field(default_factory=list)
    # (node, prompt tokens it prefilled, tokens it processed, work ppm) of stages it lost


def petals_route(spec: ModelSpec, nodes: Iterable[NodeSnapshot], first: int, end: int, *,
                 context_tokens: int, avoid: Iterable[str] = ()) -> planner.ChainPlan | None:
    """Petals' least-latency route over layers ``[first, end)``: a server costs half its round
    trip, ``PETALS_OVERHEAD_S`` and one block step per layer (its ``inference_rps``, here the
    roofline's step of its layers at batch 1); no departure prediction. The stages' step and hop
    are the planner's, so that the plan reads like any other."""
    banned = frozenset(avoid)
    edges: dict[int, list[tuple[NodeSnapshot, int]]] = {}
    for node in nodes:
        rng = node.layer_ranges.get(spec.name)
        if (rng is None or node.node_id in banned or not node.available or node.draining
                or node.active_jobs >= node.jobs_max or not first <= rng[0] < rng[1] <= end):
            continue
        edges.setdefault(rng[0], []).append((node, rng[1]))
    best: dict[int, tuple[float, tuple[str, ...], tuple[planner.StagePlan, ...]]] = {
        first: (0.0, (), ())}
    for at in range(first, end):
        here = best.get(at)
        if here is None:
            continue
        for node, to in edges.get(at, ()):
            step = planner.stage_step_s(spec, node, at, to, context_tokens)
            cost = (node.profile.network_rtt_s or planner.DEFAULT_CHAIN_CONFIG.rtt_s_default) / 2
            cand = (here[0] + cost + PETALS_OVERHEAD_S + step, (*here[1], node.node_id),
                    (*here[2], planner.StagePlan(node.node_id, at, to, step,
                                                 planner.hop_s(spec, node))))
            old = best.get(to)
            if old is None or cand[:2] < old[:2]:
                best[to] = cand
    done = best.get(end)
    return planner.ChainPlan(done[2]) if done is not None and done[2] else None


class ChainSimulation(Simulation):
    """The event loop of sim/loop.py with chains in place of whole-model attempts: arrivals,
    the scheduling tick, the waiting queue's expiry, joins and leaves are the base class's;
    placement, stage losses and the chains' progress are here."""

    def __init__(self, trace: Trace, fleet: FleetSpec, config: SimConfig,
                 progress: Callable[[int, int], None] | None = None) -> None:
        super().__init__(trace, fleet, config, progress)
        if self.config.policy not in ("fastest", "fixed-chain", "petals"):
            raise ValueError(f"policy {self.config.policy!r} does not run chains; "
                             "use fastest, fixed-chain or petals")
        self.spec = next(iter(self.models.values()))
        n = len(self.nodes)
        self.layers: list[tuple[int, int]] = []
        self.hop: list[float] = []
        self.static: list[NodeSnapshot] = []
        for node in self.nodes:
            cls = self.fleet.classes[node.cls]
            i = int(node.node_id.rsplit("-", 1)[1])
            rng = cls.layers[i % len(cls.layers)]
            self.layers.append(rng)
            node.costs = perfmodel.costs(planner.stage_spec(self.spec, *rng), node.profile)
            snap = NodeSnapshot(node.node_id, "owner-" + node.node_id, node.profile, ())
            self.static.append(snap)
            self.hop.append(planner.hop_s(self.spec, snap))
        self.through: list[list[ChainRun]] = [[] for _ in range(n)]  # chains holding a slot
        self.batch = [0] * n  # ... of which decoding
        self.kv_used = [0] * n
        self.prefill_free = [0.0] * n  # when the node's queued prefills are done
        self.runs: dict[int, ChainRun] = {}
        self.fixed: list[Stage] | None = None  # fixed-chain: the chain
        self.counters = {"repairs": 0, "repair_failed": 0, "stage_losses": 0}

    def handlers(self) -> dict[int, Callable[[object, int, float], None]]:
        out = super().handlers()
        out[EV_DRAIN_END] = self.on_stage_lost
        out[EV_CHAIN] = self.on_chain
        out[EV_REPAIR] = self.on_repair
        return out

    # --- what the coordinator sees -------------------------------------------------------------

    def _index(self, node: SimNode) -> None:
        node.snapshot = None  # no whole-model index: every node is offered (small fleets)

    def stage_snapshot(self, node: SimNode, t: float) -> NodeSnapshot:
        if node.snapshot is not None and t - node.snapshot_t <= self.config.stay_refresh_s:
            return node.snapshot
        idx = node.idx
        node.snapshot = NodeSnapshot(
            node_id=node.node_id, owner_id="owner-" + node.node_id, profile=node.profile,
            models=(), active_jobs=len(self.through[idx]), jobs_max=node.jobs_max,
            kv_reserved_tokens=self.kv_used[idx],
            prefill_backlog_s=max(0.0, self.prefill_free[idx] - t), available=node.accepting,
            expected_stay_s=self.stay_of(node, t), reputation=node.reputation,
            draining=node.draining, layer_ranges={self.spec.name: self.layers[idx]},
        )  # fmt: skip
        node.snapshot_t = t
        return node.snapshot

    def _offered(self, t: float, kv_need: int) -> list[NodeSnapshot]:
        """Nodes that could take a stage of a chain needing ``kv_need`` KV tokens per stage."""
        return [self.stage_snapshot(n, t) for n in self.nodes
                if n.accepting and not n.draining
                and self.kv_used[n.idx] + kv_need <= n.costs.kv_capacity_tokens]

    # --- the policies ----------------------------------------------------------------------

    def _plan(self, run_job: Job, t: float, first: int, end: int, context: int, tokens_left: int,
              kv_need: int, avoid: Iterable[str]) -> planner.ChainPlan | None:
        offered = self._offered(t, kv_need)
        policy = self.config.policy
        if policy == "petals":
            return petals_route(self.spec, offered, first, end, context_tokens=context,
                                avoid=avoid)
        if policy == "fixed-chain":
            return self._fixed_segment(offered, first, end, context, avoid)
        strict = t - run_job.admitted_at_s < self.sched.stay_rule_relax_after_s
        return planner.plan_chain_for_job(
            self.spec, offered, context_tokens=context, tokens_left=tokens_left, avoid=avoid,
            first=first, end=end, strict=strict, stay_fraction_max=self.sched.stay_fraction_max,
            departure_penalty_fraction=self.sched.departure_penalty_fraction)

    def _fixed_segment(self, offered: Sequence[NodeSnapshot], first: int, end: int, context: int,
                       avoid: Iterable[str]) -> planner.ChainPlan | None:
        """The fixed chain's stages over ``[first, end)``: chosen by the planner the first
        time, then only its own nodes, a lost one replaced by a node of exactly its layers."""
        if self.fixed is None:
            plan = planner.plan_segment(self.spec, offered, first, end, context_tokens=context)
            if plan is not None and (first, end) == (0, self.spec.n_layers):
                self.fixed = [Stage(self.by_id[s.node_id], s.first, s.end) for s in plan.stages]
            return plan
        by_id = {s.node_id: s for s in offered}
        stages: list[planner.StagePlan] = []
        for st in self.fixed:
            if st.end <= first or st.first >= end:
                continue
            snap = by_id.get(st.node.node_id)
            if snap is None or st.node.node_id in avoid:
                if st.node.accepting and not st.node.draining:
                    return None  # up but full: the request waits for it
                same = [s for s in offered if s.layer_ranges[self.spec.name] == (st.first, st.end)]
                seg = planner.plan_segment(self.spec, same, st.first, st.end,
                                           context_tokens=context, avoid=avoid)
                if seg is None:
                    return None  # waits for the node, or one of the same layers
                st.node = self.by_id[seg.stages[0].node_id]  # the chain keeps the replacement
                stages.append(seg.stages[0])
            else:
                stages.append(planner.StagePlan(st.node.node_id, st.first, st.end, 0.0, 0.0))
        return planner.ChainPlan(tuple(stages))

    # --- placement -------------------------------------------------------------------------

    def _place(self, t: float) -> None:
        self.result_counters["calls"] += 1
        for w in list(self.waiting.values())[: limits.jobs_waiting_max]:
            job = w.job
            context = self.prompt[w.req]
            need = context + job.max_tokens
            plan = self._plan(job, t, 0, self.spec.n_layers, context, job.max_tokens, need,
                              job.avoid_nodes)
            if plan is None:
                continue
            self._unwait(job.job_id)
            self._start_chain(w, plan, t)

    def _start_chain(self, w: Waiting, plan: planner.ChainPlan, t: float) -> None:
        req = w.req
        run = ChainRun(req=req, job=w.job, stages=[], target=max(1, self.output[req]),
                       context0=self.prompt[req], kv_need=self.prompt[req] + w.job.max_tokens,
                       last_t=t)  # fmt: skip
        run.stages = [self._occupy(run, s) for s in plan.stages]
        self.runs[req] = run
        self.live[req] = []  # the loop's "something is running" (chains keep their own)
        self.attempts[req] = min(255, self.attempts[req] + 1)
        self._schedule_prefill(run, run.stages, run.context0, t)

    def _occupy(self, run: ChainRun, s: planner.StagePlan) -> Stage:
        node = self.by_id[s.node_id]
        self.through[node.idx].append(run)
        self.kv_used[node.idx] += run.kv_need
        node.snapshot = None
        node.last_assigned_t = run.last_t
        return Stage(node, s.first, s.end, int(run.done))

    def _release(self, run: ChainRun, st: Stage) -> None:
        idx = st.node.idx
        self.through[idx].remove(run)
        self.kv_used[idx] -= run.kv_need
        st.node.snapshot = None

    def _schedule_prefill(self, run: ChainRun, stages: list[Stage], tokens: int,
                          t: float) -> None:
        """Prefill ``tokens`` positions through ``stages`` one after another (see the module's
        doc); the chain's event at the end."""
        at = t
        for st in stages:
            idx = st.node.idx
            start = max(at, self.prefill_free[idx])
            took = st.node.costs.prefill_s(tokens) / st.node.speed
            self.prefill_free[idx] = start + took
            st.node.busy_s += took
            st.node.snapshot = None  # its prefill backlog changed
            at = start + took + planner.prefill_hop_s(self.spec, self.static[idx], tokens)
        run.version += 1
        self.push(at, EV_CHAIN, run, run.version)

    # --- decoding ----------------------------------------------------------------------------

    def _decoding_through(self, stages: Iterable[Stage]) -> list[ChainRun]:
        seen: dict[int, ChainRun] = {}
        for st in stages:
            for r in self.through[st.node.idx]:
                if r.phase == DECODE and r.live:
                    seen[id(r)] = r
        return list(seen.values())

    def _advance(self, run: ChainRun, t: float) -> None:
        dt = t - run.last_t
        if dt > 0.0 and run.phase == DECODE and run.token_s < math.inf:
            run.done = min(float(run.target), run.done + dt / run.token_s)
            for st, share in zip(run.stages, run.busy, strict=True):
                st.node.busy_s += dt * share
        run.last_t = t

    def _rerate(self, run: ChainRun, t: float) -> None:
        """The chain's time per token as its stages' batches stand, and its finish event."""
        context = run.context0 + int(run.done)
        steps = [st.node.costs.decode_step_s(max(1, self.batch[st.node.idx]), context)
                 / st.node.speed for st in run.stages]
        run.token_s = sum(steps) + sum(self.hop[st.node.idx] for st in run.stages)
        run.busy = [s / run.token_s / max(1, self.batch[st.node.idx])
                    for s, st in zip(steps, run.stages, strict=True)]
        run.last_t = t
        run.version += 1
        self.push(t + max(0.0, run.target - run.done) * run.token_s, EV_CHAIN, run, run.version)

    def _reshape(self, run: ChainRun, t: float, decoding: bool) -> None:
        """``run`` starts (True) or stops (False) decoding: the chains sharing a stage with it
        are brought up to ``t`` and re-rated at their new batch."""
        others = [r for r in self._decoding_through(run.stages) if r is not run]
        for r in others:
            self._advance(r, t)
        self._advance(run, t)
        for st in run.stages:
            self.batch[st.node.idx] += 1 if decoding else -1
        run.phase = DECODE if decoding else REPAIR
        for r in others:
            self._rerate(r, t)
        if decoding:
            self._rerate(run, t)
        else:
            run.version += 1  # its pending finish no longer applies

    def on_chain(self, obj: object, version: int, t: float) -> None:
        run = obj
        assert isinstance(run, ChainRun)
        if not run.live or version != run.version:
            return
        if run.phase == DECODE:
            self._advance(run, t)
            if run.done >= run.target - 1e-6:
                self._complete(run, t)
            else:
                self._rerate(run, t)
            return
        for st in run.stages:
            st.ready = True
        if run.phase == PREFILL:  # the last stage chose the first token
            self.first[run.req] = t
            run.done = 1.0
            if run.target <= 1:
                self._complete(run, t)
                return
        self._reshape(run, t, decoding=True)  # after a prefill or a repair's rebuild

    def _complete(self, run: ChainRun, t: float) -> None:
        req = run.req
        if run.phase == DECODE:
            self._reshape(run, t, decoding=False)
        run.live = False
        self.status[req] = DONE
        self.end[req] = t
        shares = run.shares
        for st in run.stages:
            shares.append((st.node, run.context0 + st.tokens0, run.target - st.tokens0,
                           planner.stage_work_ppm(self.spec, st.first, st.end)))
            st.node.tokens_out += run.target - st.tokens0
            self._release(run, st)
        self._settle_chain(req, shares)
        self._forget(req, t)

    def _settle_chain(self, req: int, shares: list[tuple[SimNode, int, int, int]]) -> None:
        """Settlement's rules (``pricing.split_charge``), each stage paid for its work."""
        price = self.prices.price_of(self.req_model[req])
        job = self.runs[req].job
        hold = pricing.hold_micros(price, self.prompt[req], job.max_tokens)
        charge = pricing.charge_micros(price, self.prompt[req], self.output[req], hold)
        work = [pricing.WorkShare("owner-" + n.node_id, n.node_id, n.profile.device_class, p, c,
                                  work_ppm=ppm) for n, p, c, ppm in shares]  # fmt: skip
        for e in pricing.split_charge(charge, price, self.prices.terms, work).earnings:
            self.by_id[e.node_id].earned_micros += e.amount_micros
        self.result_counters["charges"] += charge

    def _forget(self, req: int, t: float) -> None:
        """The chain ended: its slots are free for the waiting jobs."""
        self.live.pop(req, None)
        if self.waiting:
            self.want_schedule(t)

    def _fail_chain(self, run: ChainRun, t: float) -> None:
        if run.phase == DECODE:
            self._reshape(run, t, decoding=False)
        run.live = False
        run.version += 1
        for st in run.stages:
            self._release(run, st)
        self.fail(run.req, t)
        self._forget(run.req, t)

    # --- departures and repair ---------------------------------------------------------------

    def on_stage_lost(self, obj: object, version: int, t: float) -> None:
        """A leaving node's drain grace ran out: every chain through it loses that stage."""
        node = obj
        assert isinstance(node, SimNode)
        if not node.draining or version != node.drains:
            return
        node.draining = False
        for run in list(self.through[node.idx]):
            self._lose_stage(run, node, t)
        self.prefill_free[node.idx] = t
        node.snapshot = None

    def _lose_stage(self, run: ChainRun, node: SimNode, t: float) -> None:
        self.counters["stage_losses"] += 1
        self.interrupted[run.req] = min(255, self.interrupted[run.req] + 1)
        i = next(k for k, st in enumerate(run.stages) if st.node is node)
        was = run.phase
        if was == DECODE:
            self._reshape(run, t, decoding=False)
        else:
            run.version += 1  # a prefill or rebuild under way is cut short
        lost = run.stages.pop(i)
        self._release(run, lost)
        delivered = int(run.done)
        if delivered > lost.tokens0:
            run.shares.append((node, run.context0 + lost.tokens0, delivered - lost.tokens0,
                               planner.stage_work_ppm(self.spec, lost.first, lost.end)))
        run.avoid.add(node.node_id)
        run.phase = PREFILL if was == PREFILL else REPAIR
        run.repairs += 1
        if run.broken is not None:  # a second loss while waiting: one segment over both gaps
            lo, hi = min(run.broken[0], lost.first), max(run.broken[1], lost.end)
            for st in [s for s in run.stages if lo <= s.first and s.end <= hi]:
                run.stages.remove(st)
                self._release(run, st)
            run.broken = (lo, hi)
        else:
            run.broken = (lost.first, lost.end)
            run.lost_at = t
        if run.repairs > limits.stage_repairs_max:
            self.counters["repair_failed"] += 1
            self._fail_chain(run, t)
            return
        self._try_repair(run, t)

    def _try_repair(self, run: ChainRun, t: float) -> None:
        assert run.broken is not None
        first, end = run.broken
        i = sum(1 for st in run.stages if st.end <= first)
        delivered = int(run.done)
        context = run.context0 + delivered
        avoid = run.avoid | {st.node.node_id for st in run.stages}
        plan = self._plan(run.job, t, first, end, context, run.target - delivered, run.kv_need,
                          avoid)
        if plan is None:
            if t - run.lost_at >= limits.placement_wait_s_max:
                self.counters["repair_failed"] += 1
                self._fail_chain(run, t)
            else:
                run.version += 1
                self.push(t + self.config.retry_interval_s, EV_REPAIR, run, run.version)
            return
        run.last_t = t
        fresh = [self._occupy(run, s) for s in plan.stages]
        run.stages[i:i] = fresh
        run.broken = None
        self.counters["repairs"] += 1
        # the new stages' caches from the lost stage's inputs (and any other stage's not yet
        # built: a prompt's prefill cut short starts again through the repaired chain)
        self._schedule_prefill(run, [st for st in run.stages if not st.ready], context, t)

    def on_repair(self, obj: object, version: int, t: float) -> None:
        run = obj
        assert isinstance(run, ChainRun)
        if run.live and version == run.version and run.broken is not None:
            self._try_repair(run, t)

    # --- the result ----------------------------------------------------------------------------

    def _result(self, t_end: float, wall_s: float) -> SimResult:
        for run in list(self.runs.values()):
            if run.live:  # still running when the run stopped
                self._fail_chain(run, t_end)
        result = super()._result(t_end, wall_s)
        result.extra.update({k: float(v) for k, v in self.counters.items()})
        result.extra["chain_stages_mean"] = (
            sum(len(r.stages) for r in self.runs.values() if self.status[r.req] == DONE)
            / max(1, sum(1 for r in self.runs.values() if self.status[r.req] == DONE)))
        return result


__all__ = ["ChainRun", "ChainSimulation", "Stage", "petals_route"]
